"""Checkpoint format of a :class:`~dreampool_gpu.pool.DreamPool`: save, load, verify, recover.

A checkpoint is a directory::

    manifest.json      format name and version, sha256 + size of every other file,
                       and a digest of the manifest itself
    config.json        PoolConfig.to_dict()
    state.json         bank scalars (size, next_id, extent), the pool's capacity, counters, index kind,
                       the eviction policy's state (generator and counts), when it has one
    bank.safetensors   every bank column, rows [0, extent) (slot layout preserved)
    encoder.safetensors the encoder's state (statistics or weights) the embeddings were made with
    index.bin          the search engine's serialized state, when it has any

Format 1 (before encoders had state) is still read: its embeddings came from an
older feature encoder, so a pool loaded from it re-embeds its bank.

:func:`write_checkpoint` builds the directory in a temporary sibling, fsyncs it
and swaps it into place (``renameat2(RENAME_EXCHANGE)`` on Linux, otherwise two
renames with the old copy kept until the new one is in place), so a reader sees
the old checkpoint or the new one, never half of one. :func:`read_checkpoint`
verifies every checksum on the very bytes it parses. A missing or corrupt index
file is recovered by rebuilding from the bank (with a
:class:`CheckpointRecoveryWarning`); anything else that is wrong raises
:class:`~dreampool_gpu.errors.CheckpointCorruptError` naming the file. Loading
never writes to disk.

The same content travels as a plain dict (:func:`to_state_dict`,
:func:`from_state_dict`) that survives ``torch.save`` /
``torch.load(weights_only=True)``. What goes into a :class:`PoolSnapshot`, and how
it goes back into a pool, is :mod:`dreampool_gpu.checkpointing`'s: each part of the
pool gives and takes its own state (``state_dict`` / ``load_state_dict``).
"""

from __future__ import annotations

import copy
import ctypes
import errno
import functools
import hashlib
import json
import math
import os
import shutil
import stat
import sys
import threading
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import psutil
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from dreampool_gpu.atomic import fsync_path, write_synced
from dreampool_gpu.bank import column_specs
from dreampool_gpu.config import DREAM_DTYPES, PoolConfig
from dreampool_gpu.devices import resolve_device
from dreampool_gpu.dreams import NUM_HUE_CATEGORIES, chroma_signature
from dreampool_gpu.errors import (
    CheckpointCorruptError,
    CheckpointNotFoundError,
    DreamPoolError,
    InvalidConfigurationError,
    InvalidInputError,
)
from dreampool_gpu.eviction import check_state
from dreampool_gpu.spectral import spectral_features

if TYPE_CHECKING:
    from dreampool_gpu.pool import DreamPool


FORMAT_NAME = "dreampool-checkpoint"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
CONFIG = "config.json"
STATE = "state.json"
BANK = "bank.safetensors"
INDEX = "index.bin"
ENCODER = "encoder.safetensors"
_REQUIRED = (CONFIG, STATE, BANK)
_PART_FILE = {"config": CONFIG, "state": STATE, "bank": BANK, "encoder": ENCODER}
# Config fields that shape what the bank stores: a state can only go into a pool that agrees on them.
_STRUCTURAL = (
    "dream_shape",
    "embedding_dim",
    "metric",
    "window",
    "include_spectral",
    "include_class",
    "include_utility",
    "encoder_seed",
    "encoder",
    "num_classes",
)

_READ_ATTEMPTS = 20  # reads restarted (with a growing pause) when a concurrent save swaps the directory

PathArg: TypeAlias = "str | os.PathLike[str]"

# Value ranges of live rows per column (others: any finite value).
_RANGES = {
    "dreams": (0.0, 1.0),
    "chroma": (0.0, 1.0),
    "coherence": (0.0, 1.0),
    "violation": (0.0, 1.0),
    "utility": (0.0, 1.0),
    "util_mean": (0.0, 1.0),
    "energy": (0.0, math.inf),
    "feedback_count": (0, math.inf),
    "usage": (0, math.inf),
    "hue_category": (0, NUM_HUE_CATEGORIES - 1),
}

WRITE_LOCK = threading.RLock()
"""Serialises checkpoint writes within the process (taken before the pool's lock)."""


class CheckpointRecoveryWarning(UserWarning):
    """A checkpoint was loaded after recovering from a damaged or missing part."""


@dataclass
class PoolSnapshot:
    """Everything a checkpoint holds, host-side.

    Attributes:
        config: the pool's configuration, as its user gave it.
        capacity: the pool's resolved capacity (slots of its bank; the configured one
            lowered or derived to fit the budget); None in checkpoints written before it
            was saved (their ``config.capacity`` is the resolved one).
        size, next_id, extent: bank scalars.
        counters: the pool's counters.
        columns: name -> ``[extent, ...]`` CPU tensor, one per bank column.
        index_kind: ``SearchIndex.kind`` of the engine that produced ``index_bytes``.
        index_bytes: serialized engine state behind a header naming the bank it was
            built from (:func:`tag_index`), or None (rebuild from the bank).
        origin: the checkpoint directory it was read from (None for a state dict).
        encoder_kind: ``features``, ``learned``, ``module`` (a user's nn.Module) or ``custom``.
        encoder_state: the encoder's ``state_dict()`` as CPU tensors; None for a format-1
            checkpoint (the loading pool re-embeds its bank).
        cache: the query cache's ``state_dict()`` (state dicts only; never written to disk).
        eviction: the eviction policy's ``state_dict()`` (generator and counts of the sampling
            policies), in ``state.json``; None where it has none, or in older checkpoints.
    """

    config: PoolConfig
    size: int
    next_id: int
    extent: int
    counters: dict[str, int]
    columns: dict[str, torch.Tensor]
    index_kind: str
    index_bytes: bytes | None
    encoder_kind: str = "features"
    encoder_state: dict[str, torch.Tensor] | None = None
    origin: Path | None = None
    capacity: int | None = None
    cache: dict[str, Any] | None = None
    eviction: dict[str, Any] | None = None


