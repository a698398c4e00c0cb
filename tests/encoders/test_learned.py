"""Learned and user encoders in a pool: fit_encoder, all-or-nothing, checkpoints, num_classes, staleness."""

from __future__ import annotations

import pytest
import torch
from _equality import assert_same_results

from dreampool_gpu import DreamPool, PoolConfig
from dreampool_gpu import fitting as fitting_module
from dreampool_gpu.errors import (
    DimensionMismatchError,
    EncoderFitError,
    IndexStaleError,
    InvalidConfigurationError,
    InvalidInputError,
)
from dreampool_gpu.synthetic import make_dataset

SHAPE = (6, 6, 2)


def data(name="colours", n=120, seed=0):
    return make_dataset(name, n, shape=SHAPE, seed=seed)


def learned_pool(n=120, labelled=True, **overrides) -> DreamPool:
    d = data(n=n)
    cfg = PoolConfig(dream_shape=SHAPE, capacity=256, device="cpu", encoder="learned", **overrides)
    pool = DreamPool(cfg)
    pool.add(d.dreams, coherence=torch.ones(n), class_labels=d.labels if labelled else None)
    return pool


def state_of(pool: DreamPool) -> dict[str, object]:
    """Everything a fit may change: bank columns, encoder weights, index answers, cache, counters."""
    probe = data(n=5, seed=7).dreams
    hits = pool.retrieve(probe, k=4, mode="nearest")
    return {
        "columns": {k: v.clone() for k, v in pool.bank.columns.items() if k != "usage"},
        "encoder": {k: v.clone() for k, v in pool.encoder.state_dict().items()},
        "hits": (hits.ids.clone(), hits.scores.clone()),
        "cache": len(pool.cache),
        "counters": {k: v for k, v in pool.counters.items() if k != "queries"},
        "revision": pool.bank.revision,
    }


def assert_same_state(a: dict[str, object], b: dict[str, object]) -> None:
    for name, t in a["columns"].items():
        assert torch.equal(t.nan_to_num(-7), b["columns"][name].nan_to_num(-7)), name
    for name, t in a["encoder"].items():
        assert torch.equal(t, b["encoder"][name]), name
    assert torch.equal(a["hits"][0], b["hits"][0]) and torch.equal(a["hits"][1], b["hits"][1])
    assert a["cache"] == b["cache"] and a["counters"] == b["counters"] and a["revision"] == b["revision"]


class TestFit:
    def test_fit_is_deterministic_on_cpu(self):
        a, b = learned_pool(), learned_pool()
        ra = a.fit_encoder(steps=3, batch_size=32, seed=4)
        rb = b.fit_encoder(steps=3, batch_size=32, seed=4)
        assert ra.losses == rb.losses and len(ra.losses) == 3
        assert torch.equal(a.bank.columns["embeddings"], b.bank.columns["embeddings"])
        assert ra.entries == 120 and ra.labelled == 120

    def test_fit_changes_embeddings_rebuilds_index_and_clears_cache(self):
        pool = learned_pool()
        pool.retrieve(torch.rand(2, 3), k=3, mode="nearest")  # a chroma query fills the cache
        assert len(pool.cache) == 2
        before = pool.bank.columns["embeddings"].clone()
        revision = pool.bank.revision
        pool.fit_encoder(steps=2, batch_size=16)
        assert not torch.equal(before, pool.bank.columns["embeddings"])
        assert len(pool.cache) == 0 and pool.bank.revision > revision
        live = pool.bank.slots_by_age()
        z = pool.encoder.encode_entries(
            pool.bank.columns["dreams"][live], chroma=None, spectral=None, class_labels=None
        )
        torch.testing.assert_close(pool.bank.columns["embeddings"][live], z)  # one copy, current encoder
        hits = pool.retrieve(pool.bank.columns["embeddings"][live[:3]], k=1, mode="nearest")
        assert hits.ids[:, 0].tolist() == pool.bank.columns["ids"][live[:3]].tolist()

    def test_features_encoder_is_not_trainable(self):
        pool = DreamPool(PoolConfig(dream_shape=SHAPE, device="cpu"))
        with pytest.raises(InvalidConfigurationError, match="trainable"):
            pool.fit_encoder(steps=1)

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"steps": 0}, "steps"),
            ({"batch_size": 1}, "batch_size"),
            ({"lr": 0.0}, "lr"),
            ({"lr": float("nan")}, "lr"),
            ({"seed": -1}, "seed"),
            ({"steps": 2.5}, "steps"),
        ],
    )
    def test_bad_arguments(self, kwargs, match):
        pool = learned_pool(n=10)
        before = state_of(pool)
        with pytest.raises(InvalidInputError, match=match):
            pool.fit_encoder(**kwargs)
        assert_same_state(before, state_of(pool))

    def test_needs_two_entries(self):
        pool = learned_pool(n=1)
        with pytest.raises(InvalidInputError, match="at least 2 entries"):
            pool.fit_encoder(steps=1)


