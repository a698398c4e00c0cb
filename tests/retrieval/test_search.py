"""Exact torch k-NN (``ExactSearch``, ``pairwise_scores``, ``stable_topk``) vs plain-loop oracles."""

from __future__ import annotations

import math

import pytest
import torch

from dreampool_gpu.bank import TensorBank
from dreampool_gpu.config import Metric, PoolConfig
from dreampool_gpu.search import (
    ExactSearch,
    make_index,
    oldest_first_ties,
    pairwise_scores,
    stable_topk,
)
from dreampool_gpu.search.exact import _query_block, block_bytes

D = 16


def make_bank(n: int, metric: Metric, device: torch.device, *, capacity: int | None = None, seed: int = 0):
    """A bank holding ``n`` random embeddings (unit vectors for cosine) in slots 0..n-1."""
    bank = TensorBank(capacity or max(n, 1), (1, 1, 1), D, device=device)
    x = torch.randn(n, D, generator=torch.Generator().manual_seed(seed))
    if metric is Metric.COSINE:
        x = torch.nn.functional.normalize(x, dim=1)
    if n:
        bank.write(torch.arange(n, device=device), {"embeddings": x.to(device)})
    return bank


def oracle(bank: TensorBank, queries: torch.Tensor, k: int, metric: Metric, mask=None):
    """Plain loop: every eligible slot's float64 score, sorted best first (score, then slot)."""
    emb = bank.columns["embeddings"].double().cpu()
    ids = bank.columns["ids"].cpu()
    out = []
    for b, q in enumerate(queries.double().cpu()):
        row = []
        for slot in range(bank.capacity):
            if ids[slot] < 0:
                continue
            if mask is not None:
                allowed = mask[b, slot] if mask.dim() == 2 else mask[slot]
                if not bool(allowed):
                    continue
            v = emb[slot]
            score = float(q @ v) if metric is Metric.COSINE else -math.sqrt(float(((q - v) ** 2).sum()))
            row.append((score, slot))
        row.sort(key=lambda t: (-t[0], t[1]))
        out.append(row[:k])
    return out


def assert_matches_oracle(scores, slots, want, k, *, atol=1e-4):
    """Same top-k as the oracle, ties aside: scores match, every slot's score is its own."""
    assert scores.shape == slots.shape == (len(want), k)
    assert scores.dtype == torch.float32 and slots.dtype == torch.int64
    for got_s, got_i, row in zip(scores.cpu(), slots.cpu(), want, strict=False):
        m = len(row)
        assert torch.all(got_i[m:] == -1) and torch.all(torch.isneginf(got_s[m:]))
        assert torch.all(got_i[:m] >= 0)
        assert len(set(got_i[:m].tolist())) == m
        by_slot = dict((slot, score) for score, slot in row)
        want_scores = torch.tensor([score for score, _ in row], dtype=torch.float64)
        torch.testing.assert_close(got_s[:m].double(), want_scores, atol=atol, rtol=0)
        for score, slot in zip(got_s[:m].tolist(), got_i[:m].tolist(), strict=False):
            if slot in by_slot:
                assert score == pytest.approx(by_slot[slot], abs=atol)
            else:  # outside the oracle's top-k only through a tie with its last score
                assert score == pytest.approx(want_scores[-1].item(), abs=atol)


class TestPairwiseScores:
    @pytest.mark.parametrize("metric", list(Metric))
    def test_matches_loop(self, metric, device):
        g = torch.Generator().manual_seed(1)
        q, rows = torch.randn(3, D, generator=g), torch.randn(7, D, generator=g)
        got = pairwise_scores(q.to(device), rows.to(device), metric).cpu()
        for i in range(3):
            for j in range(7):
                want = q[i] @ rows[j] if metric is Metric.COSINE else -torch.dist(q[i], rows[j])
                assert got[i, j].item() == pytest.approx(want.item(), abs=1e-4)


