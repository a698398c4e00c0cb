"""Regression tests of issue 15: each failure of the adversarial run and the new-user trial."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import warnings

import numpy as np
import pytest
import torch

from dreampool_gpu import DreamPool, PoolConfig, persist
from dreampool_gpu import budget as budget_mod
from dreampool_gpu.errors import (
    CapacityExceededError,
    CheckpointCorruptError,
    CheckpointNotFoundError,
    DreamPoolError,
    InsufficientMemoryError,
    InvalidConfigurationError,
    InvalidInputError,
)
from dreampool_gpu.persist import BANK, INDEX, MANIFEST, CheckpointRecoveryWarning

SHAPE = (3, 4, 2)
MODES = ["similar", "class", "balanced", "utility", "diverse", "soft", "hybrid", "category", "nearest"]


def dreams(n, *, seed=0, shape=SHAPE):
    """Dreams around a random base colour each, so chroma signatures spread out."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 1, 1, 1, 3, generator=g)
    return (base + 0.05 * (torch.rand(n, *shape, 3, generator=g) - 0.5)).clamp(0, 1)


def make_pool(n=40, *, seed=0, **overrides):
    cfg = {"dream_shape": SHAPE, "capacity": 64, "device": "cpu", "coherence_threshold": 0.0, **overrides}
    pool = DreamPool(PoolConfig(**cfg))
    labels = torch.randint(-1, 10, (n,), generator=torch.Generator().manual_seed(seed + 1))
    pool.add(dreams(n, seed=seed, shape=cfg["dream_shape"]), coherence=torch.ones(n), class_label=labels)
    return pool


def mode_kwargs(mode):
    return {"class": {"class_hint": 1}, "balanced": {"classes": [0, 1]}}.get(mode, {})


def resign(ckpt, name, data):
    """Replace file ``name`` of checkpoint ``ckpt`` by ``data`` and sign the manifest again."""
    (ckpt / name).write_bytes(data)
    manifest = json.loads((ckpt / MANIFEST).read_bytes())
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    body = {key: value for key, value in manifest.items() if key != "digest"}
    manifest["digest"] = persist._digest(body)
    (ckpt / MANIFEST).write_bytes(json.dumps(manifest).encode())


# ------------------------------------------------------------------ item 1
class TestZeroK:
    def test_k0_with_the_ivf_engine_active(self):
        cfg = PoolConfig(
            dream_shape=(2, 2, 1),
            capacity=1100,
            embedding_dim=16,
            device="cpu",
            engine="faiss-ivf",
            ann_threshold=1024,
            coherence_threshold=0.0,
        )
        pool = DreamPool(cfg)
        pool.add(dreams(1100, shape=(2, 2, 1)), coherence=torch.ones(1100))
        assert pool.index.describe()["trained"]
        for mode in MODES:
            out = pool.retrieve(dreams(3, seed=1, shape=(2, 2, 1)), k=0, mode=mode, **mode_kwargs(mode))
            assert out.ids.shape == (3, 0) and out.scores.shape == (3, 0), mode
        assert pool.index.search(torch.randn(2, 16), 0)[1].shape == (2, 0)

    @pytest.mark.parametrize("engine", ["torch", "faiss-flat", "auto"])
    def test_k0_every_mode_and_engine(self, engine):
        pool = make_pool(engine=engine)
        for mode in MODES:
            out = pool.retrieve(dreams(2, seed=3), k=0, mode=mode, **mode_kwargs(mode))
            assert out.ids.shape == (2, 0), (engine, mode)


