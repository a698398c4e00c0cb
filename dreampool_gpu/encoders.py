"""Encoders: from an entry's or a query's features to a D-dimensional embedding.

:class:`Encoder` is the plug-in point: the pool calls ``encode_entries`` on every
add (and when it re-embeds its bank) and ``encode_queries`` on every retrieve.
Two implementations ship: the :class:`FeatureEncoder` here (fixed features,
no training) and :class:`~dreampool_gpu.learned.LearnedEncoder` (a small CNN
trained by :meth:`DreamPool.fit_encoder`). docs/spec.md section "Encoders" gives
the formulas.

The feature encoder's vector is four blocks, each with its own role:

- content: chroma (3) and spectral summary (6: entropy, log1p of 4 band
  energies, log1p of the mean of PSD mean / dominant indices), standardised
  with statistics fitted on the bank, each block scaled to unit expected
  variance, then normalised to unit length;
- class (``num_classes + 1``): an entry labelled c carries ``w`` in slot c, an
  unlabelled entry ``w`` in the last ("unknown") slot; a query with a class hint
  carries ``w`` in slot c and a query without one zeros. Every entry then has the
  same norm, so an unhinted query ranks entries by content alone (labels never
  hurt), and a hinted one adds ``w**2`` to the dot product of matching entries;
- utility: ``[u, 0.5] * 0.1``, the query's utility prior (entries 0);
- a fixed, seeded projection with orthonormal rows ``[F, D]`` (D >= F keeps every
  inner product exactly).
"""

from __future__ import annotations

import math
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from dreampool_gpu.config import Metric
from dreampool_gpu.dreams import NUM_CLASSES

_CLASS_WEIGHT = 0.5  # a hinted query's cosine to a matching entry gains w**2 / (1 + w**2) = 0.2
_UTILITY_WEIGHT = 0.1
_NO_BIAS_WEIGHT = 0.5
_STD_FLOOR = 1e-4  # a feature constant over the bank standardises to ~0, not to inf
_CONTENT_SPECTRAL = 6


