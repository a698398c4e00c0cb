"""The ``dreampool`` command."""

from __future__ import annotations

import argparse
import json
import sys

from dreampool_gpu.errors import DreamPoolError


def _shape(text: str) -> tuple[int, int, int]:
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected ROWSxCOLSxLAYERS such as 16x16x4, got {text!r}")
    return int(parts[0]), int(parts[1]), int(parts[2])


def _demo(args: argparse.Namespace) -> int:
    from dreampool_gpu.demo import run_demo

    summary = run_demo(
        steps=args.steps,
        batch=args.batch,
        dream_shape=args.shape,
        capacity=args.capacity,
        threshold=args.threshold,
        device=args.device,
        seed=args.seed,
        progress=not args.no_progress,
    )
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        print("\n".join(summary.lines()))
    return 0


def environment_info() -> dict[str, object]:
    """torch, CUDA, FAISS and NVML facts of this machine (never raises)."""
    import torch

    from dreampool_gpu.devices import cuda_available, faiss_gpu_available, nvml_available

    info: dict[str, object] = {"torch": torch.__version__, "cuda_available": cuda_available()}
    if cuda_available():
        info["cuda_version"] = torch.version.cuda
        info["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    try:
        import faiss

        info["faiss"] = faiss.__version__
    except ImportError:
        info["faiss"] = None
    info["faiss_gpu"] = faiss_gpu_available()
    info["nvml"] = nvml_available()
    return info


def _info(args: argparse.Namespace) -> int:
    info = environment_info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print("\n".join(f"{key:15} {value}" for key, value in info.items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every ``dreampool`` command."""
    parser = argparse.ArgumentParser(prog="dreampool", description="GPU dream pool tools.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="run the simulated training loop and print a summary")
    demo.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    demo.add_argument("--batch", type=int, default=64, help="dreams per step (default 64)")
    demo.add_argument("--shape", type=_shape, default=(16, 16, 4), help="dream shape RxCxL (default 16x16x4)")
    demo.add_argument("--capacity", type=int, default=2000, help="pool capacity (default 2000)")
    demo.add_argument("--threshold", type=float, default=0.6, help="coherence gate (default 0.6)")
    demo.add_argument("--device", default="cpu", help='"cpu", "cuda" or "auto" (default cpu)')
    demo.add_argument("--seed", type=int, default=0, help="data seed (default 0)")
    demo.add_argument("--json", action="store_true", help="print the summary as JSON")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    demo.set_defaults(run=_demo)

    info = commands.add_parser("info", help="show torch, CUDA, FAISS and NVML facts of this machine")
    info.add_argument("--json", action="store_true", help="print as JSON")
    info.set_defaults(run=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dreampool`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except DreamPoolError as exc:
        print(f"dreampool: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
