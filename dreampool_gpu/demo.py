"""The main job: a classifier that learns from a small, noisy labelled stream, with the pool as replay memory.

Each step a small CNN (:class:`SmallCNN`) receives a few fresh labelled dreams from a
stream (a set of :mod:`dreampool_gpu.synthetic`; by default ``frequency_orientation``,
where only the spatial layout tells the 8 classes apart, 8 fresh dreams a step, 20% of
labels replaced by another class). It trains on them together with dreams replayed from
the pool, feeds back how useful each replayed dream was, and adds the fresh dreams to
the pool. The regime is a stream seen once: the learner keeps no data set of its own,
so without the pool every example teaches it for one step only (a user whose labelled
examples arrive over time, e.g. from annotation or from the field, and whose labels are
imperfect). Four arms see the same stream, validation set and initial weights:

- ``none``: no pool, the fresh dreams only;
- ``random``: replay drawn uniformly from the same pool;
- ``feature``: replay retrieved by the pool (``hybrid`` mode, the fresh dreams as
  queries, their labels as ``class_hint``) with the default feature encoder;
- ``learned``: the same with the learned encoder, refitted every ``refit_every``
  steps by ``pool.fit_encoder``.

Utility of a replayed dream, the original's definition made per dream: with
``loss`` the learner's cross-entropy on that dream (under its stored label)
before and after the step that trained on it, ``u = -clamp(loss_after -
loss_before, -1, 1)`` in [-1, 1] (positive = the step agreed with the dream), and
the pool receives ``(1 + u) / 2`` in [0, 1] (0.5 = neutral), the mapping of the
original's per-class bias weight. New entries get one neutral 0.5 record on entry,
so that untried dreams rank with neutral ones, not below dreams that hurt.

Gate: fresh dreams are added with ``force=True``. Every labelled stream example is
worth keeping; the solver's coherence (a balanced mean colour) says nothing about
how much a dream teaches a classifier. The pool still stores the solver's scores.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from dreampool_gpu.config import PoolConfig
from dreampool_gpu.errors import InvalidInputError
from dreampool_gpu.pool import DreamPool
from dreampool_gpu.solver import score_dreams
from dreampool_gpu.synthetic import DATASETS, make_dataset

ARMS = ("none", "random", "feature", "learned")
"""The compared arms, in table order."""


def utility_from_losses(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Pool utility ``(1 - clamp(after - before, -1, 1)) / 2`` in [0, 1], same shape as the inputs."""
    return (1.0 - (after - before).clamp(-1.0, 1.0)) / 2.0


class SmallCNN(nn.Module):
    """Three 3x3 convolutions, global average pooling, a linear head.

    Input ``[B, R, C, L, 3]`` dreams (layers x RGB become channels); output
    ``[B, num_classes]`` logits, on the module's device.
    """

    def __init__(self, layers: int, num_classes: int, width: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3 * layers, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2),
            nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, stride=2),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, dreams: torch.Tensor) -> torch.Tensor:
        b, r, c, layers, _ = dreams.shape
        x = dreams.reshape(b, r, c, 3 * layers).permute(0, 3, 1, 2)
        return self.head(self.body(x - 0.5))


