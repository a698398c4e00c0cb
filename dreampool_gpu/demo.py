"""The main job: a classifier learns from a small, noisy labelled stream; the pool is its memory.

Each step a small CNN (:class:`SmallCNN`) receives a few fresh labelled dreams from a
stream (a set of :mod:`dreampool_gpu.synthetic`; by default ``frequency_orientation``,
where only the spatial layout tells the 8 classes apart, 8 fresh dreams a step, 20% of
labels replaced by another class). It trains on them together with dreams replayed from
the pool, feeds back how useful each replayed dream was, and adds the fresh dreams to
the pool. The regime is a stream seen once: the learner keeps no data set of its own,
so without the pool every example teaches it for one step only (a user whose labelled
examples arrive over time, e.g. from annotation or from the field, and whose labels are
imperfect). Five arms see the same stream, validation set and initial weights:

- ``none``: no pool, the fresh dreams only;
- ``random``: replay drawn uniformly from the same pool;
- ``trusted``: replay drawn uniformly among the entries the learner trusts
  (:func:`trusted`: per stored class, all but the ``drop`` fraction with the lowest
  utility), the rest re-scored a few per step (their second chance);
- ``feature``: replay retrieved by the pool's k-NN (``hybrid`` mode, the fresh dreams as
  queries, ``class_hint`` per :func:`_hints`, the same trust filter as ``where=``) with
  the default feature encoder;
- ``learned``: the same with the learned encoder, refitted every ``refit_every``
  steps by ``pool.fit_encoder``.

Utility (``utility="agreement"``, the default): the learner's agreement with a stored
label, ``p(label) / max_c p(c)`` in (0, 1] (:func:`agreement`), read off the training
step's own forward pass (before the update; no extra pass), for the replayed dreams and,
as their first record, for the fresh ones. A wrong label scores low once the learner
has learned the class from the others. ``utility="loss"`` is the first round's
definition: the loss change the step caused on the replayed dream, ``(1 - clamp(after -
before, -1, 1)) / 2``, which training on a dream raises whatever its label (fresh
dreams get a neutral 0.5). A replayed dream is *helpful* when its utility is above 0.5.

Gate: fresh dreams are added with ``force=True`` and a coherence of 1: every labelled
stream example is worth keeping; the solver's coherence (a balanced mean colour) says
nothing about how much a dream teaches a classifier.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from dreampool_gpu.config import PoolConfig
from dreampool_gpu.errors import InvalidInputError
from dreampool_gpu.pool import DreamPool
from dreampool_gpu.synthetic import DATASETS, make_dataset

ARMS = ("none", "random", "trusted", "feature", "learned")
"""The compared arms, in table order."""

HINTS = ("batch", "balanced")
"""How a retrieval arm picks each query's ``class_hint``, see :func:`_hints`."""

UTILITIES = ("agreement", "loss")
"""What a replayed dream's utility feedback measures, see the module docstring."""


