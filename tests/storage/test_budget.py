"""Memory budget: exact sizes, capacity from the budget, eviction policies against oracles,
the pool within budget under churn, device memory through a fake NVML and the fallbacks.

The ``gpu``-marked tests read the real NVML of a CUDA device; on a machine without
one they are skipped by tests/conftest.py ("gpu unavailable").
"""

from __future__ import annotations

import gc
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from dreampool_gpu import DreamPool, PoolConfig
from dreampool_gpu import budget as budget_mod
from dreampool_gpu import memory as memory_mod
from dreampool_gpu.bank import TensorBank, column_specs
from dreampool_gpu.budget import (
    MIB,
    CudaMemory,
    MemoryBudget,
    MemoryReading,
    NvmlMemory,
    ProcessMemory,
    entry_nbytes,
    fit_capacity,
    index_nbytes_estimate,
    open_probe,
    pci_bus_id,
)
from dreampool_gpu.config import EvictionPolicy
from dreampool_gpu.errors import CapacityExceededError, InsufficientMemoryError, InvalidConfigurationError
from dreampool_gpu.eviction import policy_for
from dreampool_gpu.memory import nvml_available
from dreampool_gpu.search.exact import ExactSearch


def eviction_key(bank, policy):
    return policy_for(policy).key(bank)


def eviction_order(bank, policy):
    return policy_for(policy).order(bank)


def batch_survivors(coherence, policy, room):
    """What a policy admits of a batch into an empty pool of ``room`` free slots."""
    bank = TensorBank(4, (2, 2, 1), 8, device=torch.device("cpu"))
    return policy_for(policy).admit(bank, coherence, room, lambda incoming: 0)


SHAPE = (2, 3, 1)
CPU = torch.device("cpu")
POLICIES = [p.value for p in EvictionPolicy]
ORDERED = [p for p in POLICIES if p not in ("reservoir", "class_balanced")]  # the sampling ones: test_eviction_policies


def make_pool(**overrides) -> DreamPool:
    config = dict(dream_shape=SHAPE, capacity=8, device="cpu", coherence_threshold=0.0, embedding_dim=8)
    config.update(overrides)
    return DreamPool(PoolConfig(**config))


def dreams(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, *SHAPE, 3, generator=torch.Generator().manual_seed(seed))


def live_ids(pool: DreamPool) -> set[int]:
    ids = pool.bank.columns["ids"]
    return {int(i) for i in ids[ids >= 0]}


class FakeNvml:
    """Stands in for pynvml: one GPU at ``bus_id``, counting inits and shutdowns."""

    def __init__(self, *, bus_id="00000000:3b:00.0", total=8 << 30, used=3 << 30, fail_read=False):
        self.bus_id, self.total, self.used, self.fail_read = bus_id, total, used, fail_read
        self.inits = self.shutdowns = 0
        self.looked_up: list[str] = []

    def nvmlInit(self):
        self.inits += 1

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetHandleByPciBusId(self, bus_id):
        self.looked_up.append(bus_id)
        if bus_id != self.bus_id:
            raise RuntimeError(f"NVML_ERROR_NOT_FOUND: {bus_id}")
        return ("handle", bus_id)

    def nvmlDeviceGetMemoryInfo(self, handle):
        if self.fail_read:
            raise RuntimeError("NVML_ERROR_GPU_IS_LOST")
        assert handle == ("handle", self.bus_id)
        return SimpleNamespace(total=self.total, used=self.used, free=self.total - self.used)


class FixedProbe(budget_mod.MemoryProbe):
    def __init__(self, used, total, source="fake"):
        self.reading = MemoryReading(used, total, source)

    def read(self):
        return self.reading


# ------------------------------------------------------------------ config
class TestConfig:
    @pytest.mark.parametrize("value", [None, 1, 0.25, 4096, "20%", "100%", " 0.5 %"])
    def test_accepted_budgets(self, value):
        assert PoolConfig(memory_budget_mb=value).memory_budget_mb == value

    @pytest.mark.parametrize("value", [0, -1, float("inf"), float("nan"), True, "20", "0%", "101%", "x%", [1], "%"])
    def test_rejected_budgets(self, value):
        with pytest.raises(InvalidConfigurationError, match="memory_budget_mb"):
            PoolConfig(memory_budget_mb=value)

    def test_capacity_none_needs_a_budget(self):
        with pytest.raises(InvalidConfigurationError, match="None only with memory_budget_mb"):
            PoolConfig(capacity=None)
        assert PoolConfig(capacity=None, memory_budget_mb=1).capacity is None

    @pytest.mark.parametrize("value", [0, 1.5, -0.1, True, "0.9"])
    def test_threshold_range(self, value):
        with pytest.raises(InvalidConfigurationError, match="budget_threshold"):
            PoolConfig(budget_threshold=value)

    def test_strict_is_a_bool(self):
        with pytest.raises(InvalidConfigurationError, match="strict_budget"):
            PoolConfig(strict_budget=1)

    def test_yaml_round_trip(self, tmp_path):
        path = tmp_path / "c.yaml"
        path.write_text("capacity: null\nmemory_budget_mb: 25%\nbudget_threshold: 0.8\nstrict_budget: true\n")
        cfg = PoolConfig.from_file(path)
        assert (cfg.capacity, cfg.memory_budget_mb, cfg.budget_threshold, cfg.strict_budget) == (None, "25%", 0.8, True)
        assert PoolConfig.from_dict(cfg.to_dict()) == cfg

    def test_shipped_presets(self):
        assert PoolConfig.from_file("configs/default.yaml").memory_budget_mb is None
        assert PoolConfig.from_file("configs/gpu-large.yaml").memory_budget_mb == "50%"