class TestStableTopk:
    def test_ties_go_to_the_lower_index(self):
        scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
        values, index = stable_topk(scores, 3)
        assert index.tolist() == [[1, 2, 4], [0, 1, 2]]
        assert values.tolist() == [[3.0, 3.0, 3.0], [0.0, 0.0, 0.0]]

    def test_matches_sorted_loop(self):
        scores = torch.randint(0, 4, (6, 20), generator=torch.Generator().manual_seed(2)).float()
        values, index = stable_topk(scores, 7)
        for row, got_v, got_i in zip(scores.tolist(), values.tolist(), index.tolist(), strict=False):
            want = sorted(range(20), key=lambda j: (-row[j], j))[:7]
            assert got_i == want and got_v == [row[j] for j in want]

    def test_excluded_columns_only_pad(self):
        """-inf columns fill rows short of k finite values; the finite ones are exact and first."""
        inf = float("-inf")
        scores = torch.tensor([[inf, 2.0, inf, 2.0, inf], [inf] * 5])
        values, index = stable_topk(scores, 3)
        assert index[0, :2].tolist() == [1, 3] and values[0].tolist() == [2.0, 2.0, inf]
        assert index[0, 2].item() in (0, 2, 4)
        assert bool(torch.isneginf(values[1]).all()) and sorted(index[1].tolist()) == sorted(set(index[1].tolist()))

    def test_k_beyond_columns_and_zero(self):
        values, index = stable_topk(torch.tensor([[2.0, 1.0]]), 5)
        assert index.tolist() == [[0, 1]] and values.tolist() == [[2.0, 1.0]]
        values, index = stable_topk(torch.tensor([[2.0, 1.0]]), 0)
        assert values.shape == index.shape == (1, 0)


