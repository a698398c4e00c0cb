"""One name per column, int64 labels and ids, loud gates, sample(n), and the newcomer's errors (issue 23)."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from dreampool_gpu import DreamPool, PoolConfig
from dreampool_gpu.columns import WHERE_COLUMNS
from dreampool_gpu.errors import InvalidInputError, UnknownColumnError

SHAPE = (4, 4, 1)


def _pool(n: int = 12, **config) -> tuple[DreamPool, torch.Tensor]:
    pool = DreamPool(PoolConfig(dream_shape=SHAPE, capacity=32, device="cpu", **config))
    g = torch.Generator().manual_seed(0)
    ids = pool.add(torch.rand(n, *SHAPE, 3, generator=g), coherence=1.0, class_label=torch.arange(n) % 3)
    return pool, ids


# ------------------------------------------------------------ int64 labels and ids
def test_metadata_labels_ids_and_counts_are_int64():
    pool, ids = _pool()
    meta = pool.metadata(ids)
    for name in ("ids", "class_label", "hue_category", "usage", "feedback_count"):
        assert meta[name].dtype == torch.int64, name
    assert meta["class_label"].tolist() == (torch.arange(12) % 3).tolist()
    assert meta["found"].dtype == torch.bool


def test_metadata_labels_are_a_cross_entropy_target():
    pool, ids = _pool()
    logits = torch.randn(12, 3, requires_grad=True)
    loss = F.cross_entropy(logits, pool.metadata(ids)["class_label"])
    loss.backward()  # the point: no "expected target dtype Long"
    assert logits.grad is not None


def test_where_callable_gets_int64_labels_under_the_metadata_names():
    pool, ids = _pool()
    seen = {}

    def where(m):
        seen.update({name: m[name] for name in m})
        return m["class_label"] == 1

    hits = pool.retrieve(torch.rand(2, 3), k=12, mode="similar", where=where)
    assert set(seen) == set(WHERE_COLUMNS)
    assert all(seen[name].shape == (pool.capacity,) for name in seen)
    for name in ("ids", "class_label", "hue_category", "usage", "feedback_count"):
        assert seen[name].dtype == torch.int64, name
    assert seen["inserted_at"].dtype == torch.float64
    assert set(hits.ids[hits.mask].tolist()) == set(ids[1::3].tolist())


# ------------------------------------------------------------ one vocabulary
@pytest.mark.parametrize(("old", "new"), [("class", "class_label"), ("hue", "hue_category"), ("id", "ids")])
def test_old_spellings_read_the_column_with_a_deprecation_warning(old, new):
    pool, ids = _pool()
    meta = pool.metadata(ids)
    with pytest.warns(DeprecationWarning, match=f"'{old}' is now called {new}"):
        assert torch.equal(meta[old], meta[new])
    with pytest.warns(DeprecationWarning, match=f"'{old}' is now called {new}"):
        assert torch.equal(meta.get(old), meta[new])
    want = pool.sample(32, where=lambda m: m[new] == m[new][0], replace=False)
    with pytest.warns(DeprecationWarning, match=f"'{old}' is now called {new}"):
        got = pool.sample(32, where=lambda m: m[old] == m[new][0], replace=False)
    assert want.numel() >= 1 and sorted(got.tolist()) == sorted(want.tolist())


def test_old_age_column_is_seconds_since_added_with_a_deprecation_warning():
    pool, ids = _pool()
    with pytest.warns(DeprecationWarning, match="'age'.*inserted_at"):
        hits = pool.retrieve(torch.rand(1, 3), k=20, mode="similar", where=lambda m: m["age"] < 3600.0)
    assert set(hits.ids[hits.mask].tolist()) == set(ids.tolist())
    with pytest.warns(DeprecationWarning):
        age = pool.metadata(ids)["age"]
    assert age.dtype == torch.float32 and bool(((age >= 0) & (age < 3600)).all())


def test_the_names_read_without_any_warning(recwarn):
    pool, ids = _pool()
    meta = pool.metadata(ids)
    _ = [meta[name] for name in ("ids", "class_label", "hue_category", "inserted_at", "found")]
    pool.sample(3, where=lambda m: (m["class_label"] >= 0) & (m["inserted_at"] > 0) & (m["hue_category"] >= 0))
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning)]


def test_unknown_metadata_key_names_the_valid_ones():
    pool, ids = _pool()
    meta = pool.metadata(ids)
    with pytest.raises(UnknownColumnError, match="class_lable.*class_label.*hue_category") as caught:
        meta["class_lable"]
    assert isinstance(caught.value, KeyError) and "found" in caught.value.valid
    assert meta.get("class_lable", 7) == 7


def test_unknown_key_in_a_where_callable_names_the_valid_ones():
    pool, _ = _pool()
    with pytest.raises(InvalidInputError, match="UnknownColumnError.*'labels'.*class_label.*inserted_at"):
        pool.retrieve(torch.rand(1, 3), k=2, mode="similar", where=lambda m: m["labels"] == 1)
    with pytest.raises(InvalidInputError, match="'labels'.*class_label"):
        pool.sample(2, where=lambda m: m["labels"] == 1)


def test_add_takes_class_label_and_the_old_class_labels_with_a_warning():
    pool, _ = _pool(0)
    dreams = torch.rand(3, *SHAPE, 3)
    with pytest.warns(DeprecationWarning, match="class_labels= is now called class_label="):
        ids = pool.add(dreams, coherence=1.0, class_labels=torch.tensor([2, 0, 1]))
    assert pool.metadata(ids)["class_label"].tolist() == [2, 0, 1]
    before = len(pool)
    with pytest.raises(InvalidInputError, match="class_labels"):
        pool.add(dreams, coherence=1.0, class_label=[0, 0, 0], class_labels=[1, 1, 1])
    with pytest.raises(InvalidInputError, match="class_label"):
        pool.add(dreams, coherence=1.0, class_label=[0, 10, 0])  # num_classes is 10
    assert len(pool) == before
