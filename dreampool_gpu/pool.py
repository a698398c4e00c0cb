"""DreamPool: the facade over its parts (:mod:`dreampool_gpu.parts`).

The public methods check their input and delegate: ``add`` to the admitter, ``feedback`` to
:func:`~dreampool_gpu.feedback.record_feedback`, the encoder methods to the encoder slot,
``retrieve`` to :func:`~dreampool_gpu.retrieval.walk.walk` over the parts,
checkpoints to :mod:`~dreampool_gpu.checkpointing`, ``to`` to :mod:`~dreampool_gpu.device_move`.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from typing import Any, Generic, SupportsIndex, TypeVar, cast, overload

import numpy as np
import torch

from dreampool_gpu import _validation as v
from dreampool_gpu import checkpointing, device_move, persist
from dreampool_gpu.bank import TensorBank
from dreampool_gpu.budget import MemoryBudget
from dreampool_gpu.cache import QueryCache
from dreampool_gpu.columns import Columns, as_returned
from dreampool_gpu.config import CheckPolicy, PoolConfig, RetrievalMode
from dreampool_gpu.devices import host_to_device
from dreampool_gpu.encoders import Encoder
from dreampool_gpu.errors import DimensionMismatchError, InvalidConfigurationError, InvalidInputError
from dreampool_gpu.eviction import Eviction
from dreampool_gpu.feedback import record_feedback
from dreampool_gpu.fitting import FitReport
from dreampool_gpu.metrics import PoolMetrics
from dreampool_gpu.parts import PoolParts, build_parts
from dreampool_gpu.prepared import PreparedRetrieval
from dreampool_gpu.rerank import HybridWeights, diversity_stats
from dreampool_gpu.retrieval import request
from dreampool_gpu.retrieval.context import RETRIEVE_DEFAULTS
from dreampool_gpu.retrieval.walk import Retrieval, walk
from dreampool_gpu.search import SearchIndex
from dreampool_gpu.stats import PoolStats, pool_stats
from dreampool_gpu.streams import StreamOrderedLock
from dreampool_gpu.updates import update_columns

_PREPARED_OPTIONS = tuple(name for name in RETRIEVE_DEFAULTS if name not in ("k", "mode"))  # **options


T = TypeVar("T")


class _Part(Generic[T]):
    """A pool attribute read from (and, where settable, written to) the pool's :class:`PoolParts`."""

    def __init__(self, doc: str, *, settable: bool = True) -> None:
        self.__doc__, self.settable = doc, settable

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, pool: None, owner: type) -> _Part[T]: ...

    @overload
    def __get__(self, pool: DreamPool, owner: type) -> T: ...

    def __get__(self, pool: DreamPool | None, owner: type) -> T | _Part[T]:
        return self if pool is None else cast(T, getattr(pool.parts, self.name))

    def __set__(self, pool: DreamPool, value: T) -> None:
        if not self.settable:
            raise AttributeError(f"DreamPool.{self.name} is read-only (it belongs to the pool's parts)")
        setattr(pool.parts, self.name, value)


