"""Issue-15 regressions (adversarial run, new-user trial): adding to the bank."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _hardening import (
    dreams,
    make_pool,
)

from dreampool_gpu.errors import (
    CapacityExceededError,
    InvalidInputError,
)


# ------------------------------------------------------------------ item 5
def test_ids_exhausted_is_typed_and_leaves_the_pool_unchanged():
    pool = make_pool(n=4)
    pool.bank.next_id = torch.iinfo(torch.int64).max - 1  # as a forged checkpoint could leave it
    counters = dict(pool.counters)
    with pytest.raises(CapacityExceededError, match="ids exhausted"):
        pool.add(dreams(2), coherence=torch.ones(2))
    assert pool.counters == counters and len(pool) == 4
    ids = pool.add(dreams(1), coherence=torch.ones(1))  # exactly the id that is left
    assert ids.tolist() == [2**63 - 2] and pool.bank.next_id == 2**63 - 1


# ------------------------------------------------------------------ item 6
def test_force_must_be_a_bool():
    pool = make_pool(n=2)
    with pytest.raises(InvalidInputError, match="force"):
        pool.add(dreams(2), coherence=torch.ones(2), force=torch.tensor([True, False]))
    assert len(pool) == 2
    assert int((pool.add(dreams(1), coherence=0.0, force=torch.tensor(True)) >= 0).sum()) == 1
    assert int((pool.add(dreams(1), coherence=0.0, force=np.bool_(True)) >= 0).sum()) == 1


# ------------------------------------------------------------------ item 8
def test_coherence_none_is_refused_without_force():
    pool = make_pool(n=2)
    with pytest.raises(InvalidInputError, match="coherence.*force=True"):
        pool.add(dreams(2), coherence=None)
    assert len(pool) == 2 and pool.counters["rejected"] == 0


def test_coherence_defaults_to_one_with_force():
    pool = make_pool(n=2)
    ids = pool.add(dreams(2), force=True)
    assert len(pool) == 4 and pool.metadata(ids)["coherence"].tolist() == [1.0, 1.0]
