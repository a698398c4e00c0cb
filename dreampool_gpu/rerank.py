"""Hybrid scoring and greedy MMR for a batch of queries, as torch matrix ops.

MMR is exact (the same picks as a per-query loop) and batched over B queries,
each with its own candidate list. Each step costs one ``[B, M]`` similarity
against the item just picked (a running max-similarity per query), so the work
is ``O(k * B * M * E)`` and no ``[M, M]`` matrix is formed.
Tie rule: among equal objectives the lowest candidate index wins.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dreampool_gpu.errors import InvalidConfigurationError

_FLAT_RANGE = 1e-6


@dataclass(frozen=True)
class HybridWeights:
    """Weights of DOMAIN.md section 5; each in [0, 1].

    Attributes:
        alpha: similarity weight. beta: utility weight. gamma: class-match weight.
        delta: extra near-duplicate penalty weight in MMR.
        mmr_lambda: 1 = pure relevance, 0 = pure diversity.
    """

    alpha: float = 0.65
    beta: float = 0.20
    gamma: float = 0.10
    delta: float = 0.05
    mmr_lambda: float = 0.7

    def __post_init__(self) -> None:
        for name in ("alpha", "beta", "gamma", "delta", "mmr_lambda"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise InvalidConfigurationError(name, value, "a number in [0, 1]")

    def normalize(self) -> HybridWeights:
        """Rescale alpha..delta to sum to 1 (lambda untouched); all-zero weights stay."""
        total = self.alpha + self.beta + self.gamma + self.delta
        if total == 0:
            return self
        return HybridWeights(
            self.alpha / total, self.beta / total, self.gamma / total, self.delta / total, self.mmr_lambda
        )


def class_match(candidate_class: torch.Tensor, query_class: torch.Tensor) -> torch.Tensor:
    """``[B, M]``: 1 same class, 0 different, 0.5 when either side is unknown (-1).

    Args:
        candidate_class: ``[B, M]`` int labels. query_class: ``[B]`` int labels.
    """
    q = query_class[:, None]
    same = (candidate_class == q).float()
    unknown = (candidate_class < 0) | (q < 0)
    return torch.where(unknown, torch.full_like(same, 0.5), same)


def hybrid_scores(
    similarity: torch.Tensor,
    util_mean: torch.Tensor,
    match: torch.Tensor,
    weights: HybridWeights,
) -> torch.Tensor:
    """``alpha*sim_norm + beta*clamp(util_mean, 0, 1) + gamma*class_match``, ``[B, M]``.

    ``sim_norm`` is min-max normalised over each row's valid candidates (1 when
    the range is below 1e-6). Invalid candidates carry ``-inf`` similarity in and
    get ``-inf`` out.
    """
    valid = torch.isfinite(similarity)
    low = similarity.masked_fill(~valid, float("inf")).amin(1, keepdim=True)
    high = similarity.masked_fill(~valid, float("-inf")).amax(1, keepdim=True)
    spread = high - low
    flat = ~(spread > _FLAT_RANGE)
    sim_norm = torch.where(flat, torch.ones_like(similarity), (similarity - low) / spread.clamp(min=_FLAT_RANGE))
    base = weights.alpha * sim_norm + weights.beta * util_mean.clamp(0, 1) + weights.gamma * match
    return base.masked_fill(~valid, float("-inf"))


def mmr(
    relevance: torch.Tensor,
    vectors: torch.Tensor,
    k: int,
    *,
    mmr_lambda: float,
    delta: float = 0.0,
    min_dispersion: float = 0.0,
    points: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy maximal marginal relevance for B queries at once.

    The first pick is the most relevant candidate; each later pick maximises
    ``lambda*rel(c) - (1-lambda)*maxsim(c) - delta*max(0, maxsim(c))`` where
    ``maxsim(c)`` is the largest cosine similarity of ``c`` to the picks so far.

    Args:
        relevance: ``[B, M]`` float; ``-inf`` marks padded or filtered candidates.
        vectors: ``[B, M, E]`` per-query candidate vectors, or ``[M, E]`` shared by all queries.
        k: picks per query.

    Keyword Args:
        mmr_lambda: 1 = pure relevance, 0 = pure diversity.
        delta: weight of the extra near-duplicate penalty.
        min_dispersion: when > 0, a query stops once the mean pairwise euclidean
            distance of its picks (over ``points``) falls below it, keeping that pick.
        points: ``[B, M, P]`` or ``[M, P]`` vectors for the dispersion rule (chroma).

    Returns:
        ``(picks, scores)``, each ``[B, k]``: candidate indices (-1 padding) in pick
        order and the relevance of each pick (``-inf`` padding).
    """
    b, m = relevance.shape
    device = relevance.device
    picks = torch.full((b, k), -1, dtype=torch.int64, device=device)
    scores = torch.full((b, k), float("-inf"), dtype=relevance.dtype, device=device)
    steps = min(k, m)
    if steps == 0 or b == 0:
        return picks, scores
    shared = vectors.dim() == 2
    unit = F.normalize(vectors.float(), dim=-1)
    rows = torch.arange(b, device=device)
    available = torch.isfinite(relevance)
    active = torch.ones(b, dtype=torch.bool, device=device)
    maxsim = torch.zeros_like(relevance)
    dispersion_points = points if min_dispersion > 0 else None
    if dispersion_points is not None:
        chosen_points = torch.zeros(b, steps, points.shape[-1], device=device)
        distance_sum = torch.zeros(b, device=device)
    for t in range(steps):
        if t == 0:
            objective = relevance
        else:
            objective = mmr_lambda * relevance - (1 - mmr_lambda) * maxsim - delta * maxsim.clamp(min=0)
        objective = objective.masked_fill(~available, float("-inf"))
        best = objective.argmax(dim=1)
        ok = available[rows, best] & active
        picks[:, t] = torch.where(ok, best, torch.full_like(best, -1))
        scores[:, t] = torch.where(ok, relevance[rows, best], torch.full_like(scores[:, t], float("-inf")))
        available[rows, best] = False
        available &= active[:, None]
        picked = unit[best] if shared else unit[rows, best]
        sim = picked @ unit.T if shared else torch.bmm(unit, picked[:, :, None]).squeeze(2)
        maxsim = sim if t == 0 else torch.maximum(maxsim, sim)
        if dispersion_points is not None:
            p = dispersion_points[best] if dispersion_points.dim() == 2 else dispersion_points[rows, best]
            if t > 0:
                distance_sum += (chosen_points[:, :t] - p[:, None]).norm(dim=2).sum(1)
                mean_distance = distance_sum / (t * (t + 1) / 2)
                active &= ~(ok & (mean_distance < min_dispersion))
            chosen_points[:, t] = p
    return picks, scores


def diversity_stats(points: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean, min and max pairwise euclidean distance within each result set.

    Args:
        points: ``[B, k, P]`` (chroma of the picks). valid: ``[B, k]`` bool.

    Returns:
        ``{"mean", "min", "max"}`` each ``[B]``; NaN where a set has fewer than 2 items.
    """
    distances = torch.cdist(points.float(), points.float())
    k = points.shape[1]
    upper = torch.triu(torch.ones(k, k, dtype=torch.bool, device=points.device), diagonal=1)
    pair = valid[:, :, None] & valid[:, None, :] & upper
    count = pair.sum((1, 2))
    nan = torch.full(count.shape, float("nan"), device=points.device)
    has = count > 0
    total = (distances * pair).sum((1, 2))
    mean = torch.where(has, total / count.clamp(min=1), nan)
    low = torch.where(has, distances.masked_fill(~pair, float("inf")).amin((1, 2)), nan)
    high = torch.where(has, distances.masked_fill(~pair, float("-inf")).amax((1, 2)), nan)
    return {"mean": mean, "min": low, "max": high}
