"""Bad input, fuzzed, shared by the *_fuzz.py tests: strategies, pool snapshots and checks.

Every public entry point returns a correct result or raises a DreamPoolError.

Strategies draw NaN, inf and out-of-range values, wrong dtypes, shapes and
devices (``meta`` tensors everywhere; CUDA tensors where present), non-contiguous
and zero-size tensors, numpy arrays and lists, negative or huge counts, unknown
modes, classes and ids, malformed state dicts, damaged checkpoint files and
malformed config files. On error the pool's state is compared with a snapshot
taken before the call: every bank column bit for bit (NaN-aware), size,
next_id, extent, revision, counters and the query cache. On success the result
is checked against the properties the entry point promises.

Example counts come from the hypothesis profile (tests/conftest.py): ``ci``
(1,000 per entry point, the default) or ``nightly`` (10,000), chosen by
``HYPOTHESIS_PROFILE``. ``pytest --hypothesis-show-statistics`` prints them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import tempfile

import numpy as np
import torch
import yaml
from hypothesis import event
from hypothesis import strategies as st

from dreampool_gpu import DreamPool, PoolConfig
from dreampool_gpu.config import RetrievalMode
from dreampool_gpu.devices import cuda_available
from dreampool_gpu.errors import DreamPoolError
from dreampool_gpu.persist import MANIFEST

SHAPE = (2, 3, 2)


CAPACITY = 12


DIM = 8


CHROMA_MODES = {"similar", "hard", "class", "balanced", "utility", "diverse"}


ORDERED_MODES = {"similar", "hard", "class", "utility", "category", "nearest"}  # best first, not MMR


FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


OTHERS = [torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool, torch.complex64]


SPECIALS = [math.nan, math.inf, -math.inf, -1.0, 2.0, 1e30, -1e30, -0.0, 1e-45, 0.5]


DEVICES = ["cpu", "meta"] + (["cuda"] if cuda_available() else [])


# ------------------------------------------------------------------ the pool
def config():
    return PoolConfig(
        dream_shape=SHAPE,
        capacity=CAPACITY,
        device="cpu",
        coherence_threshold=0.3,
        embedding_dim=DIM,
        query_cache_size=4,
        eviction_policy="lowest_utility",
    )


@functools.cache
def template():
    """State dict of a small full pool: evictions done, feedback given, a free slot or two."""
    pool = DreamPool(config())
    g = torch.Generator().manual_seed(0)
    pool.add(
        torch.rand(16, *SHAPE, 3, generator=g),
        coherence=torch.rand(16, generator=g),
        class_label=torch.randint(-1, 10, (16,), generator=g),
    )
    hits = pool.retrieve(torch.rand(3, 3, generator=g), k=4, mode="hybrid")
    pool.feedback(hits.ids, torch.rand(3, 4, generator=g))
    return pool.state_dict()


@functools.cache
def _shared_pool():
    return DreamPool(config())


def fresh_pool():
    """The template pool, reset in place (examples must not depend on each other)."""
    pool = _shared_pool()
    pool.load_state_dict(template())
    return pool


def bits(t):
    """Integer view of a tensor: equality is bit for bit, NaN equal to itself."""
    width = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.view(width) if t.is_floating_point() else t


def pool_state(pool):
    bank = pool.bank
    return {
        "columns": {name: col.clone() for name, col in bank.columns.items()},
        "scalars": (bank.size, bank.next_id, bank.extent, bank.revision),
        "counters": dict(pool.counters),
        "cache": (len(pool.cache), pool.cache.hits, pool.cache.misses),
        "config": pool.config,
    }


def assert_unchanged(before, after):
    assert before["scalars"] == after["scalars"]
    assert before["counters"] == after["counters"]
    assert before["cache"] == after["cache"]
    assert before["config"] == after["config"]
    for name, col in before["columns"].items():
        assert torch.equal(bits(col), bits(after["columns"][name])), name


def attempt(pool, call):
    """Run ``call()``; on error require a DreamPoolError and an untouched pool. Returns (result, error)."""
    before = pool_state(pool)
    try:
        result = call()
    except DreamPoolError as exc:
        event(f"rejected: {type(exc).__name__}")
        assert_unchanged(before, pool_state(pool))
        return None, exc
    event("accepted")
    return result, None


def check_bank(pool):
    """Invariants any reachable state satisfies."""
    ids = pool.bank.columns["ids"]
    live = ids[ids >= 0]
    assert live.numel() == pool.bank.size <= CAPACITY
    assert live.unique().numel() == live.numel()
    assert live.numel() == 0 or int(live.max()) < pool.bank.next_id
    assert bool((ids[pool.bank.extent :] == -1).all())


def live_ids(pool):
    ids = pool.bank.columns["ids"]
    return set(ids[ids >= 0].tolist())


# ------------------------------------------------------------ input strategies
def _flag(draw, percent):
    return draw(st.integers(0, 99)) < percent


@st.composite
def tensors(draw, shape, *, kind="float", low=0.0, high=1.0, clean=False):
    """A ``shape`` tensor of ``kind`` in [low, high], often broken in one or more ways unless ``clean``.

    Clean tensors still vary in float dtype, contiguity and container (tensor, numpy, list).
    """
    shape = list(shape)
    if not clean and _flag(draw, 20):  # wrong shape: drop, add or resize a dim
        how = draw(st.sampled_from(["drop", "add", "resize"]))
        if how == "drop" and shape:
            shape.pop(draw(st.integers(0, len(shape) - 1)))
        elif how == "add":
            shape.insert(draw(st.integers(0, len(shape))), draw(st.integers(0, 3)))
        elif shape:
            shape[draw(st.integers(0, len(shape) - 1))] = draw(st.integers(0, 5))
    if _flag(draw, 75):
        dtype = torch.float32 if kind == "float" else torch.int64
    elif clean:
        dtype = draw(st.sampled_from(FLOATS if kind == "float" else [torch.int32, torch.int8, torch.int16]))
    else:
        dtype = draw(st.sampled_from(FLOATS + OTHERS))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    noncontig = _flag(draw, 20) and len(shape) >= 1
    alloc = [*shape[:-1], shape[-1] * 2] if noncontig else shape
    base = torch.rand(alloc, generator=g, dtype=torch.float64) * (high - low) + low
    if kind == "int":
        base = base.floor()
    if not clean and _flag(draw, 25) and base.numel():  # special values at random places
        flat = base.view(-1)
        for _ in range(draw(st.integers(1, 3))):
            flat[draw(st.integers(0, flat.numel() - 1))] = draw(
                st.sampled_from(SPECIALS if kind == "float" else [-1e12, 1e12, -5.0, low - 1, high + 1])
            )
    if dtype.is_floating_point or dtype.is_complex:
        t = base.to(dtype)
    elif dtype == torch.bool:
        t = base.nan_to_num(0.0) > 0.5
    else:
        info = torch.iinfo(dtype)
        t = base.nan_to_num(0.0, posinf=info.max, neginf=info.min).clamp(info.min, info.max).to(dtype)
    if noncontig:
        t = t[..., ::2]
    container = draw(st.sampled_from(["tensor"] * 8 + ["numpy", "list"]))
    if container == "numpy" and t.dtype != torch.bfloat16:
        return t.numpy()
    if container == "list" and 0 < t.numel() <= 64:  # an empty list would lose the shape
        return t.tolist()
    device = draw(st.sampled_from(["cpu"] * 12 + [d for d in DEVICES[1:] if not clean or d != "meta"]))
    return t.to(device) if device != "meta" else torch.empty_like(t, device="meta")


junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
    st.binary(max_size=4),
    st.builds(list),
    st.builds(dict),
    st.builds(lambda: [[1], [2, 3]]),  # fresh objects: examples may mutate them
    st.just(object()),
    st.just(np.array(["a", "b"])),
    st.just(torch.tensor(0.5)),
    st.just(torch.tensor(3)),
)


@st.composite
def argument(draw, shape, *, kind="float", low=0.0, high=1.0, optional=False, clean=False):
    """An argument that is usually a ``shape`` tensor, sometimes a scalar, None or (unless clean) junk."""
    choice = draw(st.integers(0, 99))
    if optional and choice < 15:
        return None
    if choice < 22:
        return draw(st.floats(low, high) if kind == "float" else st.integers(int(low), int(high)))
    if choice < 30 and not clean:
        return draw(junk)
    return draw(tensors(shape, kind=kind, low=low, high=high, clean=clean))


counts = st.one_of(
    st.integers(0, 16),
    st.integers(0, 16),
    st.integers(-3, -1),
    st.sampled_from([10**12, 2**63, 2**70]),
    st.floats(allow_nan=True),
    st.booleans(),
    st.text(max_size=2),
    st.builds(torch.tensor, st.integers(-2, 20)),
    st.builds(torch.tensor, st.floats(0, 5)),
)


modes = st.one_of(
    st.sampled_from([m.value for m in RetrievalMode] + ["hard"]),
    st.sampled_from(list(RetrievalMode)),
    st.sampled_from(["", "HYBRID", "telepathy", " soft"]),
    junk,
)


def expected_width(k, mode, classes):
    return k * len(classes) if mode == "balanced" else k


# ------------------------------------------------------------------ state dict
def plain_tensor(t):
    return isinstance(t, torch.Tensor) and t.dim() > 0 and not t.is_meta and t.layout == torch.strided


def mutate_state_dict(draw, sd):
    """Apply 1-3 random damages to a (deep-copied) state dict."""
    for _ in range(draw(st.integers(1, 3))):
        part = draw(st.sampled_from(["top", "config", "state", "bank", "bank", "values"]))
        if part == "top":
            key = draw(st.sampled_from(["format", "format_version", "config", "state", "bank", "index", "extra"]))
            if _flag(draw, 30):
                sd.pop(key, None)
            else:
                sd[key] = draw(st.one_of(junk, st.integers(-2, 3)))
        elif part in ("config", "state") and isinstance(sd.get(part), dict):
            keys = sorted(sd[part]) + ["unknown"]
            key = draw(st.sampled_from(keys))
            if _flag(draw, 25):
                sd[part].pop(key, None)
            else:
                sd[part][key] = draw(st.one_of(junk, st.integers(-3, 40), st.floats(-1, 2), st.just([2, 3, 2])))
        elif part == "bank" and isinstance(sd.get("bank"), dict) and sd["bank"]:
            name = draw(st.sampled_from(sorted(sd["bank"])))
            t = sd["bank"][name]
            if not plain_tensor(t):  # already replaced by junk
                continue
            how = draw(st.sampled_from(["drop", "dtype", "rows", "junk", "noncontig", "meta", "sparse"]))
            if how == "drop":
                del sd["bank"][name]
            elif how == "dtype":
                sd["bank"][name] = t.to(draw(st.sampled_from(FLOATS + OTHERS)))
            elif how == "rows":
                sd["bank"][name] = t[: draw(st.integers(0, max(0, t.shape[0] - 1)))]
            elif how == "junk":
                sd["bank"][name] = draw(junk)
            elif how == "meta":
                sd["bank"][name] = t.to("meta")
            elif how == "sparse":
                sd["bank"][name] = t.to_sparse()
            else:
                sd["bank"][name] = torch.stack([t, t], -1)[..., 0]
        elif part == "values" and isinstance(sd.get("bank"), dict) and sd["bank"]:
            name = draw(st.sampled_from(sorted(sd["bank"])))
            t = sd["bank"][name]
            if plain_tensor(t) and t.numel():
                flat = t.reshape(-1)
                i = draw(st.integers(0, flat.numel() - 1))
                value = draw(st.sampled_from(SPECIALS + [-2, 3, 11, 1000]))
                if t.is_floating_point():
                    flat[i] = value
                else:
                    flat[i] = 0 if math.isnan(value) else int(max(min(value, 100), -100))


def copy_state_dict(sd):
    return {
        k: (
            {n: (t.clone() if isinstance(t, torch.Tensor) else t) for n, t in v.items()}
            if k in ("bank", "encoder")
            else json.loads(json.dumps(v))
            if isinstance(v, dict)
            else v
        )
        for k, v in sd.items()
    }


# ------------------------------------------------------------------ checkpoints
@functools.cache
def saved_checkpoint():
    root = tempfile.mkdtemp(prefix="dreampool-fuzz-")
    pool = DreamPool(config())
    pool.load_state_dict(template())
    pool.save(os.path.join(root, "ck"))
    return os.path.join(root, "ck")


def tree_digest(root):
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(dirpath, name), "rb") as f:
                out[os.path.relpath(os.path.join(dirpath, name), root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def resign(ck, name):
    """Re-sign ``name`` in the manifest, as a writer that produced this content would have."""
    with open(os.path.join(ck, MANIFEST), "rb") as f:
        manifest = json.loads(f.read())
    with open(os.path.join(ck, name), "rb") as f:
        data = f.read()
    manifest.setdefault("files", {})[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    body = {k: v for k, v in manifest.items() if k != "digest"}
    body_json = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    manifest["digest"] = hashlib.sha256(body_json).hexdigest()
    with open(os.path.join(ck, MANIFEST), "w") as f:
        json.dump(manifest, f)


# ------------------------------------------------------------------ config
config_values = st.one_of(
    junk,
    st.integers(-2, 64),
    st.floats(-1, 2),
    st.lists(st.integers(-1, 5), max_size=4),
    st.sampled_from(
        [
            "cpu",
            "cuda",
            "cuda:7",
            "auto",
            "gpu",
            "cosine",
            "euclidean",
            "fifo",
            "least_used",
            "float16",
            "hann",
            "hybrid",
            "hard",
            "none",
            "bogus",
        ]
    ),
)


field_names = st.sampled_from(sorted(PoolConfig().to_dict()) + ["unknown_field"])


config_dicts = st.dictionaries(
    st.one_of(field_names, st.integers(), st.none(), st.text(max_size=3)), config_values, max_size=6
)


yaml_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.lists(st.integers(-1, 5), max_size=4),
    st.lists(st.floats(0, 3), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.integers(0, 64),
    st.sampled_from(["cpu", "auto", "cuda:3", "euclidean", "least_used", "bfloat16", "hamming", "soft"]),
)


yaml_dicts = st.dictionaries(st.one_of(field_names, st.integers(), st.none()), yaml_values, max_size=6)


def check_config(cfg):
    assert isinstance(cfg, PoolConfig)
    assert PoolConfig.from_dict(cfg.to_dict()) == cfg
    assert yaml.safe_load(yaml.safe_dump(cfg.to_dict())) == cfg.to_dict()


valid_configs = st.fixed_dictionaries(
    {},
    optional={
        "dream_shape": st.lists(st.integers(1, 8), min_size=3, max_size=3),
        "capacity": st.integers(1, 10**6),
        "coherence_threshold": st.floats(0, 1),
        "retrieval_limit": st.integers(0, 50),
        "retrieval_mode": st.sampled_from([m.value for m in RetrievalMode] + ["hard"]),
        "embedding_dim": st.integers(4, 256),
        "device": st.sampled_from(["auto", "cpu", "cuda", "cuda:1"]),
        "metric": st.sampled_from(["cosine", "euclidean"]),
        "dream_dtype": st.sampled_from(["auto", "float16"]),
        "eviction_policy": st.sampled_from(["fifo", "lowest_coherence", "lowest_utility", "least_used"]),
        "query_cache_size": st.integers(0, 1000),
        "window": st.sampled_from(["hann", "hamming", "none"]),
        "include_class": st.booleans(),
        "alpha": st.floats(0, 1),
        "mmr_lambda": st.floats(0, 1),
        "fetch_factor": st.integers(1, 10),
        "search_chunk_mb": st.floats(0.01, 1e6),
    },
)