class TestExactSearch:
    @pytest.mark.parametrize("metric", list(Metric))
    @pytest.mark.parametrize("chunk_rows", [5, 17, 1000])  # 5 and 17 do not divide the 203 rows
    @pytest.mark.parametrize("k", [1, 10, 250])  # 250 > the pool
    def test_matches_oracle_with_free_slots(self, metric, chunk_rows, k, device):
        n, b = 203, 6
        bank = make_bank(n, metric, device, capacity=230)
        bank.remove(torch.tensor([0, 7, 100, 202], device=device))  # holes below the extent
        engine = ExactSearch(bank, metric, chunk_bytes=4 * b * chunk_rows)
        queries = make_bank(b, metric, torch.device("cpu"), seed=9).columns["embeddings"].to(device)
        scores, slots = engine.search(queries, k)
        assert scores.device == slots.device == queries.device
        assert_matches_oracle(scores, slots, oracle(bank, queries, k, metric), k)
        assert engine.last_engine == "exact-torch"

    @pytest.mark.parametrize("metric", list(Metric))
    def test_shared_mask(self, metric, device):
        bank = make_bank(120, metric, device)
        mask = torch.arange(120, device=device) % 3 == 0
        queries = bank.columns["embeddings"][:4].clone()
        scores, slots = ExactSearch(bank, metric, chunk_bytes=4 * 4 * 11).search(queries, 9, mask=mask)
        assert_matches_oracle(scores, slots, oracle(bank, queries, 9, metric, mask.cpu()), 9)
        assert bool((slots % 3 == 0).all())

    @pytest.mark.parametrize("metric", list(Metric))
    def test_per_query_mask_with_too_few_matches(self, metric, device):
        bank = make_bank(50, metric, device)
        mask = torch.zeros(3, 50, dtype=torch.bool, device=device)
        mask[0, :2] = True  # 2 < k: padded
        mask[1, 10:40] = True
        queries = bank.columns["embeddings"][5:8].clone()
        scores, slots = ExactSearch(bank, metric, chunk_bytes=4 * 3 * 7).search(queries, 5, mask=mask)
        assert_matches_oracle(scores, slots, oracle(bank, queries, 5, metric, mask.cpu()), 5)
        assert slots[2].tolist() == [-1] * 5

    @pytest.mark.parametrize("metric", list(Metric))
    def test_query_blocks_with_per_query_mask(self, metric, device):
        """Many queries and a small bound: several query blocks, each with its rows of the mask."""
        bank = make_bank(300, metric, device)
        b, k, chunk_bytes = 40, 6, 4096
        assert 1 < _query_block(chunk_bytes, 300, k) < b
        mask = torch.rand(b, 300, generator=torch.Generator().manual_seed(3)).to(device) < 0.3
        queries = make_bank(b, metric, torch.device("cpu"), seed=4).columns["embeddings"].to(device)
        scores, slots = ExactSearch(bank, metric, chunk_bytes=chunk_bytes).search(queries, k, mask=mask)
        assert_matches_oracle(scores, slots, oracle(bank, queries, k, metric, mask.cpu()), k)

    @pytest.mark.parametrize(
        "chunk_bytes, extent, k",
        [
            (64 << 20, 10_000_000, 10),
            (64 << 20, 1_000_000, 10),
            (1 << 20, 20_000, 40),
            (64 << 20, 100_000, 400),
            (1 << 20, 100, 1),
            (4096, 300, 6),
        ],
    )
    def test_query_block_bounds_temporaries(self, chunk_bytes, extent, k):
        """Within the bound; score chunks as long as the pool or 16K rows; twice the block would break one."""
        b = _query_block(chunk_bytes, extent, k)
        assert block_bytes(b, extent, k, chunk_bytes) <= chunk_bytes
        rows = min(extent, 16_384)
        assert 4 * b * rows <= chunk_bytes
        assert block_bytes(2 * b, extent, k, chunk_bytes) > chunk_bytes or 4 * 2 * b * rows > chunk_bytes

    def test_empty_bank_pads(self, device):
        bank = make_bank(0, Metric.COSINE, device, capacity=8)
        scores, slots = ExactSearch(bank, Metric.COSINE, chunk_bytes=1024).search(torch.ones(2, D, device=device), 3)
        assert slots.tolist() == [[-1] * 3] * 2
        assert bool(torch.isneginf(scores).all())

    def test_no_queries_and_k_zero(self, device):
        bank = make_bank(10, Metric.COSINE, device)
        engine = ExactSearch(bank, Metric.COSINE, chunk_bytes=1024)
        scores, slots = engine.search(torch.empty(0, D, device=device), 4)
        assert scores.shape == slots.shape == (0, 4)
        scores, slots = engine.search(torch.ones(2, D, device=device), 0)
        assert scores.shape == slots.shape == (2, 0)

    def test_every_slot_evicted(self, device):
        bank = make_bank(6, Metric.EUCLIDEAN, device)
        bank.remove(torch.arange(6, device=device))
        _, slots = ExactSearch(bank, Metric.EUCLIDEAN, chunk_bytes=1024).search(torch.ones(1, D, device=device), 2)
        assert slots.tolist() == [[-1, -1]]


class TestOldestFirstTies:
    def test_equal_scores_ordered_by_id_padding_last(self):
        scores = torch.tensor([[3.0, 2.0, 2.0, 2.0, float("-inf")], [5.0, 4.0, 3.0, 2.0, 1.0]])
        slots = torch.tensor([[7, 1, 2, 3, -1], [4, 3, 2, 1, 0]])
        slot_ids = torch.tensor([1, 12, 10, 11, 0, -1, -1, 70])  # id per slot
        got_scores, got_slots = oldest_first_ties(scores, slots, slot_ids)
        assert got_slots.tolist() == [[7, 2, 3, 1, -1], [4, 3, 2, 1, 0]]
        assert got_scores.tolist() == scores.tolist()


class TestMakeIndex:
    def test_torch_engine_is_exact_search(self):
        bank = make_bank(4, Metric.COSINE, torch.device("cpu"))
        engine = make_index(bank, PoolConfig(engine="torch", embedding_dim=D))
        assert isinstance(engine, ExactSearch) and engine.kind == "exact-torch"
        assert engine.describe() == {"kind": "exact-torch", "last_engine": None, "index_bytes": 0}