# ------------------------------------------------------------------- sizes
class TestSizes:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
    @pytest.mark.parametrize("shape,dim", [((16, 16, 4), 64), ((2, 3, 1), 8), ((64, 64, 8), 64)])
    def test_entry_bytes_are_exact(self, shape, dim, dtype):
        bank = TensorBank(3, shape, dim, device=CPU, dream_dtype=dtype)
        by_hand = sum(t.numel() * t.element_size() for t in bank.columns.values()) // 3
        assert entry_nbytes(column_specs(shape, dim, dtype)) == bank.entry_nbytes() == by_hand
        dream_bytes = math.prod(shape) * 3 * dtype.itemsize
        assert bank.nbytes()["dreams"] == 3 * dream_bytes

    def test_capacity_from_budget_exact_engine(self):
        cfg = PoolConfig(dream_shape=SHAPE, capacity=None, memory_budget_mb=0.05, device="cpu", engine="torch")
        e = entry_nbytes(column_specs(SHAPE, 64, torch.float32))
        budget = int(0.05 * MIB)
        got = fit_capacity(cfg, entry_bytes=e, budget_bytes=budget, device=CPU)
        assert got == math.floor(0.9 * budget) // e
        assert got * e <= 0.9 * budget < (got + 1) * e

    def test_capacity_is_lowered_never_raised(self):
        cfg = PoolConfig(capacity=10, memory_budget_mb=100, engine="torch")
        assert fit_capacity(cfg, entry_bytes=1000, budget_bytes=100 * MIB, device=CPU) == 10
        assert fit_capacity(cfg.replace(capacity=10**9), entry_bytes=1000, budget_bytes=MIB, device=CPU) == 943
        assert fit_capacity(cfg.replace(memory_budget_mb=None), entry_bytes=1000, budget_bytes=None, device=CPU) == 10

    def test_budget_too_small_for_one_entry(self):
        with pytest.raises(InvalidConfigurationError, match="at least one entry"):
            make_pool(capacity=None, memory_budget_mb=1e-4)

    def test_pool_bank_fits_the_budget(self):
        pool = make_pool(capacity=None, memory_budget_mb=0.02, engine="torch")
        e = pool.bank.entry_nbytes()
        limit = math.floor(0.9 * 0.02 * MIB)
        assert pool.capacity == limit // e == pool.bank.capacity
        assert pool.config.capacity is None  # the config stays as given
        assert sum(pool.bank.nbytes().values()) <= limit
        assert pool.stats()["memory"]["allocated_bytes"] <= limit

    def test_pool_with_capacity_and_budget_takes_the_smaller(self):
        assert make_pool(capacity=5, memory_budget_mb=1).capacity == 5
        small = make_pool(capacity=10_000, memory_budget_mb=0.01, engine="torch")
        assert small.capacity == math.floor(0.9 * 0.01 * MIB) // small.bank.entry_nbytes() < 10_000
        assert small.config.capacity == 10_000

    def test_no_budget_keeps_the_configured_capacity(self):
        pool = make_pool(capacity=7)
        assert pool.capacity == pool.config.capacity == 7 and pool.budget.budget_bytes is None
        assert pool.stats()["memory"]["limit_bytes"] is None

    @pytest.mark.parametrize("capacity", [10_000, None])
    def test_fitted_capacity_stays_off_the_config(self, capacity):
        pool = make_pool(capacity=capacity, memory_budget_mb=0.01, engine="torch")
        fitted = math.floor(0.9 * 0.01 * MIB) // pool.bank.entry_nbytes()
        assert pool.config.capacity == capacity and pool.capacity == pool.bank.capacity == fitted < 10_000
        assert f"size=0/{fitted}," in repr(pool) and pool.stats().capacity == fitted

    def test_strict_budget_names_the_fitted_capacity(self):
        pool = make_pool(capacity=10_000, memory_budget_mb=0.01, engine="torch", strict_budget=True)
        with pytest.raises(CapacityExceededError, match=f"capacity {pool.capacity},"):
            pool.add(dreams(pool.capacity + 1), coherence=torch.ones(pool.capacity + 1))

    def test_index_estimate_zero_for_exact_engines(self):
        for engine in ("torch", "faiss-flat"):
            cfg = PoolConfig(engine=engine, ann_threshold=1024)
            assert index_nbytes_estimate(cfg, CPU, 10**6) == 0
        assert index_nbytes_estimate(PoolConfig(engine="auto"), torch.device("cuda", 0), 10**6) == 0
        cfg = PoolConfig(engine="faiss-ivf", ann_threshold=2048)
        assert index_nbytes_estimate(cfg, CPU, 2047) == 0 < index_nbytes_estimate(cfg, CPU, 2048)
        sizes = [index_nbytes_estimate(cfg, CPU, n) for n in range(2048, 200_000, 997)]
        assert sizes == sorted(sizes)