class _Invalid(Exception):
    """Internal: part ``where`` (config, state, bank) of a snapshot is malformed."""

    def __init__(self, where: str, expected: str, got: Any) -> None:
        super().__init__(f"expected {expected}, got {got}")
        self.where, self.expected, self.got = where, expected, got


# ------------------------------------------------------------------ restore checks
def encoder_kind(encoder: Any) -> str:
    """The checkpoint's name for the kind of ``encoder``."""
    from dreampool_gpu.encoders import FeatureEncoder
    from dreampool_gpu.learned import LearnedEncoder, ModuleEncoder

    kinds = ((FeatureEncoder, "features"), (LearnedEncoder, "learned"), (ModuleEncoder, "module"))
    return next((name for cls, name in kinds if isinstance(encoder, cls)), "custom")


def _check_encoder(pool: DreamPool, snap: PoolSnapshot) -> None:
    """The saved encoder state fits ``pool.encoder``: same kind, names, shapes and dtypes, and
    for the feature encoder the projection its configuration (seed, parts, classes) makes.

    Raises:
        CheckpointCorruptError: (read from a directory) naming the encoder file.
        InvalidConfigurationError: (a state dict) naming ``encoder``.
    """
    if snap.encoder_state is None:
        return
    mine = encoder_kind(pool.encoder)
    problem = None
    if mine != snap.encoder_kind:
        problem = (
            mine,
            f"a {snap.encoder_kind!r} encoder, as the state was saved with (pass encoder= a module "
            "of the saved architecture for a 'module' or 'custom' encoder)",
        )
    current = pool.encoder.state_dict()
    for name in sorted(set(current) | set(snap.encoder_state)):
        a, b = current.get(name), snap.encoder_state.get(name)
        if problem is None and (a is None or b is None or a.shape != b.shape or a.dtype != b.dtype):
            got = "absent" if b is None else f"{list(b.shape)} {b.dtype}"
            problem = (f"state {name!r}: {got}", "absent" if a is None else f"{list(a.shape)} {a.dtype}")
    if (
        problem is None
        and mine == "features"
        and not torch.equal(current["projection"].cpu(), snap.encoder_state["projection"])
    ):
        problem = ("another projection", "the projection of this configuration (encoder_seed, include_*, num_classes)")
    if problem is None:
        return
    caller_supplied = mine != snap.encoder_kind or mine in ("module", "custom")  # the caller's encoder= is off
    if snap.origin is not None and not caller_supplied:
        raise CheckpointCorruptError(
            snap.origin / ENCODER, f"inconsistent data: expected {problem[1]}, got {problem[0]}"
        )
    raise InvalidConfigurationError("encoder", problem[0], problem[1])


def check_restorable(pool: DreamPool, snap: PoolSnapshot) -> None:
    """Refuse ``snap`` where ``pool`` cannot hold it (caller holds the lock; nothing is changed).

    The structural fields of the configurations agree, the pool's capacity holds the
    saved extent, the saved encoder state fits the pool's encoder, and a sample of
    entries recomputes from their stored dreams (:func:`_spot_check`).

    Raises:
        InvalidConfigurationError: the pool's configuration cannot hold ``snap``
            (a structural field differs, or ``capacity`` is below the saved extent).
        CheckpointCorruptError, InvalidInputError: the snapshot's data is inconsistent.
    """
    for name in _STRUCTURAL:
        mine, theirs = getattr(pool.config, name), getattr(snap.config, name)
        if mine != theirs:
            expected = f"{_plain(mine)!r}, the value this pool was built with"
            raise InvalidConfigurationError(name, _plain(theirs), expected)
    if snap.extent > pool.capacity:
        raise InvalidConfigurationError(
            "capacity", pool.capacity, f"at least {snap.extent} (the saved extent) to hold this state"
        )
    _check_encoder(pool, snap)
    _spot_check(pool, snap)


def index_state(snap: PoolSnapshot, revision: int) -> dict[str, Any]:
    """The ``SearchIndex.state_dict()`` to load once ``snap``'s bank is in a bank at ``revision``.

    ``data`` is the saved engine state when its header names ``snap``'s bank (then it is
    stamped with ``revision``); None, with a :class:`CheckpointRecoveryWarning`, for an
    index of another bank; None for a format-1 snapshot (its embeddings are recomputed).
    """
    data = None if snap.encoder_state is None else _untag_index(snap)
    return {"kind": snap.index_kind, "revision": revision, "data": data}


# --------------------------------------------------------------- consistency
_INDEX_MAGIC = b"dreampool-index-of-bank:"
_SPOT_SAMPLE = 32  # live entries recomputed from their dreams on every restore
# |recomputed - stored| allowed, by the dreams' storage dtype (features were computed from the
# caller's dreams before the cast to it): chroma absolute, embeddings relative to their scale
_SPOT_TOLERANCE = {torch.float32: (1e-5, 1e-3), torch.float16: (2e-3, 1e-2), torch.bfloat16: (1e-2, 2e-2)}