@dataclass(frozen=True)
class ArmResult:
    """One arm's run: the validation curve and the replay statistics."""

    arm: str
    seed: int
    steps: int
    curve_steps: list[int]
    curve_accuracy: list[float]
    steps_to_target: int | None
    seconds_to_target: float | None
    final_accuracy: float
    helpful_rate: float
    unique_per_100: float
    replayed: int
    train_s: float
    pool_s: float
    wall_s: float

    def to_dict(self) -> dict[str, object]:
        """JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True)
class StreamSpec:
    """The data regime: set, dream shape, stream length and noise, validation size."""

    dataset: str = "frequency_orientation"
    shape: tuple[int, int, int] = (16, 16, 2)
    steps: int = 300
    fresh: int = 8
    label_noise: float = 0.2
    imbalance: float = 1.0
    validation: int = 1000

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise InvalidInputError("dataset", f"one of {', '.join(DATASETS)}", repr(self.dataset))
        if not 0.0 <= self.label_noise < 1.0:
            raise InvalidInputError("label_noise", "a float in [0, 1)", self.label_noise)
        if not self.imbalance >= 1.0:
            raise InvalidInputError("imbalance", "a float >= 1", self.imbalance)


@dataclass
class _Stream:
    dreams: torch.Tensor
    labels: torch.Tensor
    clean: torch.Tensor
    val_dreams: torch.Tensor
    val_labels: torch.Tensor
    num_classes: int


def _make_stream(spec: StreamSpec, seed: int) -> _Stream:
    """The labelled stream (``steps * fresh`` dreams, long-tailed classes, noisy labels) and a clean,
    class-balanced validation set.

    Class ``c`` of ``C`` arrives with probability proportional to ``imbalance ** (-c / (C - 1))``
    (the most frequent class ``imbalance`` times as often as the rarest); each stream dream is
    distinct. A ``label_noise`` fraction of labels is replaced by a uniformly drawn other class.
    """
    n = spec.steps * spec.fresh
    num_classes = make_dataset(spec.dataset, 1, shape=spec.shape).num_classes
    g = torch.Generator().manual_seed(seed)
    weights = spec.imbalance ** (-torch.arange(num_classes) / max(num_classes - 1, 1))
    wanted = torch.multinomial(weights, n, replacement=True, generator=g)
    counts = torch.bincount(wanted, minlength=num_classes)
    # a uniform draw large enough to hold every class's share of the stream, with a margin
    drawn = make_dataset(spec.dataset, int(num_classes * counts.max() * 1.3) + 64, shape=spec.shape, seed=seed)
    order = torch.empty(n, dtype=torch.int64)
    for c in range(num_classes):
        pool_c = torch.nonzero(drawn.labels == c).squeeze(1)
        if pool_c.numel() < counts[c]:
            raise InvalidInputError("spec", "a stream the generator can fill", f"class {c} short")
        order[wanted == c] = pool_c[: int(counts[c])]
    clean = drawn.labels[order]
    flip = torch.rand(n, generator=g) < spec.label_noise
    other = (clean + torch.randint(1, num_classes, (n,), generator=g)) % num_classes
    val = make_dataset(spec.dataset, spec.validation, shape=spec.shape, seed=1_000_003 + seed)
    return _Stream(drawn.dreams[order], torch.where(flip, other, clean), clean, val.dreams, val.labels, num_classes)


def _accuracy(model: nn.Module, dreams: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(dreams).argmax(1) == labels).float().mean())


def run_arm(
    arm: str,
    spec: StreamSpec,
    *,
    seed: int = 0,
    replay: int = 3,
    capacity: int = 4000,
    refit_every: int = 50,
    fit_steps: int = 100,
    eval_every: int = 10,
    target: float = 0.95,
    lr: float = 3e-3,
    fetch_k: int = 64,
    hints: str = "batch",
    device: str = "cpu",
    progress: bool = False,
) -> ArmResult:
    """Train the CNN on ``spec``'s stream with one arm's replay; return its curve and statistics.

    Args:
        arm: one of :data:`ARMS`. spec: the data regime.

    Keyword Args:
        seed: seeds the stream, the validation set, the weights and the random replay.
        replay: dreams replayed per fresh dream (``k`` of the retrieval).
        capacity: pool capacity. refit_every, fit_steps: the ``learned`` arm's encoder refits.
        eval_every: steps between validation passes (not timed). target: the accuracy of
        ``steps_to_target``. lr: Adam's learning rate. fetch_k: candidates per query of the
        retrieval. hints: ``"batch"`` (each query's own stream label) or ``"balanced"`` (a class
        drawn uniformly from those seen so far), see :func:`_replay`. device: the pool's and
        the model's device. progress: a tqdm bar.

    Returns:
        The arm's :class:`ArmResult`. Time spent in pool calls (retrieve, add, feedback, refit, the
        extra forward pass that measures utility, the solver scores) counts as ``pool_s``, the
        learner's step as ``train_s``; validation passes are not timed. ``unique_per_100`` is
        the number of distinct dreams replayed over the run, per 100 steps.

    Raises:
        InvalidInputError: unknown ``arm``.
    """
    if arm not in ARMS:
        raise InvalidInputError("arm", f"one of {', '.join(ARMS)}", repr(arm))
    if hints not in ("batch", "balanced"):
        raise InvalidInputError("hints", '"batch" or "balanced"', repr(hints))
    stream = _make_stream(spec, seed)
    pool_config = PoolConfig(
        dream_shape=spec.shape, capacity=capacity, device=device, retrieval_mode="hybrid", **_encoder_options(arm, stream)
    )
    pool = DreamPool(pool_config) if arm != "none" else None
    dev = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    model = SmallCNN(spec.shape[2], stream.num_classes).to(dev)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    rng = torch.Generator().manual_seed(seed + 7)
    val_x, val_y = stream.val_dreams.to(dev), stream.val_labels.to(dev)

    _warm_up(spec, stream.num_classes, (spec.fresh, spec.fresh * (1 + replay)), dev)
    curve_steps, curve_acc = [0], [_accuracy(model, val_x, val_y)]
    helpful = replayed = 0
    seen = torch.zeros(stream.num_classes, dtype=torch.bool, device=dev)
    used: set[int] = set()
    train_s = pool_s = 0.0
    steps_to_target = seconds_to_target = None
    for step in tqdm(range(1, spec.steps + 1), desc=f"arm {arm}", disable=not progress, unit="step"):
        lo = (step - 1) * spec.fresh
        x, y = stream.dreams[lo : lo + spec.fresh].to(dev), stream.labels[lo : lo + spec.fresh].to(dev)
        t0 = time.perf_counter()
        seen[y] = True
        ids = torch.empty(0, dtype=torch.int64, device=dev)
        if pool is not None and len(pool):
            if arm == "learned" and step % refit_every == 0:
                pool.fit_encoder(steps=fit_steps, seed=seed + step, progress=False)  # type: ignore[attr-defined]
            ids, rx, ry = _replay(pool, arm, x, y, seen, hints, replay, fetch_k, rng)
        else:
            rx, ry = x[:0], y[:0]
        t1 = time.perf_counter()
        model.train()
        losses = F.cross_entropy(model(torch.cat([x, rx])), torch.cat([y, ry]), reduction="none")
        optimiser.zero_grad()
        losses.mean().backward()
        optimiser.step()
        t2 = time.perf_counter()
        if ids.numel():
            with torch.no_grad():
                after = F.cross_entropy(model(rx), ry, reduction="none")
            utility = utility_from_losses(losses[spec.fresh :].detach(), after)
            pool.feedback(ids, utility)  # type: ignore[union-attr]
            helpful += int((utility > 0.5).sum())
            replayed += int(ids.numel())
            used.update(ids.tolist())
        if pool is not None:
            scores = score_dreams(x)
            new = pool.add(x, coherence=scores.coherence, energy=scores.energy, violation=scores.violation,
                           class_labels=y, force=True)
            pool.feedback(new, 0.5)
        t3 = time.perf_counter()
        train_s += t2 - t1
        pool_s += (t1 - t0) + (t3 - t2)
        if step % eval_every == 0 or step == spec.steps:
            model.eval()
            curve_steps.append(step)
            curve_acc.append(_accuracy(model, val_x, val_y))
            if steps_to_target is None and curve_acc[-1] >= target:
                steps_to_target, seconds_to_target = step, train_s + pool_s
    return ArmResult(
        arm=arm,
        seed=seed,
        steps=spec.steps,
        curve_steps=curve_steps,
        curve_accuracy=curve_acc,
        steps_to_target=steps_to_target,
        seconds_to_target=seconds_to_target,
        final_accuracy=curve_acc[-1],
        helpful_rate=helpful / replayed if replayed else float("nan"),
        unique_per_100=len(used) * 100.0 / spec.steps,
        replayed=replayed,
        train_s=train_s,
        pool_s=pool_s,
        wall_s=train_s + pool_s,
    )


def _warm_up(spec: StreamSpec, num_classes: int, batches: tuple[int, ...], device: torch.device) -> None:
    """One untimed step of a throwaway CNN per batch size: the first call of a shape pays for
    kernel selection, which would otherwise land on whichever arm runs first."""
    model = SmallCNN(spec.shape[2], num_classes).to(device)
    for b in batches:
        model(torch.zeros(b, *spec.shape, 3, device=device)).sum().backward()


def _encoder_options(arm: str, stream: _Stream) -> dict[str, object]:
    """PoolConfig fields of the arm's encoder."""
    if arm == "learned":
        return {"encoder": "learned", "num_classes": stream.num_classes}
    return {}


