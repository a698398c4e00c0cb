"""Pool configuration: a frozen, validated dataclass and YAML presets.

Every field has the default of docs/spec.md §Defaults. An out-of-range value raises
:class:`~dreampool_gpu.errors.InvalidConfigurationError` naming the field and
the allowed range.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from dreampool_gpu import _validation as v
from dreampool_gpu.errors import InvalidConfigurationError, InvalidInputError
from dreampool_gpu.user_columns import UserColumns, parse_columns


class Metric(str, Enum):
    """Similarity of embeddings: cosine (inner product of unit vectors) or euclidean."""

    COSINE = "cosine"
    EUCLIDEAN = "euclidean"


class RetrievalMode(str, Enum):
    """Retrieval methods of docs/spec.md §Retrieval; ``hard`` is an alias of ``similar``."""

    SIMILAR = "similar"
    CLASS = "class"
    BALANCED = "balanced"
    UTILITY = "utility"
    DIVERSE = "diverse"
    SOFT = "soft"
    HYBRID = "hybrid"
    CATEGORY = "category"
    NEAREST = "nearest"

    @classmethod
    def parse(cls, value: str | RetrievalMode, name: str = "mode") -> RetrievalMode:
        """Parse a mode name (``"hard"`` means ``"similar"``)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str) and value == "hard":  # type first: arrays compare elementwise
            return cls.SIMILAR
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(m.value for m in cls) + ", hard"
            raise InvalidInputError(name, f"one of {choices}", repr(value)) from None


class EvictionPolicy(str, Enum):
    """Which entries leave first when the pool needs room."""

    FIFO = "fifo"
    LOWEST_COHERENCE = "lowest_coherence"
    LOWEST_UTILITY = "lowest_utility"
    LEAST_USED = "least_used"
    RESERVOIR = "reservoir"
    CLASS_BALANCED = "class_balanced"


class Engine(str, Enum):
    """The k-NN engine (see :func:`dreampool_gpu.search.make_index`); plain strings accepted."""

    AUTO = "auto"
    TORCH = "torch"
    FAISS_FLAT = "faiss-flat"
    FAISS_IVF = "faiss-ivf"


class DreamDtype(str, Enum):
    """Storage dtype of the dreams column; ``auto``: float16 on CUDA, float32 on CPU."""

    AUTO = "auto"
    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"


class CheckPolicy(str, Enum):
    """When value checks of ``add`` and ``retrieve`` are read (docs/api.md, "Checks and host synchronisation").

    ``immediate``: on the host, raising in the call. ``deferred``: recorded on the device
    (no host synchronisation); a failed call returns empty results, changes nothing, and
    its error is raised at the pool's next host read. ``auto``: deferred on CUDA,
    immediate on CPU (where reading a value costs no device wait).
    """

    AUTO = "auto"
    IMMEDIATE = "immediate"
    DEFERRED = "deferred"


class Window(str, Enum):
    """Window applied along rows and cols before the FFT; plain strings accepted."""

    HANN = "hann"
    HAMMING = "hamming"
    NONE = "none"

    @classmethod
    def _missing_(cls, value: object) -> Window:
        if isinstance(value, str):
            for member in cls:
                if member.value == value.strip().lower():
                    return member
        raise InvalidInputError("window", f"one of {[m.value for m in cls]}", repr(value))


DREAM_DTYPES = tuple(d.value for d in DreamDtype)
ENGINES = tuple(e.value for e in Engine)
ENCODERS = ("features", "learned")
MAX_SEED = (1 << 64) - 1  # torch.Generator.manual_seed takes an unsigned 64-bit seed
FEATURES = ("lazy", "eager")
MAX_CLASSES = 1 << 16  # the feature encoder's class block is num_classes + 1 wide


def _parse_enum(enum: type[Enum], value: Any, name: str) -> Any:
    if isinstance(value, enum):
        return value
    try:
        return enum(value)
    except ValueError:
        choices = ", ".join(str(m.value) for m in enum)
        raise InvalidConfigurationError(name, value, f"one of {choices}") from None


