"""FAISS engines: exact brute force vs the oracle, IVF-PQ recall, eviction, churn, memory, checkpoints."""

from __future__ import annotations

import pytest
import torch
from test_search import assert_matches_oracle, make_bank, oracle  # tests/ is on sys.path (rootless)

from dreampool_gpu.bank import TensorBank
from dreampool_gpu.config import Metric, PoolConfig
from dreampool_gpu.errors import InvalidConfigurationError, InvalidInputError
from dreampool_gpu.pool import DreamPool
from dreampool_gpu.search import ExactSearch, make_index

pytest.importorskip("faiss", reason="FAISS engines need faiss (a GPU image may carry torch alone)")

from dreampool_gpu.search.auto import AutoSearch, ExactAuto, prefer_faiss_flat  # noqa: E402
from dreampool_gpu.search.faiss_flat import FaissFlatSearch  # noqa: E402
from dreampool_gpu.search.faiss_ivf import IVFSearch, auto_nlist, pq_subquantizers  # noqa: E402

D = 64
DEFAULTS = PoolConfig()


def clustered(n: int, metric: Metric, *, seed: int = 0, latent: int = 16, clusters: int = 64) -> torch.Tensor:
    """``[n, 64]`` points of a Gaussian mixture in a 16-dim subspace (unit vectors for cosine)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(D, latent, generator=torch.Generator().manual_seed(99)))[0]
    centers = torch.randn(clusters, latent, generator=torch.Generator().manual_seed(98))
    z = centers[torch.randint(0, clusters, (n,), generator=g)] + 0.5 * torch.randn(n, latent, generator=g)
    x = z @ basis.T + 0.02 * torch.randn(n, D, generator=g)
    return torch.nn.functional.normalize(x, dim=1) if metric is Metric.COSINE else x


def config(**changes) -> PoolConfig:
    base = {"embedding_dim": D, "device": "cpu", "ann_threshold": 2048}
    return PoolConfig(**{**base, **changes})


def fill(bank: TensorBank, index, vectors: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """Write ``vectors`` into the bank's lowest free slots, a batch at a time, as the pool does."""
    slots = []
    for start in range(0, len(vectors), batch):
        part = vectors[start : start + batch]
        free = bank.free_slots(len(part))
        bank.write(free, {"embeddings": part.to(bank.device)})
        index.add(free)
        slots.append(free)
    return torch.cat(slots)


def evict(bank: TensorBank, index, slots: torch.Tensor) -> None:
    index.remove(slots)
    bank.remove(slots)


def recall(got: torch.Tensor, want: torch.Tensor) -> float:
    hits = sum(len(set(g.tolist()) & set(w.tolist()) - {-1}) for g, w in zip(got, want, strict=False))
    return hits / int((want >= 0).sum())


def ivf_engine(bank: TensorBank, metric: Metric, **changes) -> IVFSearch:
    engine = make_index(bank, config(engine="faiss-ivf", metric=metric, **changes))
    assert isinstance(engine, IVFSearch)
    return engine


