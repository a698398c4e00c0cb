"""Issue-15 regressions (adversarial run, new-user trial): checkpoints."""

from __future__ import annotations

import json
import os
import threading
import warnings

import pytest
import torch
from _hardening import (
    dreams,
    make_pool,
    resign,
)

from dreampool_gpu import DreamPool, persist
from dreampool_gpu.errors import (
    CheckpointCorruptError,
    CheckpointNotFoundError,
    DreamPoolError,
    InvalidInputError,
)
from dreampool_gpu.persist import BANK, INDEX, MANIFEST, CheckpointRecoveryWarning


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
