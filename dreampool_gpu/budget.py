"""Memory budget: exact accounting, device memory through NVML, eviction counts.

Which entries leave is the eviction policy's (:mod:`dreampool_gpu.eviction`).

Accounting (docs/spec.md §Memory budget, measured instead of estimated by hand):

- ``E``, the bytes of one bank slot: ``numel x element_size`` summed over every
  column (:meth:`TensorBank.entry_nbytes`; :func:`entry_nbytes` before a bank exists).
- ``usage = live entries x E + index.nbytes()``: what the pool's entries hold,
  the search index's real footprint included.
- ``allocated = capacity x E + index.nbytes()``: what the pool has allocated (the
  bank is preallocated, so its part is fixed at construction).
- ``limit = floor(threshold x budget)``, threshold 0.9 by default.

The pool stays within the budget in two ways. :func:`fit_capacity` sizes the
preallocated bank so that ``capacity x E + index_nbytes_estimate(capacity) <= limit``;
and :meth:`MemoryBudget.eviction_count` makes the pool evict, by its policy,
whenever ``usage`` would pass ``limit`` (an index can outgrow its estimate). The
original multiplied usage by an ``ann_overhead`` of 2.0 while HNSW was active to
guess the graph's size; here the index reports its bytes, so the factor is 1 and
every quantity in the eviction count is raw bytes (the original mixed adjusted and
raw bytes).

A budget given as ``"N%"`` is a share of the device's memory: on CUDA its total;
on CPU the smallest of the host's RAM, its available RAM, the room under the
process's ``RLIMIT_AS`` and the room under its memory cgroup's limit
(:func:`~dreampool_gpu.memory.host_room`), the same room the check before
allocating (:func:`check_allocation`) compares with.

Device memory is read for :meth:`MemoryBudget.stats` and to resolve a budget
given as ``"N%"`` of the device: on CUDA through NVML (``nvidia-ml-py``), the GPU
found by its PCI bus id so ``CUDA_VISIBLE_DEVICES`` cannot mix GPUs up; without
NVML through ``torch.cuda.mem_get_info``; on CPU the process's RSS and the host's
RAM through psutil; without psutil the pool's own bytes. Every reading says its
source. Nothing here raises for a missing driver or library.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from dreampool_gpu.bank import ColumnSpec, TensorBank
from dreampool_gpu.config import PoolConfig, parse_memory_budget
from dreampool_gpu.errors import InsufficientMemoryError, InvalidConfigurationError
from dreampool_gpu.memory import (
    CudaMemory,
    MemoryProbe,
    MemoryReading,
    NvmlMemory,
    ProcessMemory,
    host_room,
    open_probe,
    pci_bus_id,
)
from dreampool_gpu.search import index_nbytes_estimate
from dreampool_gpu.search.base import SearchIndex

MIB = 1 << 20
DEFAULT_THRESHOLD = 0.9  # docs/spec.md §Memory budget


# ------------------------------------------------------------ device memory
def entry_nbytes(specs: dict[str, ColumnSpec]) -> int:
    """Bytes one bank slot takes across the columns ``specs`` (= ``TensorBank.entry_nbytes()``)."""
    return sum(math.prod(spec.shape) * spec.dtype.itemsize for spec in specs.values())


def fit_capacity(
    config: PoolConfig,
    *,
    entry_bytes: int,
    budget_bytes: int | None,
    device: torch.device,
) -> int:
    """The pool's capacity: ``config.capacity``, lowered so the bank fits the budget.

    With a budget, capacity is the largest ``n`` (at most ``config.capacity`` when
    that is set) with ``n x entry_bytes + index_nbytes_estimate(n) <= floor(threshold
    x budget_bytes)``, threshold = ``config.budget_threshold``; for the exact engines
    this is ``floor(floor(threshold x budget) / entry_bytes)``. Without a budget it is
    ``config.capacity``.

    Raises:
        InvalidConfigurationError: a MiB budget cannot hold a single entry.
        InsufficientMemoryError: an ``"N%"`` budget cannot: the memory is not there.
    """
    if budget_bytes is None:
        if config.capacity is None:  # PoolConfig forbids this; kept for direct callers
            raise InvalidConfigurationError("capacity", None, "an int >= 1 (None only with a memory budget)")
        return config.capacity
    threshold = config.budget_threshold
    limit = math.floor(threshold * budget_bytes)
    low, high = 0, limit // entry_bytes
    if config.capacity is not None:
        high = min(high, config.capacity)
    while low < high:  # bytes(n) is increasing: the largest n that fits
        mid = (low + high + 1) // 2
        if mid * entry_bytes + index_nbytes_estimate(config, device, mid) <= limit:
            low = mid
        else:
            high = mid - 1
    if low == 0 and isinstance(config.memory_budget_mb, str):  # "N%" of what is left here: not there
        raise InsufficientMemoryError(
            "memory_budget_mb",
            config.memory_budget_mb,
            math.ceil(entry_bytes / threshold),
            budget_bytes,
            device,
            advice=f"that share of {device} cannot hold one entry: free memory there, give a larger share, "
            "or make entries smaller (dream_shape, embedding_dim, dream_dtype)",
        )
    if low == 0:
        need = math.ceil(entry_bytes / threshold) / MIB
        raise InvalidConfigurationError(
            "memory_budget_mb",
            config.memory_budget_mb,
            f"a budget holding at least one entry of {entry_bytes} bytes at threshold {threshold} "
            f"(>= {need:.4f} MiB; resolved to {budget_bytes} bytes)",
        )
    return low


def available_bytes(device: torch.device) -> int | None:
    """Bytes that can be allocated on ``device`` now: free GPU memory, or on the host the
    smallest of the available RAM and the room under ``RLIMIT_AS`` and the memory cgroup's
    limit (:func:`~dreampool_gpu.memory.host_room`); None when unknown (never raises)."""
    if device.type != "cuda":
        smallest = host_room().smallest
        return None if smallest is None else smallest[0]
    try:
        return int(torch.cuda.mem_get_info(device)[0])
    except Exception:  # no driver: the allocation itself will tell
        return None


def check_allocation(config: PoolConfig, specs: dict[str, ColumnSpec], capacity: int, device: torch.device) -> None:
    """Refuse a bank of ``capacity`` slots of ``specs`` that cannot fit the memory available on ``device``.

    Runs before the bank is allocated, so an impossible size is a typed error naming
    the field that made it so, not an allocator failure.

    Raises:
        InsufficientMemoryError: ``capacity x entry bytes`` exceeds what is available.
    """
    per_entry = entry_nbytes(specs)
    needed = capacity * per_entry
    available = available_bytes(device)
    if available is None or needed <= available:
        return
    field: str
    value: Any  # the offending field's value, as the error reports it
    budget_sized = config.memory_budget_mb is not None and (config.capacity is None or capacity < config.capacity)
    if budget_sized and per_entry <= available:  # the budget set the capacity: more than is there
        field, value = "memory_budget_mb", config.memory_budget_mb
    elif per_entry > available:  # not even one entry fits: the entry's shape is the problem
        dreams = math.prod(specs["dreams"].shape) * specs["dreams"].dtype.itemsize
        embeddings = math.prod(specs["embeddings"].shape) * specs["embeddings"].dtype.itemsize
        field, value = (
            ("dream_shape", config.dream_shape) if dreams >= embeddings else ("embedding_dim", config.embedding_dim)
        )
    else:
        field, value = "capacity", capacity
    raise InsufficientMemoryError(field, value, needed, available, device)


# ------------------------------------------------------------------ budget
class MemoryBudget:
    """A pool's memory budget: exact usage, the eviction count, device memory.

    Args:
        spec: ``PoolConfig.memory_budget_mb``: None (unlimited), MiB, or ``"N%"`` of
            the device's memory (the GPU's total on CUDA; on CPU the smallest of the
            host's RAM, its available RAM and the room under ``RLIMIT_AS`` and the cgroup limit).

    Keyword Args:
        device: the pool's device.
        threshold: share of the budget the pool may use, in (0, 1].
        probe: where device memory is read (default :func:`open_probe` for
            ``device``, opened on first use); tests pass fakes.

    Attributes:
        budget_bytes: the budget in bytes (None: unlimited).
        limit_bytes: ``floor(threshold x budget_bytes)`` (None: unlimited).

    Raises:
        InvalidConfigurationError: a bad ``spec`` or ``threshold``, or ``"N%"`` where the
            device's total memory cannot be read.
    """

    def __init__(
        self,
        spec: float | str | None = None,
        *,
        device: torch.device,
        threshold: float = DEFAULT_THRESHOLD,
        probe: MemoryProbe | None = None,
    ) -> None:
        mib, share = parse_memory_budget(spec)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
            raise InvalidConfigurationError("budget_threshold", threshold, "a number in (0, 1]")
        self.spec = spec
        self.device = device
        self.threshold = float(threshold)
        self._probe = probe
        self.budget_bytes: int | None = None
        if mib is not None:
            self.budget_bytes = int(mib * MIB)
        elif share is not None:
            total = self.read().total_bytes
            if total is None:
                raise InvalidConfigurationError(
                    "memory_budget_mb", spec, f"MiB: the total memory of {device} cannot be read here"
                )
            room = host_room().smallest if device.type != "cuda" else None
            self.budget_bytes = int(share * (total if room is None else min(total, room[0])))
        self.limit_bytes = None if self.budget_bytes is None else math.floor(self.threshold * self.budget_bytes)

    # ------------------------------------------------------------- device
    @property
    def probe(self) -> MemoryProbe:
        """The device-memory probe, opened on first use."""
        if self._probe is None:
            self._probe = open_probe(self.device)
        return self._probe

    def read(self) -> MemoryReading:
        """Current device memory (see :class:`MemoryReading`)."""
        return self.probe.read()

    def close(self) -> None:
        """Release the probe (shuts NVML down); a later read opens a new one."""
        if self._probe is not None:
            self._probe.close()
            self._probe = None

    # ---------------------------------------------------------- accounting
    @staticmethod
    def usage(bank: TensorBank, index: SearchIndex) -> int:
        """Bytes the live entries account for: ``size x E + index.nbytes()``."""
        return bank.size * bank.entry_nbytes() + index.nbytes()

    def room(self, bank: TensorBank, index: SearchIndex) -> int | None:
        """Entries an emptied pool could take: ``(limit - index bytes) // E`` (None: unlimited)."""
        if self.limit_bytes is None:
            return None
        return max(0, (self.limit_bytes - index.nbytes()) // bank.entry_nbytes())

    def eviction_count(self, bank: TensorBank, index: SearchIndex, incoming: int = 0) -> int:
        """Entries to evict so that ``incoming`` more fit under the limit (docs/spec.md §Memory budget).

        ``avg = usage / size`` (``E`` when empty) is what a live entry accounts for,
        its slot plus its share of the index; ``bytes_to_free = usage + incoming x avg
        - limit``; the count is ``ceil(bytes_to_free / avg)``, at most ``size``, 0
        without a budget. All raw bytes. An index need not shrink with evictions
        (IVF keeps stale codes until its refresh), so the caller evicts again while
        the count stays positive.
        """
        if self.limit_bytes is None or bank.size == 0:
            return 0
        usage = self.usage(bank, index)
        avg = usage / bank.size if bank.size else float(bank.entry_nbytes())
        to_free = usage + incoming * avg - self.limit_bytes
        if to_free <= 0:
            return 0
        return min(bank.size, math.ceil(to_free / avg))

    def stats(self, bank: TensorBank, index: SearchIndex) -> dict[str, Any]:
        """Budget, usage and device memory for ``DreamPool.stats()["memory"]``.

        Keys: ``source`` and ``note`` (where device memory came from, and why a
        fallback), ``device_used_bytes`` (the GPU's used memory, the process's RSS
        on CPU, or the pool's allocated bytes where nothing can be read) and
        ``device_total_bytes`` (None when unknown), ``budget_bytes``, ``threshold``,
        ``limit_bytes`` (None: unlimited), ``usage_bytes``, ``allocated_bytes``,
        ``entry_bytes``, ``index_bytes``, ``within_budget``.
        """
        reading = self.read()
        index_bytes = index.nbytes()
        allocated = bank.capacity * bank.entry_nbytes() + index_bytes
        usage = bank.size * bank.entry_nbytes() + index_bytes
        used, source, note = reading.used_bytes, reading.source, reading.note
        if used is None:  # nothing to read: the pool's own bytes stand in
            used = allocated
            if source != "pool-bytes":
                note = "; ".join(filter(None, (note, f"{source} gave no used bytes")))
                source = "pool-bytes"
        return {
            "source": source,
            "note": note,
            "device_used_bytes": used,
            "device_total_bytes": reading.total_bytes,
            "budget_bytes": self.budget_bytes,
            "threshold": self.threshold,
            "limit_bytes": self.limit_bytes,
            "usage_bytes": usage,
            "allocated_bytes": allocated,
            "entry_bytes": bank.entry_nbytes(),
            "index_bytes": index_bytes,
            "within_budget": self.limit_bytes is None or usage <= self.limit_bytes,
        }


__all__ = [
    "DEFAULT_THRESHOLD",
    "MIB",
    "CudaMemory",
    "MemoryBudget",
    "MemoryProbe",
    "MemoryReading",
    "NvmlMemory",
    "ProcessMemory",
    "entry_nbytes",
    "fit_capacity",
    "index_nbytes_estimate",
    "open_probe",
    "pci_bus_id",
]