class TestFaissFlat:
    @pytest.mark.parametrize("metric", list(Metric))
    @pytest.mark.parametrize("batch", [1, 3, 40])  # FAISS's sequential and BLAS paths
    @pytest.mark.parametrize("k", [1, 10, 500])  # 500 > the pool
    def test_equals_torch_oracle(self, metric, batch, k):
        bank = make_bank(301, metric, torch.device("cpu"), capacity=320)
        engine = make_index(bank, config(engine="faiss-flat", embedding_dim=16, metric=metric))
        assert isinstance(engine, FaissFlatSearch)
        queries = make_bank(batch, metric, torch.device("cpu"), seed=5).columns["embeddings"]
        scores, slots = engine.search(queries, k)
        assert engine.last_engine == "faiss-flat"
        assert_matches_oracle(scores, slots, oracle(bank, queries, k, metric), k)
        torch_scores, torch_slots = ExactSearch(bank, metric, chunk_bytes=1 << 20).search(queries, k)
        torch.testing.assert_close(scores, torch_scores, atol=1e-5, rtol=0)

    @pytest.mark.parametrize("metric", list(Metric))
    @pytest.mark.parametrize("batch", [2, 30])
    def test_free_slots_are_never_returned(self, metric, batch):
        bank = make_bank(200, metric, torch.device("cpu"))
        engine = make_index(bank, config(engine="faiss-flat", embedding_dim=16, metric=metric))
        queries = bank.columns["embeddings"][:batch].clone()
        engine.search(queries, 5)  # caches the live-slot selector of this revision
        gone = torch.arange(0, 200, 3)
        bank.remove(gone)
        scores, slots = engine.search(queries, 150)
        assert not set(slots.flatten().tolist()) & set(gone.tolist())
        assert_matches_oracle(scores, slots, oracle(bank, queries, 150, metric), 150)

    def test_reads_the_bank_in_place(self):
        bank = make_bank(50, Metric.COSINE, torch.device("cpu"))
        engine = make_index(bank, config(engine="faiss-flat", embedding_dim=16))
        target = torch.nn.functional.normalize(torch.ones(1, 16), dim=1)
        bank.columns["embeddings"][17] = target[0]  # an in-place change is seen at once
        _, slots = engine.search(target.repeat(2, 1), 1)
        assert slots.tolist() == [[17], [17]]

    def test_mask_and_other_dtypes_go_to_torch(self):
        bank = make_bank(40, Metric.COSINE, torch.device("cpu"))
        engine = make_index(bank, config(engine="faiss-flat", embedding_dim=16))
        queries = bank.columns["embeddings"][:2].clone()
        mask = torch.arange(40) >= 20
        scores, slots = engine.search(queries, 4, mask=mask)
        assert engine.last_engine == "exact-torch"
        assert_matches_oracle(scores, slots, oracle(bank, queries, 4, Metric.COSINE, mask), 4)
        engine.search(queries.double(), 4)
        assert engine.last_engine == "exact-torch"

    def test_empty_bank(self):
        bank = make_bank(0, Metric.COSINE, torch.device("cpu"), capacity=4)
        engine = make_index(bank, config(engine="faiss-flat", embedding_dim=16))
        scores, slots = engine.search(torch.ones(3, 16), 2)
        assert slots.tolist() == [[-1, -1]] * 3 and bool(torch.isneginf(scores).all())


class TestIVFRecall:
    @pytest.mark.parametrize("metric", list(Metric))
    def test_recall_at_10_default_settings(self, metric):
        n = 6000
        bank = TensorBank(n, (1, 1, 1), D, device=torch.device("cpu"))
        engine = ivf_engine(bank, metric)
        fill(bank, engine, clustered(n, metric))
        assert engine.trained and engine.nprobe == DEFAULTS.ivf_nprobe
        assert engine.refine_factor == DEFAULTS.ivf_refine_factor
        queries = clustered(200, metric, seed=1)
        scores, slots = engine.search(queries, 10)
        assert engine.last_engine == "faiss-ivf"
        exact_scores, exact_slots = ExactSearch(bank, metric, chunk_bytes=1 << 22).search(queries, 10)
        assert recall(slots, exact_slots) >= 0.95
        # candidates are re-scored against the bank: every score is the exact one
        rows = bank.columns["embeddings"][slots]
        if metric is Metric.COSINE:
            want = (rows * queries[:, None]).sum(-1)
        else:
            want = -(rows - queries[:, None]).norm(dim=-1)
        torch.testing.assert_close(scores, want, atol=1e-5, rtol=0)
        assert bool((scores[:, :-1] >= scores[:, 1:]).all())

    def test_below_threshold_answers_exactly(self):
        bank = TensorBank(3000, (1, 1, 1), D, device=torch.device("cpu"))
        engine = ivf_engine(bank, Metric.COSINE)
        fill(bank, engine, clustered(2000, Metric.COSINE))
        assert not engine.trained and engine.nbytes() == 0 and engine.serialize() is None
        queries = clustered(3, Metric.COSINE, seed=1)
        scores, slots = engine.search(queries, 10)
        assert engine.last_engine == "exact-torch"
        assert_matches_oracle(scores, slots, oracle(bank, queries, 10, Metric.COSINE), 10)
        fill(bank, engine, clustered(100, Metric.COSINE, seed=2))  # crosses 2048
        assert engine.trained and engine.describe()["ntotal"] == 2100

    def test_k_at_pool_size_and_masks_answer_exactly(self):
        bank = TensorBank(2500, (1, 1, 1), D, device=torch.device("cpu"))
        engine = ivf_engine(bank, Metric.EUCLIDEAN)
        fill(bank, engine, clustered(2100, Metric.EUCLIDEAN))
        queries = clustered(2, Metric.EUCLIDEAN, seed=1)
        scores, slots = engine.search(queries, 2200)
        assert engine.last_engine == "exact-torch"
        assert int((slots >= 0).sum()) == 2 * 2100
        mask = torch.arange(2500) % 2 == 0
        scores, slots = engine.search(queries, 5, mask=mask)
        assert engine.last_engine == "exact-torch" and bool((slots % 2 == 0).all())

    def test_queries_whose_lists_run_short_get_exact_answers(self):
        bank = TensorBank(4000, (1, 1, 1), D, device=torch.device("cpu"))
        engine = ivf_engine(bank, Metric.COSINE, ivf_nprobe=1, ivf_nlist=64)
        fill(bank, engine, clustered(4000, Metric.COSINE))
        queries = clustered(4, Metric.COSINE, seed=1)
        scores, slots = engine.search(queries, 1500)  # one list holds far fewer than 1500
        assert bool((slots >= 0).all())
        assert_matches_oracle(scores, slots, oracle(bank, queries, 1500, Metric.COSINE), 1500)


