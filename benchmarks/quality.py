"""Retrieval quality: precision@10 and recall@10 of the pool's encoders against plain baselines.

    python benchmarks/quality.py [--entries 3000] [--queries 300] [--steps 200] [--out FILE]

For every labelled synthetic set (:mod:`dreampool_gpu.synthetic`) a bank of
``--entries`` dreams and ``--queries`` fresh dreams (another seed) are drawn.
A retrieved entry is relevant when it has the query's class. Methods, in one run:

- ``features``: the pool with the feature encoder (``nearest`` and ``hybrid``);
- ``learned``: the pool with the learned encoder after ``fit_encoder`` (same modes);
- ``pixels``: cosine over centred, flattened pixels (exact);
- ``pca64``: cosine over the top 64 principal components of the centred pixels.

Each with dream queries and chroma-only queries (a chroma query is encoded by
the pool as it always is; the pixel baselines get the flat dream of that
colour), over a labelled pool and an unlabelled one (entries without class
labels: the learned encoder then trains self-supervised). recall@10 is the
share of all relevant entries in the pool found in the top 10 (its ceiling is
10 / class size). Also timed: ``fit_encoder`` on 10K entries and retrieve
latency at B = 256 with either encoder. Prints a markdown table and writes
JSON next to the other results.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dreampool_gpu import DreamPool, PoolConfig
from dreampool_gpu.synthetic import DATASETS, LabelledDreams, make_dataset

SHAPE = (16, 16, 4)
K = 10


def scores(retrieved: torch.Tensor, query_labels: torch.Tensor, bank_labels: torch.Tensor) -> dict[str, float]:
    """precision@k and recall@k of ``retrieved`` ``[B, k]`` bank rows (-1 = none)."""
    found = retrieved >= 0
    hit = (bank_labels[retrieved.clamp(min=0)] == query_labels[:, None]) & found
    class_size = torch.bincount(bank_labels, minlength=int(bank_labels.max()) + 1)[query_labels]
    return {
        "precision": float(hit.float().sum(1).div(K).mean()),
        "recall": float((hit.float().sum(1) / class_size.clamp(min=1)).mean()),
    }


def flat_dreams(chroma: torch.Tensor) -> torch.Tensor:
    """``[B, 3]`` -> the flat dreams ``[B, R, C, L, 3]`` of those colours."""
    return chroma[:, None, None, None, :].expand(-1, *SHAPE, 3)


def pixel_baselines(bank: LabelledDreams, queries: torch.Tensor) -> dict[str, torch.Tensor]:
    """Top-k bank rows by cosine over centred pixels and over their PCA-64 projection."""
    x = bank.dreams.flatten(1)
    mean = x.mean(0)
    xc, qc = x - mean, queries.flatten(1) - mean
    top_pixels = (F.normalize(qc, dim=1) @ F.normalize(xc, dim=1).T).topk(K).indices
    _, _, v = torch.pca_lowrank(xc, q=64, center=False, niter=4)
    xp, qp = xc @ v, qc @ v
    top_pca = (F.normalize(qp, dim=1) @ F.normalize(xp, dim=1).T).topk(K).indices
    return {"pixels": top_pixels, "pca64": top_pca}


def pool_for(
    bank: LabelledDreams, encoder: str, labelled: bool, steps: int, jitter: float = 0.05
) -> tuple[DreamPool, float]:
    """A CPU pool holding ``bank`` (rows = ids, labels optional); fitted when learned. Returns fit seconds."""
    cfg = PoolConfig(
        dream_shape=SHAPE,
        capacity=bank.dreams.shape[0],
        device="cpu",
        encoder=encoder,
        num_classes=bank.num_classes,
        query_cache_size=0,
    )
    pool = DreamPool(cfg)
    pool.add(bank.dreams, coherence=torch.ones(bank.dreams.shape[0]), class_label=bank.labels if labelled else None)
    seconds = 0.0
    if encoder == "learned":
        seconds = pool.fit_encoder(steps=steps, seed=0, colour_jitter=jitter).seconds
    return pool, seconds


def evaluate(name: str, entries: int, queries: int, steps: int, jitter: float) -> list[dict[str, object]]:
    """Every method x query kind x pool labelling on set ``name``."""
    bank = make_dataset(name, entries, shape=SHAPE, seed=0)
    query = make_dataset(name, queries, shape=SHAPE, seed=1)
    chroma = query.dreams.mean((1, 2, 3))
    rows: list[dict[str, object]] = []
    for kind, q_pixels in (("dream", query.dreams), ("chroma", flat_dreams(chroma))):
        for method, top in pixel_baselines(bank, q_pixels).items():
            rows.append(
                {"set": name, "query": kind, "pool": "any", "method": method, **scores(top, query.labels, bank.labels)}
            )
    for labelled in (True, False):
        for encoder in ("features", "learned"):
            pool, fit_s = pool_for(bank, encoder, labelled, steps, jitter)
            for kind, q in (("dream", query.dreams), ("chroma", chroma)):
                for mode in ("nearest", "hybrid"):
                    ids = pool.retrieve(q, k=K, mode=mode).ids  # ids are bank rows: added in order
                    rows.append(
                        {
                            "set": name,
                            "query": kind,
                            "pool": "labelled" if labelled else "unlabelled",
                            "method": f"{encoder}/{mode}",
                            "fit_s": round(fit_s, 1),
                            **scores(ids, query.labels, bank.labels),
                        }
                    )
    return rows


def timings(steps: int) -> dict[str, float]:
    """fit_encoder seconds on 10K entries; retrieve ms at B = 256 (dream queries, hybrid) per encoder."""
    bank = make_dataset("colour_structure", 10_000, shape=SHAPE, seed=0)
    query = make_dataset("colour_structure", 256, shape=SHAPE, seed=1).dreams
    out: dict[str, float] = {}
    for encoder in ("features", "learned"):
        pool, fit_s = pool_for(bank, encoder, True, steps)
        if encoder == "learned":
            out["fit_10k_s"] = round(fit_s, 1)
        pool.retrieve(query, k=K, mode="hybrid")
        runs = []
        for _ in range(5):
            start = time.perf_counter()
            pool.retrieve(query, k=K, mode="hybrid")
            runs.append(time.perf_counter() - start)
        out[f"retrieve_b256_{encoder}_ms"] = round(1000 * sorted(runs)[len(runs) // 2], 2)
    out["retrieve_ratio_learned_vs_features"] = round(
        out["retrieve_b256_learned_ms"] / out["retrieve_b256_features_ms"], 2
    )
    return out


def table(rows: list[dict[str, object]]) -> str:
    """Markdown: one line per set x query x pool, precision@10 per method (recall@10 in brackets)."""
    methods = ["pixels", "pca64", "features/nearest", "features/hybrid", "learned/nearest", "learned/hybrid"]
    lines = ["| set | query | pool | " + " | ".join(methods) + " |", "|" + " --- |" * (3 + len(methods))]
    keys = sorted({(r["set"], r["query"], r["pool"]) for r in rows if r["pool"] != "any"}, key=str)
    for s, q, p in keys:
        cells = []
        for m in methods:
            match = [
                r for r in rows if r["set"] == s and r["query"] == q and r["method"] == m and r["pool"] in (p, "any")
            ]
            cells.append(f"{match[0]['precision']:.3f} ({match[0]['recall']:.4f})" if match else "-")
        lines.append(f"| {s} | {q} | {p} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entries", type=int, default=3000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--sets", nargs="*", default=list(DATASETS))
    parser.add_argument("--colour-jitter", type=float, default=0.05, help="fit_encoder's colour_jitter")
    parser.add_argument("--no-timings", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "quality-cpu.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = [
        row for name in args.sets for row in evaluate(name, args.entries, args.queries, args.steps, args.colour_jitter)
    ]
    result: dict[str, object] = {
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "entries": args.entries,
        "queries": args.queries,
        "steps": args.steps,
        "colour_jitter": args.colour_jitter,
        "rows": rows,
    }
    if not args.no_timings:
        result["timings"] = timings(args.steps)
    print(table(rows))
    if "timings" in result:
        print(json.dumps(result["timings"], indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
