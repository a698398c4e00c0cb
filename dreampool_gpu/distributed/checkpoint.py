"""A sharded pool's checkpoints: save (one generation per save, committed by the manifest),
load at the saved world size or another, the per-rank state dict, and the whole
checkpoint merged into one :class:`DreamPool` (:func:`load_merged`)."""

from __future__ import annotations

import errno
import os
import struct
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from dreampool_gpu import checkpointing, persist
from dreampool_gpu.config import PoolConfig
from dreampool_gpu.devices import resolve_device
from dreampool_gpu.distributed.collectives import Collectives, local
from dreampool_gpu.distributed.ids import TAG_BITS, _ids_problem, _state_watermarks
from dreampool_gpu.distributed.manifest import (
    _MANIFEST,
    _as_root,
    _check_target,
    _commit_manifest,
    _Manifest,
    _manifest_bytes,
    _parse_manifest,
    _remove_generations,
    _target_fields,
    read_manifest,
)
from dreampool_gpu.errors import CheckpointCorruptError, DreamPoolError, InvalidInputError
from dreampool_gpu.pool import DreamPool

if TYPE_CHECKING:
    from dreampool_gpu.distributed.pool import ShardedDreamPool


def save(sp: ShardedDreamPool, path: persist.PathArg) -> None:
    """:meth:`ShardedDreamPool.save` on ``sp``."""

    def check() -> tuple[Path, list[int]]:
        root = _check_target(path)
        return root, _target_fields(root, _manifest_bytes(root))

    found, error = local(check)
    hi, lo = struct.unpack("<qq", uuid.uuid4().bytes)  # every rank draws; rank 0's is used
    table = sp._net.agree([*(found[1] if found is not None else [0, 0]), hi, lo], error)
    _same_target(table)
    root = cast("tuple[Path, list[int]]", found)[0]  # checked: agree raised otherwise
    generation = "gen-" + struct.pack("<qq", int(table[0, 2]), int(table[0, 3])).hex()
    committed = False
    try:
        entry, error = local(lambda: _write_shard(sp, root, generation))
        sp._net.agree([], error)
        entries = sp._net.all_gather_objects(entry)
        error = None
        if sp.rank == 0:
            _, error = local(lambda: _commit_manifest(root, generation, entries))
        sp._net.agree([], error)
        committed = True
    finally:
        if sp.rank == 0:
            _remove_generations(root, generation, keep_new=committed)


def _write_shard(sp: ShardedDreamPool, root: Path, generation: str) -> dict[str, Any]:
    """Write this rank's shard into ``root/generation``; its manifest entry."""
    relative = f"{generation}/shard-{sp.rank:05d}"
    target = root / relative
    if os.path.lexists(target):  # a generation is written once: never over another save's shard
        raise FileExistsError(errno.EEXIST, "a shard of this generation already exists", str(target))
    with persist.WRITE_LOCK:
        with sp.shard._lock:
            snap = checkpointing.snapshot(sp.shard)
            marks = {**sp._watermarks, sp._issuing: sp.shard.bank.next_id}
        persist.write_checkpoint(snap, target)
    return {
        "rank": sp.rank,
        "generation": generation,
        "path": relative,
        "shard_digest": persist.manifest_digest(target),
        "size": snap.size,
        "watermarks": {str(t): m for t, m in sorted(marks.items())},
        "counters": snap.counters,
        "config": snap.config.to_dict(),
        "dream_dtype": str(snap.columns["dreams"].dtype).removeprefix("torch."),
    }


def _same_target(table: torch.Tensor) -> None:
    """Refuse, on every rank, a save or load whose path or manifest differs between ranks."""
    if bool((table[:, 0] != table[0, 0]).any()):
        paths = len(set(table[:, 0].tolist()))
        raise InvalidInputError("path", "the same path on every rank", f"{paths} different paths")
    if bool((table[:, 1] != table[0, 1]).any()):
        raise InvalidInputError(
            "path",
            "the same checkpoint on every rank (a filesystem every rank sees)",
            "ranks that find different manifests (or none) at the path",
        )


def state_dict(sp: ShardedDreamPool) -> dict[str, Any]:
    """:meth:`ShardedDreamPool.state_dict` on ``sp``."""
    with sp.shard._lock:
        marks = {**sp._watermarks, sp._issuing: sp.shard.bank.next_id}
    return {
        "format": "dreampool-shard",
        "rank": sp.rank,
        "world_size": sp.world_size,
        "watermarks": {str(t): m for t, m in marks.items()},
        "shard": sp.shard.state_dict(),
    }


