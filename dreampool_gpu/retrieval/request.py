"""Every input check of a query, once, at the boundary: a :class:`Request` the stages trust.

:func:`check_request` turns ``DreamPool.retrieve``'s arguments into a :class:`Request`
(or raises the typed error naming the argument); the stages below it run on checked
tensors only. The checks shared with ``add`` and the sharded pool (per-dream values, class
labels, ints) live in :mod:`dreampool_gpu._validation`, the one validation module.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dreampool_gpu import _validation as v
from dreampool_gpu import checks, columns
from dreampool_gpu.bank import TensorBank
from dreampool_gpu.config import Metric, PoolConfig, RetrievalMode
from dreampool_gpu.dreams import SINGLE_DREAM_HINT, chroma_signature, hue_category, validate_dreams
from dreampool_gpu.encoders import Encoder, FeatureEncoder, unit_rows
from dreampool_gpu.errors import DimensionMismatchError, InvalidInputError
from dreampool_gpu.retrieval.modes import CHROMA_MODES, FILTERED_MODES
from dreampool_gpu.retrieval.stages import CHROMA_METRICS
from dreampool_gpu.spectral import spectral_of_checked

if TYPE_CHECKING:
    from dreampool_gpu.retrieval.context import RetrievalContext

MAX_PADDED_K = 1 << 16  # k past the capacity only pads; capped so that [B, k] results stay allocatable
_MODE_NAMES = {
    **{m.value: m for m in RetrievalMode},
    "hard": RetrievalMode.SIMILAR,
}  # as RetrievalMode.parse reads them


@dataclass
class Queries:
    """Parsed queries: whatever features the input carried, all ``[B, ...]`` on the pool's device."""

    count: int
    chroma: torch.Tensor | None = None
    spectral: torch.Tensor | None = None
    embeddings: torch.Tensor | None = None
    dreams: torch.Tensor | None = None

    def take(self, rows: torch.Tensor) -> Queries:
        """The queries at ``rows`` (``[b]`` int64)."""

        def part(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[rows]

        return Queries(
            int(rows.numel()), part(self.chroma), part(self.spectral), part(self.embeddings), part(self.dreams)
        )


@dataclass
class Request:
    """A checked retrieve call: everything the mode's stages read.

    Attributes:
        mode, k: the mode and results per query (per class for ``balanced``).
        q: the parsed queries (``[B, ...]``). hint: ``[B]`` int64 class hints (-1 none).
        prior: ``[B]`` float32 utility priors (both made on first read when not given:
            an embedding query in ``nearest`` reads neither). classes: ``balanced``'s class labels.
        lam: MMR trade-off (already 1.0 for ``soft`` without an explicit ``mmr_lambda``).
        min_dispersion, utility_threshold: floats. fetch: candidates re-ranked by soft/hybrid.
        categories: ``[B]`` int64 hue filter, or None. keep: ``[capacity]`` bool ``where`` mask, or None.
        chroma_metric: ``cosine`` or ``euclidean``.
        full: set by a stage that saw on the host that no result slot is padding (the gathers skip their check).
    """

    mode: RetrievalMode
    k: int
    q: Queries
    given_hint: torch.Tensor | None
    given_prior: torch.Tensor | None
    classes: list[int]
    lam: float
    min_dispersion: float
    utility_threshold: float
    fetch: int
    categories: torch.Tensor | None
    keep: torch.Tensor | None
    chroma_metric: str
    device: torch.device
    full: bool = False

    @property
    def hint(self) -> torch.Tensor:
        """``[B]`` int64 class hints, -1 where none."""
        if self.given_hint is None:
            self.given_hint = torch.full((self.q.count,), -1, dtype=torch.int64, device=self.device)
        return self.given_hint

    @property
    def prior(self) -> torch.Tensor:
        """``[B]`` float32 utility priors (0 where none given)."""
        if self.given_prior is None:
            self.given_prior = torch.zeros(self.q.count, device=self.device)
        return self.given_prior


def check_request(
    ctx: RetrievalContext,
    queries: Any,
    *,
    k: Any,
    mode: Any,
    class_hint: Any,
    classes: Any,
    category: Any,
    utility_threshold: Any,
    utility_prior: Any,
    fetch_k: Any,
    mmr_lambda: Any,
    min_dispersion: Any,
    where: Any,
    chroma_metric: Any,
    total_capacity: int | None = None,
) -> Request:
    """Check ``DreamPool.retrieve``'s arguments (see there) against the pool ``ctx`` views; nothing is changed.

    ``total_capacity`` (default the bank's) bounds ``k`` and ``fetch_k``: a shard passes its
    whole sharded pool's.

    Raises:
        InvalidInputError, DimensionMismatchError: the first bad argument, named.
        IndexStaleError: an embedding mode while the encoder changed since the bank was embedded.
    """
    config = ctx.config
    capacity = ctx.bank.capacity if total_capacity is None else total_capacity
    mode_ = _MODE_NAMES.get(mode) if type(mode) is str else None  # a mode's name: no enum lookup
    if mode_ is None:
        mode_ = config.default_mode if mode is None else RetrievalMode.parse(mode)
    high = max(capacity, MAX_PADDED_K)
    if type(k) is int and 0 <= k <= high:  # the common k: checked in place
        k_ = k
    else:
        k_ = config.retrieval_limit if k is None else v.check_count(k, "k", high=high)
    device, encoders = ctx.device, ctx.encoders
    q = parse_queries(queries, mode_, config, device, encoders.encoder)
    b = q.count
    hint = None if class_hint is None else v.class_labels(class_hint, b, "class_hint", config.num_classes, device)
    prior = None if utility_prior is None else v.per_item(utility_prior, b, "utility_prior", 0.0, 1.0, device)
    if mode_ not in CHROMA_MODES:
        encoders.check_fresh()
    if mode_ is RetrievalMode.CLASS:
        expected = f"a class label in 0..{config.num_classes - 1} for mode 'class'"
        if hint is None:
            raise InvalidInputError("class_hint", expected, None)
        if b:
            v.require((hint >= 0).all(), "class_hint", expected, lambda: -1)
    balanced = class_list(classes, config.num_classes) if mode_ is RetrievalMode.BALANCED else []
    lam = ctx.weights.mmr_lambda if mmr_lambda is None else v.check_number(mmr_lambda, "mmr_lambda", 0.0, 1.0)
    if mode_ is RetrievalMode.SOFT and mmr_lambda is None:
        lam = 1.0
    dispersion = v.check_number(min_dispersion, "min_dispersion", 0.0, math.inf)
    threshold = v.check_number(utility_threshold, "utility_threshold", -math.inf, math.inf)
    fetch = max(k_, config.fetch_factor * k_) if fetch_k is None else v.check_count(fetch_k, "fetch_k")
    fetch = min(fetch, max(k_, capacity))  # candidates beyond capacity would all be padding
    categories = (
        None
        if category is None and mode_ is not RetrievalMode.CATEGORY
        else category_filter(category, q, mode_, device)
    )
    if chroma_metric not in CHROMA_METRICS:
        raise InvalidInputError("chroma_metric", f"one of {', '.join(CHROMA_METRICS)}", repr(chroma_metric))
    keep = None if where is None else where_mask(where, ctx.bank, device)
    return Request(
        mode_, k_, q, hint, prior, balanced, lam, dispersion, threshold, fetch, categories, keep, chroma_metric, device
    )


# ------------------------------------------------------------ arguments
def class_list(classes: Sequence[int] | None, num_classes: int) -> list[int]:
    """``balanced``'s ``classes`` as a list of ints in 0..num_classes-1."""
    expected = "a sequence of class labels for mode 'balanced'"
    if classes is None or isinstance(classes, (str, bytes)):
        raise InvalidInputError("classes", expected, repr(classes))
    if isinstance(classes, torch.Tensor):
        v.check_dense(classes, "classes")
    try:
        items = list(classes)
    except TypeError:  # not iterable (an object, a 0-d tensor)
        raise InvalidInputError("classes", expected, type(classes).__name__) from None
    out = []
    for c in items:
        if isinstance(c, torch.Tensor):
            v.check_dense(c, "classes")
        try:
            boolean = isinstance(c, bool) or getattr(c, "dtype", None) in (torch.bool, np.bool_)
            label = None if boolean else operator.index(c)  # int, numpy or 0-dim torch ints
        except TypeError:
            label = None
        if label is None or not 0 <= label < num_classes:
            raise InvalidInputError("classes", f"class labels in 0..{num_classes - 1}", repr(c))
        out.append(label)
    return out


def category_filter(category: Any, q: Queries, mode: RetrievalMode, device: torch.device) -> torch.Tensor | None:
    """``[B]`` int64 hue category each query's candidates must have; None = no filter.

    ``category`` mode defaults to the query chroma's own category; ``nearest``,
    ``soft`` and ``hybrid`` filter their candidates only when one is given.
    """
    if mode not in FILTERED_MODES or (category is None and mode is not RetrievalMode.CATEGORY):
        return None
    if category is None:
        if q.chroma is None:
            raise InvalidInputError("category", "a hue category 0..11 for embedding queries", None)
        return hue_category(q.chroma)
    t = v.as_tensor(category, "category", device=device)
    v.check_int(t, "category")
    t = t.long().expand(q.count) if t.dim() == 0 else t.long()
    v.check_shape(t, (q.count,), "category")
    v.check_int_range(t, "category", 0, 11, "hue categories in 0..11")
    return t


def where_mask(where: Any, bank: TensorBank, device: torch.device) -> torch.Tensor | None:
    """``where`` as a ``[capacity]`` bool mask on ``device`` (None: no filter)."""
    if where is None:
        return None
    expected = f"a [{bank.capacity}] bool mask, or a callable of the metadata columns returning one"
    if callable(where) and not isinstance(where, (torch.Tensor, np.ndarray)):
        try:
            where = where(columns.where_columns(bank))
        except Exception as exc:  # the caller's function: its failure is a bad argument
            raise InvalidInputError("where", expected, f"a callable that raised {type(exc).__name__}: {exc}") from exc
    t = v.as_tensor(where, "where", device=device)
    if t.dtype != torch.bool:
        raise InvalidInputError("where", expected, f"dtype {t.dtype}")
    v.check_shape(t, (bank.capacity,), "where")
    return t


# -------------------------------------------------------------- queries
def parse_queries(
    queries: Any, mode: RetrievalMode, config: PoolConfig, device: torch.device, encoder: Encoder
) -> Queries:
    """``[B, R, C, L, 3]`` dreams, ``[B, 3]`` chroma or (embedding modes) ``[B, D]`` embeddings, checked.

    Dreams yield their chroma (and spectral features where the feature encoder uses
    them); embeddings are put in the bank's form (:func:`bank_form`).
    """
    t = v.as_tensor(queries, "queries", device=device)
    v.check_float(t, "queries")
    d, dim = config.embedding_dim, t.dim()
    if dim == 2 and t.shape[1] == d and mode not in CHROMA_MODES:  # embeddings (the config refuses d = 3: chroma)
        return Queries(t.shape[0], embeddings=embedding_queries(t, config.metric))
    if dim == 5:
        batch = validate_dreams(t, dream_shape=config.dream_shape, name="queries")
        spectral = None
        if isinstance(encoder, FeatureEncoder) and encoder.include_spectral:
            spectral = spectral_of_checked(batch, config.window)
        return Queries(batch.shape[0], chroma=chroma_signature(batch), spectral=spectral, dreams=batch)
    if dim == 2 and t.shape[1] == 3:
        v.check_finite(t, "queries")
        v.check_range(t, "queries", 0.0, 1.0)
        return Queries(t.shape[0], chroma=t.float())
    expected = "[B, R, C, L, 3] dreams or [B, 3] chroma"
    if mode not in CHROMA_MODES:
        expected += f" or [B, {d}] embeddings"
    if t.dim() == 4 or t.dim() == 1:
        expected += f" ({SINGLE_DREAM_HINT})" if t.dim() == 4 else " (one query needs a batch dimension: q[None])"
    raise DimensionMismatchError(expected, list(t.shape), f"queries for mode {mode.value!r}")


_NORMS = (1e-10, 1e15)  # row norms that divide a query as they are (see embedding_queries)
_HOST_READ = 64  # up to this many rows the norms are read with tolist (no kernel); more: two extremes


def embedding_queries(t: torch.Tensor, metric: Metric) -> torch.Tensor:
    """``[B, D]`` embedding queries, checked finite, in the bank's form (:func:`bank_form`) as float32.

    Under euclidean they must be small enough that squared distances to the bank stay
    finite in float32. The finiteness check reads the rows' peaks, which cosine's
    normalisation needs anyway (a row with NaN or inf has a non-finite peak). Where checks
    are read at once (not deferred), cosine first reads the rows' norms: when every one lies in
    ``[1e-10, 1e15]`` (finite, and no square overflows or underflows to matter) the rows are
    divided by them (2 kernels); otherwise they are scaled by their peaks first, and a peak
    read nonzero everywhere skips the zero-row guard.
    """
    if t.dtype != torch.float32:
        t = t.float()  # after the cast: float64 values past float32's range are inf here
    if not t.numel():
        return t if metric is Metric.EUCLIDEAN else unit_rows(t, t.new_zeros(t.shape[0], 1))
    if metric is Metric.COSINE and checks.active() is None:
        norms = torch.linalg.vector_norm(t, dim=1, keepdim=True)
        low, high = _NORMS
        if t.shape[0] <= _HOST_READ:  # every norm read (tolist: no kernel); finite too: NaN compares False
            fit = all(low <= row[0] <= high for row in norms.tolist())
        else:  # many rows: the two extremes
            fit = all(low <= float(x) <= high for x in torch.aminmax(norms))
        if fit:
            return t / norms
    peak = torch.linalg.vector_norm(t, ord=math.inf, dim=1, keepdim=True)  # max |value| per row; NaN stays NaN
    if checks.active() is None:
        low, high = (float(x) for x in torch.aminmax(peak))
        if not high < math.inf:  # NaN < inf is False
            raise InvalidInputError("queries", "finite values", "NaN or inf")
    else:
        low, high = 0.0, math.inf
        v.require((peak < math.inf).all(), "queries", "finite values", lambda: "NaN or inf")
    if metric is Metric.EUCLIDEAN:
        bound = math.sqrt(torch.finfo(torch.float32).max / (4 * t.shape[1]))
        if high > bound:
            v.require(
                (peak <= bound).all(),
                "queries",
                f"euclidean embeddings with |values| <= {bound:.3g} (squared distances overflow float32 beyond)",
                lambda: f"|values| up to {float(peak.max()):.3g}",
            )
        return t
    if low > 0:  # every row nonzero: scaled rows peak at 1, so their norms are >= 1 (no zero guard)
        scaled = t / peak
        return scaled / torch.linalg.vector_norm(scaled, dim=1, keepdim=True)
    return unit_rows(t, peak)
