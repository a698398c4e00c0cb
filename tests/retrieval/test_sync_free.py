"""The hot path without host synchronisation: retrieve and add under checks="deferred".

``forbid_host_sync`` fails on every operation that would make the host wait for a CUDA
device (value reads, data-sized outputs), on CPU too: these tests prove on CI's CPU what
the gpu-marked test proves with ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import pytest
import torch
from _equality import assert_same_results

from dreampool_gpu import DreamPool, PoolConfig
from dreampool_gpu.errors import HostSyncError, InvalidInputError
from dreampool_gpu.sync_guard import forbid_host_sync

SHAPE = (6, 6, 2)
MODES = ("similar", "class", "balanced", "utility", "diverse", "soft", "hybrid", "category", "nearest")


def _pool(checks: str = "deferred", **overrides) -> DreamPool:
    config = dict(dream_shape=SHAPE, capacity=256, device="cpu", engine="torch", checks=checks)
    return DreamPool(PoolConfig(**{**config, **overrides}))


def _batch(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "dreams": torch.rand(n, *SHAPE, 3, generator=g),
        "coherence": torch.rand(n, generator=g),
        "energy": torch.rand(n, generator=g),
        "violation": torch.rand(n, generator=g),
        "class_labels": torch.randint(-1, 10, (n,), generator=g),
    }


def _filled(**overrides) -> DreamPool:
    pool = _pool(**overrides)
    for seed in range(3):
        pool.add(**_batch(64, seed))
    g = torch.Generator().manual_seed(0)
    pool.feedback(pool.sample(32, generator=g), torch.rand(32, generator=g))
    return pool


def test_guard_catches_what_would_sync_on_cuda():
    t = torch.arange(6.0)
    for operation in (
        lambda: t.sum().item(),
        lambda: bool(t.any()),
        lambda: t.tolist(),
        lambda: torch.nonzero(t),
        lambda: t[t > 2],
        lambda: t.unique(),
        lambda: t.cpu(),
        lambda: int(t[0]),
    ):
        with pytest.raises(HostSyncError), forbid_host_sync():
            operation()
    with forbid_host_sync():  # fixed-shape device work passes
        assert torch.where(t > 2, t, 0.0).topk(2).indices.shape == (2,)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("queries", ["dreams", "chroma", "embeddings"])
def test_retrieve_has_no_host_sync(mode, queries):
    pool = _filled()
    q = _batch(5, 9)["dreams"]
    if queries == "chroma":
        q = q.mean((1, 2, 3))
    elif queries == "embeddings":
        if mode in ("similar", "class", "balanced", "utility", "diverse"):
            pytest.skip("chroma modes take dreams or chroma")
        q = torch.randn(5, pool.config.embedding_dim)
    options = {"class_hint": torch.tensor([0, 1, 2, 3, 4])} if mode == "class" else {}
    if mode == "balanced":
        options["classes"] = [1, 2]
    if mode == "category" and queries == "embeddings":
        options["category"] = torch.tensor([0, 1, 2, 3, 4])
    expected = _filled(checks="immediate").retrieve(q, k=4, mode=mode, **options)
    with forbid_host_sync():
        hits = pool.retrieve(q, k=4, mode=mode, **options)
    # the same answer as docs/spec.md promises across check policies: a sync-free call searches
    # with masks (category) and leaves near ties to the engine, so last bits may differ
    assert_same_results(hits.ids, hits.scores, expected.ids, expected.scores, where=f"{mode} {queries}")


def test_retrieve_options_have_no_host_sync():
    pool = _filled()
    q = _batch(4, 11)["dreams"]
    keep = torch.zeros(pool.capacity, dtype=torch.bool)
    keep[::2] = True
    with forbid_host_sync():
        pool.retrieve(q, k=3, mode="hybrid", class_hint=2, utility_prior=0.5, category=3, where=keep)
        pool.retrieve(q, k=3, mode="nearest", where=lambda c: c["coherence"] > 0.5, with_dreams=True)
        pool.retrieve(q, k=3, mode="similar", chroma_metric="euclidean")
        pool.retrieve(q, k=3, mode="diverse", min_dispersion=0.01)


@pytest.mark.parametrize("eviction", ["fifo", "least_used", "lowest_utility"])
def test_add_reads_the_host_once(eviction):
    pool = _filled(eviction_policy=eviction, capacity=64)
    batch = _batch(96, 5)  # ~47 stored, ~48 more accepted: this add evicts too
    batch["coherence"] = 0.5 + batch["coherence"] / 2
    with pytest.raises(HostSyncError, match="tolist"), forbid_host_sync():
        pool.add(**batch)  # the one read: fault, checks and the gate's count together
    twin = _filled(eviction_policy=eviction, capacity=64, checks="immediate")
    size = len(pool)
    with forbid_host_sync(allowed=1):
        ids = pool.add(**batch)
    assert len(pool) == min(pool.capacity, size + int((ids >= 0).sum()))
    assert pool.counters["evicted"] > 0
    torch.testing.assert_close(ids, twin.add(**batch), rtol=0, atol=0)
    torch.testing.assert_close(pool.bank.columns["ids"], twin.bank.columns["ids"], rtol=0, atol=0)


def test_bad_retrieve_is_empty_and_raised_later():
    pool = _filled()
    before = {name: t.clone() for name, t in pool.bank.columns.items()}
    q = _batch(3, 4)["dreams"]
    q[1, 0, 0, 0, 0] = float("nan")
    with forbid_host_sync():
        hits = pool.retrieve(q, k=4, mode="nearest")
    assert bool((hits.ids == -1).all()) and bool(torch.isinf(hits.scores).all())
    for name, column in pool.bank.columns.items():  # usage untouched: the call changed nothing
        torch.testing.assert_close(column, before[name], rtol=0, atol=0, equal_nan=True)
    with pytest.raises(InvalidInputError, match="queries.*finite values.*earlier retrieve"):
        pool.check()
    pool.check()  # raised once, then cleared
    assert bool((pool.retrieve(_batch(3, 4)["dreams"], k=4, mode="nearest").ids >= 0).all())


def test_pending_fault_raises_at_next_add_and_add_changes_nothing():
    pool = _filled()
    pool.retrieve(_batch(2, 1)["dreams"], k=2, mode="class", class_hint=torch.tensor([1, -1]))
    size, next_id = len(pool), pool.bank.next_id
    with pytest.raises(InvalidInputError, match="class_hint"):
        pool.add(**_batch(8, 2))
    assert (len(pool), pool.bank.next_id) == (size, next_id)
    pool.add(**_batch(8, 2))  # the fault was raised once


def test_bad_add_names_the_argument_and_changes_nothing():
    pool = _filled()
    batch = _batch(8, 3)
    batch["coherence"][2] = 1.5
    size, next_id = len(pool), pool.bank.next_id
    with pytest.raises(InvalidInputError, match=r"coherence.*\[0.0, 1.0\].*1\.5"):
        pool.add(**batch)
    assert (len(pool), pool.bank.next_id) == (size, next_id)


def test_deferred_and_immediate_pools_store_the_same():
    deferred, immediate = _filled(), _filled(checks="immediate")
    for name in ("ids", "embeddings", "chroma", "coherence", "class_label", "util_mean"):
        torch.testing.assert_close(deferred.bank.columns[name], immediate.bank.columns[name], rtol=0, atol=0)


def test_checks_policy_defaults():
    assert _pool(checks="auto").sync_free is False  # CPU: immediate
    assert _pool(checks="deferred").sync_free is True
    with pytest.raises(Exception, match="checks"):
        PoolConfig(checks="sometimes")


@pytest.mark.gpu
def test_no_sync_on_cuda_under_sync_debug_mode():
    if not torch.cuda.is_available():
        pytest.skip("gpu unavailable")
    import warnings

    pool = _pool(checks="auto", device="cuda")
    assert pool.sync_free  # auto: deferred on CUDA
    for seed in range(3):
        pool.add(**{name: t.cuda() for name, t in _batch(64, seed).items()})
    q = _batch(5, 9)["dreams"].cuda()
    hint = torch.tensor([0, 1, 2, 3, 4], device="cuda")
    for mode in MODES:  # warm-up: cuBLAS handles, cached age order
        pool.retrieve(q, k=4, mode=mode, class_hint=hint, classes=[1, 2])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for mode in MODES:
            pool.retrieve(q, k=4, mode=mode, class_hint=hint, classes=[1, 2])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    batch = {name: t.cuda() for name, t in _batch(32, 7).items()}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            pool.add(**batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in seen if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]  # the gate's one read


@pytest.mark.parametrize("mode", ["nearest", "category", "soft", "hybrid"])
def test_out_of_range_hint_never_reaches_an_index(mode):
    pool = _filled()
    q = _batch(2, 3)["dreams"]
    with forbid_host_sync():
        hits = pool.retrieve(q, k=3, mode=mode, class_hint=torch.tensor([1, 15]))
    assert bool((hits.ids == -1).all())
    with pytest.raises(InvalidInputError, match="class_hint"):
        pool.check()


@pytest.mark.parametrize("seed", range(10))
def test_random_pools_deferred_equals_immediate(seed):
    """Random pools (metric, capacity, eviction, evictions, feedback) and calls: the same results
    (as docs/spec.md promises: scores within a tolerance, ids up to ties) and usage."""
    import random

    r = random.Random(seed)
    overrides = dict(
        metric=r.choice(["cosine", "euclidean"]),
        capacity=r.choice([8, 32, 64]),
        eviction_policy=r.choice(["fifo", "least_used", "lowest_utility"]),
    )
    pools = {checks: _pool(checks, **overrides) for checks in ("immediate", "deferred")}
    for step in range(r.randint(1, 4)):
        batch = _batch(r.choice([0, 3, 17, 40]), seed * 100 + step)
        ids = {name: p.add(**batch) for name, p in pools.items()}
        assert torch.equal(ids["immediate"], ids["deferred"])
    for p in pools.values():
        if len(p):
            g = torch.Generator().manual_seed(seed)
            picked = p.sample(6, generator=g)
            p.feedback(picked, torch.rand(picked.shape[0], generator=g))
    b = r.choice([1, 5])
    dreams = _batch(b, seed + 999)["dreams"]
    capacity = overrides["capacity"]
    same_ids = True
    for mode in MODES:
        options = {"class_hint": torch.randint(0, 10, (b,))} if mode == "class" else {}
        if mode == "balanced":
            options["classes"] = [1, 2]
        if mode in ("soft", "hybrid", "nearest") and r.random() < 0.4:
            options["category"] = torch.randint(0, 12, (b,))
        if r.random() < 0.4:
            options["where"] = torch.rand(capacity, generator=torch.Generator().manual_seed(seed)) < 0.5
        k = r.choice([0, 1, 3, 10, 40])
        got = {name: p.retrieve(dreams, k=k, mode=mode, **options) for name, p in pools.items()}
        pools["deferred"].check()
        a, d = got["immediate"], got["deferred"]
        assert_same_results(a.ids, a.scores, d.ids, d.scores, where=f"{mode} k={k} {sorted(options)}")
        same_ids &= torch.equal(a.ids, d.ids)
    usage = [p.bank.columns["usage"] for p in pools.values()]
    assert int(usage[0].sum()) == int(usage[1].sum())
    if same_ids:  # (entries swapped within a tie are counted on either side)
        assert torch.equal(usage[0], usage[1])


def test_guard_refuses_a_bad_allowance():
    for allowed in (-1, 1.5, "1", None):
        with pytest.raises(InvalidInputError, match="allowed"):
            with forbid_host_sync(allowed=allowed):
                pass
