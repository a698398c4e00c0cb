"""ShardedDreamPool's replay calls against one DreamPool holding the union (gloo on localhost).

``retrieve`` with ``where=`` and ``chroma_metric``, ``stats()`` as ``PoolStats``, ``sample``,
``len``, ``diversity``, ``to``, a data-parallel ``fit_encoder``, refusals that name the
argument, and a collective that one rank enters alone. As in
test_distributed.py, each world size runs once as spawned processes and every rank
replays every rank's calls on its own reference pool.
"""

from __future__ import annotations

import datetime
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _equality import assert_same_results
from test_distributed import PER_SHARD, TIMEOUT, _config, _data, _free_port, _queries, _single_ids

from dreampool_gpu import DreamPool, PoolStats, ShardedDreamPool
from dreampool_gpu.errors import CollectiveError, InvalidConfigurationError, InvalidInputError


def _coherent(m: dict[str, torch.Tensor]) -> torch.Tensor:
    return m["coherence"] > 0.95


def _coherent_listed(m: dict[str, torch.Tensor]) -> torch.Tensor:
    """The same filter through a comprehension: nested code whose fingerprint must match across ranks."""
    return torch.stack([m[name] > 0.95 for name in ("coherence",)]).all(0)


MODES = [
    ("similar", {"k": 5, "where": _coherent}),
    ("similar", {"k": 5, "chroma_metric": "euclidean"}),
    ("class", {"k": 4, "class_hint": "hint", "where": _coherent, "chroma_metric": "euclidean"}),
    ("balanced", {"k": 3, "classes": [1, 3, 5], "where": _coherent}),
    ("utility", {"k": 4, "utility_threshold": 0.3, "chroma_metric": "euclidean"}),
    ("diverse", {"k": 5, "mmr_lambda": 0.5, "where": _coherent}),
    ("diverse", {"k": 4, "chroma_metric": "euclidean", "where": _coherent}),
    ("soft", {"k": 5, "class_hint": "hint", "where": _coherent}),
    ("hybrid", {"k": 5, "fetch_k": 12, "class_hint": "hint", "where": _coherent}),
    ("category", {"k": 4, "category": "category", "where": _coherent}),
    ("nearest", {"k": 6, "where": _coherent}),
    ("nearest", {"k": 3, "where": _coherent_listed}),
]


def _worker(rank: int, world: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=TIMEOUT)
    torch.set_num_threads(1)
    try:
        _checks(rank, world)
    finally:
        dist.destroy_process_group()


def _checks(rank: int, world: int) -> None:
    pool = ShardedDreamPool(_config(PER_SHARD))
    single = DreamPool(_config(PER_SHARD * world))
    for source in range(world):
        d = _data(source)
        single.add(d["dreams"], coherence=d["coherence"], class_label=d["labels"])
        if source == rank:
            pool.add(d["dreams"], coherence=d["coherence"], class_label=d["labels"])
    assert len(pool) == len(single) and bool(pool)
    counts = [4, 0] if world == 2 else [3, 5, 2]
    _check_retrieve(pool, single, counts, world)
    _check_sample(pool, single, world)
    _check_stats(pool, single, world)
    _check_refusals(pool, counts)
    assert pool.to("cpu") is pool and pool.shard.device.type == "cpu"
    _check_fit(rank, world, counts)
    _check_nothing_passes(pool, counts)
    if world == 2:
        _check_timeout(rank)


def _check_retrieve(pool: ShardedDreamPool, single: DreamPool, counts: list[int], world: int) -> None:
    rank = pool.rank
    pool.refit_statistics()  # the shards' feature statistics over the union; the reference takes the same
    single.encoder.load_state_dict(pool.shard.encoder.state_dict())
    single.reembed()
    assert 0 < int(_coherent(single.metadata(torch.arange(len(single)))).sum()) < len(single)  # the filter bites
    for mode, spec in MODES:
        answers = []
        for source in range(world):  # the reference replays every rank's query (usage counts too)
            q = _queries(source, counts)
            kwargs = dict(spec)
            if kwargs.get("class_hint") == "hint":
                kwargs["class_hint"] = torch.arange(counts[source]) % 10
            if kwargs.get("category") == "category":
                kwargs["category"] = int(single.bank.columns["hue_category"][: len(single)].mode().values)
            answers.append((q, kwargs, single.retrieve(q, mode=mode, **kwargs)))
        q, kwargs, expected = answers[rank]
        got = pool.retrieve(q, mode=mode, **kwargs)
        where = f"rank {rank} mode {mode} {spec}"
        assert_same_results(_single_ids(got.ids, world), got.scores, expected.ids, expected.scores, where=where)
        if "where" in kwargs and got.ids.numel():  # every result passes the filter
            found = got.ids[got.ids >= 0]
            assert bool((pool.metadata(found)["coherence"] > 0.95).all()), where
        else:
            pool.metadata(torch.empty(0, dtype=torch.int64))  # the same collectives on every rank
    # diversity of a result set, from the owners' chroma
    ids = pool.retrieve(_queries(rank, counts), k=5, mode="similar").ids
    got, expected = pool.diversity(ids), single.diversity(_single_ids(ids, world))
    for name in ("mean", "min", "max"):
        assert torch.allclose(got[name], expected[name], atol=1e-6, equal_nan=True), name