class DreamPool:
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
        eviction: the eviction policy, an :class:`~dreampool_gpu.eviction.Eviction` instance
            (e.g. ``eviction.Reservoir(seed=0)`` or a subclass of your own); default the one
            ``config.eviction_policy`` names.

    Examples:
        >>> pool = DreamPool(PoolConfig(dream_shape=(8, 8, 2), device="cpu"))
        >>> ids = pool.add(dreams, coherence=c, energy=e, violation=v)   # -1 where rejected
        >>> hits = pool.retrieve(dreams[:4], k=5, mode="hybrid")
        >>> pool.feedback(hits.ids, torch.rand(4, 5))
    """

    def __init__(self, config: PoolConfig | None = None, *, encoder: Any = None, eviction: Any = None) -> None:
        if config is not None and not isinstance(config, PoolConfig):
            raise InvalidConfigurationError("config", type(config).__name__, "a PoolConfig (or None for the defaults)")
        self._lock = StreamOrderedLock(lambda: self._parts.device, self._kept_tensors)
        self._parts = build_parts(
            config if config is not None else PoolConfig(), self._lock, encoder=encoder, eviction=eviction
        )
        self.metrics: PoolMetrics | None = None

    # ---------------------------------------------------------------- parts
    @property
    def parts(self) -> PoolParts:
        """The pool's parts (:class:`~dreampool_gpu.parts.PoolParts`); a device move replaces them."""
        return self._parts

    config = _Part[PoolConfig]("The pool's configuration, as its user gave it (the capacity is :attr:`capacity`).")
    device = _Part[torch.device]("Where the pool's tensors live.")
    bank = _Part[TensorBank]("The entries (:class:`~dreampool_gpu.bank.TensorBank`).", settable=False)
    index = _Part[SearchIndex]("The k-NN engine over the bank's embeddings.")
    budget = _Part[MemoryBudget]("The memory budget.")
    encoder = _Part[Encoder]("The encoder of the bank's embeddings.", settable=False)
    cache = _Part[QueryCache]("The query cache (embeddings of recent query batches).", settable=False)
    eviction = _Part[Eviction]("The eviction policy.", settable=False)
    weights = _Part[HybridWeights]("The hybrid score's weights.", settable=False)
    counters = _Part[dict[str, int]]("``stats()``'s counters (added, rejected, ...).", settable=False)

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

    # ------------------------------------------------------------ add, feedback
    def add(
        self,
        dreams: Any,
        *,
        coherence: Any = None,
        energy: Any = None,
        violation: Any = None,
        class_label: Any = None,
        force: bool = False,
        columns: Any = None,
        class_labels: Any = None,
    ) -> torch.Tensor:
        """Add a batch of dreams; those below the coherence threshold are rejected.

        Features (chroma, spectral, hue category, embedding) are computed for
        the whole batch at once: here with ``features="eager"``, else (``lazy``, the
        default) by the first call that reads them, for every waiting entry together.
        Before writing, the eviction policy makes room
        within the capacity and the memory budget (:mod:`dreampool_gpu.budget`);
        when the pool returns, its usage is within the budget. When more dreams
        pass the gate than the whole pool holds, the best that fit by the
        policy admits are kept (:meth:`~dreampool_gpu.eviction.Eviction.admit`) and
        the rest count as dropped, or, with ``strict_budget``, the call raises.

        Args:
            dreams: ``[N, R, C, L, 3]`` float, values in [0, 1], any device.

        Keyword Args:
            coherence: ``[N]`` in [0, 1]; required unless ``force`` (then default 1.0).
            energy: ``[N]`` >= 0 (default 0). violation: ``[N]`` in [0, 1] (default 0).
            class_label: ``[N]`` int in ``0..num_classes-1``, -1 = none; or None.
            force: bypass the coherence gate.
            columns: the user columns of the batch (``PoolConfig.columns``), ``{name: [N, *shape]}``
                (a 0-d value is broadcast); a declared column not given gets 0 (False).
            class_labels: the old name of ``class_label`` (a DeprecationWarning).

        Returns:
            ``[N]`` int64 ids on the pool's device, of the dreams stored; -1 where
            rejected or dropped.

        Raises:
            InvalidInputError, DimensionMismatchError: bad input (pool unchanged).
            CapacityExceededError: with ``strict_budget``, more dreams passed the gate
                than the whole pool holds (pool unchanged).
        """
        with self._lock:
            return self._parts.admitter.add(
                dreams,
                coherence=coherence,
                energy=energy,
                violation=violation,
                class_label=class_label,
                force=force,
                columns=columns,
                class_labels=class_labels,
            )

    def feedback(self, ids: Any, utility: Any) -> int:
        """Record utility feedback for entries; padding ids (-1) are ignored.

        Each entry keeps the last utility and the running mean ``util_mean`` used
        by hybrid scoring. Ids evicted since they were returned are skipped.

        Args:
            ids: int64 ids, any shape. utility: same shape (or a scalar), in [0, 1].

        Returns:
            The number of (id, utility) pairs recorded.

        Raises:
            InvalidInputError: utility out of range or not finite, ids never issued.
        """
        with self._lock:
            return record_feedback(self._parts, ids, utility)

    def update(self, ids: Any, **columns: Any) -> int:
        """Write user columns (``PoolConfig.columns``) of stored entries by id.

        ``pool.update(ids, logits=new_logits, task=3)``: each keyword names a declared user
        column and gives ``[*ids.shape, *shape]`` values (a 0-d value is broadcast), checked
        as in ``add``. Padding ids (-1) and ids evicted since they were returned are skipped;
        where an id repeats, its last value is written. Columns not named keep their values.

        Args:
            ids: int ids, any shape (e.g. ``sample(n)``'s or ``retrieve(...).ids``).

        Returns:
            The number of ids written (repeats counted).

        Raises:
            InvalidInputError: no column given, a name that is not a user column, values of a
                dtype that does not cast, non-finite floats, or ids never issued (pool unchanged).
            DimensionMismatchError: values not shaped ``[*ids.shape, *shape]``.
        """
        with self._lock:
            return update_columns(self._parts, ids, columns)

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
        options = {  # RETRIEVE_DEFAULTS' names (a literal: no locals() copy per call)
            "k": k,
            "mode": mode,
            "class_hint": class_hint,
            "classes": classes,
            "category": category,
            "utility_threshold": utility_threshold,
            "utility_prior": utility_prior,
            "fetch_k": fetch_k,
            "mmr_lambda": mmr_lambda,
            "min_dispersion": min_dispersion,
            "where": where,
            "chroma_metric": chroma_metric,
        }
        with self._lock:
            parts = self._parts
            out = walk(parts, queries, options, with_dreams=with_dreams, sync_free=self.sync_free)
            b = out.ids.shape[0]
            parts.counters["queries"] += b
            if self.metrics is not None:
                if parts.device.type == "cuda":  # latency, not launch time; only pools with metrics wait here
                    torch.cuda.synchronize(self.device)
                self.metrics.observe_retrieve(time.perf_counter() - start, b)
            return out

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
        unknown = sorted(set(options) - set(_PREPARED_OPTIONS))
        if unknown:
            raise InvalidInputError(unknown[0], f"one of {', '.join(_PREPARED_OPTIONS)}", repr(options[unknown[0]]))
        with self._lock:
            example = v.as_tensor(queries, "queries", device=self.device)
            return PreparedRetrieval(
                self,
                example,
                {**RETRIEVE_DEFAULTS, **options, "k": k, "mode": mode},
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
            self._parts.fault.raise_code(int(self._parts.fault.code))

    @property
    def sync_free(self) -> bool:
        """Whether value checks are deferred (``config.checks``, ``auto``: on CUDA): no host reads."""
        parts = self._parts
        policy = parts.config.checks
        return policy is CheckPolicy.DEFERRED or (policy is CheckPolicy.AUTO and parts.device.type == "cuda")

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
            return self._parts.ids.gather(("dreams",), *self._parts.ids.find(ids))["dreams"]

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
            lookup = self._parts.ids
            names = lookup.columns(columns)
            safe, found, every = lookup.find(ids)
            out = Columns({name: as_returned(t) for name, t in lookup.gather(names, safe, found, every).items()})
            out["found"] = found
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
            pick = host_to_device(pick, live.device)  # drawn on the host (seeded); no wait on CUDA
            ids = live[pick]
            # their slots too: dreams(ids) and metadata(ids) of this batch need no lookup
            self._parts.ids.remember(
                ids, (slots[pick], torch.ones(ids.shape, dtype=torch.bool, device=ids.device), True)
            )
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
            slots = self._parts.ids.slots(ids)
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
        kept = [*self.bank.order_cache(), self._parts.fault.code]
        encoder: Any = self.encoder
        if isinstance(encoder, torch.nn.Module):
            return kept + [*encoder.parameters(), *encoder.buffers()]
        return kept + [t for t in vars(encoder).values() if isinstance(t, torch.Tensor)]

    # -------------------------------------------------------------- encoder
    def fit_encoder(
        self,
        *,
        steps: int = 200,
        batch_size: int = 256,
        lr: float = 2e-3,
        seed: int = 0,
        colour_jitter: float = 0.05,
        progress: bool = False,
    ) -> FitReport:
        """Train the pool's encoder on its entries, then re-embed the bank: all or nothing.

        Supervised contrastive training on two augmented views of each sampled
        entry (class labels as positives where present, utility feedback as anchor
        weights; :mod:`dreampool_gpu.fitting`). A copy of the encoder is trained;
        only when training and re-embedding succeed are the new encoder and the
        embeddings swapped in, the index rebuilt and the query cache cleared.
        A diverged loss, Ctrl-C or an out-of-memory error leaves the pool exactly
        as it was. The install (encoder, embeddings, index, query cache) is the last step
        and one that Ctrl-C cannot split: it is undone whole, or complete with nothing
        left to raise (a Ctrl-C landing in the instant after it is passed on, the pool
        consistent). The pool's lock is held throughout (other threads wait).
        Deterministic on CPU for a ``seed``.

        Keyword Args:
            steps: optimizer steps (>= 1). batch_size: entries per step (>= 2).
            lr: AdamW learning rate (> 0). seed: sampling and augmentation seed.
            colour_jitter: half-width of the per-channel colour gain of the views, in [0, 1]:
                what colour change the embedding learns to ignore. Raise it (e.g. 0.25)
                when colour is a nuisance for your classes and the pool has no labels to say so.
            progress: show a tqdm bar with the loss.

        Returns:
            :class:`~dreampool_gpu.fitting.FitReport` (loss per step, seconds, entries).

        Raises:
            InvalidConfigurationError: the encoder is not trainable (the ``features`` encoder).
            InvalidInputError: bad arguments, or fewer than 2 entries in the pool.
            EncoderFitError: the loss became NaN or infinite.
        """
        with self._lock:
            return self._parts.encoders.fit(
                steps=steps, batch_size=batch_size, lr=lr, seed=seed, colour_jitter=colour_jitter, progress=progress
            )

    def reembed(self) -> None:
        """Recompute every entry's embedding with the current encoder; rebuild the index.

        Call it after changing a user encoder's weights outside :meth:`fit_encoder`
        (embedding retrievals raise :class:`~dreampool_gpu.errors.IndexStaleError`
        until then). All or nothing, like :meth:`fit_encoder`.
        """
        with self._lock:
            self._parts.encoders.reembed()

    # ---------------------------------------------------------- checkpoints
    def save(self, path: persist.PathArg) -> None:
        """Write a checkpoint directory at ``path``, atomically (see :mod:`dreampool_gpu.persist`).

        The pool's state is copied under its lock, then written while other
        threads keep using the pool. Readers of ``path`` see the previous
        checkpoint or this one, never a mix.

        Raises:
            InvalidInputError: ``path`` is not a path, or names something that is
                not a dreampool checkpoint (it is never overwritten).
            OSError: the filesystem failed; the previous checkpoint is intact.
        """
        checkpointing.save(self._parts, path)

    @classmethod
    def load(cls, path: persist.PathArg, *, device: str | torch.device | None = None, encoder: Any = None) -> DreamPool:
        """Build a pool from the checkpoint at ``path``, verifying every checksum.

        A sharded checkpoint (:meth:`ShardedDreamPool.save`) opens as one pool holding
        every shard's entries, ids unchanged (:func:`dreampool_gpu.distributed.load_merged`).

        Keyword Args:
            device: where the new pool lives (default: the saved configuration's
                device). A pool saved on CUDA loads on CPU and the reverse; the
                dreams keep their saved dtype.
            encoder: for a pool saved with a user's module (or custom encoder), a fresh
                instance of the same architecture; the saved weights are loaded into it.

        Raises:
            CheckpointCorruptError: a missing, truncated or altered file (named in
                the error), or a format version newer than this library.
            DeviceUnavailableError: ``device`` is CUDA and absent.
        """
        from dreampool_gpu.distributed.manifest import is_sharded_checkpoint
        from dreampool_gpu.distributed.shards import merged_pool  # never imports this module

        if is_sharded_checkpoint(path):  # a ShardedDreamPool's checkpoint, as one pool
            return merged_pool(path, device=device, pool_cls=cls)
        return checkpointing.load(cls, path, device=device, encoder=encoder)

    def state_dict(self) -> dict[str, Any]:
        """The pool's state as a dict of CPU tensors, bytes and plain values.

        Round-trips through ``torch.save`` / ``torch.load(weights_only=True)``, so
        the pool can ride in a training checkpoint.
        """
        return checkpointing.state_dict(self._parts)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Replace this pool's entries, counters and index with ``state_dict``'s.

        The pool keeps its own configuration; fields that shape the stored data
        (dream shape, embedding, encoder, metric, window) must match, and the
        capacity must hold the saved entries. Dreams are cast to this pool's dtype.

        Raises:
            InvalidInputError: not a state dict of this format, or a malformed part.
            InvalidConfigurationError: the state does not fit this pool's configuration.
            (On error the pool is unchanged.)
        """
        checkpointing.load_state_dict(self._parts, state_dict)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickling (``copy.deepcopy``, ``torch.save(pool)``, a spawned worker) goes through :meth:`state_dict`.

        The copy is a new, independent pool of the same configuration, device, entries, ids,
        counters and eviction state (``copy.copy`` too: nothing is shared). A user's encoder or
        eviction policy is pickled with it; ``metrics`` is not carried.
        """
        return checkpointing.reduce(self)

    def __copy__(self) -> DreamPool:
        """``copy.copy``: an independent pool, as ``copy.deepcopy`` gives (a pool shares no part)."""
        return copy.deepcopy(self)

    # --------------------------------------------------------------- device
    def to(self, device: str | torch.device) -> DreamPool:
        """Move the pool to ``device`` in place and return it (as ``nn.Module.to`` does).

        The bank, encoder and window spectrum move; the search index is rebuilt on
        the new device from the bank; the query cache is emptied (its embeddings were
        on the old device). Entries, ids, counters and the dreams' dtype are kept
        (``dream_dtype="auto"`` is pinned to the stored dtype). On error the pool is
        unchanged.

        Raises:
            DeviceUnavailableError: ``device`` is CUDA and absent.
            InvalidConfigurationError: ``device`` names no device, or the budget
                (``"N%"`` of the new device) cannot hold the bank.
            InsufficientMemoryError: the bank does not fit the new device's free memory.
        """
        with self._lock:
            self._parts = device_move.moved(self._parts, device)
            return self