def load_state_dict(sp: ShardedDreamPool, state_dict: dict[str, Any]) -> None:
    """:meth:`ShardedDreamPool.load_state_dict` on ``sp``."""
    shard = sp.shard

    def apply() -> tuple[Any, dict[int, int]]:
        if not isinstance(state_dict, dict) or state_dict.get("format") != "dreampool-shard":
            raise InvalidInputError("state_dict", "a ShardedDreamPool.state_dict()", type(state_dict).__name__)
        where = (state_dict.get("rank"), state_dict.get("world_size"))
        if where != (sp.rank, sp.world_size):
            raise InvalidInputError(
                "state_dict",
                f"the state of rank {sp.rank} of {sp.world_size}",
                f"rank {repr(where[0])[:40]} of {repr(where[1])[:40]}",
            )
        marks = _state_watermarks(state_dict.get("watermarks"), sp.rank, sp.world_size)
        inner = state_dict.get("shard")
        if not isinstance(inner, dict):
            raise InvalidInputError("state_dict['shard']", "a DreamPool.state_dict()", type(inner).__name__)
        with shard._lock:
            backup = checkpointing.snapshot(shard)
            shard.load_state_dict(inner)
            problem = _ids_problem(shard.bank.columns["ids"], shard.bank.next_id, marks)
            if problem is not None:
                checkpointing.restore(shard, backup)
                raise InvalidInputError("state_dict['watermarks']", "watermarks that fit the shard", problem)
        return backup, marks

    done, error = local(apply)
    try:
        sp._net.agree([], error)
    except DreamPoolError:
        if done is not None:
            with shard._lock:
                checkpointing.restore(shard, done[0])
        raise
    sp._watermarks = done[1]
    sp._issuing = max(sp._watermarks, key=lambda t: sp._watermarks[t])


def open_shard(
    net: Collectives, path: persist.PathArg, device: str | torch.device | None, timeout: Any
) -> tuple[tuple[DreamPool, dict[int, int]] | None, BaseException | None]:
    """The first half of :meth:`ShardedDreamPool.load` (collective): agree on ``path`` and its
    manifest, then read this rank's shard. Returns ``((shard, watermarks), None)``, or
    ``(None, error)`` for :meth:`ShardedDreamPool._attach` to raise on every rank."""

    def check() -> tuple[Path, _Manifest, list[int]]:
        net.set_timeout(timeout)
        root = _as_root(path)
        data = _manifest_bytes(root)
        if data is None:
            raise CheckpointCorruptError(root / _MANIFEST, "missing")
        return root, _parse_manifest(root / _MANIFEST, data), _target_fields(root, data)

    found, error = local(check)
    _same_target(net.agree(found[2] if found is not None else [0, 0], error))
    root, manifest, _ = cast("tuple[Path, _Manifest, list[int]]", found)  # agreed: checked everywhere
    return local(lambda: _open_rank(root, manifest, net.rank, net.world_size, device))


def _read_shard(root: Path, manifest: _Manifest, rank: int) -> persist.PoolSnapshot:
    """Read shard ``rank`` of ``manifest`` and check it is the shard the manifest lists.

    Its own manifest's sha256 is the one listed (version 2: a shard of another save or
    another rank is refused, before and after reading), and its entries, counters and
    configuration agree with the listing.

    Raises:
        CheckpointCorruptError: naming the shard's file, or the sharded manifest where
            the listing disagrees with the shard.
    """
    entry = manifest.shards[rank]
    where = root / entry.path
    if not where.resolve().is_relative_to(root.resolve()):
        raise CheckpointCorruptError(where, f"leads outside the checkpoint {root} (a link)")
    found = persist.manifest_digest(where) if entry.digest is not None else None
    if entry.digest is not None and found != entry.digest:
        raise CheckpointCorruptError(
            where / persist.MANIFEST,
            "missing"
            if found is None
            else f"not shard {rank} of generation {manifest.generation}: its manifest's sha256 is {found}, "
            f"the sharded manifest lists {entry.digest} (a shard of another save or another rank)",
        )
    snap = persist.read_checkpoint(where)
    if snap.origin != where or (entry.digest is not None and persist.manifest_digest(where) != entry.digest):
        raise CheckpointCorruptError(where / persist.MANIFEST, f"replaced while it was read (read {snap.origin})")
    problem = _ids_problem(snap.columns["ids"], snap.next_id, entry.watermarks)
    if problem is None and snap.size != entry.size:
        problem = f"{snap.size} entries, where the listing says {entry.size}"
    if problem is None and snap.counters != entry.counters:
        problem = "other counters than the listing's"
    if problem is None and snap.config.to_dict() != entry.config.to_dict():
        problem = "another configuration than the listing's"
    if problem is None and str(snap.columns["dreams"].dtype).removeprefix("torch.") != entry.dream_dtype:
        problem = f"dreams of dtype {snap.columns['dreams'].dtype}, where the listing says {entry.dream_dtype}"
    if problem is not None:
        raise CheckpointCorruptError(manifest.path, f"shard {rank} ({entry.path}) holds {problem}")
    return snap