def _replay(
    pool: DreamPool,
    arm: str,
    x: torch.Tensor,
    y: torch.Tensor,
    seen: torch.Tensor,
    hints: str,
    k: int,
    fetch_k: int,
    rng: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ids ``[M]``, dreams ``[M, R, C, L, 3]`` and stored labels ``[M]`` replayed for fresh ``x``.

    ``random`` draws ``k * len(x)`` live entries uniformly (so its classes follow the stream's).
    The retrieval arms query with each fresh dream and a ``class_hint`` drawn uniformly from the
    classes the learner has seen labels of (``seen`` ``[num_classes]`` bool, its own count of the
    stream's labels): ``k`` hits each, the stored dreams of that class most like the fresh one.
    """
    if arm == "random":
        live = pool.bank.columns["ids"][pool.bank.slots_by_age()]
        pick = torch.randint(live.numel(), (min(k * x.shape[0], live.numel()),), generator=rng)
        ids = live[pick.to(live.device)]
    else:
        if hints == "batch":  # the stream's own (noisy) labels
            hint = y
        else:
            classes = torch.nonzero(seen).squeeze(1).cpu()
            hint = classes[torch.randint(classes.numel(), (x.shape[0],), generator=rng)].to(y.device)
        hits = pool.retrieve(x, k=k, mode="hybrid", class_hint=hint, fetch_k=fetch_k)
        ids = hits.ids[hits.mask]
    meta = pool.metadata(ids)
    dreams = pool.dreams(ids).float().to(x.device)
    return ids, dreams, meta["class_label"].long().to(x.device)


@dataclass(frozen=True)
class ArmSummary:
    """One arm over seeds: means and standard deviations (``nan`` where undefined)."""

    arm: str
    runs: int
    reached: int
    steps_to_target: float
    steps_to_target_std: float
    seconds_to_target: float
    seconds_to_target_std: float
    final_accuracy: float
    final_accuracy_std: float
    helpful_rate: float
    unique_per_100: float
    wall_s: float
    pool_s: float
    overhead: float
    error: str = ""

    def to_dict(self) -> dict[str, object]:
        """JSON-ready dict."""
        return asdict(self)


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(results: list[ArmResult], errors: dict[str, str] | None = None) -> list[ArmSummary]:
    """Per-arm means and spreads over seeds, in :data:`ARMS` order.

    Steps and seconds to target average the runs that reached it (``reached`` of ``runs``).
    ``overhead`` is the arm's mean wall time per step over the ``none`` arm's, minus 1.
    """
    errors = errors or {}
    by_arm: dict[str, list[ArmResult]] = {}
    for r in results:
        by_arm.setdefault(r.arm, []).append(r)
    base = by_arm.get("none")
    base_wall = statistics.fmean(r.wall_s / r.steps for r in base) if base else float("nan")
    out = []
    for arm in ARMS:
        runs = by_arm.get(arm, [])
        if not runs:
            if arm in errors:
                nan = float("nan")
                out.append(ArmSummary(arm, 0, 0, *([nan] * 11), error=errors[arm]))  # type: ignore[arg-type]
            continue
        hit = [r for r in runs if r.steps_to_target is not None]
        steps, steps_sd = _mean_std([float(r.steps_to_target) for r in hit])  # type: ignore[arg-type]
        secs, secs_sd = _mean_std([float(r.seconds_to_target) for r in hit])  # type: ignore[arg-type]
        final, final_sd = _mean_std([r.final_accuracy for r in runs])
        wall = statistics.fmean(r.wall_s / r.steps for r in runs)
        out.append(
            ArmSummary(
                arm=arm,
                runs=len(runs),
                reached=len(hit),
                steps_to_target=steps,
                steps_to_target_std=steps_sd,
                seconds_to_target=secs,
                seconds_to_target_std=secs_sd,
                final_accuracy=final,
                final_accuracy_std=final_sd,
                helpful_rate=_mean_std([r.helpful_rate for r in runs if not math.isnan(r.helpful_rate)])[0],
                unique_per_100=statistics.fmean(r.unique_per_100 for r in runs),
                wall_s=statistics.fmean(r.wall_s for r in runs),
                pool_s=statistics.fmean(r.pool_s for r in runs),
                overhead=wall / base_wall - 1.0 if base else float("nan"),
            )
        )
    return out


def table(summaries: list[ArmSummary], *, target: float = 0.95) -> list[str]:
    """The comparison as markdown table lines."""

    def pm(mean: float, sd: float, fmt: str) -> str:
        return "n/a" if math.isnan(mean) else f"{mean:{fmt}} ± {sd:{fmt}}"

    pct = f"{target:.0%}"
    lines = [
        f"| arm | reached {pct} | steps to {pct} | seconds to {pct} | final accuracy | helpful rate "
        "| unique dreams / 100 steps | wall s | pool s | wall per step vs none |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in summaries:
        if s.error:
            lines.append(f"| {s.arm} | not run: {s.error} |" + " |" * 8)
            continue
        helpful = "n/a" if math.isnan(s.helpful_rate) else f"{s.helpful_rate:.2f}"
        overhead = "n/a" if math.isnan(s.overhead) else f"{s.overhead:+.0%}"
        lines.append(
            f"| {s.arm} | {s.reached}/{s.runs} | {pm(s.steps_to_target, s.steps_to_target_std, '.0f')} "
            f"| {pm(s.seconds_to_target, s.seconds_to_target_std, '.1f')} "
            f"| {pm(s.final_accuracy, s.final_accuracy_std, '.3f')} | {helpful} | {s.unique_per_100:.0f} "
            f"| {s.wall_s:.1f} | {s.pool_s:.1f} | {overhead} |"
        )
    return lines


def run_comparison(
    spec: StreamSpec,
    *,
    seeds: list[int],
    arms: tuple[str, ...] = ARMS,
    progress: bool = False,
    **options: object,
) -> tuple[list[ArmResult], dict[str, str]]:
    """Every arm on every seed (same stream, validation set and initial weights per seed).

    An arm whose pool cannot be built (e.g. an encoder this installation lacks) is
    recorded in the returned errors ``{arm: message}`` instead of stopping the others.
    Keyword ``options`` go to :func:`run_arm`.
    """
    results: list[ArmResult] = []
    errors: dict[str, str] = {}
    for arm in arms:
        for seed in seeds:
            try:
                results.append(run_arm(arm, spec, seed=seed, progress=progress, **options))  # type: ignore[arg-type]
            except (TypeError, AttributeError, ValueError) as exc:
                if arm != "learned":
                    raise
                errors[arm] = f"{type(exc).__name__}: {exc}"
                break
    return results, errors


@dataclass(frozen=True)
class DemoReport:
    """What ``dreampool demo`` prints: the spec, one row per arm, the raw runs."""

    spec: StreamSpec
    summaries: list[ArmSummary]
    results: list[ArmResult] = field(repr=False)

    def lines(self) -> list[str]:
        """The comparison table and a line on the regime."""
        s = self.spec
        head = (
            f"{s.dataset} {'x'.join(map(str, s.shape))}: {s.steps} steps of {s.fresh} fresh dreams, "
            f"{s.label_noise:.0%} label noise, class imbalance {s.imbalance:g}, "
            f"validation {s.validation} clean dreams"
        )
        return [head, "", *table(self.summaries)]

    def to_dict(self) -> dict[str, object]:
        """JSON-ready dict."""
        return {
            "spec": asdict(self.spec),
            "summaries": [s.to_dict() for s in self.summaries],
            "runs": [r.to_dict() for r in self.results],
        }


def run_demo(
    *,
    steps: int = 300,
    fresh: int = 8,
    dataset: str = "frequency_orientation",
    dream_shape: tuple[int, int, int] = (16, 16, 2),
    capacity: int = 4000,
    arms: tuple[str, ...] = ARMS,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
) -> DemoReport:
    """Run every arm once (one seed) on the same stream and compare them.

    Keyword Args:
        steps: training steps. fresh: fresh stream dreams per step. dataset: a
        :mod:`~dreampool_gpu.synthetic` set. dream_shape: ``(rows, cols, layers)``.
        capacity: pool capacity. arms: a subset of :data:`ARMS`. device: pool and model
        device. seed: seeds everything. progress: a tqdm bar per arm.
    """
    spec = StreamSpec(dataset=dataset, shape=dream_shape, steps=steps, fresh=fresh)
    results, errors = run_comparison(
        spec, seeds=[seed], arms=arms, progress=progress, capacity=capacity, device=device
    )
    return DemoReport(spec, summarise(results, errors), results)
