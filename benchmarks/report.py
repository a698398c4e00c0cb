"""Turn a pytest-benchmark JSON into the suite's results file, plots and regression check.

    python benchmarks/report.py RAW.json [RAW2.json ...] --machine NAME [--check BASELINE.json]
                                [--write-baseline BASELINE.json]

Writes ``benchmarks/results/<machine>.json`` (machine and device described
inside, every benchmark's timings, and cost ratios) and PNG plots beside it.

A *cost ratio* is a benchmark's median divided by the median of the benchmark
with role ``baseline`` in the same group (roles come from ``extra_info["role"]``,
set by the ``record_median`` fixture). Ratios, unlike absolute times, carry from
one machine to another far better, but not across CPU models: the baseline
records the facts it depends on (:data:`COMPARABLE_KEYS`) and ``--check``
refuses (exit 2) on another machine. On the same one it fails (exit 1) when a
ratio is more than 25% worse (higher) than the committed baseline. Only groups
whose baseline runs at least ``MIN_BASELINE_S`` are checked (shorter ones are
too noisy to compare).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

TOLERANCE = 1.25
MIN_BASELINE_S = 5e-4  # groups whose baseline runs shorter are reported but not checked: timer noise
RESULTS = Path(__file__).parent / "results"


def _cpuinfo(field: str) -> str | None:
    """The first ``field`` line of ``/proc/cpuinfo`` (its value), None where unreadable."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_simd() -> list[str]:
    """The vector extensions torch and FAISS kernels pick from (``/proc/cpuinfo`` flags)."""
    flags = set((_cpuinfo("flags") or "").split())
    return sorted(f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags)


# the facts a cost ratio depends on: a baseline is only comparable on the same ones
COMPARABLE_KEYS = ("cpu_model", "cpu_simd", "cpu_count", "device", "gpu", "torch", "faiss")


def machine_info(device: str) -> dict[str, object]:
    import torch

    info: dict[str, object] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_simd": cpu_simd(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import faiss

        info["faiss"] = faiss.__version__
    except ImportError:
        info["faiss"] = None
    return info


def cost_ratios(benchmarks: list[dict]) -> dict[str, float]:
    """``{"group :: name": median / baseline median}`` for every non-baseline with a role."""
    baselines = {
        b["group"]: b["stats"]["median"] for b in benchmarks if b.get("extra_info", {}).get("role") == "baseline"
    }
    ratios = {}
    for b in benchmarks:
        role = b.get("extra_info", {}).get("role")
        if role and role != "baseline" and b["group"] in baselines:
            ratios[f"{b['group']} :: {b['name']}"] = b["stats"]["median"] / baselines[b["group"]]
    return ratios


def checked_ratios(benchmarks: list[dict]) -> dict[str, float]:
    """The cost ratios of groups whose baseline median is at least ``MIN_BASELINE_S``.

    Below that (one query over 10K entries: ~60 us), run-to-run noise on a shared
    2-core machine alone moved a ratio by more than 25% between two unchanged runs.
    """
    long_enough = {
        b["group"]
        for b in benchmarks
        if b.get("extra_info", {}).get("role") == "baseline" and b["stats"]["median"] >= MIN_BASELINE_S
    }
    return {key: r for key, r in cost_ratios(benchmarks).items() if key.split(" :: ")[0] in long_enough}


def best_ratios(runs: list[list[dict]]) -> dict[str, float]:
    """Each ratio's lowest value over several runs of the suite.

    On a shared machine a neighbour's burst slows one benchmark of a group and
    not its baseline, in one run; a real regression shows in every run.
    """
    best: dict[str, float] = {}
    for benchmarks in runs:
        for key, ratio in cost_ratios(benchmarks).items():
            best[key] = min(ratio, best.get(key, ratio))
    return best


def comparable(info: dict[str, object]) -> dict[str, object]:
    """The part of :func:`machine_info` that must match for ratios to be compared."""
    return {key: info.get(key) for key in COMPARABLE_KEYS}


def read_baseline(path: Path) -> dict[str, object]:
    """``{"machine": comparable facts or None (an old flat file), "ratios": {key: ratio}}``."""
    body = json.loads(path.read_text())
    if "ratios" in body and "machine" in body:
        return body
    return {"machine": None, "ratios": body}


def check(ratios: dict[str, float], baseline: dict[str, float]) -> list[str]:
    """Lines describing every baseline ratio that is more than 25% worse, or was not measured.

    ``ratios`` should be every ratio of the run (:func:`cost_ratios`): the baseline
    file already holds only the groups long enough to check, and a renamed or
    removed benchmark must fail rather than pass unnoticed.
    """
    failures = []
    for key, want in sorted(baseline.items()):
        got = ratios.get(key)
        if got is None:
            failures.append(f"{key}: not measured in this run (renamed or removed? rewrite the baseline)")
        elif got > want * TOLERANCE:
            failures.append(f"{key}: cost ratio {got:.3f} vs baseline {want:.3f} (> {TOLERANCE:.2f}x worse)")
    return failures


