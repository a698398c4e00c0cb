"""Lazy features (``PoolConfig(features="lazy")``, the default): add writes dreams and metadata only;
the first call that reads chroma, spectral features, hue categories or embeddings computes them for
every waiting entry in one batch, with the same results as computing them in ``add``."""

from __future__ import annotations

import pytest
import torch
from _equality import assert_same_results as same_results

from dreampool_gpu import DreamPool, PoolConfig
from dreampool_gpu.bank import DERIVED
from dreampool_gpu.config import RetrievalMode
from dreampool_gpu.errors import InvalidConfigurationError, InvalidInputError

SHAPE = (3, 4, 2)
MODE_OPTIONS = {
    RetrievalMode.CLASS: {"class_hint": 3},
    RetrievalMode.BALANCED: {"classes": [1, 3, 5]},
    RetrievalMode.UTILITY: {"utility_threshold": 0.3},
}


def batches(sizes, *, seed=0):
    """``(dreams, labels, coherence)`` batches of the given sizes: dreams around a random colour each."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        base = torch.rand(n, 1, 1, 1, 3, generator=g)
        dreams = (base + 0.1 * (torch.rand(n, *SHAPE, 3, generator=g) - 0.5)).clamp(0, 1)
        out.append((dreams, torch.randint(-1, 10, (n,), generator=g), torch.rand(n, generator=g)))
    return out


def pool_of(features, *, capacity=64, refit=True, **overrides):
    config = PoolConfig(
        dream_shape=SHAPE,
        capacity=capacity,
        device="cpu",
        coherence_threshold=0.0,
        query_cache_size=0,
        features=features,
        **overrides,
    )
    pool = DreamPool(config)
    if not refit:  # the standardisation stays as built: featurisation alone is compared
        pool.encoder.auto_refit = False
    return pool


def feed(pool, parts):
    ids = []
    for dreams, labels, coherence in parts:
        ids.append(pool.add(dreams, coherence=coherence, class_label=labels))
    return torch.cat(ids)


def assert_same_results(lazy, eager, queries):
    """Every mode (and ``where``) answers alike, as docs/spec.md promises ("Equality of results"):
    lazy features are computed in other batches than eager ones, so BLAS may round them apart."""
    for mode in RetrievalMode:
        options = MODE_OPTIONS.get(mode, {})
        a = lazy.retrieve(queries, k=6, mode=mode, **options)
        b = eager.retrieve(queries, k=6, mode=mode, **options)
        same_results(a.ids, a.scores, b.ids, b.scores, where=mode.value)


def assert_same_derived(lazy, eager):
    live = eager.bank.slots_by_age()
    assert torch.equal(live, lazy.bank.slots_by_age())
    for name in sorted(DERIVED):
        a, b = lazy.bank.columns[name][live], eager.bank.columns[name][live]
        if a.is_floating_point():
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
        else:
            assert torch.equal(a, b), name


class TestSameAsEager:
    def test_default_is_lazy(self):
        assert PoolConfig().features == "lazy"
        with pytest.raises(InvalidConfigurationError):
            PoolConfig(features="sometimes")

    @pytest.mark.parametrize("sizes", [[48], [24, 24], [16, 16, 32]])
    def test_every_mode_with_refits(self, sizes):
        """No eviction: the standardisation refit at the settle sees what eager's last refit saw."""
        parts = batches(sizes)
        lazy, eager = pool_of("lazy"), pool_of("eager")
        assert torch.equal(feed(lazy, parts), feed(eager, parts))
        assert lazy.bank.pending and not eager.bank.pending
        for pool in (lazy, eager):
            pool.feedback(torch.arange(0, sum(sizes), 3), torch.linspace(0, 1, len(range(0, sum(sizes), 3))))
        queries = batches([5], seed=7)[0][0]
        assert_same_results(lazy, eager, queries)
        assert not lazy.bank.pending
        # one refit at the settle, on the entries eager's last refit saw
        torch.testing.assert_close(lazy.encoder.mean, eager.encoder.mean, atol=1e-6, rtol=0)
        torch.testing.assert_close(lazy.encoder.std, eager.encoder.std, atol=1e-6, rtol=0)
        assert_same_derived(lazy, eager)

    def test_every_mode_after_churn_and_overflow(self):
        """Waiting entries evicted before they were featurised, slots reused, more waiting than the bank holds."""
        parts = batches([20, 9, 9, 9, 9, 9, 9, 9, 9], seed=3)
        lazy, eager = pool_of("lazy", capacity=32, refit=False), pool_of("lazy", capacity=32, refit=False)
        eager.config = eager.config.replace(features="eager")
        assert torch.equal(feed(lazy, parts), feed(eager, parts))
        assert lazy.counters == eager.counters and lazy.counters["evicted"] > 32
        queries = batches([4], seed=8)[0][0]
        assert_same_results(lazy, eager, queries)
        assert_same_derived(lazy, eager)

    def test_settled_then_more(self):
        """Entries waiting after a settle join the bank featurised like the rest."""
        first, second = batches([30], seed=1), batches([10, 10], seed=2)
        lazy, eager = pool_of("lazy", capacity=40), pool_of("eager", capacity=40)
        feed(lazy, first), feed(eager, first)
        queries = batches([3], seed=9)[0][0]
        assert_same_results(lazy, eager, queries)
        feed(lazy, second), feed(eager, second)  # evicts 10, no refit (50 < 60)
        assert_same_results(lazy, eager, queries)
        assert_same_derived(lazy, eager)

    def test_metadata_and_diversity_read_features(self):
        parts = batches([20])
        lazy, eager = pool_of("lazy"), pool_of("eager")
        ids = feed(lazy, parts)
        feed(eager, parts)
        a, b = lazy.metadata(ids[:5]), eager.metadata(ids[:5])
        for name in DERIVED:
            torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)
        pairs = ids[:6].reshape(2, 3)
        for key, value in lazy.diversity(pairs).items():
            torch.testing.assert_close(value, eager.diversity(pairs)[key], atol=1e-6, rtol=0)


