"""A DDP-style training loop sharing one dream pool across ranks (ShardedDreamPool).

Every step each rank adds the dreams its model produced (to its own shard, no
communication), retrieves the best stored dreams for its batch over the whole
pool, gives feedback on what it used, and every few steps all ranks checkpoint.

Run under torchrun (any number of ranks)::

    torchrun --nproc-per-node 3 docs/examples/ddp_training_loop.py /tmp/pool-ckpt

or directly, which spawns 3 CPU ranks (gloo on 127.0.0.1)::

    python docs/examples/ddp_training_loop.py /tmp/pool-ckpt
"""

from __future__ import annotations

import datetime
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dreampool_gpu import DreamPool, PoolConfig
from dreampool_gpu.distributed import ShardedDreamPool

SHAPE = (8, 8, 2)


def train(checkpoint: str, steps: int = 6) -> None:
    """The loop every rank runs; the process group is already initialised."""
    rank = dist.get_rank()
    pool = ShardedDreamPool(PoolConfig(dream_shape=SHAPE, device="cpu", capacity=256, engine="torch"))
    g = torch.Generator().manual_seed(rank)
    for step in range(steps):
        dreams = torch.rand(16, *SHAPE, 3, generator=g)  # stand-in for the model's output
        pool.add(dreams, coherence=0.8 + 0.2 * torch.rand(16, generator=g))  # rank-local
        hits = pool.retrieve(dreams[:4], k=5, mode="hybrid")  # collective: the whole pool
        reward = torch.rand(hits.ids.shape, generator=g)  # stand-in for the training signal
        pool.feedback(hits.ids, reward)  # routed to the shards owning the ids
        if step % 3 == 2:
            pool.save(checkpoint)  # collective: one shard per rank, one manifest
    stats = pool.stats()
    if rank == 0:
        print(f"{stats['world_size']} ranks, {stats['size']} entries, {stats['feedback']} feedback")
        merged = DreamPool.load(checkpoint)  # the sharded checkpoint as one pool, e.g. on a laptop
        print(f"checkpoint holds {len(merged)} entries")


def _spawned(rank: int, world: int, port: int, checkpoint: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        train(checkpoint)
    finally:
        dist.destroy_process_group()


def main(checkpoint: str, world: int = 3) -> None:
    if "RANK" in os.environ:  # under torchrun
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
        try:
            train(checkpoint)
        finally:
            dist.destroy_process_group()
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_spawned, args=(world, port, checkpoint), nprocs=world, join=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/dreampool-ddp-example")
