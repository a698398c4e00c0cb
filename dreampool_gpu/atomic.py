"""Crash-safe file writes, shared by checkpoints (:mod:`persist`), sharded manifests and batch jobs."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


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
