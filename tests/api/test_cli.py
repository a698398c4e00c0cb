"""The ``dreampool`` command, in-process: every command, its errors, and resuming a batch job."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dreampool_gpu import DreamPool, PoolConfig, cli, score_dreams
from dreampool_gpu import batch as batch_mod
from dreampool_gpu.batch import read_results, work_dir, workdir
from dreampool_gpu.dreams import synthetic_dreams

SHAPE = (4, 4, 2)
N_QUERIES = 1000
CHUNK = 300  # does not divide N_QUERIES: the last chunk is short


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved 250-entry CPU pool and query files in every accepted format."""
    root = tmp_path_factory.mktemp("cli")
    pool = DreamPool(PoolConfig(dream_shape=SHAPE, capacity=300, coherence_threshold=0.0, device="cpu"))
    generator = torch.Generator().manual_seed(0)
    dreams, labels = synthetic_dreams(250, SHAPE, generator=generator)
    scores = score_dreams(dreams)
    pool.add(
        dreams,
        coherence=scores.coherence,
        energy=scores.energy,
        violation=scores.violation,
        class_label=labels,
    )
    pool.save(root / "pool")
    chroma = torch.rand(N_QUERIES, 3, generator=generator)
    np.save(root / "chroma.npy", chroma.numpy())
    np.save(root / "chroma64.npy", chroma.double().numpy())
    save_file({"queries": chroma}, str(root / "chroma.safetensors"))
    save_file({"a": chroma.clone(), "b": chroma[:10].clone()}, str(root / "two.safetensors"))
    query_dreams, _ = synthetic_dreams(40, SHAPE, generator=generator)
    torch.save(query_dreams, root / "dreams.pt")
    torch.save({"queries": chroma[:50], "other": torch.zeros(2)}, root / "dict.pt")
    torch.save(torch.randn(30, 64), root / "emb64.pt")
    np.save(root / "emb32.npy", np.random.default_rng(0).standard_normal((30, 32)).astype(np.float32))
    np.save(root / "ints.npy", np.zeros((10, 3), dtype=np.int64))
    np.save(root / "wide.npy", np.zeros((10, 7), dtype=np.float32))
    np.save(root / "nan.npy", np.full((10, 3), np.nan, dtype=np.float32))
    np.save(root / "empty.npy", np.zeros((0, 3), dtype=np.float32))
    late_nan = chroma.numpy().copy()
    late_nan[700] = np.nan  # in the third chunk of CHUNK rows
    np.save(root / "late_nan.npy", late_nan)
    (root / "notes.txt").write_text("not queries")
    return root


def _run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _retrieve(capsys, saved, queries, out, *extra):
    return _run(capsys, "retrieve", saved / "pool", saved / queries, "--out", out, "--no-progress", *extra)


class TestHelp:
    @pytest.mark.parametrize("command", ["demo", "info", "inspect", "retrieve", "bench"])
    def test_every_command_has_help(self, capsys, command):
        with pytest.raises(SystemExit) as exc:
            cli.main([command, "--help"])
        assert exc.value.code == 0
        assert f"usage: dreampool {command}" in capsys.readouterr().out

    def test_top_level_lists_commands(self, capsys):
        with pytest.raises(SystemExit):
            cli.main(["--help"])
        out = capsys.readouterr().out
        for command in ("demo", "info", "inspect", "retrieve", "bench"):
            assert command in out

    def test_demo_help_names_every_arm(self, capsys):
        from dreampool_gpu.demo import ARMS

        with pytest.raises(SystemExit):
            cli.main(["demo", "--help"])
        out = " ".join(capsys.readouterr().out.split())  # argparse wraps the help text
        assert ",".join(ARMS) in out

    def test_an_unknown_arm_is_a_usage_error(self, capsys):
        from dreampool_gpu.demo import ARMS

        with pytest.raises(SystemExit) as exc:
            cli.main(["demo", "--arms", "none,bogus", "--no-progress"])
        assert exc.value.code == 2
        assert f"expected a comma-separated subset of {','.join(ARMS)}, got 'none,bogus'" in capsys.readouterr().err

    def test_the_demo_is_imported_only_by_its_command(self):
        code = (
            "import sys; from dreampool_gpu import cli; "
            "cli.build_parser().parse_args(['info']); "
            "assert 'dreampool_gpu.demo' not in sys.modules, 'imported'"
        )
        root = Path(cli.__file__).resolve().parent.parent  # this checkout, not an installed copy
        subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(root)})

    def test_unknown_argument_is_a_usage_error(self, capsys):
        with pytest.raises(SystemExit) as exc:
            cli.main(["info", "--bogus"])
        assert exc.value.code == 2
        assert "unrecognized arguments: --bogus" in capsys.readouterr().err


