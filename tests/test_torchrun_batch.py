"""`dreampool retrieve` under torchrun: 2 gloo ranks on 127.0.0.1, one output equal to a single process's."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _equality import assert_same_results

from dreampool_gpu import DreamPool, PoolConfig
from dreampool_gpu.batch import read_results, run_retrieval_job, work_dir

pytest.importorskip("torch.distributed")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is needed", allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
SHAPE = (3, 4, 2)
CHUNK = 4  # 23 queries: chunks 0..5, rank 0 answers 0, 2, 4 and rank 1 answers 1, 3, 5
# rank 1 is interrupted before it writes its first chunk; the CLI does the rest
INTERRUPTED = """
import os, sys
from dreampool_gpu.batch import workdir
from dreampool_gpu.cli import main

if os.environ["RANK"] == "1":
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    workdir.save_chunk = interrupted
sys.exit(main(sys.argv[1:]))
"""


def _dreams(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 1, 1, 1, 3, generator=g)
    return (base + 0.05 * (torch.rand(n, *SHAPE, 3, generator=g) - 0.5)).clamp(0, 1)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A saved 30-entry pool, 23 queries and the single-process result."""
    where = tmp_path_factory.mktemp("torchrun")
    pool = DreamPool(PoolConfig(dream_shape=SHAPE, capacity=64, device="cpu", coherence_threshold=0.0, engine="torch"))
    pool.add(
        _dreams(30, 0),
        coherence=torch.rand(30, generator=torch.Generator().manual_seed(1)),
        class_label=torch.arange(30) % 10,
    )
    pool.save(where / "pool")
    np.save(where / "q.npy", _dreams(23, 2).numpy())
    single = where / "single.safetensors"
    run_retrieval_job(where / "pool", where / "q.npy", single, k=10, mode="hybrid", chunk=CHUNK, device="cpu")
    return where


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun(
    job: Path, out: Path, *, script: Path | None = None, queries: str = "q.npy"
) -> subprocess.CompletedProcess[str]:
    target = [str(script)] if script else ["-m", "dreampool_gpu.cli"]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        *target,
        "retrieve",
        str(job / "pool"),
        str(job / queries),
        "--out",
        str(out),
        "--k",
        "10",
        "--mode",
        "hybrid",
        "--chunk",
        str(CHUNK),
        "--device",
        "cpu",
        "--dist-timeout",
        "30",
        "--json",
        "--no-progress",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)


def _report(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("{") : stdout.rindex("}") + 1])


def test_two_ranks_write_the_single_process_result_bit_for_bit(job):
    out = job / "two.safetensors"
    run = _torchrun(job, out)
    assert run.returncode == 0, run.stderr
    assert out.read_bytes() == (job / "single.safetensors").read_bytes()
    assert not work_dir(out).exists()
    report = _report(run.stdout)  # printed by rank 0 only
    assert run.stdout.count('"computed"') == 1
    assert (report["chunks"], report["computed"], report["resumed"], report["computed_queries"]) == (6, 6, 0, 23)


def test_one_failed_rank_stops_both_and_the_rerun_resumes_its_partners_chunks(job, tmp_path):
    out = tmp_path / "resumed.safetensors"
    script = tmp_path / "interrupted.py"
    script.write_text(INTERRUPTED)
    failed = _torchrun(job, out, script=script)
    assert failed.returncode != 0 and not out.exists()
    assert "dreampool: error: rank 1 failed (retrieval): interrupted" in failed.stderr  # rank 0, exit 2
    assert "dreampool: interrupted; finished chunks are kept in" in failed.stderr  # rank 1, exit 130
    parts = work_dir(out)
    kept = sorted(p.name for p in parts.glob("chunk-*.safetensors"))
    assert kept == [f"chunk-{i:06d}.safetensors" for i in (0, 2, 4)]
    assert json.loads((parts / "progress-rank0.json").read_text())["done"] == [0, 2, 4]
    single_ids, _ = read_results(job / "single.safetensors")
    assert torch.equal(read_results(parts / "chunk-000002.safetensors")[0], single_ids[8:12])

    rerun = _torchrun(job, out)
    assert rerun.returncode == 0, rerun.stderr
    report = _report(rerun.stdout)  # rank 0's chunks 0, 2, 4 are reused, 1, 3, 5 (11 rows) computed
    assert (report["computed"], report["resumed"], report["computed_queries"]) == (3, 3, 11)
    assert out.read_bytes() == (job / "single.safetensors").read_bytes()
    assert not parts.exists()


def test_chroma_queries_with_near_repeats_equal_a_single_process(job):
    """Chroma queries in an embedding mode, some repeated and some 0.0004 apart: the query cache
    never hands a query another's embedding, so two ranks answer as one process does."""
    g = torch.Generator().manual_seed(5)
    base = torch.rand(12, 3, generator=g)
    chroma = torch.cat([base, base[:6] + 0.0004, base[:5]]).clamp(0, 1)  # 23 queries
    np.save(job / "chroma.npy", chroma.numpy())
    single = job / "chroma-single.safetensors"
    run_retrieval_job(job / "pool", job / "chroma.npy", single, k=10, mode="hybrid", chunk=CHUNK, device="cpu")
    out = job / "chroma-two.safetensors"
    run = _torchrun(job, out, queries="chroma.npy")
    assert run.returncode == 0, run.stderr
    got, want = read_results(out), read_results(single)
    assert_same_results(got[0], got[1], want[0], want[1])
    fresh = DreamPool.load(job / "pool").retrieve(chroma, k=10, mode="hybrid")  # one call, no history
    assert_same_results(got[0], got[1], fresh.ids, fresh.scores)
