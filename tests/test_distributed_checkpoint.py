"""Sharded checkpoints as safe as single ones, and ranks that agree before anything can diverge.

Ranks are spawned processes on gloo over 127.0.0.1 with short collective timeouts; every
spawn is bounded (a rank that hangs fails the test). Manifest and shard tampering is
checked in this process on checkpoints written once by a 3-rank run.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dreampool_gpu import DreamPool, PoolConfig, distributed, persist
from dreampool_gpu.distributed import TAG_BITS, ShardedDreamPool, shards
from dreampool_gpu.errors import (
    CheckpointCorruptError,
    CollectiveError,
    InvalidConfigurationError,
    InvalidInputError,
)

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is needed", allow_module_level=True)

SHAPE = (8, 8, 2)
TIMEOUT = datetime.timedelta(seconds=30)  # any collective that waits longer fails
SPAWN_LIMIT = 240.0  # seconds a whole spawned run may take


def _config() -> PoolConfig:
    return PoolConfig(dream_shape=SHAPE, device="cpu", capacity=64, embedding_dim=16, engine="torch")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dreams(seed: int, n: int) -> torch.Tensor:
    return torch.rand(n, *SHAPE, 3, generator=torch.Generator().manual_seed(seed))


def _init(rank: int, world: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=TIMEOUT)
    torch.set_num_threads(1)


def _run(rank: int, world: int, port: int, body: Callable[..., None], *args: Any) -> None:
    _init(rank, world, port)
    try:
        body(rank, world, *args)
    finally:
        dist.destroy_process_group()


def _spawn(body: Callable[..., None], world: int, *args: Any) -> None:
    """Run ``body(rank, world, *args)`` on ``world`` gloo ranks; fail after SPAWN_LIMIT seconds."""
    ctx = mp.start_processes(_run, args=(world, _free_port(), body, *args), nprocs=world, join=False)
    deadline = time.monotonic() + SPAWN_LIMIT
    while not ctx.join(timeout=5):  # raises when a rank fails (and ends the others)
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"ranks still running after {SPAWN_LIMIT} s")


def _entries(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, dreams) of every entry of the checkpoint at ``path``, in id order."""
    pool = DreamPool.load(path)
    live = pool.bank.columns["ids"][: pool.bank.extent]
    order = live[live >= 0].argsort()
    slots = torch.nonzero(live >= 0).squeeze(1)[order]
    return pool.bank.columns["ids"][slots], pool.bank.columns["dreams"][slots].float()


def _generations(path: Path) -> list[str]:
    return sorted(p.name for p in path.glob("gen-*"))


# ------------------------------------------------ a seeded restart and a failed save
def _seeded_restart(rank: int, world: int, tmp: str) -> None:
    path = Path(tmp) / "ckpt"
    torch.manual_seed(0)
    first = ShardedDreamPool(_config())
    first.add(_dreams(10 + rank, 20), coherence=torch.ones(20))
    rng = torch.get_rng_state()
    first.save(path)
    assert torch.equal(torch.get_rng_state(), rng)  # a save leaves the global RNG alone
    committed = (path / "manifest.json").read_bytes()
    generations = _generations(path)
    assert len(generations) == 1

    # the job restarts with the same seed and saves other entries; rank 1's write fails
    torch.manual_seed(0)
    second = ShardedDreamPool(_config())
    second.add(_dreams(20 + rank, 20), coherence=torch.ones(20))
    original = persist.write_checkpoint
    if rank == 1:

        def full(snap: Any, target: Any) -> Any:
            raise OSError(28, "No space left on device (test)")

        persist.write_checkpoint = full
    try:
        with pytest.raises(OSError, match="No space left"):
            second.save(path)
    finally:
        persist.write_checkpoint = original
    dist.barrier()
    assert (path / "manifest.json").read_bytes() == committed
    assert _generations(path) == generations  # the failed generation is gone, the committed one untouched
    ids, dreams = _entries(path)
    assert ids.numel() == 40  # exactly the committed entries
    expected_ids = torch.cat([(r << TAG_BITS) + torch.arange(20) for r in range(world)])
    assert torch.equal(ids, expected_ids)
    assert torch.equal(dreams, torch.cat([_dreams(10 + r, 20) for r in range(world)]))
    again = ShardedDreamPool.load(path)
    assert len(again.shard) == 20
    assert torch.equal(again.shard.dreams(torch.tensor([rank << TAG_BITS])), _dreams(10 + rank, 20)[:1])

    # saves after the same seed never reuse a generation; each commit removes the previous one
    seen = set(generations)
    for _ in range(2):
        torch.manual_seed(0)
        second.save(path)
        dist.barrier()  # rank 0 removes the previous generation after the commit
        now = _generations(path)
        assert len(now) == 1 and now[0] not in seen
        seen.add(now[0])
    ids, dreams = _entries(path)
    assert torch.equal(dreams, torch.cat([_dreams(20 + r, 20) for r in range(world)]))


