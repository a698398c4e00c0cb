"""Retrieval quality targets (a small run of ``benchmarks/quality.py``) and the learned encoder's retrieve cost.

    pytest benchmarks/test_quality.py                  # quality targets, ~1-2 min on 2 CPU cores
    pytest benchmarks/test_quality.py --benchmark-only # retrieve at B = 256: learned vs feature encoder

Quality (labelled pools, dream queries): the learned encoder's precision@10 is at
least the best plain baseline's (cosine over centred pixels, PCA-64) minus 0.02,
and at least 0.95 wherever the pixel baseline reaches 0.9. The full table, with
chroma queries and unlabelled pools, is ``benchmarks/quality.py``'s (docs/benchmarks.md).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.quality import SHAPE, K, pixel_baselines, pool_for, scores
from dreampool_gpu import DreamPool, PoolConfig
from dreampool_gpu.synthetic import make_dataset

ENTRIES, QUERIES, STEPS = 1000, 150, 100


@pytest.mark.parametrize("name", ["colours", "colour_structure", "colour_structure_hard", "frequency_orientation"])
def test_learned_encoder_meets_the_baselines(name):
    bank = make_dataset(name, ENTRIES, shape=SHAPE, seed=0)
    query = make_dataset(name, QUERIES, shape=SHAPE, seed=1)
    baselines = {
        m: scores(top, query.labels, bank.labels)["precision"] for m, top in pixel_baselines(bank, query.dreams).items()
    }
    pool, _ = pool_for(bank, "learned", True, STEPS)
    learned = scores(pool.retrieve(query.dreams, k=K, mode="nearest").ids, query.labels, bank.labels)["precision"]
    best = max(baselines.values())
    assert learned >= best - 0.02, (learned, baselines)
    if baselines["pixels"] >= 0.9:
        assert learned >= 0.95, (learned, baselines)


@pytest.mark.parametrize(("role", "encoder"), [("baseline", "features"), ("learned", "learned")])
def test_retrieve_cost_by_encoder(benchmark, bench_device, record_median, role, encoder):
    bank = make_dataset("colour_structure", 10_000, shape=SHAPE, seed=0)
    queries = make_dataset("colour_structure", 256, shape=SHAPE, seed=1).dreams.to(bench_device)
    pool = DreamPool(
        PoolConfig(
            dream_shape=SHAPE, capacity=10_000, device=str(bench_device), encoder=encoder, num_classes=bank.num_classes
        )
    )
    pool.add(
        bank.dreams.to(bench_device),
        coherence=torch.ones(10_000, device=bench_device),
        class_label=bank.labels.to(bench_device),
    )
    benchmark.group = "retrieve hybrid, B = 256, 10K entries, by encoder"

    def run():
        out = pool.retrieve(queries, k=K, mode="hybrid")
        if bench_device.type == "cuda":
            torch.cuda.synchronize(bench_device)
        return out

    benchmark.pedantic(run, rounds=10, warmup_rounds=1)
    record_median(benchmark, role)
