"""Crash-safe file writes: moved to :mod:`dreampool_gpu.persist.files`; importable from here as before."""

from dreampool_gpu.persist.files import atomic_write, fsync_path, write_synced

__all__ = ["atomic_write", "fsync_path", "write_synced"]
