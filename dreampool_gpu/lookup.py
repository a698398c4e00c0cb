"""Ids to slots for a pool's gathers by id (``dreams``, ``metadata``, ``diversity``), and the gathers.

:class:`IdLookup` is a part of a pool (:class:`~dreampool_gpu.parts.PoolParts`): it checks the
ids once (one host read, which also refuses ids never issued) and remembers the answer for
the same unchanged tensor in an unchanged bank, so ``dreams(ids)`` then ``metadata(ids)`` of
one replay batch look up once; ``sample`` hands it the slots of the ids it draws.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dreampool_gpu import _validation as v
from dreampool_gpu import checks
from dreampool_gpu.bank import TensorBank
from dreampool_gpu.errors import InvalidInputError

Found = tuple[torch.Tensor, torch.Tensor, bool]  # (safe slots, found, every id found)


class IdLookup:
    """Checked slots of ids in one bank, remembered for the latest id tensor.

    Attributes:
        default_columns: what ``metadata`` gathers by default (every column but dreams).
    """

    def __init__(self, bank: TensorBank) -> None:
        self.bank = bank
        self.default_columns = tuple(name for name in bank.specs if name != "dreams")
        self._memo: tuple[Any, tuple[int, int], Found] | None = None

    def find(self, ids: Any) -> Found:
        """``(safe, found, every)`` of ``ids`` (:meth:`TensorBank.lookup`), ``every``: all found.

        One host read, which also refuses ids this pool never issued (below -1 or at/after
        ``next_id``), listing the first few.
        """
        bank = self.bank
        known = self.known(ids)  # dreams(ids) then metadata(ids) of one replay batch: looked up once
        if known is not None:
            return known
        t = v.as_ids(ids, "ids", device=bank.device).long()
        safe, found = bank.lookup(t)
        if t.numel() == 0:
            return safe, found, True
        low, high, every = checks.host_values([*torch.aminmax(t), found.all()])
        if low < -1 or high >= bank.next_id:
            bank.check_issued(t)
        result = (safe, found, bool(every))
        if isinstance(ids, torch.Tensor):  # the same tensor, unchanged, in an unchanged bank: the same answer
            self.remember(ids, result)
        return result

    def remember(self, ids: torch.Tensor, result: Found) -> None:
        """Answer :meth:`find` of this ``ids`` tensor with ``result`` while it and the bank are unchanged.

        An inference tensor (made under ``torch.inference_mode()``) has no version counter to
        tell a change by: it is not remembered, and its next :meth:`find` looks it up again.
        """
        self._memo = None if ids.is_inference() else (ids, (ids._version, self.bank.revision), result)

    def known(self, ids: Any) -> Found | None:
        """:meth:`find`'s remembered answer for ``ids`` (the same tensor, unchanged, in an unchanged bank), or None."""
        memo = self._memo
        if memo is not None and memo[0] is ids and memo[1] == (ids._version, self.bank.revision):
            return memo[2]
        return None

    def slots(self, ids: Any) -> torch.Tensor:
        """Slots of ``ids`` (any shape; -1 where absent), after refusing ids never issued."""
        safe, found, _ = self.find(ids)
        return torch.where(found, safe, -1)

    def columns(self, columns: Sequence[str] | None) -> tuple[str, ...]:
        """The checked column names of ``metadata`` (:attr:`default_columns` when None)."""
        if columns is None:
            return self.default_columns
        if isinstance(columns, str) or not isinstance(columns, Sequence):
            raise InvalidInputError("columns", "a sequence of column names, or None", repr(columns))
        names = tuple(columns)
        for name in names:
            if name not in self.bank.specs:
                raise InvalidInputError("columns", f"names among {', '.join(self.bank.specs)}", repr(name))
        return names

    def gather(
        self, names: Sequence[str], safe: torch.Tensor, found: torch.Tensor, every: bool
    ) -> dict[str, torch.Tensor]:
        """Columns ``names`` at :meth:`find`'s rows; fill values where not ``found`` (no mask when ``every``)."""
        if not every:
            return {name: self.bank.gather_valid(name, safe, found) for name in names}
        flat = safe.reshape(-1)
        out = {}
        for name in names:
            column = self.bank.columns[name]
            out[name] = column.index_select(0, flat).reshape((*safe.shape, *column.shape[1:]))
        return out


def locate_for_write(
    bank: TensorBank,
    fault: checks.FaultFlag,
    flat_ids: torch.Tensor,
    bounds: checks.Bounds,
    recheck: Any,
    known: Found | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Slots of ``flat_ids`` ``[k]`` for a write by id (feedback, update), after the call's one host read.

    The read carries an earlier call's ``fault``, the ids' range, how many are stored and the
    value checks collected in ``bounds``; a failed check runs ``recheck()`` again on the host so
    that the error names the argument, and ids never issued raise (:meth:`TensorBank.check_issued`).
    ``known``: :meth:`IdLookup.known`'s answer for these ids (already checked, not looked up again).

    Returns:
        ``(safe, found, stored)``: ``[k]`` int64 slots, ``[k]`` bool, and how many were found.
    """
    if known is not None:
        safe, found, every = known
        if safe.dim() != 1:
            safe, found = safe.reshape(-1), found.reshape(-1)
        count = [] if every else [found.sum(dtype=torch.float64)]
        code, *rest = checks.host_values([fault.code, *count, *bounds.extremes()])
        low, high = -1.0, -1.0  # checked when they were looked up
        stored, extremes = (float(flat_ids.numel()), rest) if every else (rest[0], rest[1:])
    else:
        safe, found = bank.lookup(flat_ids)
        values = [fault.code, *torch.aminmax(flat_ids), found.sum(dtype=torch.float64), *bounds.extremes()]
        code, low, high, stored, *extremes = checks.host_values(values)
    fault.raise_code(int(code))
    if not bounds.hold(extremes):
        with checks.immediate():
            recheck()
    if low < -1 or high >= bank.next_id:
        bank.check_issued(flat_ids)
    return safe, found, int(stored)
