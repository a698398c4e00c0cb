"""batch.py on its own (not through the CLI): query files, checks, jobs, resumption, atomic output."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _equality import assert_same_results
from safetensors.torch import save_file

from dreampool_gpu import DreamPool, PoolConfig
from dreampool_gpu.batch import (
    RETRIEVE_OPTIONS,
    QueryFile,
    check_out_path,
    check_queries,
    read_results,
    run_retrieval_job,
    work_dir,
    workdir,
)
from dreampool_gpu.config import RetrievalMode
from dreampool_gpu.errors import DimensionMismatchError, InvalidInputError
from dreampool_gpu.retrieval.modes import MODES

SHAPE = (3, 4, 2)


def _dreams(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 1, 1, 1, 3, generator=g)
    return (base + 0.05 * (torch.rand(n, *SHAPE, 3, generator=g) - 0.5)).clamp(0, 1)


@pytest.fixture(scope="module")
def saved_pool(tmp_path_factory):
    pool = DreamPool(PoolConfig(dream_shape=SHAPE, capacity=64, device="cpu", coherence_threshold=0.0, engine="torch"))
    pool.add(
        _dreams(30, 0),
        coherence=torch.rand(30, generator=torch.Generator().manual_seed(1)),
        class_label=torch.arange(30) % 10,
    )
    path = tmp_path_factory.mktemp("pool") / "ck"
    pool.save(path)
    return path


@pytest.fixture
def queries_npy(tmp_path):
    path = tmp_path / "q.npy"
    np.save(path, _dreams(7, 2).numpy())
    return path


class TestQueryFile:
    def test_npy_reads_row_ranges(self, queries_npy):
        q = QueryFile(queries_npy)
        assert len(q) == 7 and q.shape == [7, *SHAPE, 3] and q.dtype == "float32"
        assert torch.equal(q.read(2, 5), _dreams(7, 2)[2:5])

    def test_safetensors_picks_the_named_key(self, tmp_path):
        path = tmp_path / "q.safetensors"
        save_file({"queries": torch.rand(4, 3), "other": torch.rand(2, 3)}, str(path))
        q = QueryFile(path)
        assert q.key == "queries" and len(q) == 4
        assert len(QueryFile(path, key="other")) == 2

    def test_pt_tensor(self, tmp_path):
        path = tmp_path / "q.pt"
        torch.save(torch.rand(5, 3, dtype=torch.float64), path)
        q = QueryFile(path)
        assert q.dtype == "float64" and q.read(0, 5).dtype == torch.float64

    @pytest.mark.parametrize("name, data", [("q.txt", b"x"), ("q.npy", b"not an array")])
    def test_unreadable_or_unknown_files_are_refused(self, tmp_path, name, data):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(InvalidInputError, match="queries"):
            QueryFile(path)

    def test_integer_queries_are_refused(self, tmp_path):
        path = tmp_path / "q.npy"
        np.save(path, np.zeros((3, 3), dtype=np.int64))
        with pytest.raises(InvalidInputError, match="floating-point"):
            QueryFile(path)

    def test_missing_file(self, tmp_path):
        with pytest.raises(InvalidInputError, match="no such file"):
            QueryFile(tmp_path / "absent.npy")

    def test_identity_changes_with_the_file(self, queries_npy):
        before = QueryFile(queries_npy).identity()
        np.save(queries_npy, _dreams(8, 3).numpy())
        after = QueryFile(queries_npy).identity()
        assert before["shape"] == [7, *SHAPE, 3] and after["shape"] == [8, *SHAPE, 3]


class TestChecks:
    def test_check_queries_by_mode(self, tmp_path, saved_pool):
        pool = DreamPool.load(saved_pool)
        path = tmp_path / "e.npy"
        np.save(path, np.zeros((2, pool.config.embedding_dim), dtype=np.float32))
        check_queries(QueryFile(path), pool, RetrievalMode.NEAREST)  # embeddings: fine for nearest
        with pytest.raises(DimensionMismatchError, match="takes no embeddings"):
            check_queries(QueryFile(path), pool, RetrievalMode.SIMILAR)

    def test_one_dream_without_batch_dimension_gets_a_hint(self, tmp_path, saved_pool):
        path = tmp_path / "one.npy"
        np.save(path, _dreams(1, 0)[0].numpy())
        with pytest.raises(DimensionMismatchError, match=r"dream\[None\]"):
            check_queries(QueryFile(path), DreamPool.load(saved_pool), RetrievalMode.HYBRID)

    def test_out_path_never_overwrites_queries_or_the_pool(self, tmp_path, saved_pool, queries_npy):
        with pytest.raises(InvalidInputError, match="queries file"):
            check_out_path(queries_npy, saved_pool, queries_npy)
        with pytest.raises(InvalidInputError, match="outside the pool"):
            check_out_path(saved_pool / "r.safetensors", saved_pool, queries_npy)
        check_out_path(tmp_path / "r.safetensors", saved_pool, queries_npy)  # returns: allowed

    def test_options_come_from_the_mode_table(self):
        read = {o for spec in MODES.values() for o in spec.options}
        assert set(RETRIEVE_OPTIONS) == read
        assert "where" not in RETRIEVE_OPTIONS and "with_dreams" not in RETRIEVE_OPTIONS


class TestJob:
    def test_results_equal_the_pool_in_one_call(self, tmp_path, saved_pool, queries_npy):
        out = tmp_path / "r.safetensors"
        report = run_retrieval_job(
            saved_pool, queries_npy, out, k=4, mode="hybrid", chunk=3, device="cpu", options={"class_hint": 2}
        )
        assert report.queries == 7 and report.chunks == 3 and report.computed == 3 and report.width == 4
        ids, scores = read_results(out)
        want = DreamPool.load(saved_pool).retrieve(_dreams(7, 2), k=4, mode="hybrid", class_hint=2)
        assert_same_results(ids, scores, want.ids, want.scores)  # chunks of 3, 3, 1 vs one call of 7
        assert not work_dir(out).exists()  # parts are removed once merged
        assert json.loads(json.dumps(report.to_dict()))["queries"] == 7

    def test_a_finished_job_is_not_recomputed(self, tmp_path, saved_pool, queries_npy):
        out = tmp_path / "r.safetensors"
        run_retrieval_job(saved_pool, queries_npy, out, k=3, mode="similar", chunk=4, device="cpu")
        again = run_retrieval_job(saved_pool, queries_npy, out, k=3, mode="similar", chunk=4, device="cpu")
        assert again.already_done and again.computed == 0

    def test_an_interrupted_job_resumes_from_its_chunks(self, tmp_path, saved_pool, queries_npy, monkeypatch):
        out = tmp_path / "r.safetensors"
        real = workdir.save_chunk
        saved = []

        def stop_after_two(parts, index, ids, scores):
            if len(saved) == 2:
                raise KeyboardInterrupt
            real(parts, index, ids, scores)
            saved.append(index)

        monkeypatch.setattr(workdir, "save_chunk", stop_after_two)
        with pytest.raises(KeyboardInterrupt):
            run_retrieval_job(saved_pool, queries_npy, out, k=3, mode="nearest", chunk=2, device="cpu")
        assert not out.exists() and work_dir(out).is_dir()
        monkeypatch.setattr(workdir, "save_chunk", real)
        report = run_retrieval_job(saved_pool, queries_npy, out, k=3, mode="nearest", chunk=2, device="cpu")
        assert report.resumed == 2 and report.computed == report.chunks - 2
        ids, _ = read_results(out)
        assert torch.equal(ids, DreamPool.load(saved_pool).retrieve(_dreams(7, 2), k=3, mode="nearest").ids)

    @pytest.mark.parametrize(
        "bad, match",
        [
            ({"options": {"nope": 1}}, "names among"),
            ({"chunk": 0}, "chunk"),
            ({"out_name": "r.npy"}, r"\.safetensors"),
        ],
    )
    def test_bad_arguments_write_nothing(self, tmp_path, saved_pool, queries_npy, bad, match):
        out = tmp_path / bad.pop("out_name", "r.safetensors")
        with pytest.raises(InvalidInputError, match=match):
            run_retrieval_job(saved_pool, queries_npy, out, device="cpu", **bad)
        assert not out.exists() and not work_dir(out).exists()

    def test_chroma_metric_passes_through(self, tmp_path, saved_pool, queries_npy):
        out = tmp_path / "r.safetensors"
        run_retrieval_job(
            saved_pool, queries_npy, out, k=3, mode="similar", device="cpu", options={"chroma_metric": "euclidean"}
        )
        want = DreamPool.load(saved_pool).retrieve(_dreams(7, 2), k=3, mode="similar", chroma_metric="euclidean")
        assert torch.equal(read_results(out)[1], want.scores)


def test_deferred_checks_fail_in_their_chunk(tmp_path):
    """A batch job on a deferred-checks pool raises the bad chunk's error, as with immediate checks."""
    import numpy as np
    import pytest
    import torch

    from dreampool_gpu import DreamPool, PoolConfig
    from dreampool_gpu.batch import run_retrieval_job
    from dreampool_gpu.errors import InvalidInputError

    pool = DreamPool(PoolConfig(dream_shape=(4, 4, 1), capacity=64, device="cpu", checks="deferred"))
    pool.add(torch.rand(32, 4, 4, 1, 3), coherence=1.0)
    pool.save(tmp_path / "pool")
    queries = np.random.default_rng(0).random((40, 3)).astype(np.float32)
    queries[25, 1] = np.nan
    np.save(tmp_path / "q.npy", queries)
    with pytest.raises(InvalidInputError, match="finite") as info:
        run_retrieval_job(
            tmp_path / "pool",
            tmp_path / "q.npy",
            tmp_path / "out.safetensors",
            k=3,
            mode="similar",
            chunk=10,
            device="cpu",
        )
    assert "rows 20..29" in "".join(getattr(info.value, "__notes__", []))
