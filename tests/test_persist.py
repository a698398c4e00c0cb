"""Checkpoints: round trips, state dicts, corruption, recovery, refusals, nothing overwritten."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from dreampool_gpu import DreamPool, PoolConfig, persist
from dreampool_gpu.devices import cuda_available
from dreampool_gpu.errors import (
    CheckpointCorruptError,
    CheckpointNotFoundError,
    DeviceUnavailableError,
    InvalidConfigurationError,
    InvalidInputError,
)
from dreampool_gpu.persist import BANK, CONFIG, ENCODER, INDEX, MANIFEST, STATE, CheckpointRecoveryWarning
from dreampool_gpu.search import ExactSearch

SHAPE = (3, 4, 2)
MODES = [
    ("similar", {}),
    ("class", {"class_hint": 3}),
    ("balanced", {"classes": [1, 2, 5]}),
    ("utility", {"utility_threshold": 0.3}),
    ("diverse", {}),
    ("soft", {}),
    ("hybrid", {"class_hint": 2}),
    ("category", {}),
    ("nearest", {}),
]


def make_config(**overrides):
    values = {"dream_shape": SHAPE, "capacity": 32, "device": "cpu", "coherence_threshold": 0.3}
    values.update(overrides)
    return PoolConfig(**values)


def churned_pool(config=None, *, rounds=6, seed=0):
    """A pool after adds with rejections and evictions, queries and feedback."""
    pool = DreamPool(config or make_config(eviction_policy="lowest_utility"))
    g = torch.Generator().manual_seed(seed)
    for _ in range(rounds):
        n = 12
        dreams = (torch.rand(n, 1, 1, 1, 3, generator=g) + 0.05 * torch.rand(n, *SHAPE, 3, generator=g)).clamp(0, 1)
        pool.add(
            dreams,
            coherence=torch.rand(n, generator=g),
            energy=torch.rand(n, generator=g),
            class_label=torch.randint(-1, 10, (n,), generator=g),
        )
        hits = pool.retrieve(torch.rand(3, 3, generator=g), k=4, mode="hybrid")
        pool.feedback(hits.ids, torch.rand(3, 4, generator=g))
    return pool


def bits(t):
    """Integer view of a tensor, so equality is bit for bit (NaN == NaN)."""
    width = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.view(width) if t.is_floating_point() else t


def assert_same_pool(a, b, *, ignore=()):
    assert (a.bank.size, a.bank.next_id, a.bank.extent) == (b.bank.size, b.bank.next_id, b.bank.extent)
    assert a.counters == b.counters
    assert torch.equal(a.bank.slots_by_age().cpu(), b.bank.slots_by_age().cpu())  # derived order is fresh
    assert a.bank.columns.keys() == b.bank.columns.keys()
    for name, col in a.bank.columns.items():
        if name in ignore:
            continue
        other = b.bank.columns[name].to(col.device)
        assert col.dtype == other.dtype, name
        assert torch.equal(bits(col), bits(other)), name


def assert_same_answers(a, b, *, seed=5, modes=MODES):
    g = torch.Generator().manual_seed(seed)
    queries = torch.rand(4, 3, generator=g)
    for mode, kwargs in modes:
        ra = a.retrieve(queries.to(a.device), k=5, mode=mode, **kwargs)
        rb = b.retrieve(queries.to(b.device), k=5, mode=mode, **kwargs)
        assert torch.equal(ra.ids.cpu(), rb.ids.cpu()), mode
        assert torch.allclose(ra.scores.cpu(), rb.scores.cpu(), atol=1e-6), mode


def tree_digest(root):
    """sha256 of every file under ``root`` (names and bytes), to prove nothing changed."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def rewrite(ckpt, name, data):
    """Replace one file and re-sign the manifest: a consistent checkpoint written elsewhere."""
    (ckpt / name).write_bytes(data)
    manifest = json.loads((ckpt / MANIFEST).read_bytes())
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    resign(ckpt, manifest)


def resign(ckpt, manifest):
    body = {k: v for k, v in manifest.items() if k != "digest"}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    (ckpt / MANIFEST).write_text(json.dumps({**body, "digest": digest}))


def siblings(ckpt):
    return sorted(p.name for p in ckpt.parent.iterdir() if p.name != ckpt.name)


class RecordingSearch(ExactSearch):
    """Exact search that serializes the slots it was given, to exercise the index file."""

    kind = "recording-test"

    def __init__(self, bank, metric, *, chunk_bytes):
        super().__init__(bank, metric, chunk_bytes=chunk_bytes)
        self.slots: list[int] = []
        self.restored: bytes | None = None

    def add(self, slots):
        self.slots += slots.tolist()

    def remove(self, slots):
        gone = set(slots.tolist())
        self.slots = [s for s in self.slots if s not in gone]

    def reset(self):
        self.slots = []
        self.restored = None

    def serialize(self):
        return json.dumps(self.slots).encode()

    def deserialize(self, data):
        self.slots = [int(s) for s in json.loads(data)]
        self.restored = data


