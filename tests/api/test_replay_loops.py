"""Replay strategies inside short training loops unlike the project's MLP on digits (dreampool_gpu.replay).

A small CNN with BatchNorm2d and Dropout on multi-layer dreams, partly frozen and tied-weight
models, float64, other optimizers, ``no_grad`` and ``autocast`` around ``select``, odd label
dtypes and pools, a checkpoint round trip mid-stream, and the typed errors of bad arguments.
Every check is against an oracle computed here (the pool's own contents, an explicit SGD step),
never against values recorded on one machine.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from dreampool_gpu import DreamPool, PoolConfig
from dreampool_gpu.errors import DimensionMismatchError, InvalidConfigurationError, InvalidInputError
from dreampool_gpu.replay import MIR, KNNShapley, Nearest, Uniform

SHAPE = (4, 4, 2)  # rows, cols, layers: dreams [N, 4, 4, 2, 3]
FLAT = 4 * 4 * 2 * 3
CLASSES = 6
NAMES = ("uniform", "mir", "knn_shapley", "nearest")


def make_pool(labels: Any, *, capacity: int = 48, num_classes: int = CLASSES, seed: int = 0):
    """A pool holding one random dream per label (``-1`` = unlabelled); returns it and the ids."""
    pool = DreamPool(PoolConfig(dream_shape=SHAPE, capacity=capacity, coherence_threshold=0.0, num_classes=num_classes))
    labels = torch.as_tensor(labels, dtype=torch.long)
    if labels.numel() == 0:
        return pool, labels
    g = torch.Generator().manual_seed(seed)
    ids = pool.add(torch.rand(labels.numel(), *SHAPE, 3, generator=g), coherence=1.0, class_label=labels)
    return pool, ids


def incoming(b: int, seed: int, classes: Any = range(CLASSES)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + seed)
    pick = torch.as_tensor(list(classes))
    return torch.rand(b, *SHAPE, 3, generator=g), pick[torch.randint(len(pick), (b,), generator=g)]


class SmallCNN(nn.Module):
    """Dreams ``[N, R, C, L, 3]`` as NCHW images with ``L * 3`` channels -> logits ``[N, classes]``."""

    def __init__(self, classes: int = CLASSES) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(SHAPE[2] * 3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.25), nn.Flatten()
        )
        self.head = nn.Linear(8 * SHAPE[0] * SHAPE[1], classes)

    def features(self, dreams: torch.Tensor) -> torch.Tensor:
        n, r, c, layers, _ = dreams.shape
        return self.body(dreams.reshape(n, r, c, layers * 3).permute(0, 3, 1, 2))

    def forward(self, dreams: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(dreams))


def mlp_bn(classes: int = CLASSES) -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(FLAT, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, classes))


def per_sample(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits, y, reduction="none")


def eval_features(model: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    """``fn`` run in eval mode (docs/api.md: ``features`` is called as given, so a loop wraps it like this)."""

    def features(dreams: torch.Tensor) -> torch.Tensor:
        modes = [(m, m.training) for m in model.modules()]  # each module's own: model.train(True) would unfreeze
        model.eval()
        try:
            return fn(dreams)
        finally:
            for m, mode in modes:
                m.training = mode

    return features


def strategy(name: str, pool: DreamPool, model: nn.Module, *, seed: int = 0, **mir: Any) -> Any:
    g = torch.Generator().manual_seed(seed)
    feats = eval_features(model, getattr(model, "features", model))
    if name == "uniform":
        return Uniform(pool, generator=g)
    if name == "mir":
        return MIR(pool, model, per_sample, generator=g, **({"lr": 0.05} | mir))
    if name == "knn_shapley":
        return KNNShapley(pool, feats, generator=g)
    return Nearest(pool, feats, candidates=mir.get("candidates", 20), generator=g)


def qualifying(pool: DreamPool, ids: torch.Tensor, keep: Callable[[int], bool] = lambda label: True) -> set[int]:
    """The oracle: live ids among ``ids`` with a label >= 0 that ``keep`` accepts."""
    m = pool.metadata(ids, columns=("class_label",))
    return {
        i
        for i, f, label in zip(ids.tolist(), m["found"].tolist(), m["class_label"].tolist(), strict=True)
        if f and label >= 0 and keep(label)
    }


def check_ids(pool: DreamPool, got: torch.Tensor, k: int, allowed: set[int], *, filled: int | None = None) -> list:
    """``got`` is ``[k]`` int64 on the pool's device: distinct allowed ids, then -1 padding only.

    ``filled`` (default ``min(k, len(allowed))``) is how many real ids there must be.
    """
    assert got.shape == (k,) and got.dtype == torch.int64 and got.device == pool.device
    real = [i for i in got.tolist() if i != -1]
    assert set(real) <= allowed
    assert len(set(real)) == len(real)  # distinct
    assert got.tolist()[len(real) :] == [-1] * (k - len(real))  # padding at the tail only
    assert len(real) == (min(k, len(allowed)) if filled is None else filled)
    return real


def snapshot(model: nn.Module, opt: torch.optim.Optimizer | None = None) -> dict:
    """Everything a replay ``select`` must leave as it was: parameters, buffers, .grad, modes, optimizer."""
    return {
        "state": copy.deepcopy(model.state_dict()),
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "modes": [m.training for m in model.modules()],
        "opt": None if opt is None else copy.deepcopy(opt.state_dict()),
    }


def same(a: Any, b: Any) -> bool:
    """Exact equality of nested dicts/lists/tuples of tensors and plain values."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if (
            not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor))
            or a.shape != b.shape
            or a.dtype != b.dtype
        ):
            return False
        both_nan = a.isnan() & b.isnan() if a.is_floating_point() else torch.zeros_like(a, dtype=torch.bool)
        return bool(((a == b) | both_nan).all())  # NaN where both hold NaN (e.g. a utility not yet known)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[key], b[key]) for key in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(same, a, b))
    return bool(a == b)


