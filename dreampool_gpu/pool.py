"""DreamPool: the facade that wires validation, features, bank, search and re-ranking."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, SupportsIndex, cast

import numpy as np
import torch

from dreampool_gpu import _validation as v
from dreampool_gpu import checks
from dreampool_gpu.admission import Admission
from dreampool_gpu.bank import TensorBank, column_specs
from dreampool_gpu.budget import (
    MemoryBudget,
    check_allocation,
    entry_nbytes,
    fit_capacity,
)
from dreampool_gpu.cache import QueryCache
from dreampool_gpu.checkpointing import Checkpointing
from dreampool_gpu.columns import Columns, as_returned
from dreampool_gpu.config import CheckPolicy, PoolConfig, RetrievalMode
from dreampool_gpu.counters import new_counters
from dreampool_gpu.device_move import DeviceMove
from dreampool_gpu.devices import resolve_device
from dreampool_gpu.encoder_lifecycle import EncoderLifecycle
from dreampool_gpu.encoders import Encoder, bank_form
from dreampool_gpu.errors import (
    DimensionMismatchError,
    InvalidConfigurationError,
    InvalidInputError,
)
from dreampool_gpu.eviction import policy_for
from dreampool_gpu.feedback import Feedback
from dreampool_gpu.metrics import PoolMetrics
from dreampool_gpu.notices import Notices
from dreampool_gpu.prepared import PreparedRetrieval
from dreampool_gpu.rerank import HybridWeights, diversity_stats
from dreampool_gpu.retrieval import request, stages
from dreampool_gpu.retrieval.modes import CHROMA_MODES, MODES
from dreampool_gpu.retrieval.request import check_request
from dreampool_gpu.search import make_index
from dreampool_gpu.stats import PoolStats, pool_stats
from dreampool_gpu.streams import StreamOrderedLock
from dreampool_gpu.updates import ColumnUpdates

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_RETRIEVE_DEFAULTS: dict[str, Any] = {
    "class_hint": None,
    "classes": None,
    "category": None,
    "utility_threshold": 0.0,
    "utility_prior": None,
    "fetch_k": None,
    "mmr_lambda": None,
    "min_dispersion": 0.0,
    "where": None,
    "chroma_metric": "cosine",
}
_RETRIEVE_OPTIONS = tuple(_RETRIEVE_DEFAULTS)


@dataclass(frozen=True)
class Retrieval:
    """Result of :meth:`DreamPool.retrieve`, on the pool's device.

    Attributes:
        ids: ``[B, k]`` int64 entry ids, best first, -1 padding.
        scores: ``[B, k]`` float32, higher is better, ``-inf`` padding. Chroma
            methods: chroma cosine; nearest: embedding similarity (cosine, or minus
            the euclidean distance); soft/hybrid: hybrid base score; diverse: chroma
            cosine of each pick (the order is MMR's).
        dreams: ``[B, k, R, C, L, 3]`` when asked for with ``with_dreams=True``
            (zeros at padding), else None.
    """

    ids: torch.Tensor
    scores: torch.Tensor
    dreams: torch.Tensor | None = None

    @property
    def mask(self) -> torch.Tensor:
        """``[B, k]`` bool, True where a result is present."""
        return self.ids >= 0


class DreamPool(Admission, Feedback, ColumnUpdates, EncoderLifecycle, Checkpointing, DeviceMove):
    """Long-term memory of dreams: gated adds, a tensor bank, k-NN, MMR, feedback.

    Every public method is thread-safe (one re-entrant lock) and validates its
    input before touching state: a rejected call leaves the pool as it was.

    Args:
        config: the pool's :class:`PoolConfig` (defaults when None).

    Keyword Args:
        encoder: the embedding's encoder: None for ``config.encoder`` (``features`` or
            ``learned``), any :class:`~dreampool_gpu.encoders.Encoder`, or a
            ``torch.nn.Module`` mapping dreams ``[N, R, C, L, 3]`` to ``[N, embedding_dim]``
            (wrapped in :class:`~dreampool_gpu.learned.ModuleEncoder`). It is moved to the
            pool's device.

    Examples:
        >>> pool = DreamPool(PoolConfig(dream_shape=(8, 8, 2), device="cpu"))
        >>> ids = pool.add(dreams, coherence=c, energy=e, violation=v)   # -1 where rejected
        >>> hits = pool.retrieve(dreams[:4], k=5, mode="hybrid")
        >>> pool.feedback(hits.ids, torch.rand(4, 5))
    """

    def __init__(self, config: PoolConfig | None = None, *, encoder: Any = None) -> None:
        if config is not None and not isinstance(config, PoolConfig):
            raise InvalidConfigurationError("config", type(config).__name__, "a PoolConfig (or None for the defaults)")
        self.config = config if config is not None else PoolConfig()
        self.device = resolve_device(self.config.device)
        if self.config.dream_dtype == "auto":
            dream_dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        else:
            dream_dtype = _DTYPES[self.config.dream_dtype]
        self.budget = MemoryBudget(
            self.config.memory_budget_mb, device=self.device, threshold=self.config.budget_threshold
        )
        # capacity: as configured, lowered (or, when None, derived) so the preallocated bank fits the budget;
        # kept on the bank (``self.capacity``), never written back into the user's config
        specs = column_specs(self.config.dream_shape, self.config.embedding_dim, dream_dtype, self.config.columns)
        capacity = fit_capacity(
            self.config, entry_bytes=entry_nbytes(specs), budget_bytes=self.budget.budget_bytes, device=self.device
        )
        check_allocation(self.config, specs, capacity, self.device)  # a typed error, not the allocator's
        self.bank = TensorBank(
            capacity,
            self.config.dream_shape,
            self.config.embedding_dim,
            device=self.device,
            dream_dtype=dream_dtype,
            user=self.config.columns,
        )
        self.bank.settle_hook = self._settle_features  # lazy features: computed when first read
        self._lazy_for: PoolConfig | None = None
        self._lazy = False
        self.encoder: Encoder = self._make_encoder(encoder)
        self._encoder_fitted = encoder is not None or self.config.encoder != "learned"  # a given one may be trained
        self._notices = Notices()
        self._embedded_version = self.encoder.version  # the encoder version the bank's embeddings come from
        self.index = make_index(self.bank, self.config)
        self.cache = QueryCache(self.config.query_cache_size)
        self.eviction = policy_for(
            self.config.eviction_policy, seed=self.config.eviction_seed, num_classes=self.config.num_classes
        )
        self.weights = HybridWeights(
            self.config.alpha, self.config.beta, self.config.gamma, self.config.delta, self.config.mmr_lambda
        )
        self.counters = new_counters()
        self._fault = checks.FaultFlag(self.device)
        self._lock = StreamOrderedLock(lambda: self.device, self._kept_tensors)
        self.metrics: PoolMetrics | None = None
        self._metadata_default = tuple(name for name in self.bank.specs if name != "dreams")
        self._lookup_memo: tuple[Any, tuple[int, int], tuple[torch.Tensor, torch.Tensor, bool]] | None = None

    def __len__(self) -> int:
        return self.bank.size

    def __contains__(self, entry_id: object) -> bool:
        """``id in pool``: True while the entry with this int id is stored (evicted ids are not).

        Raises:
            InvalidInputError: ``entry_id`` is not an int (bools and floats refused).
        """
        ok = isinstance(entry_id, (int, np.integer)) and not isinstance(entry_id, (bool, np.bool_))
        if isinstance(entry_id, torch.Tensor) and entry_id.dim() == 0:
            ok = not entry_id.is_floating_point() and not entry_id.is_complex() and entry_id.dtype != torch.bool
            entry_id = int(entry_id) if ok else entry_id
        if not ok:
            raise InvalidInputError("id", "an int entry id", repr(entry_id))
        value = int(cast(SupportsIndex, entry_id))  # ok: an int or np.integer (a 0-d tensor became an int)
        with self._lock:
            query = torch.tensor([value], dtype=torch.int64, device=self.device)
            return 0 <= value < self.bank.next_id and bool(self.bank.slots_of(query)[0] >= 0)

    def __repr__(self) -> str:
        with self._lock:
            used = MemoryBudget.usage(self.bank, self.index)
            allocated = sum(self.bank.nbytes().values()) + self.index.nbytes()
            budget = "" if self.budget.budget_bytes is None else f", budget {self.budget.budget_bytes / 2**20:.1f} MiB"
            return (
                f"DreamPool(size={self.bank.size}/{self.capacity}, device={self.device}, "
                f"engine={self.index.kind}, dream_shape={self.config.dream_shape}, "
                f"embedding_dim={self.config.embedding_dim}, memory={used / 2**20:.2f} MiB used of "
                f"{allocated / 2**20:.2f} MiB allocated{budget})"
            )

    # ------------------------------------------------------------- retrieve
    def retrieve(
        self,
        queries: Any,
        *,
        k: int | None = None,
        mode: str | RetrievalMode | None = None,
        class_hint: Any = None,
        classes: Sequence[int] | None = None,
        category: Any = None,
        utility_threshold: float = 0.0,
        utility_prior: Any = None,
        fetch_k: int | None = None,
        mmr_lambda: float | None = None,
        min_dispersion: float = 0.0,
        with_dreams: bool = False,
        where: Any = None,
        chroma_metric: str = "cosine",
    ) -> Retrieval:
        """Retrieve up to k entries per query, most relevant first.

        Args:
            queries: ``[B, R, C, L, 3]`` dreams, ``[B, 3]`` chroma signatures, or
                ``[B, D]`` embeddings (soft, hybrid, category and nearest only).

        Keyword Args:
            k: results per query (per class for ``balanced``), at most ``max(capacity, 65536)``
                (more than the pool holds pads the result); default ``retrieval_limit``.
            mode: ``similar`` (``hard``), ``class``, ``balanced``, ``utility``, ``diverse``,
                ``soft``, ``hybrid``, ``category`` or ``nearest``; default from config.
            class_hint: int or ``[B]`` int in ``0..num_classes-1`` (-1 none): the class for ``class``
                (required) and the class match of ``soft``/``hybrid``.
            classes: class labels for ``balanced``.
            category: int or ``[B]`` hue category 0..11: the category of ``category`` mode
                (default the query chroma's own), and a candidate filter for ``nearest``,
                ``soft`` and ``hybrid`` (default none); the chroma modes ignore it.
            utility_threshold: minimum utility for ``utility``.
            utility_prior: float or ``[B]`` in [0, 1], the utility feature of soft queries.
            fetch_k: candidates re-ranked by ``soft``/``hybrid`` (default ``fetch_factor * k``).
            mmr_lambda: MMR trade-off for ``diverse``/``hybrid`` (default config; ``soft`` uses 1).
            min_dispersion: stop ``diverse``/``hybrid`` picks early below this dispersion.
            with_dreams: also gather the dreams of the results.
            where: a filter applied before the k-NN and any re-ranking, in every mode:
                a ``[capacity]`` bool mask over slots, or a callable that receives the
                metadata columns (see :func:`~dreampool_gpu.columns.where_columns`) as
                ``[capacity]`` tensors on the pool's device and returns one. Only entries
                where it is True qualify.
            chroma_metric: how the chroma modes (``similar``, ``class``, ``balanced``,
                ``utility``, ``diverse``) score: ``"cosine"`` (the hue direction; brightness
                ignored, so black matches any dark colour) or ``"euclidean"`` (minus the RGB
                distance: brightness counts).

        Returns:
            :class:`Retrieval` with ``[B, k]`` ids and scores on the pool's device.

        Raises:
            InvalidInputError, DimensionMismatchError: bad input (pool unchanged).
        """
        start = time.perf_counter()
        options = dict(
            k=k,
            mode=mode,
            class_hint=class_hint,
            classes=classes,
            category=category,
            utility_threshold=utility_threshold,
            utility_prior=utility_prior,
            fetch_k=fetch_k,
            mmr_lambda=mmr_lambda,
            min_dispersion=min_dispersion,
            where=where,
            chroma_metric=chroma_metric,
        )
        with self._lock:
            out = self._retrieve(queries, options, with_dreams=with_dreams, sync_free=self.sync_free)
            b = out.ids.shape[0]
            self.counters["queries"] += b
            if self.metrics is not None:
                if self.device.type == "cuda":  # latency, not launch time; only pools with metrics wait here
                    torch.cuda.synchronize(self.device)
                self.metrics.observe_retrieve(time.perf_counter() - start, b)
            return out

    def _retrieve(self, queries: Any, options: dict[str, Any], *, with_dreams: bool, sync_free: bool) -> Retrieval:
        """:meth:`retrieve`'s device work (checks, the mode's stages, gathers, usage); the caller holds the lock."""
        with checks.deferred(sync_free) as deferred:
            req = check_request(self, queries, **options)
            self.bank.settle()  # every mode reads derived columns: waiting entries get them now, in one batch
            if req.mode not in CHROMA_MODES:
                self._notices.unfitted(self.encoder, self._encoder_fitted)
            scores, slots = MODES[req.mode].run(self, req)
            if deferred is not None and deferred.flags:  # a failed check empties the results
                ok = self._fault.record("retrieve", deferred)
                slots = torch.where(ok, slots, -1)
                scores = torch.where(ok, scores, float("-inf"))
        safe, valid = slots.clamp(min=0), slots >= 0
        ids = self.bank.gather_valid("ids", safe, valid)
        usage = self.bank.columns["usage"]  # +1 per returned entry; padding adds 0 (no host sync)
        usage.index_add_(0, safe.view(-1), valid.view(-1).to(usage.dtype))
        dreams = self.bank.gather_valid("dreams", safe, valid) if with_dreams else None
        return Retrieval(ids=ids, scores=scores, dreams=dreams)

    def prepare_retrieve(
        self,
        queries: Any,
        *,
        k: int | None = None,
        mode: str | RetrievalMode | None = None,
        with_dreams: bool = False,
        graph: bool = True,
        **options: Any,
    ) -> PreparedRetrieval:
        """A callable ``f(queries) -> Retrieval`` for queries shaped like ``queries``, other arguments fixed.

        On CUDA each call replays a CUDA graph of the whole retrieve (one launch), captured
        again after any change to the bank or the encoder; elsewhere it runs eagerly.
        Checks are deferred (see ``config.checks``); outputs are reused by the next call.
        ``options`` are :meth:`retrieve`'s (``where`` as a mask tensor, read at each call);
        ``with_dreams`` gathers the results' dreams inside the call too (a replay batch with no
        further host read). See :class:`~dreampool_gpu.prepared.PreparedRetrieval`.

        Raises:
            InvalidInputError, DimensionMismatchError: bad queries or options (checked now).
        """
        unknown = sorted(set(options) - set(_RETRIEVE_OPTIONS))
        if unknown:
            raise InvalidInputError(unknown[0], f"one of {', '.join(_RETRIEVE_OPTIONS)}", repr(options[unknown[0]]))
        with self._lock:
            example = v.as_tensor(queries, "queries", device=self.device)
            return PreparedRetrieval(
                self,
                example,
                {**_RETRIEVE_DEFAULTS, **options, "k": k, "mode": mode},
                graph=v.check_flag(graph, "graph"),
                with_dreams=v.check_flag(with_dreams, "with_dreams"),
            )

    def check(self) -> None:
        """Raise the error of the first deferred check that failed since the last raise (one host read).

        With ``checks="deferred"`` (the default on CUDA) a call whose input fails a value
        check returns empty results and changes nothing; its error waits on the device
        until ``add``, ``feedback`` or this method reads it (docs/api.md).

        Raises:
            InvalidInputError: naming the argument and the check it failed.
        """
        with self._lock:
            self._fault.raise_code(int(self._fault.code))

    @property
    def sync_free(self) -> bool:
        """Whether value checks are deferred (``config.checks``, ``auto``: on CUDA): no host reads."""
        policy = self.config.checks
        return policy is CheckPolicy.DEFERRED or (policy is CheckPolicy.AUTO and self.device.type == "cuda")

    def enable_metrics(self, *, registry: Any = None) -> PoolMetrics:
        """Start Prometheus metrics for this pool (needs prometheus-client); returns them.

        Counters and gauges are read from :meth:`stats` at scrape time; retrieve
        latency and batch size are observed per call from now on.
        """
        with self._lock:
            self.metrics = PoolMetrics(self, registry=registry)
            return self.metrics

    # --------------------------------------------------------------- gather
    def dreams(self, ids: Any) -> torch.Tensor:
        """Dreams of ``ids`` (any shape) as ``[..., R, C, L, 3]``; zeros where absent."""
        with self._lock:
            return self._gather(("dreams",), *self._lookup(ids))["dreams"]

    def metadata(self, ids: Any, *, columns: Sequence[str] | None = None) -> Columns:
        """Columns of ``ids`` (any shape), each ``[*ids.shape, ...]``, plus ``found`` (bool).

        ``columns`` names the bank columns to gather (default: every column except dreams);
        only those are gathered (and only a derived column, e.g. ``embeddings``, needs the
        entries' features: see ``PoolConfig.features``). Absent ids get each column's fill value.
        A dict under the columns' names (:mod:`~dreampool_gpu.columns`): ``ids``,
        ``class_label`` (-1 none), ``hue_category``, ``usage`` and ``feedback_count`` int64
        (``metadata(ids)["class_label"]`` is a ``cross_entropy`` target as it comes); an
        unknown name raises :class:`~dreampool_gpu.errors.UnknownColumnError` listing them.

        Raises:
            InvalidInputError: ids never issued, or ``columns`` names no bank column.
        """
        with self._lock:
            names = self._metadata_columns(columns)
            safe, found, every = self._lookup(ids)
            out = Columns({name: as_returned(t) for name, t in self._gather(names, safe, found, every).items()})
            out["found"] = found
            return out

    def _metadata_columns(self, columns: Sequence[str] | None) -> tuple[str, ...]:
        """The checked column names of :meth:`metadata` (every column but dreams when None)."""
        if columns is None:
            return self._metadata_default
        if isinstance(columns, str) or not isinstance(columns, Sequence):
            raise InvalidInputError("columns", "a sequence of column names, or None", repr(columns))
        names = tuple(columns)
        for name in names:
            if name not in self.bank.specs:
                raise InvalidInputError("columns", f"names among {', '.join(self.bank.specs)}", repr(name))
        return names

    def _gather(
        self, names: Sequence[str], safe: torch.Tensor, found: torch.Tensor, every: bool
    ) -> dict[str, torch.Tensor]:
        """Columns ``names`` at :meth:`_lookup`'s rows; fill values where not ``found`` (no mask when ``every``)."""
        if not every:
            return {name: self.bank.gather_valid(name, safe, found) for name in names}
        flat = safe.reshape(-1)
        out = {}
        for name in names:
            column = self.bank.columns[name]
            out[name] = column.index_select(0, flat).reshape((*safe.shape, *column.shape[1:]))
        return out

    def sample(
        self, n: int, *, where: Any = None, replace: bool = True, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Ids of ``n`` draws, uniform, from the ``m`` live entries passing ``where``.

        The replay draw of a training loop: ``where`` is a ``[capacity]`` bool mask or a
        callable of the metadata columns, as in :meth:`retrieve`. ``replace=True`` (the
        default) draws with replacement and returns exactly ``n`` ids whenever ``m >= 1``
        (a fixed replay batch from the first entry on); ``replace=False`` returns
        ``min(n, m)`` distinct ids. ``generator`` (a CPU ``torch.Generator``) makes the
        draw reproducible: entries are indexed in age order, so a seeded draw is the same
        on every run. Reads ``m`` on the host once.

        Returns:
            ``[n]`` (``replace=True``) or ``[min(n, m)]`` (``replace=False``) int64 ids on
            the pool's device; ``[0]`` when no entry qualifies.

        Raises:
            InvalidInputError: ``n`` not an int >= 0, ``replace`` not a bool, a bad ``where`` or ``generator``.
        """
        with self._lock:
            n = v.check_count(n, "n")
            replace = v.check_flag(replace, "replace")
            if generator is not None and not isinstance(generator, torch.Generator):
                raise InvalidInputError("generator", "a torch.Generator or None", type(generator).__name__)
            keep = request.where_mask(where, self.bank, self.device)
            live, slots = self.bank.ids_by_age(), self.bank.slots_by_age()  # one sort per bank revision
            if keep is not None:
                passing = keep[slots]
                live, slots = live[passing], slots[passing]
            if live.numel() == 0:
                return live
            if replace:
                pick = torch.randint(live.numel(), (n,), generator=generator)
            else:
                pick = torch.randperm(live.numel(), generator=generator)[:n]
            pick = pick.to(live.device)
            ids = live[pick]
            # their slots too: dreams(ids) and metadata(ids) of this batch need no lookup (see _lookup)
            found = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
            self._lookup_memo = (ids, (ids._version, self.bank.revision), (slots[pick], found, True))
            return ids

    def diversity(self, ids: Any) -> dict[str, torch.Tensor]:
        """Diversity of each result set: mean, min, max pairwise chroma distance (docs/spec.md §Hybrid score and MMR).

        Args:
            ids: ``[B, k]`` int ids, e.g. ``retrieve(...).ids``; -1 and evicted ids are left out.

        Returns:
            ``{"mean", "min", "max"}``, each ``[B]`` float32 on the pool's device; NaN for
            a set with fewer than two live entries.
        """
        with self._lock:
            slots = self._slots(ids)
            if slots.dim() != 2:
                raise DimensionMismatchError("[B, k] ids", list(slots.shape), "ids")
            return diversity_stats(self.bank.gather("chroma", slots), slots >= 0)

    def stats(self) -> PoolStats:
        """Size, counters, bytes by column, engine, cache, memory and score means, as a :class:`PoolStats`.

        ``stats["size"]`` reads a key of ``stats.to_dict()`` (the plain JSON-able dict).
        ``search`` holds the engine's facts (``SearchIndex.describe``): its kind, the
        engine that answered the latest search, index bytes, and IVF state where used.
        ``memory`` holds the budget, the exact usage and the device's memory with its
        source (NVML on CUDA, else a fallback; see ``MemoryBudget.stats``).
        """
        with self._lock:
            return pool_stats(self.bank, self.index, self.budget, self.cache, self.counters, self.device)

    # ------------------------------------------------------------- helpers
    @property
    def capacity(self) -> int:
        """Slots of the bank: the configured capacity, lowered (or derived) to fit the memory budget."""
        return self.bank.capacity

    def _kept_tensors(self) -> list[torch.Tensor]:
        """Tensors kept across calls that a call may replace (age order, fault flag, encoder state)."""
        kept = [*self.bank.order_cache(), self._fault.code]
        encoder: Any = self.encoder
        if isinstance(encoder, torch.nn.Module):
            return kept + [*encoder.parameters(), *encoder.buffers()]
        return kept + [t for t in vars(encoder).values() if isinstance(t, torch.Tensor)]

    def _embed(self, z: torch.Tensor) -> torch.Tensor:
        """Bank form of encoder output ``[N, D]`` (:func:`~dreampool_gpu.encoders.bank_form`)."""
        return bank_form(z, self.config.metric)

    def _per_dream(self, x: Any, n: int, name: str, low: float, high: float) -> torch.Tensor:
        return request.per_query(x, n, name, low, high, self.device)

    def _labels(self, x: Any, n: int, name: str) -> torch.Tensor:
        return request.labels(x, n, name, self.config.num_classes, self.device)

    def _slots(self, ids: Any) -> torch.Tensor:
        """Slots of ``ids`` (any shape; -1 where absent), after refusing ids never issued."""
        safe, found, _ = self._lookup(ids)
        return torch.where(found, safe, -1)

    def _lookup(self, ids: Any) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """``(safe, found, every)`` of ``ids`` (:meth:`TensorBank.lookup`), ``every``: all found.

        One host read, which also refuses ids this pool never issued (below -1 or at/after
        ``next_id``), listing the first few.
        """
        memo = self._lookup_memo  # dreams(ids) then metadata(ids) of one replay batch: looked up once
        if memo is not None and memo[0] is ids and memo[1] == (ids._version, self.bank.revision):
            return memo[2]
        t = v.as_ids(ids, "ids", device=self.device).long()
        safe, found = self.bank.lookup(t)
        if t.numel() == 0:
            return safe, found, True
        low, high, every = checks.host_values([*torch.aminmax(t), found.all()])
        if low < -1 or high >= self.bank.next_id:
            self._check_issued(t)
        result = (safe, found, bool(every))
        if isinstance(ids, torch.Tensor):  # the same tensor, unchanged, in an unchanged bank: the same answer
            self._lookup_memo = (ids, (ids._version, self.bank.revision), result)
        return result

    def _check_issued(self, ids: torch.Tensor) -> None:
        """Refuse ids this pool never issued (below -1 or at/after ``next_id``), listing the first few."""
        if ids.numel() and bool(((ids < -1) | (ids >= self.bank.next_id)).any()):
            bad = ids[(ids < -1) | (ids >= self.bank.next_id)].unique()
            shown = ", ".join(str(i) for i in bad[:5].tolist()) + (", ..." if bad.numel() > 5 else "")
            raise InvalidInputError(
                "ids", f"ids issued by this pool (-1..{self.bank.next_id - 1})", f"{bad.numel()} unknown: {shown}"
            )

    def _query_embeddings(self, q: request.Queries, hint: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` embeddings of parsed queries, through the query cache where it applies."""
        if q.embeddings is not None:
            return q.embeddings
        return stages.embed_queries(self.encoder, self.cache, self.config, q.chroma, q.spectral, q.dreams, hint, prior)

    def _knn(
        self,
        embedded: torch.Tensor,
        k: int,
        categories: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The engine's k-NN ``[B, k]``, ties oldest first (:func:`~dreampool_gpu.retrieval.stages.knn`)."""
        return stages.knn(self.bank, self.index, self.config, embedded, k, categories, keep)