class TestIVFEviction:
    @pytest.mark.parametrize("metric", list(Metric))
    def test_evicted_entries_never_come_back(self, metric):
        bank = TensorBank(5000, (1, 1, 1), D, device=torch.device("cpu"))
        engine = ivf_engine(bank, metric)
        vectors = clustered(4000, metric)
        fill(bank, engine, vectors)
        gone = torch.arange(0, 4000, 17)  # < 10%: no refresh, filtered at search time
        evict(bank, engine, gone)
        assert engine.stale == len(gone) and engine.describe()["refreshes"] == 0
        _, slots = engine.search(vectors[gone], 10)
        assert engine.last_engine == "faiss-ivf"
        assert not set(slots.flatten().tolist()) & set(gone.tolist())
        assert bool((slots >= 0).all())

    @pytest.mark.parametrize("metric", list(Metric))
    def test_reused_slot_answers_with_its_new_vector(self, metric):
        bank = TensorBank(4000, (1, 1, 1), D, device=torch.device("cpu"))
        engine = ivf_engine(bank, metric)
        vectors = clustered(4000, metric)
        fill(bank, engine, vectors)
        slot = torch.tensor([123])
        old = vectors[123:124]
        evict(bank, engine, slot)
        new = -old  # far from the old vector
        assert fill(bank, engine, new).tolist() == [123]  # the lowest free slot is reused
        scores, slots = engine.search(torch.cat([old, new]), 10)
        assert 123 not in slots[0].tolist()  # the stale code must not bring it back
        assert slots[1, 0].item() == 123  # the new vector is found
        assert scores[1, 0].item() == pytest.approx(1.0 if metric is Metric.COSINE else 0.0, abs=1e-5)
        assert len(set(slots[1].tolist())) == 10  # listed twice in FAISS, once in the answer

    def test_churn_over_ten_percent_refreshes(self):
        bank = TensorBank(4000, (1, 1, 1), D, device=torch.device("cpu"))
        engine = ivf_engine(bank, Metric.COSINE)
        vectors = clustered(6000, Metric.COSINE)
        fill(bank, engine, vectors[:4000])
        builds = engine.describe()["builds"]
        for start in range(4000, 6000, 100):  # FIFO at capacity: evict 100, add 100
            evict(bank, engine, torch.arange(start - 4000, start - 3900))
            fill(bank, engine, vectors[start : start + 100], batch=100)
            assert engine.stale <= 0.1 * bank.size
        state = engine.describe()
        assert state["refreshes"] >= 4 and state["builds"] == builds  # 2000 evictions, refresh every > 400
        assert state["ntotal"] == bank.size + engine.stale
        queries = vectors[5900:5910]  # the latest entries are found
        _, slots = engine.search(queries, 1)
        assert slots[:, 0].tolist() == list(range(1900, 1910))

    def test_churn_fraction_is_configurable(self):
        bank = TensorBank(3000, (1, 1, 1), D, device=torch.device("cpu"))
        engine = ivf_engine(bank, Metric.COSINE, churn_rebuild_fraction=0.5)
        fill(bank, engine, clustered(3000, Metric.COSINE))
        evict(bank, engine, torch.arange(900))  # 900 > 0.1 * 2100 but < 0.5 * 2100
        engine.search(clustered(1, Metric.COSINE, seed=3), 3)
        assert engine.describe()["refreshes"] == 0 and engine.stale == 900
        evict(bank, engine, torch.arange(900, 1200))  # 1200 > 0.5 * 1800
        engine.search(clustered(1, Metric.COSINE, seed=3), 3)
        assert engine.describe()["refreshes"] == 1 and engine.stale == 0

    @pytest.mark.slow
    def test_pool_doubling_rebuilds_with_more_lists(self):
        bank = TensorBank(9216, (1, 1, 1), D, device=torch.device("cpu"))
        engine = ivf_engine(bank, Metric.COSINE)
        fill(bank, engine, clustered(2048, Metric.COSINE))
        first = engine.describe()
        fill(bank, engine, clustered(7000, Metric.COSINE, seed=4))
        last = engine.describe()
        assert (first["builds"], last["builds"]) == (1, 3)  # at 2048, >= 4096, >= 8192
        assert first["nlist"] == auto_nlist(2048) and last["nlist"] == auto_nlist(8192)
        assert last["nlist"] > first["nlist"]