def assert_untouched(before: dict, model: nn.Module, opt: torch.optim.Optimizer | None = None) -> None:
    assert same(before["state"], model.state_dict())  # parameters, BatchNorm running stats, num_batches_tracked
    assert same(before["grads"], [p.grad for p in model.parameters()])
    assert before["modes"] == [m.training for m in model.modules()]
    if opt is not None:
        assert same(before["opt"], opt.state_dict())


# ---------------------------------------------------------------- training loops
@pytest.mark.parametrize("name", NAMES)
def test_a_class_incremental_cnn_loop_replays_eligible_ids_and_leaves_the_learner_alone(name):
    """3 tasks of 2 classes, 3 steps each, Adam with weight decay; the current task's classes excluded."""
    torch.manual_seed(0)
    net = SmallCNN()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-4)
    pool, _ = make_pool([], capacity=24)
    s = strategy(name, pool, net, optimizer=opt, lr=None)
    net.body[1].eval()  # a BatchNorm frozen by the loop: its mode must come back as it was
    replayed, added = 0, torch.empty(0, dtype=torch.long)
    for task in range(3):
        current = [2 * task, 2 * task + 1]
        for step in range(3):
            x, y = incoming(8, 10 * task + step, current)
            before = snapshot(net, opt)
            where = lambda m: ~torch.isin(m["class_label"], torch.tensor(current))  # noqa: E731
            ids = s.select(x, y, 5, where=where)
            if name == "mir":
                assert_untouched(before, net, opt)
            allowed = qualifying(pool, added, lambda c: c not in current)
            real = ids[ids >= 0]
            if name == "mir":  # its guard drops at most the 2k = 10 best when they are disputed
                check_ids(pool, ids, 5, allowed, filled=real.numel())
                assert real.numel() >= min(5, len(allowed) - 10)
            else:
                check_ids(pool, ids, 5, allowed)
            replayed += real.numel()
            rx = pool.dreams(real)
            ry = pool.metadata(real, columns=("class_label",))["class_label"]
            opt.zero_grad()
            per_sample(net(torch.cat([x, rx])), torch.cat([y, ry])).mean().backward()
            opt.step()
            added = torch.cat([added, pool.add(x, coherence=1.0, class_label=y)])
    assert replayed > 0
    assert [m.training for m in net.modules()] == [True, True, True, False, True, True, True, True]


