#!/usr/bin/env bash
# Set up .venv (CPU torch where no GPU), run ruff (lint and format) and mypy, then the test suite.
# Extra args go to pytest.
#   scripts/test.sh           everything (what CI runs)
#   scripts/test.sh --quick   a contributor's loop: tests marked slow left out, fuzz tests with
#                             100 examples each (HYPOTHESIS_PROFILE=dev) instead of 1,000
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/_env.sh" test
cd "$ROOT"
# Static checks first: a finding fails the run (settings in pyproject.toml).
"$PY" -m ruff check dreampool_gpu tests benchmarks docs/examples
"$PY" -m ruff format --check dreampool_gpu tests benchmarks docs/examples
"$PY" -m mypy
if [ "${1:-}" = "--quick" ]; then
  shift
  export HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-dev}"
  exec "$PY" -m pytest -q --durations=10 -m "not slow" "$@"
fi
exec "$PY" -m pytest -q --durations=10 "$@"