def _open_rank(root: Path, manifest: _Manifest, rank: int, world: int, device: Any) -> tuple[DreamPool, dict[int, int]]:
    """This rank's shard of the checkpoint at ``root`` for ``world`` ranks, and its tag watermarks."""
    if manifest.world_size == world:  # same layout: the rank's own shard, as saved
        snap = _read_shard(root, manifest, rank)
        pool = checkpointing.build_pool(DreamPool, _rank_config(persist.config_for_load(snap, device)), snap.capacity)
        with pool._lock:
            checkpointing.restore(pool, snap)
        return pool, dict(manifest.shards[rank].watermarks)
    return _collect(
        root, manifest, lambda tag: tag % world == rank, lambda s: s % world == rank, device, default_tag=rank
    )


def load_merged(path: persist.PathArg, *, device: str | torch.device | None = None) -> DreamPool:
    """The whole sharded checkpoint at ``path`` as one :class:`DreamPool` (ids unchanged).

    New ids continue after the highest id ever issued. Used by :meth:`DreamPool.load`.

    Raises:
        CheckpointCorruptError: a missing, altered or inconsistent manifest or shard, naming the file.
    """
    root = _as_root(path)
    pool, _ = _collect(root, read_manifest(root), lambda tag: True, lambda s: True, device, default_tag=0)
    return pool


def _collect(
    root: Path,
    manifest: _Manifest,
    keep_tag: Callable[[int], bool],
    keep_counters: Callable[[int], bool],
    device: Any,
    *,
    default_tag: int,
) -> tuple[DreamPool, dict[int, int]]:
    """A pool of the entries whose tags ``keep_tag`` accepts, read from every shard holding some.

    Counters of the old shards ``keep_counters`` accepts are summed; the new pool
    issues ids in its highest kept tag, after that tag's watermark.
    """
    shards = manifest.shards
    marks = {t: m for entry in shards for t, m in entry.watermarks.items() if keep_tag(t)}
    if not marks:
        marks = {default_tag: default_tag << TAG_BITS}
    parts: list[dict[str, torch.Tensor]] = []
    encoder: tuple[str, dict[str, torch.Tensor] | None] = ("features", None)
    capacity: int | None = None  # a shard's resolved capacity (the first shard read)
    for entry in shards:
        if not any(keep_tag(t) for t in entry.watermarks):
            continue
        snap = _read_shard(root, manifest, entry.rank)
        if encoder[1] is None:  # every shard holds the same encoder state (statistics are refit collectively)
            encoder = (snap.encoder_kind, snap.encoder_state)
        if capacity is None:
            capacity = snap.capacity if snap.capacity is not None else snap.config.capacity
        ids = snap.columns["ids"]
        keep = (ids >= 0) & torch.tensor([keep_tag(int(t)) for t in (ids >> TAG_BITS).tolist()], dtype=torch.bool)
        parts.append({name: col[keep] for name, col in snap.columns.items()})
    config = shards[0].config
    if device is not None:
        config = config.replace(device=str(device))
    if config.dream_dtype == "auto":
        config = config.replace(dream_dtype=shards[0].dream_dtype)
    columns: dict[str, torch.Tensor] = {}
    if parts:
        columns = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
        order = columns["ids"].argsort(stable=True)
        columns = {name: col[order] for name, col in columns.items()}
    size = int(columns["ids"].numel()) if columns else 0
    if capacity is None:
        capacity = config.capacity
    if capacity is not None and size > capacity:
        capacity = size
    pool = checkpointing.build_pool(DreamPool, _rank_config(config), capacity)
    if not columns:
        columns = {name: col[:0].cpu() for name, col in pool.bank.columns.items()}
    counters: dict[str, int] = {}
    for s, entry in enumerate(shards):
        if keep_counters(s):
            for key, value in entry.counters.items():
                counters[key] = counters.get(key, 0) + value
    issuing = max(marks, key=lambda t: marks[t])
    snap = persist.PoolSnapshot(
        config=pool.config,
        size=size,
        next_id=marks[issuing],
        extent=size,
        counters=counters,
        columns=columns,
        index_kind="",
        index_bytes=None,
        encoder_kind=encoder[0],
        encoder_state=encoder[1],
    )
    with pool._lock:
        checkpointing.restore(pool, snap)
    return pool, marks


def _rank_config(config: PoolConfig) -> PoolConfig:
    """``config`` with a bare CUDA device pinned to this process's current CUDA device."""
    if resolve_device(config.device).type == "cuda" and config.device in ("auto", "cuda"):
        return config.replace(device=f"cuda:{torch.cuda.current_device()}")
    return config
