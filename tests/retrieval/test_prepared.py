"""pool.prepare_retrieve: a fixed-shape retrieve (a CUDA graph on CUDA) equals the eager call."""

from __future__ import annotations

import pytest
import torch

from dreampool_gpu import DreamPool, PoolConfig
from dreampool_gpu.errors import DimensionMismatchError, InvalidInputError

SHAPE = (6, 6, 2)


def _pool(device: str = "cpu", **overrides) -> DreamPool:
    config = dict(dream_shape=SHAPE, capacity=300, device=device, engine="torch", checks="deferred")
    pool = DreamPool(PoolConfig(**{**config, **overrides}))
    g = torch.Generator().manual_seed(0)
    n = 200
    pool.add(
        torch.rand(n, *SHAPE, 3, generator=g).to(pool.device),
        coherence=torch.ones(n, device=pool.device),
        class_label=torch.randint(0, 10, (n,), generator=g).to(pool.device),
    )
    return pool


def _queries(kind: str, pool: DreamPool, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    dreams = torch.rand(4, *SHAPE, 3, generator=g)
    if kind == "chroma":
        return dreams.mean((1, 2, 3)).to(pool.device)
    if kind == "embeddings":
        return torch.randn(4, pool.config.embedding_dim, generator=g).to(pool.device)
    return dreams.to(pool.device)


CASES = [
    ("nearest", "embeddings", {}),
    ("nearest", "dreams", {}),
    ("hybrid", "dreams", {"class_hint": 3, "fetch_k": 20}),
    ("similar", "chroma", {}),
    ("diverse", "chroma", {"mmr_lambda": 0.5}),
]


def _check_equal_to_eager(device: str) -> None:
    for mode, kind, options in CASES:
        pool, twin = _pool(device), _pool(device)
        prepared = pool.prepare_retrieve(_queries(kind, pool, 0), k=5, mode=mode, **options)
        for step in range(3):
            q = _queries(kind, pool, step + 1)
            got = prepared(q)
            want = twin.retrieve(q, k=5, mode=mode, **options)
            assert torch.equal(got.ids, want.ids), (mode, kind, step)
            torch.testing.assert_close(got.scores, want.scores)
            if step == 1:  # the bank changes: the next call sees the new entry
                for p in (pool, twin):
                    p.add(torch.full((1, *SHAPE, 3), 0.5, device=p.device), coherence=1.0)
        torch.testing.assert_close(pool.bank.columns["usage"], twin.bank.columns["usage"], rtol=0, atol=0)
        assert pool.counters["queries"] == twin.counters["queries"]


def test_prepared_equals_eager_on_cpu():
    _check_equal_to_eager("cpu")


def test_prepared_checks_shape_and_options():
    pool = _pool()
    prepared = pool.prepare_retrieve(_queries("embeddings", pool, 0), k=3, mode="nearest")
    assert not prepared.graphed and prepared.reason == "not CUDA"
    with pytest.raises(DimensionMismatchError, match="as prepared"):
        prepared(torch.randn(5, pool.config.embedding_dim))
    with pytest.raises(InvalidInputError, match="where"):
        pool.prepare_retrieve(_queries("chroma", pool, 0), k=3, mode="similar", where=lambda c: c["coherence"] > 0)
    with pytest.raises(InvalidInputError, match="chroma_metrics"):
        pool.prepare_retrieve(_queries("chroma", pool, 0), k=3, mode="similar", chroma_metrics="cosine")
    with pytest.raises(InvalidInputError, match="k"):
        pool.prepare_retrieve(_queries("chroma", pool, 0), k=-1, mode="similar")
    usage = pool.bank.columns["usage"].clone()
    pool.prepare_retrieve(_queries("chroma", pool, 0), k=3, mode="similar")
    assert torch.equal(pool.bank.columns["usage"], usage)  # preparing counts no usage


def test_prepared_bad_query_is_empty_and_raised_later():
    pool = _pool()
    prepared = pool.prepare_retrieve(_queries("embeddings", pool, 0), k=3, mode="nearest")
    q = _queries("embeddings", pool, 1)
    q[2, 0] = float("inf")
    assert bool((prepared(q).ids == -1).all())
    with pytest.raises(InvalidInputError, match="finite"):
        pool.check()


@pytest.mark.gpu
def test_prepared_graph_equals_eager_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("gpu unavailable")
    pool = _pool("cuda")
    prepared = pool.prepare_retrieve(_queries("dreams", pool, 0), k=5, mode="hybrid")
    prepared(_queries("dreams", pool, 1))
    assert prepared.graphed, prepared.reason
    _check_equal_to_eager("cuda")


@pytest.mark.parametrize(
    ("mode", "options", "argument"),
    [("class", {"class_hint": 15}, "class_hint"), ("hybrid", {"utility_prior": 2.0}, "utility_prior")],
)
def test_bad_option_values_raise_at_prepare_and_leave_no_fault(mode, options, argument):
    pool = _pool()
    with pytest.raises(InvalidInputError, match=argument):
        pool.prepare_retrieve(_queries("dreams", pool, 0), k=3, mode=mode, **options)
    pool.check()  # nothing pending: the trial's failure was raised, not kept


def test_failed_capture_runs_eagerly(monkeypatch):
    pool = _pool()
    prepared = pool.prepare_retrieve(_queries("embeddings", pool, 0), k=3, mode="nearest")
    prepared.graphed = True  # as on CUDA; the capture then fails

    def failing_capture():
        prepared.graphed, prepared.reason = False, "capture failed: simulated"

    monkeypatch.setattr(prepared, "_capture", failing_capture)
    q = _queries("embeddings", pool, 1)
    assert torch.equal(prepared(q).ids, pool.retrieve(q, k=3, mode="nearest").ids)


def test_prepared_with_dreams_gathers_them():
    pool, twin = _pool(), _pool()
    prepared = pool.prepare_retrieve(_queries("dreams", pool, 0), k=4, mode="nearest", with_dreams=True)
    q = _queries("dreams", pool, 1)
    got, want = prepared(q), twin.retrieve(q, k=4, mode="nearest", with_dreams=True)
    assert got.dreams is not None and want.dreams is not None
    assert torch.equal(got.dreams, want.dreams)


def test_prepare_and_call_refuse_bad_arguments_typed():
    from dreampool_gpu.errors import DreamPoolError

    pool = _pool()
    q = _queries("embeddings", pool, 0)
    for kwargs in ({"k": -1}, {"k": 2.5}, {"mode": "bogus"}, {"graph": "yes"}, {"with_dreams": 1}, {"fetch_k": -3}):
        with pytest.raises(DreamPoolError):
            pool.prepare_retrieve(q, **{"k": 3, "mode": "nearest", **kwargs})
    with pytest.raises(DreamPoolError):
        pool.prepare_retrieve(torch.randn(4, 7), k=3, mode="nearest")  # neither chroma nor embeddings
    prepared = pool.prepare_retrieve(q, k=3, mode="nearest")
    for bad in (q.double(), q[:2], q.tolist()[:2], "queries"):
        with pytest.raises(DreamPoolError):
            prepared(bad)
