"""Labelled synthetic dream sets for quality benchmarks, tests and the demo.

Each set is a family of classes that a retrieval method must tell apart, made
to be hard in a different way:

- ``colours``: the ten class colours of :data:`~dreampool_gpu.dreams.CLASS_RGB`
  with per-dream colour jitter and per-cell noise (mean colour separates them);
- ``colour_structure`` / ``colour_structure_hard``: 3 close colour families x 3
  spatial structures (smooth gradient, stripes, checkerboard) = 9 classes, random
  phase, colour jitter and cell noise (the hard variant has 2.5x the jitter and
  noise; the mean colour alone cannot separate structures);
- ``frequency_orientation``: sinusoidal gratings, 2 spatial frequencies x 4
  orientations = 8 classes, random phase and a random colour per dream (only
  the spatial layout tells the classes apart; colour is a nuisance).

Everything is drawn from one seeded ``torch.Generator`` on the CPU: the same
``(name, n, shape, seed)`` gives the same tensors on every machine.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dreampool_gpu._validation import check_count
from dreampool_gpu.dreams import CLASS_RGB
from dreampool_gpu.errors import InvalidInputError

_FAMILIES = ((0.25, 0.45, 0.75), (0.30, 0.55, 0.65), (0.20, 0.55, 0.80))
"""Three close blue-teal families: their mean colours differ by ~0.1 per channel."""


@dataclass(frozen=True)
class LabelledDreams:
    """A labelled set: ``dreams`` ``[N, R, C, L, 3]`` float32 in [0, 1], ``labels`` ``[N]`` int64."""

    name: str
    dreams: torch.Tensor
    labels: torch.Tensor
    num_classes: int


def _grid(shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[R, C]`` row and column coordinates in [0, 1)."""
    rows, cols, _ = shape
    r = torch.arange(rows, dtype=torch.float32) / rows
    c = torch.arange(cols, dtype=torch.float32) / cols
    return r[:, None].expand(rows, cols), c[None, :].expand(rows, cols)


def _finish(
    base: torch.Tensor, pattern: torch.Tensor, noise: float, shape: tuple[int, int, int], g: torch.Generator
) -> torch.Tensor:
    """Colour ``base`` ``[N, 3]`` modulated by ``pattern`` ``[N, R, C]`` in [0, 1], plus cell noise."""
    n = base.shape[0]
    layers = shape[2]
    brightness = 0.55 + 0.45 * pattern  # [N, R, C]
    field = base[:, None, None, None, :] * brightness[:, :, :, None, None]
    field = field.expand(n, shape[0], shape[1], layers, 3)
    cells = (torch.rand((n, *shape, 3), generator=g) * 2.0 - 1.0) * noise
    return (field + cells).clamp(0.0, 1.0).contiguous()


def _colours(n: int, shape: tuple[int, int, int], g: torch.Generator) -> LabelledDreams:
    labels = torch.randint(len(CLASS_RGB), (n,), generator=g)
    base = torch.tensor(CLASS_RGB)[labels] * 0.8 + 0.1
    base = (base + torch.randn(n, 3, generator=g) * 0.05).clamp(0.0, 1.0)
    flat = torch.full((n, shape[0], shape[1]), 0.5)  # brightness 0.775: the field's mean is `base`
    dreams = _finish(base / 0.775, flat, 0.15, shape, g)
    return LabelledDreams("colours", dreams, labels, len(CLASS_RGB))


def _colour_structure(n: int, shape: tuple[int, int, int], g: torch.Generator, scale: float) -> LabelledDreams:
    labels = torch.randint(9, (n,), generator=g)
    family, structure = labels // 3, labels % 3
    base = torch.tensor(_FAMILIES)[family] + torch.randn(n, 3, generator=g) * 0.02 * scale
    r, c = _grid(shape)
    phase = torch.rand(n, 1, 1, generator=g)
    flip = (torch.rand(n, 1, 1, generator=g) < 0.5).float()
    ramp = flip * r + (1 - flip) * c  # gradient along rows or columns
    gradient = (ramp + 0.25 * phase) % 1.0
    stripes = 0.5 + 0.5 * torch.sin(2 * math.pi * (4 * c + phase))
    checker = ((torch.floor(4 * r + 4 * phase) + torch.floor(4 * c)) % 2).float()
    patterns = torch.stack([gradient, stripes.expand_as(gradient), checker.expand_as(gradient)], dim=1)
    pattern = patterns[torch.arange(n), structure]
    name = "colour_structure" if scale == 1.0 else "colour_structure_hard"
    return LabelledDreams(name, _finish(base.clamp(0, 1), pattern, 0.06 * scale, shape, g), labels, 9)


def _frequency_orientation(n: int, shape: tuple[int, int, int], g: torch.Generator) -> LabelledDreams:
    labels = torch.randint(8, (n,), generator=g)
    frequency = torch.tensor([1.5, 4.0])[labels // 4]
    angle = (labels % 4).float() * (math.pi / 4)
    r, c = _grid(shape)
    phase = torch.rand(n, generator=g)
    along = torch.cos(angle)[:, None, None] * c + torch.sin(angle)[:, None, None] * r
    pattern = 0.5 + 0.5 * torch.sin(2 * math.pi * (frequency[:, None, None] * along + phase[:, None, None]))
    base = 0.25 + 0.6 * torch.rand(n, 3, generator=g)  # colour is a nuisance here
    return LabelledDreams("frequency_orientation", _finish(base, pattern, 0.15, shape, g), labels, 8)


DATASETS: dict[str, Callable[[int, tuple[int, int, int], torch.Generator], LabelledDreams]] = {
    "colours": _colours,
    "colour_structure": lambda n, s, g: _colour_structure(n, s, g, 1.0),
    "colour_structure_hard": lambda n, s, g: _colour_structure(n, s, g, 2.5),
    "frequency_orientation": _frequency_orientation,
}
"""Name -> generator ``(n, shape, generator) -> LabelledDreams``."""


def make_dataset(name: str, n: int, *, shape: tuple[int, int, int] = (16, 16, 4), seed: int = 0) -> LabelledDreams:
    """Draw ``n`` labelled dreams of set ``name`` (one of :data:`DATASETS`), on the CPU.

    Raises:
        InvalidInputError: unknown ``name``, bad ``n`` or ``shape``.
    """
    if name not in DATASETS:
        raise InvalidInputError("name", f"one of {', '.join(DATASETS)}", repr(name))
    n = check_count(n, "n")
    dims = tuple(shape)
    if len(dims) != 3 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in dims):
        raise InvalidInputError("shape", "three positive ints (R, C, L)", shape)
    generator = torch.Generator().manual_seed(seed)
    return DATASETS[name](n, (dims[0], dims[1], dims[2]), generator)
