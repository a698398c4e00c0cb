"""Issue-15 regressions (adversarial run, new-user trial): retrieval."""

from __future__ import annotations

import pytest
import torch
from _hardening import (
    MODES,
    SHAPE,
    dreams,
    make_pool,
    mode_kwargs,
)

from dreampool_gpu import DreamPool, PoolConfig
from dreampool_gpu.errors import (
    DreamPoolError,
    InvalidInputError,
)


# ------------------------------------------------------------------ item 1
class TestZeroK:
    def test_k0_with_the_ivf_engine_active(self):
        cfg = PoolConfig(
            dream_shape=(2, 2, 1),
            capacity=1100,
            embedding_dim=16,
            device="cpu",
            engine="faiss-ivf",
            ann_threshold=1024,
            coherence_threshold=0.0,
        )
        pool = DreamPool(cfg)
        pool.add(dreams(1100, shape=(2, 2, 1)), coherence=torch.ones(1100))
        assert pool.index.describe()["trained"]
        for mode in MODES:
            out = pool.retrieve(dreams(3, seed=1, shape=(2, 2, 1)), k=0, mode=mode, **mode_kwargs(mode))
            assert out.ids.shape == (3, 0) and out.scores.shape == (3, 0), mode
        assert pool.index.search(torch.randn(2, 16), 0)[1].shape == (2, 0)

    @pytest.mark.parametrize("engine", ["torch", "faiss-flat", "auto"])
    def test_k0_every_mode_and_engine(self, engine):
        pool = make_pool(engine=engine)
        for mode in MODES:
            out = pool.retrieve(dreams(2, seed=3), k=0, mode=mode, **mode_kwargs(mode))
            assert out.ids.shape == (2, 0), (engine, mode)


# ------------------------------------------------------------------ item 9
class TestExtremeQueries:
    @pytest.mark.parametrize("scale", [1e20, 1e-30, 1e30])
    def test_cosine_scale_invariant(self, scale):
        pool = make_pool(n=30)
        q = torch.randn(4, pool.config.embedding_dim, generator=torch.Generator().manual_seed(2))
        want = pool.retrieve(q, k=5, mode="nearest")
        got = pool.retrieve(q * scale, k=5, mode="nearest")
        assert torch.equal(got.ids, want.ids)

    def test_float64_past_float32_range_is_refused(self):
        pool = make_pool(n=5)
        q = torch.full((1, pool.config.embedding_dim), 1e300, dtype=torch.float64)
        with pytest.raises(InvalidInputError, match="finite"):
            pool.retrieve(q, k=3, mode="nearest")

    def test_euclidean_overflow_is_a_typed_error(self):
        pool = make_pool(n=10, metric="euclidean")
        q = torch.ones(2, pool.config.embedding_dim) * 1e19
        with pytest.raises(InvalidInputError, match="euclidean"):
            pool.retrieve(q, k=3, mode="nearest")
        ok = pool.retrieve(torch.ones(2, pool.config.embedding_dim) * 1e17, k=3, mode="nearest")
        assert (ok.ids >= 0).all()


