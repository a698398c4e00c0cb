"""A classifier that learns from a noisy labelled stream, replaying dreams retrieved from the pool.

    python docs/examples/training_loop.py [--steps 300] [--device cpu]

Each step: 8 fresh labelled dreams arrive (20% of labels wrong); the pool is asked,
for each, for 3 stored dreams (hybrid mode, the label as class hint); the CNN trains
on fresh + replayed; each replayed dream's utility is how much the step lowered the
CNN's loss on it, ``(1 - clamp(loss_after - loss_before, -1, 1)) / 2`` in [0, 1];
the fresh dreams enter the pool. The pool rides in the checkpoint via ``state_dict()``.
``dreampool demo`` runs this loop against no pool and random replay.
"""

from __future__ import annotations

import argparse
import io

import torch
from torch.nn import functional as F

from dreampool_gpu import DreamPool, PoolConfig
from dreampool_gpu.demo import SmallCNN, utility_from_losses
from dreampool_gpu.synthetic import make_dataset

SHAPE, FRESH, REPLAY = (16, 16, 2), 8, 3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    stream = make_dataset("frequency_orientation", args.steps * FRESH, shape=SHAPE, seed=0)
    val = make_dataset("frequency_orientation", 500, shape=SHAPE, seed=1)
    g = torch.Generator().manual_seed(0)
    wrong = torch.rand(len(stream.labels), generator=g) < 0.2  # label noise
    labels = torch.where(wrong, torch.randint(0, stream.num_classes, stream.labels.shape, generator=g),
                         stream.labels)

    pool = DreamPool(PoolConfig(dream_shape=SHAPE, capacity=4000, device=args.device))
    torch.manual_seed(0)
    model = SmallCNN(SHAPE[2], stream.num_classes).to(pool.device)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(args.steps):
        x = stream.dreams[step * FRESH:(step + 1) * FRESH].to(pool.device)
        y = labels[step * FRESH:(step + 1) * FRESH].to(pool.device)
        hits = pool.retrieve(x, k=REPLAY, mode="hybrid", class_hint=y, fetch_k=64)
        ids = hits.ids[hits.mask]                                  # [M], M <= FRESH * REPLAY
        rx = pool.dreams(ids).float()
        ry = pool.metadata(ids)["class_label"].long()

        losses = F.cross_entropy(model(torch.cat([x, rx])), torch.cat([y, ry]), reduction="none")
        opt.zero_grad()
        losses.mean().backward()
        opt.step()
        if ids.numel():
            with torch.no_grad():
                after = F.cross_entropy(model(rx), ry, reduction="none")
            pool.feedback(ids, utility_from_losses(losses[FRESH:].detach(), after))

        new = pool.add(x, coherence=1.0, class_labels=y, force=True)  # every labelled dream is kept
        pool.feedback(new, 0.5)                                      # untried = neutral
        if step % 50 == 0 or step == args.steps - 1:
            with torch.no_grad():
                acc = (model(val.dreams.to(pool.device)).argmax(1).cpu() == val.labels).float().mean()
            print(f"step {step:3d}: pool {len(pool):4d}, replayed {ids.numel():2d}, "
                  f"validation accuracy {acc:.3f}")

    checkpoint = io.BytesIO()
    torch.save({"model": model.state_dict(), "pool": pool.state_dict()}, checkpoint)
    checkpoint.seek(0)
    restored = DreamPool(pool.config)
    restored.load_state_dict(torch.load(checkpoint, weights_only=True)["pool"])
    print(f"checkpoint round trip: {len(restored)} entries restored of {len(pool)}")


if __name__ == "__main__":
    main()
