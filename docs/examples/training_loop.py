"""A training loop that seeds each step from the pool and feeds utility back.

    python docs/examples/training_loop.py [--steps 50] [--device cpu]

Each step: propose dreams, mix each with a seed retrieved from the pool, score
the children with the reference solver, add the coherent ones, and tell the pool
how useful each seed was (the child's coherence). The pool rides in the
training checkpoint through ``state_dict()``.
"""

from __future__ import annotations

import argparse
import io

import torch

from dreampool_gpu import DreamPool, PoolConfig, score_dreams
from dreampool_gpu.dreams import synthetic_dreams


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    pool = DreamPool(
        PoolConfig(dream_shape=(8, 8, 2), capacity=500, coherence_threshold=0.6, device=args.device)
    )
    generator = torch.Generator().manual_seed(0)
    for step in range(args.steps):
        fresh, labels = synthetic_dreams(32, (8, 8, 2), generator=generator)
        fresh = fresh.to(pool.device)
        children, seed_ids = fresh, None
        if len(pool):
            # ask for the stored dream closest to each fresh dream's complementary colour
            hits = pool.retrieve(
                1 - fresh.mean(dim=(1, 2, 3)), k=1, mode="hybrid", with_dreams=True
            )
            seed_ids = hits.ids[:, 0]
            children = 0.5 * fresh + 0.5 * hits.dreams[:, 0].float()
        scores = score_dreams(children)
        pool.add(
            children,
            coherence=scores.coherence,
            energy=scores.energy,
            violation=scores.violation,
            class_labels=labels.to(pool.device),
        )
        if seed_ids is not None:
            found = seed_ids >= 0
            pool.feedback(seed_ids[found], scores.coherence[found])
        if step % 10 == 0:
            stats = pool.stats()
            print(
                f"step {step:3d}: pool {stats['size']:4d}, "
                f"accepted {stats['acceptance_rate']:.0%}, "
                f"mean coherence {stats['mean_coherence']:.3f}"
            )

    checkpoint = io.BytesIO()
    torch.save({"pool": pool.state_dict()}, checkpoint)
    checkpoint.seek(0)
    restored = DreamPool(pool.config)
    restored.load_state_dict(torch.load(checkpoint, weights_only=True)["pool"])
    print(f"checkpoint round trip: {len(restored)} entries restored of {len(pool)}")


if __name__ == "__main__":
    main()
