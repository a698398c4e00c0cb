"""Verified reads of a checkpoint directory.

:func:`read_checkpoint` verifies every checksum on the very bytes it parses and
reads again when a concurrent save swapped the directory. A missing or corrupt
index file is recovered by rebuilding from the bank (with a
:class:`CheckpointRecoveryWarning`); anything else that is wrong raises
:class:`~dreampool_gpu.errors.CheckpointCorruptError` naming the file. Reading
never writes to disk.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from dreampool_gpu.errors import CheckpointCorruptError, CheckpointNotFoundError
from dreampool_gpu.persist.files import _MANIFEST_MAX, _NotRegular, _read_regular, _siblings, checked_path
from dreampool_gpu.persist.format import (
    _PART_FILE,
    _REQUIRED,
    BANK,
    CONFIG,
    ENCODER,
    FORMAT_NAME,
    INDEX,
    MANIFEST,
    STATE,
    CheckpointRecoveryWarning,
    PathArg,
    PoolSnapshot,
    _build,
    _digest,
    _Invalid,
    _version_problem,
)

_READ_ATTEMPTS = 20  # reads restarted (with a growing pause) when a concurrent save swaps the directory


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
    target = checked_path(path)
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
    target = checked_path(path)
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
        kind = "a torch.save file" if target.is_file() and zipfile.is_zipfile(target) else "a file"  # never open a FIFO
        raise CheckpointCorruptError(
            target,
            f"{kind}, not a checkpoint directory (DreamPool.save writes a directory); a pool.state_dict() "
            "saved with torch.save loads with pool = DreamPool(config); "
            "pool.load_state_dict(torch.load(path, weights_only=True))",
        )
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
    files, version = _read_manifest(target)
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
        snap = _build(config, state, columns, index_bytes, encoder_state, version=version)
    except _Invalid as exc:
        raise CheckpointCorruptError(target / _PART_FILE[exc.where], str(exc)) from None
    snap.origin = target
    return snap


def _read_manifest(target: Path) -> tuple[dict[str, dict[str, Any]], int]:
    """The manifest's file table and format version, after checking format, version and digest."""
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
    return files, manifest["format_version"]


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


def _parse_json(path: Path, data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise CheckpointCorruptError(path, f"not valid JSON ({exc})") from None