@runtime_checkable
class Encoder(Protocol):
    """What a pool needs of an encoder; every tensor on the pool's device.

    ``version`` changes whenever the mapping changes (new weights, refitted
    statistics): a pool whose stored embeddings were made at another version
    refuses to answer from them (:class:`~dreampool_gpu.errors.IndexStaleError`)
    until :meth:`DreamPool.reembed` runs.
    """

    dim: int

    @property
    def version(self) -> int:
        """A number that changes whenever the encoder's mapping changes."""
        ...

    def encode_entries(
        self, dreams: torch.Tensor, *, chroma: torch.Tensor, spectral: torch.Tensor, class_labels: torch.Tensor
    ) -> torch.Tensor:
        """``[N, dim]`` embeddings of entries: dreams ``[N, R, C, L, 3]``, chroma ``[N, 3]``,
        spectral ``[N, 8]``, class_labels ``[N]`` int64 (-1 = unlabelled)."""
        ...

    def encode_queries(
        self,
        *,
        dreams: torch.Tensor | None,
        chroma: torch.Tensor,
        spectral: torch.Tensor | None,
        class_labels: torch.Tensor,
        utility: torch.Tensor,
    ) -> torch.Tensor:
        """``[B, dim]`` embeddings of queries: dreams ``[B, R, C, L, 3]`` or None (chroma-only
        queries), chroma ``[B, 3]``, spectral ``[B, 8]`` or None, class hints ``[B]`` (-1 none),
        utility prior ``[B]``."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Tensors that, loaded into an encoder of the same construction, reproduce it."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> Any:
        """Load :meth:`state_dict`'s output."""
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
    """Deterministic feature encoder: standardised content + class + utility -> projection.

    Args:
        dim: embedding width D.

    Keyword Args:
        include_spectral, include_class, include_utility: feature blocks on/off.
        num_classes: class labels 0..num_classes-1 (the class block has one more slot).
        seed: seed of the projection; the same seed gives the same encoder on every device.
        device: where the projection and statistics live.
    """

    def __init__(
        self,
        dim: int = 64,
        *,
        include_spectral: bool = True,
        include_class: bool = True,
        include_utility: bool = True,
        num_classes: int = NUM_CLASSES,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        self.dim = dim
        self.include_spectral = include_spectral
        self.include_class = include_class
        self.include_utility = include_utility
        self.num_classes = num_classes
        self.seed = seed
        self.content_dim = 3 + _CONTENT_SPECTRAL * include_spectral
        self.feature_dim = self.content_dim + (num_classes + 1) * include_class + 2 * include_utility
        self.projection = _projection(self.feature_dim, dim, seed).to(device)
        self.mean = torch.zeros(self.content_dim, device=device)
        self.std = torch.ones(self.content_dim, device=device)
        self.fitted_on = 0  # entries added to the pool when the statistics were fitted
        self.auto_refit = True  # the pool refits on its own schedule (off for shards of a sharded pool)
        self._version = 0

    @property
    def version(self) -> int:
        """Bumped by :meth:`fit_statistics` and :meth:`load_state_dict`."""
        return self._version

    def to(self, device: torch.device | str) -> FeatureEncoder:
        """Move projection and statistics to ``device`` (in place); returns self."""
        self.projection = self.projection.to(device)
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    # ------------------------------------------------------------ features
    def content(self, chroma: torch.Tensor, spectral: torch.Tensor | None) -> torch.Tensor:
        """Raw content features ``[N, content_dim]``: chroma, then the spectral summary.

        ``spectral`` None (a query without a dream) gives zeros in the spectral part.
        """
        parts = [chroma.float()]
        if self.include_spectral:
            if spectral is None:
                parts.append(torch.zeros(chroma.shape[0], _CONTENT_SPECTRAL, device=chroma.device))
            else:
                s = spectral.float()
                magnitudes = torch.cat([s[:, 1:5], s[:, 5:8].mean(1, keepdim=True)], dim=1)
                parts.append(torch.cat([s[:, :1], torch.log1p(magnitudes.clamp(min=0))], dim=1))
        return torch.cat(parts, dim=1)

    def fit_statistics(self, chroma: torch.Tensor, spectral: torch.Tensor, *, fitted_on: int) -> None:
        """Fit the content standardisation on entries' chroma ``[N, 3]`` and spectral ``[N, 8]``.

        ``fitted_on`` records the pool's count of added entries at this fit
        (the pool refits when that count doubles). Bumps :attr:`version`.
        """
        c = self.content(chroma, spectral).double()
        if c.shape[0] > 0:
            self.set_statistics(c.mean(0), c.var(0, correction=0), fitted_on=fitted_on)
        else:
            self.fitted_on = fitted_on
            self._version += 1

    def set_statistics(self, mean: torch.Tensor, var: torch.Tensor, *, fitted_on: int) -> None:
        """Use ``mean`` and ``var`` ``[content_dim]`` (e.g. reduced over a pool's shards); bumps :attr:`version`."""
        self.mean = mean.to(self.projection.device, torch.float32)
        self.std = torch.sqrt(var.clamp(min=0) + _STD_FLOOR**2).to(self.projection.device, torch.float32)
        self.fitted_on = fitted_on
        self._version += 1

    def needs_refit(self, added: int) -> bool:
        """Whether the statistics are due: never fitted, or ``added`` doubled since the last fit.

        Always False when :attr:`auto_refit` is off (a sharded pool refits collectively).
        """
        return self.auto_refit and added > 0 and added >= 2 * self.fitted_on

    def _content_block(self, chroma: torch.Tensor, spectral: torch.Tensor | None) -> torch.Tensor:
        z = (self.content(chroma, spectral) - self.mean) / self.std
        if self.include_spectral and spectral is None:  # no dream, no spectral evidence: the bank's mean
            z = torch.cat([z[:, :3], torch.zeros_like(z[:, 3:])], dim=1)
        if self.include_spectral:  # each block contributes unit expected variance
            z = torch.cat([z[:, :3] / math.sqrt(3.0), z[:, 3:] / math.sqrt(_CONTENT_SPECTRAL)], dim=1)
        return F.normalize(z, dim=1, eps=1e-12)

    def _class_block(self, labels: torch.Tensor, *, entries: bool) -> torch.Tensor:
        labels = labels.long()
        slot = torch.where(labels >= 0, labels, torch.full_like(labels, self.num_classes))
        # scatter, not F.one_hot: on CPU one_hot reads the labels' range on the host
        block = torch.zeros(labels.shape[0], self.num_classes + 1, device=labels.device)
        block.scatter_(1, slot[:, None], _CLASS_WEIGHT)
        if not entries:  # a query without a hint says nothing about classes
            block = block * (labels >= 0)[:, None]
        return block

    def features(
        self,
        chroma: torch.Tensor,
        *,
        spectral: torch.Tensor | None,
        class_labels: torch.Tensor,
        utility: torch.Tensor | None = None,
        entries: bool,
    ) -> torch.Tensor:
        """``[N, feature_dim]`` float32 feature vectors before the projection."""
        parts = [self._content_block(chroma, spectral)]
        if self.include_class:
            parts.append(self._class_block(class_labels, entries=entries))
        if self.include_utility:
            n = chroma.shape[0]
            u = torch.zeros(n, device=chroma.device) if utility is None else utility.float().nan_to_num(0.0)
            parts.append(torch.stack([u, torch.full_like(u, _NO_BIAS_WEIGHT)], dim=1) * _UTILITY_WEIGHT)
        return torch.cat(parts, dim=1)

    # ------------------------------------------------------------- encode
    def encode_entries(
        self, dreams: torch.Tensor, *, chroma: torch.Tensor, spectral: torch.Tensor, class_labels: torch.Tensor
    ) -> torch.Tensor:
        """``[N, dim]`` float32 entry embeddings (``dreams`` unused: features are stored)."""
        f = self.features(chroma, spectral=spectral, class_labels=class_labels, entries=True)
        return f @ self.projection

    def encode_queries(
        self,
        *,
        dreams: torch.Tensor | None,
        chroma: torch.Tensor,
        spectral: torch.Tensor | None,
        class_labels: torch.Tensor,
        utility: torch.Tensor,
    ) -> torch.Tensor:
        """``[B, dim]`` float32 query embeddings (``dreams`` unused: spectral carries them)."""
        f = self.features(chroma, spectral=spectral, class_labels=class_labels, utility=utility, entries=False)
        return f @ self.projection

    # -------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Statistics and projection (CPU tensors)."""
        return {
            "projection": self.projection.cpu(),
            "mean": self.mean.cpu(),
            "std": self.std.cpu(),
            "fitted_on": torch.tensor(self.fitted_on, dtype=torch.int64),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load :meth:`state_dict`'s output (shapes checked by the caller); bumps :attr:`version`."""
        device = self.projection.device
        self.projection = state["projection"].to(device, torch.float32)
        self.mean = state["mean"].to(device, torch.float32)
        self.std = state["std"].to(device, torch.float32)
        self.fitted_on = int(state["fitted_on"])
        self._version += 1


def bank_form(z: torch.Tensor, metric: Metric) -> torch.Tensor:
    """Bank form of encoder output ``[N, D]``: unit vectors for cosine, raw for euclidean.

    Under cosine each row is first divided by its largest magnitude, so rows whose
    squared norm would overflow (1e20) or underflow (1e-45) float32 keep their direction.
    """
    if metric is not Metric.COSINE:
        return z
    return unit_rows(z, z.abs().amax(dim=1, keepdim=True))


def unit_rows(z: torch.Tensor, peak: torch.Tensor) -> torch.Tensor:
    """``z`` ``[N, D]`` divided by its rows' largest magnitudes ``peak`` ``[N, 1]``, then L2-normalised.

    Zero rows stay zero (as in ``F.normalize``, whose arithmetic this repeats in fewer kernels).
    """
    scaled = z / torch.where(peak > 0, peak, 1.0)
    return scaled / torch.linalg.vector_norm(scaled, dim=1, keepdim=True).clamp_min(1e-12)
