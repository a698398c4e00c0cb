"""The ``dreampool`` command: demo, info, inspect, retrieve, bench.

Errors a user can fix (a missing file, a wrong shape or dtype, an unknown mode)
print one line ``dreampool: error: ...`` on stderr and exit with status 2, as
argparse does for bad arguments; an interrupted ``retrieve`` exits with 130 and
resumes when rerun.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from dreampool_gpu.errors import DreamPoolError, InvalidInputError
from dreampool_gpu.retrieval.modes import OPTIONS
from dreampool_gpu.synthetic import DATASETS

DEFAULT_K = 10  # results per query of `dreampool retrieve`, as the library's examples use
# retrieve's keyword arguments by the flag that sets them, so errors name the flag
_FLAGS = {name: "--" + name.replace("_", "-") for name in ("k", "mode", "chunk", "key", "out", *OPTIONS)}


def _shape(text: str) -> tuple[int, int, int]:
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected ROWSxCOLSxLAYERS such as 16x16x4, got {text!r}")
    return int(parts[0]), int(parts[1]), int(parts[2])


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _arms(text: str) -> str:
    from dreampool_gpu.demo import ARMS  # parsed only for `demo`: other commands never import it

    unknown = [a for a in text.split(",") if a not in ARMS]
    if unknown or not text:
        expected = f"a comma-separated subset of {','.join(ARMS)}"
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return text


def _demo(args: argparse.Namespace) -> int:
    import torch

    from dreampool_gpu.demo import ARMS, run_demo

    torch.set_num_threads(1)  # every arm gets the same compute, whatever else shares the CPU
    report = run_demo(
        steps=args.steps,
        fresh=args.batch,
        dataset=args.dataset,
        dream_shape=args.shape,
        capacity=args.capacity,
        arms=ARMS if args.arms is None else tuple(args.arms.split(",")),
        device=args.device,
        seed=args.seed,
        width=args.width,
        progress=not args.no_progress,
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print("\n".join(report.lines()))
    return 0


def environment_info() -> dict[str, object]:
    """torch, CUDA, FAISS and NVML facts of this machine, with a memory reading per device (never raises)."""
    import torch

    from dreampool_gpu.devices import cuda_available, faiss_gpu_available
    from dreampool_gpu.memory import nvml_available

    info: dict[str, object] = {"torch": torch.__version__, "cuda_available": cuda_available()}
    devices = [torch.device("cpu")]
    if cuda_available():
        info["cuda_version"] = torch.version.cuda
        info["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    try:
        import faiss

        info["faiss"] = faiss.__version__
        info["faiss_build"] = faiss.get_compile_options().strip() if hasattr(faiss, "get_compile_options") else None
    except ImportError:
        info["faiss"] = None
    info["faiss_gpu"] = faiss_gpu_available()
    info["nvml"] = nvml_available()
    info["memory"] = {str(device): _memory_reading(device) for device in devices}
    return info


def _memory_reading(device: Any) -> dict[str, object]:
    """What the pool's memory probe for ``device`` reads now: used, total, source, note (never raises)."""
    from dreampool_gpu.memory import open_probe

    try:
        probe = open_probe(device)
        try:
            reading = probe.read()
        finally:
            probe.close()
    except Exception as exc:  # a broken driver or NVML must not break `dreampool info`
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {
        "used_bytes": reading.used_bytes,
        "total_bytes": reading.total_bytes,
        "source": reading.source,
        "note": reading.note,
    }


def _info(args: argparse.Namespace) -> int:
    info = environment_info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print("\n".join(f"{key:15} {value}" for key, value in info.items()))
    return 0


