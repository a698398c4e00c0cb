"""Device moves of a pool's parts (``DreamPool.to``).

:func:`moved` checks the new device can hold the bank before anything moves, then moves
the bank, the encoder and the fault flag, and builds the device-bound parts (search index,
memory budget, query cache) there with :func:`~dreampool_gpu.parts.build_parts`.
"""

from __future__ import annotations

import torch

from dreampool_gpu.budget import MemoryBudget, check_allocation, fit_capacity
from dreampool_gpu.devices import resolve_device
from dreampool_gpu.errors import InvalidConfigurationError
from dreampool_gpu.parts import PoolParts, build_parts


def moved(parts: PoolParts, device: str | torch.device) -> PoolParts:
    """``parts`` on ``device``: ``parts`` itself when already there, else the moved parts
    (the caller holds the pool's lock; see :meth:`DreamPool.to` for what moves and what raises).
    On error nothing has moved."""
    target = resolve_device(device)
    if target == parts.device:
        return parts
    bank = parts.bank
    dtype = bank.columns["dreams"].dtype
    config = parts.config.replace(device=str(target), dream_dtype=str(dtype).removeprefix("torch."))
    budget = MemoryBudget(config.memory_budget_mb, device=target, threshold=config.budget_threshold)
    slots = bank.capacity  # the resolved capacity: the bank moves whole
    fitted = fit_capacity(
        config.replace(capacity=slots), entry_bytes=bank.entry_nbytes(), budget_bytes=budget.budget_bytes, device=target
    )
    if fitted < slots:
        raise InvalidConfigurationError(
            "memory_budget_mb",
            config.memory_budget_mb,
            f"a budget on {target} holding the pool's {slots} slots",
        )
    check_allocation(config, bank.specs, slots, target)
    bank.to(target)
    encoder = parts.encoder
    mover = getattr(encoder, "to", None)  # optional: the Encoder protocol has no ``to``
    if callable(mover):
        mover(target)
    else:
        for name, value in vars(encoder).items():
            if isinstance(value, torch.Tensor):
                setattr(encoder, name, value.to(target))
    parts.budget.close()
    parts.fault.to(target)
    # a moved module has new parameter tensors: the new slot records the encoder's version as embedded
    return build_parts(config, parts.lock, moved=parts, budget=budget)
