#!/usr/bin/env bash
# Run the benchmark suite, write benchmarks/results/<machine>.json and PNG plots.
#   scripts/bench.sh            quick profile (CI-sized pools)
#   scripts/bench.sh --full     adds the large sizes (k-NN at n = 1M, the pipeline at 100K; 10M and B = 1024 on CUDA)
#   scripts/bench.sh --check    quick profile, fail when a cost ratio is >25% worse than
#                               benchmarks/baseline-ratios.json in each of up to 3 runs
#                               (no results written; exit 2 when the baseline is another machine's)
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
scratch="$(mktemp -d -t dreampool-bench-XXXX)"
trap 'rm -rf "$scratch"' EXIT
run_suite() {  # $1: where the pytest-benchmark JSON goes
  "$PY" -m pytest benchmarks --benchmark-only -q -p no:cacheprovider \
    --benchmark-json="$1" --benchmark-columns=median,mean,stddev,rounds
}
if [ "$mode" = check ]; then
  # A ratio over the limit is confirmed by up to two more runs of the suite: each
  # ratio counts by its best run, so a neighbour's burst on a shared machine does
  # not fail the check, while a real regression shows in every run.
  runs=()
  for attempt in 1 2 3; do
    runs+=("$scratch/run-$attempt.json")
    run_suite "${runs[-1]}"
    rc=0
    "$PY" benchmarks/report.py "${runs[@]}" --machine "$machine" --profile "$profile" \
      --check benchmarks/baseline-ratios.json || rc=$?
    if [ "$rc" -ne 1 ] || [ "$attempt" -eq 3 ]; then exit "$rc"; fi
    echo "ratios over the limit after run $attempt of 3: running the suite again to tell noise from a regression"
  done
fi
raw="$scratch/run.json"
run_suite "$raw"
extra=()
if [ "$mode" = baseline ]; then extra=(--write-baseline benchmarks/baseline-ratios.json); fi
"$PY" benchmarks/report.py "$raw" --machine "$machine" --profile "$profile" "${extra[@]}"
