"""Reference solver: coherence, energy and violation of a batch of dreams.

The reference solver of docs/spec.md §Solver scores, batched over dreams, with one
change from the original: the mean hue is the circular mean, so hues either side of 0°/360° agree.
Neighbour pairs are (r, c)-(r+1, c) and (r, c)-(r, c+1) within each layer.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from dreampool_gpu._validation import check_finite
from dreampool_gpu.dreams import as_dream_batch, hue_radians

LAMBDA_TV = 1.0
LAMBDA_SAT = 0.1
TARGET_SATURATION = 0.5
SATURATION_LIMIT = 0.95
DISCONTINUITY_THRESHOLD = 0.3
_EPS = 1e-6


class SolverScores(NamedTuple):
    """Scores of a batch; each field is ``[N]`` float32 on the dreams' device."""

    coherence: torch.Tensor
    energy: torch.Tensor
    violation: torch.Tensor


def score_dreams(dreams: Any) -> SolverScores:
    """Score every dream of a batch in one pass.

    Values are not range-checked: cells outside ``[0, 1]`` count as out of gamut.

    Args:
        dreams: ``[N, R, C, L, 3]`` floating tensor (any float dtype), finite.

    Returns:
        :class:`SolverScores` of ``[N]`` float32 tensors on the input's device:
        coherence in ``[0, 1]`` (higher is better), energy ``>= 0`` and violation in
        ``[0, 1]`` (lower is better).

    Raises:
        InvalidInputError: not floating point, or NaN/inf present.
        DimensionMismatchError: not ``[N, R, C, L, 3]``.
    """
    x = as_dream_batch(dreams).to(torch.float32)
    check_finite(x, "dreams")
    cell_dims = (1, 2, 3)
    cells = x.shape[1] * x.shape[2] * x.shape[3]

    # Neighbour distances along rows and along cols, within each layer.
    d_rows = torch.linalg.vector_norm(x[:, 1:] - x[:, :-1], dim=-1)
    d_cols = torch.linalg.vector_norm(x[:, :, 1:] - x[:, :, :-1], dim=-1)
    tv = d_rows.sum(dim=cell_dims) + d_cols.sum(dim=cell_dims)
    jumps = (d_rows > DISCONTINUITY_THRESHOLD).sum(dim=cell_dims) + (d_cols > DISCONTINUITY_THRESHOLD).sum(
        dim=cell_dims
    )

    hi = x.amax(dim=-1)
    lo = x.amin(dim=-1)
    sat = torch.where(hi < _EPS, torch.zeros_like(hi), (hi - lo) / hi.clamp_min(_EPS))
    sat_penalty = (sat - TARGET_SATURATION).square().mean(dim=cell_dims)
    energy = LAMBDA_TV * tv + LAMBDA_SAT * sat_penalty

    mean_rgb = x.mean(dim=cell_dims)
    balance = 1.0 - (mean_rgb - 0.5).abs().sum(dim=-1) / 1.5

    # Circular mean hue (grey cells count with hue 0, as in the original).
    hue = hue_radians(x)
    mean_sin = hue.sin().mean(dim=cell_dims)
    mean_cos = hue.cos().mean(dim=cell_dims)
    flat = (mean_sin.abs() < _EPS) & (mean_cos.abs() < _EPS)
    centre = torch.where(flat, torch.zeros_like(mean_sin), torch.atan2(mean_sin, mean_cos))
    diff = torch.remainder(torch.rad2deg(hue - centre[:, None, None, None]), 360.0)
    arc = torch.minimum(diff, 360.0 - diff)
    hue_std = arc.square().mean(dim=cell_dims).sqrt()
    hue_consistency = 1.0 - (hue_std / 180.0).clamp(max=1.0)
    coherence = 0.6 * balance + 0.4 * hue_consistency

    out_of_gamut = ((x < 0.0) | (x > 1.0)).any(dim=-1).sum(dim=cell_dims)
    excess_sat = (sat - SATURATION_LIMIT).clamp_min(0.0).sum(dim=cell_dims)
    raw = out_of_gamut.to(torch.float32) + excess_sat + 0.5 * jumps.to(torch.float32)
    violation = (raw / cells).clamp(max=1.0)
    return SolverScores(coherence=coherence, energy=energy, violation=violation)
