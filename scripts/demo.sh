#!/usr/bin/env bash
# Set up .venv (CPU torch where no GPU) and run the main job: online class-incremental learning
# on real MNIST digits (5 tasks of 2 classes, one pass, an MLP; 3 seeds, memory M = 500, clean
# and 20% noisy labels), comparing a plain reservoir-buffer ER with the pool's replay
# strategies; prints the table and saves the plot (benchmarks/results/continual_demo.png).
# About 1-2 minutes on 2 CPU cores once installed. Extra args go to benchmarks/continual.py
# (e.g. --seeds 10). The full grid: benchmarks/continual.py; the earlier noisy-stream loop:
# `dreampool demo` (benchmarks/training_benefit.py).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/_env.sh" bench
cd "$ROOT"
OMP_NUM_THREADS=1 exec "$PY" benchmarks/continual.py --demo --workers 2 "$@"
