"""Replay strategies (dreampool_gpu.replay): shapes, padding, filters, MIR's virtual step, KNN-Shapley values."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

from dreampool_gpu import DreamPool, PoolConfig
from dreampool_gpu.errors import DimensionMismatchError, InvalidConfigurationError, InvalidInputError
from dreampool_gpu.replay import MIR, KNNShapley, Nearest, Uniform, knn_shapley
from dreampool_gpu.sync_guard import forbid_host_sync

SHAPE = (2, 2, 1)
FLAT = 2 * 2 * 1 * 3


def pool_of(
    n: int, *, classes=None, capacity: int = 64, device: str = "cpu", seed: int = 0
) -> tuple[DreamPool, torch.Tensor]:
    pool = DreamPool(
        PoolConfig(dream_shape=SHAPE, capacity=capacity, coherence_threshold=0.0, device=device, num_classes=4)
    )
    labels = torch.arange(n) % 4 if classes is None else torch.as_tensor(classes)
    ids = pool.add(
        torch.rand(n, *SHAPE, 3, generator=torch.Generator().manual_seed(seed)), coherence=1.0, class_label=labels
    )
    return pool, ids


def batch(b: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, *SHAPE, 3, generator=g), torch.randint(0, 4, (b,), generator=g)


class Net(nn.Module):
    """Dreams [N, 2, 2, 1, 3] -> 4 logits, with a BatchNorm (its running statistics must stay untouched)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(FLAT, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.head = nn.Linear(16, 4)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def per_sample(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits, y, reduction="none")


def strategies(pool: DreamPool) -> list:
    net = Net()
    return [
        Uniform(pool, generator=torch.Generator().manual_seed(0)),
        MIR(pool, net, per_sample, lr=0.1, generator=torch.Generator().manual_seed(0)),
        KNNShapley(pool, net.features, generator=torch.Generator().manual_seed(0)),
        Nearest(pool, net.features, generator=torch.Generator().manual_seed(0)),
    ]


# ---------------------------------------------------------------- all strategies
@pytest.mark.parametrize("index", range(4))
def test_shape_dtype_padding_and_where(index):
    pool, ids = pool_of(12)
    x, y = batch()
    s = strategies(pool)[index]
    got = s.select(x, y, 5)
    assert got.shape == (5,) and got.dtype == torch.int64 and got.device == pool.device
    assert set(got.tolist()) <= set(ids.tolist()) and len(set(got.tolist())) == 5  # no repeats
    only = s.select(x, y, 5, where=lambda m: m["class_label"] == 2)  # 3 entries of class 2
    assert sorted(only[:3].tolist()) == sorted(ids[2::4].tolist()) and only[3:].tolist() == [-1, -1]
    none = s.select(x, y, 3, where=torch.zeros(pool.capacity, dtype=torch.bool))
    assert none.tolist() == [-1, -1, -1]
    assert s.select(x, y, 0).shape == (0,)


@pytest.mark.parametrize("index", range(4))
def test_empty_pool_and_unlabelled_entries_give_padding(index):
    pool, _ = pool_of(0)
    x, y = batch()
    assert strategies(pool)[index].select(x, y, 3).tolist() == [-1, -1, -1]
    pool, _ = pool_of(5, classes=[-1] * 5)
    assert strategies(pool)[index].select(x, y, 2).tolist() == [-1, -1]


@pytest.mark.parametrize("index", range(4))
def test_bad_arguments_raise_typed_errors(index):
    pool, _ = pool_of(8)
    s = strategies(pool)[index]
    x, y = batch()
    with pytest.raises(DimensionMismatchError):
        s.select(torch.rand(4, 3, 2, 1, 3), y, 2)
    with pytest.raises(InvalidInputError):
        s.select(x, y[:2], 2)
    with pytest.raises(InvalidInputError):
        s.select(x, y.float(), 2)
    with pytest.raises(InvalidInputError):
        s.select(x, y, -1)
    with pytest.raises(InvalidInputError):
        s.select(x.long(), y, 2)
    with pytest.raises(DimensionMismatchError):
        s.select(x, y, 2, where=torch.ones(3, dtype=torch.bool))
    with pytest.raises(InvalidInputError):
        s.select(x, y, 2, where=torch.ones(pool.capacity))


@pytest.mark.parametrize(("index", "reads"), [(0, 2), (1, 3), (2, 3), (3, 2)])
def test_select_reads_the_host_only_in_the_pools_draw(index, reads):
    """A filtered ``pool.sample`` sizes its draw on the host (2 reads); class-balanced draws look ids up (1)."""
    pool, _ = pool_of(12)
    x, y = batch()
    s = strategies(pool)[index]
    mask = pool.bank.columns["class_label"] != 1
    with forbid_host_sync(allowed=reads):
        got = s.select(x, y, 4, where=mask)
    assert got.shape == (4,)


def test_where_callable_reads_user_columns_and_refuses_unknown_names():
    config = PoolConfig(
        dream_shape=SHAPE, capacity=16, coherence_threshold=0.0, num_classes=4, columns={"task": ((), "int64")}
    )
    pool = DreamPool(config)
    ids = pool.add(
        torch.rand(8, *SHAPE, 3), coherence=1.0, class_label=torch.arange(8) % 4, columns={"task": torch.arange(8) // 4}
    )
    x, y = batch()
    got = Uniform(pool).select(x, y, 6, where=lambda m: m["task"] == 1)
    assert sorted(got[:4].tolist()) == sorted(ids[4:].tolist()) and got[4:].tolist() == [-1, -1]
    with pytest.raises(InvalidInputError):
        Uniform(pool).select(x, y, 2, where=lambda m: m["nope"] > 0)


@pytest.mark.parametrize("index", range(4))
def test_a_class_filter_computes_no_lazy_features(index, monkeypatch):
    """A replay loop (add, select with a ``where`` on labels, gather) never featurises the entries."""
    import dreampool_gpu.admission as admission

    calls = []
    real = admission.spectral_of_checked
    monkeypatch.setattr(admission, "spectral_of_checked", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    pool, _ = pool_of(12)
    s = strategies(pool)[index]
    for step in range(3):
        x, y = batch(seed=step)
        ids = s.select(x, y, 4, where=lambda m: m["class_label"] != 1)
        pool.dreams(ids), pool.metadata(ids, columns=("class_label",))
        pool.add(x, coherence=1.0, class_label=y)
    assert calls == []
    pool.metadata(ids, columns=("hue_category",))  # a derived column: now the features are computed
    assert calls


def test_seeded_strategies_repeat():
    pool, _ = pool_of(20)
    x, y = batch()
    for a, b in zip(strategies(pool), strategies(pool), strict=True):
        assert torch.equal(a.select(x, y, 6), b.select(x, y, 6))


# ---------------------------------------------------------------------- Uniform
def test_uniform_draws_every_entry_equally_often():
    pool, ids = pool_of(8)
    x, y = batch()
    s = Uniform(pool, generator=torch.Generator().manual_seed(4))
    counts = torch.zeros(8)
    for _ in range(800):
        counts += torch.isin(ids, s.select(x, y, 2)).float()
    # each entry is in a draw of 2 of 8 with chance 1/4: 200 expected, sd ~12
    assert counts.min() > 150 and counts.max() < 250


def test_generator_must_be_a_generator():
    pool, _ = pool_of(4)
    with pytest.raises(InvalidInputError):
        Uniform(pool, generator=3)  # type: ignore[arg-type]


# -------------------------------------------------------------------------- MIR
def test_mir_leaves_model_grads_optimizer_and_buffers_untouched():
    pool, _ = pool_of(16)
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    x, y = batch(6)
    per_sample(net(x), y).mean().backward()
    opt.step()  # momentum buffers exist now, .grad is set
    before = copy.deepcopy(net.state_dict())
    grads = [p.grad.clone() for p in net.parameters()]
    opt_state = copy.deepcopy(opt.state_dict())
    got = MIR(pool, net, per_sample, optimizer=opt).select(x, y, 4)
    assert got.shape == (4,)
    after = net.state_dict()
    for name, t in before.items():
        assert torch.equal(t, after[name]), name  # parameters and BatchNorm running stats, num_batches_tracked
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, net.parameters(), strict=True))
    assert not any(p.grad is not None and p.grad.grad_fn is not None for p in net.parameters())
    now = opt.state_dict()
    assert now["param_groups"] == opt_state["param_groups"]
    for key, state in opt_state["state"].items():
        assert torch.equal(state["momentum_buffer"], now["state"][key]["momentum_buffer"])


def test_mir_on_a_module_without_buffers_leaves_params_and_grads_untouched():
    """The virtual step's gradient comes from the module itself here: autograd.grad writes no .grad."""
    pool, _ = pool_of(16)
    net = nn.Sequential(nn.Flatten(), nn.Linear(FLAT, 4))
    x, y = batch(6)
    per_sample(net(x), y).mean().backward()
    before = {name: t.clone() for name, t in net.state_dict().items()}
    grads = [p.grad.clone() for p in net.parameters()]
    got = MIR(pool, net, per_sample, lr=0.5).select(x, y, 4)
    assert got.shape == (4,) and bool((got >= 0).all())
    assert all(torch.equal(t, net.state_dict()[name]) for name, t in before.items())
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, net.parameters(), strict=True))
    net.zero_grad(set_to_none=True)
    MIR(pool, net, per_sample, lr=0.5).select(x, y, 4)
    assert all(p.grad is None for p in net.parameters())