# ---------------------------------------------------------------- eviction
def oracle_leavers(pool: DreamPool, policy: str, incoming: list[float]) -> tuple[set[int], set[int]]:
    """(resident ids evicted, batch positions never stored) for a batch of ``incoming`` coherences.

    Plain Python over metadata (id order = age). ``lowest_coherence`` ranks the batch
    with the residents (the batch comes after them in age); the other policies
    always store the batch and evict residents.
    """
    ids = sorted(live_ids(pool))
    meta = pool.metadata(torch.tensor(ids, dtype=torch.int64))
    rated = [int(c) > 0 for c in meta["feedback_count"]]
    means = [float(u) for u in meta["util_mean"]]
    prior = sum(u for u, r in zip(means, rated, strict=False) if r) / max(1, sum(rated))

    def key(j):
        if policy == "fifo":
            return 0.0
        if policy == "lowest_coherence":
            return float(meta["coherence"][j])
        if policy == "least_used":
            return float(meta["usage"][j])
        return means[j] if rated[j] else prior

    count = len(ids) + len(incoming) - pool.capacity
    entries = [(key(j), ids[j], "resident") for j in range(len(ids))]
    if policy == "lowest_coherence":
        entries += [(c, pool.bank.next_id + i, "incoming") for i, c in enumerate(incoming)]
    leaving = sorted(entries, key=lambda e: (e[0], e[1]))[: max(0, count)]
    return (
        {i for _, i, who in leaving if who == "resident"},
        {i - pool.bank.next_id for _, i, who in leaving if who == "incoming"},
    )


class TestEvictionPolicies:
    @pytest.mark.parametrize("policy", ORDERED)
    @pytest.mark.parametrize("seed", range(6))
    def test_evicts_what_the_oracle_says(self, policy, seed):
        g = torch.Generator().manual_seed(seed)
        pool = make_pool(capacity=12, eviction_policy=policy)
        # coarse values so that ties happen and age must break them
        pool.add(dreams(12, seed), coherence=torch.randint(0, 4, (12,), generator=g) / 4)
        for _ in range(3):
            pool.retrieve(torch.rand(2, 3, generator=g), k=3, mode="similar")
        rated = torch.tensor(sorted(live_ids(pool)))[torch.rand(12, generator=g) < 0.5]
        pool.feedback(rated, torch.randint(0, 3, (rated.numel(),), generator=g) / 2)
        for step in range(4):
            count = int(torch.randint(1, 6, (), generator=g))
            coherence = torch.randint(0, 4, (count,), generator=g) / 4
            victims, never_stored = oracle_leavers(pool, policy, coherence.tolist())
            before = live_ids(pool)
            new = pool.add(dreams(count, 100 + step), coherence=coherence)
            assert before - live_ids(pool) == victims
            assert {i for i, id_ in enumerate(new.tolist()) if id_ < 0} == never_stored
            assert set(new.tolist()) - {-1} <= live_ids(pool)
            assert len(pool) == 12

    def test_lowest_coherence_keeps_better_residents(self):
        """A full pool of coherent entries is not displaced by worse newcomers."""
        pool = make_pool(capacity=4, eviction_policy="lowest_coherence")
        pool.add(dreams(4), coherence=torch.tensor([0.9, 0.95, 0.2, 0.9]))  # ids 0..3
        new = pool.add(dreams(2, 1), coherence=torch.tensor([0.1, 0.5]))
        assert new.tolist() == [-1, 4]  # ids go to stored dreams only
        assert live_ids(pool) == {0, 1, 3, 4}
        assert pool.stats()["dropped"] == 1

    def test_fifo_is_oldest_first(self):
        pool = make_pool(capacity=5)
        pool.add(dreams(5), coherence=torch.ones(5))
        pool.add(dreams(2, 1), coherence=torch.ones(2))
        assert live_ids(pool) == {2, 3, 4, 5, 6}

    def test_unrated_entries_rank_at_the_mean_of_rated(self):
        pool = make_pool(capacity=3, eviction_policy="lowest_utility")
        pool.add(dreams(3), coherence=torch.ones(3))  # ids 0, 1, 2
        pool.feedback(torch.tensor([0, 1]), torch.tensor([0.2, 0.8]))  # 2 unrated: ranks at 0.5
        key = eviction_key(pool.bank, EvictionPolicy.LOWEST_UTILITY)
        slots = pool.bank.slots_of(torch.tensor([0, 1, 2]))
        assert key[slots].tolist() == pytest.approx([0.2, 0.8, 0.5])
        assert pool.bank.gather("ids", eviction_order(pool.bank, EvictionPolicy.LOWEST_UTILITY)).tolist() == [0, 2, 1]
        pool.add(dreams(1, 1), coherence=torch.ones(1))
        assert live_ids(pool) == {1, 2, 3}

    def test_without_feedback_lowest_utility_is_fifo(self):
        pool = make_pool(capacity=4, eviction_policy="lowest_utility")
        pool.add(dreams(4), coherence=torch.ones(4))
        fifo = eviction_order(pool.bank, EvictionPolicy.FIFO)
        assert torch.equal(eviction_order(pool.bank, EvictionPolicy.LOWEST_UTILITY), fifo)

    def test_evicted_slots_are_reused_and_key_ignores_free_slots(self):
        pool = make_pool(capacity=4, eviction_policy="lowest_utility")
        pool.add(dreams(4), coherence=torch.ones(4))
        pool.feedback(torch.tensor([0, 1, 2, 3]), torch.tensor([1.0, 1.0, 0.0, 1.0]))
        pool.add(dreams(1, 1), coherence=torch.ones(1))  # evicts id 2 (utility 0)
        assert live_ids(pool) == {0, 1, 3, 4}
        # the prior is the mean over live rated entries only (the evicted 0.0 no longer counts)
        key = eviction_key(pool.bank, EvictionPolicy.LOWEST_UTILITY)
        assert float(key[pool.bank.slots_of(torch.tensor([4]))]) == pytest.approx(1.0)


