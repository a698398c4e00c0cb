"""Checkpoints of a :class:`~dreampool_gpu.pool.DreamPool`: save/load a directory, state dicts.

:class:`Checkpointing` is mixed into the pool; the on-disk format, checksums and crash
safety are :mod:`dreampool_gpu.persist`'s, which never imports the pool.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch

from dreampool_gpu import persist
from dreampool_gpu.streams import StreamOrderedLock

if TYPE_CHECKING:
    from dreampool_gpu.pool import DreamPool


class Checkpointing:
    """Checkpoint methods of :class:`~dreampool_gpu.pool.DreamPool` (a mixin; the pool sets ``_lock``)."""

    _lock: StreamOrderedLock
    # The casts to DreamPool below are sound: this mixin is only ever a base of DreamPool.

    def save(self, path: persist.PathArg) -> None:
        """Write a checkpoint directory at ``path``, atomically (see :mod:`dreampool_gpu.persist`).

        The pool's state is copied under its lock, then written while other
        threads keep using the pool. Readers of ``path`` see the previous
        checkpoint or this one, never a mix.

        Raises:
            InvalidInputError: ``path`` is not a path, or names something that is
                not a dreampool checkpoint (it is never overwritten).
            OSError: the filesystem failed; the previous checkpoint is intact.
        """
        with persist.WRITE_LOCK:  # saves land in the order their snapshots were taken
            with self._lock:
                snap = persist.snapshot(cast("DreamPool", self))
            persist.write_checkpoint(snap, path)

    @classmethod
    def load(cls, path: persist.PathArg, *, device: str | torch.device | None = None, encoder: Any = None) -> Any:
        """Build a pool from the checkpoint at ``path``, verifying every checksum.

        A sharded checkpoint (:meth:`ShardedDreamPool.save`) opens as one pool holding
        every shard's entries, ids unchanged (:func:`dreampool_gpu.distributed.load_merged`).

        Keyword Args:
            device: where the new pool lives (default: the saved configuration's
                device). A pool saved on CUDA loads on CPU and the reverse; the
                dreams keep their saved dtype.
            encoder: for a pool saved with a user's module (or custom encoder), a fresh
                instance of the same architecture; the saved weights are loaded into it.

        Raises:
            CheckpointCorruptError: a missing, truncated or altered file (named in
                the error), or a format version newer than this library.
            DeviceUnavailableError: ``device`` is CUDA and absent.
        """
        from dreampool_gpu import distributed  # imports the pool module

        if distributed.is_sharded_checkpoint(path):  # a ShardedDreamPool's checkpoint, as one pool
            return distributed.load_merged(path, device=device)
        snap = persist.read_checkpoint(path)
        pool_cls = cast("type[DreamPool]", cls)
        pool = pool_cls(persist.config_for_load(snap, device), encoder=encoder)
        with pool._lock:
            persist.restore(pool, snap)
        return pool

    def state_dict(self) -> dict[str, Any]:
        """The pool's state as a dict of CPU tensors, bytes and plain values.

        Round-trips through ``torch.save`` / ``torch.load(weights_only=True)``, so
        the pool can ride in a training checkpoint.
        """
        with self._lock:
            return persist.to_state_dict(persist.snapshot(cast("DreamPool", self)))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Replace this pool's entries, counters and index with ``state_dict``'s.

        The pool keeps its own configuration; fields that shape the stored data
        (dream shape, embedding, encoder, metric, window) must match, and the
        capacity must hold the saved entries. Dreams are cast to this pool's dtype.

        Raises:
            InvalidInputError: not a state dict of this format, or a malformed part.
            InvalidConfigurationError: the state does not fit this pool's configuration.
            (On error the pool is unchanged.)
        """
        snap = persist.from_state_dict(state_dict)
        with self._lock:
            persist.restore(cast("DreamPool", self), snap)
