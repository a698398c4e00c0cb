"""Retrieve latency, throughput and bytes moved of ShardedDreamPool at world sizes 1, 2, 4 (gloo, CPU).

Each run spawns W ranks on 127.0.0.1; the pool holds TOTAL entries split evenly;
each rank asks B queries per call. Bytes are counted at the collectives
(received by rank 0, status rounds included) and compared with the formula of
docs/distributed.md. Usage::

    PYTHONPATH=. python benchmarks/bench_distributed.py [--total 8000] [--batch 32] [--calls 20]
"""

from __future__ import annotations

import argparse
import datetime
import json
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dreampool_gpu import PoolConfig
from dreampool_gpu.distributed import ShardedDreamPool

SHAPE = (8, 8, 2)
D = 64


def _count_bytes(pool: ShardedDreamPool, counter: dict[str, int]) -> None:
    """Wrap the pool's collectives to add up the bytes this rank receives."""
    net = pool._net  # the pool's Collectives (dreampool_gpu/distributed/collectives.py)
    gather, to_all, reduce = net.all_gather, net.all_to_all, net.all_reduce

    def all_gather(t: torch.Tensor) -> torch.Tensor:
        out = gather(t)
        counter["bytes"] += out.numel() * out.element_size() * (pool.world_size - 1) // pool.world_size
        return out

    def all_to_all(rows: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:
        out = to_all(rows, send, recv)
        per_row = out[0].numel() * out.element_size() if out.shape[0] else 0
        counter["bytes"] += per_row * (sum(recv) - recv[pool.rank])
        return out

    def all_reduce(t: torch.Tensor) -> torch.Tensor:
        counter["bytes"] += t.numel() * t.element_size()
        return reduce(t)

    net.all_gather, net.all_to_all, net.all_reduce = all_gather, all_to_all, all_reduce


def _run(rank: int, world: int, port: int, args: argparse.Namespace, out: dict) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    torch.set_num_threads(1)
    per = args.total // world
    pool = ShardedDreamPool(PoolConfig(dream_shape=SHAPE, device="cpu", capacity=per, engine="torch", embedding_dim=D))
    g = torch.Generator().manual_seed(rank)
    for start in range(0, per, 1000):
        n = min(1000, per - start)
        pool.add(torch.rand(n, *SHAPE, 3, generator=g), coherence=torch.ones(n))
    queries = torch.rand(args.batch, *SHAPE, 3, generator=g)
    counter = {"bytes": 0}
    _count_bytes(pool, counter)
    results = {}
    for mode, k in (("similar", 10), ("nearest", 10), ("hybrid", 10)):
        pool.retrieve(queries, k=k, mode=mode)  # warm-up
        dist.barrier()
        counter["bytes"] = 0
        start = time.perf_counter()
        for _ in range(args.calls):
            pool.retrieve(queries, k=k, mode=mode)
        seconds = (time.perf_counter() - start) / args.calls
        results[mode] = {
            "latency_ms": 1e3 * seconds,
            "queries_per_s": world * args.batch / seconds,
            "bytes_received_per_call": counter["bytes"] // args.calls,
        }
    if rank == 0:
        out[world] = results
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--total", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    manager = mp.Manager()
    out = manager.dict()
    for world in args.worlds:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_run, args=(world, port, args, out), nprocs=world, join=True)
    table = {w: out[w] for w in args.worlds}
    base = table[args.worlds[0]]
    for world, results in table.items():
        for mode, r in results.items():
            print(
                f"W={world} {mode:8s} latency {r['latency_ms']:7.2f} ms  "
                f"{r['queries_per_s']:8.0f} queries/s  ({r['queries_per_s'] / base[mode]['queries_per_s']:.2f}x W=1)"
                f"  bytes received/call {r['bytes_received_per_call']}"
            )
    print(json.dumps({"args": vars(args), "results": table}))


if __name__ == "__main__":
    main()
