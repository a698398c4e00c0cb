"""Device moves of a :class:`~dreampool_gpu.pool.DreamPool`: :meth:`DeviceMove.to`.

:class:`DeviceMove` is mixed into the pool; the move checks the new device can hold the
bank before anything moves, then moves the bank and the encoder and rebuilds the
device-bound parts (search index, memory budget, query cache) there.
"""

from __future__ import annotations

from typing import TypeVar

import torch

from dreampool_gpu.bank import TensorBank
from dreampool_gpu.budget import MemoryBudget, check_allocation, fit_capacity
from dreampool_gpu.cache import QueryCache
from dreampool_gpu.checks import FaultFlag
from dreampool_gpu.config import PoolConfig
from dreampool_gpu.devices import resolve_device
from dreampool_gpu.encoders import Encoder
from dreampool_gpu.errors import InvalidConfigurationError
from dreampool_gpu.search import SearchIndex, make_index
from dreampool_gpu.streams import StreamOrderedLock

M = TypeVar("M", bound="DeviceMove")


class DeviceMove:
    """The device move of :class:`~dreampool_gpu.pool.DreamPool` (a mixin; the pool sets the attributes)."""

    config: PoolConfig
    device: torch.device
    bank: TensorBank
    index: SearchIndex
    cache: QueryCache
    budget: MemoryBudget
    encoder: Encoder
    _embedded_version: int
    _lock: StreamOrderedLock
    _fault: FaultFlag

    def to(self: M, device: str | torch.device) -> M:
        """Move the pool to ``device`` in place and return it (as ``nn.Module.to`` does).

        The bank, encoder and window spectrum move; the search index is rebuilt on
        the new device from the bank; the query cache is emptied (its embeddings were
        on the old device). Entries, ids, counters and the dreams' dtype are kept
        (``dream_dtype="auto"`` is pinned to the stored dtype). On error the pool is
        unchanged.

        Raises:
            DeviceUnavailableError: ``device`` is CUDA and absent.
            InvalidConfigurationError: ``device`` names no device, or the budget
                (``"N%"`` of the new device) cannot hold the bank.
            InsufficientMemoryError: the bank does not fit the new device's free memory.
        """
        with self._lock:
            target = resolve_device(device)
            if target == self.device:
                return self
            dtype = self.bank.columns["dreams"].dtype
            config = self.config.replace(device=str(target), dream_dtype=str(dtype).removeprefix("torch."))
            budget = MemoryBudget(config.memory_budget_mb, device=target, threshold=config.budget_threshold)
            slots = self.bank.capacity  # the resolved capacity: the bank moves whole
            fitted = fit_capacity(
                config.replace(capacity=slots),
                entry_bytes=self.bank.entry_nbytes(),
                budget_bytes=budget.budget_bytes,
                device=target,
            )
            if fitted < slots:
                raise InvalidConfigurationError(
                    "memory_budget_mb",
                    config.memory_budget_mb,
                    f"a budget on {target} holding the pool's {slots} slots",
                )
            check_allocation(config, self.bank.specs, slots, target)
            self.bank.to(target)
            mover = getattr(self.encoder, "to", None)  # optional: the Encoder protocol has no ``to``
            if callable(mover):
                mover(target)
            else:
                for name, value in vars(self.encoder).items():
                    if isinstance(value, torch.Tensor):
                        setattr(self.encoder, name, value.to(target))
            self._embedded_version = self.encoder.version  # a moved module has new parameter tensors
            self.budget.close()
            self.config, self.device, self.budget = config, target, budget
            self.index = make_index(self.bank, config)
            self.index.add(self.bank.slots_by_age())
            self.cache.clear()
            self._fault.to(target)
            return self
