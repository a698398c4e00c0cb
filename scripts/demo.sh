#!/usr/bin/env bash
# Set up .venv (CPU torch where no GPU) and run the main job: a small CNN learns from a noisy
# labelled stream with no pool, random replay, and replay retrieved by the pool; prints the
# comparison table (one seed per arm). Extra args go to `dreampool demo` (see --help).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/_env.sh" test
cd "$ROOT"
OMP_NUM_THREADS=1 exec "$PY" -m dreampool_gpu.cli demo "$@"
