"""Trainable encoders: the pool's own :class:`LearnedEncoder` and :class:`ModuleEncoder` for a user's module.

Both are ``torch.nn.Module`` s satisfying :class:`~dreampool_gpu.encoders.Encoder`;
:meth:`DreamPool.fit_encoder` trains either in place of the pool
(:mod:`dreampool_gpu.fitting`). Their ``version`` is the sum of their
parameters' in-place version counters: an optimizer step (or any in-place
write) changes it, with no host synchronisation, so a pool notices when the
weights behind its stored embeddings moved.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dreampool_gpu.errors import DimensionMismatchError, InvalidConfigurationError


class _Trainable(nn.Module):
    """What both trainable encoders share: ``version`` and the Encoder methods, from two embeddings.

    Subclasses define ``embed_dreams`` (``[N, R, C, L, 3]`` -> ``[N, dim]``) and
    ``embed_chroma`` (``[B, 3]`` -> ``[B, dim]``), both differentiable unit vectors.
    """

    dim: int

    @property
    def version(self) -> int:
        return sum(p._version for p in self.parameters())  # noqa: SLF001 - torch's own write counter

    def embed_dreams(self, dreams: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def embed_chroma(self, chroma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def encode_entries(
        self, dreams: torch.Tensor, *, chroma: torch.Tensor, spectral: torch.Tensor, class_labels: torch.Tensor
    ) -> torch.Tensor:
        """``[N, dim]`` embeddings of the dreams (labels shape the training, not the embedding)."""
        return self.embed_dreams(dreams)

    @torch.no_grad()
    def encode_queries(
        self,
        *,
        dreams: torch.Tensor | None,
        chroma: torch.Tensor,
        spectral: torch.Tensor | None,
        class_labels: torch.Tensor,
        utility: torch.Tensor,
    ) -> torch.Tensor:
        """``[B, dim]``: dream queries through :meth:`embed_dreams`, chroma-only ones through :meth:`embed_chroma`."""
        return self.embed_chroma(chroma) if dreams is None else self.embed_dreams(dreams)


class LearnedEncoder(_Trainable):
    """A small CNN over the dream plus a chroma head, both into one unit-sphere space.

    Dreams ``[N, R, C, L, 3]`` go in as ``3L`` channels of an ``R x C`` image
    (centred at 0.5) through three 3x3 ReLU convolutions (the first two stride 2),
    mean- and max-pooled, concatenated with the dream's mean colour, and a linear
    head to D. A chroma-only query ``[B, 3]`` goes through a two-layer MLP trained
    to land where the dreams of that colour land. Outputs are unit vectors.

    Args:
        dream_shape: ``(R, C, L)``.
        dim: embedding width D.

    Keyword Args:
        width: channels of every convolution.
        seed: initial weights; the same seed gives the same encoder.
    """

    def __init__(self, dream_shape: tuple[int, int, int], dim: int, *, width: int = 32, seed: int = 0) -> None:
        super().__init__()
        self.dim = dim
        channels = 3 * dream_shape[2]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.body = nn.Sequential(
                nn.Conv2d(channels, width, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(width, width, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(width, width, 3, padding=1),
                nn.ReLU(),
            )
            self.head = nn.Linear(2 * width + 3, dim)
            self.chroma_head = nn.Sequential(nn.Linear(3, 64), nn.ReLU(), nn.Linear(64, dim))

    def embed_dreams(self, dreams: torch.Tensor) -> torch.Tensor:
        """``[N, R, C, L, 3]`` -> ``[N, dim]`` unit vectors (differentiable)."""
        n, rows, cols, layers, _ = dreams.shape
        x = dreams.float().permute(0, 3, 4, 1, 2).reshape(n, 3 * layers, rows, cols) - 0.5
        h = self.body(x)
        pooled = torch.cat([h.mean((2, 3)), h.amax((2, 3)), dreams.float().mean((1, 2, 3))], dim=1)
        return F.normalize(self.head(pooled), dim=1)

    def embed_chroma(self, chroma: torch.Tensor) -> torch.Tensor:
        """``[B, 3]`` -> ``[B, dim]`` unit vectors (differentiable)."""
        return F.normalize(self.chroma_head(chroma.float() - 0.5), dim=1)


class ModuleEncoder(_Trainable):
    """Adapter for a user's ``nn.Module`` mapping dreams ``[N, R, C, L, 3]`` to ``[N, D]``.

    Chroma-only queries are encoded as the flat dream of their colour, so they
    land in the same space. Construction checks the output shape on one flat
    dream.

    Raises:
        InvalidConfigurationError: ``module`` is not an ``nn.Module`` or fails on a dream.
        DimensionMismatchError: its output is not ``[N, dim]``.
    """

    def __init__(self, module: nn.Module, dream_shape: tuple[int, int, int], dim: int) -> None:
        if not isinstance(module, nn.Module):
            raise InvalidConfigurationError(
                "encoder", type(module).__name__, "an Encoder or a torch.nn.Module mapping [N, R, C, L, 3] to [N, D]"
            )
        super().__init__()
        self.module = module
        self.dim = dim
        self.dream_shape = dream_shape
        probe = self._flat(torch.full((1, 3), 0.5, device=self._device()))
        try:
            with torch.no_grad():
                out = module(probe)
        except Exception as exc:  # a user's module: any failure is a configuration problem
            raise InvalidConfigurationError(
                "encoder",
                type(module).__name__,
                f"a module accepting [N, {', '.join(map(str, dream_shape))}, 3] dreams (it raised {exc!r})",
            ) from None
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, dim):
            got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise DimensionMismatchError(f"[N, {dim}] (embedding_dim)", got, "encoder output")

    def _device(self) -> torch.device:
        first = next(iter(self.module.parameters()), None)
        return first.device if first is not None else torch.device("cpu")

    def _flat(self, chroma: torch.Tensor) -> torch.Tensor:
        rows, cols, layers = self.dream_shape
        return chroma.float()[:, None, None, None, :].expand(-1, rows, cols, layers, 3)

    def embed_dreams(self, dreams: torch.Tensor) -> torch.Tensor:
        """``[N, R, C, L, 3]`` -> ``[N, dim]`` unit vectors (differentiable)."""
        return F.normalize(self.module(dreams.float()).float(), dim=1)

    def embed_chroma(self, chroma: torch.Tensor) -> torch.Tensor:
        """``[B, 3]`` -> ``[B, dim]``: the flat dream of each colour."""
        return self.embed_dreams(self._flat(chroma))