def bank_digest(columns: dict[str, torch.Tensor]) -> str:
    """sha256 of what a search index is built from: the ``ids`` and ``embeddings`` columns."""
    h = hashlib.sha256()
    for name in ("ids", "embeddings"):
        h.update(columns[name].contiguous().view(torch.uint8).numpy().data)  # .data: the array's buffer
    return h.hexdigest()


def tag_index(engine_bytes: bytes, digest: str) -> bytes:
    """Index bytes behind a header naming the bank digest they were built from."""
    return _INDEX_MAGIC + digest.encode() + b"\n" + engine_bytes


def _untag_index(snap: PoolSnapshot) -> bytes | None:
    """The engine bytes of ``snap``'s index when it was built from ``snap``'s bank, else None.

    An index of another bank (copied from another pool, or from another save) would
    answer for entries that are not there: it is rebuilt from the bank, with a
    :class:`CheckpointRecoveryWarning`.
    """
    data = snap.index_bytes
    if data is None:
        return None
    head, _, body = data.partition(b"\n")
    if not head.startswith(_INDEX_MAGIC):
        reason = "it names no bank it was built from"
    elif head[len(_INDEX_MAGIC) :].decode(errors="replace") != bank_digest(snap.columns):
        reason = "it was built from another bank (digest mismatch)"
    else:
        return body
    where = "" if snap.origin is None else f" in {snap.origin}"
    warnings.warn(
        f"search index{where} not used: {reason}; rebuilt from the bank", CheckpointRecoveryWarning, stacklevel=6
    )
    return None


def _spot_check(pool: DreamPool, snap: PoolSnapshot) -> None:
    """Refuse a snapshot whose derived columns do not follow from its dreams under ``pool``'s encoder.

    Checksums prove the bytes are the ones written, not that they agree: a manifest
    signed again with another ``encoder_seed``, embeddings scaled under cosine, or
    chroma of other dreams would load and answer differently. Checked: every live
    embedding has unit norm under cosine; for up to :data:`_SPOT_SAMPLE` live entries
    (evenly spaced), chroma and embeddings recomputed from the stored dreams match.

    Raises:
        CheckpointCorruptError: (read from a directory) naming the bank file.
        InvalidInputError: (a state dict) naming ``state_dict``.
    """
    alive = torch.nonzero(snap.columns["ids"] >= 0).squeeze(1)
    problem = None
    if alive.numel():
        stored = snap.columns["embeddings"][alive]
        if pool.config.metric.value == "cosine":
            norms = stored.norm(dim=1)
            worst = float((norms - 1).abs().max())
            if worst > 1e-3:
                problem = f"cosine embeddings of unit norm, norms up to {float(norms.max()):.6g}"
        if problem is None:
            problem = _recompute_problem(pool, snap, alive)
    if problem is None:
        return
    reason = f"inconsistent data: {problem}; the bank does not follow from its dreams with this configuration"
    if snap.origin is not None:
        raise CheckpointCorruptError(snap.origin / BANK, reason)
    raise InvalidInputError("state_dict", "a bank whose derived columns follow from its dreams", reason)


def _recompute_problem(pool: DreamPool, snap: PoolSnapshot, alive: torch.Tensor) -> str | None:
    """What differs when a sample of entries is recomputed from its dreams; None when nothing does."""
    picks = alive[torch.linspace(0, alive.numel() - 1, min(_SPOT_SAMPLE, alive.numel())).round().long().unique()]
    cols = {
        name: snap.columns[name][picks].to(pool.device) for name in ("dreams", "chroma", "embeddings", "class_label")
    }
    chroma_tol, embed_tol = _SPOT_TOLERANCE.get(cols["dreams"].dtype, _SPOT_TOLERANCE[torch.bfloat16])
    chroma = chroma_signature(cols["dreams"])
    chroma_gap = float((chroma - cols["chroma"]).abs().max())
    if chroma_gap > chroma_tol:
        return f"stored chroma differs from the chroma of the stored dreams by up to {chroma_gap:.3g}"
    if snap.encoder_state is None:  # format 1: re-embedded on restore, nothing to compare with
        return None
    embeddings = _embeddings_as_added(pool, snap.encoder_state, cols["dreams"], cols["class_label"].long())
    scale = 1.0 + float(cols["embeddings"].abs().max())
    embed_gap = float((embeddings - cols["embeddings"]).abs().max())
    if embed_gap > embed_tol * scale:
        return (
            f"stored embeddings differ from the encoder's embeddings of the stored dreams by up to "
            f"{embed_gap:.3g} (encoder_seed, include_* or metric changed?)"
        )
    return None


