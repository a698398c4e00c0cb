"""Writes of user columns by id (:class:`ColumnUpdates`): ``pool.update(ids, logits=..., task=...)``.

A mixin of :class:`~dreampool_gpu.pool.DreamPool` (the pool sets the attributes it declares),
shaped like ``feedback``: padding ids (-1) and ids evicted since are skipped, ids never
issued are refused, values are checked like ``add``'s (:mod:`dreampool_gpu.user_columns`),
and one host read carries an earlier call's deferred fault, the ids' range, the count of
stored ids and the value checks. Each column is then written with one scatter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from dreampool_gpu import _validation as v
from dreampool_gpu import checks
from dreampool_gpu.bank import TensorBank
from dreampool_gpu.config import PoolConfig
from dreampool_gpu.errors import InvalidInputError
from dreampool_gpu.streams import StreamOrderedLock
from dreampool_gpu.user_columns import checked_column


def checked_update(
    config: PoolConfig, ids: Any, columns: dict[str, Any], device: torch.device
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The arguments of :meth:`ColumnUpdates.update`, checked: flat ``[k]`` int64 ids and ``name -> [k, *shape]``.

    Value checks join the caller's :func:`~dreampool_gpu.checks.bounded` read when inside one.

    Raises:
        InvalidInputError: no column, a name that is no user column of ``config``, or bad values.
        DimensionMismatchError: values not shaped ``[*ids.shape, *shape]``.
    """
    specs = config.columns.specs()
    declared = ", ".join(specs) if specs else "none declared (PoolConfig(columns=...))"
    if not columns:
        raise InvalidInputError("columns", f"at least one user column to write ({declared})", "none")
    for name in columns:
        if name not in specs:
            raise InvalidInputError(name, f"a user column: {declared}", "a keyword that names none")
    id_t = v.as_ids(ids, "ids", device=device)
    lead, n = tuple(id_t.shape), id_t.numel()
    values = {name: checked_column(name, value, specs[name], lead, device) for name, value in columns.items()}
    return id_t.reshape(-1).long(), {name: t.reshape(n, *specs[name][0]) for name, t in values.items()}


class ColumnUpdates:
    """``update`` of :class:`~dreampool_gpu.pool.DreamPool` (a mixin)."""

    config: PoolConfig
    device: torch.device
    bank: TensorBank
    _fault: checks.FaultFlag
    _lock: StreamOrderedLock

    if TYPE_CHECKING:  # defined by DreamPool

        def _check_issued(self, ids: torch.Tensor) -> None: ...

    def update(self, ids: Any, **columns: Any) -> int:
        """Write user columns (``PoolConfig.columns``) of stored entries by id.

        ``pool.update(ids, logits=new_logits, task=3)``: each keyword names a declared user
        column and gives ``[*ids.shape, *shape]`` values (a 0-d value is broadcast), checked
        as in ``add``. Padding ids (-1) and ids evicted since they were returned are skipped;
        where an id repeats, its last value is written. Columns not named keep their values.

        Args:
            ids: int ids, any shape (e.g. ``sample(n)``'s or ``retrieve(...).ids``).

        Returns:
            The number of ids written (repeats counted).

        Raises:
            InvalidInputError: no column given, a name that is not a user column, values of a
                dtype that does not cast, non-finite floats, or ids never issued (pool unchanged).
            DimensionMismatchError: values not shaped ``[*ids.shape, *shape]``.
        """
        with self._lock:
            with checks.bounded() as bounds:  # the values' checks: read with the call's one host read
                flat_ids, values = checked_update(self.config, ids, columns, self.device)
            if flat_ids.numel() == 0:
                self._fault.raise_code(int(self._fault.code))
                return 0
            safe, found = self.bank.lookup(flat_ids)
            fault, low, high, stored, *extremes = checks.host_values(
                [self._fault.code, *torch.aminmax(flat_ids), found.sum(dtype=torch.float64), *bounds.extremes()]
            )
            self._fault.raise_code(int(fault))
            if not bounds.hold(extremes):
                with checks.immediate():
                    checked_update(self.config, ids, columns, self.device)
            if low < -1 or high >= self.bank.next_id:
                self._check_issued(flat_ids)
            if stored:
                self._write_rows(safe, found, values)
            return int(stored)

    def _write_rows(self, safe: torch.Tensor, found: torch.Tensor, values: dict[str, torch.Tensor]) -> None:
        """Write ``values`` (``[k, ...]`` per column) into rows ``safe`` ``[k]`` where ``found``: one scatter each.

        Every position writes its slot's final value (the last found position's for that slot,
        else the row as it is), so repeated slots, and misses whose ``safe`` is some live slot,
        all write the same value: deterministic without a host read.
        """
        spare = self.bank.capacity
        target = torch.where(found, safe, spare)
        order = torch.arange(target.numel(), device=target.device)
        last = torch.full((spare + 1,), -1, dtype=torch.int64, device=target.device)
        final = last.scatter_reduce_(0, target, order, "amax")[safe]  # [k]: the position written at each row
        written = final >= 0
        pick = final.clamp(min=0)
        for name, t in values.items():
            column = self.bank.raw[name]
            mask = written.reshape(-1, *([1] * (column.dim() - 1)))
            column.index_copy_(0, safe, torch.where(mask, t[pick], column[safe]))
