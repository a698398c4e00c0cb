"""User columns (issue 23): declared in PoolConfig, written by add and update, read by metadata and where=.

Checked like every input (a refused call leaves the pool as it was), counted by the memory
budget, carried by state_dict and checkpoints (format 3; older checkpoints still load),
aligned with their entries through eviction, and never a reason to compute features.
"""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
import yaml

from dreampool_gpu import DreamPool, PoolConfig
from dreampool_gpu.bank import column_specs
from dreampool_gpu.errors import (
    CheckpointCorruptError,
    DimensionMismatchError,
    InvalidConfigurationError,
    InvalidInputError,
    UnknownColumnError,
)
from dreampool_gpu.persist import CONFIG, MANIFEST
from dreampool_gpu.user_columns import RESERVED, UserColumns

SHAPE = (4, 4, 2)
COLUMNS = {"logits": ((10,), "float32"), "task": ((), "int64")}


def make_pool(capacity: int = 16, columns=COLUMNS, **overrides) -> DreamPool:
    return DreamPool(PoolConfig(dream_shape=SHAPE, capacity=capacity, device="cpu", columns=columns, **overrides))


def dreams(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, *SHAPE, 3, generator=torch.Generator().manual_seed(seed))


def tag_of(x: torch.Tensor) -> torch.Tensor:
    """``[N]`` int64 that follows from each dream (its first value, scaled)."""
    return (x.reshape(x.shape[0], -1)[:, 0] * 1e6).long()


def logits_of(x: torch.Tensor) -> torch.Tensor:
    """``[N, 10]`` logits that follow from each dream (its first ten values): rows stay checkable after churn."""
    return x.reshape(x.shape[0], -1)[:, :10] * 4 - 2


def state_of(pool: DreamPool) -> dict[str, torch.Tensor]:
    """Every bank column and counter, copied: to prove a refused call changed nothing."""
    out = {name: t.clone() for name, t in pool.bank.raw.items() if name != "inserted_at"}
    out["_counters"] = torch.tensor([pool.bank.size, pool.bank.next_id, *pool.counters.values()])
    return out


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name].nan_to_num(), b[name].nan_to_num()), name


# ------------------------------------------------------------------ config
class TestConfig:
    def test_declared_and_normalised(self):
        cfg = PoolConfig(columns={"task": [[], "int64"], "logits": {"shape": [10], "dtype": "float32"}})
        assert cfg.columns == COLUMNS
        assert list(cfg.columns) == ["logits", "task"]  # one order, whatever the declaration's
        assert isinstance(cfg.columns, UserColumns)
        assert hash(cfg) == hash(PoolConfig(columns=COLUMNS)) and cfg == PoolConfig(columns=COLUMNS)
        assert PoolConfig().columns == {} and PoolConfig(columns=None).columns == {}

    def test_dict_json_yaml_round_trip(self, tmp_path):
        cfg = PoolConfig(columns={**COLUMNS, "mask": ((2, 3), "bool"), "h": ((0,), "bfloat16")})
        data = json.loads(json.dumps(cfg.to_dict()))
        assert data["columns"]["logits"] == [[10], "float32"]
        assert PoolConfig.from_dict(data) == cfg
        path = tmp_path / "c.yaml"
        path.write_text("capacity: 50\ncolumns:\n  logits: [[10], float32]\n  task: {shape: [], dtype: int64}\n")
        assert PoolConfig.from_file(path).columns == COLUMNS
        path.write_text(yaml.safe_dump(cfg.to_dict()))
        assert PoolConfig.from_file(path) == cfg

    @pytest.mark.parametrize(
        "columns, named",
        [
            ({"class_label": ((), "int64")}, "columns"),  # the bank's own column
            ({"found": ((), "bool")}, "columns"),  # metadata's own key
            ({"age": ((), "float32")}, "columns"),  # an old spelling
            ({"not an identifier": ((), "int64")}, "columns"),
            ({"lambda": ((), "int64")}, "columns"),  # a keyword: update(ids, lambda=...) cannot be written
            ({3: ((), "int64")}, "columns"),
            ({"x": ((-1,), "float32")}, "columns['x']"),
            ({"x": ((2.0,), "float32")}, "columns['x']"),
            ({"x": ((True,), "float32")}, "columns['x']"),
            ({"x": ("10", "float32")}, "columns['x']"),
            ({"x": ((10,), "float64")}, "columns['x']"),
            ({"x": ((10,), torch.float32)}, "columns['x']"),
            ({"x": ((10,),)}, "columns['x']"),
            ({"x": "float32"}, "columns['x']"),
            ([("x", (), "int64")], "columns"),
        ],
    )
    def test_refused(self, columns, named):
        with pytest.raises(InvalidConfigurationError) as exc:
            PoolConfig(columns=columns)
        assert exc.value.field == named

    def test_every_bank_column_is_reserved(self):
        assert set(column_specs(SHAPE, 8, torch.float32)) <= RESERVED