def test_seeded_restart_then_failed_save_keeps_the_committed_checkpoint(tmp_path: Path) -> None:
    _spawn(_seeded_restart, 2, str(tmp_path))


# ---------------------------------------------------------------- a rank killed mid-save
def _killed_rank(rank: int, world: int, port: int, tmp: str) -> None:
    """Rank 1 is SIGKILLed while it writes its shard of the second save."""
    _init(rank, world, port)
    path = Path(tmp) / "ckpt"
    pool = ShardedDreamPool(_config())
    pool.add(_dreams(10 + rank, 20), coherence=torch.ones(20))
    pool.save(path)
    pool.add(_dreams(30 + rank, 5), coherence=torch.ones(5))
    if rank == 1:
        original = persist.write_checkpoint

        def killed(snap: Any, target: Any) -> Any:
            original(snap, target)  # the shard is complete; the manifest never names it
            os.kill(os.getpid(), signal.SIGKILL)

        persist.write_checkpoint = killed
    try:
        pool.save(path)
    except CollectiveError:
        (Path(tmp) / f"rank{rank}-collective-error").touch()
    os._exit(0)  # no teardown: the group lost a rank


def test_rank_killed_during_save_leaves_the_committed_checkpoint(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_killed_rank, args=(r, 2, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(SPAWN_LIMIT)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, -signal.SIGKILL]
    assert (tmp_path / "rank0-collective-error").exists()  # rank 0 learned of it, bounded by the timeout
    ids, dreams = _entries(tmp_path / "ckpt")
    assert ids.numel() == 40
    assert torch.equal(dreams, torch.cat([_dreams(10 + r, 20) for r in range(2)]))
    assert len(_generations(tmp_path / "ckpt")) == 1  # rank 0 removed the uncommitted generation


# ------------------------------------------------------- one bad rank, same error everywhere
def _expect(error: type[BaseException], call: Callable[[], Any], pool: ShardedDreamPool, size: int) -> None:
    """``call`` raises ``error`` on this rank, and the group still works afterwards."""
    with pytest.raises(error):
        call()
    assert pool.stats()["size"] == size  # the next collective works and nothing changed


def _agreement(rank: int, world: int, tmp: str) -> None:
    root = Path(tmp)
    pool = ShardedDreamPool(_config())
    pool.add(_dreams(10 + rank, 20), coherence=torch.ones(20))
    size = 20 * world
    batch = _dreams(40 + rank, 2)

    bogus = "bogus" if rank == 1 else "least_full"
    _expect(InvalidInputError, lambda: pool.add(batch, coherence=torch.ones(2), route=bogus), pool, size)
    _expect(InvalidInputError, lambda: pool.add(batch, coherence=torch.ones(2), route=None), pool, size)
    force: Any = "yes" if rank == 0 else False
    _expect(
        InvalidInputError, lambda: pool.add(batch, coherence=torch.ones(2), route="least_full", force=force), pool, size
    )
    flag = rank == 0
    _expect(
        InvalidInputError, lambda: pool.add(batch, coherence=torch.ones(2), route="least_full", force=flag), pool, size
    )
    _expect(InvalidInputError, lambda: pool.refit_statistics(fitted_on=-1 if rank else None), pool, size)
    _expect(InvalidInputError, lambda: pool.refit_statistics(fitted_on=10 + rank), pool, size)

    # save: a different path on one rank, or no path, is refused everywhere and writes nothing
    _expect(InvalidInputError, lambda: pool.save(root / f"rank-{rank}"), pool, size)
    assert not any((root / f"rank-{r}").exists() for r in range(world))
    _expect(InvalidInputError, lambda: pool.save(root / "ckpt" if rank == 0 else 7), pool, size)
    assert not (root / "ckpt").exists()
    pool.save(root / "ckpt")
    pool.add(_dreams(50 + rank, 1), coherence=torch.ones(1))
    size += world
    other = root / "other"
    pool.save(other)

    # load: paths, devices, a config, a state dict that one rank gets wrong
    _expect(InvalidInputError, lambda: ShardedDreamPool.load(root / ("ckpt" if rank else "other")), pool, size)
    _expect(
        InvalidConfigurationError, lambda: ShardedDreamPool.load(root / "ckpt", device=None if rank else 3), pool, size
    )
    _expect(InvalidConfigurationError, lambda: ShardedDreamPool(_config() if rank else "config"), pool, size)
    state = pool.state_dict()
    if rank == 1:
        state = {**state, "watermarks": {"0": 5}}  # rank 0's tag on rank 1
    _expect(InvalidInputError, lambda: pool.load_state_dict(state), pool, size)
    if rank == 1:
        state = {**pool.state_dict(), "watermarks": {"1": (1 << TAG_BITS) + 3}}  # below this shard's ids
    _expect(InvalidInputError, lambda: pool.load_state_dict(state), pool, size)

    # a routed add still works, and the checkpoint saved above loads on every rank
    new = pool.add(batch, coherence=torch.ones(2), route="least_full")
    assert int((new >= 0).sum()) == 2
    loaded = ShardedDreamPool.load(root / "ckpt")
    assert loaded.stats()["size"] == 20 * world

    # a shard of another save, or of another rank, is refused on every rank
    dist.barrier()
    if rank == 0:
        gen = _generations(root / "ckpt")[0]
        shutil.rmtree(root / "ckpt" / gen / "shard-00001")
        shutil.copytree(next((other).glob("gen-*")) / "shard-00001", root / "ckpt" / gen / "shard-00001")
    dist.barrier()
    _expect(CheckpointCorruptError, lambda: ShardedDreamPool.load(root / "ckpt"), pool, size + 2 * world)


def test_one_bad_rank_gives_the_same_error_everywhere_and_the_group_goes_on(tmp_path: Path) -> None:
    _spawn(_agreement, 2, str(tmp_path))


# ---------------------------------------------------------------- manifest and shard checks
def _write_fixture(rank: int, world: int, tmp: str) -> None:
    """Two checkpoints of 3 ranks: ``a`` with 33 entries per shard (99), ``b`` with 5 more each."""
    pool = ShardedDreamPool(_config())
    pool.add(_dreams(10 + rank, 33), coherence=torch.ones(33))
    pool.save(Path(tmp) / "a")
    pool.add(_dreams(60 + rank, 5), coherence=torch.ones(5))
    pool.save(Path(tmp) / "b")


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sharded")
    _spawn(_write_fixture, 3, str(root))
    return root


@pytest.fixture
def ckpt(saved: Path, tmp_path: Path) -> Path:
    """A fresh copy of checkpoint ``a``."""
    return Path(shutil.copytree(saved / "a", tmp_path / "a"))


def _resign(root: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    """Rewrite ``root``'s manifest through ``change`` and sign it again (a consistent digest)."""
    manifest = json.loads((root / "manifest.json").read_text())
    body = {k: val for k, val in manifest.items() if k != "digest"}
    change(body)
    body["digest"] = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    (root / "manifest.json").write_text(json.dumps(body))


def _refused(root: Path, file: Path) -> CheckpointCorruptError:
    """Loading ``root`` raises CheckpointCorruptError naming ``file``, merged and as shards."""
    with pytest.raises(CheckpointCorruptError) as caught:
        DreamPool.load(root)
    assert Path(caught.value.path) == file, caught.value
    return caught.value


def _shard(root: Path, rank: int) -> Path:
    return next(root.glob("gen-*")) / f"shard-{rank:05d}"


def test_checkpoint_fixture_loads(saved: Path) -> None:
    ids, _ = _entries(saved / "a")
    assert ids.numel() == 99 and ids.unique().numel() == 99
    assert _entries(saved / "b")[0].numel() == 114


def test_world_size_must_equal_the_shard_count(ckpt: Path) -> None:
    _resign(ckpt, lambda m: m.update(world_size=2))  # 3 shards listed
    assert "3 shards" in _refused(ckpt, ckpt / "manifest.json").reason


def test_a_shard_listed_twice_is_refused(ckpt: Path) -> None:
    _resign(ckpt, lambda m: m["shards"].__setitem__(1, dict(m["shards"][0])))
    _refused(ckpt, ckpt / "manifest.json")


@pytest.mark.parametrize("where", ["absolute", "parent"])
def test_shard_paths_stay_inside_the_checkpoint(ckpt: Path, tmp_path: Path, where: str) -> None:
    outside = tmp_path / "outside" / "shard-00001"
    shutil.copytree(_shard(ckpt, 1), outside)
    path = str(outside) if where == "absolute" else "../outside/shard-00001"
    _resign(ckpt, lambda m: m["shards"][1].update(path=path))
    _refused(ckpt, ckpt / "manifest.json")


def test_a_shard_linked_from_outside_is_refused(ckpt: Path, tmp_path: Path) -> None:
    outside = Path(shutil.copytree(_shard(ckpt, 1), tmp_path / "outside"))
    shutil.rmtree(_shard(ckpt, 1))
    _shard(ckpt, 1).symlink_to(outside, target_is_directory=True)
    _refused(ckpt, _shard(ckpt, 1))


def test_a_watermark_below_its_tags_ids_is_refused(ckpt: Path) -> None:
    _resign(ckpt, lambda m: m["shards"][1]["watermarks"].update({"1": (1 << TAG_BITS) + 5}))
    assert "issue it again" in _refused(ckpt, ckpt / "manifest.json").reason


def test_a_shard_of_another_save_is_refused(ckpt: Path, saved: Path) -> None:
    shutil.rmtree(_shard(ckpt, 1))
    shutil.copytree(_shard(saved / "b", 1), _shard(ckpt, 1))
    _refused(ckpt, _shard(ckpt, 1) / "manifest.json")
    manifest = distributed.read_manifest(ckpt)  # ShardedDreamPool.load's own path, rank 1 of 3
    with pytest.raises(CheckpointCorruptError):
        shards.open_rank(ckpt, manifest, 1, 3, None, DreamPool)


def test_swapped_shards_are_refused_even_with_a_resigned_manifest(ckpt: Path) -> None:
    zero, one = _shard(ckpt, 0), _shard(ckpt, 1)
    zero.rename(zero.with_name("swap"))
    one.rename(zero)
    zero.with_name("swap").rename(one)
    _refused(ckpt, zero / "manifest.json")  # its sha256 is rank 1's

    def swap_digests(m: dict[str, Any]) -> None:
        a, b = m["shards"][0], m["shards"][1]
        a["shard_digest"], b["shard_digest"] = b["shard_digest"], a["shard_digest"]

    _resign(ckpt, swap_digests)
    assert "tag 1" in _refused(ckpt, ckpt / "manifest.json").reason  # rank 1's ids where rank 0's belong


def test_a_missing_shard_is_refused(ckpt: Path) -> None:
    shutil.rmtree(_shard(ckpt, 2))
    _refused(ckpt, _shard(ckpt, 2) / "manifest.json")


def test_an_altered_manifest_is_refused(ckpt: Path) -> None:
    text = (ckpt / "manifest.json").read_text().replace('"size": 33', '"size": 32', 1)
    (ckpt / "manifest.json").write_text(text)
    assert "digest" in _refused(ckpt, ckpt / "manifest.json").reason


def _delete(key: str) -> Callable[[dict[str, Any]], Any]:
    return lambda m: m["shards"][0].pop(key)


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], Any]:
    return lambda m: m["shards"][0].update({key: value})