def utility_from_losses(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Pool utility ``(1 - clamp(after - before, -1, 1)) / 2`` in [0, 1], same shape as inputs."""
    return (1.0 - (after - before).clamp(-1.0, 1.0)) / 2.0


def agreement(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The learner's agreement with stored labels: ``p(label) / max_c p(c)`` in (0, 1].

    ``logits`` ``[N, num_classes]``, ``labels`` ``[N]`` int64, same device; returns ``[N]``
    float, 1 exactly where the label is the learner's top class.
    """
    return (logits.gather(1, labels[:, None]).squeeze(1) - logits.max(1).values).exp()


class SmallCNN(nn.Module):
    """Three 3x3 convolutions, global average pooling, a linear head.

    Input ``[B, R, C, L, 3]`` dreams (layers x RGB become channels); output
    ``[B, num_classes]`` logits, on the module's device. ``width`` 16: ~15K parameters;
    128: ~0.9M (a learner whose step costs ~20x more).
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
    """One arm's run: the validation curve, the replay statistics and where the time went.

    ``train_s``: the learner's steps; ``pool_s``: pool calls (retrieve, gather, add,
    feedback, encoder refits; ``fit_s`` of it the refits); ``utility_s``: the learner's
    extra forward passes that measure utility or pick hints. ``clean_rate``: replayed dreams
    whose stored label is the true class (known to the benchmark only); ``util_clean`` and
    ``util_noisy``: mean ``util_mean`` of correctly and wrongly labelled entries at the end.
    """

    arm: str
    seed: int
    steps: int
    curve_steps: list[int]
    curve_accuracy: list[float]
    steps_to_target: int | None
    seconds_to_target: float | None
    final_accuracy: float
    helpful_rate: float
    clean_rate: float
    unique_per_100: float
    replayed: int
    util_clean: float
    util_noisy: float
    train_s: float
    pool_s: float
    utility_s: float
    fit_s: float
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
    """The labelled stream (``steps * fresh`` dreams, long-tailed classes, noisy labels) and a
    clean, class-balanced validation set.

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
    size = int(num_classes * counts.max() * 1.3) + 64
    drawn = make_dataset(spec.dataset, size, shape=spec.shape, seed=seed)
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
    labels = torch.where(flip, other, clean)
    return _Stream(drawn.dreams[order], labels, clean, val.dreams, val.labels, num_classes)


def _accuracy(model: nn.Module, dreams: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(dreams).argmax(1) == labels).float().mean())


@dataclass
class _Clock:
    """Seconds per kind of work, and the replay counters of one run."""

    train: float = 0.0
    pool: float = 0.0
    utility: float = 0.0
    fit: float = 0.0
    helpful: int = 0
    clean: int = 0
    replayed: int = 0
    used: set[int] = field(default_factory=set)

    @property
    def wall(self) -> float:
        return self.train + self.pool + self.utility


