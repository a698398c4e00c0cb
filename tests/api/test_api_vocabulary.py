"""One name per column, int64 labels and ids, loud gates, sample(n), and the newcomer's errors (issue 23)."""

from __future__ import annotations

import warnings

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


# ------------------------------------------------------------ loud gates
def test_an_add_the_gate_rejects_entirely_warns_once_with_count_threshold_and_fix():
    pool, _ = _pool(0)
    with pytest.warns(UserWarning, match=r"rejected 2 of 2 dreams.*coherence_threshold=0\.75.*force=True"):
        ids = pool.add(torch.rand(2, *SHAPE, 3), coherence=0.5)
    assert ids.tolist() == [-1, -1] and len(pool) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per pool: the second rejection is silent
        pool.add(torch.rand(3, *SHAPE, 3), coherence=0.1)
    other, _ = _pool(0)
    with pytest.warns(UserWarning, match="rejected 1 of 1"):  # another pool warns on its own
        other.add(torch.rand(1, *SHAPE, 3), coherence=0.0)


@pytest.mark.parametrize(
    ("n", "passing", "warns"), [(10, 0, True), (20, 1, True), (10, 1, False), (8, 0, True), (7, 1, False)]
)
def test_the_gate_warns_above_the_documented_share(n, passing, warns):
    from dreampool_gpu.notices import REJECT_MIN_BATCH, REJECT_SHARE

    assert (REJECT_SHARE, REJECT_MIN_BATCH) == (0.9, 8)  # docs/api.md and the README state these
    pool, _ = _pool(0)
    coherence = torch.tensor([1.0] * passing + [0.2] * (n - passing))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = pool.add(torch.rand(n, *SHAPE, 3), coherence=coherence)
    gate = [w for w in caught if issubclass(w.category, UserWarning) and "coherence gate" in str(w.message)]
    assert len(gate) == int(warns) and int((ids >= 0).sum()) == passing
    if warns:
        assert f"rejected {n - passing} of {n}" in str(gate[0].message)
        assert gate[0].filename == __file__  # points at the caller's line


