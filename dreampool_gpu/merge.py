"""Merge stage: combine per-shard candidate lists into one list, best first, ties oldest first.

Each shard answers a query with its own best candidates (scores and global ids,
``-inf`` / ``-1`` padding). The merged list is what one pool holding the union
would rank: higher score first; among equal scores the smaller global id, which
is the older entry (ids grow with insertion, see :mod:`dreampool_gpu.distributed`).
"""

from __future__ import annotations

import torch

from dreampool_gpu.errors import DimensionMismatchError

_ABSENT_KEY = torch.iinfo(torch.int64).max


def merge_candidates(
    scores: torch.Tensor, ids: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The best ``k`` of every row's candidates from all shards.

    Args:
        scores: ``[B, S, m]`` float, one list of ``m`` per shard (``-inf`` padding).
        ids: ``[B, S, m]`` int64 global ids on the same device (``-1`` padding).
        k: length of the merged lists; more than ``S * m`` pads.

    Returns:
        ``(scores, ids, positions)``, each ``[B, k]``: merged scores (``-inf`` padding),
        ids (``-1`` padding) and each pick's flat index into ``[S * m]`` (``-1`` padding),
        so callers can gather whatever else travelled with the candidates.

    Raises:
        DimensionMismatchError: ``scores`` and ``ids`` are not both ``[B, S, m]``.
    """
    if scores.dim() != 3 or ids.shape != scores.shape:
        raise DimensionMismatchError(
            "scores and ids of one shape [B, S, m]", [list(scores.shape), list(ids.shape)], "merge_candidates"
        )
    b, width = scores.shape[0], scores.shape[1] * scores.shape[2]
    flat_scores = scores.reshape(b, width)
    flat_ids = ids.reshape(b, width)
    present = (flat_ids >= 0) & (flat_scores > float("-inf"))
    # stable sort by id, then a stable sort by score: equal scores keep the smaller id first
    by_age = torch.where(present, flat_ids, torch.full_like(flat_ids, _ABSENT_KEY)).argsort(dim=1, stable=True)
    aged = flat_scores.gather(1, by_age).masked_fill(~present.gather(1, by_age), float("-inf"))
    order = by_age.gather(1, aged.argsort(dim=1, descending=True, stable=True))
    take = min(k, order.shape[1])
    positions = order[:, :take]
    found = present.gather(1, positions)
    out_scores = flat_scores.gather(1, positions).masked_fill(~found, float("-inf"))
    out_ids = flat_ids.gather(1, positions).masked_fill(~found, -1)
    positions = positions.masked_fill(~found, -1)
    if take < k:
        pad = k - take
        out_scores = torch.nn.functional.pad(out_scores, (0, pad), value=float("-inf"))
        out_ids = torch.nn.functional.pad(out_ids, (0, pad), value=-1)
        positions = torch.nn.functional.pad(positions, (0, pad), value=-1)
    return out_scores, out_ids, positions
