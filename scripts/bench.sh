#!/usr/bin/env bash
# Run the benchmark suite, write benchmarks/results/<machine>.json and PNG plots.
#   scripts/bench.sh            quick profile (CI-sized pools)
#   scripts/bench.sh --full     adds the large sizes (k-NN at n = 1M, the pipeline at 100K; 10M and B = 1024 on CUDA)
#   scripts/bench.sh --check    quick profile, fail when a cost ratio is >25% worse than
#                               benchmarks/baseline-ratios.json (no results written)
#   scripts/bench.sh --write-baseline   also merge this run's ratios into that baseline (worst kept)
# DREAMPOOL_BENCH_DEVICE picks the device (default cpu; "auto" = CUDA when present).
# DREAMPOOL_BENCH_MACHINE names the results file (default: cpu-<cores>c or the GPU name).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/_env.sh" "test,bench"
cd "$ROOT"
profile=quick
mode=run
for arg in "$@"; do
  case "$arg" in
    --full) profile=full ;;
    --check) mode=check ;;
    --write-baseline) mode=baseline ;;
    *) echo "usage: scripts/bench.sh [--full] [--check | --write-baseline]" >&2; exit 2 ;;
  esac
done
if [ "$profile" = full ]; then export DREAMPOOL_BENCH_FULL=1; fi
export DREAMPOOL_BENCH_DEVICE="${DREAMPOOL_BENCH_DEVICE:-cpu}"
machine="${DREAMPOOL_BENCH_MACHINE:-$("$PY" - <<'PY'
import os, re, torch
dev = os.environ["DREAMPOOL_BENCH_DEVICE"]
if dev != "cpu" and torch.cuda.is_available():
    print(re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name(0)).strip("-").lower())
else:
    print(f"cpu-{os.cpu_count()}c")
PY
)}"
raw="$(mktemp -t dreampool-bench-XXXX.json)"
trap 'rm -f "$raw"' EXIT
"$PY" -m pytest benchmarks --benchmark-only -q -p no:cacheprovider \
  --benchmark-json="$raw" --benchmark-columns=median,mean,stddev,rounds
if [ "$mode" = check ]; then
  "$PY" benchmarks/report.py "$raw" --machine "$machine" --profile "$profile" \
    --check benchmarks/baseline-ratios.json
  exit $?
fi
extra=()
if [ "$mode" = baseline ]; then extra=(--write-baseline benchmarks/baseline-ratios.json); fi
"$PY" benchmarks/report.py "$raw" --machine "$machine" --profile "$profile" "${extra[@]}"
