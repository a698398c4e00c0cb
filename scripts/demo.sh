#!/usr/bin/env bash
# Set up .venv (CPU torch where no GPU) and run the main job: a small CNN learns from a noisy
# labelled stream with no pool, random replay, replay of the entries it trusts, and replay
# retrieved by k-NN (feature and learned encoders); prints the comparison table (one seed
# per arm, about 30 s on 2 CPU cores once installed). Extra args go to `dreampool demo`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/_env.sh" test
cd "$ROOT"
OMP_NUM_THREADS=1 exec "$PY" -m dreampool_gpu.cli demo "$@"
