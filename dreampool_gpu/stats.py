"""What :meth:`DreamPool.stats` reports: :class:`PoolStats`, built from the pool's parts by :func:`pool_stats`."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from dreampool_gpu.counters import COUNTERS

if TYPE_CHECKING:
    from dreampool_gpu.bank import TensorBank
    from dreampool_gpu.budget import MemoryBudget
    from dreampool_gpu.cache import QueryCache
    from dreampool_gpu.search.base import SearchIndex


@dataclass(frozen=True)
class CacheStats:
    """The query cache: entries held, lookups that hit and missed, hits / lookups (0 before any)."""

    size: int
    hits: int
    misses: int
    hit_rate: float


@dataclass(frozen=True)
class PoolStats:
    """A pool's facts at one moment, host values only (no tensors).

    ``stats["size"]`` reads the key ``size`` of :meth:`to_dict` (``__getitem__`` maps every
    key of that dict, nested ones included: ``stats["cache"]["hit_rate"]``), so code that
    indexed the plain dict of earlier versions keeps working.

    Attributes:
        size: live entries. capacity: slots of the bank (the resolved capacity,
            :attr:`DreamPool.capacity`). next_id: the id the next stored entry gets.
        device: the pool's device, as a string. engine: the search engine's kind.
        counters: every counter of :data:`~dreampool_gpu.counters.COUNTERS`, by name.
        acceptance_rate: added / (added + rejected), 0 before any add.
        mean_coherence, mean_energy, mean_violation: over live entries (0 when empty).
        bytes_by_column: bytes allocated per bank column; bank_bytes: their sum.
        index_bytes: bytes of derived state the search engine holds.
        memory: budget, usage and device memory (:meth:`MemoryBudget.stats`).
        search: the engine's facts (:meth:`SearchIndex.describe`).
        cache: the query cache's :class:`CacheStats`.
    """

    size: int
    capacity: int
    device: str
    engine: str
    next_id: int
    counters: Mapping[str, int]
    acceptance_rate: float
    mean_coherence: float
    mean_energy: float
    mean_violation: float
    bytes_by_column: Mapping[str, int]
    bank_bytes: int
    index_bytes: int
    memory: Mapping[str, Any]
    search: Mapping[str, Any]
    cache: CacheStats

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-able dict (a fresh copy): the fields, with the counters at the top level by name."""
        return {
            "size": self.size,
            "capacity": self.capacity,
            "device": self.device,
            "engine": self.engine,
            "next_id": self.next_id,
            **{name: self.counters[name] for name in COUNTERS},
            "acceptance_rate": self.acceptance_rate,
            "mean_coherence": self.mean_coherence,
            "mean_energy": self.mean_energy,
            "mean_violation": self.mean_violation,
            "bytes_by_column": dict(self.bytes_by_column),
            "bank_bytes": self.bank_bytes,
            "index_bytes": self.index_bytes,
            "memory": copy.deepcopy(dict(self.memory)),
            "search": copy.deepcopy(dict(self.search)),
            "cache": {
                "size": self.cache.size,
                "hits": self.cache.hits,
                "misses": self.cache.misses,
                "hit_rate": self.cache.hit_rate,
            },
        }

    def __getitem__(self, key: str) -> Any:
        """``to_dict()[key]``: read access by the keys of the plain dict.

        Raises:
            KeyError: ``key`` is not a key of :meth:`to_dict`.
        """
        return self.to_dict()[key]


def pool_stats(
    bank: TensorBank,
    index: SearchIndex,
    budget: MemoryBudget,
    cache: QueryCache,
    counters: Mapping[str, int],
    device: torch.device,
) -> PoolStats:
    """The :class:`PoolStats` of a pool made of these parts (the caller holds the pool's lock).

    Reads each mean from the device once (a host sync per mean on CUDA).
    """
    alive = bank.alive()
    size = bank.size

    def mean(name: str) -> float:
        return float(bank.columns[name][alive].float().mean()) if size else 0.0

    bytes_by_column = bank.nbytes()
    added, rejected = counters["added"], counters["rejected"]
    return PoolStats(
        size=size,
        capacity=bank.capacity,
        device=str(device),
        engine=index.kind,
        next_id=bank.next_id,
        counters={name: int(counters[name]) for name in COUNTERS},
        acceptance_rate=added / max(1, added + rejected),
        mean_coherence=mean("coherence"),
        mean_energy=mean("energy"),
        mean_violation=mean("violation"),
        bytes_by_column=bytes_by_column,
        bank_bytes=sum(bytes_by_column.values()),
        index_bytes=index.nbytes(),
        memory=budget.stats(bank, index),
        search=index.describe(),
        cache=CacheStats(size=len(cache), hits=cache.hits, misses=cache.misses, hit_rate=cache.hit_rate),
    )