def _embeddings_as_added(
    pool: DreamPool, encoder_state: dict[str, torch.Tensor], dreams: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """``[n, D]`` bank embeddings of ``dreams`` ``[n, R, C, L, 3]`` under a snapshot's ``encoder_state``.

    Computed as :meth:`DreamPool.add` embeds (features of the dreams, then
    ``encode_entries``), by a copy of ``pool``'s encoder holding ``encoder_state``.
    """
    encoder = copy.deepcopy(pool.encoder)
    encoder.load_state_dict(encoder_state)
    dreams = dreams.float()
    spectral = spectral_features(dreams, window=pool.config.window)
    z = encoder.encode_entries(dreams, chroma=chroma_signature(dreams), spectral=spectral, class_labels=labels)
    return pool._embed(z)  # noqa: SLF001 - the bank form of an embedding is the pool's rule


def config_for_load(snap: PoolSnapshot, device: str | torch.device | None) -> PoolConfig:
    """The configuration a pool loaded from ``snap`` onto ``device`` is built with.

    ``device`` None keeps the saved device. The dream dtype follows the saved
    column: an ``auto`` dtype that would pick another dtype on ``device`` is
    replaced by the saved dtype's name.

    Raises:
        InvalidConfigurationError: ``device`` names no device.
        DeviceUnavailableError: ``device`` (or the saved one) is CUDA and absent.
    """
    config = snap.config
    if device is not None:
        if not isinstance(device, (str, torch.device)):
            raise InvalidConfigurationError("device", device, '"auto", "cpu", "cuda" or "cuda:N"')
        config = config.replace(device=str(device))
    saved = _dtype_name(snap.columns["dreams"].dtype)
    if config.dream_dtype == "auto":
        auto = "float16" if resolve_device(config.device).type == "cuda" else "float32"
        if auto != saved:
            config = config.replace(dream_dtype=saved)
    return config


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _plain(value: Any) -> Any:
    return getattr(value, "value", value)


# ---------------------------------------------------------------- validation
def _check_int(value: Any, where: str, name: str, low: int, high: int | None = None) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
    if not ok:
        bound = f"an int in [{low}, {high}]" if high is not None else f"an int >= {low}"
        raise _Invalid(where, f"{name}: {bound}", repr(value))
    return value


def _build(
    config: Any, state: Any, columns: Any, index_bytes: Any, encoder_state: Any = None, cache: Any = None
) -> PoolSnapshot:
    """Validate the parts of a snapshot against each other and assemble it."""
    if not isinstance(config, dict):
        raise _Invalid("config", "a mapping of PoolConfig fields", type(config).__name__)
    try:
        cfg = PoolConfig.from_dict(config)
    except DreamPoolError as exc:
        raise _Invalid("config", "a valid PoolConfig", str(exc)) from None
    if not isinstance(state, dict):
        raise _Invalid("state", "a mapping", type(state).__name__)
    missing = sorted({"size", "next_id", "extent", "counters", "index_kind"} - set(state))
    if missing:
        raise _Invalid("state", "keys size, next_id, extent, counters, index_kind", f"no {missing[0]!r}")
    capacity = state.get("capacity")  # absent before it was saved: config.capacity was the resolved one then
    if capacity is not None:
        capacity = _check_int(capacity, "state", "capacity", 1)
    extent = _check_int(state["extent"], "state", "extent", 0, capacity if capacity is not None else cfg.capacity)
    size = _check_int(state["size"], "state", "size", 0, extent)
    next_id = _check_int(state["next_id"], "state", "next_id", 0, torch.iinfo(torch.int64).max)
    counters = state["counters"]
    if not isinstance(counters, dict) or not all(isinstance(k, str) for k in counters):
        raise _Invalid("state", "counters: a mapping of name -> int", repr(counters)[:80])
    for key, value in counters.items():
        _check_int(value, "state", f"counters[{key!r}]", 0)
    if not isinstance(state["index_kind"], str):
        raise _Invalid("state", "index_kind: a string", repr(state["index_kind"])[:80])
    if index_bytes is not None and not isinstance(index_bytes, bytes):
        raise _Invalid("index", "bytes or None", type(index_bytes).__name__)
    columns = _upgrade_columns(columns)
    _check_columns(columns, cfg, extent, size, next_id)
    kind = state.get("encoder_kind", "features")
    if not isinstance(kind, str) or kind not in ("features", "learned", "module", "custom"):
        raise _Invalid("state", "encoder_kind: features, learned, module or custom", repr(kind)[:80])
    if encoder_state is not None and not (
        isinstance(encoder_state, dict)
        and all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in encoder_state.items())
    ):
        raise _Invalid("encoder", "a mapping of name -> tensor", type(encoder_state).__name__)
    if cache is not None and not (isinstance(cache, dict) and all(isinstance(k, str) for k in cache)):
        raise _Invalid("cache", "a mapping of name -> value, or None", type(cache).__name__)
    policy_state = state.get("eviction")
    problem = None if policy_state is None else check_state(policy_state)
    if problem is not None:
        raise _Invalid("state", "eviction: the eviction policy's state", problem)
    return PoolSnapshot(
        cfg,
        size,
        next_id,
        extent,
        dict(counters),
        dict(columns),
        state["index_kind"],
        index_bytes,
        kind,
        None if encoder_state is None else dict(encoder_state),
        capacity=capacity,
        cache=None if cache is None else dict(cache),
        eviction=policy_state,
    )


def _upgrade_columns(columns: Any) -> Any:
    """Format 1 stored class labels as int8; they are int32 now."""
    if (
        isinstance(columns, dict)
        and isinstance(columns.get("class_label"), torch.Tensor)
        and columns["class_label"].dtype == torch.int8
    ):
        return {**columns, "class_label": columns["class_label"].to(torch.int32)}
    return columns


