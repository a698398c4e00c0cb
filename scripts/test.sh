#!/usr/bin/env bash
# Set up .venv (CPU torch where no GPU) and run the test suite. Extra args go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/_env.sh" test
cd "$ROOT"
exec "$PY" -m pytest -q --durations=10 "$@"
