"""rerank.py: batched MMR and hybrid scoring against plain per-query Python loops.

Tie rule (docs/spec.md §Hybrid score and MMR, rerank.py): among equal MMR objectives the lowest
candidate index wins; the reference loop below follows it (strict ``>`` while
scanning candidates in index order). Random inputs are compared only where every
step's best objective beats the runner-up by more than float32 noise (``_MARGIN``),
since the library works in float32 and the reference in float64; exact ties are
tested separately on inputs whose arithmetic is exact (one-hot vectors, dyadic
relevance).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dreampool_gpu import DreamPool, PoolConfig
from dreampool_gpu.errors import (
    DimensionMismatchError,
    InvalidConfigurationError,
    InvalidInputError,
)
from dreampool_gpu.rerank import (
    HybridWeights,
    class_match,
    diversity_stats,
    hybrid_scores,
    mmr,
    mmr_row_bytes,
    mmr_unchecked,
    row_chunks,
    rowwise_cosine,
)
from dreampool_gpu.retrieval import stages as stages_module

_MARGIN = 1e-5  # objective gap below which float32 and float64 may legitimately disagree
_EXAMPLES = settings(max_examples=500, deadline=None)
NEG_INF = float("-inf")


# ------------------------------------------------------------------ reference
def cos(a, b):
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in b))
    if na < 1e-12 or nb < 1e-12:
        return 0.0
    return sum(x * y for x, y in zip(a, b, strict=True)) / (na * nb)


def mean_pairwise(points):
    pairs = [(i, j) for i in range(len(points)) for j in range(i + 1, len(points))]
    return sum(math.dist(points[i], points[j]) for i, j in pairs) / len(pairs)


def reference_mmr(rel, vecs, k, lam, delta=0.0, min_dispersion=0.0, points=None):
    """One query, plain Python floats: ``(picks, margin)``.

    ``margin`` is the smallest gap, over all steps, between the best objective and
    the runner-up, and between the dispersion and ``min_dispersion`` when that rule
    is checked; callers skip inputs whose margin is within float32 noise.
    """
    chosen, margin = [], math.inf
    candidates = [i for i, r in enumerate(rel) if r != NEG_INF]
    while len(chosen) < k:
        left = [i for i in candidates if i not in chosen]
        if not left:
            break
        values = []
        for i in left:
            if not chosen:
                values.append(rel[i])
            else:
                ms = max(cos(vecs[i], vecs[j]) for j in chosen)
                values.append(lam * rel[i] - (1 - lam) * ms - delta * max(0.0, ms))
        best_pos = 0
        for pos, val in enumerate(values):  # index order, strict >: lowest index wins ties
            if val > values[best_pos]:
                best_pos = pos
        ordered = sorted(values, reverse=True)
        if len(ordered) > 1:
            margin = min(margin, ordered[0] - ordered[1])
        chosen.append(left[best_pos])
        if min_dispersion > 0 and len(chosen) >= 2:
            dispersion = mean_pairwise([points[i] for i in chosen])
            margin = min(margin, abs(dispersion - min_dispersion))
            if dispersion < min_dispersion:
                break
    return chosen, margin


def padded(picks, k):
    return picks + [-1] * (k - len(picks))


def random_case(seed, b, m, e, *, shared, pad_fraction):
    g = torch.Generator().manual_seed(seed)
    rel = torch.rand(b, m, generator=g) * 2 - 1
    rel = rel.masked_fill(torch.rand(b, m, generator=g) < pad_fraction, NEG_INF)
    vectors = torch.randn(m, e, generator=g) if shared else torch.randn(b, m, e, generator=g)
    points = torch.rand(b, m, 3, generator=g)
    return rel, vectors, points


def query_vectors(vectors, row):
    return (vectors if vectors.dim() == 2 else vectors[row]).double().tolist()


def one_hot_case(device):
    """Exact arithmetic: one-hot vectors (cosines 0 or 1), dyadic relevance, duplicates."""
    eye = torch.eye(4)
    vectors = eye[[0, 0, 1, 2, 2, 3]]  # 0 and 1 duplicates, 3 and 4 duplicates
    rel = torch.tensor([[0.5, 0.5, 0.25, 0.75, 0.75, 0.0]])
    return rel.to(device), vectors.to(device)


# ---------------------------------------------------------------------- MMR
class TestMMRAgainstLoop:
    @_EXAMPLES
    @given(
        seed=st.integers(0, 2**31 - 1),
        b=st.integers(1, 4),
        m=st.integers(0, 12),
        e=st.integers(2, 5),
        k=st.integers(0, 14),
        lam=st.one_of(st.just(0.0), st.just(1.0), st.floats(0, 1)),
        delta=st.one_of(st.just(0.0), st.floats(0, 1)),
        shared=st.booleans(),
        pad_fraction=st.sampled_from([0.0, 0.3, 1.0]),
    )
    def test_random_inputs(self, seed, b, m, e, k, lam, delta, shared, pad_fraction):
        rel, vectors, _ = random_case(seed, b, m, e, shared=shared, pad_fraction=pad_fraction)
        picks, scores = mmr(rel, vectors, k, mmr_lambda=lam, delta=delta)
        assert picks.shape == scores.shape == (b, k)
        for row in range(b):
            want, margin = reference_mmr(rel[row].tolist(), query_vectors(vectors, row), k, lam, delta)
            assume(margin > _MARGIN)
            assert picks[row].tolist() == padded(want, k)
            expected = [rel[row, i].item() for i in want] + [NEG_INF] * (k - len(want))
            assert scores[row].tolist() == expected

    @_EXAMPLES
    @given(
        seed=st.integers(0, 2**31 - 1),
        b=st.integers(1, 3),
        m=st.integers(2, 10),
        k=st.integers(2, 10),
        lam=st.floats(0, 1),
        min_dispersion=st.floats(0.05, 1.0),
    )
    def test_random_min_dispersion(self, seed, b, m, k, lam, min_dispersion):
        rel, vectors, points = random_case(seed, b, m, 3, shared=False, pad_fraction=0.0)
        picks, _ = mmr(
            rel,
            vectors,
            k,
            mmr_lambda=lam,
            delta=0.05,
            min_dispersion=min_dispersion,
            points=points,
        )
        for row in range(b):
            want, margin = reference_mmr(
                rel[row].tolist(),
                vectors[row].double().tolist(),
                k,
                lam,
                0.05,
                min_dispersion,
                points[row].double().tolist(),
            )
            assume(margin > _MARGIN)
            assert picks[row].tolist() == padded(want, k)

    @pytest.mark.parametrize("lam", [0.0, 0.35, 1.0])
    def test_fixed_cases_on_device(self, device, lam):
        rel, vectors, points = random_case(7, 5, 30, 8, shared=False, pad_fraction=0.2)
        picks, _ = mmr(rel.to(device), vectors.to(device), 9, mmr_lambda=lam, delta=0.05)
        for row in range(5):
            want, margin = reference_mmr(rel[row].tolist(), vectors[row].double().tolist(), 9, lam, 0.05)
            assert margin > _MARGIN
            assert picks[row].tolist() == padded(want, 9)


class TestMMRCases:
    def test_lambda_one_is_stable_top_k(self, device):
        rel, vectors, _ = random_case(3, 4, 25, 6, shared=False, pad_fraction=0.0)
        rel[:, 5] = rel[:, 2]  # an exact relevance tie: index 2 must come first
        picks, scores = mmr(rel.to(device), vectors.to(device), 10, mmr_lambda=1.0, delta=0.0)
        order = torch.sort(rel, dim=1, descending=True, stable=True)
        assert picks.cpu().tolist() == order.indices[:, :10].tolist()
        assert torch.equal(scores.cpu(), order.values[:, :10])

    def test_lambda_zero_is_pure_diversity(self, device):
        rel, vectors = one_hot_case(device)
        picks, _ = mmr(rel, vectors, 6, mmr_lambda=0.0)
        # first the most relevant (3); then every unused direction (cosine 0) before any
        # duplicate (cosine 1), lowest index first among equals
        assert picks.tolist() == [[3, 0, 2, 5, 1, 4]]

    def test_tie_rule_lowest_index_wins(self, device):
        rel, vectors = one_hot_case(device)
        picks, _ = mmr(rel, vectors, 6, mmr_lambda=0.5)
        # objectives are exact in float32 here, so every tie is real
        want, _ = reference_mmr(rel[0].tolist(), vectors.tolist(), 6, 0.5)
        assert picks.tolist() == [want] == [[3, 0, 2, 5, 4, 1]]

    def test_duplicates_pushed_back_by_delta(self, device):
        # b (index 1) duplicates a; c (index 2) is orthogonal but less relevant
        vectors = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], device=device)
        rel = torch.tensor([[1.0, 0.875, 0.5]], device=device)
        # lambda 0.75: b scores 0.75*0.875 - 0.25 = 0.40625, c scores 0.375: b wins
        assert mmr(rel, vectors, 2, mmr_lambda=0.75)[0].tolist() == [[0, 1]]
        # delta 0.125 costs the duplicate another 0.125: c wins
        assert mmr(rel, vectors, 2, mmr_lambda=0.75, delta=0.125)[0].tolist() == [[0, 2]]

    def test_identical_candidates_all_returned_in_index_order(self, device):
        vectors = torch.ones(5, 3, device=device)
        rel = torch.full((2, 5), 0.25, device=device)
        picks, scores = mmr(rel, vectors, 5, mmr_lambda=0.7, delta=0.05)
        assert picks.tolist() == [[0, 1, 2, 3, 4]] * 2
        assert scores.tolist() == [[0.25] * 5] * 2

    def test_k_larger_than_candidates(self, device):
        rel = torch.tensor([[0.5, NEG_INF, 0.25], [NEG_INF, 0.75, NEG_INF]], device=device)
        vectors = torch.eye(3, device=device)
        picks, scores = mmr(rel, vectors, 5, mmr_lambda=0.7)
        assert picks.tolist() == [[0, 2, -1, -1, -1], [1, -1, -1, -1, -1]]
        assert scores.tolist() == [[0.5, 0.25] + [NEG_INF] * 3, [0.75] + [NEG_INF] * 4]

    def test_all_candidates_padded(self, device):
        rel = torch.full((3, 4), NEG_INF, device=device)
        picks, scores = mmr(rel, torch.randn(3, 4, 2, device=device), 3, mmr_lambda=0.5, delta=0.1)
        assert picks.tolist() == [[-1] * 3] * 3
        assert scores.tolist() == [[NEG_INF] * 3] * 3

    @pytest.mark.parametrize("b,m,k", [(0, 4, 3), (2, 0, 3), (2, 4, 0)])
    def test_empty_shapes(self, b, m, k):
        picks, scores = mmr(torch.rand(b, m), torch.rand(b, m, 2), k, mmr_lambda=0.5)
        assert picks.shape == scores.shape == (b, k)
        assert picks.dtype == torch.int64
        assert (picks == -1).all()

    def test_zero_vector_has_cosine_zero(self):
        vectors = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
        rel = torch.tensor([[1.0, 0.0, 0.5]])
        # lambda 0.5: the zero vector scores 0 - 0 = 0, the duplicate 0.25 - 0.5 = -0.25
        assert mmr(rel, vectors, 2, mmr_lambda=0.5)[0].tolist() == [[0, 1]]

    def test_min_dispersion_stops_early_keeping_the_pick(self, device):
        # lambda 1 picks in relevance order 0, 1, 2, 3
        rel = torch.tensor([[1.0, 0.75, 0.5, 0.25]] * 2, device=device)
        vectors = torch.eye(4, device=device)
        points = torch.tensor(
            [
                [
                    [0.0, 0, 0],
                    [1.0, 0, 0],
                    [0.0, 0, 0],
                    [5.0, 0, 0],
                ],  # dispersions 1, 2/3: stops at 3 picks
                [[0.0, 0, 0], [1.0, 0, 0], [2.0, 0, 0], [3.0, 0, 0]],  # 1, 4/3, 5/3: never stops
            ],
            device=device,
        )
        picks, scores = mmr(rel, vectors, 4, mmr_lambda=1.0, min_dispersion=0.8, points=points)
        assert picks.tolist() == [[0, 1, 2, -1], [0, 1, 2, 3]]
        assert scores[0, 3].item() == NEG_INF

    def test_min_dispersion_with_shared_points(self):
        rel = torch.tensor([[1.0, 0.75, 0.5]])
        picks, _ = mmr(rel, torch.eye(3), 3, mmr_lambda=1.0, min_dispersion=0.5, points=torch.zeros(3, 3))
        assert picks.tolist() == [[0, 1, -1]]  # the second pick makes dispersion 0 and is kept

    def test_shared_vectors_equal_per_query_vectors(self, device):
        rel, vectors, points = random_case(11, 6, 40, 5, shared=True, pad_fraction=0.25)
        rel, vectors = rel.to(device), vectors.to(device)
        shared = mmr(rel, vectors, 12, mmr_lambda=0.6, delta=0.05)
        per_query = mmr(rel, vectors.expand(6, -1, -1).contiguous(), 12, mmr_lambda=0.6, delta=0.05)
        assert torch.equal(shared[0], per_query[0])
        assert torch.equal(shared[1], per_query[1])

    @pytest.mark.parametrize("shared", [False, True])
    def test_batch_size_invariant(self, device, shared):
        rel, vectors, points = random_case(5, 11, 60, 16, shared=shared, pad_fraction=0.1)
        rel, vectors, points = rel.to(device), vectors.to(device), points.to(device)
        kwargs = {"mmr_lambda": 0.6, "delta": 0.05, "min_dispersion": 0.3, "points": points}
        whole = mmr(rel, vectors, 8, **kwargs)
        for size in (1, 3, 5):
            parts = [
                mmr(rel[s], vectors if shared else vectors[s], 8, **{**kwargs, "points": points[s]})
                for s in row_chunks(11, 1, size / 2**20)
            ]
            assert torch.equal(torch.cat([p[0] for p in parts]), whole[0])
            assert torch.equal(torch.cat([p[1] for p in parts]), whole[1])

    def test_float64_relevance_keeps_dtype(self):
        rel = torch.rand(2, 5, dtype=torch.float64)
        picks, scores = mmr(rel, torch.randn(5, 3), 3, mmr_lambda=0.5)
        assert scores.dtype == torch.float64
        assert scores.tolist() == [[rel[r, i].item() for i in picks[r].tolist()] for r in range(2)]


class TestMMRValidation:
    def test_relevance_must_be_2d(self):
        with pytest.raises(DimensionMismatchError, match=r"mmr relevance: expected shape \[B, M\]"):
            mmr(torch.rand(5), torch.rand(5, 3), 2, mmr_lambda=0.5)

    @pytest.mark.parametrize("shape", [(4, 3), (2, 4, 3), (3, 5, 3), (5,), (1, 2, 5, 3)])
    def test_vectors_shape_must_match(self, shape):
        with pytest.raises(DimensionMismatchError, match="mmr vectors"):
            mmr(torch.rand(2, 5), torch.rand(*shape), 2, mmr_lambda=0.5)

    def test_points_shape_must_match(self):
        with pytest.raises(DimensionMismatchError, match="mmr points"):
            mmr(
                torch.rand(2, 5),
                torch.rand(5, 3),
                2,
                mmr_lambda=0.5,
                min_dispersion=0.1,
                points=torch.rand(4, 3),
            )

    @pytest.mark.parametrize("bad", [float("nan"), float("inf")])
    def test_nan_or_positive_inf_relevance(self, bad):
        rel = torch.rand(2, 5)
        rel[1, 3] = bad
        with pytest.raises(InvalidInputError, match="invalid relevance: expected finite values or -inf padding"):
            mmr(rel, torch.rand(5, 3), 2, mmr_lambda=0.5)

    @pytest.mark.parametrize("bad", [float("nan"), float("inf"), 3e38])
    def test_non_finite_vectors(self, bad):
        vectors = torch.rand(2, 5, 3)
        vectors[0, 2, 1] = bad  # 3e38 is finite but its squared norm overflows float32
        with pytest.raises(InvalidInputError, match="invalid vectors: expected finite values"):
            mmr(torch.rand(2, 5), vectors, 2, mmr_lambda=0.5)

    def test_non_finite_points(self):
        points = torch.rand(5, 3)
        points[4, 0] = float("nan")
        with pytest.raises(InvalidInputError, match="invalid points: expected finite values"):
            mmr(
                torch.rand(2, 5),
                torch.rand(5, 3),
                2,
                mmr_lambda=0.5,
                min_dispersion=0.1,
                points=points,
            )

    def test_min_dispersion_needs_points(self):
        with pytest.raises(InvalidInputError, match="invalid points: expected .* when min_dispersion > 0"):
            mmr(torch.rand(2, 5), torch.rand(5, 3), 2, mmr_lambda=0.5, min_dispersion=0.1)

    @pytest.mark.parametrize(
        "kwargs,match",
        [
            ({"k": -1}, "invalid k"),
            ({"k": True}, "invalid k"),
            ({"k": 2.0}, "invalid k"),
            ({"mmr_lambda": 1.5}, "invalid mmr_lambda"),
            ({"mmr_lambda": float("nan")}, "invalid mmr_lambda"),
            ({"delta": -0.1}, "invalid delta"),
            ({"min_dispersion": -1.0}, "invalid min_dispersion"),
        ],
    )
    def test_bad_numbers(self, kwargs, match):
        args = {"k": 2, "mmr_lambda": 0.5, **kwargs}
        k = args.pop("k")
        with pytest.raises(InvalidInputError, match=match):
            mmr(torch.rand(2, 5), torch.rand(5, 3), k, **args)

    def test_integer_relevance(self):
        with pytest.raises(InvalidInputError, match="invalid relevance: expected a floating-point tensor"):
            mmr(torch.ones(2, 5, dtype=torch.int64), torch.rand(5, 3), 2, mmr_lambda=0.5)

    def test_vectors_on_another_device(self):
        with pytest.raises(InvalidInputError, match="invalid vectors: expected a tensor on cpu"):
            mmr(torch.rand(2, 5), torch.empty(5, 3, device="meta"), 2, mmr_lambda=0.5)

    def test_value_error_compatible(self):
        with pytest.raises(ValueError, match="mmr_lambda"):
            mmr(torch.rand(2, 5), torch.rand(5, 3), 2, mmr_lambda=2.0)


# ------------------------------------------------------------ hybrid scores
class TestHybridScores:
    def test_formula(self, device):
        w = HybridWeights(alpha=0.5, beta=0.25, gamma=0.125, delta=0.0)
        sim = torch.tensor([[0.2, 0.6, 1.0, NEG_INF]], device=device)
        util = torch.tensor([[0.5, -1.0, 2.0, 0.5]], device=device)
        match = torch.tensor([[1.0, 0.0, 0.5, 1.0]], device=device)
        got = hybrid_scores(sim, util, match, w)
        sim_norm = [0.0, 0.5, 1.0]  # min-max over the three valid candidates
        want = [
            0.5 * s + 0.25 * min(max(u, 0), 1) + 0.125 * c
            for s, u, c in zip(sim_norm, [0.5, -1, 2], [1, 0, 0.5], strict=True)
        ]
        torch.testing.assert_close(got[0, :3].cpu(), torch.tensor(want))
        assert got[0, 3].item() == NEG_INF

    @_EXAMPLES
    @given(
        seed=st.integers(0, 2**31 - 1),
        b=st.integers(1, 4),
        m=st.integers(1, 10),
        pad=st.sampled_from([0.0, 0.3, 1.0]),
    )
    def test_against_loop(self, seed, b, m, pad):
        g = torch.Generator().manual_seed(seed)
        sim = (torch.rand(b, m, generator=g) * 2 - 1).masked_fill(torch.rand(b, m, generator=g) < pad, NEG_INF)
        util = torch.rand(b, m, generator=g) * 3 - 1
        match = torch.randint(0, 3, (b, m), generator=g).float() / 2
        w = HybridWeights()
        got = hybrid_scores(sim, util, match, w)
        for r in range(b):
            valid = [s for s in sim[r].tolist() if s != NEG_INF]
            lo, hi = (min(valid), max(valid)) if valid else (0.0, 0.0)
            for c in range(m):
                s = sim[r, c].item()
                if s == NEG_INF:
                    assert got[r, c].item() == NEG_INF
                    continue
                norm = 1.0 if hi - lo <= 1e-6 else (s - lo) / (hi - lo)
                u = min(max(util[r, c].item(), 0.0), 1.0)
                want = w.alpha * norm + w.beta * u + w.gamma * match[r, c].item()
                assert got[r, c].item() == pytest.approx(want, abs=1e-5)

    def test_flat_range_gives_one(self):
        w = HybridWeights(alpha=1.0, beta=0.0, gamma=0.0, delta=0.0)
        sim = torch.tensor([[0.3, 0.3 + 5e-7, 0.3], [0.7, NEG_INF, NEG_INF]])
        got = hybrid_scores(sim, torch.zeros(2, 3), torch.zeros(2, 3), w)
        assert got[0].tolist() == [1.0, 1.0, 1.0]
        assert got[1].tolist() == [1.0, NEG_INF, NEG_INF]

    def test_all_padded_row(self):
        sim = torch.full((1, 3), NEG_INF)
        got = hybrid_scores(sim, torch.zeros(1, 3), torch.zeros(1, 3), HybridWeights())
        assert got.tolist() == [[NEG_INF] * 3]

    def test_class_match_values(self, device):
        cand = torch.tensor([[3, 4, -1], [3, 4, -1]], device=device)
        query = torch.tensor([3, -1], device=device)
        assert class_match(cand, query).tolist() == [[1.0, 0.0, 0.5], [0.5, 0.5, 0.5]]


class TestHybridWeights:
    def test_defaults_follow_domain(self):
        w = HybridWeights()
        assert (w.alpha, w.beta, w.gamma, w.delta, w.mmr_lambda) == (0.65, 0.20, 0.10, 0.05, 0.7)

    @pytest.mark.parametrize("field", ["alpha", "beta", "gamma", "delta", "mmr_lambda"])
    @pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), True, "0.5", None])
    def test_out_of_range(self, field, value):
        with pytest.raises(InvalidConfigurationError, match=f"invalid configuration {field}="):
            HybridWeights(**{field: value})

    def test_bounds_accepted(self):
        HybridWeights(alpha=0, beta=1, gamma=0.0, delta=1.0, mmr_lambda=0)

    def test_normalize(self):
        w = HybridWeights(alpha=0.5, beta=0.5, gamma=0.25, delta=0.25, mmr_lambda=0.3).normalize()
        assert (w.alpha, w.beta, w.gamma, w.delta) == (1 / 3, 1 / 3, 1 / 6, 1 / 6)
        assert w.mmr_lambda == 0.3
        d = HybridWeights().normalize()
        assert d.alpha + d.beta + d.gamma + d.delta == pytest.approx(1.0)

    def test_normalize_all_zero_stays(self):
        w = HybridWeights(alpha=0, beta=0, gamma=0, delta=0)
        assert w.normalize() == w


# --------------------------------------------------------- diversity stats
class TestDiversityStats:
    @_EXAMPLES
    @given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 4), k=st.integers(0, 7))
    def test_against_loop(self, seed, b, k):
        g = torch.Generator().manual_seed(seed)
        points = torch.rand(b, k, 3, generator=g)
        valid = torch.rand(b, k, generator=g) < 0.7
        got = diversity_stats(points, valid)
        for r in range(b):
            kept = [points[r, i].double().tolist() for i in range(k) if valid[r, i]]
            dists = [math.dist(kept[i], kept[j]) for i in range(len(kept)) for j in range(i + 1, len(kept))]
            for name, want in (
                ("mean", sum(dists) / len(dists) if dists else None),
                ("min", min(dists, default=None)),
                ("max", max(dists, default=None)),
            ):
                value = got[name][r].item()
                if want is None:
                    assert math.isnan(value)
                else:
                    assert value == pytest.approx(want, abs=1e-5)


# ------------------------------------------------------ chunks and cosine
class TestChunks:
    @pytest.mark.parametrize(
        "rows,row_bytes,budget_mb,sizes",
        [
            (10, 2**20, 3.0, [3, 3, 3, 1]),
            (10, 2**20, 100.0, [10]),
            (4, 2**30, 1.0, [1, 1, 1, 1]),  # a row over budget still gets a chunk
            (0, 2**20, 1.0, [0]),  # one empty chunk keeps a single code path
            (5, 0, 1.0, [5]),
        ],
    )
    def test_row_chunks(self, rows, row_bytes, budget_mb, sizes):
        chunks = row_chunks(rows, row_bytes, budget_mb)
        assert [s.stop - s.start for s in chunks] == sizes
        assert chunks[0].start == 0 and chunks[-1].stop == rows
        assert all(a.stop == b.start for a, b in zip(chunks, chunks[1:], strict=False))

    def test_mmr_row_bytes(self):
        assert mmr_row_bytes(1000, 64) == 1000 * 4 * (64 + 8)
        assert mmr_row_bytes(1000, 64, shared=True) == 1000 * 4 * 8
        assert mmr_row_bytes(10, 3, itemsize=8) == 10 * 8 * 11

    def test_rowwise_cosine(self, device):
        g = torch.Generator().manual_seed(0)
        queries, keys = torch.randn(9, 5, generator=g), torch.randn(30, 5, generator=g)
        keys[4] = 0.0
        got = rowwise_cosine(queries.to(device), keys.to(device)).cpu()
        torch.testing.assert_close(got, F.normalize(queries, dim=1) @ F.normalize(keys, dim=1).T)
        assert (got[:, 4] == 0).all()
        pieces = torch.cat(
            [rowwise_cosine(queries[s].to(device), keys.to(device)).cpu() for s in row_chunks(9, 1, 2e-6)]
        )
        if device.type == "cpu":
            assert torch.equal(pieces, got)  # bit-identical whatever the chunking
        else:  # cuBLAS picks kernels by batch count: equal up to rounding
            torch.testing.assert_close(pieces, got)


# ------------------------------------------------------------ pool chunking
SHAPE = (3, 4, 2)


def filled_pool(rerank_chunk_mb, n=120):
    config = PoolConfig(
        dream_shape=SHAPE,
        capacity=160,
        device="cpu",
        coherence_threshold=0.0,
        query_cache_size=0,
        rerank_chunk_mb=rerank_chunk_mb,
    )
    pool = DreamPool(config)
    g = torch.Generator().manual_seed(0)
    base = torch.rand(n, 1, 1, 1, 3, generator=g)
    dreams = (base + 0.05 * (torch.rand(n, *SHAPE, 3, generator=g) - 0.5)).clamp(0, 1)
    ids = pool.add(dreams, coherence=torch.ones(n), class_label=torch.randint(-1, 10, (n,), generator=g))
    pool.feedback(ids[::4], torch.rand(len(ids[::4]), generator=g))
    return pool


class TestPoolChunking:
    @pytest.fixture(scope="class")
    @classmethod
    def queries(cls):
        return torch.rand(23, *SHAPE, 3, generator=torch.Generator().manual_seed(3))

    @pytest.fixture(scope="class")
    @classmethod
    def whole(cls):
        return filled_pool(64.0)

    @pytest.mark.parametrize("chunk_mb", [1e-6, 0.03, 0.08])  # 1 row per chunk, then sizes not dividing 23
    @pytest.mark.parametrize(
        "mode,kwargs",
        [
            ("hybrid", {"fetch_k": 30, "class_hint": 2}),
            ("hybrid", {"fetch_k": 30, "mmr_lambda": 0.2, "min_dispersion": 0.15}),
            ("soft", {"fetch_k": 17}),
            ("diverse", {}),
            ("diverse", {"mmr_lambda": 0.3, "min_dispersion": 0.2}),
        ],
    )
    def test_chunked_equals_whole(self, monkeypatch, whole, queries, chunk_mb, mode, kwargs):
        pool = filled_pool(chunk_mb)
        want = whole.retrieve(queries, k=6, mode=mode, **kwargs)
        calls = []

        def recording_mmr(relevance, vectors, k, **kw):
            calls.append((relevance.shape, vectors.shape))
            return mmr_unchecked(relevance, vectors, k, **kw)

        monkeypatch.setattr(stages_module, "mmr_unchecked", recording_mmr)
        got = pool.retrieve(queries, k=6, mode=mode, **kwargs)
        assert torch.equal(got.ids, want.ids)
        assert torch.equal(got.scores, want.scores)
        assert sum(rel[0] for rel, _ in calls) == 23
        assert len(calls) > 1
        for (rows, m), vec in calls:
            row_bytes = mmr_row_bytes(m, vec[-1], shared=len(vec) == 2)
            assert rows == 1 or rows * row_bytes <= chunk_mb * 2**20

    @pytest.mark.parametrize("mode", ["hybrid", "diverse"])
    def test_single_query_and_no_query(self, whole, queries, mode):
        batch = whole.retrieve(queries, k=4, mode=mode, fetch_k=12)
        one = whole.retrieve(queries[5:6], k=4, mode=mode, fetch_k=12)
        assert torch.equal(one.ids[0], batch.ids[5])
        # the re-ranking is batch invariant, but the query encoder and the k-NN search
        # upstream of it may round a lone query differently in the last bit
        torch.testing.assert_close(one.scores[0], batch.scores[5])
        empty = filled_pool(1e-6).retrieve(queries[:0], k=4, mode=mode)
        assert empty.ids.shape == empty.scores.shape == (0, 4)