def test_mir_select_changes_no_model_state_in_train_mode_with_batchnorm2d_and_dropout():
    """After real steps (Adam state, .grad set), ``select`` leaves parameters, BN statistics, .grad, Adam alone."""
    torch.manual_seed(1)
    net = SmallCNN()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-2)
    pool, ids = make_pool(torch.arange(30) % CLASSES)
    for step in range(2):
        x, y = incoming(6, step)
        opt.zero_grad()
        per_sample(net(x), y).mean().backward()
        opt.step()
    before = snapshot(net, opt)
    rng = torch.get_rng_state()
    for kw in ({}, {"score": "increase", "drop_high_loss": 0.2}, {"balanced": False, "drop_disputed": False}):
        mir = MIR(pool, net, per_sample, optimizer=opt, **kw)
        with torch.no_grad():  # training loops often select under no_grad
            got = mir.select(x, y, 4)
        filled = None if kw.get("drop_disputed") is False else int((got >= 0).sum())  # the guard may drop some
        check_ids(pool, got, 4, set(ids.tolist()), filled=filled)
        assert int((got >= 0).sum()) >= 1
        assert_untouched(before, net, opt)
    assert not torch.equal(rng, torch.get_rng_state())  # the virtual step's dropout drew masks (documented)


def test_a_dropout_model_in_train_mode_repeats_under_the_same_generator_and_global_seed():
    """Documented: the virtual step's dropout masks come from torch's global generator."""
    net = SmallCNN()
    pool, ids = make_pool(torch.arange(30) % CLASSES)
    x, y = incoming(6, 0)
    runs = []
    for _ in range(2):
        torch.manual_seed(13)
        mir = MIR(pool, net, per_sample, lr=0.5, generator=torch.Generator().manual_seed(13))
        runs.append(mir.scores(x, y))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert set(runs[0][0].tolist()) - {-1} <= set(ids.tolist())


def test_mir_scores_candidates_one_by_one_in_eval_mode():
    """A candidate's score does not depend on which other candidates were drawn (no batch statistics), even in
    train mode with one qualifying entry and a BatchNorm1d (a batch of one in train mode would raise)."""
    torch.manual_seed(2)
    net = mlp_bn()
    pool, ids = make_pool(torch.arange(12) % CLASSES)
    x, y = incoming(6, 0)
    full = MIR(pool, net, per_sample, lr=0.1, candidates=12, drop_disputed=False, balanced=False)
    cand, score = full.scores(x, y)
    by_id = dict(zip(cand.tolist(), score.tolist(), strict=True))
    for i in ids.tolist():  # each entry scored alone: same score as among all twelve
        one = MIR(pool, net, per_sample, lr=0.1, candidates=1, drop_disputed=False)
        c, s = one.scores(x, y, where=lambda m: m["ids"] == i)
        assert c.tolist() == [i] and s[0].item() == pytest.approx(by_id[i], rel=1e-4, abs=1e-5)
    assert net.training and all(m.training for m in net.modules())


def oracle_after(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, dreams: torch.Tensor, labels: torch.Tensor, lr: float
) -> torch.Tensor:
    """Per-entry loss after one explicit SGD step on ``(x, y)`` (the model's own mode), entries scored in eval mode."""
    stepped = copy.deepcopy(model)  # keeps tied weights tied
    params = [p for p in stepped.parameters() if p.requires_grad]
    grads = torch.autograd.grad(per_sample(stepped(x), y).mean(), params, allow_unused=True)
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            if g is not None:
                p -= lr * g
        stepped.eval()
        return per_sample(stepped(dreams.to(x.dtype)), labels)