class TestAllOrNothing:
    @pytest.fixture(autouse=True)
    def default_sigint(self):
        """Python's own SIGINT handler, as in an interactive run (a background job starts with SIGINT ignored)."""
        import signal

        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        yield
        signal.signal(signal.SIGINT, previous)

    def test_diverged_loss_leaves_the_pool_unchanged(self, monkeypatch):
        pool = learned_pool()
        pool.retrieve(torch.rand(2, 3), k=3, mode="nearest")
        before = state_of(pool)
        monkeypatch.setattr(fitting_module, "supervised_contrastive", lambda z, *a, **k: (z * float("nan")).sum())
        with pytest.raises(EncoderFitError, match="NaN|nan"):
            pool.fit_encoder(steps=3, batch_size=16)
        assert_same_state(before, state_of(pool))

    def test_interrupt_while_re_embedding_leaves_the_pool_unchanged(self, monkeypatch):
        pool = learned_pool()
        before = state_of(pool)
        slot = pool.parts.encoders
        real = slot.embed_live

        def interrupted(encoder):
            if encoder is not pool.encoder:
                raise KeyboardInterrupt
            return real(encoder)

        monkeypatch.setattr(slot, "embed_live", interrupted)
        with pytest.raises(KeyboardInterrupt):
            pool.fit_encoder(steps=2, batch_size=16)
        monkeypatch.undo()
        assert_same_state(before, state_of(pool))

    def test_failure_while_rebuilding_the_index_restores_everything(self, monkeypatch):
        pool = learned_pool()
        before = state_of(pool)
        real_add, calls = pool.index.add, []

        def fail_once(slots):
            calls.append(1)
            if len(calls) == 1:
                raise MemoryError("out of memory (simulated)")
            return real_add(slots)

        monkeypatch.setattr(pool.index, "add", fail_once)
        with pytest.raises(MemoryError):
            pool.fit_encoder(steps=2, batch_size=16)
        monkeypatch.undo()
        after = state_of(pool)
        after["revision"] = before["revision"]  # the failed swap bumped it: any reader re-validates
        assert_same_state(before, after)

    @staticmethod
    def answers(pool: DreamPool, queries: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(r.ids, r.scores) for r in (pool.retrieve(queries, k=5, mode=m) for m in ("nearest", "hybrid"))]

    def assert_answers_like_a_fresh_pool(self, pool: DreamPool, queries: torch.Tensor) -> None:
        fresh = DreamPool(pool.config)
        fresh.load_state_dict(pool.state_dict())
        for (ids, scores), (want_ids, want_scores) in zip(
            self.answers(pool, queries), self.answers(fresh, queries), strict=True
        ):
            assert_same_results(ids, scores, want_ids, want_scores)  # docs/spec.md, "Equality of results"

    @pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
    def test_interrupt_at_cache_clear_leaves_no_stale_embeddings(self, monkeypatch, error):
        """The old encoder's cached query embeddings never answer for the new one (issue 22)."""
        pool = learned_pool()
        queries = torch.rand(4, 3, generator=torch.Generator().manual_seed(5))
        self.answers(pool, queries)  # cached under the current encoder
        before = state_of(pool)
        real_clear = pool.cache.clear

        def interrupted() -> None:
            real_clear()
            raise error("at cache.clear()")

        monkeypatch.setattr(pool.cache, "clear", interrupted)
        with pytest.raises(error):
            pool.fit_encoder(steps=2, batch_size=16)
        monkeypatch.undo()
        after = state_of(pool)
        after["revision"], after["cache"] = before["revision"], before["cache"]  # bumped; emptied by the fake
        assert_same_state(before, after)  # the install was undone whole
        self.assert_answers_like_a_fresh_pool(pool, queries)

    def test_ctrl_c_during_the_install_is_held_then_undoes_it(self, monkeypatch):
        """A real SIGINT in the middle of the install: held, then the install is undone as a whole."""
        import signal

        pool = learned_pool()
        queries = torch.rand(4, 3, generator=torch.Generator().manual_seed(6))
        self.answers(pool, queries)
        before = state_of(pool)
        real_add, seen = pool.index.add, []

        def add_then_sigint(slots):
            out = real_add(slots)
            if not seen:
                seen.append(1)
                signal.raise_signal(signal.SIGINT)  # delivered to the held handler, not raised here
                seen.append(2)
            return out

        monkeypatch.setattr(pool.index, "add", add_then_sigint)
        with pytest.raises(KeyboardInterrupt):
            pool.fit_encoder(steps=2, batch_size=16)
        monkeypatch.undo()
        assert seen == [1, 2]  # the index rebuild ran on: the signal was held
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        after = state_of(pool)
        assert after["cache"] == 0  # emptied within the install (entries of the old encoder, a saving only)
        after["revision"], after["cache"] = before["revision"], before["cache"]
        assert_same_state(before, after)
        self.assert_answers_like_a_fresh_pool(pool, queries)

    def test_a_callers_own_sigint_handler_runs_after_the_install(self, monkeypatch):
        """A handler of the caller's (a graceful stop, say) is called once the install is complete."""
        import signal

        pool = learned_pool()
        pool.bank.settle()  # lazy features: their index.add comes now, not inside the fit
        calls: list[int] = []
        real_add, fired = pool.index.add, []

        def add_then_sigint(slots):
            out = real_add(slots)
            if not fired:
                fired.append(1)
                signal.raise_signal(signal.SIGINT)
                assert calls == []  # held
            return out

        monkeypatch.setattr(pool.index, "add", add_then_sigint)
        previous = signal.signal(signal.SIGINT, lambda signum, frame: calls.append(signum))
        try:
            report = pool.fit_encoder(steps=2, batch_size=16)
            handler_after = signal.getsignal(signal.SIGINT)
        finally:
            signal.signal(signal.SIGINT, previous)
        monkeypatch.undo()
        assert calls == [signal.SIGINT] and report.steps == 2
        assert callable(handler_after) and handler_after is not signal.default_int_handler
        self.assert_answers_like_a_fresh_pool(pool, torch.rand(4, 3, generator=torch.Generator().manual_seed(9)))

    def test_a_completed_fit_returns_and_answers_like_a_fresh_pool(self):
        import signal

        pool = learned_pool()
        queries = torch.rand(4, 3, generator=torch.Generator().manual_seed(8))
        self.answers(pool, queries)
        report = pool.fit_encoder(steps=2, batch_size=16)
        assert report.steps == 2 and len(pool.cache) == 0
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        self.assert_answers_like_a_fresh_pool(pool, queries)


