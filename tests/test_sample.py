"""pool.sample: the replay draw of a training loop (uniform, with replacement, under a filter)."""

from __future__ import annotations

import pytest
import torch

from dreampool_gpu import DreamPool, PoolConfig
from dreampool_gpu.errors import DimensionMismatchError, InvalidInputError

SHAPE = (3, 3, 1)


def pool_of(n: int) -> tuple[DreamPool, torch.Tensor]:
    pool = DreamPool(PoolConfig(dream_shape=SHAPE, capacity=32, device="cpu"))
    ids = pool.add(
        torch.rand(n, *SHAPE, 3, generator=torch.Generator().manual_seed(0)),
        coherence=torch.ones(n),
        class_labels=torch.arange(n) % 3,
    )
    return pool, ids


def test_draws_come_from_the_filtered_live_entries():
    pool, ids = pool_of(20)
    draw = pool.sample(500, where=lambda m: m["class"] == 1, generator=torch.Generator().manual_seed(3))
    assert draw.shape == (7,)  # min(n, m): 7 entries of class 1 qualify
    assert set(draw.tolist()) <= set(ids[1::3].tolist())


def test_count_is_min_of_n_and_qualifying_and_draws_repeat():
    pool, ids = pool_of(20)
    draw = pool.sample(15, generator=torch.Generator().manual_seed(1))
    assert draw.shape == (15,) and set(draw.tolist()) <= set(ids.tolist())
    many = pool.sample(20, generator=torch.Generator().manual_seed(1))
    assert len(set(many.tolist())) < 20  # with replacement: 20 uniform draws of 20 repeat (p ~ 1 - 2e-8)


def test_seeded_draws_repeat_and_follow_age_order():
    pool, ids = pool_of(12)
    a = pool.sample(8, generator=torch.Generator().manual_seed(5))
    b = pool.sample(8, generator=torch.Generator().manual_seed(5))
    want = ids[torch.randint(12, (8,), generator=torch.Generator().manual_seed(5))]
    assert torch.equal(a, b) and torch.equal(a, want)


def test_empty_pool_or_filter_gives_no_draws():
    pool, _ = pool_of(0)
    assert pool.sample(4).shape == (0,)
    pool, _ = pool_of(5)
    assert pool.sample(4, where=torch.zeros(32, dtype=torch.bool)).shape == (0,)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"n": -1}, InvalidInputError),
        ({"n": 2.0}, InvalidInputError),
        ({"n": 2, "generator": 3}, InvalidInputError),
        ({"n": 2, "where": torch.ones(5, dtype=torch.bool)}, DimensionMismatchError),
    ],
)
def test_bad_arguments(kwargs, error):
    pool, _ = pool_of(5)
    with pytest.raises(error, match=next(iter(k for k in kwargs if k != "n"), "n")):
        pool.sample(**kwargs)