@pytest.fixture
def recording_index(monkeypatch):
    monkeypatch.setattr(
        "dreampool_gpu.parts.make_index", lambda bank, config: RecordingSearch(bank, config.metric, chunk_bytes=2**20)
    )


# ------------------------------------------------------------------ round trips
class TestRoundTrip:
    def test_empty_pool(self, tmp_path):
        pool = DreamPool(make_config())
        pool.save(tmp_path / "ck")
        loaded = DreamPool.load(tmp_path / "ck")
        assert_same_pool(pool, loaded)
        assert len(loaded) == 0
        hits = loaded.retrieve(torch.rand(2, 3), k=3, mode="hybrid")
        assert bool((hits.ids == -1).all())
        assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == sorted([MANIFEST, CONFIG, STATE, BANK, ENCODER])

    def test_after_churn_bit_exact_and_same_answers(self, tmp_path):
        pool = churned_pool()
        assert pool.counters["evicted"] > 0 and pool.counters["rejected"] > 0
        pool.save(tmp_path / "ck")
        loaded = DreamPool.load(tmp_path / "ck")
        assert loaded.config == pool.config
        assert_same_pool(pool, loaded)
        assert torch.equal(pool.bank.slots_by_age(), loaded.bank.slots_by_age())
        assert_same_answers(pool, loaded)
        # the next add goes to the same slots with the same ids
        dreams = torch.rand(5, *SHAPE, 3, generator=torch.Generator().manual_seed(9))
        assert torch.equal(pool.add(dreams, coherence=torch.ones(5)), loaded.add(dreams, coherence=torch.ones(5)))
        assert_same_pool(pool, loaded, ignore=("inserted_at",))  # the new entries' clock readings differ

    @pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
    def test_dream_dtype_kept(self, tmp_path, dtype):
        pool = churned_pool(make_config(dream_dtype=dtype))
        pool.save(tmp_path / "ck")
        loaded = DreamPool.load(tmp_path / "ck")
        assert loaded.bank.columns["dreams"].dtype == getattr(torch, dtype)
        assert_same_pool(pool, loaded)

    def test_overwrite_replaces_and_leaves_no_siblings(self, tmp_path):
        ck = tmp_path / "ck"
        pool = churned_pool(rounds=2)
        pool.save(ck)
        pool.add(torch.rand(4, *SHAPE, 3), coherence=torch.ones(4))
        pool.save(str(ck))
        loaded = DreamPool.load(ck)
        assert loaded.bank.next_id == pool.bank.next_id
        assert siblings(ck) == []

    @pytest.mark.parametrize("exchange", [True, False], ids=["rename-exchange", "two-renames"])
    def test_both_swap_paths(self, tmp_path, monkeypatch, exchange):
        if not exchange:
            monkeypatch.setattr(persist.files, "_rename_exchange", lambda a, b: False)
        ck = tmp_path / "ck"
        pool = churned_pool(rounds=1)
        for _ in range(3):
            pool.add(torch.rand(3, *SHAPE, 3), coherence=torch.ones(3))
            pool.save(ck)
            assert DreamPool.load(ck).bank.next_id == pool.bank.next_id
        assert siblings(ck) == []

    def test_load_then_save_again(self, tmp_path):
        pool = churned_pool()
        pool.save(tmp_path / "a")
        DreamPool.load(tmp_path / "a").save(tmp_path / "b")
        a, b = tree_digest(tmp_path / "a"), tree_digest(tmp_path / "b")
        assert a == b  # same content, same bytes: the format is deterministic

    def test_index_file_saved_and_restored(self, tmp_path, recording_index):
        pool = churned_pool()
        pool.save(tmp_path / "ck")
        manifest = json.loads((tmp_path / "ck" / MANIFEST).read_bytes())
        assert INDEX in manifest["files"]
        loaded = DreamPool.load(tmp_path / "ck")
        head, _, body = (tmp_path / "ck" / INDEX).read_bytes().partition(b"\n")
        assert loaded.index.restored == body and head.startswith(b"dreampool-index-of-bank:")
        assert loaded.index.slots == pool.index.slots

    def test_other_engine_kind_rebuilds_quietly(self, tmp_path, recording_index, monkeypatch):
        churned_pool().save(tmp_path / "ck")
        monkeypatch.setattr(RecordingSearch, "kind", "another-engine")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loaded = DreamPool.load(tmp_path / "ck")
        assert loaded.index.restored is None
        assert loaded.index.slots == loaded.bank.slots_by_age().tolist()