class TestDemoAndInfo:
    def test_demo_json(self, capsys):
        code, out, _ = _run(
            capsys,
            "demo",
            "--steps",
            "2",
            "--batch",
            "8",
            "--shape",
            "4x4x1",
            "--capacity",
            "16",
            "--arms",
            "none,random",
            "--json",
            "--no-progress",
        )
        assert code == 0
        assert json.loads(out)["spec"]["steps"] == 2

    @pytest.mark.parametrize("flag, value", [("--steps", "-1"), ("--batch", "0"), ("--capacity", "two")])
    def test_demo_rejects_non_positive_counts(self, capsys, flag, value):
        with pytest.raises(SystemExit) as exc:
            cli.main(["demo", flag, value, "--no-progress"])
        assert exc.value.code == 2
        assert f"argument {flag}: expected an integer >= 1, got '{value}'" in capsys.readouterr().err

    def test_info_survives_a_failing_memory_probe(self, capsys, monkeypatch):
        import dreampool_gpu.memory as memory

        def broken(device):
            raise RuntimeError("driver gone")

        monkeypatch.setattr(memory, "open_probe", broken)
        code, out, _ = _run(capsys, "info", "--json")
        assert code == 0
        assert json.loads(out)["memory"]["cpu"] == {"error": "RuntimeError: driver gone"}

    def test_info_json_and_text(self, capsys):
        code, out, _ = _run(capsys, "info", "--json")
        assert code == 0
        info = json.loads(out)
        assert info["torch"] == torch.__version__
        cpu = info["memory"]["cpu"]
        assert cpu["source"] == "psutil-rss" and 0 < cpu["used_bytes"] < cpu["total_bytes"]
        code, out, _ = _run(capsys, "info")
        assert code == 0 and out.startswith("torch")


class TestInspect:
    def test_json_summary(self, capsys, saved):
        before = (saved / "pool" / "manifest.json").read_bytes()
        code, out, err = _run(capsys, "inspect", saved / "pool", "--json")
        assert code == 0, err
        s = json.loads(out)
        assert (s["size"], s["capacity"], s["dream_shape"], s["embedding_dim"]) == (
            250,
            300,
            list(SHAPE),
            64,
        )
        assert s["columns"]["dreams"] == {
            "shape": [300, *SHAPE, 3],
            "dtype": "float32",
            "bytes": 300 * 32 * 3 * 4,
        }
        assert s["columns"]["embeddings"]["shape"] == [300, 64]
        assert s["bank_bytes"] == sum(c["bytes"] for c in s["columns"].values())
        assert list(s["class_label"]) == [str(i) for i in range(-1, 10)]  # -1 (none), then 0..num_classes-1
        assert sum(s["class_label"].values()) == 250 and s["class_label"]["-1"] == 0
        assert list(s["hue_category"]) == [str(i) for i in range(12)]
        assert sum(s["hue_category"].values()) == 250
        assert s["engine"] == "auto" and s["index"]["kind"] == "auto"
        assert s["checkpoint_bytes"] > 0
        assert (saved / "pool" / "manifest.json").read_bytes() == before  # read-only

    def test_text_summary(self, capsys, saved):
        code, out, _ = _run(capsys, "inspect", saved / "pool")
        assert code == 0
        assert "250 / 300" in out
        assert "hue_category    0:" in out and "class_label     -1:0  0:" in out and "red" not in out
        assert "dreams          300x4x4x2x3" in out

    def test_missing_path(self, capsys, saved):
        code, out, err = _run(capsys, "inspect", saved / "nowhere")
        assert code == 2 and out == ""
        assert err.startswith("dreampool: error: no checkpoint at") and "no such file or directory" in err
        assert "Traceback" not in err

    def test_corrupt_checkpoint(self, capsys, saved, tmp_path):
        broken = tmp_path / "broken"
        shutil.copytree(saved / "pool", broken)
        bank = broken / "bank.safetensors"
        data = bytearray(bank.read_bytes())
        data[-1] ^= 0xFF
        bank.chmod(bank.stat().st_mode | stat.S_IWUSR)
        bank.write_bytes(bytes(data))
        code, _, err = _run(capsys, "inspect", broken)
        assert code == 2
        assert "corrupt checkpoint file" in err and "bank.safetensors" in err


