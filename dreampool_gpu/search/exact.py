"""Exact k-NN by torch matmul + topk, chunked over the bank."""

from __future__ import annotations

import functools
import math

import torch

from dreampool_gpu.bank import TensorBank
from dreampool_gpu.config import Metric
from dreampool_gpu.search.base import SearchIndex


def pairwise_scores(
    queries: torch.Tensor, rows: torch.Tensor, metric: Metric, rows_t: torch.Tensor | None = None
) -> torch.Tensor:
    """``[B, n]`` similarity of ``queries`` ``[B, D]`` to ``rows`` ``[n, D]`` (``rows_t``: ``rows.T``, if held).

    Cosine assumes unit vectors (inner product); euclidean returns minus the distance.
    """
    dots = torch.mm(queries, rows.T if rows_t is None else rows_t)
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
        self._rows: tuple[torch.Tensor, int, int, torch.Tensor, torch.Tensor] | None = None  # see _scanned

    def _scanned(self, embeddings: torch.Tensor, extent: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``embeddings[:extent]`` and its transpose: views kept while the bank holds the same column
        tensor (same storage) and extent, so a search makes neither again."""
        kept = self._rows
        pointer = embeddings.data_ptr()
        if kept is None or kept[0] is not embeddings or kept[1] != extent or kept[2] != pointer:
            rows = embeddings if extent == embeddings.shape[0] else embeddings[:extent]
            kept = self._rows = (embeddings, extent, pointer, rows, rows.T)
        return kept[3], kept[4]

    def reset(self) -> None:
        """Drop the kept views (the bank was cleared or reloaded)."""
        self._rows = None

    def search(
        self, queries: torch.Tensor, k: int, *, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """See :meth:`SearchIndex.search`.

        Queries go through in blocks sized so that neither a ``[b, rows]`` score
        block nor the per-block candidate buffer (``b x chunks x k`` scores and
        slots) exceeds ``chunk_bytes``.
        """
        self.last_engine = self.kind
        bank = self.bank
        embeddings = bank.columns["embeddings"]
        if queries.dtype != embeddings.dtype:  # e.g. float64 queries
            queries = queries.to(embeddings.dtype)
        b = queries.shape[0]
        extent = bank.extent
        k_eff = min(k, extent)
        keep: torch.Tensor | None = None  # None: every row up to the extent qualifies
        if k_eff and (mask is not None or bank.size < extent):
            alive = bank.alive()[:extent]
            keep = alive if mask is None else alive & mask[..., :extent]
        if 0 < b and k_eff == k > 0 and b <= _query_block(self.chunk_bytes, extent, k):
            return self._search_block(queries, k, keep, embeddings)  # one block filling all k columns: the answer
        block = _query_block(self.chunk_bytes, extent, max(k_eff, 1))
        best_scores = queries.new_full((b, k), float("-inf"))
        best_slots = torch.full((b, k), -1, dtype=torch.int64, device=queries.device)
        if k_eff == 0 or b == 0:
            return best_scores, best_slots
        for start in range(0, b, block):
            rows = slice(start, min(start + block, b))
            part_keep = keep if keep is None or keep.dim() == 1 or keep.shape[0] == 1 else keep[rows]
            scores, slots = self._search_block(queries[rows], k_eff, part_keep, embeddings)
            best_scores[rows, :k_eff] = scores
            best_slots[rows, :k_eff] = slots
        return best_scores, best_slots

    def _search_block(
        self, queries: torch.Tensor, k: int, keep: torch.Tensor | None, embeddings: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[b, k]`` best scores and slots (-1 = none) of one query block over ``embeddings`` (the bank's)."""
        b = queries.shape[0]
        extent = self.bank.extent
        rows_per_chunk = max(k, self.chunk_bytes // (4 * b))
        if rows_per_chunk >= extent:  # one chunk: its top-k is the answer
            rows, rows_t = self._scanned(embeddings, extent)
            scores = pairwise_scores(queries, rows, self.metric, rows_t)
            if keep is not None:
                scores.masked_fill_(~keep.expand_as(scores), float("-inf"))
            top_scores, top_slots = scores.topk(k, dim=1)
        else:
            top_scores, top_slots = self._chunked_topk(queries, k, keep, rows_per_chunk)
        if keep is not None or k > self.bank.size:  # else every score is finite: nothing to mark
            top_slots.masked_fill_(top_scores == float("-inf"), -1)  # scores are finite or masked to -inf
        if self.metric is Metric.EUCLIDEAN:
            top_scores, top_slots = refine_euclidean(queries, embeddings, top_slots, chunk_bytes=self.chunk_bytes)
        return top_scores, top_slots

    def _chunked_topk(
        self, queries: torch.Tensor, k: int, keep: torch.Tensor | None, rows_per_chunk: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k over the bank in chunks of ``rows_per_chunk``: each chunk's top-k lands in
        one candidate buffer, and one top-k over the buffer gives the answer."""
        b, extent = queries.shape[0], self.bank.extent
        embeddings = self.bank.columns["embeddings"]
        starts = range(0, extent, rows_per_chunk)
        cand_scores = queries.new_empty(b, len(starts) * k)
        cand_slots = torch.empty(b, len(starts) * k, dtype=torch.int64, device=queries.device)
        filled = 0
        for start in starts:
            stop = min(start + rows_per_chunk, extent)
            scores = pairwise_scores(queries, embeddings[start:stop], self.metric)
            if keep is not None:
                scores.masked_fill_(~keep[..., start:stop].expand_as(scores), float("-inf"))
            taken = min(k, stop - start)
            torch.topk(
                scores,
                taken,
                dim=1,
                out=(cand_scores[:, filled : filled + taken], cand_slots[:, filled : filled + taken]),
            )
            if start:
                cand_slots[:, filled : filled + taken] += start
            filled += taken
        top_scores, top_slots = cand_scores[:, :filled], cand_slots[:, :filled]
        if filled > k:
            top_scores, pick = top_scores.topk(k, dim=1)
            top_slots = top_slots.gather(1, pick)
        return top_scores, top_slots


def block_bytes(queries: int, extent: int, k: int, chunk_bytes: int) -> int:
    """Peak temporaries of one query block: a ``[b, rows]`` score chunk or the candidate buffer.

    A chunk holds ``max(k, chunk_bytes / 4b)`` rows; the buffer holds every
    chunk's top-k, 4 + 8 bytes (score and slot) each.
    """
    rows = max(k, chunk_bytes // (4 * queries))
    return max(4 * queries * rows, 12 * queries * k * -(-extent // rows))


_MIN_CHUNK_ROWS = 16_384  # CPU topk costs 4.5 ns/score on 547-row chunks, 0.9 on >= 4096 (2 cores)


@functools.lru_cache(maxsize=64)  # a pool asks with the same few (chunk_bytes, extent, k) call after call
def _query_block(chunk_bytes: int, extent: int, k: int) -> int:
    """Queries per block: score chunks of ``min(extent, 16384)`` rows, and :func:`block_bytes` within the bound.

    More queries per block means fewer rows per score chunk, and short rows make
    matmul and topk several times slower per score; so a block is at most
    ``chunk_bytes / (4 min(extent, 16384))`` queries. The candidate buffer then
    bounds it by ``b^2 <= chunk_bytes^2 / (48 k extent)``, and a chunk of k rows
    by ``4 b k <= chunk_bytes``; it steps down while rounding leaves it over.
    """
    by_rows = chunk_bytes // (4 * max(1, min(extent, _MIN_CHUNK_ROWS)))
    by_buffer = math.isqrt(chunk_bytes * chunk_bytes // max(1, 48 * k * extent))
    b = max(1, min(by_rows, by_buffer, chunk_bytes // (4 * k)))
    while b > 1 and block_bytes(b, extent, k, chunk_bytes) > chunk_bytes:
        b = max(1, b * 7 // 8)
    return b