class TestFaissIndex:
    def test_trained_ivf_rides_in_the_checkpoint(self, tmp_path):
        """A trained IVF-PQ index is saved as index.bin and restored, not retrained."""
        config = make_config(
            capacity=1400, engine="faiss-ivf", ann_threshold=1024, embedding_dim=16, coherence_threshold=0.0
        )
        pool = DreamPool(config)
        g = torch.Generator().manual_seed(0)
        pool.add(torch.rand(1300, *SHAPE, 3, generator=g), coherence=torch.ones(1300))
        pool.add(torch.rand(200, *SHAPE, 3, generator=g), coherence=torch.ones(200))  # evicts 100
        assert pool.index.serialize() is not None, "IVF not trained: the test would not test anything"
        pool.save(tmp_path / "ck")
        assert INDEX in json.loads((tmp_path / "ck" / MANIFEST).read_bytes())["files"]
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no recovery: the index file is used as saved
            loaded = DreamPool.load(tmp_path / "ck")
        assert loaded.index.serialize() == pool.index.serialize()
        assert_same_pool(pool, loaded)
        queries = torch.rand(6, 3, generator=g)
        for mode in ("nearest", "hybrid"):
            a = pool.retrieve(queries, k=8, mode=mode)
            b = loaded.retrieve(queries, k=8, mode=mode)
            assert torch.equal(a.ids, b.ids), mode


class TestDevices:
    def make_foreign(self, tmp_path, **config_changes):
        """A CPU checkpoint edited to read as written on CUDA with float16 dreams."""
        pool = churned_pool(make_config(dream_dtype="float16"))
        ck = tmp_path / "ck"
        pool.save(ck)
        config = json.loads((ck / CONFIG).read_bytes())
        config.update(config_changes)
        rewrite(ck, CONFIG, json.dumps(config).encode())
        return pool, ck

    def test_cuda_saved_pool_loads_on_cpu(self, tmp_path):
        pool, ck = self.make_foreign(tmp_path, device="cuda:0", dream_dtype="auto")
        loaded = DreamPool.load(ck, device="cpu")
        assert loaded.device == torch.device("cpu")
        assert loaded.config.device == "cpu"
        assert loaded.config.dream_dtype == "float16"  # follows the saved column, not CPU's auto choice
        assert_same_pool(pool, loaded)
        assert_same_answers(pool, loaded)

    @pytest.mark.skipif(cuda_available(), reason="needs a machine without CUDA")
    def test_saved_cuda_device_absent_raises(self, tmp_path):
        _, ck = self.make_foreign(tmp_path, device="cuda:0", dream_dtype="auto")
        with pytest.raises(DeviceUnavailableError):
            DreamPool.load(ck)

    def test_bad_device_argument(self, tmp_path):
        churned_pool(rounds=1).save(tmp_path / "ck")
        with pytest.raises(InvalidConfigurationError, match="device"):
            DreamPool.load(tmp_path / "ck", device="tpu")
        with pytest.raises(InvalidConfigurationError, match="device"):
            DreamPool.load(tmp_path / "ck", device=3)

    @pytest.mark.gpu
    def test_cuda_to_cpu_and_back(self, tmp_path):
        pool = churned_pool(make_config(device="cuda", eviction_policy="lowest_utility"))
        assert pool.bank.columns["dreams"].dtype == torch.float16
        pool.save(tmp_path / "gpu")
        on_cpu = DreamPool.load(tmp_path / "gpu", device="cpu")
        assert on_cpu.device.type == "cpu" and on_cpu.bank.columns["dreams"].dtype == torch.float16
        assert_same_pool(pool, on_cpu)
        # CPU and CUDA arithmetic may differ in the last bit: compare the plain k-NN modes only
        assert_same_answers(pool, on_cpu, modes=[("similar", {}), ("nearest", {})])
        on_cpu.save(tmp_path / "cpu")
        back = DreamPool.load(tmp_path / "cpu", device="cuda")
        assert back.device.type == "cuda"
        assert_same_pool(pool, back)
        sd = io.BytesIO()
        torch.save(pool.state_dict(), sd)
        sd.seek(0)
        fresh = DreamPool(make_config(eviction_policy="lowest_utility", dream_dtype="float16"))
        fresh.load_state_dict(torch.load(sd, weights_only=True))
        assert_same_pool(pool, fresh)


