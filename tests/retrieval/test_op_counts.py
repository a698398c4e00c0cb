"""How many torch operations each pool call dispatches (CPU), pinned as upper bounds.

A ``TorchDispatchMode`` counts every operator that reaches the dispatcher during one call in
the steady state (the pool filled, its age order and features settled). The bounds are the
counts measured when they were cut, with a little headroom: a change that adds operations to
a hot path fails here, not in a benchmark weeks later. Lower a bound when a path gets cheaper.
The second half checks that the cut paths still answer as before (against plain-Python oracles).
"""

from __future__ import annotations

import inspect

import pytest
import torch
from _equality import assert_same_results
from torch.utils._python_dispatch import TorchDispatchMode

from dreampool_gpu import DreamPool, PoolConfig
from dreampool_gpu.config import RetrievalMode
from dreampool_gpu.errors import DimensionMismatchError, InvalidInputError
from dreampool_gpu.retrieval.context import RETRIEVE_DEFAULTS

SHAPE = (4, 4, 1)
BATCH = 8

# measured on torch 2.13 CPU when the paths were cut (before: add 214, dreams 22, metadata 90 with
# every column, feedback 51; then add 35, dreams 14, metadata 14, feedback 35, feedback of a sample 17;
# then add 29, then 30 (two cats keep the age order of a FIFO pool, so the next sample sorts no ids: sample
# 7 -> 4 in a replay step), feedback 34, feedback of a sample 15); "dreams"/"metadata": ids looked up,
# "... of a sample": the ids sample() returned
CALL_BOUNDS = {
    "add": 32,
    "sample": 6,
    "dreams": 16,
    "metadata": 16,
    "dreams of a sample": 5,
    "metadata of a sample": 5,
    "feedback": 37,
    "feedback of a sample": 17,
}
# B = 1, k = 5, dream queries: measured 135, 161, 207, 141, 213, 336, 336, 216, 139, then
# 128, 155, 200, 134, 150, 231, 231, 186, 127, then (the plain nearest call, the kept transposed view of
# the exact search, no padding read, MMR's pick loop on the host with one bmm a step, near-tie rows
# re-ordered on the host) 128, 155, 200, 134, 134, 202, 202, 183, 124; then with MMR's pick loop back in torch
# (batched torch matrix ops on every device) diverse 150, soft and hybrid 230
RETRIEVE_BOUNDS = {
    RetrievalMode.SIMILAR: 140,
    RetrievalMode.CLASS: 170,
    RetrievalMode.BALANCED: 215,
    RetrievalMode.UTILITY: 145,
    RetrievalMode.DIVERSE: 160,
    RetrievalMode.SOFT: 240,
    RetrievalMode.HYBRID: 240,
    RetrievalMode.CATEGORY: 200,
    RetrievalMode.NEAREST: 135,
}
# B = 1, k = 5, an embedding query: measured 11, 103, then 8 (norm, div, mm, topk, 2 slices, put_, take), 102
EMBEDDING_BOUNDS = {"nearest": 10, "hybrid": 110}
MODE_OPTIONS = {
    RetrievalMode.CLASS: {"class_hint": 3},
    RetrievalMode.BALANCED: {"classes": [1, 3]},
    RetrievalMode.UTILITY: {"utility_threshold": 0.2},
}


