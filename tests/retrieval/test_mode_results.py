"""Results of every retrieval mode against a recorded fixture (CPU), as docs/spec.md promises.

The fixture ``tests/data/mode_results.json`` holds the ids and scores that each case
returned when it was recorded (on one CPU); refactors of the retrieval path must
reproduce them up to the promised equality (scores within ``SCORE_TOL``, ids up to
ties), on any CPU: BLAS and FAISS take other SIMD paths on
other processors, so last bits are not compared. After an intended change of results,
record it again with ``PYTHONPATH=tests python tests/retrieval/test_mode_results.py`` and review the diff.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _equality import assert_same_results

from dreampool_gpu import DreamPool, PoolConfig

FIXTURE = Path(__file__).parent.parent / "data" / "mode_results.json"
SHAPE = (3, 4, 2)


def _dreams(n: int, g: torch.Generator) -> torch.Tensor:
    base = torch.rand(n, 1, 1, 1, 3, generator=g)
    noise = 0.05 * (torch.rand(n, *SHAPE, 3, generator=g) - 0.5)
    return (base + noise).clamp(0, 1)


def _pool(metric: str, engine: str) -> tuple[DreamPool, torch.Tensor]:
    """A CPU pool of 48 entries (8 exact duplicates, so ties occur), with labels and feedback."""
    g = torch.Generator().manual_seed(7)
    config = PoolConfig(
        dream_shape=SHAPE,
        capacity=64,
        device="cpu",
        metric=metric,
        engine=engine,
        coherence_threshold=0.0,
        query_cache_size=0,
    )
    pool = DreamPool(config)
    dreams = _dreams(40, g)
    dreams = torch.cat([dreams, dreams[:8]])  # duplicates: equal scores, oldest must win
    labels = torch.randint(-1, 10, (48,), generator=g)
    ids = pool.add(dreams, coherence=torch.rand(48, generator=g), class_label=labels)
    pool.feedback(ids[::3], torch.rand(ids[::3].shape[0], generator=g))
    return pool, _dreams(6, g)


def _cases(queries: torch.Tensor) -> dict[str, dict]:
    chroma = queries.mean(dim=(1, 2, 3))
    hint = torch.tensor([0, 1, 2, 3, 4, 5])
    mask = torch.zeros(64, dtype=torch.bool)
    mask[::2] = True
    return {
        "similar": {"mode": "similar"},
        "similar_chroma": {"mode": "similar", "queries": chroma},
        "similar_euclidean": {"mode": "similar", "chroma_metric": "euclidean"},
        "similar_where": {"mode": "similar", "where": mask},
        "class": {"mode": "class", "class_hint": hint},
        "class_scalar": {"mode": "class", "class_hint": 3},
        "balanced": {"mode": "balanced", "classes": [1, 4, 7], "k": 3},
        "balanced_where": {"mode": "balanced", "classes": [2, 5], "k": 3, "where": mask},
        "utility": {"mode": "utility", "utility_threshold": 0.3},
        "diverse": {"mode": "diverse"},
        "diverse_lambda": {"mode": "diverse", "mmr_lambda": 0.3, "min_dispersion": 0.01},
        "diverse_where": {"mode": "diverse", "where": mask, "chroma_metric": "euclidean"},
        "nearest": {"mode": "nearest"},
        "nearest_category": {"mode": "nearest", "category": 2},
        "nearest_where": {"mode": "nearest", "where": lambda c: c["coherence"] > 0.4},
        "category": {"mode": "category"},
        "category_given": {"mode": "category", "category": torch.tensor([0, 1, 2, 3, 4, 5])},
        "soft": {"mode": "soft"},
        "soft_hint": {"mode": "soft", "class_hint": hint, "utility_prior": 0.5},
        "hybrid": {"mode": "hybrid"},
        "hybrid_options": {"mode": "hybrid", "class_hint": hint, "fetch_k": 12, "mmr_lambda": 0.6, "category": 1},
        "hybrid_where": {"mode": "hybrid", "where": mask, "k": 20},
        "hybrid_k0": {"mode": "hybrid", "k": 0},
        "nearest_padded": {"mode": "nearest", "k": 70},
    }


_SETUPS = (("cosine", "torch"), ("euclidean", "torch"), ("cosine", "faiss-flat"))
CASES = [f"{m}/{e}/{name}" for m, e in _SETUPS for name in _cases(torch.zeros(6, *SHAPE, 3))]


def _record() -> dict[str, dict]:
    out: dict[str, dict] = {}
    for metric, engine in _SETUPS:
        pool, queries = _pool(metric, engine)
        for name, case in _cases(queries).items():
            case = dict(case)
            q = case.pop("queries", queries)
            hits = pool.retrieve(q, k=case.pop("k", 5), **case)
            out[f"{metric}/{engine}/{name}"] = {
                "ids": hits.ids.tolist(),
                "scores": hits.scores.tolist(),
            }
    return out


@pytest.fixture(scope="module")
def recorded() -> dict[str, dict]:
    return json.loads(FIXTURE.read_text())


@pytest.fixture(scope="module")
def current() -> dict[str, dict]:
    pytest.importorskip("faiss")
    return _record()


def test_every_case_recorded(recorded, current):
    assert sorted(current) == sorted(recorded)


@pytest.mark.parametrize("case", CASES)
def test_mode_results_match_the_fixture(case, recorded, current):
    got, want = current[case], recorded[case]
    assert_same_results(
        torch.tensor(got["ids"]),
        torch.tensor(got["scores"]),
        torch.tensor(want["ids"]),
        torch.tensor(want["scores"]),
        where=case,
    )


if __name__ == "__main__":  # record the fixture from the current code
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(json.dumps(_record(), indent=0, sort_keys=True) + "\n")
    print(f"wrote {FIXTURE}")