def _check_columns(columns: Any, cfg: PoolConfig, extent: int, size: int, next_id: int) -> None:
    if not isinstance(columns, dict):
        raise _Invalid("bank", "a mapping of column name -> tensor", type(columns).__name__)
    specs = column_specs(cfg.dream_shape, cfg.embedding_dim, torch.float32)
    if set(columns) != set(specs):
        diff = sorted(set(specs) ^ set(columns), key=str)
        raise _Invalid("bank", f"exactly the columns {', '.join(specs)}", f"a difference in {diff[0]!r}")
    for name, spec in specs.items():
        t = columns[name]
        if not isinstance(t, torch.Tensor) or t.is_meta or t.layout != torch.strided:
            raise _Invalid("bank", f"column {name!r}: a dense tensor with data", repr(t)[:80])
        if tuple(t.shape) != (extent, *spec.shape):
            raise _Invalid("bank", f"column {name!r} of shape {[extent, *spec.shape]}", list(t.shape))
        if name == "dreams":
            allowed = [n for n in DREAM_DTYPES if n != "auto"] if cfg.dream_dtype == "auto" else [cfg.dream_dtype]
            if _dtype_name(t.dtype) not in allowed:
                raise _Invalid("bank", f"column 'dreams' of dtype {' or '.join(allowed)}", str(t.dtype))
        elif t.dtype != spec.dtype:
            raise _Invalid("bank", f"column {name!r} of dtype {spec.dtype}", str(t.dtype))
    ids = columns["ids"]
    live = ids[ids >= 0]
    if bool((ids < -1).any()) or bool((live >= next_id).any()):
        raise _Invalid("bank", f"ids in -1..{next_id - 1} (next_id)", "ids outside it")
    if live.numel() != size:
        raise _Invalid("bank", f"{size} live ids (state size)", live.numel())
    if live.unique().numel() != live.numel():
        raise _Invalid("bank", "unique live ids", "duplicates")
    _check_values(columns, ids >= 0, cfg.num_classes)


def _check_values(columns: dict[str, torch.Tensor], alive: torch.Tensor, num_classes: int) -> None:
    """Value ranges of live rows, as :meth:`DreamPool.add` and feedback would have left them."""
    for name, t in columns.items():
        rows = t[alive]
        if rows.is_floating_point():
            rows = rows.float()
            if name == "utility":  # NaN until the first feedback
                rows = rows[~rows.isnan()]
            if not bool(torch.isfinite(rows).all()):
                raise _Invalid("bank", f"finite values in column {name!r}", "NaN or inf")
        low, high = (-1, num_classes - 1) if name == "class_label" else _RANGES.get(name, (-math.inf, math.inf))
        if rows.numel() and bool(((rows < low) | (rows > high)).any()):
            raise _Invalid("bank", f"column {name!r} in [{low}, {high}]", "values outside it")


# ---------------------------------------------------------------- state dict
def to_state_dict(snap: PoolSnapshot) -> dict[str, Any]:
    """The snapshot as plain containers, tensors and bytes (``torch.load(weights_only=True)``-safe)."""
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": snap.config.to_dict(),
        "state": _state_fields(snap),
        "bank": dict(snap.columns),
        "index": snap.index_bytes,
        "encoder": snap.encoder_state,
        "cache": snap.cache,
    }


def from_state_dict(state_dict: Any) -> PoolSnapshot:
    """Validate a dict made by :func:`to_state_dict` (possibly via torch.save/load).

    Raises:
        InvalidInputError: not such a dict, a newer format version, or a malformed part.
    """
    if not isinstance(state_dict, dict) or not _is_format_name(state_dict.get("format")):
        raise InvalidInputError(
            "state_dict", f"a dict from DreamPool.state_dict() (format {FORMAT_NAME!r})", type(state_dict).__name__
        )
    version = state_dict.get("format_version")
    problem = _version_problem(version)
    if problem is not None:
        raise InvalidInputError("state_dict", *problem)
    try:
        return _build(
            state_dict.get("config"),
            state_dict.get("state"),
            state_dict.get("bank"),
            state_dict.get("index"),
            state_dict.get("encoder"),
            state_dict.get("cache"),
        )
    except _Invalid as exc:
        raise InvalidInputError(f"state_dict[{exc.where!r}]", exc.expected, exc.got) from None


def _is_format_name(value: Any) -> bool:
    return isinstance(value, str) and value == FORMAT_NAME  # type first: arrays compare elementwise


def _state_fields(snap: PoolSnapshot) -> dict[str, Any]:
    fields = {
        "size": snap.size,
        "next_id": snap.next_id,
        "extent": snap.extent,
        "counters": dict(snap.counters),
        "index_kind": snap.index_kind,
        "encoder_kind": snap.encoder_kind,
    }
    if snap.capacity is not None:
        fields["capacity"] = snap.capacity
    if snap.eviction is not None:
        fields["eviction"] = snap.eviction
    return fields