def pool_summary(path: str | os.PathLike[str], *, device: str = "cpu") -> dict[str, Any]:
    """Facts about the checkpoint at ``path``: stats, column shapes and bytes, histograms.

    The pool is loaded (every checksum verified) on ``device`` and dropped; the
    checkpoint is not written.

    A checkpoint an interrupted save left only as its ``.old`` copy is read from
    there, as :meth:`DreamPool.load` does.

    Raises:
        CheckpointNotFoundError: no checkpoint at ``path``.
        CheckpointCorruptError: the checkpoint fails verification, or ``path`` is a file.
    """
    from dreampool_gpu.dreams import NUM_HUE_CATEGORIES
    from dreampool_gpu.persist import checkpoint_source
    from dreampool_gpu.pool import DreamPool

    where = Path(path)
    pool = DreamPool.load(where, device=device)
    source = checkpoint_source(where) or where
    stats = pool.stats()
    bank = pool.bank
    alive = bank.alive()
    labels = bank.columns["class_label"][alive].long()
    hues = bank.columns["hue_category"][alive].long()
    class_counts = (labels + 1).bincount(minlength=pool.config.num_classes + 1).tolist()
    hue_counts = hues.bincount(minlength=NUM_HUE_CATEGORIES).tolist()
    nbytes = bank.nbytes()
    columns = {
        name: {
            "shape": list(t.shape),
            "dtype": str(t.dtype).removeprefix("torch."),
            "bytes": nbytes[name],
        }
        for name, t in bank.columns.items()
    }
    config = pool.config
    return {
        "path": str(where),
        "size": stats.size,
        "capacity": stats.capacity,
        "next_id": stats.next_id,
        "dream_shape": list(config.dream_shape),
        "embedding_dim": config.embedding_dim,
        "metric": config.metric.value,
        "device": stats.device,
        "engine": stats.engine,
        "index": dict(stats.search),
        "index_bytes": stats.index_bytes,
        "bank_bytes": stats.bank_bytes,
        "checkpoint_bytes": sum(f.stat().st_size for f in source.iterdir() if f.is_file()),
        "columns": columns,
        "class_label": {str(label): c for label, c in enumerate(class_counts, start=-1)},  # -1: none
        "hue_category": {str(i): c for i, c in enumerate(hue_counts)},
        "means": {"coherence": stats.mean_coherence, "energy": stats.mean_energy, "violation": stats.mean_violation},
        "counters": dict(stats.counters),
        "config": config.to_dict(),
    }


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _summary_lines(s: dict[str, Any]) -> list[str]:
    r, c, layers = s["dream_shape"]
    lines = [
        f"pool            {s['path']}",
        f"entries         {s['size']} / {s['capacity']} (next id {s['next_id']})",
        f"dreams          {r}x{c}x{layers}x3, embeddings {s['embedding_dim']}-d {s['metric']}",
        f"engine          {s['engine']} (index {_size(s['index_bytes'])}, last used {s['index']['last_engine']})",
        f"bank            {_size(s['bank_bytes'])} on {s['device']}; checkpoint {_size(s['checkpoint_bytes'])}",
        "means           " + ", ".join(f"{k} {v:.4f}" for k, v in s["means"].items()),
        "counters        " + ", ".join(f"{k} {v}" for k, v in s["counters"].items()),
        "columns",
    ]
    for name, col in s["columns"].items():
        shape = "x".join(str(d) for d in col["shape"])
        lines.append(f"  {name:15} {shape:18} {col['dtype']:8} {_size(col['bytes']):>10}")
    lines.append("class_label     " + "  ".join(f"{k}:{v}" for k, v in s["class_label"].items()) + "  (-1: none)")
    lines.append("hue_category    " + "  ".join(f"{k}:{v}" for k, v in s["hue_category"].items()))
    return lines


def _inspect(args: argparse.Namespace) -> int:
    summary = pool_summary(args.pool, device=args.device)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print("\n".join(_summary_lines(summary)))
    return 0


def _classes(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated class labels such as 0,3,7, got {text!r}") from None


def _retrieve(args: argparse.Namespace) -> int:
    from dreampool_gpu.batch import run_retrieval_job, work_dir

    options = {name: getattr(args, name) for name in OPTIONS if getattr(args, name) is not None}
    group = _init_torchrun(args)
    rank = 0
    if group is not None:
        import torch.distributed as dist

        rank = dist.get_rank()
    try:
        report = run_retrieval_job(
            args.pool,
            args.queries,
            args.out,
            k=args.k,
            mode=args.mode,
            chunk=args.chunk,
            key=args.key,
            device=args.device,
            options=options,
            progress=not args.no_progress,
            group=group,
        )
    except KeyboardInterrupt:
        print(
            f"dreampool: interrupted; finished chunks are kept in {work_dir(args.out)}: "
            "rerun the same command to resume",
            file=sys.stderr,
        )
        return 130
    finally:
        if group is not None:
            import torch.distributed as dist

            dist.destroy_process_group()
    if rank != 0:
        return 0  # under torchrun rank 0 reports
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    if report.discarded:
        print(
            f"dreampool: discarded partial results of a different job in {work_dir(args.out)}",
            file=sys.stderr,
        )
    if report.already_done:
        print(f"{report.out} already holds this job's results ({report.queries} queries); nothing to do")
        return 0
    rate = report.computed_queries / report.seconds if report.seconds > 0 else float("inf")
    resumed = f", {report.resumed} resumed" if report.resumed else ""
    print(
        f"wrote ids and scores [{report.queries}, {report.width}] to {report.out}: "
        f"{report.chunks} chunks ({report.computed} computed{resumed}) in {report.seconds:.2f} s, "
        f"{rate:,.0f} queries/s computed"
    )
    return 0


def _init_torchrun(args: argparse.Namespace) -> Any:
    """Under torchrun (``WORLD_SIZE`` > 1): a gloo group from the environment, else None.

    The group only agrees on each step of the job (a few small messages per run);
    the pool is loaded by every rank. With CUDA, each rank uses ``cuda:LOCAL_RANK``.
    """
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise InvalidInputError("WORLD_SIZE", "an integer (set by torchrun)", os.environ["WORLD_SIZE"]) from None
    if world <= 1:
        return None
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    if args.device in ("auto", "cuda") and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(seconds=args.dist_timeout))
    return dist.group.WORLD