class TestOversizedBatch:
    def test_fifo_keeps_the_newest(self):
        pool = make_pool(capacity=4)
        pool.add(dreams(2), coherence=torch.ones(2))
        out = pool.add(dreams(7, 1), coherence=torch.ones(7))
        assert out.tolist() == [-1, -1, -1, 2, 3, 4, 5]
        assert live_ids(pool) == {2, 3, 4, 5}
        assert pool.counters["dropped"] == 3 and pool.counters["evicted"] == 2

    def test_lowest_coherence_keeps_the_most_coherent(self):
        pool = make_pool(capacity=3, eviction_policy="lowest_coherence")
        coherence = torch.tensor([0.9, 0.1, 0.5, 0.9, 0.3, 0.7])
        out = pool.add(dreams(6), coherence=coherence)
        kept = out >= 0
        assert kept.tolist() == [True, False, False, True, False, True]  # 0.9, 0.9, 0.7
        assert out[kept].tolist() == [0, 1, 2]  # ids follow batch order
        stored = pool.metadata(out[kept])
        assert stored["found"].all() and stored["coherence"].tolist() == pytest.approx([0.9, 0.9, 0.7])
        assert pool.counters["dropped"] == 3

    def test_ties_keep_the_later_dream(self):
        survivors = batch_survivors(torch.tensor([0.5, 0.5, 0.5, 0.2]), EvictionPolicy.LOWEST_COHERENCE, 2)
        assert survivors.tolist() == [1, 2]

    @pytest.mark.parametrize("policy", ["fifo", "lowest_utility", "least_used"])
    def test_other_policies_keep_the_newest(self, policy):
        survivors = batch_survivors(torch.rand(9), EvictionPolicy(policy), 4)
        assert survivors.tolist() == [5, 6, 7, 8]

    def test_batch_that_fits_is_kept_whole(self):
        assert batch_survivors(torch.rand(3), EvictionPolicy.LOWEST_COHERENCE, 3).tolist() == [0, 1, 2]
        assert batch_survivors(torch.rand(3), EvictionPolicy.FIFO, 0).tolist() == []

    def test_strict_raises_and_leaves_the_pool_unchanged(self):
        pool = make_pool(capacity=4, strict_budget=True, coherence_threshold=0.5)
        pool.add(dreams(3), coherence=torch.ones(3))
        before = {k: t.clone() for k, t in pool.bank.columns.items()}
        counters = dict(pool.counters)
        with pytest.raises(CapacityExceededError, match="at most 4"):
            pool.add(dreams(6, 1), coherence=torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0]))
        assert pool.counters == counters
        for name, column in pool.bank.columns.items():  # utility is NaN where unset
            torch.testing.assert_close(column, before[name], rtol=0, atol=0, equal_nan=True)
        # rejected dreams do not count against the room
        out = pool.add(dreams(6, 1), coherence=torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0]))
        assert int((out >= 0).sum()) == 4

    def test_strict_with_budget(self):
        pool = make_pool(capacity=None, memory_budget_mb=0.01, strict_budget=True, engine="torch")
        room = pool.capacity
        with pytest.raises(CapacityExceededError):
            pool.add(dreams(room + 1), coherence=torch.ones(room + 1))
        assert len(pool) == 0
        assert int((pool.add(dreams(room), coherence=torch.ones(room)) >= 0).sum()) == room


# ------------------------------------------------------------- budget rule
class _Bank:
    def __init__(self, size, entry):
        self.size, self.capacity, self._entry = size, max(size, 1), entry

    def entry_nbytes(self):
        return self._entry


class _Index:
    def __init__(self, nbytes):
        self._nbytes = nbytes

    def nbytes(self):
        return self._nbytes


