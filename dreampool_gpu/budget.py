"""Eviction: which entries leave first when the pool needs room."""

from __future__ import annotations

import torch

from dreampool_gpu.bank import TensorBank
from dreampool_gpu.config import EvictionPolicy


def eviction_order(bank: TensorBank, policy: EvictionPolicy) -> torch.Tensor:
    """``[size]`` int64 slots of live entries, first to leave first.

    fifo: oldest first. lowest_coherence / lowest_utility (running mean of
    feedback; entries without feedback count as 0) / least_used: lowest value
    first, ties oldest first.
    """
    by_age = bank.slots_by_age()
    if policy is EvictionPolicy.FIFO:
        return by_age
    column = {
        EvictionPolicy.LOWEST_COHERENCE: "coherence",
        EvictionPolicy.LOWEST_UTILITY: "util_mean",
        EvictionPolicy.LEAST_USED: "usage",
    }[policy]
    key = bank.columns[column][by_age]
    return by_age[torch.sort(key, stable=True).indices]