def _check_sample(pool: ShardedDreamPool, single: DreamPool, world: int) -> None:
    """The same generator state draws the same entries as one pool holding the union in id order."""
    rank = pool.rank
    for n, where in ((7 + rank, None), (3 * rank, _coherent), (10_000, None)):
        got = pool.sample(n, where=where, generator=torch.Generator().manual_seed(11 + rank))
        expected = single.sample(n, where=where, generator=torch.Generator().manual_seed(11 + rank))
        assert torch.equal(_single_ids(got, world), expected), (n, rank)
    if rank == 0:  # a mask names one pool's slots: refused on every rank
        with pytest.raises(InvalidInputError, match="where"):
            pool.sample(3, where=torch.ones(pool.shard.capacity, dtype=torch.bool))
    else:
        with pytest.raises(InvalidInputError, match="where"):
            pool.sample(3)
    # draws are uniform over every live entry, whichever shard holds it
    g = torch.Generator().manual_seed(rank)
    draws = torch.cat([pool.sample(100, generator=g) for _ in range(40)])  # at most min(n, size) per call
    owners = torch.bincount(draws >> 40, minlength=world).double() / draws.numel()
    sizes = torch.tensor([40 + 7 * r for r in range(world)], dtype=torch.float64)
    assert torch.allclose(owners, sizes / sizes.sum(), atol=0.05), owners


def _check_stats(pool: ShardedDreamPool, single: DreamPool, world: int) -> None:
    stats, expected = pool.stats(), single.stats()
    assert isinstance(stats, PoolStats)
    assert stats.size == expected.size == len(single) and stats["world_size"] == world
    assert stats.counters["added"] == expected.counters["added"] and stats["added"] == expected["added"]
    assert stats["shards"][pool.rank]["size"] == len(pool.shard)
    assert [s.size for s in stats.shards] == [40 + 7 * r for r in range(world)]
    assert stats.capacity == pool.total_capacity
    for name in ("mean_coherence", "mean_energy", "mean_violation", "acceptance_rate"):
        assert math.isclose(getattr(stats, name), getattr(expected, name), rel_tol=1e-5, abs_tol=1e-7), name
    assert stats.to_dict()["bank_bytes"] == sum(s.bank_bytes for s in stats.shards)


def _check_refusals(pool: ShardedDreamPool, counts: list[int]) -> None:
    """Bad or differing arguments raise on every rank, naming the argument; nothing hangs."""
    rank, q = pool.rank, _queries(pool.rank, counts)
    mask = torch.ones(pool.shard.capacity, dtype=torch.bool)
    with pytest.raises(InvalidInputError) as caught:
        pool.retrieve(q, k=3, mode="similar", where=mask if rank == 0 else None)
    assert caught.value.name == "where"
    with pytest.raises(InvalidInputError) as caught:
        pool.retrieve(q, k=3, mode="similar", chroma_metric="euclidean" if rank == 0 else "cosine")
    assert caught.value.name == "chroma_metric"
    with pytest.raises(InvalidInputError) as caught:  # another function on one rank
        pool.retrieve(q, k=3, mode="nearest", where=_coherent if rank == 0 else (lambda m: m["utility"] > 0.5))
    assert caught.value.name == "where"
    with pytest.raises(InvalidInputError) as caught:
        pool.retrieve(q, k=3 + rank, mode="similar")
    assert caught.value.name == "k"
    with pytest.raises(InvalidInputError):  # one rank's bad value: every rank raises
        pool.retrieve(q, k=3, mode="similar", chroma_metric="manhattan" if rank == 0 else "cosine")
    with pytest.raises(InvalidConfigurationError):  # the features encoder is not trainable
        pool.fit_encoder(steps=2)
    out = pool.retrieve(q, k=3, mode="similar")  # the group still works
    assert out.ids.shape == (counts[rank], 3)


