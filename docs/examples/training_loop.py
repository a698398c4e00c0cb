"""A classifier that learns from a noisy labelled stream, replaying dreams from the pool.

    python docs/examples/training_loop.py [--steps 300] [--device cpu]

Each step 8 fresh labelled dreams arrive (20% of the labels wrong). The CNN trains on
them together with 24 dreams replayed from the pool: ``pool.sample`` draws them (with
replacement) among the entries whose last utility is at least 0.05, or that have none yet
(a ``where=`` filter on the metadata columns). Utility comes from the learner's loss: an
entry's utility is ``exp(-loss)``, the probability the learner gives its stored label,
taken from the training step's own per-dream losses (no extra pass). A wrong label earns
a low utility and leaves replay; 8 of the entries left out are re-scored each step (their
second chance). The fresh dreams enter the pool with their utility as first record. At
the end it prints how many entries are left out of replay and the share of wrong labels
among them. The pool rides in the checkpoint via ``state_dict()``. Every call used is in
docs/api.md (``dreampool demo`` compares replay strategies with the same learner).
"""

from __future__ import annotations

import argparse
import io

import torch
from torch import nn
from torch.nn import functional as F

from dreampool_gpu import DreamPool, PoolConfig
from dreampool_gpu.synthetic import make_dataset

SHAPE, FRESH, REPLAY, RESCORE, FLOOR = (16, 16, 2), 8, 24, 8, 0.05


class SmallCNN(nn.Module):
    """Three convolutions over a dream ``[N, R, C, L, 3]`` seen as a ``3L``-channel image -> ``[N, classes]``."""

    def __init__(self, layers: int, classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3 * layers, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(32, classes),
        )

    def forward(self, dreams: torch.Tensor) -> torch.Tensor:
        n, rows, cols, layers, _ = dreams.shape
        return self.body(dreams.permute(0, 3, 4, 1, 2).reshape(n, 3 * layers, rows, cols) - 0.5)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    stream = make_dataset("frequency_orientation", args.steps * FRESH, shape=SHAPE, seed=0)
    val = make_dataset("frequency_orientation", 500, shape=SHAPE, seed=1)
    g = torch.Generator().manual_seed(0)
    wrong = torch.rand(len(stream.labels), generator=g) < 0.2  # label noise
    other = torch.randint(0, stream.num_classes, stream.labels.shape, generator=g)
    labels = torch.where(wrong, other, stream.labels)

    pool = DreamPool(PoolConfig(dream_shape=SHAPE, capacity=4000, num_classes=stream.num_classes, device=args.device))
    torch.manual_seed(0)
    model = SmallCNN(SHAPE[2], stream.num_classes).to(pool.device)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def trusted(m: dict[str, torch.Tensor]) -> torch.Tensor:  # a where= filter: [capacity] bool
        return m["utility"].isnan() | (m["utility"] >= FLOOR)

    def left_out(m: dict[str, torch.Tensor]) -> torch.Tensor:
        return m["utility"] < FLOOR

    for step in range(args.steps):
        x = stream.dreams[step * FRESH : (step + 1) * FRESH].to(pool.device)
        y = labels[step * FRESH : (step + 1) * FRESH].to(pool.device)
        ids = pool.sample(REPLAY, where=trusted, generator=g)  # [24] once the pool holds any, else [0]
        rx, ry = pool.dreams(ids).float(), pool.metadata(ids)["class_label"]  # labels int64

        model.train()
        losses = F.cross_entropy(model(torch.cat([x, rx])), torch.cat([y, ry]), reduction="none")
        opt.zero_grad()
        losses.mean().backward()
        opt.step()
        utility = torch.exp(-losses.detach())  # p(stored label) in (0, 1]: low for a wrong label
        pool.feedback(ids, utility[FRESH:])  # an id drawn twice keeps its last record
        new = pool.add(x, force=True, class_label=y)  # every labelled dream; coherence 1.0
        pool.feedback(new, utility[:FRESH])  # its first record

        again = pool.sample(RESCORE, where=left_out, replace=False, generator=g)  # their second chance
        if again.numel():
            model.eval()
            with torch.no_grad():
                loss = F.cross_entropy(
                    model(pool.dreams(again).float()), pool.metadata(again)["class_label"], reduction="none"
                )
            pool.feedback(again, torch.exp(-loss))
        if step % 50 == 0 or step == args.steps - 1:
            model.eval()
            with torch.no_grad():
                pred = model(val.dreams.to(pool.device)).argmax(1).cpu()
            acc = (pred == val.labels).float().mean()
            print(f"step {step:3d}: pool {len(pool):4d}, replayed {ids.numel():2d}, validation accuracy {acc:.3f}")

    stored = torch.arange(len(pool), device=pool.device)  # ids 0..n-1: every dream was stored, none evicted
    out = (pool.metadata(stored)["utility"] < FLOOR).cpu()
    noisy = wrong[: len(pool)]
    print(
        f"left out of replay: {int(out.sum())} entries, {float(noisy[out].float().mean()):.2f} of them with a wrong "
        f"label (the stream: {float(noisy.float().mean()):.2f})"
    )
    checkpoint = io.BytesIO()
    torch.save({"model": model.state_dict(), "pool": pool.state_dict()}, checkpoint)
    checkpoint.seek(0)
    restored = DreamPool(pool.config)
    restored.load_state_dict(torch.load(checkpoint, weights_only=True)["pool"])
    print(f"checkpoint round trip: {len(restored)} entries restored of {len(pool)}")


if __name__ == "__main__":
    main()