class TestIVFMemoryAndCheckpoints:
    @pytest.mark.slow
    @pytest.mark.parametrize("metric", list(Metric))
    def test_index_holds_at_most_a_quarter_of_the_embeddings(self, metric):
        bank = TensorBank(8192, (1, 1, 1), D, device=torch.device("cpu"))
        engine = ivf_engine(bank, metric)
        vectors = clustered(9000, metric)
        fill(bank, engine, vectors[:8192])
        evict(bank, engine, torch.arange(800))  # stale codes and pending slots count too
        fill(bank, engine, vectors[8192:8992])
        embedding_bytes = bank.nbytes()["embeddings"]
        assert 0 < engine.nbytes() <= 0.25 * embedding_bytes
        payload = engine.describe()["ntotal"] * (pq_subquantizers(D) + 8)
        assert engine.nbytes() >= payload

    @pytest.mark.parametrize("metric", list(Metric))
    def test_serialize_round_trip(self, metric):
        bank = TensorBank(3000, (1, 1, 1), D, device=torch.device("cpu"))
        engine = ivf_engine(bank, metric)
        vectors = clustered(3000, metric)
        fill(bank, engine, vectors)
        evict(bank, engine, torch.tensor([5, 6, 7]))
        queries = clustered(20, metric, seed=1)
        want = engine.search(queries, 10)
        blob = engine.serialize()
        restored = ivf_engine(bank, metric)
        restored.deserialize(blob)
        got = restored.search(queries, 10)
        assert restored.last_engine == "faiss-ivf" and restored.stale == 3
        torch.testing.assert_close(got, want)
        assert restored.nbytes() == engine.nbytes()

    def test_deserialize_rejects_foreign_bytes(self):
        bank = TensorBank(3000, (1, 1, 1), D, device=torch.device("cpu"))
        engine = ivf_engine(bank, Metric.COSINE)
        fill(bank, engine, clustered(3000, Metric.COSINE))
        blob = engine.serialize()
        with pytest.raises(ValueError, match="shorter than its header"):
            ivf_engine(bank, Metric.COSINE).deserialize(b"abc")
        with pytest.raises(ValueError, match="not a serialized"):
            ivf_engine(bank, Metric.COSINE).deserialize(b"X" + blob[1:])
        with pytest.raises(ValueError, match="not IVF-PQ for this pool"):
            ivf_engine(bank, Metric.EUCLIDEAN).deserialize(blob)

    def test_reset_forgets_the_index(self):
        bank = TensorBank(3000, (1, 1, 1), D, device=torch.device("cpu"))
        engine = ivf_engine(bank, Metric.COSINE)
        fill(bank, engine, clustered(3000, Metric.COSINE))
        engine.reset()
        assert not engine.trained and engine.nbytes() == 0


