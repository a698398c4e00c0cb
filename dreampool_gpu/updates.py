"""Writes of user columns by id (:func:`update_columns`): ``pool.update(ids, logits=..., task=...)``.

Runs over a pool's parts (bank, fault flag) under the pool's lock, shaped like
:func:`~dreampool_gpu.feedback.record_feedback`: padding ids (-1) and ids evicted since are skipped, ids never
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
from dreampool_gpu.lookup import locate_for_write
from dreampool_gpu.user_columns import checked_column

if TYPE_CHECKING:
    from dreampool_gpu.parts import PoolParts


def checked_update(
    config: PoolConfig, ids: Any, columns: dict[str, Any], device: torch.device
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The arguments of :meth:`DreamPool.update`, checked: flat ``[k]`` int64 ids and ``name -> [k, *shape]``.

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


def update_columns(parts: PoolParts, ids: Any, columns: dict[str, Any]) -> int:
    """:meth:`DreamPool.update` over the pool's parts (the caller holds the pool's lock)."""
    config, device, bank, flag = parts.config, parts.device, parts.bank, parts.fault
    with checks.bounded() as bounds:  # the values' checks: read with the call's one host read
        flat_ids, values = checked_update(config, ids, columns, device)
    if flat_ids.numel() == 0:
        flag.raise_code(int(flag.code))
        return 0
    safe, found, stored = locate_for_write(
        bank, flag, flat_ids, bounds, lambda: checked_update(config, ids, columns, device)
    )
    if stored:
        _write_rows(bank, safe, found, values)
    return stored


def _write_rows(bank: TensorBank, safe: torch.Tensor, found: torch.Tensor, values: dict[str, torch.Tensor]) -> None:
    """Write ``values`` (``[k, ...]`` per column) into rows ``safe`` ``[k]`` where ``found``: one scatter each.

    Every position writes its slot's final value (the last found position's for that slot,
    else the row as it is), so repeated slots, and misses whose ``safe`` is some live slot,
    all write the same value: deterministic without a host read.
    """
    spare = bank.capacity
    target = torch.where(found, safe, spare)
    order = torch.arange(target.numel(), device=target.device)
    last = torch.full((spare + 1,), -1, dtype=torch.int64, device=target.device)
    final = last.scatter_reduce_(0, target, order, "amax")[safe]  # [k]: the position written at each row
    written = final >= 0
    pick = final.clamp(min=0)
    for name, t in values.items():
        column = bank.raw[name]
        mask = written.reshape(-1, *([1] * (column.dim() - 1)))
        column.index_copy_(0, safe, torch.where(mask, t[pick], column[safe]))