def test_mir_refuses_a_frozen_model_and_inference_mode_with_typed_errors():
    pool, _ = pool_of(16)
    x, y = batch(4)
    frozen = nn.Sequential(nn.Flatten(), nn.Linear(FLAT, 4)).requires_grad_(False)
    with pytest.raises(InvalidConfigurationError, match="requires_grad"):
        MIR(pool, frozen, per_sample, lr=0.1).select(x, y, 4)
    net = nn.Sequential(nn.Flatten(), nn.Linear(FLAT, 4))
    with torch.inference_mode(), pytest.raises(InvalidInputError, match="inference_mode"):
        MIR(pool, net, per_sample, lr=0.1).select(x, y, 4)
    with torch.inference_mode():
        assert Uniform(pool).select(x, y, 4).shape == (4,)  # no gradient: fine there


def test_select_checks_the_guard_on_its_2k_best_candidates():
    """``scores`` guards every candidate; ``select`` the 2k best, so a disputed third-best can fill k = 1."""
    pool = DreamPool(PoolConfig(dream_shape=SHAPE, capacity=32, coherence_threshold=0.0, device="cpu", num_classes=4))
    ids = pool.add(torch.rand(8, *SHAPE, 3), coherence=1.0, class_label=torch.tensor([0, 0, 0, 2, 2, 2, 2, 2]))
    net = nn.Sequential(nn.Flatten(), nn.Linear(FLAT, 4))
    with torch.no_grad():
        net[1].weight.zero_()
        net[1].bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))  # every entry predicted class 2: class 0 disputed
    x, _ = batch()
    y = torch.tensor([1, 3, 1, 3])
    mir = MIR(pool, net, per_sample, lr=0.1)
    cand, score = mir.scores(x, y)
    disputed = set(ids[:3].tolist())
    assert {i for i, s in zip(cand.tolist(), score.tolist(), strict=True) if s == float("-inf")} - {-1} == disputed
    assert set(mir.select(x, y, 2).tolist()) <= set(ids[3:].tolist())  # the 4 best hold 3 disputed: all checked
    assert set(mir.select(x, y, 1).tolist()) <= disputed  # the 2 best checked and dropped; the third, not checked


