"""The public API, pinned: ``dreampool_gpu.__all__`` and the parameters of the public methods.

A change here is a change of the public API: make it on purpose, with a changelog line.
Parameters are pinned by name, kind (``*`` keyword-only, ``**`` var-keyword) and default;
annotations are free to become more precise.
"""

from __future__ import annotations

import enum
import inspect

import pytest
import torch

import dreampool_gpu
from dreampool_gpu import DreamPool, PoolConfig, PoolStats, ShardedDreamPool

ALL = [
    "DreamPool",
    "ShardedDreamPool",
    "Retrieval",
    "PreparedRetrieval",
    "PoolStats",
    "PoolConfig",
    "HybridWeights",
    "Encoder",
    "FeatureEncoder",
    "LearnedEncoder",
    "FitReport",
    "mmr",
    "score_dreams",
    "spectral_features",
    "resolve_device",
    "forbid_host_sync",
    "DreamPoolError",
    "__version__",
]

SIGNATURES = {
    "DreamPool": {
        "__init__": "config=None, *encoder=None, *eviction=None",
        "add": (
            "dreams, *coherence=None, *energy=None, *violation=None, *class_label=None, *force=False, "
            "*columns=None, *class_labels=None"
        ),
        "check": "",
        "diversity": "ids",
        "dreams": "ids",
        "enable_metrics": "*registry=None",
        "feedback": "ids, utility",
        "fit_encoder": "*steps=200, *batch_size=256, *lr=0.002, *seed=0, *colour_jitter=0.05, *progress=False",
        "load": "path, *device=None, *encoder=None",
        "load_state_dict": "state_dict",
        "metadata": "ids, *columns=None",
        "prepare_retrieve": "queries, *k=None, *mode=None, *with_dreams=False, *graph=True, **options",
        "reembed": "",
        "retrieve": (
            "queries, *k=None, *mode=None, *class_hint=None, *classes=None, *category=None, "
            "*utility_threshold=0.0, *utility_prior=None, *fetch_k=None, *mmr_lambda=None, "
            "*min_dispersion=0.0, *with_dreams=False, *where=None, *chroma_metric='cosine'"
        ),
        "sample": "n, *where=None, *replace=True, *generator=None",
        "save": "path",
        "state_dict": "",
        "stats": "",
        "to": "device",
        "update": "ids, **columns",
    },
    "ShardedDreamPool": {
        "__init__": "config=None, *group=None, *encoder=None, *timeout=None",
        "add": (
            "dreams, *coherence=None, *energy=None, *violation=None, *class_label=None, *force=False, "
            "*route='local', *columns=None, *class_labels=None"
        ),
        "diversity": "ids",
        "dreams": "ids",
        "feedback": "ids, utility",
        "fit_encoder": "*steps=200, *batch_size=256, *lr=0.002, *seed=0, *colour_jitter=0.05, *progress=False",
        "load": "path, *group=None, *device=None, *timeout=None",
        "load_state_dict": "state_dict",
        "metadata": "ids",
        "refit_statistics": "*fitted_on=None",
        "retrieve": (
            "queries, *k=None, *mode=None, *class_hint=None, *classes=None, *category=None, "
            "*utility_threshold=0.0, *utility_prior=None, *fetch_k=None, *mmr_lambda=None, "
            "*min_dispersion=0.0, *with_dreams=False, *where=None, *chroma_metric='cosine'"
        ),
        "sample": "n, *where=None, *replace=True, *generator=None",
        "save": "path",
        "state_dict": "",
        "stats": "",
        "to": "device",
        "update": "ids, **columns",
    },
    "PoolConfig": {
        "__init__": (
            "dream_shape=(16, 16, 4), capacity=1000, coherence_threshold=0.75, "
            "retrieval_limit=3, retrieval_mode='hybrid', embedding_dim=64, device='auto', "
            "metric='cosine', dream_dtype='auto', eviction_policy='fifo', eviction_seed=0, "
            "query_cache_size=128, window='hann', include_spectral=True, include_class=True, "
            "include_utility=True, encoder_seed=0, encoder='features', num_classes=10, "
            "alpha=0.65, beta=0.2, gamma=0.1, delta=0.05, mmr_lambda=0.7, fetch_factor=4, "
            "search_chunk_mb=64.0, rerank_chunk_mb=64.0, engine='auto', ann_threshold=20000, "
            "ivf_nlist=0, ivf_nprobe=16, ivf_refine_factor=16, churn_rebuild_fraction=0.1, "
            "memory_budget_mb=None, budget_threshold=0.9, strict_budget=False, checks='auto', features='lazy', "
            "columns={}"
        ),
        "from_dict": "data",
        "from_file": "path",
        "replace": "**changes",
        "to_dict": "",
    },
    "PoolStats": {
        "__init__": (
            "size, capacity, device, engine, next_id, counters, acceptance_rate, mean_coherence, mean_energy, "
            "mean_violation, bytes_by_column, bank_bytes, index_bytes, memory, search, cache"
        ),
        "to_dict": "",
    },
}
_KINDS = {"POSITIONAL_OR_KEYWORD": "", "KEYWORD_ONLY": "*", "VAR_KEYWORD": "**", "VAR_POSITIONAL": "*args "}