class Count(TorchDispatchMode):
    """Counts the operators dispatched inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


def count(fn) -> tuple[int, list[str]]:
    with Count() as counter:
        fn()
    return len(counter.ops), counter.ops


@pytest.fixture
def pool():
    """A full pool of 64 (its adds evict), features settled, some feedback; inputs made beforehand."""
    config = PoolConfig(dream_shape=SHAPE, capacity=64, device="cpu", coherence_threshold=0.0, query_cache_size=0)
    pool = DreamPool(config)
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        pool.add(
            torch.rand(BATCH, *SHAPE, 3, generator=g),
            coherence=torch.ones(BATCH),
            class_label=torch.randint(0, 10, (BATCH,), generator=g),
        )
    pool.feedback(pool.sample(16, generator=g), torch.rand(16, generator=g))
    pool.bank.settle()
    return pool


def test_call_counts(pool):
    g = torch.Generator().manual_seed(1)
    dreams, labels, ones = torch.rand(BATCH, *SHAPE, 3, generator=g), torch.randint(0, 10, (BATCH,)), torch.ones(BATCH)
    utility = torch.rand(BATCH, generator=g)
    ids = pool.sample(BATCH, generator=g)
    copies = iter([ids.clone() for _ in range(4)])  # other tensors of the same ids: looked up anew
    calls = {
        "add": lambda: pool.add(dreams, coherence=ones, class_label=labels),
        "sample": lambda: pool.sample(BATCH, generator=g),
        "dreams": lambda: pool.dreams(next(copies)),
        "metadata": lambda: pool.metadata(next(copies), columns=("class_label",)),
        "feedback": lambda: pool.feedback(ids, utility),
    }
    for name, fn in calls.items():
        fn()  # the steady state: the age order of this revision is sorted
        n, ops = count(fn)
        assert n <= CALL_BOUNDS[name], f"{name}: {n} operations (bound {CALL_BOUNDS[name]}): {ops}"
    batch = pool.sample(BATCH, generator=g)
    for name, fn in {
        "dreams of a sample": lambda: pool.dreams(batch),
        "metadata of a sample": lambda: pool.metadata(batch, columns=("class_label",)),
        "feedback of a sample": lambda: pool.feedback(batch, utility),
    }.items():
        n, ops = count(fn)
        assert n <= CALL_BOUNDS[name], f"{name}: {n} operations (bound {CALL_BOUNDS[name]}): {ops}"


def test_lookup_of_a_sample_answers_as_a_lookup(pool):
    """The slots sample() keeps for its ids give what a fresh lookup gives; an id tensor changed in place is
    looked up again."""
    g = torch.Generator().manual_seed(5)
    batch = pool.sample(BATCH, generator=g)
    want = pool.dreams(batch.clone())
    assert torch.equal(pool.dreams(batch), want)
    assert torch.equal(pool.metadata(batch)["coherence"], pool.metadata(batch.clone())["coherence"])
    batch[0] = -1  # in place: the kept slots no longer answer for it
    got = pool.dreams(batch)
    assert torch.equal(got[0], torch.zeros(*SHAPE, 3)) and torch.equal(got[1:], want[1:])
    assert not bool(pool.metadata(batch)["found"][0])


def test_add_never_featurises(pool):
    """A lazy add computes no chroma, spectrum or embedding: no FFT, no matmul."""
    g = torch.Generator().manual_seed(2)
    dreams = torch.rand(BATCH, *SHAPE, 3, generator=g)
    _, ops = count(lambda: pool.add(dreams, coherence=torch.ones(BATCH)))
    assert not {"_fft_r2c", "_fft_c2c", "mm", "addmm", "mean"} & set(ops), ops


@pytest.mark.parametrize("mode", list(RetrievalMode))
def test_retrieve_counts(pool, mode):
    q = torch.rand(1, *SHAPE, 3, generator=torch.Generator().manual_seed(3))
    options = MODE_OPTIONS.get(mode, {})
    pool.retrieve(q, k=5, mode=mode, **options)
    n, ops = count(lambda: pool.retrieve(q, k=5, mode=mode, **options))
    assert n <= RETRIEVE_BOUNDS[mode], f"{mode.value}: {n} operations (bound {RETRIEVE_BOUNDS[mode]}): {ops}"


@pytest.mark.parametrize("mode", sorted(EMBEDDING_BOUNDS))
def test_embedding_query_counts(pool, mode):
    q = pool.bank.columns["embeddings"][3:4] + 0.01
    pool.retrieve(q, k=5, mode=mode)
    n, ops = count(lambda: pool.retrieve(q, k=5, mode=mode))
    assert n <= EMBEDDING_BOUNDS[mode], f"{mode}: {n} operations (bound {EMBEDDING_BOUNDS[mode]}): {ops}"


# ------------------------------------------------------ the cut paths answer as before
def test_feedback_matches_an_oracle(pool):
    """Repeated ids, absent ids and padding in one call: running mean, count and last utility per entry."""
    live = pool.bank.ids_by_age()
    evicted = int(live[0]) - 1  # issued, no longer stored
    ids = torch.tensor([int(live[3]), -1, int(live[5]), int(live[3]), evicted, int(live[3]), int(live[7])])
    utility = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.3, 0.2, 1.0])
    before = pool.metadata(ids, columns=("util_mean", "feedback_count", "utility"))
    columns = ("util_mean", "feedback_count", "utility")
    every_before = pool.metadata(live, columns=columns)
    want = {}
    for i, u in zip(ids.tolist(), utility.tolist(), strict=True):
        if i < 0 or i == evicted:
            continue
        j = ids.tolist().index(i)
        mean, n, _ = want.get(i, (float(before["util_mean"][j]), int(before["feedback_count"][j]), None))
        want[i] = ((mean * n + u) / (n + 1), n + 1, u)
    assert pool.feedback(ids, utility) == 5
    after = pool.metadata(torch.tensor(list(want)), columns=("util_mean", "feedback_count", "utility"))
    for j, (mean, n, last) in enumerate(want.values()):
        assert float(after["util_mean"][j]) == pytest.approx(mean, abs=1e-6)
        assert int(after["feedback_count"][j]) == n
        assert float(after["utility"][j]) == pytest.approx(last)
    every_after = pool.metadata(live, columns=columns)
    untouched = torch.tensor([i not in want for i in live.tolist()])
    for name in columns:  # every other entry exactly as it was
        assert torch.equal(every_after[name][untouched].nan_to_num(-7), every_before[name][untouched].nan_to_num(-7))


def test_feedback_of_a_sample_and_of_a_copy_agree(pool):
    """Ids sample() returned (their slots remembered, repeats among them) record what the same ids in a new
    tensor record; a utility that requires grad is recorded as values, and bad utilities change nothing."""
    g = torch.Generator().manual_seed(7)
    batch = pool.sample(24, generator=g)  # with replacement: repeats among 24 of 64 are likely
    utility = torch.rand(24, generator=g, requires_grad=True)
    columns = ("util_mean", "feedback_count", "utility")
    live = pool.bank.ids_by_age()
    twin = DreamPool(pool.config)
    twin.load_state_dict(pool.state_dict())
    assert pool.feedback(batch, utility) == 24 and twin.feedback(batch.clone(), utility.detach().clone()) == 24
    got, want = pool.metadata(live, columns=columns), twin.metadata(live, columns=columns)
    assert not got["util_mean"].requires_grad and not pool.bank.raw["util_mean"].requires_grad
    assert torch.equal(got["feedback_count"], want["feedback_count"])
    torch.testing.assert_close(got["util_mean"], want["util_mean"], rtol=0, atol=1e-6)
    torch.testing.assert_close(got["utility"], want["utility"], equal_nan=True)
    for bad in (torch.full((24,), float("nan")), torch.full((24,), 1.5)):
        with pytest.raises(InvalidInputError, match="utility"):
            pool.feedback(batch, bad)
    after = pool.metadata(live, columns=columns)
    for name in columns:
        assert torch.equal(after[name].nan_to_num(-7), got[name].nan_to_num(-7))


def test_metadata_columns_and_absent_ids(pool):
    live = pool.bank.ids_by_age()
    ids = torch.tensor([[int(live[2]), -1], [int(live[0]) - 1, int(live[9])]])
    some = pool.metadata(ids, columns=("class_label", "coherence"))
    every = pool.metadata(ids)
    assert set(some) == {"class_label", "coherence", "found"}
    assert torch.equal(some["found"], torch.tensor([[True, False], [False, True]]))
    for name in ("class_label", "coherence"):
        assert torch.equal(some[name], every[name])
    assert some["class_label"].tolist()[0][1] == -1 and some["coherence"].tolist()[1][0] == 0.0
    assert torch.equal(pool.dreams(ids)[0, 1], torch.zeros(*SHAPE, 3))
    with pytest.raises(InvalidInputError, match="columns"):
        pool.metadata(ids, columns=("nope",))
    with pytest.raises(InvalidInputError, match="columns"):
        pool.metadata(ids, columns="class_label")


def test_a_gate_at_zero_passes_every_checked_dream(pool):
    """coherence_threshold 0 (the fixture's) admits coherence 0 without a gate count, and a coherence outside
    [0, 1] or NaN still raises with the pool unchanged."""
    g = torch.Generator().manual_seed(9)
    dreams = torch.rand(BATCH, *SHAPE, 3, generator=g)
    live, next_id = pool.bank.ids_by_age().clone(), pool.bank.next_id
    for bad in (-0.25, float("nan"), 1.5):
        coherence = torch.zeros(BATCH)
        coherence[2] = bad
        with pytest.raises(InvalidInputError, match="coherence"):
            pool.add(dreams, coherence=coherence)
        assert torch.equal(pool.bank.ids_by_age(), live) and pool.bank.next_id == next_id
    ids = pool.add(dreams, coherence=torch.zeros(BATCH))
    assert ids.tolist() == list(range(next_id, next_id + BATCH))
    assert torch.equal(pool.dreams(ids), dreams)


@pytest.mark.parametrize("mode", ["nearest", "hybrid"])
def test_query_rows_answer_alone_as_in_a_mixed_batch(pool, mode):
    """Cosine queries are divided by their norms, or scaled by their peaks first when a norm is extreme:
    a batch holding a zero row, a tiny row and a huge one answers each row as that row alone does."""
    g = torch.Generator().manual_seed(11)
    d = pool.config.embedding_dim
    base = torch.randn(4, d, generator=g)
    batch = torch.stack([base[0], torch.zeros(d), base[1] * 1e-25, base[2] * 1e25, base[3]])
    together = pool.retrieve(batch, k=5, mode=mode)
    for row in range(batch.shape[0]):
        alone = pool.retrieve(batch[row : row + 1], k=5, mode=mode)
        assert_same_results(
            alone.ids, alone.scores, together.ids[row : row + 1], together.scores[row : row + 1], where=f"row {row}"
        )
    normal = pool.retrieve(base[1:3], k=5, mode=mode)  # scale never changes the answer
    assert_same_results(normal.ids, normal.scores, together.ids[2:4], together.scores[2:4], where="scaled rows")


def test_the_age_order_kept_across_fifo_adds_is_the_sorted_one(pool):
    """A FIFO pool appends each add to its age order and drops the evicted oldest, with no sort: the order
    stays what sorting the ids gives, through adds, a sample and feedback between them."""
    g = torch.Generator().manual_seed(12)
    for step in range(6):
        pool.add(torch.rand(BATCH + step, *SHAPE, 3, generator=g), coherence=torch.ones(BATCH + step))
        if step % 2:
            batch = pool.sample(BATCH, generator=g)
            pool.feedback(batch, torch.rand(BATCH, generator=g))
        ids = pool.bank.raw["ids"]
        order = torch.sort(ids, stable=True)
        live = ids.numel() - len(pool)
        assert torch.equal(pool.bank.ids_by_age(), order.values[live:])
        assert torch.equal(pool.bank.slots_by_age(), order.indices[live:])
        assert torch.equal(pool.bank.ids_by_age(), torch.arange(pool.bank.next_id - len(pool), pool.bank.next_id))


def test_retrieve_options_are_the_declared_ones():
    """``retrieve`` hands its walk every option of RETRIEVE_DEFAULTS (a literal dict), with the declared defaults."""
    params = inspect.signature(DreamPool.retrieve).parameters
    options = {name: p.default for name, p in params.items() if name not in ("self", "queries", "with_dreams")}
    assert options == RETRIEVE_DEFAULTS


def _usage(pool: DreamPool) -> torch.Tensor:
    return pool.bank.raw["usage"].clone()


@pytest.mark.parametrize("k", [1, 5, 63, 64, 80])
@pytest.mark.parametrize("query", ["embeddings", "dreams", "chroma"])
def test_plain_nearest_answers_as_with_ignored_options(pool, k, query):
    """A nearest call with no option but k and mode answers (ids, scores, usage, ties oldest first, padding
    past the pool) exactly as a call that also sets options nearest ignores."""
    g = torch.Generator().manual_seed(13)
    live = pool.bank.ids_by_age()
    pool.add(pool.dreams(live[:6]), coherence=torch.ones(6))  # exact duplicates: ties at and across the cut
    if query == "embeddings":
        q = torch.cat([pool.bank.columns["embeddings"][:2], torch.randn(2, pool.config.embedding_dim, generator=g)])
    elif query == "dreams":
        q = torch.cat([pool.dreams(pool.bank.ids_by_age()[-2:]), torch.rand(2, *SHAPE, 3, generator=g)])
    else:
        q = torch.rand(4, 3, generator=g)
    for mode in ("nearest", RetrievalMode.NEAREST):
        before = _usage(pool)
        plain = pool.retrieve(q, k=k, mode=mode)
        plain_usage = _usage(pool) - before
        before = _usage(pool)
        full = pool.retrieve(q, k=k, mode="nearest", mmr_lambda=0.3, min_dispersion=2.0, chroma_metric="euclidean")
        full_usage = _usage(pool) - before
        assert torch.equal(plain.ids, full.ids) and torch.equal(plain.scores, full.scores)
        assert torch.equal(plain_usage, full_usage)
    for bad, error in ((q[:, :2], DimensionMismatchError), (q.long(), InvalidInputError)):
        for options in ({}, {"mmr_lambda": 0.3}):
            with pytest.raises(error):
                pool.retrieve(bad, k=k, mode="nearest", **options)


def test_plain_nearest_checks_its_options():
    """The options of a nearest call are checked whether nearest reads them or not: bad ones raise, named."""
    config = PoolConfig(dream_shape=SHAPE, capacity=16, device="cpu", coherence_threshold=0.0, retrieval_mode="nearest")
    pool = DreamPool(config)
    pool.add(torch.rand(8, *SHAPE, 3, generator=torch.Generator().manual_seed(2)), coherence=torch.ones(8))
    q = pool.bank.columns["embeddings"][:1]
    for options, name in (
        ({"k": True}, "k"),
        ({"k": -1}, "k"),
        ({"k": 1 << 17}, "k"),
        ({"k": 2.0}, "k"),
        ({"mode": "nope"}, "mode"),
        ({"utility_threshold": float("nan")}, "utility_threshold"),
        ({"utility_threshold": False}, "utility_threshold"),
        ({"min_dispersion": -1.0}, "min_dispersion"),
        ({"chroma_metric": "manhattan"}, "chroma_metric"),
    ):
        with pytest.raises(InvalidInputError, match=name):
            pool.retrieve(q, **{"k": 3, "mode": "nearest", **options})
    assert pool.retrieve(q, k=3, mode="nearest", utility_threshold=float("inf")).ids.shape == (1, 3)
    default, explicit = pool.retrieve(q), pool.retrieve(q, k=config.retrieval_limit, mode="nearest", mmr_lambda=0.3)
    assert torch.equal(default.ids, explicit.ids) and torch.equal(default.scores, explicit.scores)
