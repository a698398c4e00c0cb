"""The main job on small data: the simulated training loop end to end."""

from __future__ import annotations

import json
import math

import pytest

from dreampool_gpu.cli import main
from dreampool_gpu.demo import run_demo


class TestDemo:
    def test_loop_fills_pool_and_feeds_back(self):
        summary = run_demo(steps=25, batch=16, dream_shape=(6, 6, 2), capacity=64, threshold=0.5, progress=False)
        assert summary.pool_size == 64
        assert summary.evictions > 0
        assert 0.0 < summary.acceptance_rate <= 1.0
        assert 0.0 <= summary.retrieved_coherence <= 1.0
        assert summary.retrieve_ms_median <= summary.retrieve_ms_p95
        assert not math.isnan(summary.random_pool_coherence)

    def test_same_seed_same_pool(self):
        a = run_demo(steps=6, batch=8, dream_shape=(4, 4, 1), capacity=32, threshold=0.4, progress=False, seed=3)
        b = run_demo(steps=6, batch=8, dream_shape=(4, 4, 1), capacity=32, threshold=0.4, progress=False, seed=3)
        assert (a.pool_size, a.acceptance_rate, a.evictions) == (b.pool_size, b.acceptance_rate, b.evictions)
        assert a.retrieved_coherence == b.retrieved_coherence

    def test_cli_prints_json_summary(self, capsys):
        code = main(["demo", "--steps", "4", "--batch", "8", "--shape", "4x4x1", "--capacity", "16",
                     "--threshold", "0.4", "--json", "--no-progress"])
        assert code == 0
        out = json.loads(capsys.readouterr().out)
        assert out["steps"] == 4
        assert 0 < out["pool_size"] <= 16

    def test_cli_rejects_bad_shape(self, capsys):
        with pytest.raises(SystemExit) as exc:
            main(["demo", "--shape", "4x4"])
        assert exc.value.code == 2
        assert "ROWSxCOLSxLAYERS" in capsys.readouterr().err

