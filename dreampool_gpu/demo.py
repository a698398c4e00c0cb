"""The main job: a simulated training loop that seeds itself from the pool.

Each step a "learner" proposes a batch of dreams: fresh noisy class colours,
each mixed half-and-half with a seed from the pool. The reference solver scores
the children, the pool keeps the coherent ones, and each child's coherence flows
back as utility feedback to its seed.

The learner asks the pool (hybrid mode, chroma queries) for the dream closest to
the complement ``1 - chroma`` of each fresh dream: the original's coherence
rewards a grey mean colour, so a complementary seed pulls the child towards it.
As a baseline, every step also mixes the same fresh dreams with random pool
dreams and scores those children.

Data and threshold: noisy saturated class colours score low on that coherence
(red about 0.14, purple about 0.79; about 20% of fresh dreams reach 0.6), so the
demo's gate is 0.6 rather than the pool default 0.75.
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
    child_coherence_retrieved: float
    child_coherence_random: float
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
            f"coherence of seeds  retrieved {self.retrieved_coherence:.4f}  vs random pool dreams "
            f"{self.random_pool_coherence:.4f}",
            f"coherence of child  retrieved seed {self.child_coherence_retrieved:.4f}  vs random seed "
            f"{self.child_coherence_random:.4f}",
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
    seed_coherence, random_coherence, child_retrieved, child_random = [], [], [], []
    start = time.perf_counter()
    for _ in tqdm(range(steps), desc="dreampool demo", disable=not progress, unit="step"):
        fresh, labels = synthetic_dreams(batch, dream_shape, generator=generator)
        fresh, labels = fresh.to(pool.device), labels.to(pool.device)
        seed_ids = torch.full((batch,), -1, dtype=torch.int64, device=pool.device)
        children = fresh
        if len(pool):
            complement = 1.0 - fresh.mean(dim=(1, 2, 3))
            t0 = time.perf_counter()
            hits = pool.retrieve(complement, k=1, mode="hybrid", with_dreams=True)
            if pool.device.type == "cuda":
                torch.cuda.synchronize(pool.device)
            latencies.append((time.perf_counter() - t0) * 1e3)
            seed_ids = hits.ids[:, 0]
            children = 0.5 * fresh + 0.5 * hits.dreams[:, 0].float()  # type: ignore[index]
            random_slots = pool.bank.slots_by_age()[torch.randint(len(pool), (batch,), generator=generator)]
            random_seeds = pool.bank.columns["dreams"][random_slots].float()
            seed_coherence.append(pool.metadata(seed_ids)["coherence"])
            random_coherence.append(pool.bank.columns["coherence"][random_slots])
            child_random.append(score_dreams(0.5 * fresh + 0.5 * random_seeds).coherence)
        scores = score_dreams(children)
        if len(pool):
            child_retrieved.append(scores.coherence)
        pool.add(
            children,
            coherence=scores.coherence,
            energy=scores.energy,
            violation=scores.violation,
            class_labels=labels,
        )
        seeded = seed_ids >= 0
        pool.feedback(seed_ids[seeded], scores.coherence[seeded])
    wall = time.perf_counter() - start
    stats = pool.stats()
    latencies.sort()

    def mean(parts: list[torch.Tensor]) -> float:
        return float(torch.cat(parts).mean()) if parts else float("nan")

    return DemoSummary(
        steps=steps,
        device=str(pool.device),
        pool_size=stats["size"],
        capacity=capacity,
        acceptance_rate=stats["acceptance_rate"],
        evictions=stats["evicted"],
        retrieved_coherence=mean(seed_coherence),
        random_pool_coherence=mean(random_coherence),
        child_coherence_retrieved=mean(child_retrieved),
        child_coherence_random=mean(child_random),
        retrieve_ms_median=statistics.median(latencies) if latencies else float("nan"),
        retrieve_ms_p95=latencies[int(0.95 * (len(latencies) - 1))] if latencies else float("nan"),
        wall_s=wall,
    )
