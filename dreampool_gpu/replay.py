"""Replay strategies: which pool entries a training step replays next to its incoming batch.

Each strategy has one method, ``select(x, y, k, *, where=None)``: ``x`` the incoming dreams
``[B, R, C, L, 3]``, ``y`` their labels ``[B]``, ``k`` how many entries to replay, ``where`` a
filter as in :meth:`DreamPool.retrieve` (a ``[capacity]`` bool mask or a callable of the
metadata columns). It returns ``[k]`` int64 pool ids on the pool's device, ``-1`` where fewer
entries qualify; gather the replay batch with ``pool.dreams(ids)`` and its labels with
``pool.metadata(ids, columns=("class_label",))["class_label"]`` (zeros and -1 at padding).

- :class:`Uniform`: uniform draws without replacement (random replay).
- :class:`MIR`: maximally interfered retrieval (Aljundi et al. 2019): the candidates whose loss
  a virtual SGD step on the incoming batch raises most, with a guard against mislabelled entries.
- :class:`KNNShapley`: ASER-style (Shim et al. 2021) KNN-Shapley values on the learner's features.
- :class:`Nearest`: the candidates nearest the incoming batch in the learner's feature space.

Draws go through ``pool.sample(n, where=..., replace=False)`` (a CPU ``generator`` makes them
reproducible), gathers through ``pool.dreams(ids)`` and ``pool.metadata(ids,
columns=("class_label",))``, which right after the draw need no id lookup. The eligibility
filter (labelled entries passing ``where``) reads the bank's label column directly, and a
``where`` callable gets only the columns it reads: the pool's own ``where`` copies every column
and computes lazy features, which a replay loop never needs. Scoring and top-k run on the
pool's device; the host reads are the filtered draw's (it sizes its result: 2 reads), plus one
id lookup in :class:`KNNShapley`. Entries without a class label (-1) never qualify: every
strategy needs labels. A NaN score (a diverged model) ranks below every number and the entry
still qualifies; ``-inf`` marks an entry left out.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch.func import functional_call

from dreampool_gpu import _validation as v
from dreampool_gpu.columns import RENAMED, WHERE_COLUMNS, Columns, as_returned
from dreampool_gpu.config import Metric
from dreampool_gpu.errors import (
    DimensionMismatchError,
    InvalidConfigurationError,
    InvalidInputError,
    UnknownColumnError,
)
from dreampool_gpu.pool import DreamPool
from dreampool_gpu.retrieval import request
from dreampool_gpu.search.exact import pairwise_scores

__all__ = ["KNNShapley", "MIR", "Nearest", "Uniform", "knn_shapley"]

Features = Callable[[torch.Tensor], torch.Tensor]


class _Eligible(Columns):
    """What a ``where`` callable of a strategy receives: the metadata columns, each read on first use.

    The pool hands a ``where`` callable a copy of every column, the derived ones (``hue_category``)
    included, and reading those makes the entries' lazy features be computed (``PoolConfig.features``).
    A replay filter reads one or two columns (``class_label``); this mapping reads only those
    (``in`` and iteration see the columns read so far). Old spellings warn as in ``Columns``.
    """

    def __init__(self, pool: DreamPool) -> None:
        super().__init__()
        self._pool = pool

    def __missing__(self, key: str) -> torch.Tensor:
        name = RENAMED.get(key, "inserted_at" if key == "age" else key)
        names = (*WHERE_COLUMNS, *self._pool.bank.user_names)  # what the pool's where callables see
        if name not in names:
            raise UnknownColumnError(key, list(names))
        if not dict.__contains__(self, name):
            # the one read of pool internals: see _eligible
            dict.__setitem__(self, name, as_returned(self._pool.bank.columns[name], copy=True))
            if name == key:
                return dict.__getitem__(self, name)
        return self._legacy(key)  # an old spelling: warns at the caller's line


def _eligible(pool: DreamPool, where: Any) -> torch.Tensor:
    """``[capacity]`` bool on the pool's device: the labelled entries passing ``where``.

    Reads the bank's ``class_label`` column (and the columns a ``where`` callable asks for) under
    the pool's lock: no public call gives a filter on labels without copying every column and
    computing lazy features (see :class:`_Eligible`). No host read. The draws and gathers then
    go through ``pool.sample``, ``pool.dreams`` and ``pool.metadata``.
    """
    with pool._lock:
        keep = pool.bank.columns["class_label"] >= 0  # free slots hold -1 too
        if callable(where) and not isinstance(where, (torch.Tensor, np.ndarray)):
            try:
                where = where(_Eligible(pool))
            except Exception as exc:  # the caller's function: its failure is a bad argument
                raise InvalidInputError(
                    "where", "a callable of the metadata columns returning a bool mask", f"one that raised {exc!r}"
                ) from exc
        where = request.where_mask(where, pool.bank, pool.device)
    return keep if where is None else keep & where


def _draw(pool: DreamPool, n: int, keep: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """``[min(n, m)]`` distinct ids drawn uniformly among the ``m`` entries ``keep`` marks (``pool.sample``)."""
    return pool.sample(n, where=keep, replace=False, generator=generator)


def _gather(pool: DreamPool, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dreams ``[n, R, C, L, 3]`` and int64 labels ``[n]`` of ``ids`` ``[n]`` (right after ``_draw``: no id lookup)."""
    return pool.dreams(ids), pool.metadata(ids, columns=("class_label",))["class_label"]