def _version_problem(version: Any) -> tuple[str, str] | None:
    """``(expected, got)`` when ``version`` is not a format version this library reads, else None."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        return f"a format version between 1 and {FORMAT_VERSION}", repr(version)[:80]
    if version > FORMAT_VERSION:
        return (
            f"format version <= {FORMAT_VERSION}",
            f"version {version}, written by a newer dreampool_gpu (not corrupt): upgrade dreampool_gpu to load it",
        )
    return None


# --------------------------------------------------------------------- write
def write_checkpoint(snap: PoolSnapshot, path: PathArg) -> Path:
    """Write ``snap`` as a checkpoint directory at ``path``, atomically.

    The directory is built in a hidden sibling, fsynced, then swapped into
    place; the previous checkpoint at ``path`` (if any) stays intact until the
    new one is complete. Parent directories are created. Writes within the
    process are serialised by :data:`WRITE_LOCK`; across processes, give each
    writer its own path (concurrent readers are fine).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        InvalidInputError: ``path`` is not a path, or names something other than
            a dreampool checkpoint (which would be overwritten).
        OSError: the filesystem failed. The previous checkpoint stays readable
            by :func:`read_checkpoint`: at ``path``, or (a failure between the
            two renames of the portable swap) in the hidden ``.old`` sibling it
            falls back to.
    """
    target = _as_path(path)
    with WRITE_LOCK:
        return _write_locked(snap, target)


def _write_locked(snap: PoolSnapshot, target: Path) -> Path:
    if os.path.lexists(target) and not _is_checkpoint(target):
        raise InvalidInputError("path", "a new path or an existing dreampool checkpoint directory", str(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(target, "tmp")
    tmp.mkdir()
    try:
        files = {
            CONFIG: _json_bytes(snap.config.to_dict()),
            STATE: _json_bytes(_state_fields(snap)),
            BANK: save_safetensors(snap.columns),
        }
        if snap.index_bytes is not None:
            files[INDEX] = snap.index_bytes
        if snap.encoder_state is not None:
            files[ENCODER] = save_safetensors(snap.encoder_state)
        entries = {name: _write_file(tmp / name, data) for name, data in files.items()}
        body = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "files": entries}
        _write_file(tmp / MANIFEST, _json_bytes({**body, "digest": _digest(body)}))
        _fsync_dir(tmp)
        _swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _remove_stale_siblings(target)
    return target


def _as_path(path: Any) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidInputError("path", "a str or os.PathLike", type(path).__name__)
    text = os.fspath(path)
    if not isinstance(text, str) or not text or "\0" in text:
        raise InvalidInputError("path", "a non-empty str path without NUL bytes", repr(text)[:80])
    return Path(text)


def _is_checkpoint(target: Path) -> bool:
    """True when ``target`` is a directory whose manifest names this format (replaceable)."""
    try:
        manifest = json.loads(_read_regular(target / MANIFEST, _MANIFEST_MAX)[0])
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT_NAME


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True, allow_nan=False).encode()


def _digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _write_file(path: Path, data: bytes) -> dict[str, Any]:
    write_synced(path, data)
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


_fsync_dir = fsync_path  # a module name of its own: crash tests pause it


def _swap_into_place(tmp: Path, target: Path) -> None:
    """Put ``tmp`` at ``target``; the old ``target`` survives until the new one is there."""
    if not os.path.lexists(target):
        os.rename(tmp, target)
        _fsync_dir(target.parent)
        return
    if _rename_exchange(tmp, target):  # one atomic step: tmp now holds the old checkpoint
        _fsync_dir(target.parent)
        shutil.rmtree(tmp)
        return
    old = _sibling(target, "old")
    os.rename(target, old)  # a crash here leaves the complete old copy; read_checkpoint finds it
    os.rename(tmp, target)
    _fsync_dir(target.parent)
    _discard(target, old)


def _discard(target: Path, leftover: Path) -> None:
    """Remove a sibling of ``target``: renamed to ``.trash-`` first, then deleted.

    An ``.old`` sibling is thereby always complete (what :func:`read_checkpoint`
    falls back to): a removal cut short leaves a partial ``.trash`` sibling,
    which later saves clean up, never a partial ``.old`` one.
    """
    trash = _sibling(target, "trash")
    try:
        os.rename(leftover, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _sibling(target: Path, kind: str) -> Path:
    """A fresh hidden sibling ``.<name>.<kind>-<pid>-<random>`` of ``target`` (see :func:`_sibling_prefix`)."""
    return target.parent / f"{_sibling_prefix(target, kind)}{os.getpid()}-{uuid.uuid4().hex[:12]}"


_NAME_MAX = 255  # bytes in one path component (Linux, macOS, Windows)
_SUFFIX_MAX = 7 + 1 + 12  # "<pid>-<random>": pids up to 7 digits


def _sibling_prefix(target: Path, kind: str) -> str:
    """``.<name>.<kind>-``, the name shortened (to a head and a hash of it) where the sibling's
    name would pass NAME_MAX: a valid checkpoint name of up to 255 bytes keeps working."""
    name = target.name
    budget = _NAME_MAX - _SUFFIX_MAX - len(f"..{kind}-")
    encoded = os.fsencode(name)
    if len(encoded) > budget:
        digest = hashlib.sha256(encoded).hexdigest()[:16]
        head = encoded[: budget - len(digest) - 1].decode(errors="ignore")
        name = f"{head}~{digest}"
    return f".{name}.{kind}-"


@functools.cache
def _renameat2() -> Any:
    """libc's ``renameat2`` on Linux, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``RENAME_EXCHANGE``); False where unsupported."""
    fn = _renameat2()
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _siblings(target: Path, kind: str) -> list[Path]:
    prefix = _sibling_prefix(target, kind)
    try:
        return [p for p in target.parent.iterdir() if p.name.startswith(prefix) and p.is_dir()]
    except OSError:
        return []


def _owner_gone(path: Path) -> bool:
    pid_text = path.name.rsplit("-", 2)[-2]
    return not pid_text.isdigit() or int(pid_text) == os.getpid() or not psutil.pid_exists(int(pid_text))