MALFORMED: dict[str, Callable[[dict[str, Any]], Any]] = {
    "version as text": lambda m: m.update(version="2"),
    "a newer version": lambda m: m.update(version=3),
    "no tag_bits": lambda m: m.pop("tag_bits"),
    "world_size as text": lambda m: m.update(world_size="3"),
    "world_size True": lambda m: m.update(world_size=True),
    "world_size 0": lambda m: m.update(world_size=0),
    "generation a number": lambda m: m.update(generation=5),
    "generation a path": lambda m: m.update(generation="../x"),
    "shards a mapping": lambda m: m.update(shards={"0": 1}),
    "shards empty": lambda m: m.update(shards=[]),
    "a shard a list": lambda m: m["shards"].__setitem__(0, []),
    "no path": _delete("path"),
    "no watermarks": _delete("watermarks"),
    "no shard_digest": _delete("shard_digest"),
    "rank as text": _set("rank", "0"),
    "rank False": _set("rank", False),
    "rank a float": _set("rank", 0.0),
    "rank of another": _set("rank", 1),
    "another generation": _set("generation", "gen-" + "0" * 32),
    "path a number": _set("path", 3),
    "size as text": _set("size", "33"),
    "size negative": _set("size", -1),
    "size wrong": _set("size", 34),
    "watermarks a list": _set("watermarks", [0]),
    "watermarks empty": _set("watermarks", {}),
    "watermark tag text": _set("watermarks", {"a": 1}),
    "watermark tag padded": _set("watermarks", {"00": 33}),
    "watermark of another tag": _set("watermarks", {"1": 1 << TAG_BITS}),
    "watermark as text": _set("watermarks", {"0": "33"}),
    "watermark past its tag": _set("watermarks", {"0": (1 << TAG_BITS) + 1}),
    "a huge tag": _set("watermarks", {"99999999": 0}),
    "counters a list": _set("counters", [1]),
    "a negative counter": _set("counters", {"added": -1}),
    "counters wrong": _set("counters", {"added": 1}),
    "config a number": _set("config", 5),
    "config with an unknown field": _set("config", {"bogus": 1}),
    "config with a bad value": _set("config", {"capacity": "many"}),
    "dream_dtype unknown": _set("dream_dtype", "int8"),
    "dream_dtype a number": _set("dream_dtype", 16),
    "shard_digest short": _set("shard_digest", "abc"),
    "another shard's config": lambda m: m["shards"][0]["config"].update(embedding_dim=32),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_every_malformed_field_is_a_typed_error_naming_the_manifest(ckpt: Path, case: str) -> None:
    _resign(ckpt, MALFORMED[case])
    _refused(ckpt, ckpt / "manifest.json")
    with pytest.raises(CheckpointCorruptError) as caught:
        distributed.read_manifest(ckpt)
        shards.open_rank(ckpt, distributed.read_manifest(ckpt), 0, 3, None, DreamPool)
    assert Path(caught.value.path) == ckpt / "manifest.json"


def test_a_version_1_manifest_still_loads(ckpt: Path) -> None:
    def to_version_1(m: dict[str, Any]) -> None:
        m["version"] = 1
        for entry in m["shards"]:
            for key in ("rank", "generation", "shard_digest"):
                entry.pop(key)

    _resign(ckpt, to_version_1)
    ids, _ = _entries(ckpt)
    assert ids.numel() == 99 and ids.unique().numel() == 99
