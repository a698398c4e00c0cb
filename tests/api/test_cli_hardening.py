"""Issue-15 regressions (adversarial run, new-user trial): the command line."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from _hardening import (
    dreams,
    make_pool,
)

from dreampool_gpu.errors import (
    DreamPoolError,
    InvalidInputError,
)
from dreampool_gpu.persist import CheckpointRecoveryWarning


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
