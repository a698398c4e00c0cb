"""Issue-15 regressions (adversarial run, new-user trial): documented inputs and torch habits of the pool."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _hardening import (
    MODES,
    dreams,
    make_pool,
    mode_kwargs,
)

from dreampool_gpu.errors import (
    InvalidInputError,
)


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