def _pad(t: torch.Tensor, n: int, fill: float = -1) -> torch.Tensor:
    """``t`` ``[m, ...]`` cut or padded with ``fill`` to ``[n, ...]`` (``t`` itself when ``m == n``)."""
    if t.shape[0] == n:
        return t  # the same tensor: pool.dreams(ids) right after pool.sample needs no lookup
    if t.shape[0] > n:
        return t[:n]
    return torch.cat([t, t.new_full((n - t.shape[0], *t.shape[1:]), fill)])


def _present(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[num_classes]`` bool: the classes among ``labels`` ``[n]`` (-1 ignored)."""
    cls = torch.where(labels >= 0, labels, num_classes).clamp(max=num_classes)
    count = torch.zeros(num_classes + 1, device=cls.device).index_add_(0, cls, torch.ones_like(cls, dtype=torch.float))
    return count[:num_classes] > 0


def _round_robin(labels: torch.Tensor, num_classes: int, n: int) -> torch.Tensor:
    """``[min(n, m)]`` positions into ``labels`` ``[m]`` (in random order already), class by class in turn.

    Each class's first entry, then each class's second, ...: a class-balanced draw of ``n``
    (classes with fewer entries give their share to the others).
    """
    m = labels.numel()
    cls = torch.where(labels >= 0, labels, num_classes)
    by_class = cls.argsort(stable=True)
    start = torch.searchsorted(cls[by_class], torch.arange(num_classes + 1, device=cls.device))
    rank = torch.empty_like(by_class)
    rank[by_class] = torch.arange(m, device=cls.device) - start[cls[by_class]]
    key = rank.double() + torch.arange(m, device=cls.device, dtype=torch.double) / max(m, 1)
    return key.topk(min(n, m), largest=False).indices


def _balanced(
    labels: torch.Tensor, num_classes: int, width: int, first: torch.Tensor, count: torch.Tensor
) -> torch.Tensor:
    """Class-balanced positions ``[num_classes * width]`` into ``labels`` ``[m]`` (in random order already).

    Positions are grouped by class (stable), and each class contributes its entries of rank
    ``first <= r < first + count`` (0-d device tensors) in up to ``width`` places; -1 where a
    class has fewer.
    """
    m = labels.numel()
    cls = torch.where(labels >= 0, labels, num_classes)
    by_class = cls.argsort(stable=True)
    sorted_cls = cls[by_class]
    wanted = torch.arange(num_classes, device=cls.device)
    start = torch.searchsorted(sorted_cls, wanted)
    stop = torch.searchsorted(sorted_cls, wanted, right=True)
    rank = torch.arange(width, device=cls.device)
    pos = start[:, None] + first + rank[None, :]
    ok = (pos < stop[:, None]) & (rank[None, :] < count)
    picked = torch.where(ok, by_class[pos.clamp(max=max(m - 1, 0))], -1) if m else pos.new_full(pos.shape, -1)
    return picked.reshape(-1)


def _fill_level(labels: torch.Tensor, num_classes: int, width: int, need: int, least: int) -> torch.Tensor:
    """0-d int64: the smallest per-class count ``p`` in ``[least, width]`` whose class-balanced draw fills ``need``.

    A class of ``s`` entries among ``labels`` ``[m]`` (each >= 0) gives ``min(s, p)``; classes
    with fewer entries leave their share to the others. No host read.
    """
    size = torch.zeros(num_classes, dtype=torch.long, device=labels.device)
    size.index_add_(0, labels, torch.ones_like(labels))
    levels = torch.arange(width + 1, device=labels.device)
    filled = torch.minimum(size[:, None], levels[None, :]).sum(0)  # entries drawn at each level
    return (filled < need).sum().clamp(min=least)


def _check_batch(x: Any, y: Any, k: Any, pool: DreamPool) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Validate ``x`` ``[B, R, C, L, 3]`` float, ``y`` ``[B]`` int and ``k`` >= 0; move them to the pool's device."""
    k = v.check_count(k, "k")
    xt = v.as_tensor(x, "x", device=pool.device)
    shape = (*pool.config.dream_shape, 3)
    if xt.dim() != 5 or tuple(xt.shape[1:]) != shape:
        raise DimensionMismatchError(f"[B, {', '.join(map(str, shape))}]", list(xt.shape), "x")
    if not xt.is_floating_point():
        raise InvalidInputError("x", "a float tensor of dreams", f"dtype {xt.dtype}")
    yt = v.as_tensor(y, "y", device=pool.device)
    if yt.dim() != 1 or yt.shape[0] != xt.shape[0] or yt.is_floating_point() or yt.dtype == torch.bool:
        raise InvalidInputError("y", f"[{xt.shape[0]}] integer labels", f"{list(yt.shape)} {yt.dtype}")
    return xt, yt.long(), k


def _check_generator(generator: Any) -> torch.Generator | None:
    """A CPU ``torch.Generator`` or None (``pool.sample`` draws on the host)."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise InvalidInputError("generator", "a CPU torch.Generator or None", type(generator).__name__)
    if generator is not None and generator.device.type != "cpu":
        raise InvalidInputError("generator", "a CPU torch.Generator or None", f"a generator on {generator.device}")
    return generator


def _best(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Positions of the ``min(n, len)`` highest ``scores``; equal scores: the lower position first.

    NaN (a model's overflow) ranks below every number but above ``-inf`` (not eligible).
    """
    low = torch.finfo(scores.dtype).min
    return torch.where(scores.isnan(), low, scores).sort(descending=True, stable=True).indices[:n]


def _top(scores: torch.Tensor, ids: torch.Tensor, k: int) -> torch.Tensor:
    """``[k]``: the ids of the ``k`` best scores (``-inf`` = not eligible; ties: the lower position), -1 padding."""
    top = _best(scores, k)
    return _pad(torch.where(scores[top] != -math.inf, ids[top], -1), k)


@contextmanager
def _evaluating(model: torch.nn.Module) -> Iterator[None]:
    """Every submodule in eval mode (dropout off, BatchNorm on its running statistics); each one's own mode after."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        for m, _ in modes:
            m.training = False
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _distances(queries: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``[B, n]`` Euclidean distances of float32 features, in float32 even under a caller's ``torch.autocast``."""
    with torch.autocast(queries.device.type, enabled=False):
        return -pairwise_scores(queries.float(), rows.float(), Metric.EUCLIDEAN)


class Uniform:
    """Random replay: ``k`` entries drawn uniformly without replacement.

    Cost per call: no forward or backward, no k-NN; one ``pool.sample`` draw.

    Args:
        pool: the :class:`~dreampool_gpu.pool.DreamPool` to draw from.
        generator: a CPU ``torch.Generator`` for reproducible draws (``pool.sample``'s); None uses torch's.
    """

    def __init__(self, pool: DreamPool, *, generator: torch.Generator | None = None) -> None:
        self.pool = pool
        self.generator = _check_generator(generator)

    def select(self, x: Any, y: Any, k: int, *, where: Any = None) -> torch.Tensor:
        """``[k]`` int64 ids on the pool's device, -1 where fewer qualify (``x``, ``y`` checked, not used)."""
        _, _, k = _check_batch(x, y, k, self.pool)
        with self.pool._lock:  # the filter and the draw see the same bank
            ids = _draw(self.pool, k, _eligible(self.pool, where), self.generator)
        return _pad(ids, k)  # the draw's own tensor when k qualify: pool.dreams(ids) needs no lookup


class MIR:
    """Maximally interfered retrieval (Aljundi et al. 2019) with a guard against mislabelled entries.

    A call draws ``candidates`` entries, takes a virtual SGD step on the incoming batch
    (``torch.func.functional_call`` on updated copies of the parameters: the module, its
    ``.grad``, the optimizer and its buffers, BatchNorm statistics included, are untouched),
    scores each candidate by its loss after that step, and replays the ``k`` best-scoring
    eligible candidates.

    The defaults differ from the paper's rule in three places, each chosen on held-out seeds
    (docs/benchmarks.md, "Continual learning"); ``balanced=False, score="increase",
    drop_disputed=False`` is the paper's rule.

    - ``score="after"``: the loss after the virtual step, not its increase. The increase ranks
      an entry the learner has already forgotten (high loss before and after) below one it is
      about to forget; in a class-incremental stream both need replay. The loss after the step
      ranks both by how wrong the learner will be on them.
    - ``balanced=True``: the candidates are drawn class by class in turn (each eligible class's
      first random entry, then each one's second, ...), so every remembered class is scored
      each step even when memory holds few of it.
    - ``drop_disputed=True``: a high-loss rule prefers mislabelled entries. The guard leaves
      out a candidate the model (before the virtual step) assigns to a third class: neither
      the candidate's label nor a class of the incoming batch, and held by another candidate
      of the draw (a class the filter leaves replayable). Forgetting shows as predictions of
      the classes being learned now (the incoming ones), which stay eligible; a confident vote
      for another remembered class is a dispute of the stored label.

    ``drop_high_loss`` (off by default) sets aside that fraction of the candidates with the
    highest loss before the step: it helps under label noise but costs clean streams, whose
    highest-loss entries are the forgotten ones.

    Modes: the virtual step's gradient runs in the module's own train/eval mode, as the
    training step does (BatchNorm on the incoming batch's statistics, into cloned buffers;
    dropout masks from torch's global generator, so with dropout in train mode a selection
    repeats only under the same global seed too). The candidates are scored in eval mode
    (every submodule's mode set back after, one by one): a candidate's score does not depend
    on the others drawn, and a single candidate passes a BatchNorm. The virtual step is plain
    SGD whatever the optimizer (no momentum, weight decay or Adam moments); an adaptive
    optimizer's ``lr`` is not an SGD step size, so pass ``lr`` with one.

    Cost per call: one forward and one backward on the ``B`` incoming dreams (the module
    itself when it has no buffers, ``functional_call`` with copied buffers otherwise), one
    batched forward on the ``candidates`` after the virtual step, and the guard's forward
    before it on the ``2k`` best-scoring candidates (on every candidate for
    ``score="increase"``, ``drop_high_loss`` or :meth:`scores`), no k-NN. The balanced draw shuffles every
    eligible id and gathers their labels (one ``pool.sample`` of them all, one id lookup for
    the candidates' dreams). Like an optimizer, a ``MIR`` holds the parameters the model has
    when it is built.

    Args:
        pool: the pool to draw from.
        model: an ``nn.Module`` mapping dreams ``[N, R, C, L, 3]`` (the incoming batch's dtype)
            to logits ``[N, classes]``. Under ``DistributedDataParallel`` pass the wrapped
            module (``ddp.module``): the wrapper's forward expects a backward of its own.
        loss_fn: ``loss_fn(logits, labels)`` giving per-sample losses ``[N]``, e.g.
            ``nn.CrossEntropyLoss(reduction="none")``.
        optimizer: its first parameter group's ``lr`` (a number or a one-element tensor) is the
            virtual step's, read at each call (so a scheduler is followed), unless ``lr`` is given.
        lr: the virtual step's learning rate.
        candidates: entries scored per call (the paper's C; 50).
        drop_high_loss: fraction in [0, 1) of the candidates with the highest current loss set
            aside before scoring (0: none).
        drop_disputed: leave out candidates predicted as a third eligible class (True).
        balanced: draw the candidates class by class in turn (True) or uniformly (False).
        score: ``"after"`` (loss after the virtual step) or ``"increase"`` (after minus before).
        generator: a CPU ``torch.Generator`` for the candidate draw.

    Raises:
        InvalidConfigurationError: neither ``lr`` nor an ``optimizer`` with an ``lr``; a bad
            ``candidates``, ``drop_high_loss`` or ``score``.
    """

    def __init__(
        self,
        pool: DreamPool,
        model: torch.nn.Module,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        *,
        optimizer: torch.optim.Optimizer | None = None,
        lr: float | None = None,
        candidates: int = 50,
        drop_high_loss: float = 0.0,
        drop_disputed: bool = True,
        balanced: bool = True,
        score: str = "after",
        generator: torch.Generator | None = None,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise InvalidConfigurationError("model", type(model).__name__, "an nn.Module")
        if not callable(loss_fn):
            raise InvalidConfigurationError("loss_fn", loss_fn, "a callable (logits, labels) -> [N] losses")
        if lr is None and (optimizer is None or "lr" not in optimizer.param_groups[0]):
            raise InvalidConfigurationError(
                "lr", lr, "a learning rate, or an optimizer whose first param group has 'lr'"
            )
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not lr > 0):
            raise InvalidConfigurationError("lr", lr, "a number > 0")
        if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
            raise InvalidConfigurationError("candidates", candidates, "an int >= 1")
        if isinstance(drop_high_loss, bool) or not isinstance(drop_high_loss, (int, float)):
            raise InvalidConfigurationError("drop_high_loss", drop_high_loss, "a number in [0, 1)")
        if not 0.0 <= drop_high_loss < 1.0:
            raise InvalidConfigurationError("drop_high_loss", drop_high_loss, "a number in [0, 1)")
        if score not in ("after", "increase"):
            raise InvalidConfigurationError("score", score, "'after' or 'increase'")
        self.pool, self.model, self.loss_fn = pool, model, loss_fn
        self._named = list(model.named_parameters())
        self.optimizer, self.lr = optimizer, lr
        self.candidates, self.drop_high_loss = candidates, float(drop_high_loss)
        self.drop_disputed = bool(drop_disputed)
        self.balanced, self.score = bool(balanced), score
        self.generator = _check_generator(generator)

    def _lr(self) -> float:
        if self.lr is not None:
            return float(self.lr)
        lr = self.optimizer.param_groups[0].get("lr") if self.optimizer is not None else None
        if isinstance(lr, torch.Tensor) and lr.numel() == 1 and lr.is_floating_point():
            lr = float(lr)  # a tensor learning rate (Adam(lr=torch.tensor(...))): one read of it
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not float(lr) >= 0:
            raise InvalidConfigurationError("optimizer", lr, "a first param group whose 'lr' is a number >= 0")
        return float(lr)

    def _losses(
        self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        return self._check_losses(self.loss_fn(functional_call(self.model, (params, buffers), (x,)), y), y)

    def _current(
        self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: torch.Tensor
    ) -> torch.Tensor:
        """Logits of ``x`` under the module's own parameter values (``params``).

        The module itself where it has no buffers (nothing a forward could change), else
        ``functional_call`` on ``params`` and the buffers' clones.
        """
        return functional_call(self.model, (params, buffers), (x,)) if buffers else self.model(x)

    def _check_losses(self, losses: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if losses.shape != y.shape:
            raise InvalidConfigurationError(
                "loss_fn",
                getattr(self.loss_fn, "__name__", self.loss_fn),
                f"per-sample losses {list(y.shape)}, got {list(losses.shape)}",
            )
        return losses

    def scores(self, x: Any, y: Any, *, where: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidate ids ``[candidates]`` (-1 padding) and their interference scores (``-inf`` where not eligible).

        Every candidate is checked by the ``drop_disputed`` guard (``select`` checks the ``2k`` best).
        """
        xt, yt, _ = _check_batch(x, y, 0, self.pool)
        return self._scores(xt, yt, where, guard=None)

    def _scores(
        self, xt: torch.Tensor, yt: torch.Tensor, where: Any, guard: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``scores``; the guard checks the ``guard`` best-scoring candidates (None: all)."""
        trained = [(n, p) for n, p in self._named if p.requires_grad]
        if not trained:
            raise InvalidConfigurationError("model", type(self.model).__name__, "a parameter with requires_grad")
        if torch.is_inference_mode_enabled():
            raise InvalidInputError("MIR", "a call outside torch.inference_mode() (it takes a gradient)", "inside")
        with self.pool._lock:  # filter, draw and gather see the same bank
            keep = _eligible(self.pool, where)
            if self.balanced:
                order = _draw(self.pool, keep.numel(), keep, self.generator)  # every eligible id, shuffled
                every = self.pool.metadata(order, columns=("class_label",))["class_label"]
                pick = _round_robin(every, self.pool.config.num_classes, self.candidates)
                ids, labels = order[pick], every[pick]
                dreams = self.pool.dreams(ids)
            else:
                ids = _draw(self.pool, self.candidates, keep, self.generator)
                dreams, labels = _gather(self.pool, ids)
        cand_x = dreams.to(xt.dtype)
        params = {n: p.detach() for n, p in self._named}
        buffers = {n: b.clone() for n, b in self.model.named_buffers()}  # BatchNorm statistics stay as they are
        with torch.enable_grad():  # autograd.grad leaves every .grad as it is
            live = {n: p.detach().requires_grad_() for n, p in trained} if buffers else dict(trained)
            loss = self._check_losses(self.loss_fn(self._current({**params, **live}, buffers, xt), yt), yt).mean()
            grads = torch.autograd.grad(loss, list(live.values()), allow_unused=True)
        lr = self._lr()
        with torch.no_grad(), _evaluating(self.model):  # candidates scored one by one: no dropout, no batch statistics
            stepped = dict(params)
            for (n, _), g in zip(trained, grads, strict=True):
                if g is not None:
                    stepped[n] = torch.add(params[n], g, alpha=-lr)
            safe = labels.clamp(min=0)
            after = self._losses(stepped, buffers, cand_x, safe)
            everyone = self.score == "increase" or self.drop_high_loss > 0 or (self.drop_disputed and guard is None)
            logits = self._current(params, buffers, cand_x) if everyone else None
            before = None if logits is None else self._check_losses(self.loss_fn(logits, safe), safe)
        valid = labels >= 0
        rank = after - before if before is not None and self.score == "increase" else after
        score = torch.where(valid, rank, -math.inf)
        if before is not None and self.drop_high_loss > 0:
            score = torch.where(self._highest(before, valid), -math.inf, score)
        if self.drop_disputed:
            eligible = _present(labels, self.pool.config.num_classes)
            if logits is None:  # the guard's forward on the best ``guard`` candidates only
                top = _best(score, guard or 0)
                with torch.no_grad(), _evaluating(self.model):
                    pred = self._current(params, buffers, cand_x[top]).argmax(1)
                checked = labels[top]
            else:
                top, pred, checked = None, logits.argmax(1), labels
            known = eligible[pred.clamp(max=eligible.numel() - 1)] & (pred < eligible.numel())
            disputed = (pred != checked) & known & ~torch.isin(pred, yt)
            if top is None:
                score = torch.where(disputed, -math.inf, score)
            else:
                score = score.index_put((top,), torch.where(disputed, -math.inf, score[top]))
        return _pad(ids, self.candidates), _pad(score, self.candidates, -math.inf)

    def _highest(self, before: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``[C]`` bool: the ``floor(drop_high_loss * n_valid)`` valid candidates of highest loss."""
        n_valid = valid.sum()
        drop = torch.floor(self.drop_high_loss * n_valid.float())
        key = torch.where(valid, before, -math.inf)
        rank = key.argsort(descending=True, stable=True).argsort()
        return valid & (rank < drop)

    def select(self, x: Any, y: Any, k: int, *, where: Any = None) -> torch.Tensor:
        """``[k]`` int64 ids on the pool's device of the most interfered candidates (-1 padding)."""
        xt, yt, k = _check_batch(x, y, k, self.pool)
        ids, score = self._scores(xt, yt, where, guard=2 * k)
        return _top(score, ids, k)


def knn_shapley(
    dist: torch.Tensor, eval_labels: torch.Tensor, cand_labels: torch.Tensor, cand_valid: torch.Tensor, k: int
) -> torch.Tensor:
    """KNN-Shapley values ``[E, N]`` of ``N`` candidates for each of ``E`` evaluation points (Jia et al. 2019).

    ``dist`` ``[E, N]`` distances; the utility of a candidate set for one evaluation point is
    the share of its ``k`` nearest (fewer when the set is smaller, divided by ``k`` anyway)
    carrying the point's label. Candidates with ``cand_valid`` False take no part and get 0.
    Closed form over the candidates sorted by distance (ties by index), ``n`` valid:
    ``s_n = 1[y_n = y] / max(n, k)``, ``s_j = s_{j+1} + (1[y_j = y] - 1[y_{j+1} = y]) min(k, j) / (k j)``.
    """
    e, n = dist.shape
    d = torch.where(cand_valid[None, :], dist, math.inf)
    order = d.argsort(dim=1, stable=True)
    match = ((cand_labels[order] == eval_labels[:, None]) & cand_valid[order]).to(dist.dtype)
    nxt = torch.cat([match[:, 1:], match.new_zeros(e, 1)], dim=1)
    j = torch.arange(1, n + 1, device=dist.device, dtype=dist.dtype)
    n_valid = cand_valid.sum().to(dist.dtype)
    factor = torch.where(j == n_valid, 1.0 / torch.clamp(n_valid, min=float(k)), torch.clamp(j, max=float(k)) / (k * j))
    terms = torch.where(j <= n_valid, (match - nxt) * factor, 0.0)
    sorted_sv = terms.flip(1).cumsum(1).flip(1)
    return torch.zeros_like(sorted_sv).scatter_(1, order, sorted_sv)


class KNNShapley:
    """ASER-style replay (Shim et al. 2021): KNN-Shapley values on the learner's features.

    A call draws a class-balanced candidate sample (``per_class`` entries of each class, more
    when needed so that ``min(k, qualifying)`` replay slots are filled: the smallest per-class
    count that does, classes with fewer entries leaving their share to the others) and a
    disjoint class-balanced evaluation sample of ``per_class`` per class (the entries after a
    class's candidates). Each candidate's value is its mean KNN-Shapley value (``knn_shapley``,
    ``k`` neighbours) for the evaluation sample (cooperative: it helps classify memory) minus
    its mean value for the incoming batch (adversarial: a candidate near incoming points of
    another label gets a negative value there, so a higher score; 0 for an empty batch). The
    ``k`` highest are replayed. Where ``where`` keeps every incoming class out of the
    candidates, the adversarial term is 0 by construction.

    Cost per call: one forward of ``features`` over the incoming batch and the two samples
    (no backward), one batched ``[B + E, N]`` distance matrix with the pool's exact k-NN kernel
    and one sort of it.

    Args:
        pool: the pool to draw from (labels 0..``pool.config.num_classes``-1).
        features: a callable mapping dreams ``[N, R, C, L, 3]`` (the incoming batch's dtype) to
            features ``[N, D]``, e.g. the learner's penultimate layer; called as given under
            ``no_grad`` (a module in train mode updates its BatchNorm statistics with the samples:
            wrap it to run in eval mode). Distances are float32, under ``autocast`` too.
        k: neighbours of the KNN utility (ASER's K).
        per_class: class-balanced sample size per class (ASER's ``n_smp_cls``).
        generator: a CPU ``torch.Generator`` for the samples.
    """

    def __init__(
        self,
        pool: DreamPool,
        features: Features,
        *,
        k: int = 3,
        per_class: int = 2,
        generator: torch.Generator | None = None,
    ) -> None:
        if not callable(features):
            raise InvalidConfigurationError("features", features, "a callable dreams -> [N, D] features")
        for name, val in (("k", k), ("per_class", per_class)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise InvalidConfigurationError(name, val, "an int >= 1")
        self.pool, self.features, self.k, self.per_class = pool, features, k, per_class
        self.generator = _check_generator(generator)

    def select(self, x: Any, y: Any, k: int, *, where: Any = None) -> torch.Tensor:
        """``[k]`` int64 ids on the pool's device of the highest-valued candidates (-1 padding)."""
        xt, yt, k = _check_batch(x, y, k, self.pool)
        classes = self.pool.config.num_classes
        with self.pool._lock:  # filter, draw and gather see the same bank
            keep = _eligible(self.pool, where)
            order = _draw(self.pool, keep.numel(), keep, self.generator)  # every eligible id, shuffled
            order_labels = self.pool.metadata(order, columns=("class_label",))["class_label"]
            width = max(self.per_class, k)
            per = _fill_level(order_labels, classes, width, min(k, order.numel()), self.per_class)
            zero = torch.zeros((), dtype=torch.long, device=per.device)
            cand = _balanced(order_labels, classes, width, zero, per)
            evals = _balanced(order_labels, classes, self.per_class, per, torch.full_like(per, self.per_class))
            pos = torch.cat([cand, evals])
            ids = torch.where(pos >= 0, order[pos.clamp(min=0)] if order.numel() else pos, -1)
            dreams = self.pool.dreams(ids)
            labels = torch.where(pos >= 0, order_labels[pos.clamp(min=0)] if order.numel() else pos, -1)
        with torch.no_grad():
            feats = self.features(torch.cat([xt, dreams.to(xt.dtype)]))
        if feats.dim() != 2 or feats.shape[0] != xt.shape[0] + ids.numel():
            raise InvalidConfigurationError("features", "its output", f"[N, D] features, got {list(feats.shape)}")
        b, c = xt.shape[0], cand.numel()
        dist = _distances(torch.cat([feats[:b], feats[b + c :]]), feats[b : b + c])
        valid = cand >= 0
        sv = knn_shapley(dist, torch.cat([yt, labels[c:]]), labels[:c], valid, self.k)
        adv = sv[:b].sum(0) / max(b, 1)  # an empty incoming batch: no adversarial term
        eval_valid = (evals >= 0).to(sv.dtype)
        coop = (sv[b:] * eval_valid[:, None]).sum(0) / eval_valid.sum().clamp(min=1.0)
        score = torch.where(valid, coop - adv, -math.inf)
        return _top(score, ids[:c], k)


class Nearest:
    """Replay the candidates nearest the incoming batch in the learner's feature space (a baseline).

    A call draws ``candidates`` entries uniformly (all qualifying entries when None) and scores
    each by its distance to the nearest incoming dream, both through ``features``; the ``k``
    nearest are replayed (an empty incoming batch: the first ``k`` of the draw).

    Cost per call: one forward of ``features`` over the incoming batch and the candidates
    (no backward), one ``[B, candidates]`` distance matrix with the pool's exact k-NN kernel.

    Args:
        pool: the pool to draw from.
        features: a callable mapping dreams ``[N, R, C, L, 3]`` to features ``[N, D]``, called as
            given under ``no_grad`` (as in :class:`KNNShapley`).
        candidates: entries scored per call (None: every qualifying entry, up to ``capacity``).
        generator: a CPU ``torch.Generator`` for the candidate draw.
    """

    def __init__(
        self,
        pool: DreamPool,
        features: Features,
        *,
        candidates: int | None = 50,
        generator: torch.Generator | None = None,
    ) -> None:
        if not callable(features):
            raise InvalidConfigurationError("features", features, "a callable dreams -> [N, D] features")
        if candidates is not None and (
            isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1
        ):
            raise InvalidConfigurationError("candidates", candidates, "an int >= 1 or None")
        self.pool, self.features, self.candidates = pool, features, candidates
        self.generator = _check_generator(generator)

    def select(self, x: Any, y: Any, k: int, *, where: Any = None) -> torch.Tensor:
        """``[k]`` int64 ids on the pool's device of the candidates nearest the batch (-1 padding)."""
        xt, _, k = _check_batch(x, y, k, self.pool)
        with self.pool._lock:  # filter, draw and gather see the same bank
            keep = _eligible(self.pool, where)
            ids = _draw(self.pool, self.candidates or keep.numel(), keep, self.generator)
            dreams = self.pool.dreams(ids)
        with torch.no_grad():
            feats = self.features(torch.cat([xt, dreams.to(xt.dtype)]))
        if feats.dim() != 2 or feats.shape[0] != xt.shape[0] + ids.numel():
            raise InvalidConfigurationError("features", "its output", f"[N, D] features, got {list(feats.shape)}")
        b = xt.shape[0]
        if ids.numel() == 0 or b == 0:  # nothing to rank, or nothing to be near: the draw's order
            return _pad(ids[:k], k)
        near = -_distances(feats[:b], feats[b:]).min(0).values
        return _top(near, ids, k)