class TestEvictionCount:
    def budget(self, mb, threshold=0.9):
        return MemoryBudget(mb, device=CPU, threshold=threshold, probe=FixedProbe(0, 1 << 40))

    def test_domain_case_threshold_half(self):
        # the original's example: 10 MiB budget at threshold 0.5 holding two 3 MiB entries -> evict 1
        assert self.budget(10, 0.5).eviction_count(_Bank(2, 3 * MIB), _Index(0)) == 1

    def test_room_at_the_full_line(self):
        # 1 MiB at threshold 1 holding 900 KiB: 100 KiB more fits, 200 KiB needs one eviction
        b = self.budget(1, 1.0)
        assert b.eviction_count(_Bank(9, 100 << 10), _Index(0), incoming=1) == 0
        assert b.eviction_count(_Bank(9, 100 << 10), _Index(0), incoming=2) == 1

    def test_raw_bytes_throughout(self):
        # usage 10 x 100 + 1000 = 2000, avg 200, limit 1500: ceil(500 / 200) = 3 (the original,
        # dividing 2x-adjusted bytes by a raw size, would have asked for all 10)
        b = MemoryBudget(1500 / MIB, device=CPU, threshold=1.0, probe=FixedProbe(0, 1))
        assert b.limit_bytes == 1500
        assert b.eviction_count(_Bank(10, 100), _Index(1000)) == 3
        assert b.eviction_count(_Bank(10, 100), _Index(1000), incoming=2) == 5

    def test_capped_at_size_and_zero_without_budget(self):
        assert self.budget(1).eviction_count(_Bank(3, MIB), _Index(0), incoming=100) == 3
        assert self.budget(1).eviction_count(_Bank(0, MIB), _Index(0), incoming=5) == 0
        assert self.budget(None).eviction_count(_Bank(10**6, MIB), _Index(10**12)) == 0

    def test_room(self):
        b = MemoryBudget(1000 / MIB, device=CPU, threshold=1.0, probe=FixedProbe(0, 1))
        assert b.room(_Bank(0, 100), _Index(250)) == 7
        assert b.room(_Bank(0, 100), _Index(5000)) == 0
        assert self.budget(None).room(_Bank(0, 100), _Index(0)) is None


class _GrowingIndex(ExactSearch):
    """Exact search whose footprint jumps once the pool reaches ``at`` entries (like an IVF build)."""

    def __init__(self, bank, at, nbytes):
        super().__init__(bank, PoolConfig().metric, chunk_bytes=1 << 20)
        self.at, self.jump = at, nbytes

    def nbytes(self):
        return self.jump if self.bank.size >= self.at else 0


class TestWithinBudget:
    @pytest.mark.parametrize("policy", POLICIES)
    def test_churn(self, policy):
        pool = make_pool(capacity=None, memory_budget_mb=0.03, eviction_policy=policy, engine="torch")
        limit = pool.budget.limit_bytes
        g = torch.Generator().manual_seed(1)
        offered = 0
        for step in range(60):
            n = int(torch.randint(1, pool.capacity + 20, (), generator=g))
            offered += n
            out = pool.add(dreams(n, step), coherence=torch.rand(n, generator=g))
            mem = pool.stats()["memory"]
            assert mem["usage_bytes"] <= limit and mem["within_budget"]
            assert mem["usage_bytes"] == len(pool) * pool.bank.entry_nbytes()
            assert set(out[out >= 0].tolist()) <= live_ids(pool)
            c = pool.counters
            assert c["added"] + c["rejected"] + c["dropped"] == offered
            assert c["added"] - c["evicted"] == len(pool)
            if step % 3 == 0:
                hits = pool.retrieve(torch.rand(4, 3, generator=g), k=4, mode="similar")
                pool.feedback(hits.ids, torch.rand(hits.ids.shape, generator=g))

    def test_churn_with_an_ivf_index(self):
        """The IVF footprint (codes, stale codes, centroids) counts, and stays within its estimate."""
        pool = make_pool(
            capacity=None,
            memory_budget_mb=0.4,
            engine="faiss-ivf",
            ann_threshold=1024,
            embedding_dim=16,
            eviction_policy="lowest_coherence",
        )
        limit = pool.budget.limit_bytes
        assert 1024 <= pool.capacity < 2048  # the index is trained once, then churns
        g = torch.Generator().manual_seed(2)
        worst = 0.0
        for step in range(25):
            pool.add(dreams(150, step), coherence=torch.rand(150, generator=g))
            mem = pool.stats()["memory"]
            assert mem["usage_bytes"] <= limit
            assert mem["allocated_bytes"] <= pool.budget.budget_bytes
            estimate = index_nbytes_estimate(pool.config, CPU, len(pool))
            assert mem["index_bytes"] <= estimate
            worst = max(worst, mem["index_bytes"] / max(estimate, 1))
        state = pool.index.describe()
        assert state["trained"] and state["refreshes"] > 0 and pool.counters["evicted"] > 1000
        assert worst > 0.5  # the estimate is an upper bound, not a loose one

    def test_index_growth_evicts_after_writing(self):
        """An index that outgrows its share makes the pool evict after the write, new entries too."""
        pool = make_pool(capacity=10, memory_budget_mb=1)
        e = pool.bank.entry_nbytes()
        pool.budget = MemoryBudget((10 * e + 5) / MIB, device=CPU, threshold=1.0, probe=FixedProbe(0, 1))
        pool.index = _GrowingIndex(pool.bank, at=8, nbytes=5 * e)
        out = pool.add(dreams(8), coherence=torch.ones(8))
        # 8 entries + 5 entries' worth of index > 10: evict ceil(3e / (13e / 8)) = 2, oldest first
        assert out.tolist() == [-1, -1, 2, 3, 4, 5, 6, 7]
        assert live_ids(pool) == {2, 3, 4, 5, 6, 7}
        assert pool.counters == {**pool.counters, "added": 6, "dropped": 2, "evicted": 0}
        assert pool.stats()["memory"]["within_budget"]

    def test_unlimited_pool_has_no_budget_evictions(self):
        pool = make_pool(capacity=20)
        pool.add(dreams(20), coherence=torch.ones(20))
        assert len(pool) == 20 and pool.counters["evicted"] == 0
        assert pool.stats()["memory"]["within_budget"]