class TestRetrieve:
    def test_nearest_matches_pool_chunk_by_chunk(self, capsys, saved, tmp_path):
        out = tmp_path / "r.safetensors"
        code, stdout, err = _retrieve(
            capsys, saved, "chroma.npy", out, "--k", "5", "--mode", "nearest", "--chunk", CHUNK, "--device", "cpu"
        )  # the reference below runs on the CPU too: CUDA results may differ in the last bits
        assert code == 0, err
        assert f"[{N_QUERIES}, 5]" in stdout and "4 chunks (4 computed)" in stdout
        ids, scores = read_results(out)
        assert ids.dtype == torch.int64 and scores.dtype == torch.float32
        assert ids.shape == scores.shape == (N_QUERIES, 5)
        pool = DreamPool.load(saved / "pool", device="cpu")
        queries = torch.from_numpy(np.load(saved / "chroma.npy"))
        for lo in range(0, N_QUERIES, CHUNK):
            ref = pool.retrieve(queries[lo : lo + CHUNK], k=5, mode="nearest")
            assert torch.equal(ids[lo : lo + CHUNK], ref.ids)
            # not bitwise: an embedding served by the query cache was computed in another batch
            torch.testing.assert_close(scores[lo : lo + CHUNK], ref.scores)
        whole = pool.retrieve(queries, k=5, mode="nearest")
        torch.testing.assert_close(scores, whole.scores)
        assert not work_dir(out).exists()
        with safe_open(str(out), framework="pt") as handle:
            meta = handle.metadata()
        assert (meta["mode"], meta["k"], meta["queries"]) == ("nearest", "5", str(N_QUERIES))

    def test_pool_is_not_written_back(self, capsys, saved, tmp_path):
        before = {p.name: p.read_bytes() for p in (saved / "pool").iterdir()}
        code, _, err = _retrieve(capsys, saved, "chroma.npy", tmp_path / "r.safetensors", "--k", "3")
        assert code == 0, err
        assert {p.name: p.read_bytes() for p in (saved / "pool").iterdir()} == before
        assert int(DreamPool.load(saved / "pool", device="cpu").bank.columns["usage"].sum()) == 0

    def test_formats_agree(self, capsys, saved, tmp_path):
        results = []
        for name in ("chroma.npy", "chroma64.npy", "chroma.safetensors"):
            out = tmp_path / f"{name}.safetensors"
            code, _, err = _retrieve(capsys, saved, name, out, "--k", "4", "--mode", "similar")
            assert code == 0, err
            results.append(read_results(out))
        for ids, scores in results[1:]:
            assert torch.equal(ids, results[0][0])
            torch.testing.assert_close(scores, results[0][1])
        out = tmp_path / "key.safetensors"
        code, _, err = _retrieve(capsys, saved, "two.safetensors", out, "--key", "b", "--mode", "similar")
        assert code == 0, err
        assert read_results(out)[0].shape == (10, cli.DEFAULT_K)

    def test_pt_dict_dreams_and_embeddings(self, capsys, saved, tmp_path):
        code, _, err = _retrieve(capsys, saved, "dict.pt", tmp_path / "d.safetensors", "--k", "2")
        assert code == 0, err
        assert read_results(tmp_path / "d.safetensors")[0].shape == (50, 2)
        code, _, err = _retrieve(
            capsys,
            saved,
            "dreams.pt",
            tmp_path / "q.safetensors",
            "--k",
            "6",
            "--mode",
            "hybrid",
            "--chunk",
            "16",
        )
        assert code == 0, err
        ids, scores = read_results(tmp_path / "q.safetensors")
        assert ids.shape == (40, 6) and bool((ids >= 0).all())
        assert bool((scores[:, :-1] >= -1e9).all())
        code, _, err = _retrieve(capsys, saved, "emb64.pt", tmp_path / "e.safetensors", "--k", "3", "--mode", "nearest")
        assert code == 0, err
        assert read_results(tmp_path / "e.safetensors")[0].shape == (30, 3)

    def test_mode_options(self, capsys, saved, tmp_path):
        code, _, err = _retrieve(
            capsys,
            saved,
            "dict.pt",
            tmp_path / "c.safetensors",
            "--k",
            "3",
            "--mode",
            "class",
            "--class-hint",
            "2",
        )
        assert code == 0, err
        ids, _ = read_results(tmp_path / "c.safetensors")
        labels = DreamPool.load(saved / "pool", device="cpu").metadata(ids)["class_label"]
        assert bool((labels == 2).all())
        code, _, err = _retrieve(
            capsys,
            saved,
            "dict.pt",
            tmp_path / "b.safetensors",
            "--k",
            "2",
            "--mode",
            "balanced",
            "--classes",
            "0,3,7",
        )
        assert code == 0, err
        assert read_results(tmp_path / "b.safetensors")[0].shape == (50, 6)

    def test_json_report_and_rerun_does_nothing(self, capsys, saved, tmp_path):
        out = tmp_path / "r.safetensors"
        code, stdout, _ = _retrieve(capsys, saved, "chroma.npy", out, "--k", "2", "--chunk", "400", "--json")
        assert code == 0
        report = json.loads(stdout)
        assert report["computed_queries"] == N_QUERIES and report["resumed"] == 0
        assert (report["queries"], report["chunks"], report["computed"], report["width"]) == (
            N_QUERIES,
            3,
            3,
            2,
        )
        code, stdout, _ = _retrieve(capsys, saved, "chroma.npy", out, "--k", "2", "--chunk", "400")
        assert code == 0 and "nothing to do" in stdout

    def test_empty_queries(self, capsys, saved, tmp_path):
        code, _, err = _retrieve(capsys, saved, "empty.npy", tmp_path / "z.safetensors", "--k", "4")
        assert code == 0, err
        assert read_results(tmp_path / "z.safetensors")[0].shape == (0, 4)

    @pytest.mark.parametrize(
        ("queries", "extra", "message"),
        [
            ("missing.npy", [], "invalid queries: expected a .npy, .safetensors or .pt file, got"),
            ("notes.txt", [], "expected a file ending in .npy, .safetensors, .pt"),
            ("ints.npy", [], "expected a floating-point tensor"),
            (
                "wide.npy",
                [],
                "expected shape [B, 4, 4, 2, 3] dreams or [B, 3] chroma or [B, 64] embeddings",
            ),
            ("emb32.npy", ["--mode", "nearest"], "the pool's embedding_dim is 64), got [30, 32]"),
            ("emb64.pt", ["--mode", "similar"], "mode 'similar' takes no embeddings"),
            ("nan.npy", [], "invalid queries: expected finite values"),
            ("two.safetensors", [], "pick one with --key: a, b"),
            ("two.safetensors", ["--key", "c"], "invalid --key: expected one of a, b"),
            ("chroma.npy", ["--mode", "bogus"], "invalid --mode: expected one of similar"),
            (
                "chroma.npy",
                ["--mode", "class"],
                "invalid --class-hint: expected a class label in 0..9 for mode 'class'",
            ),
            ("chroma.npy", ["--k", "-1"], "invalid --k: expected an int in [0,"),
            ("chroma.npy", ["--chunk", "0"], "invalid --chunk: expected an int >= 1"),
            (
                "chroma.npy",
                ["--class-hint", "12"],
                "invalid --class-hint: expected class labels in 0..9",
            ),
        ],
    )
    def test_errors_exit_2_with_a_message(self, capsys, saved, tmp_path, queries, extra, message):
        out = tmp_path / "r.safetensors"
        code, stdout, err = _retrieve(capsys, saved, queries, out, *extra)
        assert code == 2
        assert stdout == ""
        assert err.startswith("dreampool: error: ") and message in err
        assert "Traceback" not in err
        assert not out.exists() and not work_dir(out).exists()

    def test_missing_pool_and_bad_out(self, capsys, saved, tmp_path):
        code, _, err = _run(
            capsys,
            "retrieve",
            saved / "nowhere",
            saved / "chroma.npy",
            "--out",
            tmp_path / "r.safetensors",
        )
        assert code == 2 and "no checkpoint at" in err
        code, _, err = _retrieve(capsys, saved, "chroma.npy", tmp_path / "r.npy")
        assert code == 2 and "invalid --out: expected a path ending in .safetensors" in err

    def test_out_is_required(self, capsys, saved):
        with pytest.raises(SystemExit) as exc:
            cli.main(["retrieve", str(saved / "pool"), str(saved / "chroma.npy")])
        assert exc.value.code == 2
        assert "--out" in capsys.readouterr().err

    def test_second_run_on_the_same_output_is_refused(self, capsys, saved, tmp_path):
        out = tmp_path / "r.safetensors"
        parts = work_dir(out)
        parts.mkdir()
        with open(parts / batch_mod.LOCK, "w") as held:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
            code, _, err = _retrieve(capsys, saved, "chroma.npy", out)
        assert code == 2 and "another run holds" in err
        assert not out.exists()