class Tied(nn.Module):
    """An autoencoder-style model whose classifier reuses the embedding matrix (tied weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(FLAT, 12)
        self.norm = nn.BatchNorm1d(12)
        self.classify = nn.Linear(12, CLASSES)
        self.second = nn.Linear(12, CLASSES, bias=False)
        self.second.weight = self.classify.weight  # one parameter under two names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm(self.embed(x.flatten(1))))
        return self.classify(h) + 0.5 * self.second(h)


def frozen_first_layer() -> nn.Module:
    net = mlp_bn()
    net[1].requires_grad_(False)
    return net


@pytest.mark.parametrize(
    ("make", "dtype"),
    [(frozen_first_layer, torch.float32), (Tied, torch.float32), (lambda: mlp_bn().double(), torch.float64)],
    ids=["partly_frozen", "tied", "float64"],
)
def test_mir_scores_match_an_explicit_sgd_step(make, dtype):
    torch.manual_seed(3)
    net = make()
    pool, ids = make_pool(torch.arange(18) % CLASSES)
    x, y = incoming(8, 1)
    x = x.to(dtype)
    before = snapshot(net)
    mir = MIR(pool, net, per_sample, lr=0.3, candidates=18, drop_disputed=False, balanced=False)
    cand, score = mir.scores(x, y)
    assert_untouched(before, net)
    labels = pool.metadata(cand, columns=("class_label",))["class_label"]
    want = oracle_after(net, x, y, pool.dreams(cand), labels, 0.3)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(score.to(want.dtype), want, rtol=tol, atol=tol)
    assert sorted(cand.tolist()) == sorted(ids.tolist())
    if isinstance(net, Tied):
        assert net.second.weight is net.classify.weight
    got = mir.select(x, y, 5)
    check_ids(pool, got, 5, set(ids.tolist()))
    top5 = set(cand[want.argsort(descending=True)[:5]].tolist())
    assert len(set(got.tolist()) & top5) >= 4  # the top 5 up to a near-tie at the border


@pytest.mark.parametrize("name", NAMES)
def test_float64_models_and_batches(name):
    torch.manual_seed(4)
    net = SmallCNN().double()
    pool, ids = make_pool(torch.arange(20) % CLASSES)
    x, y = incoming(5, 2)
    got = strategy(name, pool, net).select(x.double(), y, 6)
    check_ids(pool, got, 6, set(ids.tolist()), filled=None if name != "mir" else int((got >= 0).sum()))
    assert int((got >= 0).sum()) >= 1


# ----------------------------------------------------------- optimizers and lr
def mir_pair(pool, net, opt, lr):
    kw = {"drop_disputed": False, "score": "increase", "candidates": 16}
    return (
        MIR(pool, net, per_sample, optimizer=opt, generator=torch.Generator().manual_seed(5), **kw),
        MIR(pool, net, per_sample, lr=lr, generator=torch.Generator().manual_seed(5), **kw),
    )


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=1e-4),
        lambda p: torch.optim.AdamW(p, lr=torch.tensor(2e-3)),
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
    ],
    ids=["adam", "adamw_tensor_lr", "sgd_nesterov"],
)
def test_mir_takes_a_plain_sgd_step_at_the_optimizers_first_group_lr(make_opt):
    """Documented: whatever the optimizer, the virtual step is plain SGD at its first group's lr (no momentum,
    weight decay or moments), and the optimizer's state is not touched."""
    torch.manual_seed(6)
    net = mlp_bn().eval()
    opt = make_opt(net.parameters())
    pool, _ = make_pool(torch.arange(16) % CLASSES)
    for step in range(2):  # momentum buffers / Adam moments exist
        x, y = incoming(6, step)
        opt.zero_grad()
        per_sample(net(x), y).mean().backward()
        opt.step()
    lr = float(opt.param_groups[0]["lr"])
    before = snapshot(net, opt)
    by_opt, by_lr = mir_pair(pool, net, opt, lr)
    ids_a, score_a = by_opt.scores(x, y)
    ids_b, score_b = by_lr.scores(x, y)
    assert torch.equal(ids_a, ids_b)
    torch.testing.assert_close(score_a, score_b, rtol=1e-5, atol=1e-6)
    assert_untouched(before, net, opt)


def test_mir_reads_only_the_first_param_group():
    net = mlp_bn().eval()
    opt = torch.optim.SGD([{"params": net[1].parameters(), "lr": 0.2}, {"params": net[4].parameters(), "lr": 0.01}])
    pool, _ = make_pool(torch.arange(16) % CLASSES)
    x, y = incoming(6, 0)
    by_opt, by_lr = mir_pair(pool, net, opt, 0.2)
    torch.testing.assert_close(by_opt.scores(x, y)[1], by_lr.scores(x, y)[1], rtol=1e-5, atol=1e-6)


def test_mir_follows_a_numpy_learning_rate_and_refuses_a_bad_one():
    net = mlp_bn().eval()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    pool, _ = make_pool(torch.arange(16) % CLASSES)
    x, y = incoming(6, 0)
    opt.param_groups[0]["lr"] = np.float32(0.25)  # a schedule computed in numpy
    by_opt, by_lr = mir_pair(pool, net, opt, 0.25)
    torch.testing.assert_close(by_opt.scores(x, y)[1], by_lr.scores(x, y)[1], rtol=1e-5, atol=1e-6)
    before = pool.state_dict()
    opt.param_groups[0]["lr"] = "fast"
    with pytest.raises(InvalidConfigurationError, match="'fast'"):
        by_opt.select(x, y, 3)
    assert same(before, pool.state_dict())