# ----------------------------------------------------------- device memory
class TestNvmlFake:
    def test_reads_the_gpu_by_bus_id(self):
        fake = FakeNvml()
        probe = NvmlMemory("00000000:3b:00.0", nvml=fake)
        reading = probe.read()
        assert (reading.used_bytes, reading.total_bytes, reading.source) == (3 << 30, 8 << 30, "nvml")
        assert fake.looked_up == ["00000000:3b:00.0"] and fake.inits == 1
        probe.close()
        probe.close()
        assert fake.shutdowns == 1
        assert probe.read().used_bytes is None

    def test_shut_down_when_collected(self):
        fake = FakeNvml()
        probe = NvmlMemory(fake.bus_id, nvml=fake)
        del probe
        gc.collect()
        assert fake.shutdowns == fake.inits == 1

    def test_failed_lookup_shuts_down_and_falls_back(self, monkeypatch):
        fake = FakeNvml(bus_id="00000000:3b:00.0")
        monkeypatch.setattr(memory_mod, "pci_bus_id", lambda device: "00000000:af:00.0")
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (6 << 30, 16 << 30))
        probe = open_probe(torch.device("cuda", 0), nvml=fake)
        assert isinstance(probe, CudaMemory) and fake.inits == fake.shutdowns == 1
        reading = probe.read()
        assert (reading.used_bytes, reading.total_bytes) == (10 << 30, 16 << 30)
        assert reading.source == "torch.cuda.mem_get_info" and "NVML unavailable" in reading.note

    def test_open_probe_picks_nvml_on_cuda(self, monkeypatch):
        fake = FakeNvml()
        monkeypatch.setattr(memory_mod, "pci_bus_id", lambda device: fake.bus_id)
        probe = open_probe(torch.device("cuda", 0), nvml=fake)
        assert isinstance(probe, NvmlMemory) and probe.read().total_bytes == 8 << 30
        probe.close()

    def test_percent_budget_of_the_gpu(self):
        fake = FakeNvml(total=8 << 30)
        b = MemoryBudget("20%", device=torch.device("cuda", 0), probe=NvmlMemory(fake.bus_id, nvml=fake))
        assert b.budget_bytes == int(0.2 * (8 << 30)) and b.limit_bytes == math.floor(0.9 * b.budget_bytes)
        b.close()
        assert fake.shutdowns == 1

    def test_stats_show_nvml_and_read_failures(self):
        bank = TensorBank(4, SHAPE, 8, device=CPU)
        index = ExactSearch(bank, PoolConfig().metric, chunk_bytes=1 << 20)
        fake = FakeNvml()
        b = MemoryBudget(1, device=CPU, probe=NvmlMemory(fake.bus_id, nvml=fake))
        mem = b.stats(bank, index)
        assert (mem["source"], mem["device_used_bytes"], mem["device_total_bytes"]) == ("nvml", 3 << 30, 8 << 30)
        fake.fail_read = True
        mem = b.stats(bank, index)
        assert mem["source"] == "pool-bytes" and mem["device_used_bytes"] == mem["allocated_bytes"]
        assert "GPU_IS_LOST" in mem["note"] and mem["device_total_bytes"] is None

    def test_real_binding_without_a_driver_falls_back(self, monkeypatch):
        if nvml_available():
            pytest.skip("NVML works here: the fallback is not reachable")
        monkeypatch.setattr(memory_mod, "pci_bus_id", lambda device: "00000000:01:00.0")
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1, 2))
        probe = open_probe(torch.device("cuda", 0))
        assert isinstance(probe, CudaMemory) and "NVML unavailable" in probe.read().note

    def test_pci_bus_id_format(self, monkeypatch):
        props = SimpleNamespace(pci_domain_id=1, pci_bus_id=0x3B, pci_device_id=2)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
        assert pci_bus_id(torch.device("cuda", 0)) == "00000001:3b:02.0"