# ------------------------------------------------------------ add/metadata
class TestAddAndRead:
    def test_round_trip(self):
        pool = make_pool()
        x = dreams(6)
        logits = logits_of(x)
        task = torch.tensor([0, 1, 1, 2, 2, 2])
        ids = pool.add(x, force=True, class_label=torch.arange(6), columns={"logits": logits, "task": task})
        m = pool.metadata(ids)
        assert torch.equal(m["logits"], logits) and m["logits"].dtype == torch.float32
        assert torch.equal(m["task"], task) and m["task"].dtype == torch.int64
        assert torch.equal(m["class_label"], torch.arange(6))
        only = pool.metadata(ids[[2, 0]], columns=("logits",))
        assert set(only) == {"logits", "found"} and torch.equal(only["logits"], logits[[2, 0]])
        # a cross_entropy target and its logits as they come
        loss = torch.nn.functional.cross_entropy(m["logits"], m["class_label"])
        assert torch.isfinite(loss)

    def test_missing_columns_get_fill_and_broadcast(self):
        pool = make_pool(columns={**COLUMNS, "seen": ((), "bool"), "soft": ((3,), "float16")})
        ids = pool.add(dreams(3), force=True, columns={"task": 5})
        m = pool.metadata(ids)
        assert torch.equal(m["task"], torch.full((3,), 5))
        assert torch.equal(m["logits"], torch.zeros(3, 10))
        assert m["seen"].dtype == torch.bool and not bool(m["seen"].any())
        assert m["soft"].dtype == torch.float16 and torch.equal(m["soft"], torch.zeros(3, 3, dtype=torch.float16))
        ids2 = pool.add(dreams(2, 1), force=True, columns={"seen": [True, False], "soft": [[1, 2, 3], [4, 5, 6]]})
        m2 = pool.metadata(ids2)
        assert m2["seen"].tolist() == [True, False] and m2["soft"].tolist() == [[1, 2, 3], [4, 5, 6]]
        absent = pool.metadata(torch.tensor([-1]))
        assert not bool(absent["found"][0]) and int(absent["task"][0]) == 0

    def test_only_kept_rows_written(self):
        pool = make_pool()
        coherence = torch.tensor([0.9, 0.1, 0.95, 0.2])
        task = torch.tensor([10, 11, 12, 13])
        ids = pool.add(dreams(4), coherence=coherence, columns={"task": task})
        assert ids[1] == -1 and ids[3] == -1 and len(pool) == 2
        assert pool.metadata(ids[[0, 2]])["task"].tolist() == [10, 12]

    def test_where_sample_and_retrieve(self):
        pool = make_pool()
        task = torch.tensor([0, 1, 0, 1, 1, 0, 1, 1])
        ids = pool.add(dreams(8), force=True, columns={"task": task, "logits": logits_of(dreams(8))})
        seen = []

        def second_task(m):
            seen.append(m["logits"].shape)
            return m["task"] == 1

        drawn = pool.sample(64, where=second_task, generator=torch.Generator().manual_seed(0))
        assert seen == [(16, 10)]  # [capacity, *shape]
        assert set(drawn.tolist()) <= set(ids[task == 1].tolist())
        hits = pool.retrieve(dreams(2, 5), k=8, mode="nearest", where=lambda m: m["task"] == 0)
        found = hits.ids[hits.ids >= 0]
        assert found.numel() == 2 * 3 and set(found.tolist()) <= set(ids[task == 0].tolist())
        with pytest.raises(InvalidInputError, match="task_id"):  # a wrong key names the columns
            pool.sample(1, where=lambda m: m["task_id"] == 0)
        with pytest.raises(UnknownColumnError, match="logits"):
            pool.metadata(ids)["task_id"]

    @pytest.mark.parametrize(
        "columns, error, named",
        [
            ({"logits": torch.zeros(5, 9)}, DimensionMismatchError, "columns['logits']"),
            ({"logits": torch.zeros(4, 10)}, DimensionMismatchError, "columns['logits']"),
            ({"task": torch.tensor([0.0, 1, 2, 3, 4])}, InvalidInputError, "columns['task']"),
            ({"task": torch.zeros(5, dtype=torch.complex64)}, InvalidInputError, "columns['task']"),
            ({"logits": torch.full((5, 10), math.nan)}, InvalidInputError, "columns['logits']"),
            ({"logits": torch.full((5, 10), math.inf)}, InvalidInputError, "columns['logits']"),
            ({"logit": torch.zeros(5, 10)}, InvalidInputError, "columns"),
            ({"class_label": torch.zeros(5)}, InvalidInputError, "columns"),
            ([torch.zeros(5, 10)], InvalidInputError, "columns"),
            ({"task": "three"}, InvalidInputError, "columns['task']"),
        ],
    )
    def test_bad_input_leaves_pool_unchanged(self, columns, error, named):
        pool = make_pool(capacity=6)
        pool.add(dreams(6), force=True, columns={"task": 7})  # full: a bad add must not evict
        before = state_of(pool)
        with pytest.raises(error) as exc:
            pool.add(dreams(5, 1), force=True, columns=columns)
        assert exc.value.name == named if isinstance(exc.value, InvalidInputError) else named in str(exc.value)
        assert_same_state(before, state_of(pool))

    def test_int32_column_refuses_overflow(self):
        pool = make_pool(columns={"step": ((), "int32")})
        with pytest.raises(InvalidInputError, match="int32"):
            pool.add(dreams(2), force=True, columns={"step": torch.tensor([1, 2**40])})
        assert len(pool) == 0
        ids = pool.add(dreams(2), force=True, columns={"step": torch.tensor([1, 2**31 - 1])})
        m = pool.metadata(ids)
        assert m["step"].tolist() == [1, 2**31 - 1] and m["step"].dtype == torch.int64  # integers come back int64

    def test_half_column_refuses_overflow(self):
        pool = make_pool(columns={"soft": ((2,), "float16"), "wide": ((), "bfloat16")})
        for bad in ({"soft": torch.tensor([[1.0, 7e4], [0.0, 0.0]])}, {"soft": torch.tensor([[1, 70000], [0, 0]])}):
            with pytest.raises(InvalidInputError, match="soft"):
                pool.add(dreams(2), force=True, columns=bad)
        with pytest.raises(InvalidInputError, match="wide"):
            pool.add(dreams(2), force=True, columns={"wide": torch.tensor([1e300, 0.0], dtype=torch.float64)})
        assert len(pool) == 0
        ids = pool.add(dreams(2), force=True, columns={"soft": [[65504.0, -1.0], [0.5, 2]], "wide": [1e38, 0]})
        m = pool.metadata(ids)
        assert m["soft"].tolist() == [[65504.0, -1.0], [0.5, 2.0]] and bool(torch.isfinite(m["wide"]).all())

    def test_pool_without_columns_refuses_them(self):
        pool = make_pool(columns=None)
        with pytest.raises(InvalidInputError, match="declare them"):
            pool.add(dreams(1), force=True, columns={"task": 1})
        assert len(pool) == 0


