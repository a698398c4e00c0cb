"""The training step's pool calls on CUDA, timed with CUDA events, against plain tensors in the same run.

The CUDA side of ``benchmarks/test_step_cost.py`` (the same step, pool, data shapes and baselines):

- ``er_step``: ``sample(10)`` + ``dreams`` + ``metadata(ids, columns=("class_label",))`` + ``add(10)``
  into a full FIFO pool of 500 28x28x1 dreams, vs a plain tensor buffer (random index + gather,
  reservoir write) on the same device;
- ``add``: ``add(10)`` vs the plain reservoir write; ``feedback``: ``feedback(24)`` vs
  ``index_put_`` + two ``index_add_``;
- ``nearest``/``hybrid`` over 10K embeddings, B = 1 and 256, vs raw ``q @ X.T`` + ``topk``;
- ``graph``: the plain step and the pool's gather half (``dreams`` + ``metadata`` of fixed ids)
  each captured as one CUDA graph and replayed; a capture that fails is reported with its error.

Each row: median microseconds of ``--rounds`` timed calls (CUDA events around each call, after
warm-up), and the ratio to its baseline. Writes JSON (``--out``). CPU runs the same code with
wall-clock timers, for a dry run.

    python benchmarks/cuda_step_cost.py --device cuda --out step-cost-cuda.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from dreampool_gpu import DreamPool, PoolConfig

SHAPE = (28, 28, 1)
MEMORY, BATCH, FEEDBACK = 500, 10, 24
N, D, K = 10_000, 64, 10


def _timer(device: torch.device, fn: Callable[[], object], rounds: int, warmup: int = 10) -> float:
    """Median microseconds of one ``fn()`` call; CUDA events on CUDA (synchronised per call)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(rounds):
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
    else:
        for _ in range(rounds):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


class PlainBuffer:
    """Preallocated tensors on ``device``; reservoir writes, uniform draws, no host reads."""

    def __init__(self, capacity: int, device: torch.device) -> None:
        self.dreams = torch.zeros(capacity, *SHAPE, 3, device=device)
        self.labels = torch.full((capacity,), -1, dtype=torch.int64, device=device)
        self.seen = torch.zeros((), dtype=torch.int64, device=device)
        self.capacity = capacity

    def add(self, dreams: torch.Tensor, labels: torch.Tensor) -> None:
        n = dreams.shape[0]
        seen = self.seen + torch.arange(n, device=dreams.device)
        drawn = (torch.rand(n, device=dreams.device) * (seen + 1)).long()
        slot = torch.where(seen < self.capacity, seen, drawn)
        slot = torch.where(slot < self.capacity, slot, self.capacity)  # out of range: dropped below
        keep = slot < self.capacity
        safe = torch.where(keep, slot, 0)
        self.dreams.index_copy_(0, safe, torch.where(keep.view(-1, 1, 1, 1, 1), dreams, self.dreams[safe]))
        self.labels.index_copy_(0, safe, torch.where(keep, labels, self.labels[safe]))
        self.seen += n

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        filled = torch.clamp(self.seen, max=self.capacity)
        idx = (torch.rand(n, device=self.dreams.device) * filled).long()
        return self.dreams[idx], self.labels[idx]


