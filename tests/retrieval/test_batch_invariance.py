"""A query's answer does not depend on the batch it is asked in (docs/spec.md, "Equality of results").

The same queries asked in batches of 1..8 and as chunkings of a 7-query job return what one
call returns: scores within the spec's tolerance, ids up to ties. BLAS and FAISS take other
kernels for other batch sizes (and other CPUs), so the last bits may differ; duplicates of
an entry still tie exactly (the oldest wins), which the pool holds in every mode.
"""

from __future__ import annotations

import pytest
import torch
from _equality import assert_same_results

from dreampool_gpu import DreamPool, PoolConfig
from dreampool_gpu.retrieval.modes import MODES

SHAPE = (4, 4, 2)


def _pool(metric: str, engine: str, checks: str) -> DreamPool:
    g = torch.Generator().manual_seed(3)
    pool = DreamPool(
        PoolConfig(
            dream_shape=SHAPE,
            capacity=96,
            device="cpu",
            metric=metric,
            engine=engine,
            checks=checks,
            query_cache_size=0,
        )
    )
    base = torch.rand(60, 1, 1, 1, 3, generator=g)
    dreams = (base + 0.1 * (torch.rand(60, *SHAPE, 3, generator=g) - 0.5)).clamp(0, 1)
    dreams = torch.cat([dreams, dreams[:12]])  # exact duplicates: ties the oldest must win
    ids = pool.add(dreams, coherence=torch.ones(72), class_label=torch.arange(72) % 5, force=True)
    pool.feedback(ids[::2], torch.rand(36, generator=g))
    return pool


def _options(mode: str, b: int) -> dict:
    if mode == "class":
        return {"class_hint": torch.arange(b) % 5}
    if mode == "balanced":
        return {"classes": [0, 3], "k": 3}
    if mode == "utility":
        return {"utility_threshold": 0.2}
    return {}


def _split(queries: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(torch.split(queries, sizes))


def _ask(pool: DreamPool, mode: str, queries: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One answer for ``queries`` asked in consecutive batches of ``sizes``."""
    ids, scores = [], []
    start = 0
    for part in _split(queries, sizes):
        opts = _options(mode, part.shape[0])
        if "class_hint" in opts:
            opts["class_hint"] = (torch.arange(start, start + part.shape[0])) % 5
        hits = pool.retrieve(part, k=opts.pop("k", 6), mode=mode, **opts)
        ids.append(hits.ids)
        scores.append(hits.scores)
        start += part.shape[0]
    return torch.cat(ids), torch.cat(scores)


@pytest.mark.parametrize("checks", ["immediate", "deferred"])
@pytest.mark.parametrize("metric,engine", [("cosine", "torch"), ("euclidean", "torch"), ("cosine", "faiss-flat")])
@pytest.mark.parametrize("mode", list(MODES))
def test_batch_sizes_and_chunkings_give_one_answer(mode, metric, engine, checks):
    if engine == "faiss-flat":
        pytest.importorskip("faiss")
    pool = _pool(metric, engine, checks)
    g = torch.Generator().manual_seed(11)
    queries = torch.cat([pool.dreams(torch.tensor([0, 61, 5])), torch.rand(5, *SHAPE, 3, generator=g)])
    want_ids, want_scores = _ask(pool, mode, queries, [8])
    plans = [[b] * (8 // b) + ([8 % b] if 8 % b else []) for b in range(1, 8)]  # batches of 1..7
    plans += [[3, 3, 1, 1], [1, 6, 1], [7, 1], [2, 5, 1]]  # chunkings of the 7-query job (+ the 8th)
    for sizes in plans:
        ids, scores = _ask(pool, mode, queries, sizes)
        assert_same_results(ids, scores, want_ids, want_scores, where=f"{mode} batches {sizes}")
    pool.check()


def test_duplicates_of_an_entry_rank_oldest_first_in_any_batch():
    pool = _pool("cosine", "torch", "immediate")
    dup = pool.dreams(torch.tensor([4]))  # entries 4 and 64 are the same dream
    for b in range(1, 9):
        queries = torch.cat([dup, torch.rand(b - 1, *SHAPE, 3, generator=torch.Generator().manual_seed(b))])
        hits = pool.retrieve(queries, k=1, mode="nearest")
        assert int(hits.ids[0, 0]) == 4, f"batch of {b}: {hits.ids[0].tolist()}"
