"""Shared checks for tensors arriving at the public boundary.

Each check raises a typed error from :mod:`dreampool_gpu.errors` naming what was
expected and what arrived; none of them mutates its input. Checks of tensor values
go through :func:`require`, which, inside :func:`dreampool_gpu.checks.deferred`, records
the outcome on the device instead of reading it on the host; inside
:func:`dreampool_gpu.checks.bounded` the range checks become limits read later, with the
caller's host transfer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from dreampool_gpu import checks
from dreampool_gpu.errors import DimensionMismatchError, InvalidInputError


def require(ok: torch.Tensor, name: str, expected: str, arrived: Callable[[], Any]) -> None:
    """Raise ``InvalidInputError(name, expected, arrived())`` unless ``ok`` (0-d bool) is True.

    Inside :func:`dreampool_gpu.checks.deferred` the outcome is recorded instead (no host read).
    """
    deferred = checks.active()
    if deferred is not None:
        deferred.record(ok, name, expected)
    elif not bool(ok):
        raise InvalidInputError(name, expected, arrived())


def as_tensor(x: Any, name: str, *, device: torch.device | None = None) -> torch.Tensor:
    """Return ``x`` as a tensor on ``device`` (numpy arrays and nested lists accepted).

    Every tensor argument of the public API enters here: only dense (strided) tensors
    with data are accepted, so a sparse, nested, quantized or meta tensor is refused
    once, named, before any kernel sees it. A tensor that requires grad is taken as its
    values (detached): the pool stores and compares values, never a caller's autograd graph.
    """
    if isinstance(x, torch.Tensor):
        check_dense(x, name)
        t = x.detach() if x.requires_grad else x
    else:
        if isinstance(x, np.ndarray) and not x.dtype.isnative:  # big-endian data: torch reads native order only
            x = x.astype(x.dtype.newbyteorder("="))
        try:
            t = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InvalidInputError(name, "a tensor, array or list of numbers", type(x).__name__) from exc
    if device is not None and t.device != device:
        if device.type == "cuda" and isinstance(x, (bool, int, float)):  # filled there: no host copy to wait for
            return torch.full((), t.item(), dtype=t.dtype, device=device)
        try:
            t = t.to(device)
        except (RuntimeError, NotImplementedError) as exc:  # e.g. a meta tensor has no data to copy
            raise InvalidInputError(name, f"a tensor that can move to {device}", f"a tensor on {t.device}") from exc
    return t


def check_dense(t: torch.Tensor, name: str) -> None:
    """Require a dense tensor holding data: strided layout, not nested, quantized or on ``meta``."""
    if t.layout != torch.strided or t.is_nested or t.is_quantized or t.is_meta:
        kind = (
            "a nested tensor"
            if t.is_nested
            else "a meta tensor (no data)"
            if t.is_meta
            else "a quantized tensor"
            if t.is_quantized
            else f"a tensor of layout {t.layout}"
        )
        raise InvalidInputError(name, "a dense (strided) tensor with data", kind)


def check_float(t: torch.Tensor, name: str) -> None:
    """Require a floating-point dtype."""
    if not t.is_floating_point():
        raise InvalidInputError(name, "a floating-point tensor", f"dtype {t.dtype}")


def check_finite(t: torch.Tensor, name: str) -> None:
    """Require every value to be finite (no NaN or inf)."""
    if t.numel():
        collected = checks.bounds()
        if collected is not None:  # read later, with the call's host transfer
            collected.limit(t, -math.inf, math.inf, finite=True)
            return
        require(torch.isfinite(t).all(), name, "finite values", lambda: "NaN or inf")


def check_range(t: torch.Tensor, name: str, low: float, high: float) -> None:
    """Require every value to lie in ``[low, high]`` (NaN fails)."""
    if t.numel():
        collected = checks.bounds()
        if collected is not None:
            collected.limit(t, low, high)
            return

        def arrived() -> str:
            lo, hi = float(t.nan_to_num(nan=float("inf")).min()), float(t.nan_to_num(nan=float("-inf")).max())
            return f"values in [{lo:.6g}, {hi:.6g}]"

        require(((t >= low) & (t <= high)).all(), name, f"values in [{low}, {high}]", arrived)


def check_shape(t: torch.Tensor, expected: tuple[int | None, ...], name: str) -> None:
    """Require ``t.shape`` to match ``expected`` (``None`` matches any size)."""
    ok = t.dim() == len(expected) and all(e is None or e == s for e, s in zip(expected, t.shape, strict=False))
    if not ok:
        shown = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise DimensionMismatchError(shown, list(t.shape), name)


def check_int(t: torch.Tensor, name: str) -> None:
    """Require an integer dtype."""
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise InvalidInputError(name, "an integer tensor", f"dtype {t.dtype}")


def check_int_range(t: torch.Tensor, name: str, low: int, high: int, expected: str) -> None:
    """Require every value of the integer ``t`` to lie in ``[low, high]`` (``expected`` says so)."""
    if t.numel():
        collected = checks.bounds()
        if collected is not None:
            collected.limit(t, low, high)
            return
        require(((t >= low) & (t <= high)).all(), name, expected, lambda: t.unique().tolist()[:10])


def check_count(k: Any, name: str, *, high: int | None = None) -> int:
    """Require a non-negative Python int (bools refused), at most ``high`` if given, and return it."""
    expected = "a non-negative int" if high is None else f"an int in [0, {high}]"
    if isinstance(k, np.integer):  # numpy's ints (a size read from an array) are ints too
        k = int(k)
    if isinstance(k, bool) or not isinstance(k, int):
        if isinstance(k, torch.Tensor) and k.dim() == 0 and not k.is_floating_point() and k.dtype != torch.bool:
            check_dense(k, name)
            k = int(k)
        else:
            raise InvalidInputError(name, expected, repr(k))
    if k < 0 or (high is not None and k > high):
        raise InvalidInputError(name, expected, k)
    return k


def check_number(x: Any, name: str, low: float, high: float) -> float:
    """Require a real Python number in ``[low, high]`` (bools and NaN refused) and return it."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not low <= x <= high:
        raise InvalidInputError(name, f"a number in [{low}, {high}]", repr(x))
    return float(x)