@pytest.mark.parametrize(("score", "balanced"), [("increase", False), ("after", True)])
def test_mir_selects_the_top_oracle_score(score, balanced):
    """Unguarded MIR over every entry returns the k largest losses after (or increases by) an explicit SGD step."""
    pool, ids = pool_of(20)
    net = Net().eval()  # eval: the oracle's step and MIR's see the same BatchNorm behaviour
    x, y = batch(5)
    mir = MIR(pool, net, per_sample, lr=0.5, candidates=20, drop_disputed=False, score=score, balanced=balanced)
    got = mir.select(x, y, 6)
    dreams, labels = pool.dreams(ids), pool.metadata(ids)["class_label"].long()
    stepped = copy.deepcopy(net)
    torch.optim.SGD(stepped.parameters(), lr=0.5).zero_grad()
    per_sample(stepped(x), y).mean().backward()
    with torch.no_grad():
        for p in stepped.parameters():
            p -= 0.5 * p.grad
        change = per_sample(stepped(dreams), labels)
        if score == "increase":
            change = change - per_sample(net(dreams), labels)
    order = change.argsort(descending=True)
    kth = change[order[5]]
    assert set(got.tolist()) >= set(ids[change > kth + 1e-5].tolist())
    assert set(got.tolist()) <= set(ids[change >= kth - 1e-5].tolist())