# ------------------------------------------------------------------ update
class TestUpdate:
    def test_writes_by_id(self):
        pool = make_pool()
        x = dreams(5)
        ids = pool.add(x, force=True, columns={"task": 1})
        new = torch.randn(2, 3, 10)
        which = torch.stack([ids[:3], torch.tensor([ids[3], -1, ids[4]])])
        assert pool.update(which, logits=new, task=torch.tensor([[2, 3, 4], [5, 6, 7]])) == 5
        m = pool.metadata(ids)
        assert torch.equal(m["logits"], new.reshape(6, 10)[[0, 1, 2, 3, 5]])
        assert m["task"].tolist() == [2, 3, 4, 5, 7]
        assert pool.update(ids[:2], task=9) == 2 and pool.metadata(ids)["task"].tolist() == [9, 9, 4, 5, 7]
        assert torch.equal(pool.metadata(ids)["logits"], new.reshape(6, 10)[[0, 1, 2, 3, 5]])  # not named: kept

    def test_repeated_ids_last_value_wins(self):
        pool = make_pool()
        ids = pool.add(dreams(3), force=True)
        which = torch.tensor([ids[1], ids[0], ids[1], ids[1], -1, ids[2]])
        assert pool.update(which, task=torch.tensor([1, 2, 3, 4, 5, 6])) == 5
        assert pool.metadata(ids)["task"].tolist() == [2, 4, 6]

    def test_evicted_skipped_and_unknown_refused(self):
        pool = make_pool(capacity=4)
        old = pool.add(dreams(4), force=True, columns={"task": 1})
        new = pool.add(dreams(2, 1), force=True, columns={"task": 2})  # evicts old[:2] (fifo)
        assert pool.update(torch.cat([old, new]), task=torch.arange(6)) == 4
        assert pool.metadata(torch.cat([old[2:], new]))["task"].tolist() == [2, 3, 4, 5]
        before = state_of(pool)
        for bad_ids in (torch.tensor([new[0], 99]), torch.tensor([-2])):
            with pytest.raises(InvalidInputError, match="issued"):
                pool.update(bad_ids, task=0)
        assert_same_state(before, state_of(pool))

    @pytest.mark.parametrize(
        "kwargs, error, named",
        [
            ({"logits": torch.full((2, 10), math.nan)}, InvalidInputError, "logits"),
            ({"logits": torch.zeros(2, 9)}, DimensionMismatchError, "logits"),
            ({"logits": torch.zeros(10)}, DimensionMismatchError, "logits"),
            ({"task": torch.tensor([0.5, 1.5])}, InvalidInputError, "task"),
            ({"utility": torch.zeros(2)}, InvalidInputError, "utility"),  # not a user column
            ({"tasks": torch.zeros(2, dtype=torch.int64)}, InvalidInputError, "tasks"),
            ({}, InvalidInputError, "columns"),
        ],
    )
    def test_bad_values_leave_pool_unchanged(self, kwargs, error, named):
        pool = make_pool()
        ids = pool.add(dreams(3), force=True, columns={"task": 4, "logits": torch.ones(3, 10)})
        before = state_of(pool)
        good = {"task": torch.tensor([8, 9])}
        with pytest.raises(error) as exc:
            pool.update(ids[:2], **{**good, **kwargs} if kwargs else {})
        assert named in str(exc.value)
        assert_same_state(before, state_of(pool))

    def test_empty_ids(self):
        pool = make_pool()
        pool.add(dreams(2), force=True)
        assert pool.update([], task=torch.empty(0, dtype=torch.int64)) == 0


