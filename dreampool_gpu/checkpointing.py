"""Checkpoints of a :class:`~dreampool_gpu.pool.DreamPool`: save/load a directory, state dicts.

Functions over the pool's :class:`~dreampool_gpu.parts.PoolParts`. A pool's state is composed from its parts,
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
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from dreampool_gpu import persist
from dreampool_gpu.config import PoolConfig

if TYPE_CHECKING:
    from dreampool_gpu.parts import PoolParts
    from dreampool_gpu.pool import DreamPool

logger = logging.getLogger(__name__)

P = TypeVar("P", bound="DreamPool")


def snapshot(pool: PoolParts) -> persist.PoolSnapshot:
    """The pool's state, composed from its parts' ``state_dict`` (caller holds the pool's lock).

    Every tensor is a host copy (not a view), so the pool may change as soon as the lock
    is released.
    """
    bank = pool.bank.state_dict()
    columns = bank["columns"]
    index = pool.index.state_dict()
    return persist.PoolSnapshot(
        config=pool.config,
        capacity=pool.bank.capacity,
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


def restore(pool: PoolParts, snap: persist.PoolSnapshot) -> None:
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
    pool.encoders.restore(snap.encoder_state)
    _restore_index(pool, snap)


def _restore_index(pool: PoolParts, snap: persist.PoolSnapshot) -> None:
    state = persist.index_state(snap, pool.bank.revision)
    try:
        restored = pool.index.load_state_dict(state)
    except Exception as exc:  # any engine failure is recoverable: the bank is the truth (the index was rebuilt)
        warnings.warn(
            f"search index ({snap.index_kind}) could not be restored ({exc!r}); rebuilt from the bank",
            persist.CheckpointRecoveryWarning,
            stacklevel=5,  # the caller of DreamPool.load / load_state_dict
        )
        return
    if not restored and state["data"] is not None:
        logger.info("checkpoint index is %s, pool uses %s: rebuilding from the bank", snap.index_kind, pool.index.kind)


def build_pool(
    cls: type[P], config: PoolConfig, capacity: int | None, *, encoder: Any = None, eviction: Any = None
) -> P:
    """A new ``cls`` pool of ``config`` with ``capacity`` slots: a saved pool's resolved capacity.

    The bank is fitted to ``capacity`` (lowered only where the budget on the pool's device
    cannot hold it) and ``pool.config`` stays ``config`` as saved, the user's. ``capacity``
    None (a checkpoint from before the capacity was saved) fits ``config`` anew.
    """
    if capacity is None or capacity == config.capacity:
        return cls(config, encoder=encoder, eviction=eviction)
    pool = cls(config.replace(capacity=capacity), encoder=encoder, eviction=eviction)
    pool.config = config  # the fitted capacity lives on the bank (pool.capacity), not in the config
    return pool


def reduce(pool: DreamPool) -> tuple[Any, tuple[Any, ...]]:
    """:meth:`DreamPool.__reduce__`: how to rebuild the pool, from its :meth:`DreamPool.state_dict`.

    A user's encoder or eviction policy rides along as the object itself (pickled by value);
    the built-in ones are made anew from the configuration, then take their saved state.
    """
    from dreampool_gpu.eviction import policy_type

    parts = pool.parts
    with parts.lock:
        state = persist.to_state_dict(snapshot(parts))
        encoder = parts.encoder if persist.encoder_kind(parts.encoder) in ("module", "custom") else None
        eviction = None if type(parts.eviction) is policy_type(parts.config.eviction_policy) else parts.eviction
    return rebuild, (type(pool), state, encoder, eviction)


def rebuild(cls: type[P], state: dict[str, Any], encoder: Any, eviction: Any) -> P:
    """The pool :func:`reduce` describes: a ``cls`` pool of the saved configuration, device and capacity."""
    return _restored(cls, persist.from_state_dict(state), None, encoder=encoder, eviction=eviction)


def _restored(
    cls: type[P], snap: persist.PoolSnapshot, device: str | torch.device | None, *, encoder: Any, eviction: Any = None
) -> P:
    """A new ``cls`` pool holding ``snap`` on ``device`` (None: the saved one)."""
    pool = build_pool(cls, persist.config_for_load(snap, device), snap.capacity, encoder=encoder, eviction=eviction)
    with pool.parts.lock:
        restore(pool.parts, snap)
    return pool


def save(pool: PoolParts, path: persist.PathArg) -> None:
    """:meth:`DreamPool.save`: the state copied under the pool's lock, then written outside it."""
    with persist.WRITE_LOCK:  # saves land in the order their snapshots were taken
        with pool.lock:
            snap = snapshot(pool)
        persist.write_checkpoint(snap, path)


def load(cls: type[P], path: persist.PathArg, *, device: str | torch.device | None, encoder: Any) -> P:
    """:meth:`DreamPool.load` of a single pool's checkpoint, as a ``cls``."""
    return _restored(cls, persist.read_checkpoint(path), device, encoder=encoder)


def state_dict(pool: PoolParts) -> dict[str, Any]:
    """:meth:`DreamPool.state_dict`."""
    with pool.lock:
        return persist.to_state_dict(snapshot(pool))


def load_state_dict(pool: PoolParts, state: dict[str, Any]) -> None:
    """:meth:`DreamPool.load_state_dict`."""
    snap = persist.from_state_dict(state)
    with pool.lock:
        restore(pool, snap)
