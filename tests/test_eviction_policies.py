"""The sampling eviction policies: ``reservoir`` (Algorithm R) and ``class_balanced``.

Reservoir inclusion is tested against its promise (every dream of the stream stays with
chance M/n) by a chi-square test over a fixed set of seeds; batches are checked against a
sequential Algorithm R that replays the pool's own draws; class counts, budgets, host
reads and the generator's round trip through state dicts and checkpoints are checked on
real pools.
"""

from __future__ import annotations

import pytest
import torch

from dreampool_gpu import DreamPool, PoolConfig
from dreampool_gpu.errors import HostSyncError, InvalidConfigurationError, InvalidInputError
from dreampool_gpu.sync_guard import forbid_host_sync

SHAPE = (2, 2, 1)


def _pool(policy: str = "reservoir", capacity: int | None = 8, seed: int = 0, **overrides) -> DreamPool:
    config = dict(
        dream_shape=SHAPE,
        capacity=capacity,
        embedding_dim=8,
        device="cpu",
        engine="torch",
        eviction_policy=policy,
        eviction_seed=seed,
        coherence_threshold=0.0,
    )
    return DreamPool(PoolConfig(**{**config, **overrides}))


def _dreams(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, *SHAPE, 3, generator=torch.Generator().manual_seed(seed))


