"""Utility feedback: the last utility and the running mean of each entry (:class:`Feedback`).

A mixin of :class:`~dreampool_gpu.pool.DreamPool` (the pool sets the attributes it declares).
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
from dreampool_gpu.streams import StreamOrderedLock


class Feedback:
    """``feedback`` of :class:`~dreampool_gpu.pool.DreamPool` (a mixin)."""

    device: torch.device
    bank: TensorBank
    counters: dict[str, int]
    _fault: checks.FaultFlag
    _lock: StreamOrderedLock

    if TYPE_CHECKING:  # defined by DreamPool

        def _check_issued(self, ids: torch.Tensor) -> None: ...

    def feedback(self, ids: Any, utility: Any) -> int:
        """Record utility feedback for entries; padding ids (-1) are ignored.

        Each entry keeps the last utility and the running mean ``util_mean`` used
        by hybrid scoring. Ids evicted since they were returned are skipped.

        Args:
            ids: int64 ids, any shape. utility: same shape (or a scalar), in [0, 1].

        Returns:
            The number of (id, utility) pairs recorded.

        Raises:
            InvalidInputError: utility out of range or not finite, ids never issued.
        """
        with self._lock:
            self._fault.raise_code(int(self._fault.code))  # feedback reads the host anyway (its count)
            id_t = v.as_ids(ids, "ids", device=self.device)
            u = v.as_tensor(utility, "utility", device=self.device)
            if u.numel() == 0 or (not u.is_floating_point() and u.dtype != torch.bool and not u.is_complex()):
                u = u.float()  # integer utilities (0, 1) and empty lists are values in [0, 1] too
            v.check_float(u, "utility")
            if u.dim() == 0:
                u = u.expand(id_t.shape)
            if u.shape != id_t.shape:
                raise DimensionMismatchError(list(id_t.shape), list(u.shape), "utility")
            v.check_finite(u, "utility")
            v.check_range(u, "utility", 0.0, 1.0)
            flat_ids = id_t.reshape(-1).long()
            self._check_issued(flat_ids)
            slots = self.bank.slots_of(flat_ids)
            found = slots >= 0
            slots, values = slots[found], u.reshape(-1)[found].float()
            if slots.numel() == 0:
                return 0
            cols = self.bank.columns
            count = cols["feedback_count"]
            total = cols["util_mean"] * count + torch.zeros_like(cols["util_mean"]).index_add_(0, slots, values)
            count.index_add_(0, slots, torch.ones_like(slots, dtype=count.dtype))
            touched = torch.zeros_like(cols["util_mean"], dtype=torch.bool).index_fill_(0, slots, True)
            cols["util_mean"].copy_(torch.where(touched, total / count.clamp(min=1), cols["util_mean"]))  # in place
            order = torch.arange(slots.numel(), device=self.device)
            last = torch.full_like(count, -1, dtype=torch.int64).scatter_reduce_(0, slots, order, "amax")
            cols["utility"][touched] = values[last[touched]]
            self.counters["feedback"] += int(slots.numel())
            return int(slots.numel())
