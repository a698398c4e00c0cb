"""Query cache: ``pool.retrieve`` of chroma queries with the LRU cache (128) vs without it.

The cache saves the encoding of a query (docs/spec.md §Query cache) at the price of
building keys on the host. Three workloads of 64-query batches, mode
``nearest`` over a pool of 1,000 entries (so the encoding is a visible share of
the call), each batch drawn fresh per call:

- ``repeated``: the same 64 queries every call (hit rate ~1);
- ``clustered``: 32 centres, jitter below 0.001 (near repeats: no hits since keys are exact, issue 22);
- ``unique``: fresh uniform queries (no hits).

Role ``baseline`` is the pool with ``query_cache_size=0``; ``cached`` the default
cache. The hit rate lands in ``extra_info``.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from dreampool_gpu import DreamPool, PoolConfig

SHAPE = (4, 4, 1)
POOL = 1_000
BATCH = 64
ROUNDS = 200


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def workload(name: str, device: torch.device) -> list[torch.Tensor]:
    """``ROUNDS + 1`` query batches ``[64, 3]`` on ``device`` (one for the warm-up round)."""
    g = torch.Generator().manual_seed(3)
    if name == "repeated":
        batches = [torch.rand(BATCH, 3, generator=g)] * (ROUNDS + 1)
    elif name == "clustered":
        centres = torch.rand(32, 3, generator=g)
        batches = [
            (
                centres[torch.randint(0, 32, (BATCH,), generator=g)] + 2e-4 * (torch.rand(BATCH, 3, generator=g) - 0.5)
            ).clamp(0, 1)
            for _ in range(ROUNDS + 1)
        ]
    else:
        batches = [torch.rand(BATCH, 3, generator=g) for _ in range(ROUNDS + 1)]
    return [b.to(device) for b in batches]


def filled_pool(device: torch.device, cache_size: int) -> DreamPool:
    pool = DreamPool(
        PoolConfig(
            dream_shape=SHAPE, capacity=POOL, device=str(device), coherence_threshold=0.0, query_cache_size=cache_size
        )
    )
    dreams = torch.rand(POOL, *SHAPE, 3, generator=torch.Generator().manual_seed(0))
    pool.add(dreams.to(device), coherence=torch.ones(POOL), class_label=torch.arange(POOL) % 10)
    return pool


@pytest.mark.parametrize("name", ["repeated", "clustered", "unique"])
@pytest.mark.parametrize(("role", "cache_size"), [("baseline", 0), ("cached", PoolConfig().query_cache_size)])
def test_retrieve_with_cache(benchmark, bench_device, record_median, name, role, cache_size):
    pool = filled_pool(bench_device, cache_size)
    batches = itertools.cycle(workload(name, bench_device))
    benchmark.group = f"query cache, {name} queries"
    benchmark.extra_info.update(workload=name, cache_size=cache_size)

    def run():
        out = pool.retrieve(next(batches), k=10, mode="nearest")
        sync(bench_device)
        return out

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1)
    benchmark.extra_info["hit_rate"] = pool.cache.hit_rate
    record_median(benchmark, role)
