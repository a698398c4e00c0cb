"""PoolStats: the typed result of DreamPool.stats(), its plain dict, and read access by key."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from dreampool_gpu import DreamPool, PoolConfig, PoolStats
from dreampool_gpu.counters import COUNTERS
from dreampool_gpu.stats import CacheStats

# The plain dict's keys, in order, as DreamPool.stats() returned them before it was typed.
KEYS = [
    "size",
    "capacity",
    "device",
    "engine",
    "next_id",
    "added",
    "rejected",
    "evicted",
    "dropped",
    "queries",
    "feedback",
    "acceptance_rate",
    "mean_coherence",
    "mean_energy",
    "mean_violation",
    "bytes_by_column",
    "bank_bytes",
    "index_bytes",
    "memory",
    "search",
    "cache",
]


@pytest.fixture
def pool():
    pool = DreamPool(
        PoolConfig(dream_shape=(2, 2, 1), capacity=6, device="cpu", coherence_threshold=0.5, engine="torch")
    )
    g = torch.Generator().manual_seed(0)
    dreams = torch.rand(10, 2, 2, 1, 3, generator=g)
    coherence = torch.tensor([0.9, 0.8, 0.1, 0.7, 0.6, 0.95, 0.2, 0.85, 0.75, 0.65])
    pool.add(dreams, coherence=coherence, energy=torch.arange(10.0))
    chroma = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.9, 0.1]])  # chroma queries go through the query cache
    pool.retrieve(chroma, k=2, mode="hybrid")
    pool.retrieve(chroma, k=2, mode="hybrid")  # two misses, then two hits
    return pool


def test_typed_fields(pool):
    stats = pool.stats()
    assert isinstance(stats, PoolStats) and isinstance(stats.cache, CacheStats)
    assert stats.size == len(pool) == 6 and stats.capacity == pool.capacity == 6
    assert stats.counters == {"added": 6, "rejected": 2, "evicted": 0, "dropped": 2, "queries": 4, "feedback": 0}
    assert list(stats.counters) == list(COUNTERS)
    assert stats.acceptance_rate == 6 / (6 + 2)  # added / (added + rejected)
    assert stats.cache.hits == 2 and stats.cache.misses == 2 and stats.cache.hit_rate == 0.5
    live = pool.bank.alive()
    assert stats.mean_energy == pytest.approx(float(pool.bank.columns["energy"][live].mean()))
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.size = 0  # type: ignore[misc]


def test_to_dict_is_the_plain_dict(pool):
    stats = pool.stats()
    plain = stats.to_dict()
    assert list(plain) == KEYS
    assert json.loads(json.dumps(plain)) == plain  # JSON-able, nothing lost
    assert plain["cache"] == {"size": 2, "hits": 2, "misses": 2, "hit_rate": 0.5}
    assert plain["search"]["kind"] == plain["engine"] == "exact-torch"
    assert plain["bank_bytes"] == sum(plain["bytes_by_column"].values())
    assert all(plain[name] == stats.counters[name] for name in COUNTERS)
    plain["memory"]["budget_bytes"] = -1  # a fresh copy: the stats are not changed through it
    assert stats.to_dict()["memory"]["budget_bytes"] is None


def test_read_access_by_key(pool):
    stats = pool.stats()
    assert stats["size"] == stats.size and stats["added"] == stats.counters["added"]
    assert stats["cache"]["hit_rate"] == stats.cache.hit_rate
    assert stats["memory"]["within_budget"] is True
    with pytest.raises(KeyError):
        stats["no such key"]


def test_empty_pool():
    stats = DreamPool(PoolConfig(dream_shape=(2, 2, 1), capacity=3, device="cpu")).stats()
    assert stats.size == 0 and stats.mean_coherence == 0.0 and stats.acceptance_rate == 0.0
    assert stats.to_dict()["cache"] == {"size": 0, "hits": 0, "misses": 0, "hit_rate": 0.0}