class TestResume:
    def _interrupt_after(self, monkeypatch, n):
        real = workdir.save_chunk
        saved_chunks = []

        def save(parts, index, ids, scores):
            if len(saved_chunks) == n:
                raise KeyboardInterrupt
            real(parts, index, ids, scores)
            saved_chunks.append(index)

        monkeypatch.setattr(workdir, "save_chunk", save)
        return saved_chunks

    def _record(self, monkeypatch):
        real = workdir.save_chunk
        indices = []

        def save(parts, index, ids, scores):
            indices.append(index)
            real(parts, index, ids, scores)

        monkeypatch.setattr(workdir, "save_chunk", save)
        return indices

    @pytest.mark.parametrize("mode", ["nearest", "hybrid"])
    def test_interrupted_job_resumes_to_the_same_result(self, capsys, saved, tmp_path, monkeypatch, mode):
        args = ("--k", "5", "--mode", mode, "--chunk", "150")  # 7 chunks, the last one short
        reference = tmp_path / "reference.safetensors"
        assert _retrieve(capsys, saved, "chroma.npy", reference, *args)[0] == 0

        out = tmp_path / "out.safetensors"
        with monkeypatch.context() as patch:
            first = self._interrupt_after(patch, 2)
            code, _, err = _retrieve(capsys, saved, "chroma.npy", out, *args)
        assert code == 130
        assert "rerun the same command to resume" in err
        assert first == [0, 1]
        assert not out.exists()
        progress = json.loads((work_dir(out) / "progress.json").read_text())
        assert progress["done"] == [0, 1] and progress["chunks"] == 7

        with monkeypatch.context() as patch:
            second = self._record(patch)
            code, stdout, err = _retrieve(capsys, saved, "chroma.npy", out, *args)
        assert code == 0, err
        assert second == [2, 3, 4, 5, 6]
        assert "5 computed, 2 resumed" in stdout
        assert not work_dir(out).exists()
        ids, scores = read_results(out)
        ref_ids, ref_scores = read_results(reference)
        assert torch.equal(ids, ref_ids)
        assert torch.equal(scores, ref_scores)

    def test_bad_rows_mid_job_name_the_chunk_and_keep_finished_ones(self, capsys, saved, tmp_path):
        out = tmp_path / "out.safetensors"
        code, _, err = _retrieve(capsys, saved, "late_nan.npy", out, "--chunk", CHUNK)
        assert code == 2
        assert "invalid queries: expected finite values, got NaN or inf" in err
        if sys.version_info >= (3, 11):  # exception notes
            assert "in query rows 600..899 (chunk 2 of 4); the 2 finished chunks are kept in" in err
        assert "Traceback" not in err
        parts = work_dir(out)
        assert sorted(p.name for p in parts.iterdir()) == [
            "chunk-000000.safetensors",
            "chunk-000001.safetensors",
            "lock",
            "progress.json",
        ]
        assert not out.exists()

    def test_interrupt_while_writing_leaves_no_temporary_files(self, capsys, saved, tmp_path, monkeypatch):
        out = tmp_path / "out.safetensors"
        real = workdir.save_file

        def fail_on_the_output(tensors, path, metadata=None):
            real(tensors, path, metadata=metadata)
            if metadata is not None:  # the merged output: interrupted after the write
                raise KeyboardInterrupt

        monkeypatch.setattr(workdir, "save_file", fail_on_the_output)
        assert _retrieve(capsys, saved, "chroma.npy", out, "--chunk", "400")[0] == 130
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors.parts"]
        monkeypatch.undo()
        code, stdout, _ = _retrieve(capsys, saved, "chroma.npy", out, "--chunk", "400")
        assert code == 0 and "0 computed, 3 resumed" in stdout
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]

    def test_changed_arguments_discard_partial_results(self, capsys, saved, tmp_path, monkeypatch):
        out = tmp_path / "out.safetensors"
        with monkeypatch.context() as patch:
            self._interrupt_after(patch, 1)
            assert _retrieve(capsys, saved, "chroma.npy", out, "--k", "5", "--chunk", "300")[0] == 130
        with monkeypatch.context() as patch:
            recorded = self._record(patch)
            code, _, err = _retrieve(capsys, saved, "chroma.npy", out, "--k", "4", "--chunk", "300")
        assert code == 0
        assert "discarded partial results of a different job" in err
        assert recorded == [0, 1, 2, 3]
        assert read_results(out)[0].shape == (N_QUERIES, 4)


class TestBench:
    def test_runs_the_script_with_passthrough_args(self, capfd, tmp_path, monkeypatch):
        script = tmp_path / "bench.sh"
        script.write_text('echo "bench args: $*"\nexit 3\n')
        monkeypatch.setattr(cli, "bench_script", lambda: script)
        code = cli.main(["bench", "--full", "--check"])
        assert code == 3
        assert "bench args: --full --check" in capfd.readouterr().out

    def test_missing_script_is_an_error(self, capsys, tmp_path, monkeypatch):
        monkeypatch.setattr(cli, "bench_script", lambda: tmp_path / "scripts" / "bench.sh")
        code, _, err = _run(capsys, "bench")
        assert code == 2
        assert err.startswith("dreampool: error: invalid bench: expected scripts/bench.sh of a source checkout")

    def test_script_is_found_in_this_checkout(self):
        assert cli.bench_script().is_file()