def _series(
    benchmarks: list[dict], module: str, x: str, series: str, y: str | None, panel: str | None
) -> dict[str, dict[str, list]]:
    """``{panel value: {series value: [(x, y), ...]}}`` (one panel "" when ``panel`` is None)."""
    out: dict[str, dict[str, list]] = {}
    for b in benchmarks:
        info = b.get("extra_info", {})
        if module in b["fullname"] and x in info and series in info:
            value = info[y] if y else b["stats"]["median"] * 1e3
            where = f"{panel}={info.get(panel)}" if panel else ""
            out.setdefault(where, {}).setdefault(str(info[series]), []).append((info[x], value))
    return {where: {name: sorted(points) for name, points in lines.items()} for where, lines in out.items()}


def plot(benchmarks: list[dict], machine: str) -> list[Path]:
    """Latency vs pool size per engine (a panel per batch size), MMR time vs k, memory per entry vs n."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = [  # name, module, x, series, y (None: median ms), panel, x label, y label, log-log
        ("search", "test_search", "n", "engine", None, "B", "pool size n", "median latency (ms)", True),
        ("mmr", "test_rerank", "k", "impl", None, None, "k", "median time (ms)", True),
        (
            "memory",
            "test_bytes_per_entry",
            "n",
            "device",
            "measured_per_entry",
            None,
            "entries n (16x16x4 dreams)",
            "measured bytes per entry",
            False,
        ),
    ]
    written = []
    for name, module, x, series, y, panel, xlabel, ylabel, loglog in specs:
        panels = _series(benchmarks, module, x, series, y, panel)
        if not panels:
            continue
        order = sorted(panels, key=lambda p: (len(p), p))
        fig, axes = plt.subplots(1, len(order), figsize=(5 * len(order), 4), squeeze=False)
        for ax, where in zip(axes[0], order, strict=True):
            for label, points in sorted(panels[where].items()):
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
            ax.set_xscale("log" if loglog or name == "memory" else "linear")
            if loglog:
                ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{name} {where} ({machine})".replace("  ", " "))
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = RESULTS / f"{machine}-{name}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "raw",
        type=Path,
        nargs="+",
        help="pytest-benchmark --benchmark-json output; with --check, several runs of the "
        "same suite are compared by each ratio's best run",
    )
    parser.add_argument("--machine", required=True, help="name of this machine (file name of the results)")
    parser.add_argument("--device", default=os.environ.get("DREAMPOOL_BENCH_DEVICE", "cpu"))
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--check", type=Path, help="fail when a ratio is >25%% worse than this baseline")
    parser.add_argument(
        "--write-baseline",
        type=Path,
        help="merge this run's ratios into this baseline, keeping the worst of each (delete the file to start afresh)",
    )
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)

    runs = [json.loads(path.read_text())["benchmarks"] for path in args.raw]
    benchmarks = runs[-1]
    ratios = cost_ratios(benchmarks)
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": args.machine,
        "profile": args.profile,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine_info": machine_info(args.device),
        "ratios": ratios,
        "benchmarks": [
            {
                "group": b["group"],
                "name": b["name"],
                "median_s": b["stats"]["median"],
                "mean_s": b["stats"]["mean"],
                "stddev_s": b["stats"]["stddev"],
                "rounds": b["stats"]["rounds"],
                "extra_info": b.get("extra_info", {}),
            }
            for b in benchmarks
        ],
    }
    if not args.check:
        (RESULTS / f"{args.machine}.json").write_text(json.dumps(result, indent=2) + "\n")
        if not args.no_plots:
            for path in plot(benchmarks, args.machine):
                print(f"wrote {path}")
        print(f"wrote {RESULTS / f'{args.machine}.json'} ({len(benchmarks)} benchmarks, {len(ratios)} ratios)")
    here = comparable(result["machine_info"])
    if args.write_baseline:
        merged = checked_ratios(benchmarks)
        old = read_baseline(args.write_baseline) if args.write_baseline.exists() else None
        if old is not None and old["machine"] == here:  # keep the worst seen: the baseline is a noise envelope
            for key, ratio in old["ratios"].items():
                merged[key] = max(ratio, merged.get(key, ratio))
        elif old is not None:
            print(f"baseline {args.write_baseline} came from another machine ({old['machine']}): started afresh")
        body = {"machine": here, "ratios": dict(sorted(merged.items()))}
        args.write_baseline.write_text(json.dumps(body, indent=2) + "\n")
        print(f"wrote baseline {args.write_baseline}")
    if args.check:
        baseline = read_baseline(args.check)
        if baseline["machine"] != here:
            print(
                f"regression check NOT RUN: the baseline was recorded on {baseline['machine']}, this machine is "
                f"{here}. Cost ratios move between CPU models (FAISS vs torch moved 2.4x between two 2-core "
                f"sandboxes); record a baseline here first: scripts/bench.sh --write-baseline (three times)."
            )
            return 2
        measured = best_ratios(runs)
        failures = check(measured, baseline["ratios"])
        compared = len(baseline["ratios"])
        if failures:
            print(f"regression check FAILED ({len(failures)} of {compared} ratios):")
            print("\n".join(f"  {line}" for line in failures))
            return 1
        print(f"regression check passed: {compared} ratios within {TOLERANCE:.2f}x of the baseline")
    return 0


if __name__ == "__main__":
    sys.exit(main())