def test_mir_prefers_interfered_entries_on_a_constructed_case():
    """Incoming class 1 sits where memory holds class 0 (interfered) and far from class 2 (safe)."""
    pool = DreamPool(PoolConfig(dream_shape=SHAPE, capacity=32, coherence_threshold=0.0, device="cpu", num_classes=4))
    near = torch.full((6, *SHAPE, 3), 0.8)
    far = torch.zeros(6, *SHAPE, 3)
    far[..., 0] = 0.9
    ids_near = pool.add(near, coherence=1.0, class_label=0)
    pool.add(far, coherence=1.0, class_label=2)
    net = nn.Sequential(nn.Flatten(), nn.Linear(FLAT, 4))
    with torch.no_grad():
        net[1].weight.zero_()
        net[1].bias.zero_()
    x = torch.full((4, *SHAPE, 3), 0.8)
    y = torch.ones(4, dtype=torch.long)
    got = MIR(pool, net, per_sample, lr=1.0, candidates=12, drop_disputed=False).select(x, y, 6)
    assert set(got.tolist()) == set(ids_near.tolist())


def test_mir_learning_rate_from_optimizer_follows_it():
    pool, _ = pool_of(16)
    net = Net().eval()
    x, y = batch()
    opt = torch.optim.SGD(net.parameters(), lr=0.3)
    kw = {"drop_disputed": False, "score": "increase"}
    by_opt = MIR(pool, net, per_sample, optimizer=opt, generator=torch.Generator().manual_seed(2), **kw)
    by_lr = MIR(pool, net, per_sample, lr=0.3, generator=torch.Generator().manual_seed(2), **kw)
    ids_a, score_a = by_opt.scores(x, y)
    ids_b, score_b = by_lr.scores(x, y)
    assert torch.equal(ids_a, ids_b) and torch.allclose(score_a, score_b, atol=1e-6)
    opt.param_groups[0]["lr"] = 0.0  # a scheduler's change is read at the next call: no step, no change
    _, zero = by_opt.scores(x, y)
    assert torch.allclose(zero[torch.isfinite(zero)], torch.zeros(()), atol=1e-6)


def test_mir_balanced_draw_takes_each_class_in_turn():
    """40 entries of class 0 and 2 of each other class: 8 balanced candidates are 2 of each class."""
    pool, ids = pool_of(46, classes=[0] * 40 + [1, 2, 3] * 2)
    x, y = batch()
    for seed in range(5):
        mir = MIR(pool, Net(), per_sample, lr=0.1, candidates=8, generator=torch.Generator().manual_seed(seed))
        cand, _ = mir.scores(x, y)
        labels = pool.metadata(cand, columns=("class_label",))["class_label"]
        assert sorted(labels.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3] and len(set(cand.tolist())) == 8
    uniform = MIR(
        pool, Net(), per_sample, lr=0.1, candidates=8, balanced=False, generator=torch.Generator().manual_seed(0)
    )
    draws = [pool.metadata(uniform.scores(x, y)[0], columns=("class_label",))["class_label"] for _ in range(20)]
    assert float(torch.cat(draws).eq(0).float().mean()) > 0.6  # uniform over entries: mostly class 0 (40 of 46)


