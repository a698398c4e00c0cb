"""The main job on small data: the training loop's arms, its utility feedback and its table."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dreampool_gpu.cli import main
from dreampool_gpu.demo import (
    ARMS,
    StreamSpec,
    agreement,
    run_arm,
    run_comparison,
    summarise,
    table,
    trusted,
    utility_from_losses,
)
from dreampool_gpu.errors import InvalidInputError
from dreampool_gpu.pool import DreamPool

SPEC = StreamSpec(shape=(8, 8, 1), steps=6, fresh=4, validation=64)


def test_loss_utility_is_the_clamped_loss_improvement_mapped_to_unit_range():
    before = torch.tensor([1.0, 0.2, 0.5, 3.0, 0.0])
    after = torch.tensor([0.5, 0.4, 0.5, 0.0, 2.5])
    # -clamp(after - before, -1, 1) = [0.5, -0.2, 0, 1, -1] -> (1 + u) / 2
    expected = torch.tensor([0.75, 0.4, 0.5, 1.0, 0.0])
    assert torch.allclose(utility_from_losses(before, after), expected)


def test_agreement_is_the_label_probability_over_the_top_one():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, math.log(4.0), 0.0], [1.0, 1.0, 1.0]])
    got = agreement(logits, torch.tensor([0, 0, 2]))
    # row 0: the label is the top class; row 1: p(0) / p(1) = 1 / 4; row 2: a tie
    assert torch.allclose(got, torch.tensor([1.0, 0.25, 1.0]))


def test_trusted_drops_the_least_agreed_per_class_and_never_a_whole_class():
    # class 0 has high utilities, class 1 tiny ones (a learner that predicts class 0 only):
    # an absolute threshold would drop class 1 entirely; the per-class filter keeps 3 of 4
    utility = torch.tensor([0.9, 0.8, 0.95, 0.1, 0.02, 0.01, 0.03, 0.001, 0.5, 0.5])
    columns = {
        "utility": utility,
        "class_label": torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 0, 1]),
        "ids": torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, -1, -1]),  # the last two slots are free
    }
    keep = trusted(columns, 0.25)
    assert keep.tolist() == [True, True, True, False, True, True, True, False, False, False]


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


@pytest.mark.parametrize("utility", ["agreement", "loss"])
def test_random_replay_feeds_back_utility_in_unit_range(utility, feedback_log):
    result = run_arm("random", SPEC, seed=1, replay=2, eval_every=2, utility=utility)
    # step 1: the new entries' first record; every later step: the replay's, then the new entries'
    assert len(feedback_log) == 2 * SPEC.steps - 1
    entries = [feedback_log[0], *feedback_log[2::2]]
    assert all(ids.numel() == SPEC.fresh for ids, _ in entries)
    if utility == "loss":  # untried entries are neutral
        assert all((u == 0.5).all() for _, u in entries)
    replay = torch.cat([u for _, u in feedback_log[1::2]])
    assert replay.numel() == result.replayed > 0
    assert ((replay > 0) & (replay <= 1)).all()
    assert result.helpful_rate == pytest.approx(float((replay > 0.5).float().mean()))
    assert 0.0 <= result.clean_rate <= 1.0
    assert result.curve_steps == [0, 2, 4, 6]
    assert all(0.0 <= a <= 1.0 for a in result.curve_accuracy)
    assert result.unique_per_100 > 0 and result.pool_s > 0 and result.utility_s > 0


@pytest.mark.parametrize("arm", ["trusted", "feature"])
def test_filtering_arms_replay_only_trusted_entries_and_rescore_the_rest(arm, monkeypatch):
    """Every replayed id passed the trust filter of its step; the others get re-scored."""
    import dreampool_gpu.demo as demo

    masks: list[tuple[set[int], set[int]]] = []  # (trusted ids, all live ids) per step
    original = demo.trusted

    def recording(columns, drop):
        keep = original(columns, drop)
        masks.append((set(columns["ids"][keep].tolist()), set(columns["ids"][columns["ids"] >= 0].tolist())))
        return keep

    replayed: list[set[int]] = []
    original_feed = demo._feed_back

    def feed(pool, model, utility, step, x, replay, clock):
        replayed.append(set(replay[0].tolist()))
        return original_feed(pool, model, utility, step, x, replay, clock)

    rescored: list[tuple[set[int], set[int]]] = []  # (re-scored ids, trusted ids)
    original_rescore = DreamPool.feedback

    def rescore(pool, model, n, keep, rng, clock):
        def watch(self, ids, utility):
            rescored.append((set(ids.tolist()), set(self.bank.columns["ids"][keep].tolist())))
            return original_rescore(self, ids, utility)

        monkeypatch.setattr(DreamPool, "feedback", watch)
        try:
            return original_rescore_fn(pool, model, n, keep, rng, clock)
        finally:
            monkeypatch.setattr(DreamPool, "feedback", original_rescore)

    original_rescore_fn = demo._rescore
    monkeypatch.setattr(demo, "_rescore", rescore)
    monkeypatch.setattr(demo, "trusted", recording)
    monkeypatch.setattr(demo, "_feed_back", feed)
    spec = StreamSpec(shape=(8, 8, 1), steps=12, fresh=4, validation=64)
    result = run_arm(arm, spec, seed=2, replay=2, drop=0.5, rescore=2)
    assert result.replayed > 0 and len(masks) == spec.steps - 1
    for (keep, _), ids in zip(masks, replayed[1:], strict=True):
        assert ids <= keep
    assert sum(len(live - keep) for keep, live in masks) > 0
    assert rescored and all(ids.isdisjoint(keep) for ids, keep in rescored)


def test_no_pool_arm_replays_nothing():
    result = run_arm("none", SPEC, seed=1)
    assert result.replayed == 0 and math.isnan(result.helpful_rate)
    assert result.pool_s == 0 and result.utility_s == 0


def test_same_seed_same_curve():
    a = run_arm("trusted", SPEC, seed=3, eval_every=3)
    b = run_arm("trusted", SPEC, seed=3, eval_every=3)
    assert a.curve_accuracy == b.curve_accuracy
    assert a.replayed == b.replayed


def test_learned_arm_refits_on_its_schedule(monkeypatch):
    calls: list[int] = []
    original = DreamPool.fit_encoder

    def counting(self, **kwargs):
        calls.append(kwargs["steps"])
        return original(self, **kwargs)

    monkeypatch.setattr(DreamPool, "fit_encoder", counting)
    result = run_arm("learned", SPEC, seed=0, refit_every=2, fit_steps=2, fit_batch=8)
    assert calls == [2, 2]  # steps 2 and 4; none on the last step (6)
    assert result.replayed > 0 and 0.0 <= result.helpful_rate <= 1.0
    assert 0 < result.fit_s <= result.pool_s


def test_table_has_every_arm():
    lines = table(summarise(run_comparison(SPEC, seeds=[0, 1], replay=1)))
    for arm in ARMS:
        assert any(line.startswith(f"| {arm} |") for line in lines), arm
    assert all(line.count("|") == lines[0].count("|") for line in lines)


@pytest.mark.parametrize(
    "options",
    [{"arm": "everything"}, {"hints": "nearest"}, {"utility": "accuracy"}],
)
def test_rejects_unknown_arm_hints_or_utility(options):
    arm = options.pop("arm", "feature")
    with pytest.raises(InvalidInputError):
        run_arm(arm, SPEC, **options)


def test_cli_prints_json_report(capsys):
    argv = [
        "demo",
        "--steps",
        "3",
        "--batch",
        "4",
        "--shape",
        "4x4x1",
        "--arms",
        "none,random",
        "--json",
        "--no-progress",
    ]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert [s["arm"] for s in out["summaries"]] == ["none", "random"]
    assert out["spec"]["steps"] == 3


@pytest.mark.parametrize(
    "argv, message",
    [(["--shape", "4x4"], "ROWSxCOLSxLAYERS"), (["--arms", "none,best"], "comma-separated subset")],
)
def test_cli_rejects_bad_arguments(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(["demo", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