def _stream(device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(64, BATCH, *SHAPE, 3, generator=g).to(device)
    return x, torch.randint(0, 10, (64, BATCH), generator=g).to(device)


def _cycle(batches: tuple[torch.Tensor, torch.Tensor]):
    x, y = batches
    i = 0
    while True:
        yield x[i % 64], y[i % 64]
        i += 1


def _full(device: torch.device) -> tuple[DreamPool, PlainBuffer]:
    pool = DreamPool(
        PoolConfig(
            dream_shape=SHAPE, capacity=MEMORY, device=str(device), coherence_threshold=0.0, dream_dtype="float32"
        )
    )
    plain = PlainBuffer(MEMORY, device)
    x, y = _stream(device, 1)
    ones = torch.ones(BATCH, device=device)
    for i in range(MEMORY // BATCH):
        pool.add(x[i % 64], coherence=ones, class_label=y[i % 64])
        plain.add(x[i % 64], y[i % 64])
    return pool, plain


def _graph(device: torch.device, fn: Callable[[], object], rounds: int) -> dict:
    """Capture ``fn`` as one CUDA graph and time its replay; the error where capture fails."""
    if device.type != "cuda":
        return {"captured": False, "error": "CUDA graphs need CUDA"}
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except Exception as exc:  # noqa: BLE001 - the benchmark reports why a capture failed
        return {"captured": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    return {"captured": True, "us": _timer(device, graph.replay, rounds)}


def run(device: torch.device, rounds: int) -> dict:
    rows: dict[str, dict] = {}

    def row(name: str, baseline: float, pool: float) -> None:
        rows[name] = {"baseline_us": round(baseline, 2), "pool_us": round(pool, 2), "ratio": round(pool / baseline, 2)}
        print(f"{name:28s} baseline {baseline:9.1f} us  pool {pool:9.1f} us  {pool / baseline:6.2f}x", flush=True)

    pool, plain = _full(device)
    new = _cycle(_stream(device, 2))
    ones = torch.ones(BATCH, device=device)
    g = torch.Generator().manual_seed(3)

    def plain_step():
        d, y = plain.sample(BATCH)
        x, yy = next(new)
        plain.add(x, yy)
        return d, y

    def pool_step():
        ids = pool.sample(BATCH, generator=g)
        d = pool.dreams(ids)
        y = pool.metadata(ids, columns=("class_label",))["class_label"]
        x, yy = next(new)
        pool.add(x, coherence=ones, class_label=yy)
        return d, y

    row("er_step", _timer(device, plain_step, rounds), _timer(device, pool_step, rounds))

    def plain_add():
        x, y = next(new)
        plain.add(x, y)

    def pool_add():
        x, y = next(new)
        pool.add(x, coherence=ones, class_label=y)

    row("add_10", _timer(device, plain_add, rounds), _timer(device, pool_add, rounds))

    utility = torch.rand(FEEDBACK, device=device)
    slots = torch.randint(MEMORY, (FEEDBACK,), device=device)
    last, total = torch.zeros(MEMORY, device=device), torch.zeros(MEMORY, device=device)
    count = torch.zeros(MEMORY, dtype=torch.int32, device=device)
    one = torch.ones(FEEDBACK, dtype=torch.int32, device=device)

    def plain_feedback():
        last.index_put_((slots,), utility)
        total.index_add_(0, slots, utility)
        count.index_add_(0, slots, one)

    fb_ids = pool.sample(FEEDBACK, generator=g)
    pool_feedback = _timer(device, lambda: pool.feedback(fb_ids, utility), rounds)
    row("feedback_24", _timer(device, plain_feedback, rounds), pool_feedback)

    # the gather half as a CUDA graph: fixed ids, as a captured training step would hold them
    fixed = pool.sample(BATCH, generator=g)

    def gather():
        return pool.dreams(fixed), pool.metadata(fixed, columns=("class_label",))["class_label"]

    graphs = {
        "plain_step": _graph(device, plain_step, rounds),
        "pool_gather": _graph(device, gather, rounds),
        "pool_gather_eager_us": round(_timer(device, gather, rounds), 2),
    }
    print("graphs", json.dumps(graphs), flush=True)

    search = DreamPool(
        PoolConfig(
            dream_shape=(4, 4, 1),
            capacity=N,
            embedding_dim=D,
            device=str(device),
            engine="torch",
            coherence_threshold=0.0,
            query_cache_size=0,
            dream_dtype="float32",
        )
    )
    gen = torch.Generator().manual_seed(5)
    search.add(torch.rand(N, 4, 4, 1, 3, generator=gen).to(device), coherence=torch.ones(N, device=device))
    vectors = search.metadata(torch.arange(N, device=device), columns=("embeddings",))["embeddings"]
    for b in (1, 256):
        noise = 0.01 * torch.randn(b, D, generator=gen).to(device)
        q = torch.nn.functional.normalize(vectors[torch.randint(N, (b,), generator=gen).to(device)] + noise, dim=1)
        raw = _timer(device, lambda q=q: (q @ vectors.T).topk(K, dim=1), rounds)
        row(f"nearest_B{b}", raw, _timer(device, lambda q=q: search.retrieve(q, k=K, mode="nearest"), rounds))
        hybrid = _timer(device, lambda q=q: search.retrieve(q, k=K, mode="hybrid", fetch_k=4 * K), rounds)
        row(f"hybrid_B{b}", raw, hybrid)
    return {"rows": rows, "graphs": graphs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=201)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "rounds": args.rounds,
        **run(device, args.rounds),
    }
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