def test_mir_drop_high_loss_sets_aside_the_highest_current_losses():
    pool, ids = pool_of(20)
    net = Net().eval()
    x, y = batch()
    mir = MIR(pool, net, per_sample, lr=0.1, candidates=20, drop_high_loss=0.25, drop_disputed=False)
    cand, score = mir.scores(x, y)
    slots_loss = per_sample(net(pool.dreams(cand)), pool.metadata(cand)["class_label"].long())
    dropped = ~torch.isfinite(score)
    assert int(dropped.sum()) == 5
    assert slots_loss[dropped].min() >= slots_loss[~dropped].max() - 1e-6


def test_mir_drop_disputed_skips_entries_predicted_as_another_replayable_class():
    pool = DreamPool(PoolConfig(dream_shape=SHAPE, capacity=32, coherence_threshold=0.0, device="cpu", num_classes=4))
    ids = pool.add(torch.rand(8, *SHAPE, 3), coherence=1.0, class_label=torch.tensor([0, 0, 0, 0, 2, 2, 2, 2]))
    net = nn.Sequential(nn.Flatten(), nn.Linear(FLAT, 4))
    with torch.no_grad():
        net[1].weight.zero_()
        net[1].bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))  # predicts class 2 for everything
    x, _ = batch()
    y = torch.tensor([1, 3, 1, 3])
    mir = MIR(pool, net, per_sample, lr=0.1)  # drop_disputed is the default
    got = mir.select(x, y, 8)
    assert set(got.tolist()) - {-1} == set(ids[4:].tolist())  # class-0 entries are disputed by class 2
    got = mir.select(x, torch.tensor([2, 3, 1, 3]), 8)  # class 2 is being learned now: interference, kept
    assert set(got.tolist()) == set(ids.tolist())
    got = mir.select(x, y, 8, where=lambda m: m["class_label"] == 0)  # class 2 not eligible: no dispute
    assert set(got.tolist()) - {-1} == set(ids[:4].tolist())
    net[1].bias.data = torch.tensor([0.0, 5.0, 0.0, 0.0])  # predicts class 1, which no entry holds
    assert set(mir.select(x, y, 8).tolist()) == set(ids.tolist())
    assert set(MIR(pool, net, per_sample, lr=0.1, drop_disputed=False).select(x, y, 8).tolist()) == set(ids.tolist())


def test_mir_refuses_bad_configuration():
    pool, _ = pool_of(4)
    net = Net()
    with pytest.raises(InvalidConfigurationError):
        MIR(pool, net, per_sample)  # neither lr nor optimizer
    with pytest.raises(InvalidConfigurationError):
        MIR(pool, net, per_sample, lr=-1.0)
    with pytest.raises(InvalidConfigurationError):
        MIR(pool, net, per_sample, lr=0.1, candidates=0)
    with pytest.raises(InvalidConfigurationError):
        MIR(pool, net, per_sample, lr=0.1, drop_high_loss=1.0)
    with pytest.raises(InvalidConfigurationError):
        MIR(pool, net, per_sample, lr=0.1, score="before")
    with pytest.raises(InvalidConfigurationError):
        MIR(pool, lambda z: z, per_sample, lr=0.1)  # type: ignore[arg-type]
    x, y = batch()
    mean_loss = MIR(pool, net, lambda a, b: nn.functional.cross_entropy(a, b), lr=0.1)
    with pytest.raises(InvalidConfigurationError):
        mean_loss.select(x, y, 2)


# ------------------------------------------------------------------ KNN-Shapley
def brute_force_shapley(dist, eval_y, cand_y, valid, k):
    """Exact Shapley values of the KNN utility by enumerating permutations of the valid candidates."""
    e, n = dist.shape
    out = torch.zeros(e, n, dtype=torch.float64)
    players = [i for i in range(n) if valid[i]]

    def utility(row, subset):
        if not subset:
            return 0.0
        ranked = sorted(subset, key=lambda i: (float(dist[row, i]), i))[:k]
        return sum(float(cand_y[i] == eval_y[row]) for i in ranked) / k

    perms = list(itertools.permutations(players))
    for row in range(e):
        for perm in perms:
            seen: list[int] = []
            for p in perm:
                out[row, p] += utility(row, [*seen, p]) - utility(row, seen)
                seen.append(p)
        out[row] /= len(perms)
    return out