class TestIndexStateDict:
    """SearchIndex.state_dict / load_state_dict: kind, the bank revision, the serialized data."""

    def trained(self):
        bank = TensorBank(3000, (1, 1, 1), D, device=torch.device("cpu"))
        engine = ivf_engine(bank, Metric.COSINE)
        fill(bank, engine, clustered(3000, Metric.COSINE))
        evict(bank, engine, torch.tensor([5, 6, 7]))
        return bank, engine

    def test_round_trip_restores_the_data(self):
        bank, engine = self.trained()
        state = engine.state_dict()
        assert state == {"kind": "faiss-ivf", "revision": bank.revision, "data": engine.serialize()}
        queries = clustered(20, Metric.COSINE, seed=1)
        restored = ivf_engine(bank, Metric.COSINE)
        assert restored.load_state_dict(state) is True
        assert restored.stale == 3 and restored.nbytes() == engine.nbytes()
        torch.testing.assert_close(restored.search(queries, 10), engine.search(queries, 10))

    @pytest.mark.parametrize("change", ["kind", "revision", "no-data"])
    def test_mismatch_rebuilds_from_the_bank(self, change):
        bank, engine = self.trained()
        state = engine.state_dict()
        if change == "kind":
            state["kind"] = "faiss-flat"
        elif change == "revision":  # the bank moved on since the state was taken
            evict(bank, engine, torch.tensor([8]))
        else:
            state["data"] = None
        rebuilt = ivf_engine(bank, Metric.COSINE)
        assert rebuilt.load_state_dict(state) is False
        assert rebuilt.stale == 0  # built from the bank's live entries, not from the saved state
        queries = clustered(5, Metric.COSINE, seed=2)
        exact = ExactSearch(bank, Metric.COSINE, chunk_bytes=2**20).search(queries, 10)
        assert recall(rebuilt.search(queries, 10)[1], exact[1]) >= 0.9

    def test_engine_without_state(self):
        bank = make_bank(20, Metric.COSINE, torch.device("cpu"), capacity=32)
        engine = ExactSearch(bank, Metric.COSINE, chunk_bytes=2**20)
        state = engine.state_dict()
        assert state == {"kind": "exact-torch", "revision": bank.revision, "data": None}
        assert engine.load_state_dict(state) is False
        auto = make_index(bank, config(engine="auto"))
        assert auto.state_dict()["revision"] == bank.revision and auto.state_dict()["kind"] == "auto"

    def test_damaged_data_raises_after_a_rebuild(self):
        bank, engine = self.trained()
        state = engine.state_dict()
        state["data"] = b"X" + state["data"][1:]
        fresh = ivf_engine(bank, Metric.COSINE)
        with pytest.raises(ValueError, match="not a serialized"):
            fresh.load_state_dict(state)
        assert fresh.stale == 0 and fresh.search(clustered(2, Metric.COSINE), 3)[1].shape == (2, 3)

    @pytest.mark.parametrize("state", [None, {"kind": "faiss-ivf"}, {"kind": "x", "revision": 0, "data": "text"}])
    def test_malformed_state_refused(self, state):
        bank, engine = self.trained()
        with pytest.raises(InvalidInputError, match="state"):
            engine.load_state_dict(state)
        assert engine.stale == 3  # untouched


class TestAuto:
    def test_default_engine_is_auto(self):
        assert DEFAULTS.engine == "auto"
        bank = make_bank(10, Metric.COSINE, torch.device("cpu"))
        engine = make_index(bank, config(embedding_dim=16))
        assert isinstance(engine, AutoSearch) and engine.kind == "auto"
        assert isinstance(engine.exact, ExactAuto) and isinstance(engine.ivf, IVFSearch)

    def test_rule(self):
        cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
        assert [prefer_faiss_flat(cpu, 100_000, b) for b in (1, 2, 8, 15, 16, 256)] == [
            False,
            True,
            True,
            True,
            False,
            False,
        ]
        assert not any(prefer_faiss_flat(cuda, 100_000, b) for b in (1, 2, 8, 256))

    @pytest.mark.slow
    def test_picks_per_call_and_reports_it(self):
        bank = TensorBank(2500, (1, 1, 1), D, device=torch.device("cpu"))
        engine = make_index(bank, config())
        vectors = clustered(2500, Metric.COSINE)
        fill(bank, engine, vectors[:2000])
        ran = {}
        for batch in (1, 4, 64):
            scores, slots = engine.search(vectors[:batch], 5)
            ran[batch] = engine.last_engine
            assert_matches_oracle(scores, slots, oracle(bank, vectors[:batch], 5, Metric.COSINE), 5)
        assert ran == {1: "exact-torch", 4: "faiss-flat", 64: "exact-torch"}
        engine.search(vectors[:4], 5, mask=torch.ones(2500, dtype=torch.bool))
        assert engine.last_engine == "exact-torch"
        fill(bank, engine, vectors[2000:])  # crosses ann_threshold = 2048
        engine.search(vectors[:4], 5)
        assert engine.last_engine == "faiss-ivf"
        state = engine.describe()
        assert state["kind"] == "auto" and state["ivf"]["trained"]
        assert state["index_bytes"] == engine.nbytes() > 0

    def test_pool_reports_engine_and_bytes(self):
        cfg = PoolConfig(
            dream_shape=(4, 4, 1), capacity=3000, device="cpu", ann_threshold=1024, coherence_threshold=0.0
        )
        pool = DreamPool(cfg)
        g = torch.Generator().manual_seed(0)  # noise, not class colours: no near-duplicate embeddings
        dreams, labels = torch.rand(1500, 4, 4, 1, 3, generator=g), torch.randint(0, 10, (1500,), generator=g)
        pool.add(dreams, coherence=torch.ones(1500), class_label=labels)
        hits = pool.retrieve(dreams[:3], k=4, mode="nearest", class_hint=labels[:3])  # encoded as the entries were
        stats = pool.stats()
        assert stats["engine"] == "auto" and stats["search"]["last_engine"] == "faiss-ivf"
        assert 0 < stats["index_bytes"] <= 0.25 * stats["bytes_by_column"]["embeddings"]
        assert hits.ids[:, 0].tolist() == [0, 1, 2]  # each dream's own entry is its nearest


