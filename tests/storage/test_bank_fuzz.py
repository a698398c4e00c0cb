"""Bad input, fuzzed (tests/_fuzz.py): add, feedback and gather."""

from __future__ import annotations

import pytest
import torch
from _fuzz import (
    SHAPE,
    _flag,
    argument,
    attempt,
    check_bank,
    fresh_pool,
    live_ids,
    tensors,
)
from hypothesis import given
from hypothesis import strategies as st


# ----------------------------------------------------------------------- add
class TestFuzzAdd:
    @given(data=st.data())
    def test_add(self, data):
        draw = data.draw
        pool = fresh_pool()
        clean = draw(st.booleans())  # half the examples are valid calls, to check the results too
        n = draw(st.integers(0, 6))
        shape = (n, *SHAPE, 3) if clean or _flag(draw, 85) else (n, *draw(st.tuples(*[st.integers(0, 3)] * 3)), 3)
        dreams = draw(tensors(shape, clean=clean))
        coherence = draw(argument((n,), clean=clean))
        energy = draw(argument((n,), high=5.0, optional=True, clean=clean))
        violation = draw(argument((n,), optional=True, clean=clean))
        labels = draw(argument((n,), kind="int", low=-1, high=9, optional=True, clean=clean))
        force = draw(st.booleans())
        next_before, alive_before = pool.bank.next_id, live_ids(pool)
        counters_before = dict(pool.counters)
        ids, error = attempt(
            pool,
            lambda: pool.add(
                dreams, coherence=coherence, energy=energy, violation=violation, class_label=labels, force=force
            ),
        )
        assert error is None or not clean, error
        if error is not None:
            return
        check_bank(pool)
        batch = torch.as_tensor(dreams).to(pool.device)
        assert ids.shape == (batch.shape[0],) and ids.dtype == torch.int64 and ids.device == pool.device
        new = ids[ids >= 0]
        assert new.tolist() == list(range(next_before, pool.bank.next_id))  # fresh, increasing
        assert set(new.tolist()) <= live_ids(pool)
        stored = pool.counters["added"] - counters_before["added"]
        assert stored == new.numel()
        evicted = pool.counters["evicted"] - counters_before["evicted"]
        assert len(alive_before - live_ids(pool)) == evicted
        if new.numel():
            accepted = torch.nonzero(ids >= 0).squeeze(1)
            expected = batch[accepted].to(pool.bank.columns["dreams"].dtype)
            assert torch.equal(pool.dreams(new), expected)
            if not force:
                coh = torch.as_tensor(coherence, dtype=torch.float32, device=pool.device).expand(batch.shape[0])
                assert bool((coh[accepted] >= pool.config.coherence_threshold).all())


# ------------------------------------------------------------------ feedback
class TestFuzzFeedback:
    @given(data=st.data())
    def test_feedback(self, data):
        draw = data.draw
        pool = fresh_pool()
        clean = draw(st.booleans())
        shape = draw(st.sampled_from([(draw(st.integers(0, 6)),), (2, 3), ()]))
        top = pool.bank.next_id
        ids = draw(argument(shape, kind="int", low=-1, high=top - 1 if clean else top + 1, clean=clean))
        utility = draw(argument(shape, clean=clean))
        alive = live_ids(pool)
        recorded, error = attempt(pool, lambda: pool.feedback(ids, utility))
        assert error is None or not clean or torch.as_tensor(utility).dim() > torch.as_tensor(ids).dim(), error
        if error is not None:
            return
        check_bank(pool)
        flat = [i for i in torch.as_tensor(ids).reshape(-1).tolist()]
        assert recorded == sum(1 for i in flat if i in alive)
        util = pool.bank.columns["util_mean"]
        assert bool(((util >= 0) & (util <= 1)).all())


# ----------------------------------------------------------- dreams, metadata
class TestFuzzGather:
    @pytest.mark.parametrize("which", ["dreams", "metadata"])
    @given(data=st.data())
    def test_gather(self, data, which):
        draw = data.draw
        pool = fresh_pool()
        shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
        ids = draw(argument(shape, kind="int", low=-1, high=pool.bank.next_id + 1))
        alive = live_ids(pool)
        out, error = attempt(pool, lambda: getattr(pool, which)(ids))
        if error is not None:
            return
        id_t = torch.as_tensor(ids).cpu()
        out = {k: v.cpu() for k, v in out.items()} if which == "metadata" else out.cpu()
        found = torch.tensor([i in alive for i in id_t.reshape(-1).tolist()], dtype=torch.bool).reshape(id_t.shape)
        if which == "dreams":
            assert out.shape == (*id_t.shape, *SHAPE, 3)
            assert bool((out[~found] == 0).all())
        else:
            assert torch.equal(out["found"], found)
            assert torch.equal(out["ids"][found], id_t[found].long())