def _remove_stale_siblings(target: Path) -> None:
    """Drop leftovers of interrupted saves (their writers are gone) now that ``target`` is complete."""
    for leftover in _siblings(target, "tmp") + _siblings(target, "old") + _siblings(target, "trash"):
        if _owner_gone(leftover):
            _discard(target, leftover)


# ---------------------------------------------------------------------- read
def read_checkpoint(path: PathArg) -> PoolSnapshot:
    """Read and verify the checkpoint at ``path``; never writes to disk.

    A save that replaces the checkpoint while it is being read is detected (the
    directory at ``path`` changed) and the read starts again, so a reader gets
    the old checkpoint or the new one. When ``path`` is missing but an
    interrupted save left the previous checkpoint in a hidden ``.old`` sibling,
    that copy is read. Recoveries emit a :class:`CheckpointRecoveryWarning`.

    Raises:
        CheckpointCorruptError: the manifest or a required file is missing,
            malformed or fails its checksum; or the format version is newer than
            this library (the message says so). The error's ``path`` names the file.
        InvalidInputError: ``path`` is not a path.
    """
    target = _as_path(path)
    for attempt in range(_READ_ATTEMPTS):
        before = _identity(target)
        notes: list[str] = []
        try:
            snap = _read_once(target, notes)
        except CheckpointCorruptError:
            after = _identity(target)
            # replaced under us by a concurrent save, or caught between its two renames (the
            # target missing while an .old copy exists): read again
            between_renames = (before is None or after is None) and bool(_siblings(target, "old"))
            if (after != before or between_renames) and attempt + 1 < _READ_ATTEMPTS:
                time.sleep(min(0.05, 0.001 * 2**attempt))
                continue
            raise
        if _identity(target) != before and attempt + 1 < _READ_ATTEMPTS:
            continue  # parts may come from two checkpoints (e.g. a rebuilt index): read again
        for note in notes:
            warnings.warn(note, CheckpointRecoveryWarning, stacklevel=3)
        return snap
    raise CheckpointCorruptError(target, "replaced by concurrent saves on every read attempt")


def _identity(path: Path) -> tuple[int, int, int, str] | None:
    """Which checkpoint is at ``path`` now: (device, inode, change time, manifest digest); None when absent.

    The manifest's own digest is part of it because a deleted directory's inode
    can be reused by the next save within one coarse timestamp tick, so
    (device, inode, ctime) alone may repeat across two different checkpoints.
    """
    try:
        st = os.stat(path)
        manifest, _ = _read_regular(path / MANIFEST, _MANIFEST_MAX)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_ctime_ns, hashlib.sha256(manifest).hexdigest()


def manifest_digest(path: PathArg) -> str | None:
    """sha256 of the manifest of the checkpoint at ``path`` (it holds every file's checksum);
    None when there is none to read (never blocks on a special file)."""
    try:
        data, _ = _read_regular(Path(path) / MANIFEST, _MANIFEST_MAX)
    except OSError:
        return None
    return hashlib.sha256(data).hexdigest()


def checkpoint_source(path: PathArg) -> Path | None:
    """The directory a read of ``path`` reads first: ``path`` itself, else the newest copy an
    interrupted save left (``.old`` sibling); None when there is neither."""
    target = _as_path(path)
    if target.is_dir():
        return target
    candidates = sorted(_siblings(target, "old"), key=_mtime, reverse=True)
    return candidates[0] if candidates and not os.path.lexists(target) else None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return -math.inf


def _read_once(target: Path, notes: list[str]) -> PoolSnapshot:
    """One read of the checkpoint at ``target``; recoveries are appended to ``notes``."""
    if target.is_dir():
        return _read_directory(target, notes)
    candidates = sorted(_siblings(target, "old"), key=_mtime, reverse=True)
    if os.path.lexists(target):
        raise CheckpointCorruptError(target, "a file, not a checkpoint directory (DreamPool.save writes a directory)")
    if not candidates:
        raise CheckpointNotFoundError(target)
    errors: list[CheckpointCorruptError] = []
    for candidate in candidates:  # newest first; one that fails to verify is skipped
        found: list[str] = []
        try:
            snap = _read_directory(candidate, found)
        except CheckpointCorruptError as exc:
            errors.append(exc)
            continue
        notes.append(f"{target} is missing after an interrupted save; read the previous checkpoint {candidate}")
        notes.extend(found)
        return snap
    raise errors[0]


def _read_directory(target: Path, notes: list[str]) -> PoolSnapshot:
    """Read and verify the checkpoint directory ``target``."""
    files = _read_manifest(target)
    data = {name: _read_verified(target / name, files[name]) for name in _REQUIRED}
    index_bytes = None
    if INDEX in files:
        try:
            index_bytes = _read_verified(target / INDEX, files[INDEX])
        except CheckpointCorruptError as exc:
            notes.append(f"{exc}; the search index will be rebuilt from the bank")
    try:
        extra = sorted(name for name in os.listdir(target) if name != MANIFEST and name not in files)
    except OSError as exc:  # removed after the files were read
        raise CheckpointCorruptError(target, f"unreadable directory ({exc})") from None
    if extra:
        notes.append(f"{target}: ignoring files the manifest does not list: {', '.join(extra)}")
    config = _parse_json(target / CONFIG, data[CONFIG])
    state = _parse_json(target / STATE, data[STATE])
    try:
        columns = load_safetensors(data[BANK])
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as exc:
        raise CheckpointCorruptError(target / BANK, f"not a readable safetensors file ({exc})") from None
    encoder_state = None
    if ENCODER in files:
        try:
            encoder_state = load_safetensors(_read_verified(target / ENCODER, files[ENCODER]))
        except (SafetensorError, ValueError, RuntimeError, OverflowError) as exc:
            raise CheckpointCorruptError(target / ENCODER, f"not a readable safetensors file ({exc})") from None
    try:
        snap = _build(config, state, columns, index_bytes, encoder_state)
    except _Invalid as exc:
        raise CheckpointCorruptError(target / _PART_FILE[exc.where], str(exc)) from None
    snap.origin = target
    return snap