def run_arm(
    arm: str,
    spec: StreamSpec,
    *,
    seed: int = 0,
    replay: int = 3,
    capacity: int = 4000,
    hints: str = "balanced",
    utility: str = "agreement",
    drop: float = 0.25,
    rescore: int = 8,
    refit_every: int = 100,
    fit_steps: int = 50,
    fit_batch: int = 64,
    width: int = 16,
    eval_every: int = 10,
    target: float = 0.95,
    lr: float = 3e-3,
    fetch_k: int = 64,
    device: str = "cpu",
    progress: bool = False,
) -> ArmResult:
    """Train the CNN on ``spec``'s stream with one arm's replay; return its curve and statistics.

    Args:
        arm: one of :data:`ARMS`. spec: the data regime.

    Keyword Args:
        seed: seeds the stream, the validation set, the weights and the random replay.
        replay: dreams replayed per fresh dream (``k`` of the retrieval). capacity: pool
        capacity. hints: one of :data:`HINTS` (see :func:`_hints`). utility: one of
        :data:`UTILITIES`. drop: the ``trusted``, ``feature`` and ``learned`` arms replay
        only :func:`trusted` entries (``drop`` in [0, 1); 0 = no filter). rescore: entries
        the filter left out that the learner re-scores per step (their second chance; the
        agreement utility only). refit_every, fit_steps, fit_batch: the
        ``learned`` arm's encoder refits. width: the CNN's width. eval_every: steps between
        validation passes (not timed). target: the accuracy of ``steps_to_target``. lr:
        Adam's learning rate. fetch_k: candidates per query. device: pool and model device.
        progress: a tqdm bar.

    Returns:
        The arm's :class:`ArmResult`. ``unique_per_100`` is the number of distinct dreams
        replayed over the run, per 100 steps.

    Raises:
        InvalidInputError: unknown ``arm``, ``hints`` or ``utility``; ``drop`` out of range.
    """
    for name, value, allowed in (
        ("arm", arm, ARMS),
        ("hints", hints, HINTS),
        ("utility", utility, UTILITIES),
    ):
        if value not in allowed:
            raise InvalidInputError(name, f"one of {', '.join(allowed)}", repr(value))
    if not 0.0 <= drop < 1.0:
        raise InvalidInputError("drop", "a fraction in [0, 1)", drop)
    stream = _make_stream(spec, seed)
    options = {"encoder": "learned", "num_classes": stream.num_classes} if arm == "learned" else {}
    config = PoolConfig(dream_shape=spec.shape, capacity=capacity, device=device, retrieval_mode="hybrid", **options)  # type: ignore[arg-type]
    pool = DreamPool(config) if arm != "none" else None
    dev = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    model = SmallCNN(spec.shape[2], stream.num_classes, width).to(dev)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    rng = torch.Generator().manual_seed(seed + 7)
    val_x, val_y = stream.val_dreams.to(dev), stream.val_labels.to(dev)
    retrieves = arm in ("feature", "learned")
    filters = arm != "random" and drop > 0

    _warm_up(spec, stream.num_classes, width, (spec.fresh, spec.fresh * (1 + replay), rescore), dev)
    curve_steps, curve_acc = [0], [_accuracy(model, val_x, val_y)]
    seen = torch.zeros(stream.num_classes, dtype=torch.bool, device=dev)
    origin: dict[int, int] = {}  # pool id -> stream index (the benchmark's ground truth)
    clock = _Clock()
    steps_to_target = seconds_to_target = None
    bar = tqdm(range(1, spec.steps + 1), desc=f"arm {arm}", disable=not progress, unit="step")
    for step in bar:
        lo = (step - 1) * spec.fresh
        x, y = (
            stream.dreams[lo : lo + spec.fresh].to(dev),
            stream.labels[lo : lo + spec.fresh].to(dev),
        )
        seen[y] = True
        ids, rx, ry = torch.empty(0, dtype=torch.int64, device=dev), x[:0], y[:0]
        keep = None
        if pool is not None and len(pool):
            if filters:
                t = time.perf_counter()
                keep = trusted(_columns(pool), drop)
                clock.pool += time.perf_counter() - t
            if arm == "learned" and step % refit_every == 0 and step < spec.steps:
                t = time.perf_counter()
                pool.fit_encoder(steps=fit_steps, batch_size=fit_batch, seed=seed + step)
                clock.fit += time.perf_counter() - t
                clock.pool += time.perf_counter() - t
            if arm in ("random", "trusted"):
                t = time.perf_counter()
                ids, rx, ry = _random_replay(pool, replay * spec.fresh, rng, keep)
                clock.pool += time.perf_counter() - t
            elif retrieves:
                hint = _hints(hints, x, y, seen, rng)
                t = time.perf_counter()
                ids, rx, ry = _retrieve(pool, x, hint, replay, fetch_k, keep)
                clock.pool += time.perf_counter() - t
        t = time.perf_counter()
        model.train()
        logits = model(torch.cat([x, rx]))
        losses = F.cross_entropy(logits, torch.cat([y, ry]), reduction="none")
        optimiser.zero_grad()
        losses.mean().backward()
        optimiser.step()
        clock.train += time.perf_counter() - t
        if pool is not None:
            targets = torch.cat([y, ry])
            step_out = (logits.detach(), losses.detach(), targets)
            new = _feed_back(pool, model, utility, step_out, x, (ids, rx), clock)
            if keep is not None and utility == "agreement" and rescore:
                _rescore(pool, model, rescore, keep, rng, clock)
            origin.update(zip(new.tolist(), range(lo, lo + spec.fresh), strict=True))
        for i in ids.tolist():  # ground-truth bookkeeping, not timed
            clock.clean += int(stream.labels[origin[i]] == stream.clean[origin[i]])
        clock.used.update(ids.tolist())
        if step % eval_every == 0 or step == spec.steps:
            model.eval()
            curve_steps.append(step)
            curve_acc.append(_accuracy(model, val_x, val_y))
            if steps_to_target is None and curve_acc[-1] >= target:
                steps_to_target, seconds_to_target = step, clock.wall
    util_clean, util_noisy = _utility_split(pool, origin, stream)
    return ArmResult(
        arm=arm,
        seed=seed,
        steps=spec.steps,
        curve_steps=curve_steps,
        curve_accuracy=curve_acc,
        steps_to_target=steps_to_target,
        seconds_to_target=seconds_to_target,
        final_accuracy=curve_acc[-1],
        helpful_rate=clock.helpful / clock.replayed if clock.replayed else float("nan"),
        clean_rate=clock.clean / clock.replayed if clock.replayed else float("nan"),
        unique_per_100=len(clock.used) * 100.0 / spec.steps,
        replayed=clock.replayed,
        util_clean=util_clean,
        util_noisy=util_noisy,
        train_s=clock.train,
        pool_s=clock.pool,
        utility_s=clock.utility,
        fit_s=clock.fit,
        wall_s=clock.wall,
    )


