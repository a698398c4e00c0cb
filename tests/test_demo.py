"""The main job on small data: the training loop's arms, its utility feedback and its table."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from dreampool_gpu import PoolConfig
from dreampool_gpu.cli import main
from dreampool_gpu.demo import (
    ARMS,
    StreamSpec,
    run_arm,
    run_comparison,
    summarise,
    table,
    utility_from_losses,
)
from dreampool_gpu.errors import InvalidInputError
from dreampool_gpu.pool import DreamPool

SPEC = StreamSpec(shape=(8, 8, 1), steps=6, fresh=4, validation=64)
HAS_LEARNED = "encoder" in {f.name for f in dataclasses.fields(PoolConfig)}


def test_utility_is_the_clamped_loss_improvement_mapped_to_unit_range():
    before = torch.tensor([1.0, 0.2, 0.5, 3.0, 0.0])
    after = torch.tensor([0.5, 0.4, 0.5, 0.0, 2.5])
    # -clamp(after - before, -1, 1) = [0.5, -0.2, 0, 1, -1] -> (1 + u) / 2
    expected = torch.tensor([0.75, 0.4, 0.5, 1.0, 0.0])
    assert torch.allclose(utility_from_losses(before, after), expected)


@pytest.fixture
def feedback_log(monkeypatch):
    """Every (ids, utility) the loop hands to ``pool.feedback``."""
    log: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = DreamPool.feedback

    def recording(self, ids, utility):
        u = torch.as_tensor(utility, dtype=torch.float32).expand(torch.as_tensor(ids).shape)
        log.append((torch.as_tensor(ids).clone(), u.clone()))
        return original(self, ids, utility)

    monkeypatch.setattr(DreamPool, "feedback", recording)
    return log


@pytest.mark.parametrize("arm", ["random", "feature"])
def test_replay_arms_feed_back_utility_in_unit_range(arm, feedback_log):
    result = run_arm(arm, SPEC, seed=1, replay=2, eval_every=2)
    # step 1: the new entries' neutral 0.5 record; every later step: the replay's, then the new entries'
    assert len(feedback_log) == 2 * SPEC.steps - 1
    assert all(ids.numel() == SPEC.fresh and (u == 0.5).all() for ids, u in feedback_log[0::2])
    replay = torch.cat([u for _, u in feedback_log[1::2]])
    assert replay.numel() == result.replayed > 0
    assert ((replay >= 0) & (replay <= 1)).all()
    assert result.helpful_rate == pytest.approx(float((replay > 0.5).float().mean()))
    assert result.curve_steps == [0, 2, 4, 6]
    assert all(0.0 <= a <= 1.0 for a in result.curve_accuracy)
    assert result.unique_per_100 > 0 and result.pool_s > 0


def test_no_pool_arm_replays_nothing():
    result = run_arm("none", SPEC, seed=1)
    assert result.replayed == 0 and math.isnan(result.helpful_rate)
    assert result.pool_s < result.train_s


def test_same_seed_same_curve():
    a = run_arm("random", SPEC, seed=3, eval_every=3)
    b = run_arm("random", SPEC, seed=3, eval_every=3)
    assert a.curve_accuracy == b.curve_accuracy
    assert a.replayed == b.replayed


@pytest.mark.skipif(not HAS_LEARNED, reason="PoolConfig has no encoder field yet (learned encoder not merged)")
def test_learned_arm_refits_and_runs():
    result = run_arm("learned", SPEC, seed=0, refit_every=3, fit_steps=2)
    assert result.replayed > 0 and 0.0 <= result.helpful_rate <= 1.0


def test_table_has_every_arm():
    results, errors = run_comparison(SPEC, seeds=[0, 1], replay=1)
    lines = table(summarise(results, errors))
    for arm in ARMS:
        assert any(line.startswith(f"| {arm} |") for line in lines), arm
    if not HAS_LEARNED:
        assert "learned" in errors


@pytest.mark.parametrize("arm, hints", [("everything", "batch"), ("feature", "nearest")])
def test_rejects_unknown_arm_or_hints(arm, hints):
    with pytest.raises(InvalidInputError):
        run_arm(arm, SPEC, hints=hints)


def test_cli_prints_json_report(capsys):
    code = main(["demo", "--steps", "3", "--batch", "4", "--shape", "4x4x1", "--arms", "none,random",
                 "--json", "--no-progress"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert [s["arm"] for s in out["summaries"]] == ["none", "random"]
    assert out["spec"]["steps"] == 3


@pytest.mark.parametrize("argv, message", [(["--shape", "4x4"], "ROWSxCOLSxLAYERS"),
                                           (["--arms", "none,best"], "comma-separated subset")])
def test_cli_rejects_bad_arguments(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(["demo", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