# ------------------------------------------------------------------ budget
def test_budget_counts_user_columns():
    plain, wide = make_pool(columns=None), make_pool(columns={**COLUMNS, "seen": ((), "bool")})
    assert wide.bank.entry_nbytes() - plain.bank.entry_nbytes() == 10 * 4 + 8 + 1
    assert wide.bank.nbytes()["logits"] == 16 * 10 * 4
    budget = 4 * plain.bank.entry_nbytes() * 100 / 2**20  # about 400 plain slots
    cfg = dict(dream_shape=SHAPE, capacity=None, device="cpu", memory_budget_mb=budget, budget_threshold=1.0)
    small = DreamPool(PoolConfig(**cfg))
    big = DreamPool(PoolConfig(**cfg, columns={"x": ((256,), "float32")}))
    assert big.capacity < small.capacity
    assert big.capacity * big.bank.entry_nbytes() <= budget * 2**20
    stats = wide.stats().to_dict()
    assert stats["bytes_by_column"]["logits"] == 16 * 10 * 4 and stats["bytes_by_column"]["seen"] == 16
    assert stats["bank_bytes"] == 16 * wide.bank.entry_nbytes()


# ------------------------------------------------------------ checkpoints
def filled_pool(policy: str = "fifo") -> tuple[DreamPool, torch.Tensor]:
    pool = make_pool(capacity=8, eviction_policy=policy, columns={**COLUMNS, "seen": ((), "bool")})
    x = dreams(12)
    ids = pool.add(
        x, force=True, columns={"logits": logits_of(x), "task": torch.arange(12), "seen": torch.arange(12) % 2 == 0}
    )
    pool.update(ids[ids >= 0][:3], task=-5)
    return pool, ids


def assert_same_columns(a: DreamPool, b: DreamPool, ids: torch.Tensor) -> None:
    ma, mb = a.metadata(ids), b.metadata(ids)
    for name in ("logits", "task", "seen", "ids", "class_label"):
        assert torch.equal(ma[name], mb[name]), name


