"""A classifier that learns from a noisy labelled stream, replaying the pool's trusted dreams.

    python docs/examples/training_loop.py [--steps 300] [--device cpu]

Each step: 8 fresh labelled dreams arrive (20% of labels wrong). The CNN trains on them
together with 24 dreams replayed from the pool, drawn among the entries it trusts:
``trusted`` keeps, per stored class, the entries whose last utility is not in the lowest
quarter. Utility is the learner's agreement with a stored label, ``p(label) / max p``
from the training step's own forward pass (no extra pass): wrong labels score low. Each
step the learner also re-scores 8 entries the filter left out (their second chance).
The fresh dreams enter the pool with their agreement as first record. The pool rides in
the checkpoint via ``state_dict()``. ``dreampool demo`` runs this loop against no pool,
random replay and replay retrieved by k-NN.
"""

from __future__ import annotations

import argparse
import io

import torch
from torch.nn import functional as F

from dreampool_gpu import DreamPool, PoolConfig
from dreampool_gpu.demo import SmallCNN, agreement, trusted
from dreampool_gpu.synthetic import make_dataset

SHAPE, FRESH, REPLAY, DROP, RESCORE = (16, 16, 2), 8, 3, 0.25, 8


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

    pool = DreamPool(PoolConfig(dream_shape=SHAPE, capacity=4000, device=args.device))
    torch.manual_seed(0)
    model = SmallCNN(SHAPE[2], stream.num_classes).to(pool.device)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    stored = torch.empty(0, dtype=torch.int64, device=pool.device)  # every id the pool issued
    for step in range(args.steps):
        x = stream.dreams[step * FRESH : (step + 1) * FRESH].to(pool.device)
        y = labels[step * FRESH : (step + 1) * FRESH].to(pool.device)
        meta = pool.metadata(stored)  # utility, class_label, found (False once evicted)
        columns = {
            "utility": meta["utility"],
            "class_label": meta["class_label"],
            "ids": torch.where(meta["found"], stored, -1),
        }
        keep = trusted(columns, DROP)  # [len(stored)] bool
        ok = stored[keep]
        pick = torch.randint(max(ok.numel(), 1), (min(REPLAY * FRESH, ok.numel()),), generator=g)
        ids = ok[pick.to(ok.device)]
        rx, ry = pool.dreams(ids).float(), pool.metadata(ids)["class_label"].long()

        logits = model(torch.cat([x, rx]))
        loss = F.cross_entropy(logits, torch.cat([y, ry]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        u = agreement(logits.detach(), torch.cat([y, ry]))  # [FRESH + M] in (0, 1]
        pool.feedback(ids, u[FRESH:])
        new = pool.add(x, coherence=1.0, class_label=y, force=True)  # every labelled dream
        pool.feedback(new, u[:FRESH])  # its first record
        stored = torch.cat([stored, new[new >= 0]])

        left_out = columns["ids"][~keep & (columns["ids"] >= 0)]  # their second chance
        if left_out.numel():
            again = left_out[torch.randperm(left_out.numel(), generator=g)[:RESCORE]]
            with torch.no_grad():
                scores = model(pool.dreams(again).float())
            pool.feedback(again, agreement(scores, pool.metadata(again)["class_label"].long()))
        if step % 50 == 0 or step == args.steps - 1:
            with torch.no_grad():
                pred = model(val.dreams.to(pool.device)).argmax(1).cpu()
            acc = (pred == val.labels).float().mean()
            print(
                f"step {step:3d}: pool {len(pool):4d}, replayed {ids.numel():2d} of "
                f"{ok.numel():4d} trusted, validation accuracy {acc:.3f}"
            )

    checkpoint = io.BytesIO()
    torch.save({"model": model.state_dict(), "pool": pool.state_dict()}, checkpoint)
    checkpoint.seek(0)
    restored = DreamPool(pool.config)
    restored.load_state_dict(torch.load(checkpoint, weights_only=True)["pool"])
    print(f"checkpoint round trip: {len(restored)} entries restored of {len(pool)}")


if __name__ == "__main__":
    main()
