"""Tensor layouts (docs/spec.md §Errors): every tensor argument of the public API
refuses sparse, nested, quantized and meta tensors with InvalidInputError, and the pool is unchanged."""

from __future__ import annotations

import pytest
import torch

from dreampool_gpu import DreamPool, PoolConfig
from dreampool_gpu.errors import InvalidInputError

SHAPE = (4, 4, 1)
N = 20
pytestmark = pytest.mark.filterwarnings("ignore:.*(quantiz|Sparse CSR).*:UserWarning")
MODES = ["similar", "class", "balanced", "utility", "diverse", "soft", "hybrid", "category", "nearest"]


def sparse_coo(t: torch.Tensor) -> torch.Tensor:
    return t.to_sparse()


def sparse_csr(t: torch.Tensor) -> torch.Tensor:
    return t.to_sparse_csr() if t.dim() == 2 else t.to_sparse()


def meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, device="meta")


def quantized(t: torch.Tensor) -> torch.Tensor:
    return torch.quantize_per_tensor(t.float(), 0.01, 0, torch.qint32)


LAYOUTS = {"sparse_coo": sparse_coo, "sparse_csr": sparse_csr, "meta": meta, "quantized": quantized}


@pytest.fixture(scope="module")
def pool() -> DreamPool:
    p = DreamPool(PoolConfig(dream_shape=SHAPE, capacity=32, coherence_threshold=0.0, device="cpu"))
    g = torch.Generator().manual_seed(0)
    p.add(torch.rand(N, *SHAPE, 3, generator=g), coherence=torch.ones(N), class_labels=torch.arange(N) % 10)
    return p


def fingerprint(pool: DreamPool) -> tuple:
    cols = pool.bank.columns
    return (
        len(pool),
        pool.bank.next_id,
        cols["utility"].nan_to_num(-7.0).clone(),
        cols["usage"].clone(),
        pool.cache.hits,
        pool.cache.misses,
    )


def same(a: tuple, b: tuple) -> bool:
    return all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b, strict=True))


def mode_args(mode: str) -> dict:
    return {"class": {"class_hint": 1}, "balanced": {"classes": [0, 1]}}.get(mode, {})


def refused(pool: DreamPool, call, name: str) -> None:
    before = fingerprint(pool)
    with pytest.raises(InvalidInputError) as info:
        call()
    assert info.value.name == name
    assert "dense" in str(info.value)
    assert same(before, fingerprint(pool))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("mode", MODES)
class TestRetrieve:
    def test_queries(self, pool, layout, mode):
        q = LAYOUTS[layout](torch.rand(2, 3))
        refused(pool, lambda: pool.retrieve(q, k=3, mode=mode, **mode_args(mode)), "queries")

    def test_where_mask(self, pool, layout, mode):
        mask = torch.ones(pool.capacity, dtype=torch.bool)
        where = LAYOUTS[layout](mask) if layout != "quantized" else quantized(mask.int())
        call = lambda: pool.retrieve(torch.rand(2, 3), k=3, mode=mode, where=where, **mode_args(mode))  # noqa: E731
        refused(pool, call, "where")

    def test_where_callable_returning_one(self, pool, layout, mode):
        where = lambda cols: LAYOUTS[layout](cols["usage"] >= 0) if layout != "quantized" else quantized(cols["usage"])  # noqa: E731
        call = lambda: pool.retrieve(torch.rand(2, 3), k=3, mode=mode, where=where, **mode_args(mode))  # noqa: E731
        refused(pool, call, "where")


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
class TestOtherArguments:
    @pytest.mark.parametrize(
        ("name", "value"),
        [
            ("class_hint", torch.tensor([1, 2])),
            ("utility_prior", torch.tensor([0.5, 0.5])),
            ("category", torch.tensor([1, 2])),
        ],
    )
    def test_per_query_options(self, pool, layout, name, value):
        option = LAYOUTS[layout](value)
        refused(pool, lambda: pool.retrieve(torch.rand(2, 3), k=3, mode="nearest", **{name: option}), name)

    def test_sample_where(self, pool, layout):
        mask = torch.ones(pool.capacity, dtype=torch.bool)
        where = LAYOUTS[layout](mask) if layout != "quantized" else quantized(mask.int())
        refused(pool, lambda: pool.sample(4, where=where), "where")

    @pytest.mark.parametrize("name", ["dreams", "coherence", "energy", "violation", "class_labels"])
    def test_add(self, pool, layout, name):
        args = {
            "dreams": torch.rand(2, *SHAPE, 3),
            "coherence": torch.ones(2),
            "energy": torch.zeros(2),
            "violation": torch.zeros(2),
            "class_labels": torch.tensor([1, 2]),
        }
        args[name] = LAYOUTS[layout](args[name])
        dreams = args.pop("dreams")
        refused(pool, lambda: pool.add(dreams, **args), name)

    @pytest.mark.parametrize("name", ["ids", "utility"])
    def test_feedback(self, pool, layout, name):
        args = {"ids": torch.tensor([0, 1]), "utility": torch.tensor([0.5, 0.5])}
        args[name] = LAYOUTS[layout](args[name])
        refused(pool, lambda: pool.feedback(**args), name)

    @pytest.mark.parametrize("method", ["dreams", "metadata", "diversity"])
    def test_ids(self, pool, layout, method):
        ids = LAYOUTS[layout](torch.tensor([0, 1, 2]))
        refused(pool, lambda: getattr(pool, method)(ids), "ids")


@pytest.mark.parametrize("layout", ["sparse_coo", "meta"])
class TestScalarsAndSequences:
    """0-d tensors where an int or a flag is taken, and tensors of class labels."""

    def test_k(self, pool, layout):
        k = LAYOUTS[layout](torch.tensor(3))
        refused(pool, lambda: pool.retrieve(torch.rand(2, 3), k=k, mode="nearest"), "k")

    def test_sample_n(self, pool, layout):
        n = LAYOUTS[layout](torch.tensor(3))
        refused(pool, lambda: pool.sample(n), "n")

    def test_balanced_classes(self, pool, layout):
        for classes in (LAYOUTS[layout](torch.tensor([0, 1])), [LAYOUTS[layout](torch.tensor(0))]):
            refused(pool, lambda c=classes: pool.retrieve(torch.rand(2, 3), k=3, mode="balanced", classes=c), "classes")

    def test_add_force(self, pool, layout):
        force = LAYOUTS[layout](torch.tensor(True))
        refused(pool, lambda: pool.add(torch.rand(2, *SHAPE, 3), coherence=torch.ones(2), force=force), "force")


def test_dense_tensors_still_pass(pool):
    """The same calls with dense tensors work (the refusals above are about layout only)."""
    for mode in MODES:
        out = pool.retrieve(
            torch.rand(2, 3), k=3, mode=mode, where=torch.ones(pool.capacity, dtype=torch.bool), **mode_args(mode)
        )
        assert out.ids.shape[0] == 2
    assert pool.sample(4, where=torch.ones(pool.capacity, dtype=torch.bool)).numel() == 4