class TestCheckpoints:
    def test_state_dict_round_trip(self):
        pool, ids = filled_pool()
        sd = pool.state_dict()
        assert set(COLUMNS) <= set(sd["bank"])
        fresh = DreamPool(pool.config)
        fresh.load_state_dict(sd)
        assert_same_columns(pool, fresh, ids)
        for name in ("logits", "task", "seen"):
            assert torch.equal(fresh.bank.raw[name], pool.bank.raw[name])
        other = make_pool(capacity=8, columns={"logits": ((10,), "float32")})
        with pytest.raises(InvalidConfigurationError, match="columns"):
            other.load_state_dict(sd)

    def test_torch_save_round_trip(self, tmp_path):
        pool, ids = filled_pool()
        torch.save(pool.state_dict(), tmp_path / "sd.pt")
        fresh = DreamPool(pool.config)
        fresh.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
        assert_same_columns(pool, fresh, ids)

    def test_save_load(self, tmp_path):
        pool, ids = filled_pool("reservoir")
        pool.save(tmp_path / "ck")
        loaded = DreamPool.load(tmp_path / "ck")
        assert loaded.config == pool.config and loaded.config.columns == pool.config.columns
        assert_same_columns(pool, loaded, ids)
        assert json.loads((tmp_path / "ck" / MANIFEST).read_text())["format_version"] == 3

    def test_config_declaring_missing_column_is_corrupt(self, tmp_path):
        pool, _ = make_pool(capacity=8, columns=None), None
        pool.add(dreams(3), force=True)
        pool.save(tmp_path / "ck")
        config = pool.config.replace(columns=COLUMNS).to_dict()
        rewrite(tmp_path / "ck", CONFIG, json.dumps(config).encode())
        with pytest.raises(CheckpointCorruptError, match="bank.safetensors"):
            DreamPool.load(tmp_path / "ck")

    @pytest.mark.parametrize("version", [2, 1])
    def test_older_checkpoint_without_columns_loads(self, tmp_path, version):
        pool = make_pool(capacity=8, columns=None)
        ids = pool.add(dreams(5), force=True, class_label=torch.arange(5))
        pool.save(tmp_path / "ck")
        ck = tmp_path / "ck"
        config = pool.config.to_dict()
        del config["columns"]  # what a format-2 writer left: no such field
        rewrite(ck, CONFIG, json.dumps(config).encode())
        manifest = json.loads((ck / MANIFEST).read_bytes())
        if version == 1:  # no encoder state either: the bank is re-embedded on load
            (ck / "encoder.safetensors").unlink()
            del manifest["files"]["encoder.safetensors"]
        manifest["format_version"] = version
        resign(ck, manifest)
        loaded = DreamPool.load(ck)
        assert loaded.config.columns == {} and len(loaded) == 5
        assert torch.equal(loaded.metadata(ids)["class_label"], torch.arange(5))
        sd = pool.state_dict()  # the state-dict form of a format-2 pool
        sd["format_version"], sd["config"] = 2, config
        fresh = make_pool(capacity=8, columns=None)
        fresh.load_state_dict(sd)
        assert len(fresh) == 5

    def test_old_format_declaring_columns_refused(self):
        pool, _ = filled_pool()
        sd = pool.state_dict()
        sd["format_version"] = 2
        with pytest.raises(InvalidInputError, match="no user columns in a format-2"):
            DreamPool(pool.config).load_state_dict(sd)


def rewrite(ck, name, data):
    """Replace one checkpoint file and sign the manifest again (a consistent checkpoint written elsewhere)."""
    (ck / name).write_bytes(data)
    manifest = json.loads((ck / MANIFEST).read_bytes())
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    resign(ck, manifest)


def resign(ck, manifest):
    body = {k: v for k, v in manifest.items() if k != "digest"}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    (ck / MANIFEST).write_text(json.dumps({**body, "digest": digest}))


# ---------------------------------------------------------------- eviction
@pytest.mark.parametrize("policy", ["fifo", "reservoir", "class_balanced", "lowest_coherence"])
def test_eviction_keeps_rows_aligned(policy):
    """After churn every live entry's user columns are still its own (they follow from its dream and id)."""
    pool = make_pool(capacity=8, eviction_policy=policy, eviction_seed=3, coherence_threshold=0.0)
    g = torch.Generator().manual_seed(1)
    for step in range(12):
        n = 1 + step % 5
        x = torch.rand(n, *SHAPE, 3, generator=g)
        coherence = torch.rand(n, generator=g) * 0.5 + 0.5
        labels = torch.randint(0, 10, (n,), generator=g)
        pool.add(x, coherence=coherence, class_label=labels, columns={"logits": logits_of(x), "task": tag_of(x)})
    live = pool.bank.ids_by_age()
    assert live.numel() == 8 and pool.counters["evicted"] + pool.counters["dropped"] > 0
    m, stored = pool.metadata(live), pool.dreams(live)
    assert torch.equal(m["task"], tag_of(stored))
    assert torch.equal(m["logits"], logits_of(stored))