def _warm_up(spec: StreamSpec, num_classes: int, width: int, batches: tuple[int, ...], device: torch.device) -> None:
    """One untimed step of a throwaway CNN per batch size: the first call of a shape pays for
    kernel selection, which would otherwise land on whichever arm runs first."""
    model = SmallCNN(spec.shape[2], num_classes, width).to(device)
    for b in batches:
        if b:
            model(torch.zeros(b, *spec.shape, 3, device=device)).sum().backward()


def trusted(columns: dict[str, torch.Tensor], drop: float) -> torch.Tensor:
    """A ``where`` filter: the entries whose last utility is not among the ``drop`` fraction
    lowest of their stored class; ``[capacity]`` bool, on the columns' device.

    ``columns``: the pool's metadata columns (``utility``, ``class_label``, ``ids``), as a
    ``where`` callable receives them. Relative per class, so that every class keeps
    ``1 - drop`` of its entries whatever the learner currently predicts: an absolute
    threshold on the learner's agreement lets a learner that favours one class filter
    the others out of its own replay, and collapse.
    """
    util, cls, live = columns["utility"], columns["class_label"], columns["ids"] >= 0
    keep = torch.zeros_like(live)
    for c in torch.unique(cls[live]).tolist():
        members = live & (cls == c)
        floor = torch.quantile(util[members].nan_to_num(0.0), drop)
        keep |= members & (util >= floor)
    return keep


def _columns(pool: DreamPool) -> dict[str, torch.Tensor]:
    """The ``utility``, ``class_label`` and ``ids`` columns ``[capacity]`` as a ``where`` callable
    sees them (without its copies)."""
    cols = pool.bank.columns
    return {"utility": cols["utility"], "class_label": cols["class_label"].long(), "ids": cols["ids"]}