# ------------------------------------------------------------------ item 2
class TestUnallocatableSizes:
    @pytest.mark.parametrize(
        "overrides",
        [
            {"capacity": 10**12},
            {"embedding_dim": 10**9},
            {"dream_shape": (4096, 4096, 64)},
        ],
    )
    def test_typed_error_before_allocation(self, overrides):
        cfg = PoolConfig(**{"device": "cpu", **overrides})
        with pytest.raises(InsufficientMemoryError) as info:
            DreamPool(cfg)
        err = info.value
        assert isinstance(err, MemoryError) and isinstance(err, DreamPoolError)
        assert err.field in {"capacity", "embedding_dim", "dream_shape"}
        assert err.needed_bytes > err.available_bytes and f"{err.needed_bytes:,}" in str(err)

    def test_field_named_by_what_made_it_too_big(self, monkeypatch):
        monkeypatch.setattr(budget_mod, "available_bytes", lambda device: 10**6)
        for overrides, field in [
            ({"capacity": 10**6}, "capacity"),
            ({"dream_shape": (128, 128, 8)}, "dream_shape"),
            ({"embedding_dim": 10**6}, "embedding_dim"),
        ]:
            with pytest.raises(InsufficientMemoryError) as info:
                DreamPool(PoolConfig(device="cpu", **overrides))
            assert info.value.field == field and info.value.available_bytes == 10**6

    def test_percent_budget_more_than_is_free(self, monkeypatch):
        total = 8 * 2**30
        monkeypatch.setattr(
            budget_mod.ProcessMemory, "read", lambda self: budget_mod.MemoryReading(0, total, "psutil-rss")
        )
        monkeypatch.setattr(budget_mod, "available_bytes", lambda device: 2**20)
        with pytest.raises(InsufficientMemoryError) as info:
            DreamPool(PoolConfig(device="cpu", capacity=None, memory_budget_mb="50%"))
        assert info.value.field == "memory_budget_mb" and "50%" in str(info.value)

    def test_checkpoint_from_a_bigger_machine(self, tmp_path, monkeypatch, capsys):
        from dreampool_gpu.cli import main

        make_pool().save(tmp_path / "p")
        monkeypatch.setattr(budget_mod, "available_bytes", lambda device: 1000)
        with pytest.raises(InsufficientMemoryError):
            DreamPool.load(tmp_path / "p")
        assert main(["inspect", str(tmp_path / "p")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("dreampool: error: capacity=64 needs")


# ------------------------------------------------------------------ item 3
class TestSpecialFiles:
    @pytest.mark.parametrize("name", [MANIFEST, BANK])
    def test_fifo_does_not_block(self, tmp_path, name):
        make_pool().save(tmp_path / "p")
        (tmp_path / "p" / name).unlink()
        os.mkfifo(tmp_path / "p" / name)
        result: list[BaseException] = []
        worker = threading.Thread(target=lambda: result.append(_raises(DreamPool.load, tmp_path / "p")), daemon=True)
        worker.start()
        worker.join(timeout=20)
        if worker.is_alive():  # unblock the reader before failing
            fd = os.open(tmp_path / "p" / name, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)
            pytest.fail("load blocked on a FIFO")
        assert isinstance(result[0], CheckpointCorruptError) and "FIFO" in str(result[0])

    @pytest.mark.parametrize("name", [MANIFEST, BANK])
    def test_symlink_to_dev_zero(self, tmp_path, name):
        make_pool().save(tmp_path / "p")
        (tmp_path / "p" / name).unlink()
        os.symlink("/dev/zero", tmp_path / "p" / name)
        with pytest.raises(CheckpointCorruptError, match="character device"):
            DreamPool.load(tmp_path / "p")

    @pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
    def test_reads_at_most_the_declared_size_plus_one(self, tmp_path, monkeypatch):
        make_pool().save(tmp_path / "p")
        declared = json.loads((tmp_path / "p" / MANIFEST).read_bytes())["files"][BANK]["bytes"]
        with open(tmp_path / "p" / BANK, "ab") as f:
            f.write(b"\0" * 5_000_000)
        reads = []
        real = os.read

        def read(fd, n):
            data = real(fd, n)
            if os.readlink(f"/proc/self/fd/{fd}").endswith(BANK):
                reads.append(len(data))
            return data

        monkeypatch.setattr(persist.files.os, "read", read)
        with pytest.raises(CheckpointCorruptError, match="5000000 bytes more than the manifest lists"):
            persist.read_checkpoint(tmp_path / "p")
        assert reads and sum(reads) == declared + 1


def _raises(fn, *args):
    try:
        fn(*args)
    except BaseException as exc:  # noqa: BLE001 - handed to the test thread
        return exc
    return AssertionError("no error")


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


def test_config_replace_unknown_field():
    with pytest.raises(InvalidConfigurationError, match="bogus"):
        PoolConfig().replace(bogus=1)


# ------------------------------------------------------------------ item 7
class TestDocumentedInputs:
    def test_integer_utility_and_empty_feedback(self):
        pool = make_pool(n=4)
        ids = torch.tensor([0, 1])
        assert pool.feedback(ids, 1) == 2 and pool.feedback([2], [0]) == 1
        assert pool.metadata(ids)["utility"].tolist() == [1.0, 1.0]
        assert pool.feedback([], []) == 0

    def test_big_endian_numpy_dreams(self):
        pool = make_pool(n=0)
        native = dreams(3).numpy()
        big = native.astype(">f4")
        ids = pool.add(big, coherence=np.ones(3, dtype=">f4"))
        assert (ids >= 0).all()
        assert torch.equal(pool.dreams(ids), torch.from_numpy(native))

    def test_big_endian_npy_in_cli(self, tmp_path):
        from dreampool_gpu.cli import main

        make_pool().save(tmp_path / "p")
        np.save(tmp_path / "q.npy", dreams(5, seed=9).numpy().astype(">f4"))
        assert (
            main(
                [
                    "retrieve",
                    str(tmp_path / "p"),
                    str(tmp_path / "q.npy"),
                    "--out",
                    str(tmp_path / "r.safetensors"),
                    "--device",
                    "cpu",
                    "--no-progress",
                ]
            )
            == 0
        )
        from dreampool_gpu.batch import read_results

        ids, _ = read_results(tmp_path / "r.safetensors")
        assert ids.shape[0] == 5 and (ids[:, 0] >= 0).all()


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


# ------------------------------------------------------------------ item 9
class TestExtremeQueries:
    @pytest.mark.parametrize("scale", [1e20, 1e-30, 1e30])
    def test_cosine_scale_invariant(self, scale):
        pool = make_pool(n=30)
        q = torch.randn(4, pool.config.embedding_dim, generator=torch.Generator().manual_seed(2))
        want = pool.retrieve(q, k=5, mode="nearest")
        got = pool.retrieve(q * scale, k=5, mode="nearest")
        assert torch.equal(got.ids, want.ids)

    def test_float64_past_float32_range_is_refused(self):
        pool = make_pool(n=5)
        q = torch.full((1, pool.config.embedding_dim), 1e300, dtype=torch.float64)
        with pytest.raises(InvalidInputError, match="finite"):
            pool.retrieve(q, k=3, mode="nearest")

    def test_euclidean_overflow_is_a_typed_error(self):
        pool = make_pool(n=10, metric="euclidean")
        q = torch.ones(2, pool.config.embedding_dim) * 1e19
        with pytest.raises(InvalidInputError, match="euclidean"):
            pool.retrieve(q, k=3, mode="nearest")
        ok = pool.retrieve(torch.ones(2, pool.config.embedding_dim) * 1e17, k=3, mode="nearest")
        assert (ok.ids >= 0).all()


# ----------------------------------------------------------------- item 10
@pytest.mark.parametrize("length", [240, 250, 255])
def test_save_to_a_long_name(tmp_path, length):
    pool = make_pool(n=5)
    target = tmp_path / ("p" * length)
    pool.save(target)
    pool.add(dreams(2, seed=4), coherence=torch.ones(2))
    pool.save(target)  # the swap with an existing checkpoint goes through siblings too
    assert len(DreamPool.load(target)) == 7
    assert sorted(os.listdir(tmp_path)) == [target.name]


# ----------------------------------------------------------------- item 12
class TestCheckpointErrors:
    def test_missing_directory_is_not_found(self, tmp_path):
        with pytest.raises(CheckpointNotFoundError) as info:
            DreamPool.load(tmp_path / "nowhere")
        assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, DreamPoolError)
        assert str(info.value) == f"no checkpoint at {tmp_path / 'nowhere'}: no such file or directory"

    def test_a_regular_file(self, tmp_path):
        (tmp_path / "f").write_text("x")
        with pytest.raises(CheckpointCorruptError, match="a file, not a checkpoint directory"):
            DreamPool.load(tmp_path / "f")

    def test_one_appended_byte(self, tmp_path):
        make_pool().save(tmp_path / "p")
        with open(tmp_path / "p" / BANK, "ab") as f:
            f.write(b"\0")
        with pytest.raises(CheckpointCorruptError, match="1 bytes more than the manifest lists") as info:
            DreamPool.load(tmp_path / "p")
        assert "truncated" not in str(info.value)

    def test_truncated(self, tmp_path):
        make_pool().save(tmp_path / "p")
        data = (tmp_path / "p" / BANK).read_bytes()
        (tmp_path / "p" / BANK).write_bytes(data[:-3])
        with pytest.raises(CheckpointCorruptError, match="3 bytes missing"):
            DreamPool.load(tmp_path / "p")


# ------------------------------------------------------------------ item 4
class TestConsistency:
    def _state(self, ckpt, name):
        return json.loads((ckpt / name).read_bytes())

    @pytest.mark.parametrize("change", [{"encoder_seed": 7}, {"include_class": False}])
    def test_resigned_encoder_fields_are_refused(self, tmp_path, change):
        make_pool().save(tmp_path / "p")
        config = {**self._state(tmp_path / "p", persist.CONFIG), **change}
        resign(tmp_path / "p", persist.CONFIG, json.dumps(config).encode())
        with pytest.raises(CheckpointCorruptError, match="projection|state 'projection'") as info:
            DreamPool.load(tmp_path / "p")
        assert info.value.path == tmp_path / "p" / persist.ENCODER

    def _rewrite_bank(self, ckpt, edit):
        from safetensors.torch import load, save

        columns = load((ckpt / BANK).read_bytes())
        edit(columns)
        resign(ckpt, BANK, save(columns))

    def test_scaled_cosine_embeddings_are_refused(self, tmp_path):
        make_pool().save(tmp_path / "p")
        self._rewrite_bank(tmp_path / "p", lambda c: c["embeddings"].mul_(100))
        with pytest.raises(CheckpointCorruptError, match="unit norm"):
            DreamPool.load(tmp_path / "p")

    def test_chroma_of_other_dreams_is_refused(self, tmp_path):
        make_pool().save(tmp_path / "p")
        self._rewrite_bank(tmp_path / "p", lambda c: c["chroma"].copy_(c["chroma"].flip(0)))
        with pytest.raises(CheckpointCorruptError, match="chroma"):
            DreamPool.load(tmp_path / "p")

    def test_state_dict_is_spot_checked_too(self):
        pool = make_pool()
        state = pool.state_dict()
        state["bank"]["chroma"] = state["bank"]["chroma"].flip(0)
        fresh = DreamPool(pool.config)
        with pytest.raises(InvalidInputError, match="chroma"):
            fresh.load_state_dict(state)
        assert len(fresh) == 0

    @pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
    def test_clean_pools_pass_in_every_dream_dtype(self, tmp_path, dtype):
        pool = make_pool(n=60, dream_dtype=dtype)
        pool.save(tmp_path / "p")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert len(DreamPool.load(tmp_path / "p")) == 60

    def test_index_from_another_pool_is_rebuilt(self, tmp_path):
        cfg = {
            "dream_shape": (2, 2, 1),
            "capacity": 1100,
            "embedding_dim": 16,
            "engine": "faiss-ivf",
            "ann_threshold": 1024,
        }
        a, b = make_pool(n=1100, seed=0, **cfg), make_pool(n=1100, seed=5, **cfg)
        a.save(tmp_path / "a")
        b.save(tmp_path / "b")
        resign(tmp_path / "a", INDEX, (tmp_path / "b" / INDEX).read_bytes())
        with pytest.warns(CheckpointRecoveryWarning, match="another bank"):
            loaded = DreamPool.load(tmp_path / "a")
        q = dreams(8, seed=11, shape=(2, 2, 1))
        assert torch.equal(loaded.retrieve(q, k=5, mode="nearest").ids, a.retrieve(q, k=5, mode="nearest").ids)


# ----------------------------------------------------------------- item 11
class TestCliPaths:
    def _setup(self, tmp_path):
        make_pool().save(tmp_path / "p")
        np.save(tmp_path / "q.npy", dreams(4, seed=2).numpy())
        return str(tmp_path / "p"), str(tmp_path / "q.npy")

    def test_out_equal_to_queries_is_refused(self, tmp_path, capsys):
        from dreampool_gpu.cli import main

        pool, _ = self._setup(tmp_path)
        from safetensors.torch import save_file

        save_file({"queries": dreams(3).contiguous()}, str(tmp_path / "q.safetensors"))
        before = (tmp_path / "q.safetensors").read_bytes()
        assert (
            main(
                [
                    "retrieve",
                    pool,
                    str(tmp_path / "q.safetensors"),
                    "--out",
                    str(tmp_path / "q.safetensors"),
                    "--device",
                    "cpu",
                ]
            )
            == 2
        )
        assert "invalid --out" in capsys.readouterr().err
        assert (tmp_path / "q.safetensors").read_bytes() == before

    def test_out_inside_the_pool_is_refused(self, tmp_path, capsys):
        from dreampool_gpu.cli import main

        pool, queries = self._setup(tmp_path)
        before = sorted(os.listdir(pool))
        assert main(["retrieve", pool, queries, "--out", f"{pool}/r.safetensors", "--device", "cpu"]) == 2
        assert "inside" in capsys.readouterr().err and sorted(os.listdir(pool)) == before

    def test_inspect_and_retrieve_recover_the_old_copy(self, tmp_path, capsys):
        from dreampool_gpu.cli import main

        pool, queries = self._setup(tmp_path)
        os.rename(pool, tmp_path / ".p.old-999999999-abcdef")  # an interrupted save's leftover
        with pytest.warns(CheckpointRecoveryWarning):
            assert main(["inspect", pool, "--json"]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["size"] == 40 and summary["checkpoint_bytes"] > 0
        with pytest.warns(CheckpointRecoveryWarning):
            assert (
                main(
                    [
                        "retrieve",
                        pool,
                        queries,
                        "--out",
                        str(tmp_path / "r.safetensors"),
                        "--device",
                        "cpu",
                        "--no-progress",
                    ]
                )
                == 0
            )

    def test_refused_pickle_is_one_line(self, tmp_path, capsys):
        from fractions import Fraction

        from dreampool_gpu.cli import main

        pool, _ = self._setup(tmp_path)
        torch.save({"queries": torch.rand(2, 3), "other": Fraction(1, 2)}, tmp_path / "bad.pt")
        assert (
            main(
                [
                    "retrieve",
                    pool,
                    str(tmp_path / "bad.pt"),
                    "--out",
                    str(tmp_path / "r.safetensors"),
                    "--device",
                    "cpu",
                ]
            )
            == 2
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("dreampool: error: invalid queries")

    def test_missing_pool_is_not_found(self, tmp_path, capsys):
        from dreampool_gpu.cli import main

        assert main(["inspect", str(tmp_path / "nowhere")]) == 2
        assert capsys.readouterr().err.strip() == (
            f"dreampool: error: no checkpoint at {tmp_path / 'nowhere'}: no such file or directory"
        )


# ----------------------------------------------------------------- item 16
class TestCliFirstHour:
    def test_k_defaults_to_10_and_help_names_the_mode(self):
        from dreampool_gpu.cli import build_parser

        parser = build_parser()
        args = parser.parse_args(["retrieve", "p", "q.npy", "--out", "o.safetensors"])
        assert args.k == 10
        sub = parser._subparsers._group_actions[0].choices["retrieve"]
        text = sub.format_help()
        assert "(default: hybrid)" in " ".join(text.split()) and "(default 10" in text

    def test_errors_name_the_flag(self, tmp_path, capsys):
        from dreampool_gpu.cli import main

        make_pool().save(tmp_path / "p")
        np.save(tmp_path / "q.npy", dreams(4, seed=2).numpy())
        assert (
            main(
                [
                    "retrieve",
                    str(tmp_path / "p"),
                    str(tmp_path / "q.npy"),
                    "--out",
                    str(tmp_path / "r.safetensors"),
                    "--mode",
                    "class",
                    "--class-hint",
                    "42",
                    "--device",
                    "cpu",
                    "--no-progress",
                ]
            )
            == 2
        )
        err = capsys.readouterr().err
        assert "invalid --class-hint:" in err and "class_hint" not in err

    def test_single_dream_hint(self, tmp_path, capsys):
        from dreampool_gpu.cli import main

        pool = make_pool()
        with pytest.raises(DreamPoolError, match="batch dimension"):
            pool.add(dreams(1)[0], coherence=1.0)
        with pytest.raises(DreamPoolError, match="batch dimension"):
            pool.retrieve(dreams(1)[0], k=3)
        pool.save(tmp_path / "p")
        np.save(tmp_path / "q.npy", dreams(1).numpy()[0])
        assert (
            main(
                [
                    "retrieve",
                    str(tmp_path / "p"),
                    str(tmp_path / "q.npy"),
                    "--out",
                    str(tmp_path / "r.safetensors"),
                    "--device",
                    "cpu",
                ]
            )
            == 2
        )
        assert "batch dimension" in capsys.readouterr().err

    def test_unknown_feedback_ids_are_listed(self):
        pool = make_pool(n=5)
        with pytest.raises(InvalidInputError, match="2 unknown: 7, 99"):
            pool.feedback(torch.tensor([0, 7, 99, 7]), 0.5)


# ----------------------------------------------------------------- item 20
def test_slow_tests_are_marked_and_the_license_is_spdx():
    from pathlib import Path

    import tomllib

    root = Path(__file__).resolve().parent.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT"  # an SPDX expression, not the deprecated {text = ...} table
    import importlib

    for module, name in [
        ("test_stress", "TestStress"),
        ("test_crash", "TestCrash"),
        ("test_concurrency", "TestThreads"),
    ]:
        cls = getattr(importlib.import_module(module), name)  # pytest puts tests/ on sys.path
        assert any(mark.name == "slow" for mark in cls.pytestmark), name
    script = (root / "scripts" / "test.sh").read_text()
    assert "--quick" in script and '-m "not slow"' in script


# ----------------------------------------------------------------- item 14
class TestTorchHabits:
    def test_contains(self):
        pool = make_pool(n=60)
        pool.add(dreams(20, seed=3), coherence=torch.ones(20))  # capacity 64: some entries leave
        found = pool.metadata(torch.arange(pool.bank.next_id))["found"].tolist()
        assert 0 < sum(found) < len(found)
        assert [i in pool for i in range(pool.bank.next_id)] == found
        assert pool.bank.next_id not in pool and -1 not in pool
        last = pool.bank.next_id - 1
        assert torch.tensor(last) in pool and np.int64(last) in pool
        for bad in (True, 1.0, "3", torch.tensor(1.0)):
            with pytest.raises(InvalidInputError):
                bad in pool  # noqa: B015

    def test_repr(self):
        pool = make_pool(n=10)
        text = repr(pool)
        assert text.startswith("DreamPool(size=10/64, device=cpu, engine=") and "MiB" in text

    def test_to_same_device_returns_the_pool(self):
        pool = make_pool(n=10)
        assert pool.to("cpu") is pool and pool.to(torch.device("cpu")) is pool

    def test_to_absent_cuda_leaves_the_pool(self):
        if torch.cuda.is_available():
            pytest.skip("CUDA is present")
        from dreampool_gpu.errors import DeviceUnavailableError

        pool = make_pool(n=10)
        with pytest.raises(DeviceUnavailableError):
            pool.to("cuda")
        assert pool.device == torch.device("cpu") and len(pool) == 10

    def test_move_path_keeps_every_answer(self):
        """The move itself, exercised on CPU: the pool believes it is elsewhere and comes back."""
        pool = make_pool(n=50)
        q = dreams(6, seed=8)
        before = {mode: pool.retrieve(q, k=5, mode=mode, **mode_kwargs(mode)).ids for mode in MODES}
        pool.device = torch.device("cpu", 0)  # any device other than torch.device("cpu")
        index = pool.index
        assert pool.to("cpu") is pool and pool.device == torch.device("cpu") and pool.index is not index
        for mode in MODES:
            assert torch.equal(pool.retrieve(q, k=5, mode=mode, **mode_kwargs(mode)).ids, before[mode]), mode

    @pytest.mark.gpu
    def test_cuda_round_trip(self):
        pool = make_pool(n=50)
        q = dreams(6, seed=8)
        want = pool.retrieve(q, k=5, mode="similar").ids
        assert pool.to("cuda") is pool and pool.bank.columns["dreams"].is_cuda
        assert pool.bank.columns["dreams"].dtype == torch.float32  # the stored dtype is kept
        assert torch.equal(pool.retrieve(q, k=5, mode="similar").ids.cpu(), want)
        assert torch.equal(pool.to("cpu").retrieve(q, k=5, mode="similar").ids, want)


# ----------------------------------------------------------------- item 15
class TestWhere:
    def _pools(self, n=60, engine="auto"):
        """A pool of n entries and one holding only those with coherence >= 0.5, added in the same order."""
        g = torch.Generator().manual_seed(4)
        coherence = torch.rand(n, generator=g)
        labels = torch.randint(-1, 10, (n,), generator=g)
        batch = dreams(n, seed=6)
        cfg = PoolConfig(
            dream_shape=SHAPE, capacity=n, device="cpu", coherence_threshold=0.0, engine=engine, features="eager"
        )  # eager: the encoder's statistics are fitted by add, before they are copied
        full, part = DreamPool(cfg), DreamPool(cfg)
        full.add(batch, coherence=coherence, class_label=labels)
        kept = coherence >= 0.5
        part.add(batch[kept], coherence=coherence[kept], class_label=labels[kept])
        part.encoder.load_state_dict(full.encoder.state_dict())  # the same feature statistics
        part.reembed()
        return full, part

    @pytest.mark.parametrize("mode", MODES)
    def test_where_equals_a_pool_of_the_kept_entries(self, mode):
        full, part = self._pools()
        q = dreams(5, seed=12)
        kwargs = {"k": 4, "mode": mode, "with_dreams": True, **mode_kwargs(mode)}
        by_callable = full.retrieve(q, where=lambda m: m["coherence"] >= 0.5, **kwargs)
        by_mask = full.retrieve(q, where=full.bank.columns["coherence"] >= 0.5, **kwargs)
        want = part.retrieve(q, **kwargs)
        assert torch.equal(by_callable.dreams, want.dreams) and torch.equal(by_mask.dreams, want.dreams)
        torch.testing.assert_close(by_callable.scores, want.scores)
        assert torch.equal(by_callable.ids, by_mask.ids)

    def test_columns_offered_to_the_callable(self):
        full, _ = self._pools(n=10)
        seen = {}
        full.retrieve(dreams(1), k=2, where=lambda m: seen.update(m) or m["inserted_at"] >= 0)
        assert set(seen) == {
            "coherence",
            "energy",
            "violation",
            "utility",
            "util_mean",
            "feedback_count",
            "usage",
            "class_label",
            "hue_category",
            "inserted_at",
            "ids",
        }
        assert all(t.shape == (10,) and t.device == full.device for t in seen.values())

    def test_bad_filters_are_typed_and_change_nothing(self):
        full, _ = self._pools(n=10)
        usage = full.bank.columns["usage"].clone()
        for bad in (torch.ones(9, dtype=torch.bool), torch.ones(10), lambda m: m["nope"], lambda m: 1):
            with pytest.raises(DreamPoolError):
                full.retrieve(dreams(1), k=2, where=bad)
        assert torch.equal(full.bank.columns["usage"], usage) and full.counters["queries"] == 0

    def test_nothing_qualifies(self):
        full, _ = self._pools(n=10)
        out = full.retrieve(dreams(2), k=3, mode="nearest", where=torch.zeros(10, dtype=torch.bool))
        assert (out.ids == -1).all()


# ----------------------------------------------------------------- item 19
def test_brightness_aware_chroma_metric():
    pool = DreamPool(PoolConfig(dream_shape=(1, 1, 1), capacity=16, device="cpu", coherence_threshold=0.0))
    query = torch.tensor([[0.6, 0.65, 0.8]])  # light blue-grey
    black = torch.zeros(5, 1, 1, 1, 3) + 0.05 * query  # near-black of exactly the query's hue
    light = torch.zeros(1, 1, 1, 1, 3) + torch.tensor([0.58, 0.66, 0.79])  # light blue-grey, added last
    pool.add(torch.cat([black, light]), coherence=torch.ones(6))
    by_hue = pool.retrieve(query, k=1, mode="similar")
    by_rgb = pool.retrieve(query, k=1, mode="similar", chroma_metric="euclidean")
    assert by_rgb.ids.tolist() == [[5]] and by_hue.ids.tolist() != [[5]]
    with pytest.raises(InvalidInputError, match="chroma_metric"):
        pool.retrieve(query, k=1, chroma_metric="manhattan")


# ----------------------------------------------------------------- item 17
def test_batch_example_keeps_what_it_saves(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            str(root / "docs" / "examples" / "batch_retrieval.py"),
            "--entries",
            "300",
            "--queries",
            "500",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    kept = tmp_path / "dreampool-batch-example"
    assert "kept in dreampool-batch-example" in done.stdout
    assert len(DreamPool.load(kept / "pool")) == 300 and (kept / "results.safetensors").is_file()


# ----------------------------------------------------------------- item 13
def test_the_spec_is_in_the_repository_and_cited_by_section():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    spec = (root / "docs" / "spec.md").read_text()
    sections = set(re.findall(r"^## (.+)$", spec, flags=re.M))
    cited, stale = set(), []
    for path in [
        *root.glob("dreampool_gpu/**/*.py"),
        *root.glob("tests/*.py"),
        *root.glob("benchmarks/*.py"),
        *root.glob("configs/*.yaml"),
        *root.glob("docs/*.md"),
        root / "README.md",
    ]:
        text = path.read_text()
        cited |= set(
            re.findall(r"docs/spec\.md §([A-Z][A-Za-z ]+?[a-z])(?=[),.:;]|\s*$| \(| the| is)", text, flags=re.M)
        )
        if path.name != "encoders.py" and path != Path(__file__).resolve():  # encoders.py: the encoder rework
            stale += [str(path) for name in ("DOMAIN.md", "ORIGINAL.md") if name in text]
    assert cited and cited <= sections, cited - sections
    assert not stale


@pytest.mark.gpu
def test_where_on_cuda_matches_cpu():
    cpu = make_pool(n=50)
    gpu = make_pool(n=50, device="cuda")
    q = dreams(4, seed=13)
    for mode in ["similar", "class", "balanced", "utility", "nearest"]:  # exact on both devices
        kwargs = {"k": 4, "mode": mode, **mode_kwargs(mode)}
        want = cpu.retrieve(q, where=lambda m: m["coherence"] >= 0.0, **kwargs).ids
        got = gpu.retrieve(q.cuda(), where=lambda m: m["hue"] >= 0, **kwargs).ids
        assert torch.equal(got.cpu(), want), mode
