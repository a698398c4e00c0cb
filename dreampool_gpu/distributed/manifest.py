"""The manifest of a sharded checkpoint: its schema, its verification, its atomic commit.

A sharded checkpoint is a directory: ``manifest.json`` names one generation
(``gen-<hex>``) and lists its shards, each a single-pool checkpoint at
``<generation>/shard-<rank:05d>``. Replacing the manifest commits a save.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dreampool_gpu import persist
from dreampool_gpu.config import DREAM_DTYPES, PoolConfig
from dreampool_gpu.distributed.collectives import _fingerprint
from dreampool_gpu.distributed.ids import _TAG, TAG_BITS, _is_int, _watermark_problem
from dreampool_gpu.errors import CheckpointCorruptError, DreamPoolError, InvalidInputError
from dreampool_gpu.persist.files import atomic_write, checked_path, fsync_path, write_synced

SHARDED_FORMAT = "dreampool-sharded-checkpoint"
SHARDED_VERSION = 2  # 2: each shard listed with its rank, generation and manifest sha256 (1 is still read)
_MANIFEST = "manifest.json"
_MANIFEST_MAX = 1 << 20  # bytes: a manifest listing ~1,000 shards
_GENERATION = re.compile(r"gen-[0-9a-f]{16,32}")  # version 1 wrote 16 digits; uuid4 hex is 32
_SHA256 = re.compile(r"[0-9a-f]{64}")
# fields of PoolConfig that may differ between shards; every other field must agree
_PER_SHARD_FIELDS = ("capacity", "device", "memory_budget_mb")


@dataclass(frozen=True)
class _ShardEntry:
    """One shard as the sharded manifest lists it (checked by :func:`_parse_manifest`)."""

    rank: int
    path: str  # relative to the checkpoint: "<generation>/shard-<rank:05d>"
    digest: str | None  # sha256 of the shard's own manifest.json (None in version 1)
    size: int
    watermarks: dict[int, int]  # tag -> the next id that tag would issue
    counters: dict[str, int]
    config: PoolConfig
    dream_dtype: str


@dataclass(frozen=True)
class _Manifest:
    """A verified sharded manifest: ``world_size`` shards of one generation, in rank order."""

    path: Path  # the manifest file
    version: int
    world_size: int
    generation: str
    shards: list[_ShardEntry]


def is_sharded_checkpoint(path: Any) -> bool:
    """True when ``path`` is a directory holding a sharded checkpoint's manifest."""
    try:
        manifest = json.loads(persist.read_manifest_bytes(Path(os.fspath(path)) / _MANIFEST))
    except (OSError, TypeError, ValueError, RecursionError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == SHARDED_FORMAT


def _check_target(path: Any) -> Path:
    root = checked_path(path)
    if root.exists() and not is_sharded_checkpoint(root) and (not root.is_dir() or any(root.iterdir())):
        raise InvalidInputError(
            "path", "a sharded checkpoint, an empty directory or a new path", f"{root}, which holds something else"
        )
    return root


def _target_fields(root: Path, manifest: bytes | None) -> list[int]:
    """Agreement fields of a checkpoint path: its absolute path and the manifest found there (0: none)."""
    return [_fingerprint(os.fsencode(os.path.abspath(root))), 0 if manifest is None else _fingerprint(manifest)]


def _manifest_bytes(root: Path) -> bytes | None:
    """The manifest file's bytes, None when there is none (never blocks on a special file)."""
    try:
        return persist.read_manifest_bytes(root / _MANIFEST)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CheckpointCorruptError(root / _MANIFEST, f"unreadable sharded manifest ({exc})") from None


def _digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _manifest_data(generation: str, shards: list[dict[str, Any]]) -> bytes:
    body = {
        "format": SHARDED_FORMAT,
        "version": SHARDED_VERSION,
        "world_size": len(shards),
        "tag_bits": TAG_BITS,
        "generation": generation,
        "shards": shards,
    }
    return json.dumps({**body, "digest": _digest(body)}, indent=2, sort_keys=True).encode()


def _commit_manifest(root: Path, generation: str, shards: list[dict[str, Any]]) -> None:
    """Commit ``generation``: check the manifest naming its shards reads back, then write
    ``root/manifest.json`` through a temporary file (fsync, rename, fsync the directory)."""
    data = _manifest_data(generation, shards)
    _parse_manifest(root / _MANIFEST, data)  # never commit what a load would refuse
    fsync_path(root)  # the generation directory's entry is durable before the manifest names it
    atomic_write(root / _MANIFEST, lambda tmp: write_synced(tmp, data))


def _committed_generation(root: Path) -> str | None:
    """The generation the manifest at ``root`` names; None when there is no manifest.

    Raises:
        CheckpointCorruptError: a manifest that cannot be read or verified.
    """
    data = _manifest_bytes(root)
    return None if data is None else _parse_manifest(root / _MANIFEST, data).generation


def read_manifest(root: Path) -> _Manifest:
    """The verified manifest of the sharded checkpoint at ``root`` (see :func:`_parse_manifest`).

    Raises:
        CheckpointCorruptError: missing, unreadable or malformed, naming the manifest file.
    """
    data = _manifest_bytes(root)
    if data is None:
        raise CheckpointCorruptError(root / _MANIFEST, "missing")
    return _parse_manifest(root / _MANIFEST, data)


def _parse_manifest(target: Path, data: bytes) -> _Manifest:
    """Verify a sharded manifest's bytes as a single checkpoint's manifest is verified.

    Checked: format, version, digest; every field's type; world size = number of shards;
    shard ``r`` listed once, at index ``r``, at the relative path ``<generation>/shard-<r>``
    (nothing absolute, no ``..``); its tags ``t`` with ``t % world_size == r`` and watermarks
    inside their tag; the configuration shared by every shard (capacity, device and
    memory budget aside); in version 2, each shard's rank, generation and manifest sha256.

    Raises:
        CheckpointCorruptError: naming ``target``, for every problem.
    """

    def bad(reason: str) -> CheckpointCorruptError:
        return CheckpointCorruptError(target, reason)

    if len(data) > _MANIFEST_MAX:
        raise bad(f"larger than a sharded manifest can be ({_MANIFEST_MAX} bytes)")
    try:
        manifest = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise bad(f"unreadable sharded manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != SHARDED_FORMAT:
        raise bad(f"not a {SHARDED_FORMAT} manifest")
    body = {k: val for k, val in manifest.items() if k != "digest"}
    if manifest.get("digest") != _digest(body):
        raise bad("digest mismatch (the manifest was altered)")
    version = manifest.get("version")
    if not isinstance(version, int) or not _is_int(version, 1, SHARDED_VERSION) or manifest.get("tag_bits") != TAG_BITS:
        raise bad(
            f"expected version 1..{SHARDED_VERSION} with tag_bits {TAG_BITS}, got version {version!r} "
            f"and tag_bits {manifest.get('tag_bits')!r} (a newer version: upgrade dreampool_gpu)"
        )
    world, generation, shards = manifest.get("world_size"), manifest.get("generation"), manifest.get("shards")
    if not _is_int(world, 1, 1 << (63 - TAG_BITS)):
        raise bad(f"expected world_size: an int >= 1, got {world!r}")
    if not isinstance(generation, str) or not _GENERATION.fullmatch(generation):
        raise bad(f"expected generation: 'gen-' and 16 to 32 hex digits, got {repr(generation)[:80]}")
    if not isinstance(shards, list) or len(shards) != world:
        got = f"{len(shards)} shards" if isinstance(shards, list) else type(shards).__name__
        raise bad(f"expected world_size {world} shards (one per rank), got {got}")
    entries = [_parse_entry(bad, raw, r, world, generation, version) for r, raw in enumerate(shards)]
    shared = [{k: val for k, val in e.config.to_dict().items() if k not in _PER_SHARD_FIELDS} for e in entries]
    for r, fields in enumerate(shared):
        if fields != shared[0]:
            raise bad(f"shard {r}'s configuration differs from shard 0's (only {', '.join(_PER_SHARD_FIELDS)} may)")
    return _Manifest(target, version, world, generation, entries)


def _parse_entry(
    bad: Callable[[str], CheckpointCorruptError], raw: Any, rank: int, world: int, generation: str, version: int
) -> _ShardEntry:
    """Shard ``rank``'s manifest entry, every field checked (see :func:`_parse_manifest`)."""
    if not isinstance(raw, dict):
        raise bad(f"expected shard {rank}: a mapping, got {type(raw).__name__}")
    required: tuple[str, ...] = ("path", "size", "watermarks", "counters", "config", "dream_dtype")
    required += ("rank", "generation", "shard_digest") if version >= 2 else ()
    missing = [key for key in required if key not in raw]
    if missing:
        raise bad(f"expected shard {rank} to list {', '.join(required)}, got no {missing[0]!r}")
    if version >= 2 and (not _is_int(raw["rank"], 0) or raw["rank"] != rank or raw["generation"] != generation):
        raise bad(
            f"expected shard {rank} to be rank {rank} of generation {generation}, "
            f"got rank {repr(raw['rank'])[:40]} of {repr(raw['generation'])[:80]} (listed twice, or out of order)"
        )
    expected_path = f"{generation}/shard-{rank:05d}"
    if raw["path"] != expected_path:
        raise bad(
            f"expected shard {rank} at the relative path {expected_path!r} inside the checkpoint, "
            f"got {repr(raw['path'])[:120]}"
        )
    digest = raw.get("shard_digest") if version >= 2 else None
    if version >= 2 and not (isinstance(digest, str) and _SHA256.fullmatch(digest)):
        raise bad(f"expected shard {rank}'s shard_digest: 64 hex digits, got {repr(digest)[:80]}")
    if not _is_int(raw["size"], 0):
        raise bad(f"expected shard {rank}'s size: an int >= 0, got {repr(raw['size'])[:40]}")
    marks = raw["watermarks"]
    if not isinstance(marks, dict) or not marks:
        raise bad(f"expected shard {rank}'s watermarks: a non-empty mapping of tag -> next id, got {repr(marks)[:80]}")
    watermarks: dict[int, int] = {}
    for key, mark in marks.items():
        tag = int(key) if isinstance(key, str) and _TAG.fullmatch(key) else -1
        problem = _watermark_problem(tag, mark, rank, world) if tag >= 0 else f"tag {repr(key)[:40]} is not an int"
        if problem is not None:
            raise bad(f"shard {rank}'s watermarks: {problem}")
        watermarks[tag] = mark
    counters = raw["counters"]
    if not isinstance(counters, dict) or not all(isinstance(k, str) and _is_int(c, 0) for k, c in counters.items()):
        raise bad(f"expected shard {rank}'s counters: a mapping of name -> int >= 0, got {repr(counters)[:80]}")
    try:
        config = PoolConfig.from_dict(raw["config"])
    except (DreamPoolError, TypeError, ValueError) as exc:
        raise bad(f"expected shard {rank}'s config: a PoolConfig, got {str(exc)[:200]}") from None
    dtype = raw["dream_dtype"]
    if not isinstance(dtype, str) or dtype not in DREAM_DTYPES or dtype == "auto":
        raise bad(f"expected shard {rank}'s dream_dtype: a stored dtype name, got {repr(dtype)[:40]}")
    return _ShardEntry(rank, expected_path, digest, raw["size"], watermarks, dict(counters), config, dtype)


def _remove_generations(root: Path, generation: str, *, keep_new: bool) -> None:
    """After a save of ``generation``: every other generation and temporary manifest once it is
    committed (``keep_new``), else ``generation`` itself unless the manifest names it. Best
    effort: leftovers are removed by a later save, and a load only reads what the manifest names."""
    if not keep_new:
        try:
            keep_new = _committed_generation(root) == generation
        except CheckpointCorruptError:
            return
        if not keep_new:
            shutil.rmtree(root / generation, ignore_errors=True)
        return
    for stale in root.glob("gen-*"):
        if stale.name != generation:
            shutil.rmtree(stale, ignore_errors=True)
    for tmp in root.glob(f".{_MANIFEST}.tmp-*"):  # a manifest write killed before its rename
        tmp.unlink(missing_ok=True)