# ------------------------------------------------------ no_grad, autocast, compile
@pytest.mark.parametrize("name", NAMES)
def test_no_grad_around_select_gives_the_same_ids(name):
    torch.manual_seed(7)
    net = mlp_bn().eval()
    pool, _ = make_pool(torch.arange(24) % CLASSES)
    x, y = incoming(6, 3)
    plain = strategy(name, pool, net, seed=3).select(x, y, 5)
    with torch.no_grad():
        quiet = strategy(name, pool, net, seed=3).select(x, y, 5)
    assert torch.equal(plain, quiet)


@pytest.mark.parametrize("name", NAMES)
def test_autocast_bfloat16_on_cpu(name):
    torch.manual_seed(8)
    net = SmallCNN()
    pool, ids = make_pool(torch.arange(24) % CLASSES)
    x, y = incoming(6, 4)
    before = snapshot(net)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = strategy(name, pool, net).select(x, y, 5)
    real = [i for i in got.tolist() if i >= 0]
    check_ids(pool, got, 5, set(ids.tolist()), filled=len(real))
    assert len(real) >= 1
    if name == "mir":
        assert_untouched(before, net)


@pytest.mark.parametrize("cls", [KNNShapley, Nearest])
def test_feature_distances_stay_float32_under_autocast(cls):
    """With features autocast leaves alone (the raw values), the ranking under bfloat16 autocast is the plain one."""
    pool, _ = make_pool(torch.arange(40) % 2, capacity=48)
    x, y = incoming(6, 5, [0, 1])
    kw = {"candidates": None} if cls is Nearest else {}

    def run() -> torch.Tensor:
        return cls(pool, lambda d: d.flatten(1), generator=torch.Generator().manual_seed(9), **kw).select(x, y, 20)

    plain = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(run(), plain)


def test_mir_on_a_compiled_model():
    if not hasattr(torch, "compile"):
        pytest.skip("no torch.compile")
    net = mlp_bn()
    try:
        compiled = torch.compile(net, backend="eager")  # no C++ toolchain needed
        compiled(torch.rand(2, *SHAPE, 3))
    except Exception as exc:  # dynamo unsupported on this Python/platform
        pytest.skip(f"torch.compile unavailable: {exc!r}")
    pool, ids = make_pool(torch.arange(12) % CLASSES)
    x, y = incoming(6, 6)
    before = snapshot(net)
    got = MIR(pool, compiled, per_sample, lr=0.1).select(x, y, 4)
    check_ids(pool, got, 4, set(ids.tolist()), filled=int((got >= 0).sum()))
    assert int((got >= 0).sum()) >= 1
    assert_untouched(before, net)


# ------------------------------------------------------------ labels and pools
@pytest.mark.parametrize("name", NAMES)
def test_label_dtypes_give_the_same_ids(name):
    torch.manual_seed(9)
    net = mlp_bn().eval()
    pool, _ = make_pool(torch.arange(24) % CLASSES)
    x, y = incoming(6, 7)
    want = strategy(name, pool, net, seed=4).select(x, y, 5)
    for labels in (y.int(), y.to(torch.uint8), y.tolist(), y.numpy(), y.to(torch.int16)):
        assert torch.equal(strategy(name, pool, net, seed=4).select(x, labels, 5), want)
    assert torch.equal(strategy(name, pool, net, seed=4).select(x.numpy(), y, 5), want)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("num_classes", [2, 13])