def _check_fit(rank: int, world: int, counts: list[int]) -> None:
    """fit_encoder: data-parallel steps leave one encoder on every rank, every shard re-embedded with it."""
    config = _config(PER_SHARD).replace(encoder="learned")
    pool, single = ShardedDreamPool(config), DreamPool(config.replace(capacity=PER_SHARD * world))
    for source in range(world):
        d = _data(source)
        single.add(d["dreams"], coherence=d["coherence"], class_label=d["labels"])
        if source == rank:
            pool.add(d["dreams"], coherence=d["coherence"], class_label=d["labels"])
    before = torch.cat([p.detach().reshape(-1) for p in pool.shard.encoder.parameters()])
    with pytest.raises(InvalidInputError, match="steps"):  # one rank's bad argument: every rank raises
        pool.fit_encoder(steps=0 if rank == 0 else 3, batch_size=16)
    with pytest.raises(InvalidInputError) as caught:  # differing arguments: named, on every rank
        pool.fit_encoder(steps=3, batch_size=16, seed=rank)
    assert caught.value.name == "seed"
    report = pool.fit_encoder(steps=3, batch_size=16, seed=1)
    assert len(report.losses) == 3 and all(math.isfinite(x) for x in report.losses)
    assert report.entries == len(single) and report.labelled == int(
        (single.metadata(torch.arange(len(single)))["class_label"] >= 0).sum()
    )
    after = torch.cat([p.detach().reshape(-1) for p in pool.shard.encoder.parameters()])
    assert not torch.equal(after, before)
    every = [torch.empty_like(after) for _ in range(world)]
    dist.all_gather(every, after)
    assert all(torch.equal(every[0], e) for e in every)  # each rank took the same averaged steps
    losses = [torch.empty(3, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(losses, torch.tensor(report.losses, dtype=torch.float64))
    assert all(torch.equal(losses[0], x) for x in losses)
    single.encoder.load_state_dict(pool.shard.encoder.state_dict())  # the reference adopts the fitted encoder
    single.reembed()
    answers = [single.retrieve(_queries(source, counts), k=5, mode="nearest") for source in range(world)]
    got = pool.retrieve(_queries(rank, counts), k=5, mode="nearest")  # shards re-embedded with the new encoder
    expected = answers[rank]
    assert_same_results(_single_ids(got.ids, world), got.scores, expected.ids, expected.scores, where="fit")


def _check_nothing_passes(pool: ShardedDreamPool, counts: list[int]) -> None:
    """A filter no entry passes, and an empty pool: padded results and empty draws, no hang."""
    q = _queries(pool.rank, counts)
    for mode in ("similar", "balanced", "diverse", "hybrid", "nearest"):
        out = pool.retrieve(q, k=3, mode=mode, classes=[1, 2], where=lambda m: m["coherence"] > 2.0)
        assert bool((out.ids == -1).all()) and bool((out.scores == float("-inf")).all()), mode
    assert pool.sample(5, where=lambda m: m["coherence"] > 2.0).numel() == 0
    empty = ShardedDreamPool(_config(10))
    assert len(empty) == 0 and empty.sample(3).numel() == 0
    assert bool((empty.retrieve(q, k=2, mode="diverse").ids == -1).all())
    stats = empty.stats()
    assert stats.size == 0 and stats.mean_coherence == 0.0 and stats.acceptance_rate == 0.0


def _check_timeout(rank: int) -> None:
    """A collective entered by one rank alone raises CollectiveError after the pool's timeout."""
    group = dist.new_group([0, 1])  # the group's own timeout (60 s) is longer: the pool's 5 s applies
    with pytest.raises(InvalidInputError, match="timeout"):  # a bad timeout on one rank: every rank raises
        ShardedDreamPool(_config(10), group=group, timeout=-1.0 if rank == 1 else 2.0)
    dist.barrier()  # both ranks enter the constructor's collectives well within 5 s
    quick = ShardedDreamPool(_config(10), group=group, timeout=datetime.timedelta(seconds=5))
    assert quick.timeout == 5.0
    if rank == 0:
        with pytest.raises(CollectiveError, match="waited up to 5 s"):
            quick.retrieve(torch.rand(2, 3), k=2)
    dist.barrier()


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_replay_calls_equal_single_pool(world: int) -> None:
    mp.spawn(_worker, args=(world, _free_port()), nprocs=world, join=True)


def test_sharded_pool_is_exported() -> None:
    import dreampool_gpu
    from dreampool_gpu import distributed

    assert dreampool_gpu.ShardedDreamPool is distributed.ShardedDreamPool
    assert "ShardedDreamPool" in dreampool_gpu.__all__
