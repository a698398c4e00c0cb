"""What the pool buys a training loop: every arm of :mod:`dreampool_gpu.demo` over several seeds.

The main comparison runs the five arms (no pool, random replay, trusted replay, retrieval
with the feature encoder, retrieval with the learned encoder) on the default regime over
``--seeds`` seeds; the design variants then change one choice of the retrieval arms
(batch hints, the first round's loss-change utility, no filter) to show what each does;
the wide learner runs every arm once with a CNN whose step costs ~20x more, for the
overhead. Writes the JSON to ``--out`` and, where matplotlib is installed (the ``bench``
extra), a plot of validation accuracy vs step per arm (mean over seeds, band = min..max).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/training_benefit.py [--seeds 5] [--steps 300]
    python benchmarks/training_benefit.py --plot-only benchmarks/results/training_benefit.json

torch runs on one thread (``torch.set_num_threads(1)``): every arm gets the same
compute on a shared machine, and CPU results repeat bit for bit.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "batch hints (each query's own label)": (("feature", "learned"), {"hints": "batch"}),
    "no trust filter (drop 0)": (("feature", "learned"), {"drop": 0.0}),
    "loss-change utility, batch hints, no filter (the first round's design)": (
        ("random", "feature"),
        {"utility": "loss", "hints": "batch", "drop": 0.0},
    ),
}
WIDE = 128


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
    results = run_comparison(spec, seeds=seed_list, progress=True)
    main = summarise(results)
    print("\n".join(table(main)))
    variants = {}
    for name, (arms, options) in VARIANTS.items():
        vsum = summarise(run_comparison(spec, seeds=seed_list, arms=arms, **options))
        print(f"\n{name}\n" + "\n".join(table(vsum)))
        variants[name] = {
            "arms": arms,
            "options": options,
            "summaries": [s.to_dict() for s in vsum],
        }
    wide = summarise(run_comparison(spec, seeds=[0], width=WIDE, progress=True))
    print(f"\nwide learner (width {WIDE}), seed 0\n" + "\n".join(table(wide)))
    return {
        "date": datetime.date.today().isoformat(),
        "machine": {
            "cpu": _cpu_model(),
            "cores": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "seconds": time.perf_counter() - start,
        "spec": asdict(spec),
        "seeds": seed_list,
        "summaries": [s.to_dict() for s in main],
        "table": table(main),
        "runs": [r.to_dict() for r in results],
        "variants": variants,
        "wide": {
            "width": WIDE,
            "seeds": [0],
            "summaries": [s.to_dict() for s in wide],
            "table": table(wide),
        },
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
        columns = list(zip(*curves, strict=True))
        mean = [sum(c) / len(c) for c in columns]
        ax.plot(steps, mean, label=f"{arm} ({len(curves)} seeds)")
        ax.fill_between(steps, [min(c) for c in columns], [max(c) for c in columns], alpha=0.2)
    ax.axhline(0.95, color="grey", linewidth=0.8, linestyle="--")
    spec = report["spec"]
    noise = f"{spec['label_noise']:.0%}"  # type: ignore[index]
    ax.set_title(f"{spec['dataset']}, {spec['fresh']} fresh dreams/step, {noise} label noise")  # type: ignore[index]
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
