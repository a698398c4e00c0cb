"""Utility feedback: the last utility and the running mean of each entry (:func:`record_feedback`).

Runs over a pool's parts (bank, fault flag, counters) under the pool's lock.
``feedback`` returns how many records it stored, so it reads the host (it also raises a
deferred check's error kept from an earlier call, docs/api.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from dreampool_gpu import _validation as v
from dreampool_gpu import checks
from dreampool_gpu.bank import TensorBank
from dreampool_gpu.errors import DimensionMismatchError
from dreampool_gpu.lookup import locate_for_write

if TYPE_CHECKING:
    from dreampool_gpu.parts import PoolParts


def record_feedback(parts: PoolParts, ids: Any, utility: Any) -> int:
    """:meth:`DreamPool.feedback` over the pool's parts (the caller holds the pool's lock).

    The common call, an int64 id tensor and a float32 utility of its shape on the pool's
    device, skips the general argument conversion; ids that :class:`~dreampool_gpu.lookup.IdLookup`
    already answers for (those of the last ``sample``) are not looked up again.
    """
    device, bank, flag = parts.device, parts.bank, parts.fault

    def parsed() -> tuple[torch.Tensor, torch.Tensor]:
        id_t = v.as_ids(ids, "ids", device=device)
        u = v.as_tensor(utility, "utility", device=device)
        if u.numel() == 0 or (not u.is_floating_point() and u.dtype != torch.bool and not u.is_complex()):
            u = u.float()  # integer utilities (0, 1) and empty lists are values in [0, 1] too
        v.check_float(u, "utility")
        if u.dim() == 0:
            u = u.expand(id_t.shape)
        if u.shape != id_t.shape:
            raise DimensionMismatchError(list(id_t.shape), list(u.shape), "utility")
        v.check_finite(u, "utility")
        v.check_range(u, "utility", 0.0, 1.0)
        return id_t.reshape(-1).long(), u.reshape(-1).float()

    if _plain(ids, utility, device):  # a utility that requires grad (a loss's output) counts as its values
        flat_ids, values = _flat(ids), _flat(utility.detach() if utility.requires_grad else utility)
        bounds = checks.Bounds()
        if values.numel():
            bounds.limit(values, 0.0, 1.0, finite=True)
    else:
        with checks.bounded() as bounds:  # the utilities' checks: read with the call's one host read
            flat_ids, values = parsed()
    if flat_ids.numel() == 0:
        flag.raise_code(int(flag.code))
        return 0
    safe, found, stored = locate_for_write(bank, flag, flat_ids, bounds, parsed, known=parts.ids.known(ids))
    if stored:
        _record(bank, safe, found, stored == flat_ids.numel(), values)
    parts.counters["feedback"] += stored
    return stored


def _flat(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``[numel]`` (itself when it is one-dimensional already: no view dispatched)."""
    return t if t.dim() == 1 else t.reshape(-1)


def _plain(ids: Any, utility: Any, device: torch.device) -> bool:
    """Whether ``ids`` and ``utility`` are dense int64 and float32 tensors of one shape on ``device``."""
    if not (isinstance(ids, torch.Tensor) and isinstance(utility, torch.Tensor)):
        return False
    if ids.dtype != torch.int64 or utility.dtype != torch.float32 or ids.shape != utility.shape:
        return False
    if ids.device != device or utility.device != device:
        return False
    v.check_dense(ids, "ids")
    v.check_dense(utility, "utility")
    return True


def _record(bank: TensorBank, safe: torch.Tensor, found: torch.Tensor, every: bool, values: torch.Tensor) -> None:
    """Count ``values`` ``[k]`` into the rows ``safe`` ``[k]`` where ``found`` (``every``: all are).

    Running mean, count and last utility, one scatter per column: the count adds the hits,
    the mean adds ``(value - old mean) / new count`` per hit (its running mean over the
    call's values), and every position writes its row's last found value (deterministic
    with repeated rows). A miss adds nothing and writes its row's own final value.
    """
    cols = bank.raw
    count, mean, column = cols["feedback_count"], cols["util_mean"], cols["utility"]
    order, ones = _steps(safe.numel(), safe.device, count.dtype)
    if every:
        count.index_add_(0, safe, ones if ones is not None else torch.ones_like(safe, dtype=count.dtype))
        old = mean.index_select(0, safe)
        mean.index_add_(0, safe, (values - old) / count.index_select(0, safe))
        last = torch.full((bank.capacity,), -1, dtype=torch.int64, device=safe.device)
        final = last.scatter_reduce_(0, safe, order, "amax").index_select(0, safe)
        column.index_copy_(0, safe, values.index_select(0, final))
        return
    count.index_add_(0, safe, found.to(count.dtype))
    old = mean.index_select(0, safe)
    mean.index_add_(0, safe, torch.where(found, (values - old) / count.index_select(0, safe), 0.0))
    spare = bank.capacity  # misses scatter into a spare row
    last = torch.full((spare + 1,), -1, dtype=torch.int64, device=safe.device)
    final = last.scatter_reduce_(0, torch.where(found, safe, spare), order, "amax").index_select(0, safe)
    kept = column.index_select(0, safe)
    column.index_copy_(0, safe, torch.where(final >= 0, values.index_select(0, final.clamp(min=0)), kept))


_STEPS: dict[tuple[int, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}  # CPU only: read, never written


def _steps(k: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``arange(k)`` (int64) and ``ones(k)`` of ``dtype``, kept for the last few ``k`` on CPU.

    On CUDA the positions are made each call and the ones not at all (the caller makes them
    where it needs them): a tensor kept from a call on one stream and read on another would
    need the stream ordering the pool's own state gets.
    """
    if device.type != "cpu":
        return torch.arange(k, device=device), None
    steps = _STEPS.get((k, dtype))
    if steps is None:
        steps = (torch.arange(k), torch.ones(k, dtype=dtype))
        if type(steps[0]) is torch.Tensor and not steps[0].is_inference():  # not a fake, traced or inference tensor
            if len(_STEPS) >= 16:
                _STEPS.clear()
            _STEPS[(k, dtype)] = steps
    return steps
