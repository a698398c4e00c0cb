"""A sharded pool's checkpoints: save (one generation per save, committed by the manifest),
load at the saved world size or another, the per-rank state dict, and the whole
checkpoint merged into one :class:`DreamPool` (:func:`load_merged`)."""

from __future__ import annotations

import errno
import os
import struct
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from dreampool_gpu import checkpointing, persist
from dreampool_gpu.distributed.collectives import Collectives, local
from dreampool_gpu.distributed.ids import _ids_problem, _state_watermarks
from dreampool_gpu.distributed.manifest import (
    _MANIFEST,
    _check_target,
    _commit_manifest,
    _Manifest,
    _manifest_bytes,
    _parse_manifest,
    _remove_generations,
    _target_fields,
)
from dreampool_gpu.distributed.shards import merged_pool, open_rank
from dreampool_gpu.errors import CheckpointCorruptError, DreamPoolError, InvalidInputError
from dreampool_gpu.persist.files import checked_path
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
        with sp.shard.parts.lock:
            snap = checkpointing.snapshot(sp.shard.parts)
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
    with sp.shard.parts.lock:
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
        with shard.parts.lock:
            backup = checkpointing.snapshot(shard.parts)
            shard.load_state_dict(inner)
            problem = _ids_problem(shard.bank.columns["ids"], shard.bank.next_id, marks)
            if problem is not None:
                checkpointing.restore(shard.parts, backup)
                raise InvalidInputError("state_dict['watermarks']", "watermarks that fit the shard", problem)
        return backup, marks

    done, error = local(apply)
    try:
        sp._net.agree([], error)
    except DreamPoolError:
        if done is not None:
            with shard.parts.lock:
                checkpointing.restore(shard.parts, done[0])
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
        root = checked_path(path)
        data = _manifest_bytes(root)
        if data is None:
            raise CheckpointCorruptError(root / _MANIFEST, "missing")
        return root, _parse_manifest(root / _MANIFEST, data), _target_fields(root, data)

    found, error = local(check)
    _same_target(net.agree(found[2] if found is not None else [0, 0], error))
    root, manifest, _ = cast("tuple[Path, _Manifest, list[int]]", found)  # agreed: checked everywhere
    return local(lambda: open_rank(root, manifest, net.rank, net.world_size, device, DreamPool))


def load_merged(path: persist.PathArg, *, device: str | torch.device | None = None) -> DreamPool:
    """The whole sharded checkpoint at ``path`` as one :class:`DreamPool` (ids unchanged).

    New ids continue after the highest id ever issued. :meth:`DreamPool.load` opens a
    sharded checkpoint so too.

    Raises:
        CheckpointCorruptError: a missing, altered or inconsistent manifest or shard, naming the file.
    """
    return merged_pool(path, device=device, pool_cls=DreamPool)
