"""Reading a sharded checkpoint's shards into pools: a rank's own shard, the shards holding the ids
a rank owns at another world size, or every shard merged into one pool (:func:`merged_pool`).

The pool class is an argument: this module never imports the pool (``DreamPool.load`` reads a
sharded checkpoint through it).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from dreampool_gpu import checkpointing, persist
from dreampool_gpu.config import PoolConfig
from dreampool_gpu.devices import resolve_device
from dreampool_gpu.distributed.ids import TAG_BITS, _ids_problem
from dreampool_gpu.distributed.manifest import _Manifest, read_manifest
from dreampool_gpu.errors import CheckpointCorruptError
from dreampool_gpu.persist.files import checked_path

if TYPE_CHECKING:
    from dreampool_gpu.pool import DreamPool

P = TypeVar("P", bound="DreamPool")


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


def open_rank(
    root: Path, manifest: _Manifest, rank: int, world: int, device: Any, pool_cls: type[P]
) -> tuple[P, dict[int, int]]:
    """This rank's shard of the checkpoint at ``root`` for ``world`` ranks (a ``pool_cls``), and its watermarks."""
    if manifest.world_size == world:  # same layout: the rank's own shard, as saved
        snap = _read_shard(root, manifest, rank)
        pool = checkpointing.build_pool(pool_cls, rank_config(persist.config_for_load(snap, device)), snap.capacity)
        with pool.parts.lock:
            checkpointing.restore(pool.parts, snap)
        return pool, dict(manifest.shards[rank].watermarks)
    return _collect(
        root, manifest, lambda tag: tag % world == rank, lambda s: s % world == rank, device, pool_cls, default_tag=rank
    )


def merged_pool(path: persist.PathArg, *, device: str | torch.device | None, pool_cls: type[P]) -> P:
    """The whole sharded checkpoint at ``path`` as one ``pool_cls`` (ids unchanged): :func:`load_merged`,
    and :meth:`DreamPool.load` of a sharded checkpoint.

    Raises:
        CheckpointCorruptError: a missing, altered or inconsistent manifest or shard, naming the file.
    """
    root = checked_path(path)
    pool, _ = _collect(root, read_manifest(root), lambda tag: True, lambda s: True, device, pool_cls, default_tag=0)
    return pool


def _collect(
    root: Path,
    manifest: _Manifest,
    keep_tag: Callable[[int], bool],
    keep_counters: Callable[[int], bool],
    device: Any,
    pool_cls: type[P],
    *,
    default_tag: int,
) -> tuple[P, dict[int, int]]:
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
    pool = checkpointing.build_pool(pool_cls, rank_config(config), capacity)
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
    with pool.parts.lock:
        checkpointing.restore(pool.parts, snap)
    return pool, marks


def rank_config(config: PoolConfig) -> PoolConfig:
    """``config`` with a bare CUDA device pinned to this process's current CUDA device."""
    if resolve_device(config.device).type == "cuda" and config.device in ("auto", "cuda"):
        return config.replace(device=f"cuda:{torch.cuda.current_device()}")
    return config
