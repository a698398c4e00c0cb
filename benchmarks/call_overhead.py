"""One-query ``nearest`` against raw matmul + topk, and a tied pool against an untied one.

A plain script (no pytest-benchmark), so that the same file can time an older checkout:

    PYTHONPATH=<checkout> python benchmarks/call_overhead.py LABEL

Prints ``LABEL: raw .. us, pool .. us (..x raw), tied .. us (..x untied)``: medians of 9
batches of 333 calls, CPU, 10K entries, D = 64, k = 10, embeddings set directly (random unit
vectors, or one vector repeated).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import torch

from dreampool_gpu import DreamPool, PoolConfig

N, D, K = 10_000, 64, 10


def make(tied: bool) -> DreamPool:
    config = PoolConfig(
        dream_shape=(4, 4, 1), capacity=N, device="cpu", engine="torch", dream_dtype="float32", query_cache_size=0
    )
    pool = DreamPool(config)
    pool.add(torch.rand(N, 4, 4, 1, 3), coherence=torch.ones(N))
    vectors = torch.nn.functional.normalize(torch.randn(N, D), dim=1)
    if tied:
        vectors = vectors[:1].expand(N, D).contiguous()
    pool.bank.columns["embeddings"].copy_(vectors)
    return pool


def median_us(fn: Callable[[], object], calls: int = 3000) -> float:
    for _ in range(100):
        fn()
    batches = []
    for _ in range(9):
        start = time.perf_counter()
        for _ in range(calls // 9):
            fn()
        batches.append((time.perf_counter() - start) / (calls // 9))
    return sorted(batches)[4] * 1e6


def main(label: str) -> None:
    torch.manual_seed(0)
    untied, tied = make(False), make(True)
    q = torch.nn.functional.normalize(torch.randn(1, D), dim=1)
    q_tied = tied.bank.columns["embeddings"][:1].clone()
    vectors = untied.bank.columns["embeddings"]
    raw = median_us(lambda: (q @ vectors.T).topk(K, dim=1))
    pool = median_us(lambda: untied.retrieve(q, k=K, mode="nearest"))
    tie = median_us(lambda: tied.retrieve(q_tied, k=K, mode="nearest"))
    print(f"{label}: raw {raw:.0f} us, pool {pool:.0f} us ({pool / raw:.2f}x raw), ", end="")
    print(f"tied {tie:.0f} us ({tie / pool:.2f}x untied)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "this tree")