def _random_replay(
    pool: DreamPool, n: int, rng: torch.Generator, keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` live entries drawn uniformly (among those of ``keep`` ``[capacity]`` bool where
    given): ids ``[n]``, dreams ``[n, R, C, L, 3]``, labels ``[n]``."""
    ids = pool.sample(n, where=keep, generator=rng)
    return ids, pool.dreams(ids).float(), pool.metadata(ids)["class_label"].long()


def _hints(hints: str, x: torch.Tensor, y: torch.Tensor, seen: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """The ``class_hint`` ``[B]`` of each fresh dream's query (the hint is a hard filter).

    ``batch``: its own (noisy) stream label, so replay repeats the batch's classes.
    ``balanced``: a class drawn uniformly from those the stream has shown (``seen``
    ``[num_classes]`` bool), so replay covers the classes as random replay does.
    """
    if hints == "batch":
        return y
    classes = torch.nonzero(seen).squeeze(1).cpu()
    return classes[torch.randint(classes.numel(), (x.shape[0],), generator=rng)].to(y.device)


def _retrieve(
    pool: DreamPool,
    x: torch.Tensor,
    hint: torch.Tensor,
    k: int,
    fetch_k: int,
    where: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Up to ``k`` stored dreams per fresh dream of ``x`` ``[B, R, C, L, 3]`` (hybrid mode,
    ``hint`` ``[B]`` as class hint, ``where`` filter): ids ``[M]``, dreams, labels ``[M]``."""
    with warnings.catch_warnings():  # the learned arm retrieves before its first refit, on purpose
        warnings.filterwarnings("ignore", message="retrieve: the embedding modes rank by the learned encoder")
        hits = pool.retrieve(x, k=k, mode="hybrid", class_hint=hint, fetch_k=fetch_k, where=where, with_dreams=True)
    ids = hits.ids[hits.mask]
    return ids, hits.dreams[hits.mask].float(), pool.metadata(ids)["class_label"].long()  # type: ignore[index]


def _feed_back(
    pool: DreamPool,
    model: nn.Module,
    utility: str,
    step: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    x: torch.Tensor,
    replay: tuple[torch.Tensor, torch.Tensor],
    clock: _Clock,
) -> torch.Tensor:
    """Feed back the replayed dreams' utility, add the fresh dreams ``x``; their ids ``[B]``.

    ``step``: the step's logits ``[B + M, num_classes]``, losses ``[B + M]`` and labels
    ``[B + M]``, fresh dreams first; ``replay``: the replayed ids ``[M]`` and dreams.
    ``agreement``: each dream's :func:`agreement` under the step's own forward pass (before
    the update, no extra pass), fresh dreams included (their first record). ``loss``: the
    replayed dreams' loss change over the step (an extra forward pass); fresh dreams get a
    neutral 0.5.
    """
    logits, losses, labels = step
    ids, rx = replay
    b = x.shape[0]
    t = time.perf_counter()
    if utility == "agreement":
        u = agreement(logits, labels)
        replayed, entry = u[b:], u[:b]
    else:
        with torch.no_grad():
            after = F.cross_entropy(model(rx), labels[b:], reduction="none")
        replayed, entry = utility_from_losses(losses[b:], after), torch.full_like(losses[:b], 0.5)
    clock.utility += time.perf_counter() - t
    t = time.perf_counter()
    if ids.numel():
        pool.feedback(ids, replayed)
    new = pool.add(x, coherence=1.0, class_label=labels[:b], force=True)  # every one is kept
    pool.feedback(new, entry)
    clock.pool += time.perf_counter() - t
    clock.helpful += int((replayed > 0.5).sum())
    clock.replayed += int(ids.numel())
    return new


def _rescore(
    pool: DreamPool,
    model: nn.Module,
    n: int,
    keep: torch.Tensor,
    rng: torch.Generator,
    clock: _Clock,
) -> None:
    """Second chance: the learner re-scores ``n`` random stored entries outside ``keep``
    ``[capacity]`` bool (filtered out of replay) and feeds back its current agreement."""
    t = time.perf_counter()
    cols = pool.bank.columns
    slots = pool.bank.slots_by_age()
    slots = slots[~keep[slots]]
    if slots.numel() == 0:
        clock.pool += time.perf_counter() - t
        return
    pick = slots[torch.randperm(slots.numel(), generator=rng)[:n].to(slots.device)]
    ids = cols["ids"][pick]
    dreams, labels = pool.dreams(ids).float(), pool.metadata(ids)["class_label"].long()
    t1 = time.perf_counter()
    model.eval()
    with torch.no_grad():
        u = agreement(model(dreams), labels)
    t2 = time.perf_counter()
    pool.feedback(ids, u)
    t3 = time.perf_counter()
    clock.pool += (t1 - t) + (t3 - t2)
    clock.utility += t2 - t1


def _utility_split(pool: DreamPool | None, origin: dict[int, int], stream: _Stream) -> tuple[float, float]:
    """Mean ``util_mean`` of the live entries whose stored label is right, and of the wrong ones."""
    if pool is None or not len(pool):
        return float("nan"), float("nan")
    cols = pool.bank.columns
    slots = pool.bank.slots_by_age()
    index = torch.tensor([origin[i] for i in cols["ids"][slots].tolist()])
    right = stream.labels[index] == stream.clean[index]
    util = cols["util_mean"][slots].cpu()
    return tuple(float(util[m].mean()) if m.any() else float("nan") for m in (right, ~right))  # type: ignore[return-value]


@dataclass(frozen=True)
class ArmSummary:
    """One arm over seeds: means and standard deviations (``nan`` where undefined).

    Seconds are per run (means over seeds). ``overhead``: the arm's wall time per step over
    the ``none`` arm's, minus 1 (it includes training on the replayed dreams, 4x the batch).
    ``vs_random``: the same over random replay's (same learner compute per step).
    ``pool_share`` and ``utility_share``: the pool calls' and the extra forward passes'
    seconds over the arm's own training seconds.
    """

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
    clean_rate: float
    unique_per_100: float
    util_clean: float
    util_noisy: float
    train_s: float
    pool_s: float
    utility_s: float
    fit_s: float
    wall_s: float
    overhead: float
    vs_random: float
    pool_share: float
    utility_share: float

    def to_dict(self) -> dict[str, object]:
        """JSON-ready dict."""
        return asdict(self)


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _mean(values: list[float]) -> float:
    kept = [x for x in values if not math.isnan(x)]
    return statistics.fmean(kept) if kept else float("nan")


def summarise(results: list[ArmResult]) -> list[ArmSummary]:
    """Per-arm means and spreads over seeds, in :data:`ARMS` order.

    Steps and seconds to target average the runs that reached it (``reached`` of ``runs``).
    """
    by_arm: dict[str, list[ArmResult]] = {}
    for r in results:
        by_arm.setdefault(r.arm, []).append(r)

    def wall(runs: list[ArmResult] | None) -> float:
        return statistics.fmean(r.wall_s / r.steps for r in runs) if runs else float("nan")

    out = []
    for arm in ARMS:
        runs = by_arm.get(arm, [])
        if not runs:
            continue
        hit = [r for r in runs if r.steps_to_target is not None]
        steps, steps_sd = _mean_std([float(r.steps_to_target) for r in hit])  # type: ignore[arg-type]
        secs, secs_sd = _mean_std([float(r.seconds_to_target) for r in hit])  # type: ignore[arg-type]
        final, final_sd = _mean_std([r.final_accuracy for r in runs])

        train = statistics.fmean(r.train_s for r in runs)
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
                helpful_rate=_mean([r.helpful_rate for r in runs]),
                clean_rate=_mean([r.clean_rate for r in runs]),
                unique_per_100=statistics.fmean(r.unique_per_100 for r in runs),
                util_clean=_mean([r.util_clean for r in runs]),
                util_noisy=_mean([r.util_noisy for r in runs]),
                train_s=train,
                pool_s=statistics.fmean(r.pool_s for r in runs),
                utility_s=statistics.fmean(r.utility_s for r in runs),
                fit_s=statistics.fmean(r.fit_s for r in runs),
                wall_s=statistics.fmean(r.wall_s for r in runs),
                overhead=wall(runs) / wall(by_arm.get("none")) - 1.0,
                vs_random=wall(runs) / wall(by_arm.get("random")) - 1.0,
                pool_share=statistics.fmean(r.pool_s for r in runs) / train,
                utility_share=statistics.fmean(r.utility_s for r in runs) / train,
            )
        )
    return out


LEGEND = (
    "reached / steps to / seconds to: runs whose validation accuracy reached the target, and when "
    "(mean ± sd over those runs); final accuracy: at the last step.",
    "helpful rate: replayed dreams whose measured utility was above 0.5; clean replay: replayed dreams "
    "whose stored label is the true class; unique / 100 steps: distinct entries replayed per 100 steps.",
    "util_mean right / wrong label: mean util_mean at the end of entries stored with a right and a wrong label.",
    "train s: the learner's steps; pool s: pool calls (fit s: encoder fits among them); utility s: extra "
    "forward passes measuring utility; pool, utility / train: those two over train s.",
    "wall / step vs none, vs random: the arm's wall time per step over the no-pool and the random-replay "
    "arm's, minus 1.",
)
"""What each column of :func:`table` means (``dreampool demo`` prints it under the table)."""


def table(summaries: list[ArmSummary], *, target: float = 0.95) -> list[str]:
    """The comparison as markdown table lines."""

    def pm(mean: float, sd: float, fmt: str) -> str:
        return "n/a" if math.isnan(mean) else f"{mean:{fmt}} ± {sd:{fmt}}"

    def num(value: float, fmt: str) -> str:
        return "n/a" if math.isnan(value) else f"{value:{fmt}}"

    pct = f"{target:.0%}"
    lines = [
        f"| arm | reached {pct} | steps to {pct} | seconds to {pct} | final accuracy "
        "| helpful rate | clean replay | unique / 100 steps | util_mean right / wrong label "
        "| train s | pool s (fit s) | utility s | pool, utility / train "
        "| wall / step vs none | vs random |",
        "|" + " --- |" * 15,
    ]
    for s in summaries:
        lines.append(
            f"| {s.arm} | {s.reached}/{s.runs} "
            f"| {pm(s.steps_to_target, s.steps_to_target_std, '.0f')} "
            f"| {pm(s.seconds_to_target, s.seconds_to_target_std, '.1f')} "
            f"| {pm(s.final_accuracy, s.final_accuracy_std, '.3f')} "
            f"| {num(s.helpful_rate, '.2f')} | {num(s.clean_rate, '.3f')} "
            f"| {s.unique_per_100:.0f} | {num(s.util_clean, '.2f')} / {num(s.util_noisy, '.2f')} "
            f"| {s.train_s:.1f} | {s.pool_s:.1f} ({s.fit_s:.1f}) | {s.utility_s:.1f} "
            f"| {num(s.pool_share, '.0%')}, {num(s.utility_share, '.0%')} "
            f"| {num(s.overhead, '+.0%')} | {num(s.vs_random, '+.0%')} |"
        )
    return lines


def run_comparison(
    spec: StreamSpec,
    *,
    seeds: list[int],
    arms: tuple[str, ...] = ARMS,
    progress: bool = False,
    **options: object,
) -> list[ArmResult]:
    """Every arm on every seed (same stream, validation set and initial weights per seed).

    Keyword ``options`` go to :func:`run_arm`.
    """
    return [
        run_arm(arm, spec, seed=seed, progress=progress, **options)  # type: ignore[arg-type]
        for arm in arms
        for seed in seeds
    ]


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
            f"{s.dataset} {'x'.join(map(str, s.shape))}: {s.steps} steps of {s.fresh} fresh "
            "dreams, "
            f"{s.label_noise:.0%} label noise, class imbalance {s.imbalance:g}, "
            f"validation {s.validation} clean dreams"
        )
        return [head, "", *table(self.summaries), "", *LEGEND]

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
    width: int = 16,
    progress: bool = True,
) -> DemoReport:
    """Run every arm once (one seed) on the same stream and compare them.

    Keyword Args:
        steps: training steps. fresh: fresh stream dreams per step. dataset: a
        :mod:`~dreampool_gpu.synthetic` set. dream_shape: ``(rows, cols, layers)``.
        capacity: pool capacity. arms: a subset of :data:`ARMS`. device: pool and model
        device. seed: seeds everything. width: the CNN's width. progress: a tqdm bar per arm.
    """
    spec = StreamSpec(dataset=dataset, shape=dream_shape, steps=steps, fresh=fresh)
    results = run_comparison(
        spec,
        seeds=[seed],
        arms=arms,
        progress=progress,
        capacity=capacity,
        device=device,
        width=width,
    )
    return DemoReport(spec, summarise(results), results)
