"""Bad input, fuzzed: every public entry point returns a correct result or raises a DreamPoolError.

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
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import event, given
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


# ----------------------------------------------------------------------- add
class TestFuzzAdd:
    @given(data=st.data())
    def test_add(self, data):
        draw = data.draw
        pool = fresh_pool()
        clean = draw(st.booleans())  # half the examples are valid calls, to check the results too
        n = draw(st.integers(0, 6))
        shape = (n, *SHAPE, 3) if clean or _flag(draw, 85) else (n, *draw(st.tuples(*[st.integers(0, 3)] * 3)), 3)
        dreams = draw(tensors(shape, clean=clean))
        coherence = draw(argument((n,), clean=clean))
        energy = draw(argument((n,), high=5.0, optional=True, clean=clean))
        violation = draw(argument((n,), optional=True, clean=clean))
        labels = draw(argument((n,), kind="int", low=-1, high=9, optional=True, clean=clean))
        force = draw(st.booleans())
        next_before, alive_before = pool.bank.next_id, live_ids(pool)
        counters_before = dict(pool.counters)
        ids, error = attempt(
            pool,
            lambda: pool.add(
                dreams, coherence=coherence, energy=energy, violation=violation, class_label=labels, force=force
            ),
        )
        assert error is None or not clean, error
        if error is not None:
            return
        check_bank(pool)
        batch = torch.as_tensor(dreams).to(pool.device)
        assert ids.shape == (batch.shape[0],) and ids.dtype == torch.int64 and ids.device == pool.device
        new = ids[ids >= 0]
        assert new.tolist() == list(range(next_before, pool.bank.next_id))  # fresh, increasing
        assert set(new.tolist()) <= live_ids(pool)
        stored = pool.counters["added"] - counters_before["added"]
        assert stored == new.numel()
        evicted = pool.counters["evicted"] - counters_before["evicted"]
        assert len(alive_before - live_ids(pool)) == evicted
        if new.numel():
            accepted = torch.nonzero(ids >= 0).squeeze(1)
            expected = batch[accepted].to(pool.bank.columns["dreams"].dtype)
            assert torch.equal(pool.dreams(new), expected)
            if not force:
                coh = torch.as_tensor(coherence, dtype=torch.float32, device=pool.device).expand(batch.shape[0])
                assert bool((coh[accepted] >= pool.config.coherence_threshold).all())


# ------------------------------------------------------------------ retrieve
class TestFuzzRetrieve:
    @given(data=st.data())
    def test_retrieve(self, data):
        draw = data.draw
        pool = fresh_pool()
        clean = draw(st.booleans())
        b = draw(st.integers(0, 4))
        mode = draw(
            st.one_of(st.none(), st.sampled_from([m.value for m in RetrievalMode] + ["hard"]))
            if clean
            else st.one_of(st.none(), modes)
        )
        name = pool.config.retrieval_mode if mode is None else mode
        chroma_only = isinstance(name, str) and name in CHROMA_MODES
        shapes = [(b, *SHAPE, 3), (b, 3)] + ([] if clean and chroma_only else [(b, DIM)])
        queries = draw(tensors(draw(st.sampled_from(shapes)), clean=clean))
        k = draw(st.one_of(st.none(), st.integers(0, CAPACITY)) if clean else st.one_of(st.none(), counts))
        class_mode = clean and mode == "class"  # class mode needs a hint naming a class
        class_hint = draw(
            argument((b,), kind="int", low=0 if class_mode else -1, high=9, optional=not class_mode, clean=clean)
        )
        class_lists = st.one_of(st.lists(st.integers(0, 9), max_size=4), st.lists(st.integers(0, 9)).map(tuple))
        classes = draw(
            class_lists if clean else st.one_of(st.none(), class_lists, st.lists(st.integers(-2, 12), max_size=4), junk)
        )
        category = draw(
            argument((b,), kind="int", low=0, high=11, optional=not (clean and mode == "category"), clean=clean)
        )  # embedding queries in category mode need one
        threshold = draw(st.floats(-1, 2) if clean else st.one_of(st.floats(-1, 2), junk))
        prior = draw(argument((b,), optional=True, clean=clean))
        fetch_k = draw(st.one_of(st.none(), st.integers(0, 30)) if clean else st.one_of(st.none(), counts))
        lam = draw(st.one_of(st.none(), st.floats(0, 1)) if clean else st.one_of(st.none(), st.floats(0, 1), junk))
        dispersion = draw(st.floats(0, 0.5) if clean else st.one_of(st.floats(0, 0.5), st.floats(allow_nan=True), junk))
        with_dreams = draw(st.booleans())
        alive = live_ids(pool)
        hits, error = attempt(
            pool,
            lambda: pool.retrieve(
                queries,
                k=k,
                mode=mode,
                class_hint=class_hint,
                classes=classes,
                category=category,
                utility_threshold=threshold,
                utility_prior=prior,
                fetch_k=fetch_k,
                mmr_lambda=lam,
                min_dispersion=dispersion,
                with_dreams=with_dreams,
            ),
        )
        assert error is None or not clean, error
        if error is not None:
            return
        mode_ = (pool.config.default_mode if mode is None else RetrievalMode.parse(mode)).value
        k_ = pool.config.retrieval_limit if k is None else int(k)
        rows = torch.as_tensor(queries).shape[0]
        width = expected_width(k_, mode_, classes)
        assert hits.ids.shape == hits.scores.shape == (rows, width)
        assert hits.ids.dtype == torch.int64 and hits.scores.dtype == torch.float32
        present = hits.ids >= 0
        assert torch.equal(present, torch.isfinite(hits.scores))  # padding is (-1, -inf) together
        assert set(hits.ids[present].tolist()) <= alive
        repeats = mode_ == "balanced" and len(set(classes)) < len(classes)  # a class asked twice answers twice
        for row in hits.ids.tolist():
            got = [i for i in row if i >= 0]
            assert len(set(got)) == len(got) or repeats
        if mode_ in ORDERED_MODES:
            s = hits.scores.nan_to_num(neginf=-1e9)
            assert bool((s[:, :-1] >= s[:, 1:]).all())
        if with_dreams:
            assert hits.dreams.shape == (rows, width, *SHAPE, 3)
        else:
            assert hits.dreams is None


# ------------------------------------------------------------------ feedback
class TestFuzzFeedback:
    @given(data=st.data())
    def test_feedback(self, data):
        draw = data.draw
        pool = fresh_pool()
        clean = draw(st.booleans())
        shape = draw(st.sampled_from([(draw(st.integers(0, 6)),), (2, 3), ()]))
        top = pool.bank.next_id
        ids = draw(argument(shape, kind="int", low=-1, high=top - 1 if clean else top + 1, clean=clean))
        utility = draw(argument(shape, clean=clean))
        alive = live_ids(pool)
        recorded, error = attempt(pool, lambda: pool.feedback(ids, utility))
        assert error is None or not clean or torch.as_tensor(utility).dim() > torch.as_tensor(ids).dim(), error
        if error is not None:
            return
        check_bank(pool)
        flat = [i for i in torch.as_tensor(ids).reshape(-1).tolist()]
        assert recorded == sum(1 for i in flat if i in alive)
        util = pool.bank.columns["util_mean"]
        assert bool(((util >= 0) & (util <= 1)).all())


# ----------------------------------------------------------- dreams, metadata
class TestFuzzGather:
    @pytest.mark.parametrize("which", ["dreams", "metadata"])
    @given(data=st.data())
    def test_gather(self, data, which):
        draw = data.draw
        pool = fresh_pool()
        shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
        ids = draw(argument(shape, kind="int", low=-1, high=pool.bank.next_id + 1))
        alive = live_ids(pool)
        out, error = attempt(pool, lambda: getattr(pool, which)(ids))
        if error is not None:
            return
        id_t = torch.as_tensor(ids).cpu()
        out = {k: v.cpu() for k, v in out.items()} if which == "metadata" else out.cpu()
        found = torch.tensor([i in alive for i in id_t.reshape(-1).tolist()], dtype=torch.bool).reshape(id_t.shape)
        if which == "dreams":
            assert out.shape == (*id_t.shape, *SHAPE, 3)
            assert bool((out[~found] == 0).all())
        else:
            assert torch.equal(out["found"], found)
            assert torch.equal(out["ids"][found], id_t[found].long())


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


class TestFuzzStateDict:
    @pytest.mark.filterwarnings("ignore::dreampool_gpu.persist.CheckpointRecoveryWarning")  # damaged index bytes
    @given(data=st.data())
    def test_load_state_dict(self, data):
        pool = fresh_pool()
        sd = copy_state_dict(template())
        mutate_state_dict(data.draw, sd)
        _, error = attempt(pool, lambda: pool.load_state_dict(sd))
        if error is not None:
            return
        check_bank(pool)
        mine = pool.state_dict()
        for name, t in mine["bank"].items():  # the pool now holds exactly what was given (dreams cast)
            assert torch.equal(bits(t), bits(sd["bank"][name].to(t.dtype))), name
        assert {k: mine["state"][k] for k in ("size", "next_id", "extent")} == {
            k: sd["state"][k] for k in ("size", "next_id", "extent")
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


@pytest.fixture(scope="module")
def scratch():
    root = tempfile.mkdtemp(prefix="dreampool-fuzz-scratch-")
    yield root
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(os.path.dirname(saved_checkpoint()), ignore_errors=True)


class TestFuzzCheckpoint:
    @given(data=st.data())
    def test_load_damaged(self, data, scratch):
        draw = data.draw
        ck = os.path.join(scratch, "ck")
        shutil.rmtree(ck, ignore_errors=True)
        shutil.copytree(saved_checkpoint(), ck)
        files = sorted(os.listdir(ck))
        for _ in range(draw(st.integers(1, 3))):
            name = draw(st.sampled_from(files + ["index.bin", "notes.txt"]))
            path = os.path.join(ck, name)
            data_ = Path(path).read_bytes() if os.path.exists(path) else b""
            how = draw(st.sampled_from(["flip", "truncate", "append", "delete", "replace", "json", "resign"]))
            if how == "flip" and data_:
                i = draw(st.integers(0, len(data_) - 1))
                data_ = data_[:i] + bytes([data_[i] ^ draw(st.integers(1, 255))]) + data_[i + 1 :]
            elif how == "truncate":
                data_ = data_[: draw(st.integers(0, max(0, len(data_) - 1)))]
            elif how == "append":
                data_ += draw(st.binary(min_size=1, max_size=16))
            elif how == "replace":
                data_ = draw(st.binary(max_size=64))
            elif how == "json":
                data_ = json.dumps(
                    draw(
                        st.one_of(
                            st.dictionaries(st.text(max_size=8), st.integers() | st.text()),
                            st.integers(),
                            st.lists(st.integers()),
                        )
                    )
                ).encode()
            if how == "delete":
                if os.path.exists(path):
                    os.remove(path)
                continue
            with open(path, "wb") as f:
                f.write(data_)
            if how == "resign" and name != MANIFEST and os.path.exists(os.path.join(ck, MANIFEST)):
                try:
                    resign(ck, name)
                except (ValueError, AttributeError, TypeError):  # the manifest itself was damaged before
                    pass
        before = tree_digest(scratch)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loaded = DreamPool.load(ck)
        except DreamPoolError as exc:
            event(f"rejected: {type(exc).__name__}")
            loaded = None
        else:
            event("accepted")
            check_bank(loaded)
        assert tree_digest(scratch) == before  # loading never writes

    @given(
        name=st.one_of(
            st.text(st.characters(blacklist_characters="/", blacklist_categories=("Cs",)), min_size=0, max_size=24),
            st.just("ck"),
            st.just(".."),
            st.just("."),
            st.just("file"),
        ),
        wrap=st.sampled_from(["str", "path", "bytes", "junk"]),
        junk_value=junk.filter(lambda x: not isinstance(x, str)),
    )  # a str would be a path relative to cwd
    def test_save_paths(self, name, wrap, junk_value, scratch):
        pool = fresh_pool()
        where = os.path.join(scratch, "save")
        os.makedirs(where, exist_ok=True)
        open(os.path.join(where, "file"), "w").close()
        full = os.path.join(where, name)
        path = {
            "str": full,
            "path": Path(full) if name else full,
            "bytes": full.encode("utf-8", "surrogatepass"),
            "junk": junk_value,
        }[wrap]
        _, error = attempt(pool, lambda: pool.save(path))
        if error is None:
            loaded = DreamPool.load(path)
            check_bank(loaded)
            assert live_ids(loaded) == live_ids(pool)


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


class TestFuzzConfig:
    @given(values=valid_configs | config_dicts | junk)
    def test_from_dict(self, values):
        try:
            cfg = PoolConfig.from_dict(values)
        except DreamPoolError as exc:
            event(f"rejected: {type(exc).__name__}")
            return
        event("accepted")
        check_config(cfg)

    @given(
        content=st.one_of(
            valid_configs.map(lambda d: yaml.safe_dump(d).encode()),
            yaml_dicts.map(lambda d: yaml.safe_dump(d).encode()),
            st.text(max_size=60).map(str.encode),
            st.binary(max_size=60),
            st.sampled_from(
                [
                    b"capacity: [",
                    b"- 1\n- 2",
                    b"!!python/object:os.system {}",
                    b"\xff\xfe",
                    b"{a: *b}",
                    b"capacity: 1e999",
                    b"dream_shape: !!binary aGVsbG8=",
                    b"&a [*a]",
                    b"[" * 3000 + b"]" * 3000,
                    b"capacity: " + b"9" * 5000,
                ]
            ),
        )
    )
    def test_from_file(self, content, scratch):
        path = os.path.join(scratch, "config.yaml")
        with open(path, "wb") as f:
            f.write(content)
        try:
            cfg = PoolConfig.from_file(path)
        except DreamPoolError as exc:
            event(f"rejected: {type(exc).__name__}")
            return
        event("accepted")
        check_config(cfg)

    @pytest.mark.parametrize("path", ["<scratch>", "missing.yaml", None, 3, ["a"]])
    def test_from_file_not_a_file(self, scratch, path):
        where = scratch if path == "<scratch>" else os.path.join(scratch, path) if isinstance(path, str) else path
        with pytest.raises(DreamPoolError, match="<file>"):
            PoolConfig.from_file(where)
