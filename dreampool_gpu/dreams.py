"""Dream tensors: validation, colour classes, chroma, hue and a synthetic dataset.

A batch of dreams is a floating tensor ``[N, R, C, L, 3]`` (rows, cols, layers,
RGB) with values in ``[0, 1]``. Every function here is batched over ``N`` and
returns tensors on the input's device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from dreampool_gpu._validation import (
    as_tensor,
    check_count,
    check_finite,
    check_float,
    check_int,
    check_range,
    check_shape,
)
from dreampool_gpu.errors import DimensionMismatchError, InvalidInputError

NUM_CLASSES = 10
CLASS_NAMES = (
    "red",
    "green",
    "blue",
    "yellow",
    "cyan",
    "magenta",
    "orange",
    "purple",
    "white",
    "black",
)
CLASS_RGB: tuple[tuple[float, float, float], ...] = (
    (1.0, 0.0, 0.0),
    (0.0, 1.0, 0.0),
    (0.0, 0.0, 1.0),
    (1.0, 1.0, 0.0),
    (0.0, 1.0, 1.0),
    (1.0, 0.0, 1.0),
    (1.0, 0.5, 0.0),
    (0.5, 0.0, 0.5),
    (1.0, 1.0, 1.0),
    (0.0, 0.0, 0.0),
)
"""Class colours ``[NUM_CLASSES, 3]``; ``torch.tensor(CLASS_RGB)`` gives the tensor."""

NUM_HUE_CATEGORIES = 12
_TWO_PI = 2.0 * math.pi
_GREY_EPS = 1e-6


SINGLE_DREAM_HINT = "one dream needs a batch dimension: pass dream[None] or dream.unsqueeze(0)"


def as_dream_batch(dreams: Any, name: str = "dreams") -> torch.Tensor:
    """Return ``dreams`` as a floating ``[N, R, C, L, 3]`` tensor, values unchecked.

    Shape and dtype checks shared by the solver and spectral features, which
    accept raw (out-of-gamut) values. ``N`` may be 0; ``R``, ``C``, ``L`` may not.

    Raises:
        InvalidInputError: not floating point.
        DimensionMismatchError: not 5-D, trailing dim not 3, or an empty spatial dim.
    """
    t = as_tensor(dreams, name)
    check_float(t, name)
    if t.dim() == 4 and t.shape[-1] == 3:
        raise DimensionMismatchError(f"[N, R, C, L, 3] ({SINGLE_DREAM_HINT})", list(t.shape), name)
    check_shape(t, (None, None, None, None, 3), name)
    if min(t.shape[1:4]) < 1:
        raise DimensionMismatchError("[N, R>=1, C>=1, L>=1, 3]", list(t.shape), name)
    return t


def validate_dreams(
    dreams: Any,
    *,
    dream_shape: tuple[int, int, int] | None = None,
    name: str = "dreams",
) -> torch.Tensor:
    """Check a batch of dreams at the public boundary.

    Args:
        dreams: ``[N, R, C, L, 3]`` floating tensor or numpy array; ``N`` may be 0.

    Keyword Args:
        dream_shape: required ``(R, C, L)``, or ``None`` for any.
        name: argument name used in error messages.

    Returns:
        The input as a tensor, same dtype and device (numpy memory is shared); never mutated.

    Raises:
        InvalidInputError: not floating point, not finite, or a value outside ``[0, 1]``.
        DimensionMismatchError: wrong number of dims, trailing dim not 3, or spatial
            dims other than ``dream_shape``.
    """
    t = as_dream_batch(dreams, name)
    if dream_shape is not None:
        check_shape(t, (None, *dream_shape, 3), name)
    check_finite(t, name)
    check_range(t, name, 0.0, 1.0)
    return t


def chroma_signature(dreams: Any) -> torch.Tensor:
    """Mean RGB over all cells of each dream.

    Args:
        dreams: ``[N, R, C, L, 3]`` floating tensor (any float dtype).

    Returns:
        ``[N, 3]`` float32 on the input's device, accumulated in float32.
    """
    t = as_dream_batch(dreams)
    return t.mean(dim=(1, 2, 3), dtype=torch.float32)


def hue_radians(rgb: Any) -> torch.Tensor:
    """HSV hue of RGB triples, as the original solver computes it.

    Args:
        rgb: ``[..., 3]`` floating tensor.

    Returns:
        ``[...]`` float32 on the input's device, in ``[0, 2π)``; 0 where
        ``max - min < 1e-6`` (greys, white, black).
    """
    t = as_tensor(rgb, "rgb")
    check_float(t, "rgb")
    if t.dim() < 1 or t.shape[-1] != 3:
        raise DimensionMismatchError("[..., 3]", list(t.shape), "rgb")
    t = t.to(torch.float32)
    r, g, b = t.unbind(-1)
    hi = t.amax(dim=-1)
    delta = hi - t.amin(dim=-1)
    grey = delta < _GREY_EPS
    safe = torch.where(grey, torch.ones_like(delta), delta)
    # Sector position in units of 60 degrees; the red branch wins ties, as in the original.
    red_max = (hi - r) < _GREY_EPS
    green_max = ~red_max & ((hi - g) < _GREY_EPS)
    sector = torch.where(
        red_max,
        (g - b) / safe,
        torch.where(green_max, (b - r) / safe + 2.0, (r - g) / safe + 4.0),
    )
    h = sector * (math.pi / 3.0)
    h = torch.where(h < 0, h + _TWO_PI, h)
    h = torch.where(h >= _TWO_PI, h - _TWO_PI, h)  # float32 rounding can land on 2π
    return torch.where(grey, torch.zeros_like(h), h)


def _hue_to_category(hue: torch.Tensor) -> torch.Tensor:
    """Nearest of 12 centres ``2πi/12`` for hues in radians (any real value).

    Returns ``[...]`` int64 in ``0..11``; sector ``i`` is ``[30i - 15°, 30i + 15°)``.
    """
    step = _TWO_PI / NUM_HUE_CATEGORIES
    idx = torch.floor(hue.to(torch.float64) / step + 0.5).to(torch.int64)
    return torch.remainder(idx, NUM_HUE_CATEGORIES)


def hue_category(chroma: Any) -> torch.Tensor:
    """Hue category of each chroma signature: 12 sectors of 30° each.

    Args:
        chroma: ``[N, 3]`` floating tensor of mean RGB.

    Returns:
        ``[N]`` int64 in ``0..11`` on the input's device; greys map to 0.
    """
    t = as_tensor(chroma, "chroma")
    check_float(t, "chroma")
    check_shape(t, (None, 3), "chroma")
    return _hue_to_category(hue_radians(t))


def synthetic_dreams(
    n: int,
    dream_shape: tuple[int, int, int] = (16, 16, 4),
    *,
    classes: Sequence[int] | torch.Tensor | None = None,
    noise: float = 0.1,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy class-coloured dreams, the original's synthetic colour dataset.

    Every cell is its dream's class colour plus uniform noise in ``[-noise, noise]``
    per channel, clamped to ``[0, 1]``. Random numbers are drawn on the generator's
    device (or ``device`` without a generator), so a seeded generator gives the same
    data whatever ``device`` is.

    Args:
        n: number of dreams (may be 0).
        dream_shape: ``(R, C, L)``.

    Keyword Args:
        classes: class indices to draw labels from uniformly (default all 10).
        noise: half-width of the uniform noise, ``>= 0``.
        generator: optional seeded ``torch.Generator``.
        device: output device (default CPU).

    Returns:
        ``(dreams, labels)``: ``[n, R, C, L, 3]`` float32 and ``[n]`` int64, on ``device``.

    Raises:
        InvalidInputError: bad ``n``, ``dream_shape``, ``classes`` or ``noise``.
    """
    n = check_count(n, "n")
    shape = tuple(dream_shape)
    bad_dim = any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape)
    if len(shape) != 3 or bad_dim:
        raise InvalidInputError("dream_shape", "three positive ints (R, C, L)", dream_shape)
    is_real = isinstance(noise, (int, float)) and not isinstance(noise, bool)
    if not is_real or not 0.0 <= noise < math.inf:
        raise InvalidInputError("noise", "a finite float >= 0", noise)
    pool = torch.arange(NUM_CLASSES) if classes is None else as_tensor(classes, "classes")
    check_int(pool, "classes")
    pool = pool.reshape(-1).to(device="cpu", dtype=torch.int64)
    if pool.numel() == 0 or bool(((pool < 0) | (pool >= NUM_CLASSES)).any()):
        expected = f"a non-empty set of ints in [0, {NUM_CLASSES - 1}]"
        raise InvalidInputError("classes", expected, pool.tolist())

    out_device = torch.device("cpu") if device is None else torch.device(device)
    draw_device = generator.device if generator is not None else out_device
    pick = torch.randint(pool.numel(), (n,), generator=generator, device=draw_device)
    labels = pool.to(draw_device)[pick]
    colours = torch.tensor(CLASS_RGB, dtype=torch.float32, device=draw_device)[labels]
    jitter = torch.rand((n, *shape, 3), generator=generator, device=draw_device)
    dreams = (colours[:, None, None, None, :] + (2.0 * jitter - 1.0) * noise).clamp_(0.0, 1.0)
    return dreams.to(out_device), labels.to(out_device)
