"""The checkpoint format: its file names, :class:`PoolSnapshot`, the checks that assemble one
from its parts, the state-dict form, and the index file's bank tag.

A checkpoint is a directory::

    manifest.json      format name and version, sha256 + size of every other file,
                       and a digest of the manifest itself
    config.json        PoolConfig.to_dict()
    state.json         bank scalars (size, next_id, extent), the pool's capacity, counters, index kind,
                       the eviction policy's state (generator and counts), when it has one
    bank.safetensors   every bank column, rows [0, extent) (slot layout preserved)
    encoder.safetensors the encoder's state (statistics or weights) the embeddings were made with
    index.bin          the search engine's serialized state, when it has any

Format 3 adds user columns (``PoolConfig.columns``): declared in ``config.json``, stored in
``bank.safetensors`` after the bank's own columns; a checkpoint whose configuration declares
a column its bank lacks is refused. Formats 1 and 2 have none and load as they are (their
configuration declares no columns). Format 1 (before encoders had state) is still read: its
embeddings came from an older feature encoder, so a pool loaded from it re-embeds its bank.

The same content travels as a plain dict (:func:`to_state_dict`,
:func:`from_state_dict`) that survives ``torch.save`` /
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias, cast

import torch

from dreampool_gpu import _validation as v
from dreampool_gpu.bank import column_specs
from dreampool_gpu.config import DREAM_DTYPES, PoolConfig
from dreampool_gpu.dreams import NUM_HUE_CATEGORIES
from dreampool_gpu.errors import DreamPoolError, InvalidInputError
from dreampool_gpu.eviction import check_state

FORMAT_NAME = "dreampool-checkpoint"
FORMAT_VERSION = 3
MANIFEST = "manifest.json"
CONFIG = "config.json"
STATE = "state.json"
BANK = "bank.safetensors"
INDEX = "index.bin"
ENCODER = "encoder.safetensors"
_REQUIRED = (CONFIG, STATE, BANK)
_PART_FILE = {"config": CONFIG, "state": STATE, "bank": BANK, "encoder": ENCODER}
# Config fields that shape what the bank stores: a state can only go into a pool that agrees on them.
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


# ------------------------------------------------------------- index tag
_INDEX_MAGIC = b"dreampool-index-of-bank:"


def bank_digest(columns: dict[str, torch.Tensor]) -> str:
    """sha256 of what a search index is built from: the ``ids`` and ``embeddings`` columns."""
    h = hashlib.sha256()
    for name in ("ids", "embeddings"):
        h.update(columns[name].contiguous().view(torch.uint8).numpy().data)  # .data: the array's buffer
    return h.hexdigest()


def tag_index(engine_bytes: bytes, digest: str) -> bytes:
    """Index bytes behind a header naming the bank digest they were built from."""
    return _INDEX_MAGIC + digest.encode() + b"\n" + engine_bytes


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------- validation
def _check_int(value: Any, where: str, name: str, low: int, high: int | None = None) -> int:
    if not v.int_in_range(value, low, high):
        raise _Invalid(where, f"{name}: {v.int_range_text(low, high)}", repr(value))
    return value


def _build(
    config: Any,
    state: Any,
    columns: Any,
    index_bytes: Any,
    encoder_state: Any = None,
    cache: Any = None,
    *,
    version: int = FORMAT_VERSION,
) -> PoolSnapshot:
    """Validate the parts of a snapshot of format ``version`` against each other and assemble it."""
    if not isinstance(config, dict):
        raise _Invalid("config", "a mapping of PoolConfig fields", type(config).__name__)
    try:
        cfg = PoolConfig.from_dict(config)
    except DreamPoolError as exc:
        raise _Invalid("config", "a valid PoolConfig", str(exc)) from None
    if version < 3 and cfg.columns:  # user columns came with format 3
        raise _Invalid("config", f"no user columns in a format-{version} checkpoint", f"columns {dict(cfg.columns)}")
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
    _check_format_encoder(version, kind, cfg, encoder_state)
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


def _check_format_encoder(version: int, kind: str, cfg: PoolConfig, encoder_state: Any) -> None:
    """Format 2 carries the encoder's state; format 1 (before encoders had state) holds only
    feature-encoder pools, whose bank is re-embedded on load. Anything else would load a
    fresh encoder beside embeddings of another (a learned pool relabelled as format 1)."""
    if version >= 2 and encoder_state is None:
        raise _Invalid("encoder", f"the encoder's state (format {version} carries it)", "none (missing)")
    if version == 1 and encoder_state is not None:
        raise _Invalid("encoder", "no encoder state in a format-1 checkpoint", "an encoder state")
    if version == 1 and (kind != "features" or cfg.encoder != "features"):
        raise _Invalid(
            "encoder",
            "a feature-encoder pool, the only kind a format-1 checkpoint holds (it carries no encoder state)",
            f"encoder_kind {kind!r}, config encoder {cfg.encoder!r}, and no encoder state (missing)",
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
    specs = column_specs(cfg.dream_shape, cfg.embedding_dim, torch.float32, cfg.columns)
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
            version=cast(int, version),  # an int: _version_problem said so
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


# ------------------------------------------------------------------ digests
def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True, allow_nan=False).encode()


def _digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
