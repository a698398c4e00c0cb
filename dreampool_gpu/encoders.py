"""Encoders: from an entry's or a query's features to a D-dimensional embedding.

The feature vector follows DOMAIN.md section 3 (chroma 3, spectral 6, class
one-hot 10, utility + bias weight 2 = 21 values when all parts are on). Two
changes from the original, both to stop a few raw magnitudes dominating:

- spectral magnitudes (band energies, mean PSD, mean dominant index) enter as
  ``log1p(x)``; the original fed raw |FFT|^2 sums of 10^2..10^4;
- a fixed, seeded orthogonal projection ``[F, D]`` replaces cyclic tiling,
  followed by the same layer norm (subtract mean, divide by sqrt(var + 1e-8)).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from dreampool_gpu.dreams import NUM_CLASSES

_EPS = 1e-8
_UNKNOWN_CLASS = 0.1
_NO_BIAS_WEIGHT = 0.5


@runtime_checkable
class Encoder(Protocol):
    """Maps features of N entries or queries to ``[N, dim]`` float32 embeddings."""

    dim: int

    def encode(
        self,
        chroma: torch.Tensor,
        *,
        spectral: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        utility: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Embed a batch; see :meth:`FeatureEncoder.encode`."""
        ...


def _projection(n_features: int, dim: int, seed: int) -> torch.Tensor:
    """``[n_features, dim]`` matrix with orthonormal rows (or columns when dim < F)."""
    generator = torch.Generator().manual_seed(seed)
    if dim >= n_features:
        gaussian = torch.randn(dim, n_features, generator=generator, dtype=torch.float64)
        q, _ = torch.linalg.qr(gaussian)
        return q.T.contiguous().float()
    gaussian = torch.randn(n_features, dim, generator=generator, dtype=torch.float64)
    q, _ = torch.linalg.qr(gaussian)
    return q.float()


class FeatureEncoder:
    """Deterministic feature encoder: features -> seeded projection -> layer norm.

    Args:
        dim: embedding width D.

    Keyword Args:
        include_spectral, include_class, include_utility: feature parts on/off.
        seed: seed of the projection; the same seed gives the same encoder on every device.
        device: where the projection lives and embeddings are produced.
    """

    def __init__(
        self,
        dim: int = 64,
        *,
        include_spectral: bool = True,
        include_class: bool = True,
        include_utility: bool = True,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        self.dim = dim
        self.include_spectral = include_spectral
        self.include_class = include_class
        self.include_utility = include_utility
        self.seed = seed
        self.feature_dim = 3 + 6 * include_spectral + NUM_CLASSES * include_class + 2 * include_utility
        self.projection = _projection(self.feature_dim, dim, seed).to(device)

    def features(
        self,
        chroma: torch.Tensor,
        *,
        spectral: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        utility: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[N, feature_dim]`` float32 feature vectors.

        Args:
            chroma: ``[N, 3]`` mean RGB.

        Keyword Args:
            spectral: ``[N, 8]`` from :func:`~dreampool_gpu.spectral.spectral_features`;
                None gives zeros (queries without a dream).
            class_labels: ``[N]`` int, -1 = unknown (0.1 in every slot); None = all unknown.
            utility: ``[N]`` float; None or NaN gives 0.
        """
        n = chroma.shape[0]
        device = chroma.device
        parts = [chroma.float()]
        if self.include_spectral:
            if spectral is None:
                parts.append(torch.zeros(n, 6, device=device))
            else:
                s = spectral.float()
                magnitudes = torch.cat([s[:, 1:5], s[:, 5:8].mean(1, keepdim=True)], dim=1)
                parts.append(torch.cat([s[:, :1], torch.log1p(magnitudes.clamp(min=0))], dim=1))
        if self.include_class:
            one_hot = torch.full((n, NUM_CLASSES), _UNKNOWN_CLASS, device=device)
            if class_labels is not None:
                labels = class_labels.long()
                known = labels >= 0
                hot = torch.nn.functional.one_hot(labels.clamp(min=0), NUM_CLASSES).float()
                one_hot = torch.where(known[:, None], hot, one_hot)
            parts.append(one_hot)
        if self.include_utility:
            u = torch.zeros(n, device=device) if utility is None else utility.float().nan_to_num(0.0)
            parts.append(torch.stack([u, torch.full_like(u, _NO_BIAS_WEIGHT)], dim=1))
        return torch.cat(parts, dim=1)

    def encode(
        self,
        chroma: torch.Tensor,
        *,
        spectral: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        utility: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[N, dim]`` float32 embeddings on ``chroma``'s device (mean 0, variance ~1 per row)."""
        f = self.features(chroma, spectral=spectral, class_labels=class_labels, utility=utility)
        z = f @ self.projection.to(f.device)
        if z.shape[0] == 0:
            return z
        mean = z.mean(1, keepdim=True)
        var = z.var(1, correction=0, keepdim=True)
        return (z - mean) / torch.sqrt(var + _EPS)
