"""Ties in the embedding modes on CPU: the oldest of equal entries make the cut, rows best first."""

from __future__ import annotations

import random

import pytest
import torch

from dreampool_gpu import DreamPool, PoolConfig

SHAPE = (6, 6, 2)


def _pool(seed: int, metric: str) -> tuple[DreamPool, torch.Tensor]:
    """A pool whose dreams repeat a few originals (exact duplicates tie), and its dreams."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    originals = torch.rand(rng.choice([3, 6]), *SHAPE, 3, generator=g)
    picks = torch.randint(0, originals.shape[0], (rng.choice([20, 40]),), generator=g)
    dreams = originals[picks]
    pool = DreamPool(PoolConfig(dream_shape=SHAPE, capacity=64, device="cpu", engine="torch", metric=metric))
    pool.add(dreams, coherence=1.0)
    return pool, dreams


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("seed", range(12))
def test_duplicates_cut_oldest_first_and_rows_sorted(seed, metric):
    pool, dreams = _pool(seed, metric)
    queries = torch.cat([dreams[:3], torch.rand(3, *SHAPE, 3, generator=torch.Generator().manual_seed(99))])
    vectors = pool.bank.columns["embeddings"][: len(pool)]
    ids = pool.bank.columns["ids"][: len(pool)]
    for k in (1, 2, 3, 5, 8):
        hits = pool.retrieve(queries, k=k, mode="nearest")
        assert bool((hits.scores[:, :-1] >= hits.scores[:, 1:]).all()), "rows best first"
        for row, got in enumerate(hits.ids.tolist()):
            # duplicates share one embedding: group entries by their vector, each group oldest first
            chosen = [ids.tolist().index(i) for i in got]
            for slot in chosen:
                same = (vectors == vectors[slot]).all(1)
                older_same = [int(i) for i in ids[same] if int(i) < int(ids[slot])]
                for older in older_same:  # an older duplicate of a returned entry is returned too
                    assert older in got, (row, k, got, older)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("seed", range(6))
def test_host_tie_scan_answers_as_the_kernels(seed, metric, monkeypatch):
    """A few scores (CPU) are scanned and re-ordered on the host; the same rows through the kernels of
    near_ties and _rescore_candidates (every score past the host limit) give the same ids, scores and usage."""
    from dreampool_gpu.retrieval import stages

    pool, dreams = _pool(seed, metric)
    g = torch.Generator().manual_seed(seed + 50)
    vectors = pool.bank.columns["embeddings"][: len(pool)]
    queries = {
        "dreams": torch.cat([dreams[:3], torch.rand(2, *SHAPE, 3, generator=g)]),
        "embeddings": torch.cat([vectors[:3], vectors[3:5] + 1e-7 * torch.randn(2, vectors.shape[1], generator=g)]),
    }
    few = torch.zeros(pool.bank.capacity, dtype=torch.bool)
    few[:6] = True  # six entries qualify: k + 1 candidates include padding
    for kind, q in queries.items():
        cases = ((1, "nearest"), (3, "nearest"), (7, "nearest"), (len(pool) - 1, "nearest"), (3, "hybrid"))
        for (k, mode), keep in [(case, None) for case in cases] + [((5, "nearest"), few), ((8, "nearest"), few)]:
            for rows in (q[:1], q):
                usage = pool.bank.raw["usage"].clone()
                host = pool.retrieve(rows, k=k, mode=mode, where=keep)
                host_usage = pool.bank.raw["usage"] - usage
                with monkeypatch.context() as patch:
                    patch.setattr(stages, "_HOST_TIE_SCAN", 0)
                    usage = pool.bank.raw["usage"].clone()
                    kernels = pool.retrieve(rows, k=k, mode=mode, where=keep)
                    kernel_usage = pool.bank.raw["usage"] - usage
                where = f"{kind} k={k} {mode} B={rows.shape[0]} where={keep is not None}"
                assert torch.equal(host.ids, kernels.ids), where
                assert torch.equal(host.scores, kernels.scores), where
                assert torch.equal(host_usage, kernel_usage), where
