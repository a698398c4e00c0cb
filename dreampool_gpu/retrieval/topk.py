"""The exact, stable top-k: equal scores go to the lower column, i.e. the older entry.

One implementation for every place that needs exact ties (docs/spec.md §Retrieval):
the chroma modes' candidates, the CPU tie re-selection of engine results, and the
engines' padding. Columns are laid out in age order (:meth:`TensorBank.slots_by_age`),
so "lower column" means "older entry".
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dreampool_gpu import checks
from dreampool_gpu.rerank import row_chunks

TOPK_BYTES_PER_SCORE = 8  # stable_topk's temporaries per score: the float and the tie masks


def stable_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row of ``scores`` ``[B, M]``, ties broken by lower column index.

    ``torch.topk`` is not stable: when a tie straddles the k-th place it may keep
    any of the tied columns. One ``topk`` and one equality pass find the rows where
    that happens (more columns equal the k-th value than were kept); only those
    rows are re-selected exactly (all values above the k-th value, then the
    lowest-index equals). In a sync-free call (:func:`dreampool_gpu.checks.sync_free`)
    every row is re-selected and the result kept where a tie straddles, with no host
    read. The set is then ordered by value, then index. ``-inf``
    marks excluded columns: a row with fewer than k finite values is filled with
    some ``-inf`` columns, in no set order (callers treat them as padding).

    Returns:
        ``(values, indices)``, each ``[B, min(k, M)]``.
    """
    b, m = scores.shape
    k = min(k, m)
    if k == 0:
        return scores.new_empty(b, 0), torch.empty(b, 0, dtype=torch.int64, device=scores.device)
    values, chosen = scores.topk(k, dim=1)
    kth = values[:, -1:]
    straddles = ((scores == kth).sum(1) > (values == kth).sum(1)) & (kth[:, 0] > float("-inf"))
    if checks.sync_free():  # every row re-selected, kept where a tie straddles: no host read
        chosen = torch.where(straddles[:, None], _lowest_index_topk(scores, kth, k), chosen)
    elif bool(straddles.any()):
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


def pad_results(scores: torch.Tensor, slots: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad ``[B, m]`` results (m <= k) to ``[B, k]`` with ``-inf`` / -1; -1 where not finite."""
    b, m = scores.shape
    found = torch.isfinite(scores) & (slots >= 0)
    out_scores = scores.new_full((b, k), float("-inf"))
    out_slots = torch.full((b, k), -1, dtype=torch.int64, device=slots.device)
    out_scores[:, :m] = torch.where(found, scores, out_scores[:, :m])
    out_slots[:, :m] = torch.where(found, slots, out_slots[:, :m])
    return out_scores, out_slots


def stable_topk_by_age(
    by_age: torch.Tensor, count: int, k: int, scores: Callable[[slice], torch.Tensor], chunk_mb: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable top-k of ``scores(rows)`` (``[b, n]``, columns in ``by_age`` order), padded to ``[count, k]``.

    Args:
        by_age: ``[n]`` int64 live slots, oldest first. count: number of query rows.
        scores: the ``[b, n]`` scores of a slice of query rows (``-inf`` excludes a column).
        chunk_mb: query rows go in chunks whose scores and tie-break keys stay under this.

    Returns:
        ``(scores, slots)``, each ``[count, k]``, best first, ties to the older entry,
        ``-inf`` / ``-1`` padding.
    """
    chunks = row_chunks(count, TOPK_BYTES_PER_SCORE * by_age.numel(), chunk_mb)
    parts = [stable_topk(scores(rows), k) for rows in chunks]
    values = torch.cat([p[0] for p in parts])
    slots = by_age[torch.cat([p[1] for p in parts])]
    return pad_results(values, slots, k)


def empty_results(b: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``[b, 0]`` float32 scores and int64 slots."""
    return torch.empty(b, 0, device=device), torch.empty(b, 0, dtype=torch.int64, device=device)


def oldest_first_ties(
    scores: torch.Tensor, slots: torch.Tensor, slot_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reorder best-first rows so that equal scores come oldest (lowest id) first.

    Args:
        scores: ``[B, k]`` best first, -inf for padding. slots: ``[B, k]`` int64 (-1 = padding).
        slot_ids: ``[capacity]`` int64, the bank's id per slot (ids increase with insertion).

    Returns:
        ``(scores, slots)`` reordered, on the input's device. On CPU rows are
        checked for ties first and returned as they are without any; on CUDA (and in
        sync-free calls) it always sorts, to stay free of host synchronisation.
    """
    if scores.shape[1] < 2:
        return scores, slots
    cpu = scores.device.type == "cpu" and not checks.sync_free()
    if cpu and not bool((scores[:, 1:] == scores[:, :-1]).any()):
        return scores, slots  # (padding's -inf ties take the sort: harmless, -inf stays last)
    order = slot_ids[slots.clamp(min=0)].sort(dim=1, stable=True).indices
    scores, slots = scores.gather(1, order), slots.gather(1, order)
    order = scores.sort(dim=1, descending=True, stable=True).indices
    return scores.gather(1, order), slots.gather(1, order)