# ------------------------------------------------------------------ state dict
class TestStateDict:
    def roundtrip(self, sd):
        buf = io.BytesIO()
        torch.save(sd, buf)
        buf.seek(0)
        return torch.load(buf, weights_only=True)

    def test_rides_in_a_training_checkpoint(self, recording_index):
        pool = churned_pool()
        model = torch.nn.Linear(3, 2)
        ckpt = self.roundtrip({"model": model.state_dict(), "pool": pool.state_dict(), "step": 7})
        busy = churned_pool(seed=7)  # other entries, a warm order cache and query cache
        assert len(busy.cache) > 0
        busy.load_state_dict(ckpt["pool"])
        assert len(busy.cache) == 0
        fresh = DreamPool(make_config(eviction_policy="lowest_utility"))
        fresh.load_state_dict(ckpt["pool"])
        assert_same_pool(pool, fresh)
        assert_same_pool(pool, busy)
        assert_same_answers(pool, busy)
        assert busy.index.restored is not None and busy.index.slots == pool.index.slots
        assert fresh.index.restored is not None and fresh.index.slots == pool.index.slots

    def test_is_a_copy(self):
        pool = churned_pool()
        sd = pool.state_dict()
        usage = sd["bank"]["usage"].clone()
        pool.retrieve(torch.rand(3, 3), k=5, mode="similar")
        assert torch.equal(sd["bank"]["usage"], usage)
        assert all(t.device.type == "cpu" for t in sd["bank"].values())

    def test_empty_pool(self):
        pool = DreamPool(make_config())
        fresh = churned_pool()
        fresh.load_state_dict(self.roundtrip(pool.state_dict()))
        assert_same_pool(pool, fresh)

    def test_keeps_own_tuning_and_casts_dreams(self):
        pool = churned_pool()
        target = DreamPool(
            make_config(coherence_threshold=0.9, capacity=40, dream_dtype="float16", eviction_policy="lowest_utility")
        )
        target.load_state_dict(pool.state_dict())
        assert target.config.coherence_threshold == 0.9 and target.config.capacity == 40
        assert target.bank.columns["dreams"].dtype == torch.float16
        assert target.bank.size == pool.bank.size
        live = pool.bank.slots_by_age()
        assert torch.equal(target.bank.slots_by_age(), live)
        assert torch.allclose(target.bank.columns["dreams"][live].float(), pool.bank.columns["dreams"][live], atol=1e-3)

    @pytest.mark.parametrize(
        "change",
        [
            {"embedding_dim": 32},
            {"dream_shape": (3, 4, 1)},
            {"encoder_seed": 1},
            {"metric": "euclidean"},
            {"capacity": 8},
        ],
    )
    def test_incompatible_config_refused_pool_unchanged(self, change):
        source = churned_pool()
        target = DreamPool(make_config(**change))
        target.add(torch.rand(3, *target.config.dream_shape, 3), coherence=torch.ones(3))
        before = {k: v.clone() for k, v in target.bank.columns.items()}
        counters = dict(target.counters)
        field = next(iter(change))
        with pytest.raises(InvalidConfigurationError, match=field):
            target.load_state_dict(source.state_dict())
        assert target.counters == counters
        assert all(torch.equal(bits(before[k]), bits(v)) for k, v in target.bank.columns.items())

    def test_newer_version_refused(self):
        pool = churned_pool(rounds=1)
        sd = pool.state_dict()
        sd["format_version"] = persist.FORMAT_VERSION + 1
        with pytest.raises(InvalidInputError, match="newer.*upgrade"):
            DreamPool(make_config()).load_state_dict(sd)

    @pytest.mark.parametrize(
        "damage",
        [
            "not-a-dict",
            "no-format",
            "bank-shape",
            "bank-dtype",
            "missing-column",
            "duplicate-ids",
            "size",
            "next-id",
            "next-id-huge",
            "nan-embedding",
            "label-range",
            "config",
            "counters",
            "index-type",
        ],
    )
    def test_malformed_refused_pool_unchanged(self, damage):
        sd = churned_pool().state_dict()
        bank, state = sd["bank"], sd["state"]
        live = torch.nonzero(bank["ids"] >= 0).squeeze(1)
        if damage == "not-a-dict":
            sd = [sd]
        elif damage == "no-format":
            del sd["format"]
        elif damage == "bank-shape":
            bank["chroma"] = bank["chroma"][:, :2]
        elif damage == "bank-dtype":
            bank["usage"] = bank["usage"].float()
        elif damage == "missing-column":
            del bank["spectral"]
        elif damage == "duplicate-ids":
            bank["ids"][live[1]] = bank["ids"][live[0]]
        elif damage == "size":
            state["size"] += 1
        elif damage == "next-id":
            state["next_id"] = int(bank["ids"].max())
        elif damage == "next-id-huge":  # found by the nightly fuzz profile: beyond int64
            state["next_id"] = 2**64
        elif damage == "nan-embedding":
            bank["embeddings"][live[0], 0] = float("nan")
        elif damage == "label-range":
            bank["class_label"][live[0]] = 11
        elif damage == "config":
            sd["config"]["capacity"] = -4
        elif damage == "counters":
            state["counters"]["added"] = -1
        elif damage == "index-type":
            sd["index"] = "not bytes"
        target = churned_pool(seed=4)
        before = target.state_dict()
        with pytest.raises(InvalidInputError, match="state_dict"):
            target.load_state_dict(sd)
        after = target.state_dict()
        assert before["state"] == after["state"]
        assert all(torch.equal(bits(before["bank"][k]), bits(after["bank"][k])) for k in before["bank"])


# ------------------------------------------------------------ damaged checkpoints
@pytest.fixture
def saved(tmp_path):
    pool = churned_pool()
    ck = tmp_path / "ck"
    pool.save(ck)
    return pool, ck