def test_small_and_odd_pools_pad_only_when_fewer_qualify(name, num_classes):
    torch.manual_seed(10)
    net = mlp_bn(num_classes).train()
    mir_kw = {"drop_disputed": False}  # the guard may leave out entries on purpose: padding counts are exact here
    x, y = incoming(6, 8, range(num_classes))

    def run(pool, k, where=None, **kw):
        return strategy(name, pool, net, **(mir_kw | kw)).select(x, y, k, where=where)

    empty, _ = make_pool([], num_classes=num_classes)
    assert run(empty, 4).tolist() == [-1] * 4
    assert run(empty, 0).shape == (0,)
    few, ids = make_pool(torch.arange(3) % num_classes, num_classes=num_classes)
    check_ids(few, run(few, 7), 7, set(ids.tolist()))  # k larger than the pool
    one, ids = make_pool([num_classes - 1], num_classes=num_classes)  # a BatchNorm1d model in train mode, one entry
    check_ids(one, run(one, 3), 3, set(ids.tolist()))
    labels = [-1, 0, -1, 1, -1, 0, -1, 1]
    mixed, ids = make_pool(labels, num_classes=num_classes)  # unlabelled entries never qualify
    check_ids(mixed, run(mixed, 6), 6, set(ids[1::2].tolist()))
    assert run(mixed, 3, where=lambda m: m["class_label"] > 1).tolist() == [-1] * 3  # only excluded classes
    mask = torch.zeros(mixed.capacity, dtype=torch.bool)
    check_ids(mixed, run(mixed, 3, where=mask), 3, set())
    full, ids = make_pool(torch.arange(40) % num_classes, num_classes=num_classes)
    check_ids(full, run(full, 40, candidates=40), 40, set(ids.tolist()))


@pytest.mark.parametrize("name", NAMES)
def test_an_imbalanced_memory_still_fills_k(name):
    """3 entries of one class, 30 of another: k = 10 is filled (a class with few entries leaves its share)."""
    net = mlp_bn().eval()
    pool, ids = make_pool([0] * 3 + [1] * 30)
    x, y = incoming(6, 9, [2, 3])
    got = strategy(name, pool, net, drop_disputed=False).select(x, y, 10)
    check_ids(pool, got, 10, set(ids.tolist()))


@pytest.mark.parametrize("name", NAMES)
def test_an_empty_incoming_batch_still_selects(name):
    """B = 0 (a filtered stream's empty step): MIR's step is zero, KNNShapley has no adversarial term, Nearest
    keeps the draw's order; all fill k."""
    net = mlp_bn().eval()
    pool, ids = make_pool(torch.arange(20) % CLASSES)
    x, y = incoming(4, 10)
    got = strategy(name, pool, net, drop_disputed=False).select(x[:0], y[:0], 5)
    check_ids(pool, got, 5, set(ids.tolist()))


@pytest.mark.parametrize("name", NAMES)
def test_nan_scores_rank_last_but_still_qualify(name):
    """A diverged learner (NaN logits and features) still gets k replay ids: -1 only when fewer qualify."""
    net = mlp_bn().eval()
    with torch.no_grad():
        net[4].weight.fill_(float("nan"))
        net[1].weight.fill_(float("nan"))
    pool, ids = make_pool(torch.arange(20) % CLASSES)
    x, y = incoming(4, 11)
    got = strategy(name, pool, net, drop_disputed=False).select(x, y, 5)
    check_ids(pool, got, 5, set(ids.tolist()))


# ---------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("name", NAMES)
def test_a_rebuilt_strategy_on_a_restored_pool_draws_the_same(name):
    """Mid-stream (after evictions) ``state_dict``/``load_state_dict`` and the generator's state: same ids, then
    and after the next add."""
    torch.manual_seed(11)
    net = mlp_bn().eval()
    pool, _ = make_pool([], capacity=16)
    for step in range(6):
        x, y = incoming(5, 20 + step)
        pool.add(x, coherence=1.0, class_label=y)
    assert len(pool) == 16  # full: entries have been evicted
    saved = pool.state_dict()
    restored = DreamPool(PoolConfig(dream_shape=SHAPE, capacity=16, coherence_threshold=0.0, num_classes=CLASSES))
    restored.load_state_dict(saved)
    s = strategy(name, pool, net, seed=12)
    state = s.generator.get_state()
    x, y = incoming(5, 40)
    first = s.select(x, y, 6)
    again = strategy(name, restored, net)
    again.generator.set_state(state)
    assert torch.equal(again.select(x, y, 6), first)
    check_ids(restored, first, 6, qualifying(restored, first[first >= 0]), filled=int((first >= 0).sum()))
    pool.add(x, coherence=1.0, class_label=y)
    restored.add(x, coherence=1.0, class_label=y)
    x, y = incoming(5, 41)
    assert torch.equal(s.select(x, y, 6), again.select(x, y, 6))


