"""ShardedDreamPool on gloo over localhost: equality with one pool holding the union, ids, checkpoints, failures.

Each world size runs once as spawned processes; every check runs inside that one
run (spawning costs seconds). Every rank also builds a single :class:`DreamPool`
holding the union in global id order, and replays every rank's calls on it.
"""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _equality import assert_same_results

from dreampool_gpu import DreamPool, PoolConfig
from dreampool_gpu.distributed import TAG_BITS, ShardedDreamPool, owner_of
from dreampool_gpu.errors import CollectiveError, DreamPoolError, InvalidInputError
from dreampool_gpu.merge import merge_candidates

SHAPE = (8, 8, 2)
PER_SHARD = 120
TIMEOUT = datetime.timedelta(seconds=60)


def _config(capacity: int) -> PoolConfig:
    return PoolConfig(dream_shape=SHAPE, device="cpu", capacity=capacity, embedding_dim=16, engine="torch")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(rank: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s entries: random dreams, a few copied from rank 0's (equal scores across shards)."""
    g = torch.Generator().manual_seed(100 + rank)
    n = 40 + 7 * rank
    dreams = torch.rand(n, *SHAPE, 3, generator=g)
    if rank:
        dreams[:3] = torch.rand(40, *SHAPE, 3, generator=torch.Generator().manual_seed(100))[:3]
    labels = torch.randint(-1, 10, (n,), generator=g)
    return {"dreams": dreams, "labels": labels, "coherence": 0.9 + 0.1 * torch.rand(n, generator=g)}


def _queries(rank: int, counts: list[int]) -> torch.Tensor:
    g = torch.Generator().manual_seed(500 + rank)
    return torch.rand(counts[rank], *SHAPE, 3, generator=g)


def _feedback(rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Global ids (of every shard, some -1) and utilities rank ``rank`` gives feedback to."""
    g = torch.Generator().manual_seed(900 + rank)
    owners = torch.randint(0, world, (12,), generator=g)
    local = torch.randint(0, 40, (12,), generator=g)
    ids = (owners << TAG_BITS) + local
    ids[-1] = -1
    return ids, torch.rand(12, generator=g)


def _single_ids(global_ids: torch.Tensor, world: int) -> torch.Tensor:
    """Ids in the reference pool (union added in global id order) of global ids (-1 stays)."""
    starts = torch.tensor([0] + [sum(40 + 7 * r for r in range(s + 1)) for s in range(world - 1)])
    tag = global_ids.clamp(min=0) >> TAG_BITS
    local = global_ids.clamp(min=0) & ((1 << TAG_BITS) - 1)
    return torch.where(global_ids >= 0, starts[tag] + local, global_ids)


MODES = [
    ("similar", {"k": 5}),
    ("class", {"k": 4, "class_hint": "hint"}),
    ("balanced", {"k": 3, "classes": [1, 3, 5]}),
    ("utility", {"k": 4, "utility_threshold": 0.3}),
    ("diverse", {"k": 5, "mmr_lambda": 0.5}),
    ("diverse", {"k": 6, "min_dispersion": 0.05}),
    ("soft", {"k": 5, "class_hint": "hint", "utility_prior": 0.5}),
    ("hybrid", {"k": 5, "fetch_k": 12, "class_hint": "hint"}),
    ("hybrid", {"k": 4, "category": "category", "with_dreams": True}),
    ("category", {"k": 4, "category": "category"}),
    ("nearest", {"k": 6}),
    ("nearest", {"k": 3, "embeddings": True}),
]


def _check_modes(pool: ShardedDreamPool, single: DreamPool, counts: list[int], world: int) -> None:
    rank = pool.rank
    pool.refit_statistics()  # collective: the shards' feature statistics over the union ...
    single.encoder.load_state_dict(pool.shard.encoder.state_dict())  # ... and the reference takes the same
    single.reembed()
    assert not bool((pool.shard.encoder.mean == 0).all())
    for mode, spec in MODES:
        answers = []
        for source in range(world):  # the reference replays every rank's query (usage counts too)
            q = _queries(source, counts)
            kwargs = dict(spec)
            hint = torch.arange(counts[source]) % 10
            if kwargs.get("class_hint") == "hint":
                kwargs["class_hint"] = hint
            if kwargs.get("category") == "category":  # one category for all: no 1-query group (see docs)
                kwargs["category"] = int(single.bank.columns["hue_category"][: len(single)].mode().values)
            if kwargs.pop("embeddings", False):
                q = torch.randn(counts[source], 16, generator=torch.Generator().manual_seed(source))
            answers.append((q, kwargs, single.retrieve(q, mode=mode, **kwargs)))
        q, kwargs, expected = answers[rank]
        got = pool.retrieve(q, mode=mode, **kwargs)
        where = f"rank {rank} mode {mode} {spec}"
        assert_same_results(_single_ids(got.ids, world), got.scores, expected.ids, expected.scores, where=where)
        if kwargs.get("with_dreams"):
            assert torch.equal(got.dreams, expected.dreams), where


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=TIMEOUT)
    torch.set_num_threads(1)
    try:
        _checks(rank, world, Path(tmp))
    finally:
        dist.destroy_process_group()


def _checks(rank: int, world: int, tmp: Path) -> None:
    pool = ShardedDreamPool(_config(PER_SHARD))
    single = DreamPool(_config(PER_SHARD * world))
    for source in range(world):
        d = _data(source)
        ref = single.add(d["dreams"], coherence=d["coherence"], class_label=d["labels"])
        assert bool((ref >= 0).all())
        if source == rank:
            ids = pool.add(d["dreams"], coherence=d["coherence"], class_label=d["labels"])
            assert torch.equal(ids, (rank << TAG_BITS) + torch.arange(len(ids)))
            assert torch.equal(owner_of(ids, world), torch.full_like(ids, rank))
    counts = [4, 0] if world == 2 else [3, 5, 2]

    # feedback by global id, routed to the owners; the reference gets every rank's in rank order
    ids, utility = _feedback(rank, world)
    recorded = pool.feedback(ids, utility)
    assert recorded == int((ids >= 0).sum())
    for source in range(world):
        f_ids, f_util = _feedback(source, world)
        single.feedback(_single_ids(f_ids, world), f_util)

    _check_modes(pool, single, counts, world)

    # lookups by global id: every rank asks for entries of every shard
    probe = torch.tensor([(s << TAG_BITS) + 2 for s in range(world)] + [-1, (rank << TAG_BITS) + 1])
    meta, expected = pool.metadata(probe), single.metadata(_single_ids(probe, world))
    for name in ("util_mean", "utility", "feedback_count", "usage", "chroma", "class_label", "found"):
        assert torch.equal(meta[name].nan_to_num(-1.0), expected[name].nan_to_num(-1.0)), name
    assert torch.equal(
        pool.dreams(probe[:4].reshape(2, 2)), single.dreams(_single_ids(probe[:4], world)).reshape(2, 2, *SHAPE, 3)
    )
    stats = pool.stats()
    assert stats["size"] == len(single) and stats["world_size"] == world

    # bad input on one rank: every rank raises the same class, no shard changes, no rank hangs
    before = pool.shard.state_dict()
    bad = _queries(rank, counts)
    if rank == world - 1:
        bad = torch.full((2, *SHAPE, 3), float("nan"))
    with pytest.raises(InvalidInputError):
        pool.retrieve(bad, k=3, mode="hybrid")
    with pytest.raises(InvalidInputError):
        pool.feedback(ids, utility * (3.0 if rank == 0 else 1.0))
    with pytest.raises(InvalidInputError):  # an id never issued, owned by the last rank
        pool.feedback(ids if rank else torch.tensor([((world - 1) << TAG_BITS) + 10_000]), 0.5)
    with pytest.raises(InvalidInputError):  # ranks disagree on k
        pool.retrieve(_queries(rank, counts), k=3 + rank, mode="similar")
    after = pool.shard.state_dict()
    for name, column in before["bank"].items():
        assert torch.equal(column.nan_to_num(-1.0), after["bank"][name].nan_to_num(-1.0)), name

    # routed add: every rank's batch goes to the least full shard
    fresh = torch.rand(2, *SHAPE, 3, generator=torch.Generator().manual_seed(77 + rank))
    least = min(range(world), key=lambda r: (40 + 7 * r, r))
    new_ids = pool.add(fresh, coherence=torch.ones(2), route="least_full")
    assert bool((owner_of(new_ids, world) == least).all())
    assert torch.equal(pool.dreams(new_ids), fresh)

    if world == 3:
        _check_checkpoints(pool, rank, tmp)
    else:
        _check_timeout(pool, rank)


def _check_checkpoints(pool: ShardedDreamPool, rank: int, tmp: Path) -> None:
    """Save at 3 ranks; load at 3, at 2 (a subgroup) and at 1 (DreamPool.load); a failed save."""
    path = tmp / "sharded"
    pool.save(path)
    queries = torch.rand(4, *SHAPE, 3, generator=torch.Generator().manual_seed(3))
    expected = pool.retrieve(queries if rank == 0 else queries[:0], k=6, mode="hybrid")

    same = ShardedDreamPool.load(path)
    got = same.retrieve(queries if rank == 0 else queries[:0], k=6, mode="hybrid")
    # the stored state comes back bit for bit; answers as docs/spec.md promises (BLAS may round
    # differently over memory laid out anew, e.g. MKL's SSE4.2 kernels)
    assert_same_results(got.ids, got.scores, expected.ids, expected.scores, where="load at 3")

    pair = dist.new_group([0, 1])
    if rank < 2:
        two = ShardedDreamPool.load(path, group=pair)
        got = two.retrieve(queries if rank == 0 else queries[:0], k=6, mode="hybrid")
        if rank == 0:
            assert_same_results(got.ids, got.scores, expected.ids, expected.scores, where="load at 2")
        new = two.add(queries[:1], coherence=torch.ones(1))  # issues ids no other entry has
        assert int(owner_of(new, 2)) == rank
    if rank == 0:
        merged = DreamPool.load(path)
        got = merged.retrieve(queries, k=6, mode="hybrid")
        assert_same_results(got.ids, got.scores, expected.ids, expected.scores, where="load at 1")
    dist.barrier()

    # a rank failing during save: every rank raises, the previous checkpoint stays loadable
    original = __import__("dreampool_gpu.persist", fromlist=["write_checkpoint"]).write_checkpoint
    if rank == 1:

        def broken(snap, target):  # noqa: ANN001, ANN202 - test double
            raise OSError("disk full (test)")

        __import__("dreampool_gpu.persist", fromlist=["x"]).write_checkpoint = broken
    pool.add(queries[:2], coherence=torch.ones(2))
    with pytest.raises(OSError):
        pool.save(path)
    __import__("dreampool_gpu.persist", fromlist=["x"]).write_checkpoint = original
    again = ShardedDreamPool.load(path)
    got = again.retrieve(queries if rank == 0 else queries[:0], k=6, mode="hybrid")
    assert_same_results(got.ids, got.scores, expected.ids, expected.scores, where="after a failed save")


def _check_timeout(pool: ShardedDreamPool, rank: int) -> None:
    """A rank that never joins a collective: the other raises CollectiveError naming itself."""
    short = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=3))
    quick = ShardedDreamPool(_config(10), group=short)
    if rank == 0:
        with pytest.raises(CollectiveError, match="rank 0"):
            quick.retrieve(torch.rand(2, 3), k=2)
    dist.barrier()


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_pool_equals_single_pool(world: int, tmp_path: Path) -> None:
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)


def test_merge_orders_equal_scores_oldest_first() -> None:
    scores = torch.tensor([[[0.9, 0.5, float("-inf")], [0.9, 0.7, 0.5]]])
    ids = torch.tensor([[[7, 3, -1], [2, 9, 1]]])
    s, i, pos = merge_candidates(scores, ids, 6)
    assert i.tolist() == [[2, 7, 9, 1, 3, -1]]
    assert s[0, :5].tolist() == pytest.approx([0.9, 0.9, 0.7, 0.5, 0.5])
    assert pos.tolist() == [[3, 0, 4, 5, 1, -1]]


def test_sharded_pool_needs_an_initialised_group() -> None:
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    with pytest.raises(DreamPoolError):
        ShardedDreamPool(_config(10))


def test_ddp_example_runs_with_three_ranks(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, str(root / "docs/examples/ddp_training_loop.py"), str(tmp_path / "ckpt")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "3 ranks, 288 entries" in done.stdout
    assert "checkpoint holds 288 entries" in done.stdout
    assert len(DreamPool.load(tmp_path / "ckpt")) == 288
