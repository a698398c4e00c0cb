"""Add throughput and the whole retrieve pipeline, each against a raw baseline in the same run.

- add: ``pool.add`` of 1024 dreams (16x16x4) into a full pool (so every add also
  evicts) vs the feature work alone (chroma + spectral + encoder) on the same batch.
- retrieve: ``pool.retrieve`` (encode, search, re-rank, gather) at k=10 vs a raw
  torch matmul + topk over the same embeddings, B in {1, 256}.

Sizes: n = 10K by default; ``DREAMPOOL_BENCH_FULL=1`` adds n = 100K, and on CUDA
n = 1M and B = 1024. Hybrid re-ranks ``fetch_k = 100`` candidates.
"""

from __future__ import annotations

import os

import pytest
import torch

from dreampool_gpu import DreamPool, PoolConfig
from dreampool_gpu.dreams import chroma_signature, synthetic_dreams
from dreampool_gpu.spectral import spectral_features

SHAPE = (16, 16, 4)
FULL = bool(os.environ.get("DREAMPOOL_BENCH_FULL"))
CUDA = os.environ.get("DREAMPOOL_BENCH_DEVICE", "cpu") != "cpu" and torch.cuda.is_available()
SIZES = [10_000] + ([100_000] if FULL else []) + ([1_000_000] if FULL and CUDA else [])
BATCHES = [1, 256] + ([1024] if FULL and CUDA else [])
FETCH_K = 100  # candidates re-ranked by hybrid


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def filled_pool(n: int, device: torch.device, **config) -> DreamPool:
    pool = DreamPool(
        PoolConfig(
            dream_shape=SHAPE, capacity=n, device=str(device), coherence_threshold=0.0, query_cache_size=0, **config
        )
    )
    g = torch.Generator().manual_seed(0)
    for start in range(0, n, 4096):
        dreams, labels = synthetic_dreams(min(4096, n - start), SHAPE, generator=g)
        pool.add(dreams.to(device), coherence=torch.ones(len(dreams)), class_label=labels)
    return pool


@pytest.fixture(scope="module")
def pools(bench_device):
    return {n: filled_pool(n, bench_device) for n in SIZES}


@pytest.fixture(scope="module")
def add_pool(bench_device):
    """A full pool of its own: the add rounds re-add one batch, which would fill the
    retrieve pools with duplicates (exact ties, the slow path of the stable top-k)."""
    return filled_pool(SIZES[0], bench_device)


@pytest.fixture(scope="module")
def add_batch(bench_device):
    dreams, labels = synthetic_dreams(1024, SHAPE, generator=torch.Generator().manual_seed(1))
    return dreams.to(bench_device), labels.to(bench_device)


class TestAdd:
    def test_add_features_only(self, benchmark, bench_device, add_pool, add_batch, record_median):
        benchmark.group = "add 1024 dreams 16x16x4"
        pool = add_pool
        dreams, labels = add_batch

        def features():
            chroma = chroma_signature(dreams)
            pool.encoder.encode_entries(dreams, chroma=chroma, spectral=spectral_features(dreams), class_labels=labels)
            sync(bench_device)

        benchmark.pedantic(features, rounds=5, warmup_rounds=1)
        record_median(benchmark, "baseline")

    def test_add_pool(self, benchmark, bench_device, add_pool, add_batch, record_median):
        benchmark.group = "add 1024 dreams 16x16x4"
        pool = add_pool
        dreams, labels = add_batch

        def add():
            pool.add(dreams, coherence=torch.ones(1024, device=bench_device), class_label=labels)
            sync(bench_device)

        benchmark.pedantic(add, rounds=5, warmup_rounds=1)
        record_median(benchmark, "batched")
        benchmark.extra_info["dreams_per_s"] = 1024 / benchmark.stats.stats.median


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("b", BATCHES)
class TestRetrieve:
    def test_raw_matmul_topk(self, benchmark, bench_device, pools, n, b, record_median):
        benchmark.group = f"retrieve n={n} B={b} k=10"
        emb = pools[n].bank.columns["embeddings"]
        q = torch.nn.functional.normalize(torch.randn(b, emb.shape[1], device=bench_device), dim=1)

        def raw():
            (q @ emb.T).topk(10, dim=1)
            sync(bench_device)

        benchmark.pedantic(raw, rounds=10, warmup_rounds=1)
        record_median(benchmark, "baseline")

    @pytest.mark.parametrize("mode", ["nearest", "hybrid", "similar"])
    def test_pool_retrieve(self, benchmark, bench_device, pools, n, b, mode, record_median):
        benchmark.group = f"retrieve n={n} B={b} k=10"
        pool = pools[n]
        queries = torch.rand(b, 3, device=bench_device)

        def retrieve():
            pool.retrieve(queries, k=10, mode=mode, fetch_k=FETCH_K)
            sync(bench_device)

        benchmark.pedantic(retrieve, rounds=10, warmup_rounds=1)
        record_median(benchmark, "batched" if mode == "nearest" else f"pool-{mode}")