class TestPayOnlyForWhatIsUsed:
    def test_replay_loop_never_featurises(self, monkeypatch):
        calls = {"fft": 0, "encode": 0}
        fft2 = torch.fft.fft2

        def counting_fft2(*args, **kwargs):
            calls["fft"] += 1
            return fft2(*args, **kwargs)

        monkeypatch.setattr(torch.fft, "fft2", counting_fft2)
        pool = pool_of("lazy", capacity=40)
        encode = pool.encoder.encode_entries

        def counting_encode(*args, **kwargs):
            calls["encode"] += 1
            return encode(*args, **kwargs)

        monkeypatch.setattr(pool.encoder, "encode_entries", counting_encode)
        g = torch.Generator().manual_seed(0)
        for dreams, labels, coherence in batches([8] * 12):  # 96 adds into 40 slots: evictions, refits due
            pool.add(dreams, coherence=coherence, class_label=labels)
            ids = pool.sample(6, generator=g)
            pool.dreams(ids)
            pool.metadata(ids, columns=("class_label", "utility"))
            pool.feedback(ids, torch.rand(6, generator=g))
            pool.stats()
            assert len(pool) <= 40 and int(ids[0]) in pool
        assert calls == {"fft": 0, "encode": 0}
        pool.retrieve(batches([2])[0][0].mean(dim=(1, 2, 3)), k=3, mode="similar")  # chroma queries: no FFT of theirs
        assert calls == {"fft": 1, "encode": 1}  # every waiting entry in one batch
        pool.retrieve(batches([2])[0][0].mean(dim=(1, 2, 3)), k=3, mode="hybrid")
        assert calls["fft"] == 1 and calls["encode"] == 1

    def test_engine_with_vectors_is_eager(self):
        """An IVF-PQ engine at this capacity keeps its own vectors: features are computed in add."""
        pool = pool_of("lazy", capacity=2048, engine="faiss-ivf", ann_threshold=1024)
        feed(pool, batches([10]))
        assert not pool.bank.pending
        small = pool_of("lazy", capacity=64, engine="faiss-ivf", ann_threshold=1024)
        feed(small, batches([10]))
        assert small.bank.pending  # never reaches the threshold: nothing of its own to keep


class TestEveryReaderSettles:
    def test_checkpoint(self, tmp_path):
        parts = batches([16, 16])
        lazy, eager = pool_of("lazy"), pool_of("eager")
        feed(lazy, parts), feed(eager, parts)
        lazy.save(tmp_path / "ck")
        assert not lazy.bank.pending
        loaded = DreamPool.load(tmp_path / "ck")
        queries = batches([4], seed=5)[0][0]
        assert_same_results(loaded, eager, queries)
        state = pool_of("lazy")
        feed(state, parts)
        again = pool_of("lazy")
        again.load_state_dict(state.state_dict())
        assert_same_results(again, eager, queries)

    def test_reembed_and_fit_encoder(self):
        parts = batches([24])
        lazy, eager = pool_of("lazy", encoder="learned"), pool_of("eager", encoder="learned")
        feed(lazy, parts), feed(eager, parts)
        lazy.reembed(), eager.reembed()
        queries = batches([3], seed=6)[0][0]
        assert_same_results(lazy, eager, queries)
        more = batches([8], seed=4)
        feed(lazy, more), feed(eager, more)
        lazy.fit_encoder(steps=2, batch_size=8), eager.fit_encoder(steps=2, batch_size=8)
        assert not lazy.bank.pending
        assert_same_results(lazy, eager, queries)

    def test_bank_columns_settle_for_outside_readers(self):
        """Code reading ``bank.columns`` directly (engines, the sharded pool, tools) sees settled features."""
        parts = batches([12])
        lazy, eager = pool_of("lazy"), pool_of("eager")
        feed(lazy, parts), feed(eager, parts)
        assert lazy.bank.pending
        assert torch.equal(lazy.bank.raw["chroma"][:12], torch.zeros(12, 3))  # not computed yet
        torch.testing.assert_close(lazy.bank.columns["chroma"], eager.bank.columns["chroma"], atol=1e-6, rtol=0)
        assert not lazy.bank.pending

    def test_rejected_retrieve_leaves_entries_waiting(self):
        pool = pool_of("lazy")
        feed(pool, batches([8]))
        with pytest.raises(InvalidInputError):
            pool.retrieve(torch.full((2, 3), float("nan")), k=2, mode="similar")
        assert pool.bank.pending