# ---------------------------------------------------------- lazy features
def test_lazy_features_unaffected():
    pool = make_pool(features="lazy")
    x = dreams(6)
    ids = pool.add(x, force=True, columns={"logits": logits_of(x), "task": 2})
    assert pool.bank.pending
    pool.update(ids[:2], task=3)
    m = pool.metadata(ids, columns=("logits", "task"))
    assert pool.bank.pending  # neither the user columns nor their writes compute features
    assert m["task"].tolist() == [3, 3, 2, 2, 2, 2]
    eager = make_pool(features="eager")
    eager.add(x, force=True, columns={"logits": logits_of(x), "task": 2})
    for name in ("chroma", "embeddings", "spectral"):  # settled later, the features are those of an eager add
        assert torch.allclose(pool.metadata(ids, columns=(name,))[name], eager.metadata(ids, columns=(name,))[name])


# ----------------------------------------------------------------- sharded
def _sharded_worker(rank: int, world: int, port: int, root: str) -> None:
    import datetime

    import torch.distributed as dist

    from dreampool_gpu import ShardedDreamPool

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    torch.set_num_threads(1)
    try:
        cfg = PoolConfig(dream_shape=SHAPE, capacity=32, device="cpu", engine="torch", columns=COLUMNS)
        pool = ShardedDreamPool(cfg)
        x = dreams(3, seed=rank)
        local = pool.add(x, force=True, columns={"logits": logits_of(x), "task": tag_of(x)})
        y = dreams(2, seed=10 + rank)
        routed = pool.add(y, force=True, route="least_full", columns={"task": tag_of(y)})  # logits: fill
        every = [dreams(3, seed=r) for r in range(world)]  # what every rank added locally
        mine = torch.cat([local, routed])
        gathered = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(gathered, mine)
        ids = torch.cat(gathered)  # [W * 5]: 3 local, 2 routed per rank
        m = pool.metadata(ids)
        assert bool(m["found"].all()), rank
        for r in range(world):
            mine = m["task"][5 * r : 5 * r + 3]
            assert torch.equal(mine, tag_of(every[r])[:3]), (rank, r)
            assert torch.equal(m["logits"][5 * r : 5 * r + 3], logits_of(every[r])[:3]), (rank, r)
            assert torch.equal(m["task"][5 * r + 3 : 5 * r + 5], tag_of(dreams(2, seed=10 + r))), (rank, r)
            assert not bool(m["logits"][5 * r + 3 : 5 * r + 5].any()), (rank, r)
        # a collective update: every rank writes the other rank's first entry and its own second
        other = ids[5 * ((rank + 1) % world)]
        assert pool.update(torch.stack([other, ids[5 * rank + 1], torch.tensor(-1)]), task=100 + rank) == 2
        after = pool.metadata(ids)["task"]
        for r in range(world):
            assert int(after[5 * r]) == 100 + (r + 1) % world and int(after[5 * r + 1]) == 100 + r, (rank, r)
        try:  # a rank naming another column: refused on every rank, nothing written
            pool.update(ids[:1], **({"task": 1} if rank == 0 else {"logits": torch.zeros(1, 10)}))
        except InvalidInputError as exc:
            assert "same user columns" in str(exc)
        else:
            raise AssertionError("columns differing between ranks were accepted")
        assert torch.equal(pool.metadata(ids)["task"], after)
        pool.save(root)  # the sharded checkpoint carries them: opened as one pool, and back as shards
        merged = DreamPool.load(root)
        assert torch.equal(merged.metadata(ids)["task"], after)
        assert torch.equal(merged.metadata(ids)["logits"], pool.metadata(ids)["logits"])
        again = ShardedDreamPool.load(root)
        assert torch.equal(again.metadata(ids)["task"], after)
    finally:
        dist.destroy_process_group()


def test_sharded_pool_carries_user_columns(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_sharded_worker, args=(2, port, str(tmp_path / "sharded")), nprocs=2, join=True)
