"""DreamPool.to (dreampool_gpu/device_move.py): the move keeps the resolved capacity and the user's config."""

from __future__ import annotations

import torch

from dreampool_gpu import DreamPool, PoolConfig
from dreampool_gpu.checkpointing import build_pool

SHAPE = (2, 2, 1)


def _move_away_and_back(pool: DreamPool) -> DreamPool:
    """The move path on CPU: the pool believes it is elsewhere and comes back (no second device needed)."""
    pool.device = torch.device("cpu", 0)  # any device other than torch.device("cpu")
    return pool.to("cpu")


def test_budget_lowered_pool_keeps_its_capacity_and_config():
    config = PoolConfig(dream_shape=SHAPE, capacity=10_000, memory_budget_mb=0.01, device="cpu", engine="torch")
    pool = DreamPool(config)
    fitted = pool.capacity
    assert fitted < 10_000
    pool.add(torch.rand(fitted + 2, *SHAPE, 3), coherence=torch.ones(fitted + 2))
    ids = pool.retrieve(torch.rand(3, *SHAPE, 3), k=4, mode="similar").ids
    assert _move_away_and_back(pool) is pool
    assert pool.capacity == fitted and pool.config.capacity == 10_000 and len(pool) == fitted
    assert pool.config == config.replace(dream_dtype="float32")  # the move pins the stored dtype, nothing else
    assert pool.retrieve(torch.rand(3, *SHAPE, 3), k=4, mode="similar").ids.shape == ids.shape


def test_pool_holding_more_than_its_config_moves():
    """A merged checkpoint can hold more slots than ``config.capacity``: the move checks the bank's slots."""
    pool = build_pool(DreamPool, PoolConfig(dream_shape=SHAPE, capacity=8, device="cpu", engine="torch"), 12)
    assert pool.capacity == 12 and pool.config.capacity == 8
    pool.add(torch.rand(12, *SHAPE, 3), coherence=torch.ones(12))
    assert _move_away_and_back(pool) is pool
    assert pool.capacity == 12 and pool.config.capacity == 8 and len(pool) == 12