def _default(value: object) -> str:
    if value is inspect.Parameter.empty:
        return ""
    return "=" + repr(value.value if isinstance(value, enum.Enum) else value)


def _parameters(function: object) -> str:
    params = inspect.signature(function).parameters.values()
    shown = (_KINDS[p.kind.name] + p.name + _default(p.default) for p in params if p.name not in ("self", "cls"))
    return ", ".join(shown)


def _public_methods(cls: type) -> dict[str, object]:
    out: dict[str, object] = {}
    for name, obj in [item for klass in reversed(cls.__mro__[:-1]) for item in vars(klass).items()]:
        if name.startswith("_") and name != "__init__":
            continue
        function = obj.__func__ if isinstance(obj, (staticmethod, classmethod)) else obj
        if callable(function):
            out[name] = function
    return out


def test_all_is_pinned():
    assert dreampool_gpu.__all__ == ALL
    for name in ALL:
        assert hasattr(dreampool_gpu, name), name


@pytest.mark.parametrize("cls", [DreamPool, ShardedDreamPool, PoolConfig, PoolStats], ids=lambda c: c.__name__)
def test_public_methods_are_pinned(cls):
    methods = _public_methods(cls)
    assert sorted(methods) == sorted(SIGNATURES[cls.__name__])
    for name, function in methods.items():
        assert _parameters(function) == SIGNATURES[cls.__name__][name], f"{cls.__name__}.{name}"


def test_pool_capacity_is_the_resolved_capacity():
    pool = DreamPool(PoolConfig(dream_shape=(2, 2, 1), capacity=None, memory_budget_mb=1, device="cpu"))
    assert isinstance(pool.capacity, int) and pool.capacity > 0
    assert pool.capacity == pool.bank.capacity == pool.stats()["capacity"]


def test_pool_is_one_class_built_from_its_parts():
    """No mixins: DreamPool's attributes are its parts', and a device move rebuilds the parts around the same bank."""
    assert DreamPool.__bases__ == (object,)
    pool = DreamPool(PoolConfig(dream_shape=(2, 2, 1), capacity=8, device="cpu", engine="torch"))
    parts = pool.parts
    assert pool.bank is parts.bank and pool.index is parts.index and pool.encoder is parts.encoders.encoder
    assert pool.eviction is parts.admitter.eviction and pool.cache is parts.encoders.cache
    assert parts.encoders.parts is parts and parts.admitter.parts is parts
    pool.device = torch.device("cpu", 0)  # the move path on CPU: the pool believes it is elsewhere
    assert pool.to("cpu") is pool and pool.parts is not parts and pool.bank is parts.bank
    assert pool.parts.lock is parts.lock and pool.eviction is parts.eviction