def _check_unit(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
        raise InvalidConfigurationError(name, value, "a number in [0, 1]")


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    if not v.int_in_range(value, low, high):
        raise InvalidConfigurationError(name, value, v.int_range_text(low, high))


def parse_memory_budget(value: Any) -> tuple[float | None, float | None]:
    """Split a ``memory_budget_mb`` value into ``(MiB, fraction of the device)``; one is None.

    None gives ``(None, None)`` (unlimited); a positive finite number is MiB; ``"N%"``
    with 0 < N <= 100 is the fraction N/100 of the device's memory.

    Raises:
        InvalidConfigurationError: anything else.
    """
    if value is None:
        return None, None
    if isinstance(value, str):
        text = value.strip()
        try:
            share = float(text.removesuffix("%")) / 100.0 if text.endswith("%") else math.nan
        except ValueError:
            share = math.nan
        if 0.0 < share <= 1.0:
            return None, share
    elif not isinstance(value, bool) and isinstance(value, (int, float)) and 0 < value < math.inf:
        return float(value), None
    raise InvalidConfigurationError(
        "memory_budget_mb", value, 'None, a positive number of MiB, or "N%" of the device (0 < N <= 100)'
    )


@dataclass(frozen=True)
class PoolConfig:
    """Everything a :class:`~dreampool_gpu.pool.DreamPool` needs to know up front.

    Attributes:
        dream_shape: ``(rows, cols, layers)`` of every stored dream.
        capacity: maximum number of entries (the original's ``max_size``); None derives
            it from ``memory_budget_mb`` (see :func:`dreampool_gpu.budget.fit_capacity`).
        coherence_threshold: dreams with coherence below it are rejected.
        retrieval_limit: default k of :meth:`DreamPool.retrieve`.
        retrieval_mode: default method; ``hard`` (= similar), any method name.
        embedding_dim: D of the embedding; must not be 3 (3-wide queries are chroma).
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        metric: ``cosine`` or ``euclidean`` for embedding k-NN.
        dream_dtype: storage dtype of dreams; ``auto`` = float16 on CUDA, float32 on CPU.
        eviction_policy: which entries leave first at capacity; ``reservoir`` and
            ``class_balanced`` also decide which newcomers a full pool admits (docs/spec.md §Adding).
        eviction_seed: seed of the pool's own generator, drawn from by the ``reservoir`` and
            ``class_balanced`` policies (its state rides in ``state_dict`` and checkpoints).
        query_cache_size: LRU size of the query-embedding cache (0 disables it).
        window: spectral window (``hann``, ``hamming``, ``none``).
        include_spectral / include_class / include_utility: encoder feature parts.
        encoder_seed: seed of the encoder's fixed projection (and the learned encoder's initial weights).
        encoder: ``features`` (fixed features, standardised on the bank) or ``learned``
            (a small CNN trained by :meth:`DreamPool.fit_encoder`); see docs/spec.md "Encoders".
        num_classes: class labels are 0..num_classes-1 (-1 = none).
        alpha, beta, gamma, delta: hybrid weights (similarity, utility, class, duplicate penalty).
        mmr_lambda: MMR trade-off; 1 = pure relevance, 0 = pure diversity.
        fetch_factor: re-ranking methods work on ``fetch_factor * k`` candidates.
        search_chunk_mb: bound, in MiB, on the temporaries of exact search (score chunks and the
            candidate buffer of a query block) and on the ``[B, n]`` scores of the chroma methods.
        rerank_chunk_mb: bound on the re-ranking temporaries (gathered ``[b, fetch_k, D]`` candidate
            vectors and MMR state), in MiB.
        engine: k-NN engine: ``auto`` (measured choice per call, see ``search/auto.py``),
            ``torch`` (exact matmul + topk), ``faiss-flat`` (exact FAISS brute force) or
            ``faiss-ivf`` (IVF-PQ candidates re-scored exactly, above ``ann_threshold``).
        ann_threshold: pool size at which the IVF index is trained and takes over (>= 1024).
        ivf_nlist: IVF coarse centroids; 0 = power of two nearest 2*sqrt(size) at build.
        ivf_nprobe: IVF lists visited per query.
        ivf_refine_factor: IVF candidates re-scored exactly per query, as a multiple of k.
        churn_rebuild_fraction: evictions since the last refresh, as a fraction of the
            pool size, after which the IVF index is refreshed (docs/spec.md §Memory budget: 0.1).
        memory_budget_mb: None (unlimited), MiB (a positive number) or a fraction of the
            device's memory as ``"N%"`` (GPU memory on CUDA, host RAM on CPU). The
            preallocated bank is sized to fit it and eviction keeps usage under it.
        budget_threshold: share of the budget the pool may use (docs/spec.md §Memory budget: 0.9), in (0, 1].
        strict_budget: raise CapacityExceededError instead of dropping dreams when an
            accepted batch is larger than the whole pool (capacity or budget).
        checks: when value checks are read: ``auto`` (deferred on CUDA, immediate on CPU),
            ``immediate`` or ``deferred`` (see :class:`CheckPolicy`).
        features: when an entry's chroma, spectral features, hue category and embedding are
            computed: ``lazy`` (by the first call that reads them, for every waiting entry in one
            batch; a replay-only loop never computes them) or ``eager`` (by ``add``). Pools whose
            engine keeps its own vectors (IVF-PQ at this capacity) compute them eagerly.
        columns: user columns stored with every entry, ``{name: (shape, dtype)}``, e.g.
            ``{"logits": ((10,), "float32"), "task": ((), "int64")}`` (dtypes: float32, float16,
            bfloat16, int64, int32, bool); kept as a :class:`~dreampool_gpu.user_columns.UserColumns`
            (see :mod:`dreampool_gpu.user_columns`). Empty by default.
    """

    dream_shape: tuple[int, int, int] = (16, 16, 4)
    capacity: int | None = 1000
    coherence_threshold: float = 0.75
    retrieval_limit: int = 3
    retrieval_mode: str = "hybrid"
    embedding_dim: int = 64
    device: str = "auto"
    metric: Metric = Metric.COSINE
    dream_dtype: DreamDtype = DreamDtype.AUTO
    eviction_policy: EvictionPolicy = EvictionPolicy.FIFO
    eviction_seed: int = 0
    query_cache_size: int = 128
    window: Window = Window.HANN
    include_spectral: bool = True
    include_class: bool = True
    include_utility: bool = True
    encoder_seed: int = 0
    encoder: str = "features"
    num_classes: int = 10
    alpha: float = 0.65
    beta: float = 0.20
    gamma: float = 0.10
    delta: float = 0.05
    mmr_lambda: float = 0.7
    fetch_factor: int = 4
    search_chunk_mb: float = 64.0
    rerank_chunk_mb: float = 64.0
    engine: Engine = Engine.AUTO
    ann_threshold: int = 20_000
    ivf_nlist: int = 0
    ivf_nprobe: int = 16
    ivf_refine_factor: int = 16
    churn_rebuild_fraction: float = 0.1
    memory_budget_mb: float | str | None = None
    budget_threshold: float = 0.9
    strict_budget: bool = False
    checks: CheckPolicy = CheckPolicy.AUTO
    features: str = "lazy"
    columns: UserColumns = UserColumns()  # immutable: one shared empty declaration

    def __post_init__(self) -> None:
        shape = tuple(self.dream_shape) if isinstance(self.dream_shape, (list, tuple)) else None
        if (
            shape is None
            or len(shape) != 3
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape)
        ):
            raise InvalidConfigurationError("dream_shape", self.dream_shape, "three positive ints (rows, cols, layers)")
        object.__setattr__(self, "dream_shape", shape)
        parse_memory_budget(self.memory_budget_mb)
        if self.capacity is None and self.memory_budget_mb is None:
            raise InvalidConfigurationError("capacity", None, "an int >= 1 (None only with memory_budget_mb set)")
        if self.capacity is not None:
            _check_int("capacity", self.capacity, 1)
        _check_unit("coherence_threshold", self.coherence_threshold)
        _check_int("retrieval_limit", self.retrieval_limit, 0)
        try:
            RetrievalMode.parse(self.retrieval_mode, "retrieval_mode")
        except InvalidInputError as exc:
            raise InvalidConfigurationError("retrieval_mode", self.retrieval_mode, exc.expected) from None
        _check_int("embedding_dim", self.embedding_dim, 1)
        if self.embedding_dim == 3:
            raise InvalidConfigurationError(
                "embedding_dim", 3, "an int >= 1 other than 3 (3-wide queries are chroma signatures)"
            )
        if not isinstance(self.device, str) or not (
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")
        ):
            raise InvalidConfigurationError("device", self.device, '"auto", "cpu", "cuda" or "cuda:N"')
        object.__setattr__(self, "metric", _parse_enum(Metric, self.metric, "metric"))
        if not isinstance(self.dream_dtype, str) or self.dream_dtype not in DREAM_DTYPES:
            raise InvalidConfigurationError("dream_dtype", self.dream_dtype, f"one of {', '.join(DREAM_DTYPES)}")
        object.__setattr__(self, "dream_dtype", DreamDtype(self.dream_dtype))
        object.__setattr__(
            self, "eviction_policy", _parse_enum(EvictionPolicy, self.eviction_policy, "eviction_policy")
        )
        _check_int("eviction_seed", self.eviction_seed, 0, MAX_SEED)
        _check_int("query_cache_size", self.query_cache_size, 0)
        if not isinstance(self.window, str) or self.window not in ("hann", "hamming", "none"):
            raise InvalidConfigurationError("window", self.window, "one of hann, hamming, none")
        object.__setattr__(self, "window", Window(self.window))
        for name in ("include_spectral", "include_class", "include_utility"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidConfigurationError(name, getattr(self, name), "true or false")
        _check_int("encoder_seed", self.encoder_seed, 0)
        if not isinstance(self.encoder, str) or self.encoder not in ENCODERS:
            raise InvalidConfigurationError("encoder", self.encoder, f"one of {', '.join(ENCODERS)}")
        if not isinstance(self.features, str) or self.features not in FEATURES:
            raise InvalidConfigurationError("features", self.features, f"one of {', '.join(FEATURES)}")
        _check_int("num_classes", self.num_classes, 1)
        if self.num_classes > MAX_CLASSES:
            raise InvalidConfigurationError("num_classes", self.num_classes, f"an int in [1, {MAX_CLASSES}]")
        for name in ("alpha", "beta", "gamma", "delta", "mmr_lambda"):
            _check_unit(name, getattr(self, name))
        _check_int("fetch_factor", self.fetch_factor, 1)
        for name in ("search_chunk_mb", "rerank_chunk_mb"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
                raise InvalidConfigurationError(name, value, "a positive number of MiB")
        if not isinstance(self.engine, str) or self.engine not in ENGINES:
            raise InvalidConfigurationError("engine", self.engine, f"one of {', '.join(ENGINES)}")
        object.__setattr__(self, "engine", Engine(self.engine))
        _check_int("ann_threshold", self.ann_threshold, 1024)
        _check_int("ivf_nlist", self.ivf_nlist, 0)
        _check_int("ivf_nprobe", self.ivf_nprobe, 1)
        _check_int("ivf_refine_factor", self.ivf_refine_factor, 1)
        churn = self.churn_rebuild_fraction
        if isinstance(churn, bool) or not isinstance(churn, (int, float)) or not 0.0 < churn <= 1.0:
            raise InvalidConfigurationError("churn_rebuild_fraction", churn, "a number in (0, 1]")
        share = self.budget_threshold
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 < share <= 1.0:
            raise InvalidConfigurationError("budget_threshold", share, "a number in (0, 1]")
        if not isinstance(self.strict_budget, bool):
            raise InvalidConfigurationError("strict_budget", self.strict_budget, "true or false")
        object.__setattr__(self, "checks", _parse_enum(CheckPolicy, self.checks, "checks"))
        object.__setattr__(self, "columns", parse_columns(self.columns))

    @property
    def default_mode(self) -> RetrievalMode:
        """The parsed :attr:`retrieval_mode`."""
        return RetrievalMode.parse(self.retrieval_mode, "retrieval_mode")

    def replace(self, **changes: Any) -> PoolConfig:
        """Return a copy with ``changes`` applied (validated again).

        Raises:
            InvalidConfigurationError: an unknown field, or a value out of range.
        """
        _refuse_unknown(changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-safe dict of every field."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, UserColumns):
                out[f.name] = value.to_dict()
                continue
            out[f.name] = (
                value.value if isinstance(value, Enum) else (list(value) if isinstance(value, tuple) else value)
            )
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PoolConfig:
        """Build from a dict; unknown keys raise InvalidConfigurationError."""
        if not isinstance(data, dict):
            raise InvalidConfigurationError("<config>", type(data).__name__, "a mapping of field: value")
        _refuse_unknown(data)
        values = dict(data)
        if "dream_shape" in values and isinstance(values["dream_shape"], list):
            values["dream_shape"] = tuple(values["dream_shape"])
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path) -> PoolConfig:
        """Load a YAML preset such as ``configs/default.yaml``."""
        try:
            text = Path(path).read_text()
            data = yaml.safe_load(text)
        except (OSError, UnicodeDecodeError, TypeError) as exc:
            raise InvalidConfigurationError("<file>", repr(path), "a readable UTF-8 YAML file") from exc
        except (yaml.YAMLError, RecursionError, ValueError) as exc:  # deep nesting; ints over 4300 digits
            raise InvalidConfigurationError("<file>", str(path), f"valid YAML ({exc})") from exc
        return cls.from_dict(data or {})


def _refuse_unknown(values: dict[Any, Any]) -> None:
    """Raise for the first key of ``values`` that is not a field, with the nearest field name as a hint.

    Raises:
        InvalidConfigurationError: naming the unknown key, and the field it is probably a typo of.
    """
    known = sorted(f.name for f in dataclasses.fields(PoolConfig))
    unknown = sorted(set(values) - set(known), key=repr)  # keys may be of any type
    if unknown:
        name = unknown[0]
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise InvalidConfigurationError(name, values[name], f"a known field ({hint}fields: {', '.join(known)})")


def _checked_init(init: Any) -> Any:
    """``PoolConfig.__init__`` refusing unknown keywords with :class:`InvalidConfigurationError`, not TypeError."""

    @functools.wraps(init)
    def __init__(self: PoolConfig, *args: Any, **kwargs: Any) -> None:
        _refuse_unknown(kwargs)
        init(self, *args, **kwargs)

    return __init__


setattr(PoolConfig, "__init__", _checked_init(PoolConfig.__init__))  # noqa: B010 - mypy refuses assigning a method