def as_ids(x: Any, name: str, *, device: torch.device | None = None) -> torch.Tensor:
    """Return ``x`` as an integer tensor of ids on ``device``; an empty list or array is ``[0]`` int64."""
    t = as_tensor(x, name, device=device)
    if t.numel() == 0 and t.is_floating_point():  # torch reads [] as float32
        t = t.long()
    check_int(t, name)
    return t


def check_flag(x: Any, name: str) -> bool:
    """Require a bool (Python, numpy, or a one-element bool tensor) and return it."""
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, torch.Tensor) and x.numel() == 1 and x.dtype == torch.bool:
        check_dense(x, name)
        return bool(x)
    shown = f"a tensor of shape {list(x.shape)}, dtype {x.dtype}" if isinstance(x, torch.Tensor) else repr(x)
    raise InvalidInputError(name, "True or False", shown)


def int_in_range(value: Any, low: int, high: int | None = None) -> bool:
    """Whether ``value`` is a Python int (not a bool) in ``[low, high]`` (no upper bound when None)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)


def int_range_text(low: int, high: int | None = None) -> str:
    """How :func:`int_in_range` reads in an error message."""
    return f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"


# ---------------------------------------------------------------- per-dream and per-query values
_FLOAT32_MAX = torch.finfo(torch.float32).max


def per_item(x: Any, n: int, name: str, low: float, high: float, device: torch.device) -> torch.Tensor:
    """``x`` (None: zeros; a scalar is broadcast) as ``[n]`` float32 in ``[low, high]`` on ``device``:
    a value per dream or per query (coherence, energy, violation, utility prior)."""
    if x is None:
        return torch.zeros(n, device=device)
    if isinstance(x, (int, float)) and not isinstance(x, bool):  # checked on the host: no reduction, no read
        if not math.isfinite(x) or abs(x) > _FLOAT32_MAX:  # float32 would hold it as inf
            raise InvalidInputError(name, "finite values", repr(x))
        if not low <= x <= high:
            raise InvalidInputError(name, f"values in [{low}, {high}]", repr(x))
        return torch.full((n,), float(x), device=device)
    t = as_tensor(x, name, device=device)
    if t.dtype == torch.bool or t.is_complex():
        raise InvalidInputError(name, "real numbers", f"dtype {t.dtype}")
    t = t.float()
    if t.dim() == 0:
        t = t.expand(n)
    check_shape(t, (n,), name)
    check_finite(t, name)
    check_range(t, name, low, high)
    return t


def class_labels(x: Any, n: int, name: str, num_classes: int, device: torch.device) -> torch.Tensor:
    """``x`` (None: all -1; a scalar is broadcast) as ``[n]`` int64 class labels in -1..num_classes-1."""
    if x is None:
        return torch.full((n,), -1, dtype=torch.int64, device=device)
    t = as_tensor(x, name, device=device)
    check_int(t, name)
    t = t.long()
    if t.dim() == 0:
        t = t.expand(n)
    check_shape(t, (n,), name)
    check_int_range(t, name, -1, num_classes - 1, f"class labels in 0..{num_classes - 1} or -1")
    if checks.sync_free():  # a recorded failure must never reach an index: -1 (none) in its place
        t = torch.where((t >= -1) & (t < num_classes), t, -1)
    return t