# ----------------------------------------------------------------- item 15
class TestWhere:
    def _pools(self, n=60, engine="auto"):
        """A pool of n entries and one holding only those with coherence >= 0.5, added in the same order."""
        g = torch.Generator().manual_seed(4)
        coherence = torch.rand(n, generator=g)
        labels = torch.randint(-1, 10, (n,), generator=g)
        batch = dreams(n, seed=6)
        cfg = PoolConfig(
            dream_shape=SHAPE, capacity=n, device="cpu", coherence_threshold=0.0, engine=engine, features="eager"
        )  # eager: the encoder's statistics are fitted by add, before they are copied
        full, part = DreamPool(cfg), DreamPool(cfg)
        full.add(batch, coherence=coherence, class_label=labels)
        kept = coherence >= 0.5
        part.add(batch[kept], coherence=coherence[kept], class_label=labels[kept])
        part.encoder.load_state_dict(full.encoder.state_dict())  # the same feature statistics
        part.reembed()
        return full, part

    @pytest.mark.parametrize("mode", MODES)
    def test_where_equals_a_pool_of_the_kept_entries(self, mode):
        full, part = self._pools()
        q = dreams(5, seed=12)
        kwargs = {"k": 4, "mode": mode, "with_dreams": True, **mode_kwargs(mode)}
        by_callable = full.retrieve(q, where=lambda m: m["coherence"] >= 0.5, **kwargs)
        by_mask = full.retrieve(q, where=full.bank.columns["coherence"] >= 0.5, **kwargs)
        want = part.retrieve(q, **kwargs)
        assert torch.equal(by_callable.dreams, want.dreams) and torch.equal(by_mask.dreams, want.dreams)
        torch.testing.assert_close(by_callable.scores, want.scores)
        assert torch.equal(by_callable.ids, by_mask.ids)

    def test_columns_offered_to_the_callable(self):
        full, _ = self._pools(n=10)
        seen = {}
        full.retrieve(dreams(1), k=2, where=lambda m: seen.update(m) or m["inserted_at"] >= 0)
        assert set(seen) == {
            "coherence",
            "energy",
            "violation",
            "utility",
            "util_mean",
            "feedback_count",
            "usage",
            "class_label",
            "hue_category",
            "inserted_at",
            "ids",
        }
        assert all(t.shape == (10,) and t.device == full.device for t in seen.values())

    def test_bad_filters_are_typed_and_change_nothing(self):
        full, _ = self._pools(n=10)
        usage = full.bank.columns["usage"].clone()
        for bad in (torch.ones(9, dtype=torch.bool), torch.ones(10), lambda m: m["nope"], lambda m: 1):
            with pytest.raises(DreamPoolError):
                full.retrieve(dreams(1), k=2, where=bad)
        assert torch.equal(full.bank.columns["usage"], usage) and full.counters["queries"] == 0

    def test_nothing_qualifies(self):
        full, _ = self._pools(n=10)
        out = full.retrieve(dreams(2), k=3, mode="nearest", where=torch.zeros(10, dtype=torch.bool))
        assert (out.ids == -1).all()


# ----------------------------------------------------------------- item 19
def test_brightness_aware_chroma_metric():
    pool = DreamPool(PoolConfig(dream_shape=(1, 1, 1), capacity=16, device="cpu", coherence_threshold=0.0))
    query = torch.tensor([[0.6, 0.65, 0.8]])  # light blue-grey
    black = torch.zeros(5, 1, 1, 1, 3) + 0.05 * query  # near-black of exactly the query's hue
    light = torch.zeros(1, 1, 1, 1, 3) + torch.tensor([0.58, 0.66, 0.79])  # light blue-grey, added last
    pool.add(torch.cat([black, light]), coherence=torch.ones(6))
    by_hue = pool.retrieve(query, k=1, mode="similar")
    by_rgb = pool.retrieve(query, k=1, mode="similar", chroma_metric="euclidean")
    assert by_rgb.ids.tolist() == [[5]] and by_hue.ids.tolist() != [[5]]
    with pytest.raises(InvalidInputError, match="chroma_metric"):
        pool.retrieve(query, k=1, chroma_metric="manhattan")


@pytest.mark.gpu
def test_where_on_cuda_matches_cpu():
    cpu = make_pool(n=50)
    gpu = make_pool(n=50, device="cuda")
    q = dreams(4, seed=13)
    for mode in ["similar", "class", "balanced", "utility", "nearest"]:  # exact on both devices
        kwargs = {"k": 4, "mode": mode, **mode_kwargs(mode)}
        want = cpu.retrieve(q, where=lambda m: m["coherence"] >= 0.0, **kwargs).ids
        got = gpu.retrieve(q.cuda(), where=lambda m: m["hue"] >= 0, **kwargs).ids
        assert torch.equal(got.cpu(), want), mode
