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
    """:meth:`DreamPool.feedback` over the pool's parts (the caller holds the pool's lock)."""
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

    with checks.bounded() as bounds:  # the utilities' checks: read with the call's one host read
        flat_ids, values = parsed()
    if flat_ids.numel() == 0:
        flag.raise_code(int(flag.code))
        return 0
    safe, found, stored = locate_for_write(bank, flag, flat_ids, bounds, parsed)
    if stored:
        _record(bank, safe, found, values)
    parts.counters["feedback"] += stored
    return stored


def _record(bank: TensorBank, safe: torch.Tensor, found: torch.Tensor, values: torch.Tensor) -> None:
    """Count ``values`` ``[k]`` into the rows ``safe`` ``[k]`` where ``found``: running mean, count, last.

    Misses go to a spare row of the ``[capacity + 1]`` temporaries; per slot, the sum and the
    count of the call's values and the position of its last one are scattered once each.
    """
    cols, spare = bank.raw, bank.capacity
    target = torch.where(found, safe, spare)
    sums = values.new_zeros(spare + 1).index_add_(0, target, values)[:spare]
    count = cols["feedback_count"]
    hits = count.new_zeros(spare + 1).index_add_(0, target, torch.ones_like(target, dtype=count.dtype))[:spare]
    order = torch.arange(target.numel(), device=target.device)
    last = torch.full((spare + 1,), -1, dtype=torch.int64, device=target.device)
    last = last.scatter_reduce_(0, target, order, "amax")[:spare]
    touched = hits > 0
    mean = cols["util_mean"]
    total = mean * count + sums
    count.add_(hits)
    torch.where(touched, total / count.clamp(min=1), mean, out=mean)  # in place, untouched rows as they were
    column = cols["utility"]
    torch.where(touched, values[last.clamp(min=0)], column, out=column)
