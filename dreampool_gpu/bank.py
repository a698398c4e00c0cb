"""TensorBank: the pool's entries as preallocated columns on one device.

The bank is the one copy of every entry (dream, features, embedding, metadata).
Ids are int64, increasing and never reused; a free slot holds id -1. Every
write and removal bumps :attr:`TensorBank.revision`, which derived structures
(search indexes, the id->slot map) use to know when they are stale.

User columns (:mod:`dreampool_gpu.user_columns`) follow the bank's own, filled with 0 (False
for bool) until written; they are columns like any other (bytes, state, gathers).

An entry may be written without its :data:`DERIVED` columns (``write(..., pending=True)``):
it waits until something reads one of them through :attr:`TensorBank.columns`, which first
calls the owner's :attr:`TensorBank.settle_hook` (the pool featurises every waiting entry in
one batch). :attr:`TensorBank.raw` reads the columns as they are.
"""

from __future__ import annotations

import time
from collections.abc import Callable, ItemsView, ValuesView
from dataclasses import dataclass
from typing import TypedDict

import torch

from dreampool_gpu.errors import CapacityExceededError, InvalidInputError
from dreampool_gpu.spectral import SPECTRAL_DIM
from dreampool_gpu.user_columns import UserColumns

DERIVED = frozenset({"chroma", "spectral", "hue_category", "embeddings"})
"""Columns computed from an entry's dream and class label (by ``add``, or later when lazy)."""


@dataclass(frozen=True)
class ColumnSpec:
    """Shape (after the capacity dimension), dtype and fill value of one column."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    fill: float | int


class BankState(TypedDict):
    """:meth:`TensorBank.state_dict`: CPU columns of rows ``[0, extent)`` and the counters."""

    columns: dict[str, torch.Tensor]
    size: int
    next_id: int
    extent: int


def column_specs(
    dream_shape: tuple[int, int, int],
    embedding_dim: int,
    dream_dtype: torch.dtype,
    user: UserColumns | None = None,
) -> dict[str, ColumnSpec]:
    """The bank's columns, in a fixed order (also the checkpoint layout), then the ``user`` columns (fill 0)."""
    nan = float("nan")
    specs = {
        "ids": ColumnSpec((), torch.int64, -1),
        "embeddings": ColumnSpec((embedding_dim,), torch.float32, 0.0),
        "dreams": ColumnSpec((*dream_shape, 3), dream_dtype, 0.0),
        "chroma": ColumnSpec((3,), torch.float32, 0.0),
        "spectral": ColumnSpec((SPECTRAL_DIM,), torch.float32, 0.0),
        "coherence": ColumnSpec((), torch.float32, 0.0),
        "energy": ColumnSpec((), torch.float32, 0.0),
        "violation": ColumnSpec((), torch.float32, 0.0),
        "utility": ColumnSpec((), torch.float32, nan),
        "util_mean": ColumnSpec((), torch.float32, 0.0),
        "feedback_count": ColumnSpec((), torch.int32, 0),
        "usage": ColumnSpec((), torch.int32, 0),
        "class_label": ColumnSpec((), torch.int32, -1),
        "hue_category": ColumnSpec((), torch.int8, 0),
        "inserted_at": ColumnSpec((), torch.float64, 0.0),
    }
    for name, (shape, dtype) in ({} if user is None else user.specs()).items():
        specs[name] = ColumnSpec(shape, dtype, False if dtype == torch.bool else 0)
    return specs


class _Columns(dict[str, torch.Tensor]):
    """The bank's columns by name; reading a :data:`DERIVED` column first settles waiting entries."""

    def __init__(self, bank: TensorBank, columns: dict[str, torch.Tensor]) -> None:
        super().__init__(columns)
        self._bank = bank

    def __getitem__(self, name: str) -> torch.Tensor:
        bank = self._bank
        if bank.pending and name in DERIVED:
            bank.settle()
        return dict.__getitem__(self, name)

    def get(self, name: str, default: torch.Tensor | None = None) -> torch.Tensor | None:  # type: ignore[override]
        return self[name] if name in self else default

    def values(self) -> ValuesView[torch.Tensor]:  # type: ignore[override]
        self._bank.settle()
        return super().values()

    def items(self) -> ItemsView[str, torch.Tensor]:  # type: ignore[override]
        self._bank.settle()
        return super().items()


