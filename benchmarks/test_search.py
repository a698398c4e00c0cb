"""k-NN: the pool's engines against raw FAISS ``IndexFlatIP`` and raw torch matmul + topk.

Every case of one group (pool size n, query batch B) searches the same data:
``d = 64`` unit vectors of a Gaussian mixture in a 16-dim subspace (embeddings
have structure; uniform noise would make any IVF look bad), cosine, k = 10.

- ``raw-torch`` (role ``baseline``): ``q @ X.T`` + ``topk`` over a plain tensor.
- ``raw-faiss``: ``faiss.IndexFlatIP`` holding its own copy of the vectors (CPU only).
- ``pool-<engine>``: ``pool.retrieve(q, k=10, mode="nearest")`` with ready
  embeddings, for engines ``torch``, ``faiss-flat``, ``auto`` and ``faiss-ivf``
  (IVF on CPU, or where FAISS has GPU support); the approximate case records its
  recall@10 against the exact answer in ``extra_info``.

Sizes: n in {10K, 100K}, B in {1, 8, 256}; ``DREAMPOOL_BENCH_FULL=1`` adds
n = 1M (and on CUDA n = 10M and B = 1024).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from dreampool_gpu import DreamPool, PoolConfig
from dreampool_gpu.devices import faiss_available, faiss_gpu_available

D = 64
K = 10
FULL = bool(os.environ.get("DREAMPOOL_BENCH_FULL"))
SIZES = [10_000, 30_000, 100_000] + ([1_000_000] if FULL else [])
BATCHES = [1, 8, 256]
ENGINES = ["torch", "faiss-flat", "auto", "faiss-ivf"]


def clustered(n: int, *, seed: int, device: torch.device) -> torch.Tensor:
    """``[n, 64]`` unit vectors: 256 Gaussian clusters in a seeded 16-dim subspace, plus noise."""
    basis = torch.linalg.qr(torch.randn(D, 16, generator=torch.Generator().manual_seed(99)))[0].to(device)
    centers = torch.randn(256, 16, generator=torch.Generator().manual_seed(98)).to(device)
    g = torch.Generator(device=device).manual_seed(seed)
    out = torch.empty(n, D, device=device)
    for start in range(0, n, 1 << 20):  # bounded temporaries at 10M
        m = min(1 << 20, n - start)
        z = centers[torch.randint(0, 256, (m,), generator=g, device=device)]
        z += 0.5 * torch.randn(m, 16, generator=g, device=device)
        x = z @ basis.T + 0.02 * torch.randn(m, D, generator=g, device=device)
        out[start : start + m] = torch.nn.functional.normalize(x, dim=1)
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rounds_for(n: int, b: int) -> int:
    work = n * max(b, 8)
    return 30 if work <= 1e6 else 10 if work <= 3e7 else 5


class Data:
    """The vectors of one pool size, and pools over them built on first use."""

    def __init__(self, n: int, device: torch.device) -> None:
        self.n = n
        self.device = device
        self.vectors = clustered(n, seed=0, device=device)
        self.queries = clustered(1024, seed=1, device=device)
        self._pools: dict[str, DreamPool] = {}
        self._faiss = None

    def pool(self, engine: str) -> DreamPool:
        """A pool of ``n`` entries whose embeddings are the vectors (written straight to the bank)."""
        if engine not in self._pools:
            pool = DreamPool(
                PoolConfig(
                    dream_shape=(1, 1, 1),
                    embedding_dim=D,
                    capacity=self.n,
                    device=str(self.device),
                    engine=engine,
                    query_cache_size=0,
                    **self._ivf_at_once(engine),
                )
            )
            step = 1 << 18
            for start in range(0, self.n, step):
                part = self.vectors[start : start + step]
                slots = pool.bank.free_slots(len(part))
                pool.bank.write(slots, {"embeddings": part})
                pool.index.add(slots)
            self._pools[engine] = pool
        return self._pools[engine]

    def _ivf_at_once(self, engine: str) -> dict[str, int]:
        """The explicit IVF engine is trained at any size measured; ``auto`` keeps the default threshold."""
        return {"ann_threshold": min(PoolConfig().ann_threshold, self.n)} if engine == "faiss-ivf" else {}

    def faiss_flat(self):
        if self._faiss is None:
            import faiss

            self._faiss = faiss.IndexFlatIP(D)
            self._faiss.add(self.vectors.cpu().numpy())
        return self._faiss


@pytest.fixture(scope="module")
def data(bench_device):
    cache: dict[int, Data] = {}

    def get(n: int) -> Data:
        if n not in cache:
            cache.clear()  # one size in memory at a time
            cache[n] = Data(n, bench_device)
        return cache[n]

    return get


def exact_top(d: Data, b: int) -> torch.Tensor:
    return (d.queries[:b] @ d.vectors.T).topk(K, dim=1).indices


def _cases() -> list[tuple[int, int]]:
    """``(n, B)`` pairs; the GPU-only sizes when the benchmark device is CUDA."""
    cuda = os.environ.get("DREAMPOOL_BENCH_DEVICE", "cpu") != "cpu" and torch.cuda.is_available()
    sizes = SIZES + ([10_000_000] if FULL and cuda else [])
    batches = BATCHES + ([1024] if FULL and cuda else [])
    return [(n, b) for n in sizes for b in batches]


@pytest.mark.parametrize(("n", "b"), _cases())
class TestSearch:
    def test_raw_torch(self, benchmark, bench_device, data, record_median, n, b):
        d = data(n)
        q = d.queries[:b]
        benchmark.group = f"search n={n} B={b}"
        benchmark.extra_info.update(n=n, B=b, engine="raw-torch")

        def run():
            out = (q @ d.vectors.T).topk(K, dim=1)
            sync(bench_device)
            return out

        benchmark.pedantic(run, rounds=rounds_for(n, b), warmup_rounds=1)
        record_median(benchmark, "baseline")

    def test_raw_faiss(self, benchmark, bench_device, data, record_median, n, b):
        if bench_device.type != "cpu":
            pytest.skip("raw IndexFlatIP is the CPU baseline")
        d = data(n)
        index = d.faiss_flat()
        q = np.ascontiguousarray(d.queries[:b].cpu().numpy())
        benchmark.group = f"search n={n} B={b}"
        benchmark.extra_info.update(n=n, B=b, engine="raw-faiss")
        benchmark.pedantic(index.search, args=(q, K), rounds=rounds_for(n, b), warmup_rounds=1)
        record_median(benchmark, "raw-faiss")

    @pytest.mark.parametrize("engine", ENGINES)
    def test_pool(self, benchmark, bench_device, data, record_median, n, b, engine):
        if engine == "faiss-ivf" and bench_device.type == "cuda" and not faiss_gpu_available():
            pytest.skip("IVF on a CUDA pool needs FAISS with GPU support")
        if engine.startswith("faiss") and not faiss_available():
            pytest.skip(f"engine {engine} needs FAISS, which is not installed here")
        d = data(n)
        pool = d.pool(engine)
        q = d.queries[:b]
        benchmark.group = f"search n={n} B={b}"
        benchmark.extra_info.update(n=n, B=b, engine=f"pool-{engine}")

        def run():
            out = pool.retrieve(q, k=K, mode="nearest")
            sync(bench_device)
            return out

        hits = benchmark.pedantic(run, rounds=rounds_for(n, b), warmup_rounds=1)
        want = exact_top(d, b)
        found = pool.bank.slots_of(hits.ids)
        recall = float(sum(len(set(g.tolist()) & set(w.tolist())) for g, w in zip(found, want, strict=True)))
        benchmark.extra_info["recall_at_10"] = recall / (b * K)
        benchmark.extra_info["last_engine"] = pool.stats()["search"]["last_engine"]
        benchmark.extra_info["index_bytes"] = pool.index.nbytes()
        record_median(benchmark, f"pool-{engine}")