class TestCheckpoints:
    def test_save_load_and_state_dict_give_identical_retrievals(self, tmp_path):
        pool = learned_pool()
        pool.fit_encoder(steps=3, batch_size=32)
        queries = data(n=6, seed=3).dreams
        want = pool.retrieve(queries, k=5, mode="hybrid")
        want_chroma = pool.retrieve(torch.rand(4, 3, generator=torch.Generator().manual_seed(1)), k=5, mode="nearest")
        pool.save(tmp_path / "ck")
        loaded = DreamPool.load(tmp_path / "ck")
        other = DreamPool(pool.config)
        other.load_state_dict(pool.state_dict())
        for p in (loaded, other):
            got = p.retrieve(queries, k=5, mode="hybrid")
            assert_same_results(got.ids, got.scores, want.ids, want.scores)
            got_chroma = p.retrieve(torch.rand(4, 3, generator=torch.Generator().manual_seed(1)), k=5, mode="nearest")
            assert_same_results(got_chroma.ids, got_chroma.scores, want_chroma.ids, want_chroma.scores)

    def test_feature_statistics_ride_in_the_checkpoint(self, tmp_path):
        d = data(n=50)
        pool = DreamPool(PoolConfig(dream_shape=SHAPE, capacity=64, device="cpu"))
        pool.add(d.dreams, coherence=torch.ones(50))
        pool.save(tmp_path / "ck")
        loaded = DreamPool.load(tmp_path / "ck")
        assert torch.equal(loaded.encoder.mean, pool.encoder.mean)
        assert torch.equal(loaded.bank.columns["embeddings"], pool.bank.columns["embeddings"])

    def test_encoder_kind_must_match(self):
        pool = learned_pool(n=10)
        other = DreamPool(pool.config.replace(encoder="features"))
        with pytest.raises(InvalidConfigurationError, match="encoder"):
            other.load_state_dict(pool.state_dict())


