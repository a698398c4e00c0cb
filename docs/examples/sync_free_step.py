"""A training step that never waits for the GPU: deferred checks, a prepared retrieve, the guard.

    python docs/examples/sync_free_step.py [--steps 50] [--device cpu|cuda]

On CUDA the pool's default ``checks="auto"`` is already deferred; here it is set explicitly so
the CPU run takes the same path. Each step retrieves replay neighbours for the fresh batch
with a prepared call (one CUDA graph replay on CUDA), inside ``forbid_host_sync`` which would
raise on any host read, then adds the batch (the add's one read: the gate's count). Every 10
steps ``pool.check()`` surfaces a deferred error, if a bad query slipped in.
"""

from __future__ import annotations

import argparse

import torch

from dreampool_gpu import DreamPool, PoolConfig, forbid_host_sync
from dreampool_gpu.synthetic import make_dataset

SHAPE, BATCH, K = (8, 8, 2), 16, 4


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)

    pool = DreamPool(PoolConfig(dream_shape=SHAPE, capacity=512, device=args.device, engine="torch", checks="deferred"))
    stream = make_dataset("colours", args.steps * BATCH + 64, shape=SHAPE, seed=0)
    dreams, labels = stream.dreams.to(device), stream.labels.to(device)
    pool.add(dreams[:64], coherence=1.0, class_label=labels[:64])  # something to retrieve from

    step_batch = dreams[64 : 64 + BATCH]
    replay = pool.prepare_retrieve(step_batch, k=K, mode="hybrid", with_dreams=True)  # shapes fixed from here on
    hits = None
    for step in range(args.steps):
        lo = 64 + step * BATCH
        batch, batch_labels = dreams[lo : lo + BATCH], labels[lo : lo + BATCH]
        with forbid_host_sync():  # the retrieve part of the step: no host read
            hits = replay(batch)
            training_batch = torch.cat([batch, hits.dreams.flatten(0, 1).to(batch.dtype)])  # fresh + replay
        del training_batch  # (a learner would train on it here)
        pool.add(batch, coherence=1.0, class_label=batch_labels)  # one host read: the gate's count
        if step % 10 == 9:
            pool.check()  # raises here if a deferred check failed since the last call
    print(f"sync-free steps: {args.steps}, pool size {len(pool)}, last ids {tuple(hits.ids.shape)}")


if __name__ == "__main__":
    main()
