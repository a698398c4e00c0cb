"""Exact k-NN by torch matmul + topk, chunked over the bank, and a stable top-k."""

from __future__ import annotations

import torch

from dreampool_gpu.bank import TensorBank
from dreampool_gpu.config import Metric
from dreampool_gpu.search.base import SearchIndex


def pairwise_scores(queries: torch.Tensor, rows: torch.Tensor, metric: Metric) -> torch.Tensor:
    """``[B, n]`` similarity of ``queries`` ``[B, D]`` to ``rows`` ``[n, D]``.

    Cosine assumes unit vectors (inner product); euclidean returns minus the distance.
    """
    dots = queries @ rows.T
    if metric is Metric.COSINE:
        return dots
    sq = (queries * queries).sum(1, keepdim=True) + (rows * rows).sum(1) - 2.0 * dots
    return -sq.clamp_(min=0.0).sqrt_()


def refine_euclidean(
    queries: torch.Tensor, embeddings: torch.Tensor, slots: torch.Tensor, *, chunk_bytes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact minus-distances of the chosen ``slots`` ``[B, k]`` (-1 = none), best first.

    The matmul expansion ``|q|^2 + |v|^2 - 2 q.v`` that fast scans use cancels
    near zero (a vector's distance to itself comes out around 1e-3); this
    recomputes ``|q - v|`` for the k winners only, ``chunk_bytes`` of rows at a time.
    """
    b, k = slots.shape
    scores = torch.empty(b, k, dtype=torch.float32, device=slots.device)
    step = max(1, chunk_bytes // max(1, 4 * k * embeddings.shape[1]))
    for start in range(0, b, step):
        part = slots[start : start + step]
        rows = embeddings[part.clamp(min=0)]
        distance = torch.linalg.vector_norm(rows - queries[start : start + step, None], dim=2)
        scores[start : start + step] = (-distance).masked_fill_(part < 0, float("-inf"))
    order = scores.sort(dim=1, descending=True, stable=True).indices
    return scores.gather(1, order), slots.gather(1, order)


def stable_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row of ``scores`` ``[B, M]``, ties broken by lower column index.

    ``torch.topk`` is not stable: when a tie straddles the k-th place it may keep
    any of the tied columns. One ``topk`` and one equality pass find the rows where
    that happens (more columns equal the k-th value than were kept); only those
    rows are re-selected exactly (all values above the k-th value, then the
    lowest-index equals). The set is then ordered by value, then index.

    Returns:
        ``(values, indices)``, each ``[B, min(k, M)]``.
    """
    b, m = scores.shape
    k = min(k, m)
    if k == 0:
        return scores.new_empty(b, 0), torch.empty(b, 0, dtype=torch.int64, device=scores.device)
    values, chosen = scores.topk(k, dim=1)
    kth = values[:, -1:]
    straddles = (scores == kth).sum(1) > (values == kth).sum(1)
    if bool(straddles.any()):
        rows = torch.nonzero(straddles).squeeze(1)
        chosen[rows] = _lowest_index_topk(scores[rows], kth[rows], k)
    chosen = chosen.sort(dim=1).values
    values = scores.gather(1, chosen)
    order = values.sort(dim=1, descending=True, stable=True).indices
    return values.gather(1, order), chosen.gather(1, order)


def _lowest_index_topk(scores: torch.Tensor, kth: torch.Tensor, k: int) -> torch.Tensor:
    """``[b, k]`` columns: those above ``kth`` ``[b, 1]``, then the lowest-index equals."""
    m = scores.shape[1]
    rank = (scores > kth).long() * 2 + (scores == kth).long()
    key = rank * (m + 1) + (m - torch.arange(m, device=scores.device))
    return key.topk(k, dim=1).indices


class ExactSearch(SearchIndex):
    """Brute-force scan of the bank's embeddings with torch matmul + topk.

    Reads ``bank.columns["embeddings"]`` in place, in row chunks so that no
    ``[B, rows]`` score block exceeds ``chunk_bytes``. Runs on any device.
    """

    kind = "exact-torch"

    def __init__(self, bank: TensorBank, metric: Metric, *, chunk_bytes: int) -> None:
        self.bank = bank
        self.metric = metric
        self.chunk_bytes = chunk_bytes

    def search(
        self, queries: torch.Tensor, k: int, *, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """See :meth:`SearchIndex.search`."""
        self.last_engine = self.kind
        queries = queries.to(self.bank.columns["embeddings"].dtype)  # e.g. float64 queries
        b = queries.shape[0]
        extent = self.bank.extent
        k_eff = min(k, extent)
        best_scores = queries.new_full((b, k), float("-inf"))
        best_slots = torch.full((b, k), -1, dtype=torch.int64, device=queries.device)
        if k_eff == 0 or b == 0:
            return best_scores, best_slots
        keep: torch.Tensor | None = None  # None: every row up to the extent qualifies
        if mask is not None or self.bank.size < extent:
            alive = self.bank.alive()[:extent]
            keep = alive if mask is None else alive & mask[..., :extent]
        embeddings = self.bank.columns["embeddings"]
        rows_per_chunk = max(k_eff, self.chunk_bytes // (4 * max(b, 1)))
        starts = range(0, extent, rows_per_chunk)
        # each chunk's top-k lands in one candidate buffer; a single top-k over it at the end
        cand_scores = queries.new_empty(b, len(starts) * k_eff)
        cand_slots = torch.empty(b, len(starts) * k_eff, dtype=torch.int64, device=queries.device)
        filled = 0
        for start in starts:
            stop = min(start + rows_per_chunk, extent)
            scores = pairwise_scores(queries, embeddings[start:stop], self.metric)
            if keep is not None:
                scores.masked_fill_(~keep[..., start:stop].expand_as(scores), float("-inf"))
            taken = min(k_eff, stop - start)
            torch.topk(scores, taken, dim=1, out=(cand_scores[:, filled : filled + taken],
                                                  cand_slots[:, filled : filled + taken]))
            if start:
                cand_slots[:, filled : filled + taken] += start
            filled += taken
        top_scores, top_slots = cand_scores[:, :filled], cand_slots[:, :filled]
        if filled > k_eff:
            top_scores, pick = top_scores.topk(k_eff, dim=1)
            top_slots = top_slots.gather(1, pick)
        found = torch.isfinite(top_scores)
        top_slots = torch.where(found, top_slots, torch.full_like(top_slots, -1))
        if self.metric is Metric.EUCLIDEAN:
            top_scores, top_slots = refine_euclidean(queries, embeddings, top_slots, chunk_bytes=self.chunk_bytes)
        best_scores[:, :k_eff] = top_scores
        best_slots[:, :k_eff] = top_slots
        return best_scores, best_slots
