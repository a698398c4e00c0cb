"""Serve a pool's Prometheus metrics on localhost while a loop runs, then scrape them once.

    python docs/examples/metrics_server.py [--port 9464] [--steps 20]

Needs the ``metrics`` extra (prometheus-client). Point Prometheus at
``http://127.0.0.1:<port>/metrics`` to watch a real run. ``--port 0`` picks a
free port.
"""

from __future__ import annotations

import argparse
import urllib.request

import torch

from dreampool_gpu import DreamPool, PoolConfig, score_dreams
from dreampool_gpu.dreams import synthetic_dreams


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=9464, help="0 = any free port")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    pool = DreamPool(PoolConfig(dream_shape=(8, 8, 2), capacity=200, coherence_threshold=0.5, device="cpu"))
    server = pool.enable_metrics().serve(args.port)
    port = server.server_port  # the one bound, when --port 0
    generator = torch.Generator().manual_seed(0)
    try:
        for _ in range(args.steps):
            dreams, labels = synthetic_dreams(16, (8, 8, 2), generator=generator)
            scores = score_dreams(dreams)
            pool.add(dreams, coherence=scores.coherence, class_label=labels)
            pool.retrieve(dreams, k=4, mode="hybrid")
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        server.shutdown()
    for line in body.splitlines():
        if line.startswith("dreampool_") and not line.startswith("dreampool_retrieve_seconds_bucket"):
            print(line)


if __name__ == "__main__":
    main()
