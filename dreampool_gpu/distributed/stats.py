"""The statistics of a sharded pool: totals over the shards, plus each shard's own."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dreampool_gpu.counters import COUNTERS
from dreampool_gpu.stats import CacheStats, PoolStats


@dataclass(frozen=True)
class ShardedPoolStats(PoolStats):
    """A sharded pool's :class:`PoolStats`: totals over the shards, plus each shard's own.

    Summed over the shards: size, capacity, counters, bytes, index bytes and the cache's
    size, hits and misses (acceptance and hit rates from the sums); the means weighted
    by each shard's size; ``engine`` the shards' engine kinds, comma-joined when they
    differ. This rank's shard's: ``device``, ``next_id`` (the id its next local add
    issues), ``memory`` and ``search`` (facts of one device and one index).

    Attributes:
        world_size: ranks in the group. shards: every shard's :class:`PoolStats`, in rank order.
    """

    world_size: int
    shards: tuple[PoolStats, ...]

    def to_dict(self) -> dict[str, Any]:
        """:meth:`PoolStats.to_dict`, plus ``world_size`` and ``shards`` (each shard's ``to_dict()``)."""
        return {**super().to_dict(), "world_size": self.world_size, "shards": [s.to_dict() for s in self.shards]}


def _sharded_stats(every: list[PoolStats], rank: int) -> ShardedPoolStats:
    """Every shard's stats (rank order) as the whole pool's, seen from ``rank``."""
    mine, size = every[rank], sum(s.size for s in every)
    counters = {name: sum(int(s.counters[name]) for s in every) for name in COUNTERS}
    added, rejected = counters["added"], counters["rejected"]
    hits, misses = sum(s.cache.hits for s in every), sum(s.cache.misses for s in every)
    bytes_by_column = {name: sum(s.bytes_by_column.get(name, 0) for s in every) for name in mine.bytes_by_column}

    def mean(name: str) -> float:
        return sum(getattr(s, name) * s.size for s in every) / size if size else 0.0

    return ShardedPoolStats(
        size=size,
        capacity=sum(s.capacity for s in every),
        device=mine.device,
        engine=",".join(dict.fromkeys(s.engine for s in every)),
        next_id=mine.next_id,
        counters=counters,
        acceptance_rate=added / max(1, added + rejected),
        mean_coherence=mean("mean_coherence"),
        mean_energy=mean("mean_energy"),
        mean_violation=mean("mean_violation"),
        bytes_by_column=bytes_by_column,
        bank_bytes=sum(s.bank_bytes for s in every),
        index_bytes=sum(s.index_bytes for s in every),
        memory=mine.memory,
        search=mine.search,
        cache=CacheStats(
            size=sum(s.cache.size for s in every),
            hits=hits,
            misses=misses,
            hit_rate=hits / (hits + misses) if hits + misses else 0.0,
        ),
        world_size=len(every),
        shards=tuple(every),
    )
