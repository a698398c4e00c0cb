"""Checkpoints of a :class:`~dreampool_gpu.pool.DreamPool`: save/load a directory, state dicts.

:class:`Checkpointing` is mixed into the pool. A pool's state is composed from its parts,
each giving and taking its own (:func:`snapshot`, :func:`restore`): the bank
(``TensorBank.state_dict``), the search index (``SearchIndex.state_dict``), the query
cache (``QueryCache.state_dict``), the encoder (``state_dict``), the eviction policy's generator
and counts (``Eviction.state_dict``) and the counters. The
on-disk format, checksums and crash safety are :mod:`dreampool_gpu.persist`'s, which
never imports the pool.
"""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch

from dreampool_gpu import persist
from dreampool_gpu.config import PoolConfig
from dreampool_gpu.streams import StreamOrderedLock

if TYPE_CHECKING:
    from dreampool_gpu.pool import DreamPool

logger = logging.getLogger(__name__)

P = TypeVar("P", bound="DreamPool")


def snapshot(pool: DreamPool) -> persist.PoolSnapshot:
    """The pool's state, composed from its parts' ``state_dict`` (caller holds the pool's lock).

    Every tensor is a host copy (not a view), so the pool may change as soon as the lock
    is released.
    """
    bank = pool.bank.state_dict()
    columns = bank["columns"]
    index = pool.index.state_dict()
    return persist.PoolSnapshot(
        config=pool.config,
        capacity=pool.capacity,
        size=bank["size"],
        next_id=bank["next_id"],
        extent=bank["extent"],
        counters=dict(pool.counters),
        columns=columns,
        index_kind=index["kind"],
        index_bytes=None if index["data"] is None else persist.tag_index(index["data"], persist.bank_digest(columns)),
        encoder_kind=persist.encoder_kind(pool.encoder),
        encoder_state={
            name: t.detach().to("cpu", copy=True).contiguous() for name, t in pool.encoder.state_dict().items()
        },
        cache=pool.cache.state_dict(),
        eviction=pool.eviction.state_dict() or None,
    )


def restore(pool: DreamPool, snap: persist.PoolSnapshot) -> None:
    """Replace the pool's bank, counters, encoder state, cache and index with ``snap``'s (caller holds the lock).

    Every check runs before the first write (:func:`persist.check_restorable`): on error
    the pool is unchanged. Each part then loads its own state: the bank (dreams cast to
    the pool's dtype), the counters, the encoder (a format-1 snapshot re-embeds the bank),
    the query cache (emptied) and the index (the saved engine state when it was built
    from this bank and the engine kind matches, else rebuilt from the bank).

    Raises:
        InvalidConfigurationError: the pool's configuration cannot hold ``snap``.
        CheckpointCorruptError, InvalidInputError: the snapshot's data is inconsistent.
    """
    persist.check_restorable(pool, snap)
    pool.bank.load_state_dict(
        {"columns": snap.columns, "size": snap.size, "next_id": snap.next_id, "extent": snap.extent}
    )
    pool.counters.update({key: snap.counters.get(key, 0) for key in pool.counters})
    pool.eviction.load_state_dict(snap.eviction, pool.bank)  # None (older checkpoints): starts afresh
    pool.cache.load_state_dict(snap.cache if snap.cache is not None else pool.cache.state_dict())
    pool._restore_encoder(snap.encoder_state)  # noqa: SLF001 - the pool's hook for its checkpoint
    _restore_index(pool, snap)


def _restore_index(pool: DreamPool, snap: persist.PoolSnapshot) -> None:
    state = persist.index_state(snap, pool.bank.revision)
    try:
        restored = pool.index.load_state_dict(state)
    except Exception as exc:  # any engine failure is recoverable: the bank is the truth (the index was rebuilt)
        warnings.warn(
            f"search index ({snap.index_kind}) could not be restored ({exc!r}); rebuilt from the bank",
            persist.CheckpointRecoveryWarning,
            stacklevel=4,
        )
        return
    if not restored and state["data"] is not None:
        logger.info("checkpoint index is %s, pool uses %s: rebuilding from the bank", snap.index_kind, pool.index.kind)


def build_pool(cls: type[P], config: PoolConfig, capacity: int | None, *, encoder: Any = None) -> P:
    """A new ``cls`` pool of ``config`` with ``capacity`` slots: a saved pool's resolved capacity.

    The bank is fitted to ``capacity`` (lowered only where the budget on the pool's device
    cannot hold it) and ``pool.config`` stays ``config`` as saved, the user's. ``capacity``
    None (a checkpoint from before the capacity was saved) fits ``config`` anew.
    """
    if capacity is None or capacity == config.capacity:
        return cls(config, encoder=encoder)
    pool = cls(config.replace(capacity=capacity), encoder=encoder)
    pool.config = config  # the fitted capacity lives on the bank (pool.capacity), not in the config
    return pool


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
                snap = snapshot(cast("DreamPool", self))
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
        pool = build_pool(
            cast("type[DreamPool]", cls), persist.config_for_load(snap, device), snap.capacity, encoder=encoder
        )
        with pool._lock:
            restore(pool, snap)
        return pool

    def state_dict(self) -> dict[str, Any]:
        """The pool's state as a dict of CPU tensors, bytes and plain values.

        Round-trips through ``torch.save`` / ``torch.load(weights_only=True)``, so
        the pool can ride in a training checkpoint.
        """
        with self._lock:
            return persist.to_state_dict(snapshot(cast("DreamPool", self)))

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
            restore(cast("DreamPool", self), snap)