def flip_byte(path, offset=None):
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x41
    path.write_bytes(bytes(data))


class TestCorruption:
    @pytest.mark.parametrize("name", [BANK, CONFIG, STATE])
    def test_flipped_byte_names_the_file(self, saved, name):
        _, ck = saved
        flip_byte(ck / name)
        before = tree_digest(ck.parent)
        with pytest.raises(CheckpointCorruptError, match="sha256") as exc:
            DreamPool.load(ck)
        assert exc.value.path == ck / name
        assert tree_digest(ck.parent) == before  # loading never repairs or rewrites

    @pytest.mark.parametrize("name", [BANK, CONFIG, STATE, MANIFEST])
    def test_missing_file_names_it(self, saved, name):
        _, ck = saved
        (ck / name).unlink()
        with pytest.raises(CheckpointCorruptError, match="missing") as exc:
            DreamPool.load(ck)
        assert exc.value.path == ck / name

    def test_truncated_safetensors(self, saved):
        _, ck = saved
        data = (ck / BANK).read_bytes()
        (ck / BANK).write_bytes(data[: len(data) // 3])
        with pytest.raises(CheckpointCorruptError, match="truncated") as exc:
            DreamPool.load(ck)
        assert exc.value.path == ck / BANK

    def test_manifest_not_json(self, saved):
        _, ck = saved
        (ck / MANIFEST).write_bytes(b'{"format": "dreampool-checkpoint", ')
        with pytest.raises(CheckpointCorruptError, match="JSON") as exc:
            DreamPool.load(ck)
        assert exc.value.path == ck / MANIFEST

    def test_manifest_hash_edited(self, saved):
        _, ck = saved
        manifest = json.loads((ck / MANIFEST).read_bytes())
        manifest["files"][BANK]["sha256"] = "0" * 64
        (ck / MANIFEST).write_text(json.dumps(manifest))
        with pytest.raises(CheckpointCorruptError, match="digest") as exc:
            DreamPool.load(ck)
        assert exc.value.path == ck / MANIFEST

    def test_manifest_resigned_with_wrong_hash(self, saved):
        _, ck = saved
        manifest = json.loads((ck / MANIFEST).read_bytes())
        manifest["files"][STATE]["sha256"] = "0" * 64
        resign(ck, manifest)
        with pytest.raises(CheckpointCorruptError, match="sha256") as exc:
            DreamPool.load(ck)
        assert exc.value.path == ck / STATE

    @pytest.mark.parametrize("entry", [{"../escape": {"sha256": "0" * 64, "bytes": 1}}, {BANK: "nope"}])
    def test_manifest_bad_file_table(self, saved, entry):
        _, ck = saved
        manifest = json.loads((ck / MANIFEST).read_bytes())
        manifest["files"].update(entry)
        resign(ck, manifest)
        with pytest.raises(CheckpointCorruptError, match="file entry") as exc:
            DreamPool.load(ck)
        assert exc.value.path == ck / MANIFEST

    def test_consistent_but_invalid_bank(self, saved):
        """Hashes match but the content breaks an invariant: still refused, naming the bank."""
        pool, ck = saved
        sd = pool.state_dict()
        live = torch.nonzero(sd["bank"]["ids"] >= 0).squeeze(1)
        sd["bank"]["ids"][live[0]] = sd["bank"]["ids"][live[1]]
        from safetensors.torch import save as save_safetensors

        rewrite(ck, BANK, save_safetensors(sd["bank"]))
        with pytest.raises(CheckpointCorruptError, match="unique") as exc:
            DreamPool.load(ck)
        assert exc.value.path == ck / BANK

    def test_consistent_garbage_bank(self, saved):
        _, ck = saved
        rewrite(ck, BANK, b"\xff" * 64)
        with pytest.raises(CheckpointCorruptError, match="safetensors") as exc:
            DreamPool.load(ck)
        assert exc.value.path == ck / BANK

    def test_consistent_but_invalid_state(self, saved):
        _, ck = saved
        state = json.loads((ck / STATE).read_bytes())
        state["extent"] = 10_000
        rewrite(ck, STATE, json.dumps(state).encode())
        with pytest.raises(CheckpointCorruptError, match="extent") as exc:
            DreamPool.load(ck)
        assert exc.value.path == ck / STATE

    def test_newer_format_version_refused(self, saved):
        _, ck = saved
        manifest = json.loads((ck / MANIFEST).read_bytes())
        manifest["format_version"] = persist.FORMAT_VERSION + 1
        resign(ck, manifest)
        with pytest.raises(CheckpointCorruptError, match=r"newer dreampool_gpu \(not corrupt\): upgrade") as exc:
            DreamPool.load(ck)
        assert exc.value.path == ck / MANIFEST

    def test_not_a_checkpoint(self, tmp_path):
        with pytest.raises(CheckpointNotFoundError, match="no checkpoint"):
            DreamPool.load(tmp_path / "nothing-here")
        (tmp_path / "dir").mkdir()
        (tmp_path / "dir" / MANIFEST).write_text('{"format": "something-else"}')
        with pytest.raises(CheckpointCorruptError, match="not a dreampool-checkpoint manifest"):
            DreamPool.load(tmp_path / "dir")

    def test_extra_file_warns_and_loads(self, saved):
        pool, ck = saved
        (ck / "notes.txt").write_text("hello")
        with pytest.warns(CheckpointRecoveryWarning, match="notes.txt"):
            loaded = DreamPool.load(ck)
        assert_same_pool(pool, loaded)

    @pytest.mark.parametrize("damage", ["missing", "corrupt", "undecodable"])
    def test_bad_index_file_rebuilt_with_warning(self, tmp_path, recording_index, damage):
        pool = churned_pool()
        ck = tmp_path / "ck"
        pool.save(ck)
        if damage == "missing":
            (ck / INDEX).unlink()
        elif damage == "corrupt":
            flip_byte(ck / INDEX, offset=0)
        else:
            rewrite(ck, INDEX, b"not json")
        before = tree_digest(tmp_path)
        with pytest.warns(CheckpointRecoveryWarning, match="rebuilt"):
            loaded = DreamPool.load(ck)
        assert loaded.index.restored is None
        assert loaded.index.slots == loaded.bank.slots_by_age().tolist()
        assert sorted(loaded.index.slots) == sorted(pool.index.slots)
        assert_same_pool(pool, loaded)
        assert tree_digest(tmp_path) == before


class TestNothingOverwritten:
    def test_failed_save_keeps_previous(self, saved, monkeypatch):
        pool, ck = saved
        before = tree_digest(ck.parent)

        def broken(tensors):
            raise OSError("disk full")

        monkeypatch.setattr(persist.files, "save_safetensors", broken)
        pool.add(torch.rand(3, *SHAPE, 3), coherence=torch.ones(3))
        with pytest.raises(OSError, match="disk full"):
            pool.save(ck)
        assert tree_digest(ck.parent) == before
        assert siblings(ck) == []

    def test_failed_serialize_keeps_previous(self, tmp_path, recording_index, monkeypatch):
        pool = churned_pool()
        ck = tmp_path / "ck"
        pool.save(ck)
        before = tree_digest(tmp_path)
        monkeypatch.setattr(RecordingSearch, "serialize", lambda self: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            pool.save(ck)
        assert tree_digest(tmp_path) == before

    def test_refuses_foreign_directory_and_file(self, tmp_path):
        pool = churned_pool(rounds=1)
        (tmp_path / "mine").mkdir()
        (tmp_path / "mine" / "thesis.tex").write_text("precious")
        (tmp_path / "file").write_text("precious")
        before = tree_digest(tmp_path)
        for target in ("mine", "file"):
            with pytest.raises(InvalidInputError, match="path"):
                pool.save(tmp_path / target)
        assert tree_digest(tmp_path) == before

    @pytest.mark.parametrize("path", [None, 3, b"bytes", "", "a\0b"])
    def test_bad_path_type(self, path):
        pool = DreamPool(make_config())
        with pytest.raises(InvalidInputError, match="path"):
            pool.save(path)
        with pytest.raises(InvalidInputError, match="path"):
            DreamPool.load(path)


class TestRecovery:
    def test_interrupted_two_rename_swap(self, saved):
        """Killed between the two renames: the checkpoint path is gone but its old copy remains."""
        pool, ck = saved
        old = ck.parent / f".{ck.name}.old-999999999-abc"
        os.rename(ck, old)
        with pytest.warns(CheckpointRecoveryWarning, match="interrupted save"):
            loaded = DreamPool.load(ck)
        assert_same_pool(pool, loaded)
        loaded.save(ck)
        assert siblings(ck) == []
        assert_same_pool(pool, DreamPool.load(ck))

    def test_missing_checkpoint_is_not_retried(self, tmp_path, monkeypatch):
        """No directory and no .old copy: nothing is being saved, so the first failure is final."""
        reads = []
        real = persist.verify._read_once
        monkeypatch.setattr(
            persist.verify, "_read_once", lambda target, notes: (reads.append(target), real(target, notes))[1]
        )
        (tmp_path / "empty").mkdir()
        for path in (tmp_path / "absent", tmp_path / "empty"):
            reads.clear()
            with pytest.raises(CheckpointNotFoundError if path.name == "absent" else CheckpointCorruptError):
                DreamPool.load(path)
            assert len(reads) == 1

    def test_interrupted_swap_skips_an_unreadable_old_copy(self, saved):
        """Two ``.old`` siblings, the newer one half-deleted: the complete one is read."""
        pool, ck = saved
        complete = ck.parent / f".{ck.name}.old-999999998-abc"
        os.rename(ck, complete)
        half = ck.parent / f".{ck.name}.old-999999999-def"
        shutil.copytree(complete, half)
        (half / "manifest.json").unlink()
        os.utime(complete, (1, 1))
        with pytest.warns(CheckpointRecoveryWarning, match=complete.name):
            loaded = DreamPool.load(ck)
        assert_same_pool(pool, loaded)

    def test_portable_swap_never_deletes_an_old_copy_in_place(self, saved, monkeypatch):
        """The two-rename swap renames the old copy away from ``.old`` before deleting it."""
        pool, ck = saved
        monkeypatch.setattr(persist.files, "_rename_exchange", lambda a, b: False)
        removed: list[str] = []
        real_rmtree = shutil.rmtree
        monkeypatch.setattr(
            persist.files.shutil, "rmtree", lambda p, *a, **kw: (removed.append(Path(p).name), real_rmtree(p, *a, **kw))
        )
        pool.add(torch.rand(3, *SHAPE, 3), coherence=torch.ones(3))
        pool.save(ck)
        assert removed and not any(".old-" in name for name in removed)
        assert siblings(ck) == []
        assert_same_pool(pool, DreamPool.load(ck))

    def test_stale_temp_of_dead_writer_removed(self, saved):
        pool, ck = saved
        child = subprocess.run(
            [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
        )
        stale = ck.parent / f".{ck.name}.tmp-{int(child.stdout)}-deadbeef"
        stale.mkdir()
        (stale / BANK).write_bytes(b"half")
        live = ck.parent / f".{ck.name}.tmp-{os.getppid()}-cafe"  # a running process's save: kept
        live.mkdir()
        pool.save(ck)
        assert siblings(ck) == [live.name]


# ------------------------------------------------------------------ capacity
class TestCapacity:
    """A budget-lowered pool: ``config.capacity`` as given, ``pool.capacity`` as fitted, both kept by checkpoints."""

    @staticmethod
    def lowered(capacity):
        pool = DreamPool(make_config(capacity=capacity, memory_budget_mb=0.01, engine="torch"))
        assert pool.config.capacity == capacity and pool.capacity < 10_000
        pool.add(torch.rand(pool.capacity + 3, *SHAPE, 3), coherence=torch.ones(pool.capacity + 3))
        return pool

    @pytest.mark.parametrize("capacity", [10_000, None])
    def test_save_load_keeps_both(self, tmp_path, capacity):
        pool = self.lowered(capacity)
        pool.save(tmp_path / "ck")
        assert json.loads((tmp_path / "ck" / STATE).read_bytes())["capacity"] == pool.capacity
        loaded = DreamPool.load(tmp_path / "ck")
        assert loaded.config == pool.config and loaded.config.capacity == capacity
        assert loaded.capacity == pool.capacity and len(loaded) == len(pool) == pool.capacity
        assert_same_pool(pool, loaded)

    def test_load_builds_the_saved_capacity(self, tmp_path, monkeypatch):
        pool = self.lowered(10_000)
        pool.save(tmp_path / "ck")
        fitted = pool.capacity
        # a budget that would fit more slots now: the loaded pool still has the saved pool's slots
        monkeypatch.setattr("dreampool_gpu.parts.fit_capacity", lambda config, **kw: config.capacity)
        loaded = DreamPool.load(tmp_path / "ck")
        assert loaded.capacity == fitted and loaded.config.capacity == 10_000

    def test_state_dict_keeps_both(self):
        pool = self.lowered(10_000)
        into = DreamPool(make_config(capacity=10_000, memory_budget_mb=0.01, engine="torch"))
        into.load_state_dict(pool.state_dict())
        assert into.config.capacity == 10_000 and into.capacity == pool.capacity
        assert_same_pool(pool, into)

    def test_checkpoint_without_saved_capacity(self, tmp_path):
        """Written before the capacity was saved: config.json held the fitted capacity."""
        pool = self.lowered(10_000)
        ck = tmp_path / "ck"
        pool.save(ck)
        state = json.loads((ck / STATE).read_bytes())
        del state["capacity"]
        rewrite(ck, STATE, json.dumps(state).encode())
        rewrite(ck, CONFIG, json.dumps(pool.config.replace(capacity=pool.capacity).to_dict()).encode())
        loaded = DreamPool.load(ck)
        assert loaded.capacity == loaded.config.capacity == pool.capacity
        assert_same_pool(pool, loaded)


# ------------------------------------------------------------ format 1 (issue 22)
def relabel_as_format_1(ck):
    """What a format-1 writer left: no encoder file, ``format_version`` 1, a valid signature."""
    (ck / ENCODER).unlink()
    manifest = json.loads((ck / MANIFEST).read_bytes())
    del manifest["files"][ENCODER]
    manifest["format_version"] = 1
    resign(ck, manifest)


def learned_saved(tmp_path):
    g = torch.Generator().manual_seed(4)
    pool = DreamPool(make_config(encoder="learned", coherence_threshold=0.0, capacity=64))
    pool.add(torch.rand(40, *SHAPE, 3, generator=g), coherence=torch.ones(40), class_label=torch.arange(40) % 10)
    pool.fit_encoder(steps=3, batch_size=16)
    pool.save(tmp_path / "ck")
    return pool, tmp_path / "ck"


class TestFormat1:
    """docs/spec.md §Checkpoints: format 1 holds feature-encoder pools only, re-embedded on load."""

    def test_a_feature_pool_of_format_1_loads_re_embedded_and_saves_again(self, tmp_path):
        pool = churned_pool()
        pool.save(tmp_path / "ck")
        relabel_as_format_1(tmp_path / "ck")
        loaded = DreamPool.load(tmp_path / "ck")
        fresh = DreamPool.load(tmp_path / "ck")
        assert_same_pool(loaded, pool, ignore=("embeddings", "usage"))
        assert_same_answers(loaded, fresh)
        loaded.save(tmp_path / "again")  # consistent: its own re-save loads
        assert_same_answers(DreamPool.load(tmp_path / "again"), loaded)

    def test_a_learned_pool_relabelled_as_format_1_is_refused(self, tmp_path):
        """It would load a fresh encoder beside the trained embeddings."""
        _, ck = learned_saved(tmp_path)
        relabel_as_format_1(ck)
        with pytest.raises(CheckpointCorruptError, match="format-1") as exc:
            DreamPool.load(ck)
        assert exc.value.path == ck / ENCODER

    def test_format_2_without_its_encoder_file_is_refused(self, tmp_path):
        pool = churned_pool()
        pool.save(tmp_path / "ck")
        ck = tmp_path / "ck"
        (ck / ENCODER).unlink()
        manifest = json.loads((ck / MANIFEST).read_bytes())
        del manifest["files"][ENCODER]
        resign(ck, manifest)
        with pytest.raises(CheckpointCorruptError, match="missing") as exc:
            DreamPool.load(ck)
        assert exc.value.path == ck / ENCODER

    def test_state_dicts_follow_the_same_rules(self):
        learned = DreamPool(make_config(encoder="learned", coherence_threshold=0.0))
        learned.add(torch.rand(8, *SHAPE, 3), coherence=torch.ones(8))
        sd = learned.state_dict()
        sd["encoder"], sd["format_version"] = None, 1
        with pytest.raises(InvalidInputError, match="format-1"):
            DreamPool(learned.config).load_state_dict(sd)
        sd["format_version"] = persist.FORMAT_VERSION
        with pytest.raises(InvalidInputError, match="encoder"):
            DreamPool(learned.config).load_state_dict(sd)
        features = churned_pool()
        sd = features.state_dict()
        sd["encoder"], sd["format_version"] = None, 1
        other = DreamPool(features.config)
        other.load_state_dict(sd)
        assert len(other) == len(features)

    def test_a_user_encoder_cannot_take_a_format_1_state(self):
        features = churned_pool()
        sd = features.state_dict()
        sd["encoder"], sd["format_version"] = None, 1
        module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 2 * 3, features.config.embedding_dim))
        other = DreamPool(features.config, encoder=module)
        with pytest.raises(InvalidConfigurationError, match="format-1"):
            other.load_state_dict(sd)


class TestEncoderConsistency:
    """The spot check catches an encoder state changed by 1e-3 (docs/spec.md §Checkpoints)."""

    @pytest.mark.parametrize("scale", [1 + 1e-3, 1 - 1e-3])
    def test_learned_encoder_scaled(self, tmp_path, scale):
        from safetensors.torch import load_file, save

        pool, ck = learned_saved(tmp_path)
        state = load_file(ck / ENCODER)
        rewrite(ck, ENCODER, save({k: v * scale for k, v in state.items()}))
        with pytest.raises(CheckpointCorruptError, match="embeddings differ") as exc:
            DreamPool.load(ck)
        assert exc.value.path == ck / BANK

    @pytest.mark.parametrize(("name", "match"), [("mean", "embeddings differ"), ("projection", "projection")])
    def test_feature_encoder_scaled(self, tmp_path, name, match):
        """(Scaling ``std`` alone scales every standardised feature alike: under cosine the
        embeddings stay the same to the last bits, nothing to refuse.)"""
        from safetensors.torch import load_file, save

        pool = churned_pool()
        pool.save(tmp_path / "ck")
        ck = tmp_path / "ck"
        state = load_file(ck / ENCODER)
        state[name] = state[name] * (1 + 1e-3)
        rewrite(ck, ENCODER, save(state))
        with pytest.raises(CheckpointCorruptError, match=match):
            DreamPool.load(ck)

    def test_unchanged_checkpoints_still_load(self, tmp_path):
        pool, ck = learned_saved(tmp_path)
        assert_same_answers(DreamPool.load(ck), pool, modes=[("hybrid", {}), ("nearest", {})])
