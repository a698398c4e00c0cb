"""What the pool buys a training loop: every arm of :mod:`dreampool_gpu.demo` over several seeds.

The main comparison runs the four arms (no pool, random replay, retrieval with the
feature encoder, retrieval with the learned encoder refitted every 50 steps) on the
default regime over ``--seeds`` seeds; the design variants then run random replay
against feature retrieval on changed regimes (long-tailed classes, class-balanced
hints, clean labels) to show where retrieval's choice helps or hurts. Writes the
JSON to ``--out`` and, where matplotlib is installed (the ``bench`` extra), a plot
of validation accuracy vs step per arm (mean over seeds, band = min..max).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/training_benefit.py [--seeds 5] [--steps 300]
    python benchmarks/training_benefit.py --plot-only benchmarks/results/training_benefit.json

torch runs on one thread (``torch.set_num_threads(1)``): every arm gets the same
compute on a shared machine, and CPU results repeat bit for bit.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "long-tailed classes (imbalance 10), batch hints": ({"imbalance": 10.0}, {"hints": "batch"}),
    "class-balanced hints": ({}, {"hints": "balanced"}),
    "clean labels, batch hints": ({"label_noise": 0.0}, {"hints": "batch"}),
}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run(seeds: int, steps: int) -> dict[str, object]:
    """Every comparison of this benchmark, as a JSON-ready dict."""
    import torch

    from dreampool_gpu.demo import StreamSpec, run_comparison, summarise, table

    torch.set_num_threads(1)
    spec = StreamSpec(steps=steps)
    seed_list = list(range(seeds))
    start = time.perf_counter()
    results, errors = run_comparison(spec, seeds=seed_list, progress=True)
    main = summarise(results, errors)
    print("\n".join(table(main)))
    variants = {}
    for name, (spec_changes, options) in VARIANTS.items():
        vspec = replace(spec, **spec_changes)
        vres, _ = run_comparison(vspec, seeds=seed_list, arms=("random", "feature"), **options)
        vsum = summarise(vres)
        print(f"\n{name}\n" + "\n".join(table(vsum)))
        variants[name] = {"spec": asdict(vspec), "options": options, "summaries": [s.to_dict() for s in vsum]}
    return {
        "date": datetime.date.today().isoformat(),
        "machine": {"cpu": _cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "seconds": time.perf_counter() - start,
        "spec": asdict(spec),
        "seeds": seed_list,
        "errors": errors,
        "summaries": [s.to_dict() for s in main],
        "table": table(main),
        "runs": [r.to_dict() for r in results],
        "variants": variants,
    }


def plot(report: dict[str, object], path: Path) -> bool:
    """Validation accuracy vs step per arm (mean, min..max band); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2))
    runs = report["runs"]
    for arm in dict.fromkeys(r["arm"] for r in runs):  # type: ignore[index, union-attr]
        curves = [r["curve_accuracy"] for r in runs if r["arm"] == arm]  # type: ignore[index, union-attr]
        steps = next(r["curve_steps"] for r in runs if r["arm"] == arm)  # type: ignore[index, union-attr]
        columns = list(zip(*curves))
        mean = [sum(c) / len(c) for c in columns]
        ax.plot(steps, mean, label=f"{arm} ({len(curves)} seeds)")
        ax.fill_between(steps, [min(c) for c in columns], [max(c) for c in columns], alpha=0.2)
    ax.axhline(0.95, color="grey", linewidth=0.8, linestyle="--")
    spec = report["spec"]
    ax.set_title(f"{spec['dataset']}, {spec['fresh']} fresh dreams/step, {spec['label_noise']:.0%} label noise")  # type: ignore[index]
    ax.set_xlabel("training step")
    ax.set_ylabel("validation accuracy")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "training_benefit.json")
    parser.add_argument("--figure", type=Path, default=ROOT / "docs" / "images" / "training_benefit.png")
    parser.add_argument("--plot-only", type=Path, help="plot an existing JSON report (needs only matplotlib)")
    args = parser.parse_args()
    if args.plot_only:
        report = json.loads(args.plot_only.read_text())
    else:
        report = run(args.seeds, args.steps)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    print(f"wrote {args.figure}" if plot(report, args.figure) else "matplotlib not installed: no plot")


if __name__ == "__main__":
    main()
