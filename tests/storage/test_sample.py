"""pool.sample: the replay draw of a training loop (uniform, with or without replacement, under a filter)."""

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
        class_label=torch.arange(n) % 3,
    )
    return pool, ids


def test_draws_come_from_the_filtered_live_entries():
    pool, ids = pool_of(20)
    draw = pool.sample(500, where=lambda m: m["class_label"] == 1, generator=torch.Generator().manual_seed(3))
    assert draw.shape == (500,)  # with replacement: exactly n, from the 7 entries of class 1
    assert set(draw.tolist()) == set(ids[1::3].tolist())  # 500 draws of 7 miss none (p ~ 7 * (6/7)^500)


def test_with_replacement_returns_exactly_n_and_draws_repeat():
    pool, ids = pool_of(3)
    draw = pool.sample(15, generator=torch.Generator().manual_seed(1))
    assert draw.shape == (15,) and set(draw.tolist()) <= set(ids.tolist())  # more than the 3 stored
    pool, ids = pool_of(20)
    many = pool.sample(20, generator=torch.Generator().manual_seed(1))
    assert many.shape == (20,) and len(set(many.tolist())) < 20  # 20 uniform draws of 20 repeat (p ~ 1 - 2e-8)


def test_without_replacement_returns_min_n_m_distinct_ids():
    pool, ids = pool_of(20)
    few = pool.sample(8, replace=False, generator=torch.Generator().manual_seed(2))
    assert few.shape == (8,) and len(set(few.tolist())) == 8 and set(few.tolist()) <= set(ids.tolist())
    every = pool.sample(500, where=lambda m: m["class_label"] == 1, replace=False)
    assert sorted(every.tolist()) == sorted(ids[1::3].tolist())  # all 7, once each


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
    for replace in (True, False):
        assert pool.sample(4, where=torch.zeros(32, dtype=torch.bool), replace=replace).shape == (0,)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"n": -1}, InvalidInputError),
        ({"n": 2.0}, InvalidInputError),
        ({"n": 2, "generator": 3}, InvalidInputError),
        ({"n": 2, "replace": 1}, InvalidInputError),
        ({"n": 2, "where": torch.ones(5, dtype=torch.bool)}, DimensionMismatchError),
    ],
)
def test_bad_arguments(kwargs, error):
    pool, _ = pool_of(5)
    with pytest.raises(error, match=next(iter(k for k in kwargs if k != "n"), "n")):
        pool.sample(**kwargs)