def bench_script() -> Path:
    """Where ``scripts/bench.sh`` is in a source checkout of this package."""
    return Path(__file__).resolve().parent.parent / "scripts" / "bench.sh"


def _bench(args: argparse.Namespace) -> int:
    script = bench_script()
    if not script.is_file():
        raise InvalidInputError(
            "bench",
            f"scripts/bench.sh of a source checkout (looked for {script})",
            "none: the benchmarks ship with the repository, not the installed package; run from a clone",
        )
    passthrough = list(args.passthrough)
    if passthrough[:1] == ["--"]:
        passthrough = passthrough[1:]
    return subprocess.run(["bash", str(script), *passthrough], check=False).returncode


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every ``dreampool`` command."""
    parser = argparse.ArgumentParser(prog="dreampool", description="GPU dream pool tools.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train a small CNN on a noisy labelled stream with and without the pool")
    demo.add_argument("--steps", type=_positive_int, default=300, help="steps (default 300)")
    demo.add_argument("--batch", type=_positive_int, default=8, help="fresh stream dreams per step (default 8)")
    demo.add_argument("--shape", type=_shape, default=(16, 16, 2), help="dream shape RxCxL (default 16x16x2)")
    demo.add_argument("--capacity", type=_positive_int, default=4000, help="pool capacity (default 4000)")
    demo.add_argument(
        "--dataset",
        default="frequency_orientation",
        choices=sorted(DATASETS),
        help="labelled set of the stream (default frequency_orientation)",
    )
    demo.add_argument(
        "--arms",
        type=_arms,
        default=None,
        help="comma-separated subset of none,random,trusted,feature,learned (default: every arm)",
    )
    demo.add_argument("--device", default="cpu", help='"cpu", "cuda" or "auto" (default cpu)')
    demo.add_argument("--seed", type=int, default=0, help="data seed (default 0)")
    demo.add_argument("--width", type=_positive_int, default=16, help="the CNN's width (default 16; 128: ~20x)")
    demo.add_argument("--json", action="store_true", help="print the table and every run as JSON")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    demo.set_defaults(run=_demo)

    info = commands.add_parser("info", help="show torch, CUDA, FAISS and NVML facts of this machine")
    info.add_argument("--json", action="store_true", help="print as JSON")
    info.set_defaults(run=_info)

    inspect = commands.add_parser(
        "inspect",
        help="show a saved pool's stats: size, shapes, bytes per column, index, histograms",
        description="Load a checkpoint written by DreamPool.save (verifying every checksum) and "
        "print its size, column shapes and bytes, search engine and index, class and hue-category "
        "histograms. "
        "The checkpoint is not modified.",
    )
    inspect.add_argument("pool", help="checkpoint directory (pool.save(path))")
    inspect.add_argument("--device", default="cpu", help='where to load it (default cpu; "auto", "cuda")')
    inspect.add_argument("--json", action="store_true", help="print as JSON")
    inspect.set_defaults(run=_inspect)

    retrieve = commands.add_parser(
        "retrieve",
        help="batch job: answer a file of queries from a saved pool, write ids and scores",
        description="Answer every query in QUERIES from the pool saved at POOL, in chunks, and "
        "write ids [B, k] int64 (-1 padding) and scores [B, k] float32 (-inf padding) to OUT "
        "(safetensors). "
        "QUERIES is a .npy, .safetensors or .pt file holding [B, R, C, L, 3] dreams, [B, 3] chroma "
        "signatures or [B, D] embeddings (embedding modes). Finished chunks are kept in "
        "OUT.parts/; "
        "rerunning an interrupted job with the same arguments resumes it. The pool is read-only: "
        "usage counts are not written back. Under torchrun every rank loads the pool and answers "
        "its share of the chunks; rank 0 writes OUT.",
    )
    retrieve.add_argument("pool", help="checkpoint directory (pool.save(path))")
    retrieve.add_argument("queries", help="queries file: .npy, .safetensors or .pt")
    retrieve.add_argument("--out", required=True, help="results file, ending in .safetensors")
    retrieve.add_argument(
        "--k",
        type=int,
        default=DEFAULT_K,
        help=f"results per query (default {DEFAULT_K}; per class for mode balanced)",
    )
    retrieve.add_argument(
        "--mode",
        default="hybrid",
        help="similar (hard), class, balanced, utility, diverse, soft, hybrid, category or nearest (default: hybrid)",
    )
    retrieve.add_argument("--chunk", type=int, default=65536, help="queries per chunk (default 65536)")
    retrieve.add_argument("--key", default=None, help="tensor name in a multi-tensor .safetensors/.pt file")
    retrieve.add_argument("--device", default="auto", help="where to load the pool (default auto: CUDA when present)")
    retrieve.add_argument(
        "--class-hint", type=int, default=None, help="class label 0..num_classes-1 (mode class; soft/hybrid)"
    )
    retrieve.add_argument("--classes", type=_classes, default=None, help="class labels for mode balanced, e.g. 0,3,7")
    retrieve.add_argument(
        "--category",
        type=int,
        default=None,
        help="hue category 0..11: the category of mode category (default: each query's own) "
        "and a candidate filter of nearest, soft and hybrid",
    )
    retrieve.add_argument("--utility-threshold", type=float, default=None, help="minimum utility (mode utility)")
    retrieve.add_argument("--utility-prior", type=float, default=None, help="utility feature of soft queries, 0..1")
    retrieve.add_argument("--fetch-k", type=int, default=None, help="candidates re-ranked by soft/hybrid")
    retrieve.add_argument("--mmr-lambda", type=float, default=None, help="MMR trade-off 0..1 (diverse, hybrid)")
    retrieve.add_argument("--min-dispersion", type=float, default=None, help="stop MMR picks below this dispersion")
    retrieve.add_argument(
        "--chroma-metric", default=None, help="cosine (default) or euclidean scores of the chroma modes"
    )
    retrieve.add_argument(
        "--dist-timeout",
        type=_positive_int,
        default=1800,
        help="under torchrun: seconds a rank waits for the others at each step (default 1800)",
    )
    retrieve.add_argument("--json", action="store_true", help="print the job report as JSON")
    retrieve.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    retrieve.set_defaults(run=_retrieve)

    bench = commands.add_parser(
        "bench",
        help="run scripts/bench.sh of this checkout (arguments pass through)",
        description="Run scripts/bench.sh of the source checkout this package was imported from, "
        "passing every further argument through (e.g. dreampool bench --full, "
        "dreampool bench --check). "
        "Installed without the repository, it exits with an error.",
    )
    bench.add_argument("passthrough", nargs="*", help="arguments for scripts/bench.sh")
    bench.set_defaults(run=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dreampool`` console script."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.command != "bench":
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.passthrough = [*args.passthrough, *extra]
    try:
        return int(args.run(args))
    except DreamPoolError as exc:
        notes = "".join(f"\n  {note}" for note in getattr(exc, "__notes__", ()))
        print(f"dreampool: error: {_one_line(_flag_message(exc))}{notes}", file=sys.stderr)
        return 2


def _flag_message(exc: DreamPoolError) -> str:
    """``exc``'s message, naming the command-line flag (``--class-hint``) instead of the parameter."""
    text = str(exc)
    name = getattr(exc, "name", None)
    if isinstance(exc, InvalidInputError) and name in _FLAGS:
        return text.replace(f"invalid {name}:", f"invalid {_FLAGS[name]}:", 1)
    return text


def _one_line(text: str) -> str:
    """Errors are one line: inner line breaks (a library's multi-line message) become "; "."""
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())


if __name__ == "__main__":
    sys.exit(main())