# --------------------------------------------------------------------- errors
@pytest.mark.parametrize("name", NAMES)
def test_bad_arguments_raise_typed_errors_naming_what_arrived_and_leave_the_pool_alone(name):
    net = mlp_bn().eval()
    pool, _ = make_pool(torch.arange(12) % CLASSES)
    s = strategy(name, pool, net)
    x, y = incoming(4, 12)
    before = pool.state_dict()
    cases = [
        (lambda: s.select(x, y, -2), InvalidInputError, r"k: expected a non-negative int, got -2"),
        (lambda: s.select(x, y, 2.5), InvalidInputError, r"k: expected .* got 2\.5"),
        (lambda: s.select(x, y, True), InvalidInputError, r"k: expected .* got True"),
        (lambda: s.select(x, y, "3"), InvalidInputError, r"k: expected .* got '3'"),
        (lambda: s.select(x[:, :2], y, 2), DimensionMismatchError, r"expected shape \[B, 4, 4, 2, 3\], got \[4, 2"),
        (lambda: s.select(x[0], y, 2), DimensionMismatchError, r"got \[4, 4, 2, 3\]"),
        (lambda: s.select(x.long(), y, 2), InvalidInputError, r"x: expected a float tensor .* got dtype torch.int64"),
        (lambda: s.select(x, y[:3], 2), InvalidInputError, r"y: expected \[4\] integer labels, got \[3\]"),
        (lambda: s.select(x, y.float(), 2), InvalidInputError, r"y: expected .* got \[4\] torch.float32"),
        (lambda: s.select(x, y[:, None], 2), InvalidInputError, r"y: expected .* got \[4, 1\]"),
        (lambda: s.select(x, y.bool(), 2), InvalidInputError, r"y: expected .* torch.bool"),
        (lambda: s.select(x, "labels", 2), InvalidInputError, r"y: expected"),
        (lambda: s.select(x, y, 2, where=torch.ones(5, dtype=torch.bool)), DimensionMismatchError, r"got \[5\]"),
        (lambda: s.select(x, y, 2, where=lambda m: m["no_such_column"] > 0), InvalidInputError, "no_such_column"),
        (lambda: s.select(x, y, 2, where=lambda m: 1 / 0), InvalidInputError, "ZeroDivisionError"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
        assert same(before, pool.state_dict())


@pytest.mark.parametrize("cls", [Uniform, MIR, KNNShapley, Nearest])
def test_a_generator_that_is_not_a_torch_generator_is_refused(cls):
    pool, _ = make_pool(torch.arange(4) % CLASSES)
    net = mlp_bn()
    args = {Uniform: (), MIR: (net, per_sample), KNNShapley: (net,), Nearest: (net,)}[cls]
    kw = {"lr": 0.1} if cls is MIR else {}
    for bad, shown in ((np.random.default_rng(0), "Generator"), (7, "int")):
        with pytest.raises(InvalidInputError, match=f"generator: expected a CPU torch.Generator or None, got {shown}"):
            cls(pool, *args, generator=bad, **kw)


def test_strategies_refuse_results_of_the_wrong_shape_and_leave_the_pool_alone():
    net = mlp_bn().eval()
    pool, _ = make_pool(torch.arange(12) % CLASSES)
    x, y = incoming(4, 13)
    before = pool.state_dict()
    mean_loss = MIR(pool, net, lambda a, b: nn.functional.cross_entropy(a, b), lr=0.1)
    with pytest.raises(InvalidConfigurationError, match=r"per-sample losses \[4\], got \[\]"):
        mean_loss.select(x, y, 2)
    for cls in (KNNShapley, Nearest):
        with pytest.raises(InvalidConfigurationError, match=r"\[N, D\] features, got \[\d+\]"):
            cls(pool, lambda d: d.flatten(1).sum(1)).select(x, y, 2)
    with pytest.raises(InvalidConfigurationError, match="requires_grad"):
        MIR(pool, mlp_bn().requires_grad_(False), per_sample, lr=0.1).select(x, y, 2)
    with pytest.raises(InvalidConfigurationError, match="lr=0"):
        MIR(pool, net, per_sample, lr=0)
    assert same(before, pool.state_dict())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="gpu unavailable")
def test_a_cuda_generator_is_refused_where_the_draw_is_on_the_host():
    pool, _ = make_pool(torch.arange(4) % CLASSES)
    with pytest.raises(InvalidInputError, match="a generator on cuda"):
        Uniform(pool, generator=torch.Generator(device="cuda"))
