"""Checkpoint files on a POSIX filesystem: crash-safe writes, the directory swap, non-blocking reads.

:func:`write_checkpoint` builds the directory in a temporary sibling, fsyncs it
and swaps it into place (``renameat2(RENAME_EXCHANGE)`` on Linux, otherwise two
renames with the old copy kept until the new one is in place), so a reader sees
the old checkpoint or the new one, never half of one. :func:`atomic_write`
does the same for one file (sharded manifests, batch jobs). :func:`_read_regular`
reads a file that must be a regular one without ever blocking on a FIFO or device.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import json
import os
import shutil
import stat
import sys
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
from safetensors.torch import save as save_safetensors

from dreampool_gpu.errors import InvalidInputError
from dreampool_gpu.persist.format import (
    BANK,
    CONFIG,
    ENCODER,
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX,
    MANIFEST,
    STATE,
    PathArg,
    PoolSnapshot,
    _digest,
    _json_bytes,
    _state_fields,
)

WRITE_LOCK = threading.RLock()
"""Serialises checkpoint writes within the process (taken before the pool's lock)."""


# ----------------------------------------------------------- one file
def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes its renames durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it before returning."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write(target: Path, write: Callable[[Path], object]) -> None:
    """Write ``target`` through a hidden sibling, fsync it and rename it into place.

    ``write(tmp)`` writes the content to the sibling path it gets. A crash leaves
    ``target`` whole or as it was; an exception (Ctrl-C included) removes the sibling.
    """
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(target.parent)


# ---------------------------------------------------------- the directory
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
    target = checked_path(path)
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


def checked_path(path: Any) -> Path:
    """``path`` as a Path: a non-empty str or os.PathLike without NUL bytes, else InvalidInputError."""
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


# ---------------------------------------------------------------- read
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
