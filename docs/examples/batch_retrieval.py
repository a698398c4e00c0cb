"""A batch retrieval job: save a pool, write queries to a file, answer them all, read the results.

    python docs/examples/batch_retrieval.py [--entries 2000] [--queries 100000] [--dir DIR | --temp]

The pool, the queries and the results are kept in ``--dir`` (default
``./dreampool-batch-example``) for a look afterwards (``dreampool inspect DIR/pool``);
``--temp`` writes them to a temporary directory removed at exit instead.

The same job from a shell, after ``pip install -e .``::

    dreampool retrieve POOL_DIR queries.npy --k 10 --mode similar --out results.safetensors

``retrieve`` reads the queries in chunks (``--chunk``, default 65,536), keeps
finished chunks in ``results.safetensors.parts/`` and resumes from there when
the same command is rerun after an interrupt. The saved pool is only read.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path

import numpy as np
import torch

from dreampool_gpu import DreamPool, PoolConfig, score_dreams
from dreampool_gpu.batch import read_results
from dreampool_gpu.cli import main as dreampool
from dreampool_gpu.dreams import CLASS_NAMES, synthetic_dreams


def build_pool(path: Path, entries: int) -> None:
    """Fill a CPU pool with synthetic class-coloured dreams and save it at ``path``."""
    pool = DreamPool(PoolConfig(dream_shape=(8, 8, 2), capacity=entries, coherence_threshold=0.0, device="cpu"))
    generator = torch.Generator().manual_seed(0)
    for start in range(0, entries, 1000):
        dreams, labels = synthetic_dreams(min(1000, entries - start), (8, 8, 2), generator=generator)
        scores = score_dreams(dreams)
        pool.add(
            dreams,
            coherence=scores.coherence,
            energy=scores.energy,
            violation=scores.violation,
            class_label=labels,
        )
    pool.save(path)
    print(f"saved a pool of {len(pool)} entries to {path}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--entries", type=int, default=2000)
    parser.add_argument("--queries", type=int, default=100_000)
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path("dreampool-batch-example"),
        help="where the pool, queries and results are written and kept (default ./dreampool-batch-example)",
    )
    parser.add_argument("--temp", action="store_true", help="use a temporary directory, removed at exit")
    args = parser.parse_args()

    place = tempfile.TemporaryDirectory() if args.temp else contextlib.nullcontext(args.dir)
    with place as where:
        root = Path(where)
        root.mkdir(parents=True, exist_ok=True)
        build_pool(root / "pool", args.entries)

        # [B, 3] chroma signatures, float32 in [0, 1]; [B, R, C, L, 3] dreams work too
        queries = np.random.default_rng(1).random((args.queries, 3), dtype=np.float32)
        np.save(root / "queries.npy", queries)

        out = root / "results.safetensors"
        code = dreampool(["inspect", str(root / "pool")])
        code = code or dreampool(
            [
                "retrieve",
                str(root / "pool"),
                str(root / "queries.npy"),
                "--out",
                str(out),
                "--k",
                "5",
                "--mode",
                "similar",
                "--chunk",
                "20000",
                "--no-progress",
            ]
        )
        if code != 0:
            raise SystemExit(code)

        ids, scores = read_results(out)  # [B, 5] int64 (-1 padding), [B, 5] float32 (-inf padding)
        print(f"ids {tuple(ids.shape)} {ids.dtype}, scores {tuple(scores.shape)} {scores.dtype}")

        # the ids index the saved pool: gather metadata (or dreams) for any of them
        pool = DreamPool.load(root / "pool", device="cpu")
        labels = pool.metadata(ids[:3])["class_label"]
        for row in range(3):
            names = [CLASS_NAMES[int(c)] for c in labels[row]]
            print(f"query {row} {queries[row].round(2)} -> ids {ids[row].tolist()} classes {names}")
        kept = "removed at exit (--temp)" if args.temp else f"kept in {root}"
        print(f"pool, queries and results {kept}")


if __name__ == "__main__":
    main()
