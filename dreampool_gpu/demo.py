"""The main job: a simulated training loop that seeds itself from the pool.

Each step a "learner" proposes a batch of dreams: fresh noisy class colours
mixed half-and-half with seeds retrieved from the pool (hybrid mode). The
reference solver scores them, the pool keeps the coherent ones, and the child's
coherence flows back as utility feedback to the seed that produced it.

Data and threshold: noisy saturated class colours score low on the original's
coherence (red about 0.14, purple about 0.79), so the demo's default threshold
is 0.6 rather than the pool default 0.75; mixing with grey-leaning seeds lifts
a useful share of candidates over it.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from dreampool_gpu.config import PoolConfig
from dreampool_gpu.dreams import synthetic_dreams
from dreampool_gpu.pool import DreamPool
from dreampool_gpu.solver import score_dreams


@dataclass(frozen=True)
class DemoSummary:
    """What the demo prints at the end."""

    steps: int
    device: str
    pool_size: int
    capacity: int
    acceptance_rate: float
    evictions: int
    retrieved_coherence: float
    random_pool_coherence: float
    retrieve_ms_median: float
    retrieve_ms_p95: float
    wall_s: float

    def lines(self) -> list[str]:
        """Human-readable summary lines."""
        return [
            f"steps               {self.steps} on {self.device}",
            f"pool size           {self.pool_size} / {self.capacity}",
            f"acceptance rate     {self.acceptance_rate:.1%}",
            f"evictions           {self.evictions}",
            f"coherence retrieved {self.retrieved_coherence:.4f}  vs random pool dreams "
            f"{self.random_pool_coherence:.4f}",
            f"retrieve latency    median {self.retrieve_ms_median:.2f} ms, p95 {self.retrieve_ms_p95:.2f} ms",
            f"wall time           {self.wall_s:.1f} s",
        ]

    def to_dict(self) -> dict[str, float | int | str]:
        """JSON-ready dict."""
        return asdict(self)


def run_demo(
    *,
    steps: int = 200,
    batch: int = 64,
    dream_shape: tuple[int, int, int] = (16, 16, 4),
    capacity: int = 2000,
    threshold: float = 0.6,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
) -> DemoSummary:
    """Run the simulated training loop and summarise it.

    Keyword Args:
        steps: training steps. batch: dreams proposed per step.
        dream_shape: ``(rows, cols, layers)``. capacity: pool capacity.
        threshold: coherence gate. device: pool device (``"auto"``, ``"cpu"``, ``"cuda"``).
        seed: seeds data generation. progress: show a tqdm bar.
    """
    config = PoolConfig(
        dream_shape=dream_shape,
        capacity=capacity,
        coherence_threshold=threshold,
        device=device,
        retrieval_mode="hybrid",
    )
    pool = DreamPool(config)
    generator = torch.Generator().manual_seed(seed)
    latencies: list[float] = []
    retrieved_coherence: list[torch.Tensor] = []
    start = time.perf_counter()
    for _ in tqdm(range(steps), desc="dreampool demo", disable=not progress, unit="step"):
        fresh, labels = synthetic_dreams(batch, dream_shape, generator=generator)
        fresh, labels = fresh.to(pool.device), labels.to(pool.device)
        seed_ids = torch.full((batch,), -1, dtype=torch.int64, device=pool.device)
        candidates = fresh
        if len(pool):
            t0 = time.perf_counter()
            hits = pool.retrieve(fresh, k=1, mode="hybrid", class_hint=labels, with_dreams=True)
            if pool.device.type == "cuda":
                torch.cuda.synchronize(pool.device)
            latencies.append((time.perf_counter() - t0) * 1e3)
            seed_ids = hits.ids[:, 0]
            found = (seed_ids >= 0)[:, None, None, None, None]
            seeds = hits.dreams[:, 0].float()  # type: ignore[index]
            candidates = torch.where(found, 0.5 * fresh + 0.5 * seeds, fresh)
            retrieved_coherence.append(pool.metadata(seed_ids)["coherence"][seed_ids >= 0])
        scores = score_dreams(candidates)
        pool.add(
            candidates,
            coherence=scores.coherence,
            energy=scores.energy,
            violation=scores.violation,
            class_labels=labels,
        )
        seeded = seed_ids >= 0
        pool.feedback(seed_ids[seeded], scores.coherence[seeded])
    wall = time.perf_counter() - start
    stats = pool.stats()
    alive = pool.bank.alive()
    pool_coherence = pool.bank.columns["coherence"][alive]
    sample = pool_coherence[torch.randint(len(pool_coherence), (1000,), generator=generator)] if len(pool) else pool_coherence
    latencies.sort()
    return DemoSummary(
        steps=steps,
        device=str(pool.device),
        pool_size=stats["size"],
        capacity=capacity,
        acceptance_rate=stats["acceptance_rate"],
        evictions=stats["evicted"],
        retrieved_coherence=float(torch.cat(retrieved_coherence).mean()) if retrieved_coherence else float("nan"),
        random_pool_coherence=float(sample.mean()) if len(sample) else float("nan"),
        retrieve_ms_median=statistics.median(latencies) if latencies else float("nan"),
        retrieve_ms_p95=latencies[int(0.95 * (len(latencies) - 1))] if latencies else float("nan"),
        wall_s=wall,
    )