class TestConfig:
    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("engine", "hnsw"),
            ("engine", 3),
            ("ann_threshold", 1000),
            ("ivf_nlist", -1),
            ("ivf_nprobe", 0),
            ("ivf_refine_factor", 0),
            ("churn_rebuild_fraction", 0.0),
            ("churn_rebuild_fraction", 1.5),
            ("churn_rebuild_fraction", True),
        ],
    )
    def test_bad_values_are_rejected(self, field, value):
        with pytest.raises(InvalidConfigurationError, match=field):
            PoolConfig(**{field: value})

    def test_round_trips_through_a_dict(self):
        cfg = PoolConfig(
            engine="faiss-ivf",
            ann_threshold=4096,
            ivf_nlist=256,
            ivf_nprobe=8,
            ivf_refine_factor=4,
            churn_rebuild_fraction=0.2,
        )
        assert PoolConfig.from_dict(cfg.to_dict()) == cfg


class TestHelpers:
    def test_pq_subquantizers_divide_the_dimension(self):
        assert [pq_subquantizers(d) for d in (64, 32, 10, 7, 2)] == [16, 8, 2, 1, 1]

    def test_auto_nlist(self):
        assert auto_nlist(1_000_000) == 2048 and auto_nlist(100_000) == 512
        assert auto_nlist(1024) == 26  # at most n / 39


@pytest.mark.gpu
class TestTorchCuda:
    @pytest.mark.parametrize("metric", list(Metric))
    def test_auto_on_cuda_is_exact_torch(self, metric):
        bank = make_bank(300, metric, torch.device("cuda"))
        engine = make_index(bank, config(embedding_dim=16, metric=metric))
        assert engine.ivf is None
        queries = bank.columns["embeddings"][:4].clone()
        scores, slots = engine.search(queries, 7)
        assert engine.last_engine == "exact-torch" and slots.device.type == "cuda"
        assert_matches_oracle(scores, slots, oracle(bank, queries, 7, metric), 7)


@pytest.mark.gpu
@pytest.mark.faiss_gpu
class TestFaissGpu:
    @pytest.mark.parametrize("metric", list(Metric))
    def test_flat_gpu_equals_oracle_with_free_slots(self, metric):
        bank = make_bank(400, metric, torch.device("cuda"))
        bank.remove(torch.arange(0, 400, 9, device="cuda"))
        engine = make_index(bank, config(engine="faiss-flat", embedding_dim=16, metric=metric))
        queries = bank.columns["embeddings"][1:6].clone()
        scores, slots = engine.search(queries, 12)
        assert engine.last_engine == "faiss-flat" and slots.device.type == "cuda"
        assert_matches_oracle(scores, slots, oracle(bank, queries, 12, metric), 12)

    @pytest.mark.parametrize("metric", list(Metric))
    def test_ivf_gpu_recall_churn_and_round_trip(self, metric):
        n = 6000
        bank = TensorBank(n, (1, 1, 1), D, device=torch.device("cuda"))
        engine = ivf_engine(bank, metric)
        vectors = clustered(n, metric).cuda()
        fill(bank, engine, vectors)
        assert engine.on_gpu and engine.trained
        queries = clustered(200, metric, seed=1).cuda()
        _, slots = engine.search(queries, 10)
        _, exact_slots = ExactSearch(bank, metric, chunk_bytes=1 << 22).search(queries, 10)
        assert recall(slots.cpu(), exact_slots.cpu()) >= 0.95
        evict(bank, engine, torch.arange(0, 700, device="cuda"))  # > 10%: refilled from the bank
        fill(bank, engine, vectors[:10])
        assert engine.describe()["refreshes"] == 1 and engine.stale == 0
        restored = ivf_engine(bank, metric)
        restored.deserialize(engine.serialize())
        torch.testing.assert_close(restored.search(queries, 10), engine.search(queries, 10))
