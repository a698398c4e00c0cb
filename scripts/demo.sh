#!/usr/bin/env bash
# Set up .venv (CPU torch where no GPU) and run the main job: the simulated training loop.
# Extra args go to `dreampool demo` (see --help).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/_env.sh" test
cd "$ROOT"
exec "$PY" -m dreampool_gpu.cli demo "$@"