def _stream(pool: DreamPool, sizes: list[int], labels: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Add batches of ``sizes`` dreams; the ids each add returned."""
    out, start = [], 0
    for b, m in enumerate(sizes):
        batch_labels = None if labels is None else labels[start : start + m]
        out.append(pool.add(_dreams(m, 1000 + b), coherence=1.0, class_label=batch_labels))
        start += m
    return out


def _kept_positions(pool: DreamPool, returned: list[torch.Tensor]) -> torch.Tensor:
    """``[n]`` bool: which dreams of the stream (in stream order) are in the pool now."""
    ids = torch.cat(returned)
    return torch.tensor([int(i) >= 0 and int(i) in pool for i in ids])


def _chi_square_p(counts: torch.Tensor, runs: int, keep: int) -> float:
    """p-value of uniform inclusion: each run keeps ``keep`` of ``n`` positions, uniformly without replacement.

    Per position the count has variance ``runs p (1 - p)`` with ``p = keep / n``, and the
    counts sum to ``runs * keep``; ``(n - 1) / n * sum (O - E)^2 / var`` is chi-square
    with ``n - 1`` degrees of freedom.
    """
    n = counts.numel()
    p = keep / n
    expected, var = runs * p, runs * p * (1 - p)
    stat = (n - 1) / n * float(((counts.double() - expected) ** 2).sum()) / var
    dof = torch.tensor((n - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(dof, torch.tensor(stat / 2, dtype=torch.float64)))


SIZES = [3, 5, 1, 7, 4, 6, 2, 5, 3, 4]  # 40 dreams through 8 slots, batches straddling the fill


def test_reservoir_inclusion_is_uniform_chi_square():
    runs, keep = 250, 8
    counts = torch.zeros(sum(SIZES), dtype=torch.int64)
    for seed in range(runs):
        pool = _pool(seed=seed)
        kept = _kept_positions(pool, _stream(pool, SIZES))
        assert int(kept.sum()) == keep == len(pool)
        counts += kept
    assert _chi_square_p(counts, runs, keep) > 1e-3
    # the same test tells a policy that is not stream-uniform: fifo keeps the last 8 only
    fifo = torch.zeros(sum(SIZES), dtype=torch.int64)
    for _ in range(20):
        pool = _pool("fifo")
        fifo += _kept_positions(pool, _stream(pool, SIZES))
    assert _chi_square_p(fifo, 20, keep) < 1e-3


def _algorithm_r(sizes: list[int], capacity: int, seed: int) -> tuple[list[int], list[list[bool]]]:
    """Sequential Algorithm R on stream positions, with the pool's draws (one per dream past the room).

    The reservoir's positions are its residents oldest first (re-sorted at each batch, as the
    pool orders them), then the newcomers in batch order. Returns the final reservoir and, per
    batch, which of its dreams the add stored.
    """
    g = torch.Generator().manual_seed(seed)
    reservoir: list[int] = []
    seen, start, stored = 0, 0, []
    for m in sizes:
        reservoir.sort()
        free = min(m, max(0, capacity - len(reservoir)))
        u = torch.rand(m - free, generator=g, dtype=torch.float64).tolist() if free < m else []
        for i in range(m):
            seen += 1
            if i < free:
                reservoir.append(start + i)
                continue
            j = min(int(u[i - free] * seen), seen - 1)
            if j < capacity:
                reservoir[j] = start + i
        stored.append([start + i in reservoir for i in range(m)])
        start += m
    return sorted(reservoir), stored


@pytest.mark.parametrize("sizes", [SIZES, [13, 1, 20, 9, 2], [1] * 30])
def test_reservoir_batches_equal_sequential_algorithm_r(sizes):
    pool = _pool(seed=7)
    returned = _stream(pool, sizes)
    reservoir, stored = _algorithm_r(sizes, 8, seed=7)
    assert torch.nonzero(_kept_positions(pool, returned)).flatten().tolist() == reservoir
    assert [(ids >= 0).tolist() for ids in returned] == stored
    assert pool.eviction.seen == sum(sizes)
    assert pool.counters["added"] + pool.counters["dropped"] == sum(sizes)


def test_reservoir_refills_evicted_room_only_by_draws():
    """Entries evicted beyond the plan (a budget's settling) are not refilled by whatever comes next."""
    admitted = 0
    for seed in range(100):
        pool = _pool(seed=seed)
        _stream(pool, [10] * 4)  # 40 seen, 8 kept
        pool.parts.admitter.make_room(4)  # the budget's path: 4 random residents leave
        assert len(pool) == 4
        admitted += int(pool.add(_dreams(1, 77), coherence=1.0)[0] >= 0)
        assert len(pool) <= 5
    # each 41st dream enters with chance 8/41 (about 20 of 100), not always
    assert 5 <= admitted <= 40


def test_reservoir_counts_only_dreams_that_pass_the_gate():
    pool = _pool(coherence_threshold=0.5)
    pool.add(_dreams(10, 0), coherence=torch.tensor([0.9, 0.1] * 5))
    assert pool.eviction.seen == 5 and len(pool) == 5


def _group_sizes(pool: DreamPool) -> dict[int, int]:
    labels = pool.bank.columns["class_label"][pool.bank.alive()].tolist()
    return {label: labels.count(label) for label in set(labels)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_class_balanced_counts_equal_within_one(seed):
    g = torch.Generator().manual_seed(seed)
    # skewed: class 0 is 70% of the stream, classes 1-3 and the unlabelled 7.5% each
    labels = torch.tensor([0] * 280 + [1] * 30 + [2] * 30 + [3] * 30 + [-1] * 30)
    labels = labels[torch.randperm(labels.numel(), generator=g)]
    pool = _pool("class_balanced", capacity=20, seed=seed)
    _stream(pool, [10] * 40, labels)
    sizes = _group_sizes(pool)
    assert set(sizes) == {-1, 0, 1, 2, 3} and sum(sizes.values()) == 20
    assert max(sizes.values()) - min(sizes.values()) <= 1
    # the same stream under reservoir keeps the skew: the balance is the policy's doing
    skewed = _pool("reservoir", capacity=20, seed=seed)
    _stream(skewed, [10] * 40, labels)
    assert max(_group_sizes(skewed).values()) - min(_group_sizes(skewed).values()) > 1


def test_class_balanced_ties_evict_the_lowest_label():
    pool = _pool("class_balanced", capacity=4)
    _stream(pool, [4], torch.tensor([2, 1, 2, 1]))  # full: classes 1 and 2 tie with 2 entries each
    pool.add(_dreams(1, 5), coherence=1.0, class_label=torch.tensor([-1]))
    assert _group_sizes(pool) == {-1: 1, 1: 1, 2: 2}
    pool.add(_dreams(1, 6), coherence=1.0, class_label=torch.tensor([3]))  # class 2 is now the largest
    assert _group_sizes(pool) == {-1: 1, 1: 1, 2: 1, 3: 1}


def test_class_balanced_single_class_is_a_reservoir():
    runs, keep = 200, 8
    counts = torch.zeros(sum(SIZES), dtype=torch.int64)
    labels = torch.full((sum(SIZES),), 4)
    for seed in range(runs):
        pool = _pool("class_balanced", seed=seed)
        counts += _kept_positions(pool, _stream(pool, SIZES, labels))
    assert _chi_square_p(counts, runs, keep) > 1e-3


@pytest.mark.parametrize("policy", ["reservoir", "class_balanced"])
def test_save_and_load_continue_the_same_choices(policy, tmp_path):
    labels = torch.arange(60) % 3 - 1
    pool = _pool(policy, seed=3)
    _stream(pool, [6] * 5, labels[:30])
    pool.save(tmp_path / "ckpt")
    loaded = DreamPool.load(tmp_path / "ckpt")
    state = pool.state_dict()
    fresh = _pool(policy, seed=99)  # the state's generator replaces the seed's
    fresh.load_state_dict(state)
    assert loaded.eviction.seen == fresh.eviction.seen == pool.eviction.seen == 30
    for b in range(5):
        batch = dict(dreams=_dreams(6, 50 + b), coherence=1.0, class_label=labels[30 + 6 * b : 36 + 6 * b])
        ids = pool.add(**batch)
        torch.testing.assert_close(loaded.add(**batch), ids, rtol=0, atol=0)
        torch.testing.assert_close(fresh.add(**batch), ids, rtol=0, atol=0)
    torch.testing.assert_close(loaded.bank.columns["ids"], pool.bank.columns["ids"], rtol=0, atol=0)
    assert loaded.eviction.state_dict() == fresh.eviction.state_dict() == pool.eviction.state_dict()


def test_state_dict_survives_torch_save(tmp_path):
    pool = _pool(seed=5)
    _stream(pool, [5] * 4)
    torch.save(pool.state_dict(), tmp_path / "pool.pt")
    twin = _pool(seed=0)
    twin.load_state_dict(torch.load(tmp_path / "pool.pt", weights_only=True))
    batch = dict(dreams=_dreams(20, 9), coherence=1.0)
    torch.testing.assert_close(twin.add(**batch), pool.add(**batch), rtol=0, atol=0)


def test_state_without_policy_state_still_loads():
    pool = _pool(seed=2)
    _stream(pool, [5] * 4)
    state = pool.state_dict()
    del state["state"]["eviction"]  # as written before the policy had state
    older = _pool(seed=2)
    older.load_state_dict(state)
    assert older.eviction.seen == len(pool) == 8  # the residents count as the dreams seen
    assert older.eviction.state_dict()["generator"] == _pool(seed=2).eviction.state_dict()["generator"]
    fifo = _pool("fifo")
    fifo.load_state_dict(pool.state_dict())  # a policy without state ignores it
    assert len(fifo) == 8 and "eviction" not in fifo.state_dict()["state"]


@pytest.mark.parametrize(
    "bad",
    [{"seen": -1}, {"seen": 3, "generator": "zz"}, {"seen": 3, "generator": "00"}, [1, 2], {"seen": True}],
)
def test_bad_policy_state_raises_and_changes_nothing(bad):
    pool = _pool(seed=4)
    _stream(pool, [5] * 3)
    state = pool.state_dict()
    target = _pool(seed=4)
    _stream(target, [4])
    before = target.state_dict()
    state["state"]["eviction"] = bad
    with pytest.raises(InvalidInputError, match="eviction"):
        target.load_state_dict(state)
    assert target.eviction.state_dict() == before["state"]["eviction"]
    torch.testing.assert_close(target.state_dict()["bank"]["ids"], before["bank"]["ids"], rtol=0, atol=0)


@pytest.mark.parametrize("seed", [-1, 1.5, True, "3", None, 1 << 64])
def test_bad_seeds_raise_typed_errors(seed):
    with pytest.raises(InvalidConfigurationError, match="eviction_seed"):
        PoolConfig(eviction_seed=seed)


def test_seed_range_and_policy_names():
    assert PoolConfig(eviction_seed=(1 << 64) - 1, eviction_policy="reservoir").eviction_seed == (1 << 64) - 1
    assert PoolConfig(eviction_policy="class_balanced").eviction_policy.value == "class_balanced"
    with pytest.raises(InvalidConfigurationError, match="reservoir"):
        PoolConfig(eviction_policy="reservoirs")


@pytest.mark.parametrize("policy", ["reservoir", "class_balanced"])
@pytest.mark.parametrize("engine", ["torch", "faiss-flat"])
def test_budget_is_respected(policy, engine):
    pool = _pool(policy, capacity=None, memory_budget_mb=0.01, engine=engine)
    g = torch.Generator().manual_seed(0)
    for b in range(12):
        n = 40 if b % 3 else 400
        pool.add(_dreams(n, b), coherence=1.0, class_label=torch.randint(-1, 10, (n,), generator=g))
        memory = pool.stats()["memory"]
        assert memory["within_budget"] and memory["usage_bytes"] <= memory["limit_bytes"]
        assert len(pool) <= pool.capacity
    assert pool.eviction.seen == 40 * 8 + 400 * 4
    assert len(pool) >= pool.capacity // 2


@pytest.mark.parametrize("policy", ["reservoir", "class_balanced"])
def test_add_reads_the_host_once(policy):
    pool = _pool(policy, capacity=32, checks="deferred")
    twin = _pool(policy, capacity=32, checks="immediate")
    g = torch.Generator().manual_seed(0)
    for b in range(4):
        batch = dict(dreams=_dreams(24, b), coherence=1.0, class_label=torch.randint(-1, 10, (24,), generator=g))
        with pytest.raises(HostSyncError, match="tolist"), forbid_host_sync():
            pool.add(**batch)  # a refused add changes nothing
        with forbid_host_sync(allowed=1):
            ids = pool.add(**batch)
        torch.testing.assert_close(ids, twin.add(**batch), rtol=0, atol=0)
    assert pool.counters["evicted"] > 0 and pool.counters["dropped"] > 0
    torch.testing.assert_close(pool.bank.columns["ids"], twin.bank.columns["ids"], rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["reservoir", "class_balanced"])
def test_add_syncs_once_on_cuda(policy):
    if not torch.cuda.is_available():
        pytest.skip("gpu unavailable")
    import warnings

    pool = _pool(policy, capacity=32, device="cuda")
    twin = _pool(policy, capacity=32)
    g = torch.Generator().manual_seed(0)
    batches = [
        dict(dreams=_dreams(24, b), coherence=1.0, class_label=torch.randint(-1, 10, (24,), generator=g))
        for b in range(4)
    ]
    for batch in batches[:2]:  # warm-up: pinned memory, cached age order; evictions from the second on
        torch.testing.assert_close(pool.add(**batch).cpu(), twin.add(**batch), rtol=0, atol=0)
    for batch in batches[2:]:
        cuda_batch = {name: v.cuda() if isinstance(v, torch.Tensor) else v for name, v in batch.items()}
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                ids = pool.add(**cuda_batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        syncs = [str(w.message) for w in seen if "synchroniz" in str(w.message)]
        assert len(syncs) == 1, syncs  # the gate's one read
        torch.testing.assert_close(ids.cpu(), twin.add(**batch), rtol=0, atol=0)
    assert pool.counters["evicted"] > 0


def test_a_policy_object_passed_in_is_the_pools_policy():
    """``DreamPool(config, eviction=...)`` takes the policy as a part: the same draws as the config naming it."""
    from dreampool_gpu.eviction import Reservoir

    named = _pool(seed=3)
    policy = Reservoir(seed=3)
    given = DreamPool(named.config.replace(eviction_policy="fifo", eviction_seed=0), eviction=policy)
    assert given.eviction is policy
    kept_named = _kept_positions(named, _stream(named, [10] * 4))
    kept_given = _kept_positions(given, _stream(given, [10] * 4))
    assert torch.equal(kept_named, kept_given)
    assert len(given) == 8 and not bool(kept_given[:8].all())  # a reservoir, not fifo's first 8 nor its last 8
    assert not bool(kept_given[-8:].all())


def test_an_eviction_that_is_not_a_policy_is_refused():
    with pytest.raises(InvalidConfigurationError, match="eviction"):
        DreamPool(PoolConfig(dream_shape=SHAPE, capacity=8, device="cpu"), eviction="reservoir")