class TestFallbacks:
    def test_cpu_pool_reports_process_memory(self):
        import psutil

        pool = make_pool(capacity=16)
        pool.add(dreams(5), coherence=torch.ones(5))
        mem = pool.stats()["memory"]
        assert mem["source"] == "psutil-rss" and "CPU" in mem["note"]
        assert mem["device_total_bytes"] == psutil.virtual_memory().total
        assert 0 < mem["device_used_bytes"] <= mem["device_total_bytes"]
        e = pool.bank.entry_nbytes()
        assert (mem["entry_bytes"], mem["usage_bytes"], mem["allocated_bytes"]) == (e, 5 * e, 16 * e)

    def test_without_psutil_the_pool_bytes_stand_in(self, monkeypatch):
        monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil now raises ImportError
        pool = make_pool(capacity=16)
        mem = pool.stats()["memory"]
        assert mem["source"] == "pool-bytes" and "psutil missing" in mem["note"]
        assert mem["device_used_bytes"] == mem["allocated_bytes"] == 16 * pool.bank.entry_nbytes()
        assert ProcessMemory().read().total_bytes and ProcessMemory().read().total_bytes > 0

    def test_percent_of_host_ram_on_cpu(self, monkeypatch):
        """Of the smallest of the host's RAM and the room left (here half the RAM is available)."""
        import psutil

        total = psutil.virtual_memory().total
        room = memory_mod.HostRoom(total // 2, None, None)
        monkeypatch.setattr(budget_mod, "host_room", lambda: room)
        pool = make_pool(capacity=None, memory_budget_mb="0.001%")
        assert pool.budget.budget_bytes == int(float("0.001") / 100 * (total // 2))
        assert pool.capacity * pool.bank.entry_nbytes() <= pool.budget.limit_bytes

    def test_percent_without_a_total_is_a_config_error(self):
        with pytest.raises(InvalidConfigurationError, match="cannot be read"):
            MemoryBudget("10%", device=CPU, probe=FixedProbe(None, None))

    def test_import_and_init_without_nvml(self):
        code = (
            "import sys; sys.modules['pynvml'] = None\n"
            "import torch\n"
            "from dreampool_gpu import DreamPool, PoolConfig\n"
            "from dreampool_gpu.budget import open_probe\n"
            "pool = DreamPool(PoolConfig(dream_shape=(2, 2, 1), capacity=4, device='cpu'))\n"
            "mem = pool.stats()['memory']\n"
            "assert mem['source'] == 'psutil-rss', mem\n"
            "torch.cuda.mem_get_info = lambda device=None: (1, 2)\n"
            "import dreampool_gpu.budget as b; b.pci_bus_id = lambda device: '0:1:0.0'\n"
            "probe = open_probe(torch.device('cuda', 0))\n"
            "print(type(probe).__name__, probe.read().note)\n"
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("CudaMemory NVML unavailable")


# ------------------------------------------------------------- real NVML
@pytest.mark.gpu
class TestRealNvml:
    """Against the driver's NVML on a CUDA machine (skipped without one)."""

    def test_probe_reads_the_torch_device(self):
        if not nvml_available():
            pytest.skip("CUDA present but NVML unavailable")
        device = torch.device("cuda", torch.cuda.current_device())
        probe = open_probe(device)
        assert isinstance(probe, NvmlMemory)
        reading = probe.read()
        free, total = torch.cuda.mem_get_info(device)
        # NVML's total also counts the memory the driver reserves, which CUDA never reports (~0.5 GiB on an H100)
        assert total <= reading.total_bytes <= total + 2 * 1024 * MIB
        assert 0 < reading.used_bytes <= reading.total_bytes
        # NVML's used counts the driver's reservation too, so compare what is free: same GPU, read moments apart
        assert abs(free - (reading.total_bytes - reading.used_bytes)) < 256 * MIB
        import pynvml

        info = pynvml.nvmlDeviceGetPciInfo(probe._handle)
        bus = info.busId.decode() if isinstance(info.busId, bytes) else info.busId
        assert bus.lower().endswith(pci_bus_id(device)[-7:])
        probe.close()

    def test_pool_with_a_fraction_of_the_gpu(self):
        if not nvml_available():
            pytest.skip("CUDA present but NVML unavailable")
        pool = DreamPool(
            PoolConfig(
                dream_shape=(4, 4, 2), capacity=None, memory_budget_mb="0.01%", device="cuda", coherence_threshold=0.0
            )
        )
        probe = open_probe(pool.device)
        total = probe.read().total_bytes  # the GPU's whole memory, as NVML reports it
        probe.close()
        assert pool.budget.budget_bytes == int(1e-4 * total)
        for _ in range(10):
            n = pool.capacity // 3 + 1
            pool.add(torch.rand(n, 4, 4, 2, 3, device=pool.device), coherence=torch.ones(n))
            mem = pool.stats()["memory"]
            assert mem["source"] == "nvml" and mem["within_budget"]
        assert mem["device_total_bytes"] == total
        assert sum(pool.bank.nbytes().values()) <= pool.budget.limit_bytes
        assert pool.bank.columns["dreams"].is_cuda and pool.bank.columns["dreams"].dtype == torch.float16
        pool.budget.close()
        assert pool.budget.read().source == "nvml"  # a new probe opens on demand
        pool.budget.close()


# ------------------------------------------------------------ process limits (issue 22)
class TestProcessLimits:
    """docs/spec.md §Memory budget: on CPU "N%" and the check before allocating read the room
    the process has, the smallest of available RAM, RLIMIT_AS and the memory cgroup."""

    @staticmethod
    def limit(monkeypatch, *, available=64 << 30, rlimit_as=None, cgroup=None):
        room = memory_mod.HostRoom(available, rlimit_as, cgroup)
        monkeypatch.setattr(budget_mod, "host_room", lambda: room)
        return room

    @pytest.mark.parametrize(
        ("version", "files", "room"),
        [
            ("v2", {"memory.max": "1000000000\n", "memory.current": "400000000\n"}, 600_000_000),
            ("v2", {"memory.max": "max\n", "memory.current": "400000000\n"}, None),
            ("v2", {"memory.max": "300\n", "memory.current": "400\n"}, 0),
            (
                "v1",
                {"memory/memory.limit_in_bytes": "2147483648\n", "memory/memory.usage_in_bytes": "147483648\n"},
                2_000_000_000,
            ),
            (
                "v1",
                {"memory/memory.limit_in_bytes": "9223372036854771712\n", "memory/memory.usage_in_bytes": "1\n"},
                None,
            ),
            ("none", {}, None),
        ],
    )
    def test_cgroup_limits_are_read(self, tmp_path, monkeypatch, version, files, room):
        for name, text in files.items():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_text(text)
        monkeypatch.setattr(memory_mod, "CGROUP_ROOT", str(tmp_path))
        assert memory_mod.host_room().cgroup == room

    def test_rlimit_as_room_is_the_limit_minus_the_address_space(self, monkeypatch):
        import resource

        with open("/proc/self/statm") as f:
            size = int(f.read().split()[0]) * resource.getpagesize()
        monkeypatch.setattr(resource, "getrlimit", lambda which: (size + (300 << 20), resource.RLIM_INFINITY))
        room = memory_mod.host_room().rlimit_as
        assert room is not None and abs(room - (300 << 20)) < (50 << 20)
        monkeypatch.setattr(resource, "getrlimit", lambda which: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        assert memory_mod.host_room().rlimit_as is None

    def test_smallest_names_the_tightest_limit(self):
        assert memory_mod.HostRoom(5, 3, None).smallest == (3, "rlimit_as")
        assert memory_mod.HostRoom(5, None, 2).smallest == (2, "cgroup")
        assert memory_mod.HostRoom(None, None, None).smallest is None

    @pytest.mark.parametrize("which", ["available", "rlimit_as", "cgroup"])
    def test_percent_resolves_against_the_smallest(self, monkeypatch, which):
        self.limit(monkeypatch, **{which: 40 << 20})
        pool = make_pool(capacity=None, memory_budget_mb="50%", engine="torch")
        assert pool.budget.budget_bytes == 20 << 20
        assert pool.capacity * pool.bank.entry_nbytes() <= 0.9 * (20 << 20)

    def test_percent_never_exceeds_the_host_total(self, monkeypatch):
        total = ProcessMemory().read().total_bytes
        self.limit(monkeypatch, available=None)  # no room known: the total, as before
        assert MemoryBudget("10%", device=CPU).budget_bytes == int(0.1 * total)

    def test_a_fixed_budget_beyond_the_room_raises_before_allocating(self, monkeypatch):
        self.limit(monkeypatch, cgroup=1 << 20)
        with pytest.raises(InsufficientMemoryError) as info:
            make_pool(capacity=None, memory_budget_mb=64, engine="torch")
        assert info.value.field == "memory_budget_mb" and info.value.available_bytes == 1 << 20

    def test_a_capacity_beyond_the_room_names_capacity(self, monkeypatch):
        self.limit(monkeypatch, rlimit_as=1 << 20)
        with pytest.raises(InsufficientMemoryError) as info:
            make_pool(capacity=10**6)
        assert info.value.field == "capacity" and info.value.needed_bytes > 1 << 20

    def test_a_percent_that_cannot_hold_one_entry(self, monkeypatch):
        self.limit(monkeypatch, rlimit_as=100)
        with pytest.raises(InsufficientMemoryError) as info:
            make_pool(capacity=None, memory_budget_mb="50%")
        assert info.value.field == "memory_budget_mb" and info.value.available_bytes == 50
        assert "larger share" in str(info.value) and "lower" not in str(info.value)  # lowering "50%" cannot help

    def test_a_real_rlimit_as(self):
        """A subprocess under ``setrlimit(RLIMIT_AS)``: "50%" fits the limit, a bank beyond it is a typed error."""
        code = """
import resource, torch
from dreampool_gpu import DreamPool, PoolConfig
from dreampool_gpu.errors import InsufficientMemoryError
with open("/proc/self/statm") as f:
    size = int(f.read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (size + (1 << 30), resource.getrlimit(resource.RLIMIT_AS)[1]))
shape = (16, 16, 4)
pool = DreamPool(PoolConfig(dream_shape=shape, capacity=None, memory_budget_mb="50%", device="cpu",
                            engine="torch", coherence_threshold=0.0))
pool.add(torch.rand(64, *shape, 3), coherence=torch.ones(64))
print("fitted", pool.capacity * pool.bank.entry_nbytes(), len(pool))
try:
    DreamPool(PoolConfig(dream_shape=shape, capacity=10**6, device="cpu", engine="torch"))
except InsufficientMemoryError as exc:
    print("refused", exc.field)
"""
        done = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert done.returncode == 0, done.stderr[-2000:]
        fitted, refused = done.stdout.split("\n")[:2]
        nbytes, size = map(int, fitted.split()[1:])
        assert 0 < nbytes <= 0.9 * 0.5 * (1 << 30) and size == 64
        assert refused == "refused capacity"