class Tiny(torch.nn.Module):
    """A user's encoder: dreams [N, 6, 6, 2, 3] -> [N, 8]."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6 * 6 * 2 * 3, 8))

    def forward(self, dreams: torch.Tensor) -> torch.Tensor:
        return self.net(dreams)


class TestUserModule:
    def make(self) -> tuple[DreamPool, Tiny]:
        torch.manual_seed(0)
        module = Tiny()
        pool = DreamPool(PoolConfig(dream_shape=SHAPE, capacity=64, embedding_dim=8, device="cpu"), encoder=module)
        d = data(n=40)
        pool.add(d.dreams, coherence=torch.ones(40), class_labels=d.labels)
        return pool, module

    def test_module_plugs_in_and_every_query_kind_works(self):
        pool, module = self.make()
        dreams = data(n=3, seed=2).dreams
        by_dream = pool.retrieve(dreams, k=4, mode="nearest")
        by_embedding = pool.retrieve(module(dreams).detach(), k=4, mode="nearest")
        assert torch.equal(by_dream.ids, by_embedding.ids)
        flat = torch.full((1, *SHAPE, 3), 0.3)
        by_chroma = pool.retrieve(torch.full((1, 3), 0.3), k=4, mode="nearest")
        assert torch.equal(by_chroma.ids, pool.retrieve(flat, k=4, mode="nearest").ids)

    def test_changed_weights_are_detected_until_reembed(self):
        pool, module = self.make()
        with torch.no_grad():
            module.net[1].weight.mul_(2.0).add_(0.1)
        with pytest.raises(IndexStaleError, match="reembed"):
            pool.retrieve(torch.rand(2, 3), k=3, mode="nearest")
        pool.reembed()
        assert pool.retrieve(torch.rand(2, 3), k=3, mode="nearest").ids.shape == (2, 3)
        assert pool.retrieve(torch.rand(2, 3), k=3, mode="similar").ids.shape == (2, 3)  # chroma modes unaffected

    def test_a_user_module_round_trips_through_a_checkpoint(self, tmp_path):
        pool, _ = self.make()
        pool.fit_encoder(steps=2, batch_size=16)
        q = data(n=3, seed=5).dreams
        want = pool.retrieve(q, k=4, mode="nearest")
        pool.save(tmp_path / "ck")
        with pytest.raises(InvalidConfigurationError, match="module"):
            DreamPool.load(tmp_path / "ck")  # the saved weights need a module to go into
        torch.manual_seed(1)  # another initialisation: the checkpoint's weights must win
        loaded = DreamPool.load(tmp_path / "ck", encoder=Tiny())
        got = loaded.retrieve(q, k=4, mode="nearest")
        assert_same_results(got.ids, got.scores, want.ids, want.scores)

    def test_fit_trains_a_user_module(self):
        pool, _ = self.make()
        report = pool.fit_encoder(steps=2, batch_size=16)
        assert len(report.losses) == 2

    def test_wrong_output_width_is_refused(self):
        with pytest.raises(DimensionMismatchError, match="embedding_dim"):
            DreamPool(PoolConfig(dream_shape=SHAPE, embedding_dim=16, device="cpu"), encoder=Tiny())

    def test_not_an_encoder(self):
        with pytest.raises(InvalidConfigurationError, match="encoder"):
            DreamPool(PoolConfig(dream_shape=SHAPE, device="cpu"), encoder="resnet")


class TestClasses:
    def test_more_than_ten_classes_end_to_end(self, tmp_path):
        cfg = PoolConfig(dream_shape=SHAPE, capacity=64, device="cpu", num_classes=12)
        pool = DreamPool(cfg)
        dreams = torch.rand(24, *SHAPE, 3, generator=torch.Generator().manual_seed(0))
        pool.add(dreams, coherence=torch.ones(24), class_labels=torch.arange(24) % 12)
        hits = pool.retrieve(dreams[:2], k=2, mode="class", class_hint=11)
        assert set(pool.metadata(hits.ids)["class_label"][hits.mask].tolist()) == {11}
        hybrid = pool.retrieve(dreams[:2], k=3, mode="hybrid", class_hint=torch.tensor([10, 11]))
        assert hybrid.ids.shape == (2, 3)
        assert pool.retrieve(dreams[:1], k=1, mode="balanced", classes=[10, 11]).ids.shape == (1, 2)
        with pytest.raises(InvalidInputError, match="0..11"):
            pool.add(dreams[:1], coherence=torch.ones(1), class_labels=torch.tensor([12]))
        pool.save(tmp_path / "ck")
        assert DreamPool.load(tmp_path / "ck").config.num_classes == 12

    def test_num_classes_is_checked(self):
        with pytest.raises(InvalidConfigurationError, match="num_classes"):
            PoolConfig(num_classes=0)

    def test_labelled_pool_retrieves_at_least_as_well_and_hints_help(self):
        d = make_dataset("colour_structure", 300, shape=SHAPE, seed=0)
        q = make_dataset("colour_structure", 40, shape=SHAPE, seed=1)

        def precision(labelled: bool, hint: bool) -> float:
            pool = DreamPool(PoolConfig(dream_shape=SHAPE, capacity=300, device="cpu", num_classes=9))
            pool.add(d.dreams, coherence=torch.ones(300), class_labels=d.labels if labelled else None)
            ids = pool.retrieve(q.dreams, k=10, mode="nearest", class_hint=q.labels if hint else None).ids
            return float((d.labels[ids] == q.labels[:, None]).float().mean())

        plain, labelled, hinted = precision(False, False), precision(True, False), precision(True, True)
        assert labelled >= plain
        assert hinted > labelled