def test_force_and_a_lower_threshold_store_without_a_warning():
    pool, _ = _pool(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert bool((pool.add(torch.rand(4, *SHAPE, 3), force=True) >= 0).all())
        low, _ = _pool(0, coherence_threshold=0.4)
        assert bool((low.add(torch.rand(4, *SHAPE, 3), coherence=0.5) >= 0).all())


def test_the_gate_warning_costs_no_extra_host_read():
    from dreampool_gpu.sync_guard import forbid_host_sync

    pool, _ = _pool(0, checks="deferred")
    with pytest.warns(UserWarning, match="rejected 9 of 9"), forbid_host_sync(allowed=1):
        pool.add(torch.rand(9, *SHAPE, 3), coherence=0.1)


# ------------------------------------------------------------ unfitted learned encoder
def _learned(n: int = 16) -> DreamPool:
    pool = DreamPool(PoolConfig(dream_shape=(8, 8, 1), capacity=64, device="cpu", encoder="learned", num_classes=2))
    pool.add(
        torch.rand(n, 8, 8, 1, 3, generator=torch.Generator().manual_seed(1)),
        force=True,
        class_label=torch.arange(n) % 2,
    )
    return pool


def test_embedding_modes_on_a_never_fitted_learned_encoder_warn_once():
    pool = _learned()
    q = torch.rand(2, 8, 8, 1, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pool.retrieve(q, k=3, mode="similar")  # a chroma mode does not use the encoder
    with pytest.warns(UserWarning, match="never fitted.*fit_encoder"):
        pool.retrieve(q, k=3, mode="nearest")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pool.retrieve(q, k=3, mode="hybrid")  # once per pool


def test_a_fitted_or_reloaded_fitted_learned_encoder_does_not_warn(tmp_path):
    pool = _learned()
    pool.fit_encoder(steps=2, batch_size=8)
    pool.save(tmp_path / "p")
    unfitted = _learned()
    unfitted.save(tmp_path / "u")
    q = torch.rand(2, 8, 8, 1, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pool.retrieve(q, k=3, mode="nearest")
        DreamPool.load(tmp_path / "p").retrieve(q, k=3, mode="nearest")
    with pytest.warns(UserWarning, match="never fitted"):
        DreamPool.load(tmp_path / "u").retrieve(q, k=3, mode="soft")


def test_the_feature_encoder_and_a_given_module_do_not_warn():
    q = torch.rand(2, *SHAPE, 3)
    pool, _ = _pool()
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 3, 64))
    given = DreamPool(PoolConfig(dream_shape=SHAPE, capacity=32, device="cpu"), encoder=module)
    given.add(torch.rand(4, *SHAPE, 3), force=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pool.retrieve(q, k=3, mode="nearest")
        given.retrieve(q, k=3, mode="nearest")


# ------------------------------------------------------------ smaller items
def test_a_misspelt_config_field_is_a_configuration_error_with_a_hint():
    from dreampool_gpu.errors import InvalidConfigurationError

    with pytest.raises(InvalidConfigurationError, match="capcity=10.*did you mean 'capacity'") as caught:
        PoolConfig(capcity=10)
    assert caught.value.field == "capcity"
    with pytest.raises(InvalidConfigurationError, match="did you mean 'coherence_threshold'"):
        PoolConfig().replace(coherence_treshold=0.5)
    with pytest.raises(InvalidConfigurationError, match="did you mean 'embedding_dim'"):
        PoolConfig.from_dict({"embeding_dim": 32})
    with pytest.raises(InvalidConfigurationError, match="zzz") as caught:
        PoolConfig(zzz=1)
    assert "did you mean" not in str(caught.value)
    assert PoolConfig(capacity=10).capacity == 10  # known fields as before


def test_a_missing_coherence_names_the_argument_not_an_internal_class():
    pool, _ = _pool(0)
    with pytest.raises(InvalidInputError, match="coherence.*force=True") as caught:
        pool.add(torch.rand(2, *SHAPE, 3))
    assert "Admission" not in str(caught.value) and len(pool) == 0


def test_loading_a_torch_save_file_points_to_load_state_dict(tmp_path):
    from dreampool_gpu.errors import CheckpointCorruptError

    pool, _ = _pool()
    torch.save(pool.state_dict(), tmp_path / "pool.pt")
    with pytest.raises(CheckpointCorruptError, match="a torch.save file.*load_state_dict"):
        DreamPool.load(tmp_path / "pool.pt")
    restored = DreamPool(pool.config)
    restored.load_state_dict(torch.load(tmp_path / "pool.pt", weights_only=True))  # what the hint says
    assert len(restored) == len(pool)
    (tmp_path / "notes.txt").write_text("not a pool")
    with pytest.raises(CheckpointCorruptError, match="a file, not a checkpoint directory.*load_state_dict"):
        DreamPool.load(tmp_path / "notes.txt")


def test_repr_shows_the_preallocated_memory_beside_the_used():
    import re

    pool, _ = _pool()
    text = repr(pool)
    found = re.search(r"memory=([0-9.]+) MiB used of ([0-9.]+) MiB allocated", text)
    assert found, text
    allocated = (sum(pool.bank.nbytes().values()) + pool.index.nbytes()) / 2**20
    assert float(found.group(2)) == pytest.approx(allocated, abs=0.01)
    assert float(found.group(1)) < float(found.group(2))  # 12 of 32 slots live


def test_loading_a_user_encoder_pool_without_encoder_says_what_to_pass(tmp_path):
    from dreampool_gpu.errors import InvalidConfigurationError

    def module() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 3, 64))

    pool = DreamPool(PoolConfig(dream_shape=SHAPE, capacity=8, device="cpu"), encoder=module())
    pool.add(torch.rand(3, *SHAPE, 3), force=True)
    pool.save(tmp_path / "p")
    with pytest.raises(InvalidConfigurationError, match="no encoder= given.*'module'.*encoder=") as caught:
        DreamPool.load(tmp_path / "p")
    assert "features" not in str(caught.value)  # the user never set it
    assert len(DreamPool.load(tmp_path / "p", encoder=module())) == 3


def test_the_demo_table_comes_with_a_legend_of_its_columns():
    from dreampool_gpu.demo import LEGEND, table

    cells = [c.strip() for c in table([])[0].strip("|").split("|")]
    assert len(cells) == 15
    legend = " ".join(LEGEND)
    phrases = (
        "reached",
        "steps to",
        "seconds to",
        "final accuracy",
        "helpful rate",
        "clean replay",
        "unique / 100 steps",
        "util_mean right / wrong label",
        "train s",
        "pool s",
        "fit s",
        "utility s",
        "pool, utility / train",
        "wall / step vs none",
        "vs random",
    )
    for phrase in phrases:
        assert phrase in legend, phrase
        assert any(phrase in c for c in cells), phrase  # and it is a column of the table


def test_a_bad_label_error_names_the_keyword_the_caller_wrote():
    pool, _ = _pool(0)
    dreams = torch.rand(2, *SHAPE, 3)
    with pytest.raises(InvalidInputError, match="invalid class_label:"):
        pool.add(dreams, coherence=1.0, class_label=[0, 99])
    with pytest.warns(DeprecationWarning), pytest.raises(InvalidInputError, match="invalid class_labels:"):
        pool.add(dreams, coherence=1.0, class_labels=[0, 99])
    assert len(pool) == 0
