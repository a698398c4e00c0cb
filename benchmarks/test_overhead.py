"""Fixed cost of one pool call against the raw kernels it wraps, measured in the same run.

Groups (role ``baseline`` first; ``benchmarks/report.py`` turns the others into cost ratios):

- ``overhead nearest n=N B=b``: raw ``q @ X.T`` + ``topk`` over a plain tensor (baseline);
  ``pool.retrieve(mode="nearest")`` with embedding queries under ``checks="immediate"``
  and ``"deferred"``; and the prepared call (``pool.prepare_retrieve``: a CUDA graph on CUDA).
- ``overhead ties n=N``: the same pool call on a pool of distinct embeddings (baseline) and
  on one whose embeddings all tie (every call meets a tie at the k-th place).
- ``overhead cache n=N``: chroma queries that never repeat, query cache off (baseline) and on.
- ``overhead hybrid n=N B=b`` (CUDA, and CPU under ``DREAMPOOL_BENCH_FULL``): eager ``hybrid``
  (fetch_k 100) against its prepared call.
"""

from __future__ import annotations

import os

import pytest
import torch

from dreampool_gpu import DreamPool, PoolConfig

FULL = bool(os.environ.get("DREAMPOOL_BENCH_FULL"))
K = 10
D = 64
SHAPE = (4, 4, 1)


def _cuda() -> bool:
    return os.environ.get("DREAMPOOL_BENCH_DEVICE", "cpu") != "cpu" and torch.cuda.is_available()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _pool(device: torch.device, n: int, *, checks: str, tied: bool = False, cache: int = 0) -> DreamPool:
    """A pool of ``n`` entries whose embeddings are set directly (random unit vectors, or one repeated)."""
    config = PoolConfig(
        dream_shape=SHAPE,
        capacity=n,
        embedding_dim=D,
        device=str(device),
        engine="torch",
        checks=checks,
        query_cache_size=cache,
        dream_dtype="float32",
    )
    pool = DreamPool(config)
    g = torch.Generator().manual_seed(0)
    for start in range(0, n, 65_536):
        m = min(65_536, n - start)
        pool.add(torch.rand(m, *SHAPE, 3, generator=g).to(device), coherence=torch.ones(m, device=device))
    vectors = torch.nn.functional.normalize(torch.randn(n, D, generator=g), dim=1).to(device)
    if tied:
        vectors = vectors[:1].expand(n, D).contiguous()
    pool.bank.columns["embeddings"].copy_(vectors)
    return pool


def _run(benchmark, device, fn, rounds):
    def timed():
        out = fn()
        sync(device)
        return out

    return benchmark.pedantic(timed, rounds=rounds, iterations=10, warmup_rounds=2)


def _nearest_cases() -> list[tuple[int, int]]:
    if _cuda():
        return [(10_000, 1), (100_000, 1), (1_000_000, 1), (1_000_000, 1024)]
    return [(10_000, 1), (10_000, 256)] + ([(100_000, 1)] if FULL else [])


@pytest.mark.parametrize(("n", "b"), _nearest_cases())
@pytest.mark.parametrize("variant", ["raw", "immediate", "deferred", "prepared"])
def test_nearest(benchmark, bench_device, record_median, n, b, variant):
    pool = _pool(
        bench_device, n, checks="deferred" if variant == "prepared" else variant if variant != "raw" else "auto"
    )
    g = torch.Generator().manual_seed(1)
    q = torch.nn.functional.normalize(torch.randn(b, D, generator=g), dim=1).to(bench_device)
    vectors = pool.bank.columns["embeddings"]
    benchmark.group = f"overhead nearest n={n} B={b}"
    benchmark.extra_info.update(n=n, B=b, variant=variant)
    if variant == "raw":
        fn = lambda: (q @ vectors.T).topk(K, dim=1)  # noqa: E731
    elif variant == "prepared":
        prepared = pool.prepare_retrieve(q, k=K, mode="nearest")
        fn = lambda: prepared(q)  # noqa: E731
        benchmark.extra_info["graphed"] = prepared.graphed
    else:
        fn = lambda: pool.retrieve(q, k=K, mode="nearest")  # noqa: E731
    _run(benchmark, bench_device, fn, rounds=30)
    record_median(benchmark, "baseline" if variant == "raw" else variant)


@pytest.mark.parametrize("tied", [False, True])
def test_ties(benchmark, bench_device, record_median, tied):
    n = 10_000
    pool = _pool(bench_device, n, checks="auto", tied=tied)
    q = pool.bank.columns["embeddings"][:1].clone()
    benchmark.group = f"overhead ties n={n}"
    benchmark.extra_info.update(n=n, B=1, tied=tied)
    _run(benchmark, bench_device, lambda: pool.retrieve(q, k=K, mode="nearest"), rounds=30)
    record_median(benchmark, "tied" if tied else "baseline")


@pytest.mark.parametrize("cache", [0, 128])
def test_cache_cost(benchmark, bench_device, record_median, cache):
    n = 10_000
    pool = _pool(bench_device, n, checks="auto", cache=cache)
    g = torch.Generator().manual_seed(2)
    queries = iter(torch.rand(100_000, 1, 3, generator=g).to(bench_device))  # never repeats
    benchmark.group = f"overhead cache n={n}"
    benchmark.extra_info.update(n=n, B=1, cache=cache)
    _run(benchmark, bench_device, lambda: pool.retrieve(next(queries), k=K, mode="hybrid"), rounds=30)
    record_median(benchmark, "cache-on" if cache else "baseline")


@pytest.mark.skipif(not (_cuda() or FULL), reason="the large hybrid case runs on CUDA (or with DREAMPOOL_BENCH_FULL)")
@pytest.mark.parametrize("variant", ["eager", "prepared"])
def test_hybrid(benchmark, bench_device, record_median, variant):
    n, b = (1_000_000, 1024) if _cuda() else (100_000, 256)
    pool = _pool(bench_device, n, checks="deferred")
    g = torch.Generator().manual_seed(3)
    q = torch.nn.functional.normalize(torch.randn(b, D, generator=g), dim=1).to(bench_device)
    benchmark.group = f"overhead hybrid n={n} B={b}"
    benchmark.extra_info.update(n=n, B=b, fetch_k=100, variant=variant)
    if variant == "prepared":
        prepared = pool.prepare_retrieve(q, k=K, mode="hybrid", fetch_k=100)
        fn = lambda: prepared(q)  # noqa: E731
        benchmark.extra_info["graphed"] = prepared.graphed
    else:
        fn = lambda: pool.retrieve(q, k=K, mode="hybrid", fetch_k=100)  # noqa: E731
    _run(benchmark, bench_device, fn, rounds=10)
    record_median(benchmark, "baseline" if variant == "eager" else "prepared")
