"""A pool pickles through its state dict: ``copy.deepcopy``, ``copy.copy``, ``pickle``, ``torch.save(pool)``.

Each copy is a new pool with the same entries, ids, counters, encoder and eviction state,
sharing nothing with the original: the same calls on both answer alike, and calls on one
leave the other as it was.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn

from dreampool_gpu import DreamPool, PoolConfig
from dreampool_gpu.eviction import Reservoir

SHAPE = (4, 4, 1)


class OwnReservoir(Reservoir):
    """A user's policy: a subclass the configuration does not name."""


def _torch_round_trip(pool: DreamPool) -> DreamPool:
    buffer = io.BytesIO()
    torch.save(pool, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


COPIES = {
    "deepcopy": copy.deepcopy,
    "copy": copy.copy,
    "pickle": lambda pool: pickle.loads(pickle.dumps(pool)),
    "torch.save": _torch_round_trip,
}


def _pool(policy: str, encoder: str) -> DreamPool:
    config = PoolConfig(
        dream_shape=SHAPE,
        capacity=24,
        device="cpu",
        coherence_threshold=0.0,
        eviction_policy="reservoir" if policy == "own" else policy,
        encoder="learned" if encoder == "learned" else "features",
        columns={"logits": ((3,), "float32")},
    )
    module = nn.Sequential(nn.Flatten(), nn.Linear(48, config.embedding_dim)) if encoder == "module" else None
    pool = DreamPool(config, encoder=module, eviction=OwnReservoir(seed=5) if policy == "own" else None)
    g = torch.Generator().manual_seed(0)
    pool.add(
        torch.rand(40, *SHAPE, 3, generator=g),
        coherence=torch.rand(40, generator=g),
        class_label=torch.randint(0, 10, (40,), generator=g),
        columns={"logits": torch.randn(40, 3, generator=g)},
    )
    pool.feedback(pool.sample(8, generator=g), torch.rand(8, generator=g))
    if encoder == "learned":
        pool.fit_encoder(steps=2, batch_size=16, seed=1)
    return pool


def _answers(pool: DreamPool, seed: int) -> dict[str, torch.Tensor]:
    """What a training loop reads and writes: an add, a seeded sample, metadata, a hybrid retrieve."""
    g = torch.Generator().manual_seed(seed)
    dreams = torch.rand(10, *SHAPE, 3, generator=g)
    added = pool.add(dreams, coherence=1.0, class_label=torch.randint(0, 10, (10,), generator=g))
    drawn = pool.sample(6, generator=g)
    found = pool.retrieve(dreams[:3], k=4, mode="hybrid")
    columns = pool.metadata(pool.bank.ids_by_age())
    return {"added": added, "drawn": drawn, "ids": found.ids, "scores": found.scores, **columns}


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize(
    "policy,encoder",
    [("fifo", "features"), ("reservoir", "features"), ("class_balanced", "features"), ("own", "module")],
)
def test_a_copy_answers_as_the_original_and_shares_nothing(how, policy, encoder):
    pool = _pool(policy, encoder)
    twin = COPIES[how](pool)
    assert twin is not pool and twin.bank is not pool.bank and twin.parts.encoder is not pool.parts.encoder
    assert type(twin.parts.eviction) is type(pool.parts.eviction) and type(twin) is DreamPool
    before = {name: t.clone() for name, t in pool.metadata(pool.bank.ids_by_age()).items()}
    mine = _answers(twin, seed=7)  # the copy moves on: the original is as it was
    after = pool.metadata(pool.bank.ids_by_age())
    for name, t in before.items():
        assert torch.equal(after[name].nan_to_num(-7), t.nan_to_num(-7)), name
    theirs = _answers(pool, seed=7)  # the same calls on the original answer alike
    for name, t in theirs.items():
        if t.is_floating_point():
            torch.testing.assert_close(mine[name], t, equal_nan=True, msg=name)
        else:
            assert torch.equal(mine[name], t), name
    assert twin.stats()["added"] == pool.stats()["added"]


def test_a_fitted_learned_encoder_copies_fitted():
    pool = _pool("fifo", "learned")
    twin = copy.deepcopy(pool)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "never fitted" notice on the copy
        got = twin.retrieve(torch.rand(2, *SHAPE, 3), k=3, mode="nearest")
    assert got.ids.shape == (2, 3)
    for name, t in pool.parts.encoder.state_dict().items():
        assert torch.equal(twin.parts.encoder.state_dict()[name], t), name