@pytest.mark.parametrize(("n", "k", "invalid"), [(5, 3, []), (6, 2, [1, 4]), (4, 3, [0, 2]), (5, 1, [3])])
def test_knn_shapley_matches_brute_force(n, k, invalid):
    g = torch.Generator().manual_seed(n * 10 + k)
    dist = torch.rand(3, n, generator=g, dtype=torch.float64)
    eval_y = torch.randint(0, 2, (3,), generator=g)
    cand_y = torch.randint(0, 2, (n,), generator=g)
    valid = torch.ones(n, dtype=torch.bool)
    valid[invalid] = False
    got = knn_shapley(dist, eval_y, cand_y, valid, k)
    want = brute_force_shapley(dist, eval_y, cand_y, valid, k)
    assert torch.allclose(got, want, atol=1e-9)
    assert torch.allclose(
        got.sum(1),
        torch.tensor(
            [brute_force_shapley(dist, eval_y, cand_y, valid, k)[r].sum() for r in range(3)], dtype=torch.float64
        ),
    )


def test_knn_shapley_prefers_entries_that_classify_memory_well():
    """Class 0 lives in two clusters; the mislabelled entry inside class 2's cluster scores lowest."""
    pool = DreamPool(PoolConfig(dream_shape=SHAPE, capacity=64, coherence_threshold=0.0, device="cpu", num_classes=4))
    g = torch.Generator().manual_seed(0)
    a = 0.1 + 0.02 * torch.rand(12, *SHAPE, 3, generator=g)
    b = 0.9 - 0.02 * torch.rand(12, *SHAPE, 3, generator=g)
    pool.add(a, coherence=1.0, class_label=0)
    pool.add(b, coherence=1.0, class_label=2)
    odd = pool.add(b[:1], coherence=1.0, class_label=0)  # a class-0 label deep in class 2's cluster
    x, y = batch()
    y = torch.full_like(y, 3)
    picks = torch.cat(
        [
            KNNShapley(pool, lambda d: d.flatten(1), per_class=6, generator=torch.Generator().manual_seed(s)).select(
                x, y, 6
            )
            for s in range(10)
        ]
    )
    assert int(odd) not in picks.tolist()


# ---------------------------------------------------------------------- Nearest
def test_nearest_returns_the_entries_closest_to_the_batch():
    pool = DreamPool(PoolConfig(dream_shape=SHAPE, capacity=32, coherence_threshold=0.0, device="cpu", num_classes=4))
    levels = torch.linspace(0.0, 1.0, 11)
    ids = pool.add(levels.reshape(11, 1, 1, 1, 1).expand(11, *SHAPE, 3).contiguous(), coherence=1.0, class_label=0)
    x = torch.full((2, *SHAPE, 3), 0.42)
    got = Nearest(pool, lambda d: d.flatten(1), candidates=None).select(x, torch.zeros(2, dtype=torch.long), 3)
    assert set(got.tolist()) == set(ids[[3, 4, 5]].tolist())  # levels 0.3, 0.4, 0.5


def test_feature_strategies_refuse_bad_features():
    pool, _ = pool_of(8)
    x, y = batch()
    for s in (KNNShapley(pool, lambda d: d.flatten()), Nearest(pool, lambda d: d.flatten())):
        with pytest.raises(InvalidConfigurationError):
            s.select(x, y, 2)
    with pytest.raises(InvalidConfigurationError):
        KNNShapley(pool, lambda d: d, k=0)
    with pytest.raises(InvalidConfigurationError):
        Nearest(pool, 3)  # type: ignore[arg-type]


@pytest.mark.gpu
def test_strategies_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    pool, ids = pool_of(12, device="cuda")
    x, y = batch()
    net = Net().cuda()
    for s in (
        Uniform(pool),
        MIR(pool, net, per_sample, lr=0.1),
        KNNShapley(pool, net.features),
        Nearest(pool, net.features),
    ):
        got = s.select(x.cuda(), y.cuda(), 4, where=lambda m: m["class_label"] != 0)
        assert got.device.type == "cuda" and got.shape == (4,)
        assert set(got.tolist()) - {-1} <= set(ids.tolist())