def _read_manifest(target: Path) -> dict[str, dict[str, Any]]:
    """The manifest's file table, after checking format, version and digest."""
    where = target / MANIFEST
    try:
        data, _ = _read_regular(where, _MANIFEST_MAX)
        if len(data) > _MANIFEST_MAX:
            raise CheckpointCorruptError(where, f"larger than a manifest can be ({_MANIFEST_MAX} bytes)")
        manifest = json.loads(data)
    except FileNotFoundError:
        raise CheckpointCorruptError(where, "missing") from None
    except _NotRegular as exc:
        raise CheckpointCorruptError(where, exc.strerror) from None
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointCorruptError(where, f"not readable JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CheckpointCorruptError(where, f"not a {FORMAT_NAME} manifest")

    problem = _version_problem(manifest.get("format_version"))
    if problem is not None:
        raise CheckpointCorruptError(where, "expected {}, got {}".format(*problem))
    body = {key: value for key, value in manifest.items() if key != "digest"}
    if manifest.get("digest") != _digest(body):
        raise CheckpointCorruptError(where, "manifest digest mismatch (the manifest was altered)")
    files = manifest.get("files")
    known = (*_REQUIRED, INDEX, ENCODER)
    if not isinstance(files, dict) or not all(name in files for name in _REQUIRED):
        raise CheckpointCorruptError(where, f"a file table listing {', '.join(_REQUIRED)}")
    for name, entry in files.items():
        ok = (
            name in known
            and isinstance(entry, dict)
            and isinstance(entry.get("sha256"), str)
            and isinstance(entry.get("bytes"), int)
        )
        if not ok:
            raise CheckpointCorruptError(
                where, f"file entry {name!r} is not one of {', '.join(known)} with sha256 and bytes"
            )
    return files


def _read_verified(path: Path, entry: dict[str, Any]) -> bytes:
    expected = entry["bytes"]
    if expected < 0:
        raise CheckpointCorruptError(path.parent / MANIFEST, f"a size >= 0 for {path.name}, got {expected}")
    try:
        data, on_disk = _read_regular(path, expected)
    except FileNotFoundError:
        raise CheckpointCorruptError(path, "missing") from None
    except _NotRegular as exc:
        raise CheckpointCorruptError(path, exc.strerror) from None
    except OSError as exc:
        raise CheckpointCorruptError(path, f"unreadable ({exc})") from None
    if len(data) < expected:
        raise CheckpointCorruptError(
            path, f"expected {expected} bytes, found {len(data)}: {expected - len(data)} bytes missing (truncated)"
        )
    if len(data) > expected:
        raise CheckpointCorruptError(
            path,
            f"expected {expected} bytes, found {max(on_disk, len(data))}: "
            f"{max(on_disk, len(data)) - expected} bytes more than the manifest "
            "lists (appended to)",
        )
    actual = hashlib.sha256(data).hexdigest()
    if actual != entry["sha256"]:
        raise CheckpointCorruptError(path, f"sha256 mismatch: manifest says {entry['sha256']}, file has {actual}")
    return data


_MANIFEST_MAX = 1 << 20  # bytes: a manifest lists five files


class _NotRegular(OSError):
    """Internal: a checkpoint path names a FIFO, device, socket or directory, not a regular file."""

    strerror: str  # always set: raised as ``_NotRegular(errno, message, path)``


def read_manifest_bytes(path: Path) -> bytes:
    """At most ``_MANIFEST_MAX + 1`` bytes of the regular file ``path`` (never blocks).

    Raises:
        OSError: missing, unreadable, or not a regular file (a FIFO, device, directory).
    """
    return _read_regular(path, _MANIFEST_MAX)[0]


def _read_regular(path: Path, limit: int) -> tuple[bytes, int]:
    """``(at most limit + 1 bytes, size on disk)`` of the regular file at ``path``.

    Opened non-blocking and checked with ``fstat`` before any read, so a FIFO never
    blocks and ``/dev/zero`` is never read; only ``limit + 1`` bytes are read, so a
    file longer than it should be costs no more memory than a right one.

    Raises:
        FileNotFoundError: nothing at ``path``. _NotRegular: not a regular file.
        OSError: anything else the filesystem reports.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _NotRegular(errno.EINVAL, f"not a regular file ({_file_kind(st.st_mode)})", str(path))
        chunks, left = [], limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 24))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks), st.st_size
    finally:
        os.close(fd)


def _file_kind(mode: int) -> str:
    kinds = (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a directory"),
    )
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _parse_json(path: Path, data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise CheckpointCorruptError(path, f"not valid JSON ({exc})") from None