class TensorBank:
    """Fixed-capacity columns ``[capacity, ...]`` on ``device``.

    Args:
        capacity: number of slots, allocated once.
        dream_shape: ``(rows, cols, layers)``.
        embedding_dim: D.

    Keyword Args:
        device: where every column lives.
        dream_dtype: storage dtype of the ``dreams`` column.
        user: user columns stored after the bank's own (``PoolConfig.columns``).

    Attributes:
        columns: name -> tensor ``[capacity, ...]``. ``ids`` is -1 on free slots. Reading a
            :data:`DERIVED` column settles waiting entries first (:meth:`settle`).
        raw: the same tensors, read as they are (derived columns of waiting entries unset).
        user_names: the user columns' names, sorted (the last of :attr:`columns`).
        pending: True while entries wait for their derived columns.
        settle_hook: called by :meth:`settle` with nothing; it reads :meth:`pending_slots`
            and writes the derived columns through :attr:`raw`.
        size: number of live entries (host int).
        next_id: the id the next written entry gets.
        revision: bumped on every write, removal and clear.
        extent: one past the highest slot ever written; scans stop there.
    """

    def __init__(
        self,
        capacity: int,
        dream_shape: tuple[int, int, int],
        embedding_dim: int,
        *,
        device: torch.device,
        dream_dtype: torch.dtype = torch.float32,
        user: UserColumns | None = None,
    ) -> None:
        self.capacity = capacity
        self.dream_shape = dream_shape
        self.embedding_dim = embedding_dim
        self.device = device
        self.specs = column_specs(dream_shape, embedding_dim, dream_dtype, user)
        self.user_names = tuple(user or ())
        self.raw: dict[str, torch.Tensor] = {
            name: torch.full((capacity, *spec.shape), spec.fill, dtype=spec.dtype, device=device)
            for name, spec in self.specs.items()
        }
        self.columns: dict[str, torch.Tensor] = _Columns(self, self.raw)
        self.pending = False
        self.settle_hook: Callable[[], None] | None = None
        self._waiting: list[torch.Tensor] = []  # slot tensors of waiting entries (stale or repeated slots allowed)
        self._waiting_count = 0
        self._settling = False
        self.size = 0
        self.next_id = 0
        self.revision = 0
        self.extent = 0
        self._order_revision = -1
        self._live_ids = self._live_slots = self.raw["ids"]
        self._by_slot = torch.arange(capacity, device=device)  # free_slots' keys: a slot, or past every free one
        self._taken_key = self._by_slot + capacity

    # ----------------------------------------------------------------- reads
    def alive(self) -> torch.Tensor:
        """``[capacity]`` bool, True on occupied slots."""
        return self.raw["ids"] >= 0

    def _refresh_order(self) -> None:
        """Sort the ids once per revision: live ids ascending are the live entries oldest first.

        A write appends its entries to a current order, and a removal of the oldest entries
        (:meth:`remove` with ``oldest``) drops them from it: a FIFO pool never sorts again.
        """
        if self._order_revision != self.revision:
            sorted_ids, sorted_slots = torch.sort(self.raw["ids"], stable=True)
            free = self.capacity - self.size  # free slots hold -1: they sort first
            self._live_ids, self._live_slots = sorted_ids[free:], sorted_slots[free:]
            self._order_revision = self.revision

    def order_cache(self) -> list[torch.Tensor]:
        """The tensors of the cached age order (kept across calls until the next revision)."""
        return [self._live_ids, self._live_slots]

    def slots_by_age(self) -> torch.Tensor:
        """``[size]`` int64 slots of live entries, oldest first."""
        self._refresh_order()
        return self._live_slots

    def ids_by_age(self) -> torch.Tensor:
        """``[size]`` int64 ids of live entries, oldest first (ascending)."""
        self._refresh_order()
        return self._live_ids

    def lookup(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(safe, found)`` of ``ids`` (any shape, int64, on this device), both shaped like ``ids``.

        ``found`` is True where the id is stored; ``safe`` is its slot there, and some live
        slot (or 0 in an empty bank) elsewhere, so it can index a column as it is. Evicted ids,
        never-issued ids and the padding id -1 are not found. One binary search, no host read.
        """
        self._refresh_order()
        flat = ids if ids.dim() == 1 and ids.is_contiguous() else ids.reshape(-1).contiguous()
        if self.size == 0:
            return torch.zeros_like(ids), torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
        pos = torch.searchsorted(self._live_ids, flat).clamp_(max=self.size - 1)
        found = self._live_ids.index_select(0, pos) == flat  # live ids are >= 0: -1 is never found
        safe = self._live_slots.index_select(0, pos)
        if ids.dim() == 1:
            return safe, found
        return safe.reshape(ids.shape), found.reshape(ids.shape)

    def slots_of(self, ids: torch.Tensor) -> torch.Tensor:
        """Slots of ``ids`` (any shape, int64, on this device); -1 where absent.

        Evicted ids, never-issued ids and the padding id -1 all map to -1.
        """
        safe, found = self.lookup(ids)
        return torch.where(found, safe, -1)

    def gather(self, name: str, slots: torch.Tensor) -> torch.Tensor:
        """Rows of column ``name`` at ``slots`` (any shape); fill value where slot is -1."""
        return self.gather_valid(name, slots.clamp(min=0), slots >= 0)

    def gather_valid(self, name: str, safe: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """:meth:`gather` from ``safe = slots.clamp(min=0)`` and ``valid = slots >= 0``, which a caller already has."""
        rows = (self.columns if name in DERIVED else self.raw)[name][safe]
        mask = (
            valid
            if rows.dim() == valid.dim()
            else valid.reshape(tuple(valid.shape) + (1,) * (rows.dim() - valid.dim()))
        )
        return torch.where(mask, rows, self.specs[name].fill)  # a scalar fill: no host-to-device copy

    def nbytes(self) -> dict[str, int]:
        """Exact bytes per column (``numel * element_size``)."""
        return {name: t.numel() * t.element_size() for name, t in self.raw.items()}

    def entry_nbytes(self) -> int:
        """Exact bytes one slot occupies across all columns."""
        return sum(self.nbytes().values()) // self.capacity

    # ---------------------------------------------------------------- writes
    def free_slots(self, n: int) -> torch.Tensor:
        """The ``min(n, free)`` lowest free slots, ``[min(n, free)]`` int64 ascending.

        One top-k over ``[capacity]`` keys, with no host read (``nonzero`` would wait
        for the device to size its output).
        """
        key = torch.where(self.raw["ids"] < 0, self._by_slot, self._taken_key)
        return key.topk(min(n, self.capacity - self.size), largest=False, sorted=True).indices

    def write(self, slots: torch.Tensor, values: dict[str, torch.Tensor], *, pending: bool = False) -> torch.Tensor:
        """Write new entries into the ``m`` lowest free slots ``slots`` (:meth:`free_slots`); return their ids ``[m]``.

        ``values`` holds a ``[m, ...]`` tensor for any columns other than ``ids``,
        ``usage``, ``feedback_count`` and ``inserted_at``; missing columns get
        their fill value. With ``pending`` the :data:`DERIVED` columns are left unwritten
        and the entries wait for them (:meth:`settle`). The extent follows on the host: the
        lowest free slots fill the ``extent - size`` holes below the extent first, then grow
        it to ``size + m``.
        """
        m = int(slots.numel())
        ordered = self._order_revision == self.revision  # the age order is current: the newest go last
        ids = torch.arange(self.next_id, self.next_id + m, dtype=torch.int64, device=self.device)
        now = time.time()
        for name, spec in self.specs.items():
            column = self.raw[name]
            if name == "ids":
                column.index_copy_(0, slots, ids)
            elif name == "inserted_at":
                column.index_fill_(0, slots, now)
            elif name in values:
                column.index_copy_(0, slots, values[name].to(dtype=column.dtype))
            elif not (pending and name in DERIVED):
                column.index_fill_(0, slots, spec.fill)
        if pending and m:
            self._wait(slots)
        self.next_id += m
        self.size += m
        self.extent = max(self.extent, self.size)
        self.revision += 1
        if ordered and m:
            self._live_ids = torch.cat([self._live_ids, ids])
            self._live_slots = torch.cat([self._live_slots, slots])
            self._order_revision = self.revision
        return ids

    # ------------------------------------------------------- waiting entries
    def _wait(self, slots: torch.Tensor) -> None:
        """Note ``slots`` as waiting for their derived columns; past ``capacity`` noted, every live slot waits."""
        self._waiting_count += int(slots.numel())
        if self._waiting_count > self.capacity:
            self._waiting = []  # pending_slots() then answers every live slot
        else:
            self._waiting.append(slots)
        self.pending = True

    def pending_slots(self) -> torch.Tensor:
        """``[p]`` int64 slots whose derived columns wait (possibly repeated, possibly since freed: both harmless).

        Every live slot, oldest first, once more slots were noted than the bank holds.
        """
        if not self.pending:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        if self._waiting_count > self.capacity:
            return self.slots_by_age()
        return self._waiting[0] if len(self._waiting) == 1 else torch.cat(self._waiting)

    def settle(self) -> None:
        """Have :attr:`settle_hook` compute the derived columns of waiting entries (a no-op while it runs)."""
        if not self.pending or self._settling or self.settle_hook is None:
            return
        self._settling = True
        try:
            self.settle_hook()
        finally:
            self._settling = False

    def settled(self) -> None:
        """The hook wrote every waiting entry's derived columns: nothing waits now."""
        self._waiting, self._waiting_count, self.pending = [], 0, False

    def remove(self, slots: torch.Tensor, *, oldest: bool = False) -> None:
        """Free ``slots`` ``[m]`` (live slots, no duplicates).

        ``oldest``: ``slots`` are ``slots_by_age()[:m]`` (the caller took them from there), so a
        current age order stays current without them.
        """
        m = int(slots.numel())
        if m == 0:
            return
        ordered = oldest and self._order_revision == self.revision
        self.raw["ids"].index_fill_(0, slots, -1)
        self.size -= m
        self.revision += 1
        if ordered:
            self._live_ids, self._live_slots = self._live_ids[m:], self._live_slots[m:]
            self._order_revision = self.revision

    def clear(self) -> None:
        """Free every slot; ids keep increasing afterwards."""
        self.raw["ids"].fill_(-1)
        self.settled()
        self.size = 0
        self.extent = 0
        self.revision += 1

    def to(self, device: torch.device) -> None:
        """Move every column to ``device`` in place (waiting entries settled first, on the old device;
        a new revision: derived structures rebuild)."""
        self.settle()
        self.raw = {name: t.to(device) for name, t in self.raw.items()}
        self.columns = _Columns(self, self.raw)
        self.device = device
        self._order_revision = -1
        self._live_ids = self._live_slots = self.raw["ids"]
        self._by_slot = self._by_slot.to(device)
        self._taken_key = self._taken_key.to(device)
        self.revision += 1

    def check_issued(self, ids: torch.Tensor) -> None:
        """Refuse ``ids`` this bank never issued (below -1 or at/after ``next_id``), listing the first few.

        Raises:
            InvalidInputError: naming how many unknown ids and the first five.
        """
        if ids.numel() and bool(((ids < -1) | (ids >= self.next_id)).any()):
            bad = ids[(ids < -1) | (ids >= self.next_id)].unique()
            shown = ", ".join(str(i) for i in bad[:5].tolist()) + (", ..." if bad.numel() > 5 else "")
            raise InvalidInputError(
                "ids", f"ids issued by this pool (-1..{self.next_id - 1})", f"{bad.numel()} unknown: {shown}"
            )

    def check_ids_left(self, incoming: int) -> None:
        """Refuse to issue ``incoming`` more ids when they would pass the int64 maximum.

        Raises:
            CapacityExceededError: fewer ids are left than ``incoming`` (ids are never reused).
        """
        left = torch.iinfo(torch.int64).max - self.next_id  # next_id itself must stay an int64
        if incoming > left:
            raise CapacityExceededError(
                f"ids exhausted: {incoming} dreams passed the gate but only {left} ids are left below the "
                f"int64 maximum (next_id {self.next_id}); ids are never reused"
            )

    def state_dict(self) -> BankState:
        """Host copies of rows ``[0, extent)`` of every column, with ``size``, ``next_id``, ``extent``.

        Copies, not views: the bank may change as soon as this returns. Waiting entries are settled first.
        """
        self.settle()
        extent = self.extent
        columns = {name: t[:extent].detach().to("cpu", copy=True).contiguous() for name, t in self.raw.items()}
        return {"columns": columns, "size": self.size, "next_id": self.next_id, "extent": extent}

    def load_state_dict(self, state: BankState) -> None:
        """Replace every row with ``state``'s (a :meth:`state_dict`; the caller checked its shapes).

        Rows past the saved extent are reset to the columns' fill values; values are cast
        to the columns' dtypes. Bumps :attr:`revision`.
        """
        extent = state["extent"]
        self.settled()  # every loaded row has its derived columns
        for name, column in self.raw.items():
            column[:extent].copy_(state["columns"][name])
            column[extent:].fill_(self.specs[name].fill)
        self.size, self.next_id, self.extent = state["size"], state["next_id"], extent
        self.revision += 1
