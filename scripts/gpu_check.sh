#!/usr/bin/env bash
# The one GPU check: device facts, the gpu-marked tests, the sync-free/graph/stream tests, then
# the GPU benchmark profile (per-call overhead included), all written into one folder (JSON, logs, plots).
#   scripts/gpu_check.sh [OUT_DIR]     default: $OUT when set (the device tool's folder), else ./gpu-check
# Time limits (seconds) per part: GPU_TESTS_S (240), SYNC_TESTS_S (150), STEP_COST_S (90), BENCH_S (240).
# Uses the Python on PATH (or $PYTHON) as it is: a device image's own torch with CUDA; FAISS and
# pytest-benchmark are optional (parts that need them are skipped and say so). Installs nothing,
# fetches nothing. Exit status: 0 all ran and passed, 1 a test or benchmark failed, 3 no CUDA.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT_DIR="${1:-${OUT:-$ROOT/gpu-check}}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

"$PY" - > "$OUT_DIR/device.json" <<'PY'
import importlib.util, json, platform, torch
cuda = torch.cuda.is_available()
print(json.dumps({
    "torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": cuda,
    "device": torch.cuda.get_device_name(0) if cuda else None,
    "faiss": importlib.util.find_spec("faiss") is not None,
    "pytest_benchmark": importlib.util.find_spec("pytest_benchmark") is not None,
    "python": platform.python_version(),
}, indent=2))
PY
cat "$OUT_DIR/device.json"
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)"; then
  echo "gpu_check: no CUDA device here; nothing checked" >&2
  exit 3
fi

rc=0
echo "== gpu-marked tests"
timeout "${GPU_TESTS_S:-240}" "$PY" -m pytest -q -m gpu tests -p no:cacheprovider -rs --continue-on-collection-errors 2>&1 | tee "$OUT_DIR/gpu-tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || rc=1

echo "== sync-free hot path, prepared (graph) retrieve, streams: every test of those files, on CUDA"
timeout "${SYNC_TESTS_S:-150}" "$PY" -m pytest -q tests/retrieval/test_sync_free.py tests/retrieval/test_prepared.py tests/retrieval/test_streams.py \
  -p no:cacheprovider -rs 2>&1 | tee "$OUT_DIR/sync-free-tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || rc=1

echo "== training-step cost on CUDA (CUDA events; the pool vs plain tensors; CUDA-graph capture)"
timeout "${STEP_COST_S:-90}" "$PY" benchmarks/cuda_step_cost.py --device cuda --out "$OUT_DIR/step-cost-cuda.json" 2>&1 | tee "$OUT_DIR/step-cost-cuda.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || rc=1

echo "== GPU benchmark profile"
if "$PY" -c "import pytest_benchmark" 2>/dev/null; then
  machine="$("$PY" -c "import re, torch; print(re.sub(r'[^A-Za-z0-9]+', '-', torch.cuda.get_device_name(0)).strip('-').lower())")"
  DREAMPOOL_BENCH_DEVICE=cuda timeout "${BENCH_S:-240}" "$PY" -m pytest benchmarks --benchmark-only -q -p no:cacheprovider \
    --benchmark-json="$OUT_DIR/bench-raw.json" --benchmark-columns=median,mean,stddev,rounds \
    2>&1 | tee "$OUT_DIR/bench.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
  if [ -s "$OUT_DIR/bench-raw.json" ]; then
    "$PY" benchmarks/report.py "$OUT_DIR/bench-raw.json" --machine "$machine" --profile quick || rc=1
    cp benchmarks/results/"$machine"* "$OUT_DIR"/ 2>/dev/null || true
  fi
else
  echo "pytest-benchmark is not installed here: benchmark profile skipped" | tee "$OUT_DIR/bench-skipped.txt"
fi
exit "$rc"
