"""The cost of a training step's pool calls against a plain-tensor buffer doing the same, in one run.

One thread (``torch.set_num_threads(1)``) for every benchmark of this file. Groups (role
``baseline`` first; ``benchmarks/report.py`` turns the others into cost ratios):

- ``step ER 28x28x1 m=500 b=10``: one experience-replay step, ``sample(10)`` + ``dreams(ids)`` +
  ``metadata(ids, columns=("class_label",))`` + ``add(10)`` into a full FIFO pool of 500 (and the
  same step with ``metadata(ids)``, every column: the features of the entries added since are
  computed at each step), against
  a plain buffer (a random index + gather, and a reservoir write of the 10 new dreams: the
  baseline) and, where ``torchrl`` imports, TorchRL's ``ReplayBuffer(LazyTensorStorage(500),
  RandomSampler())`` (``sample()`` + ``extend()``).
- ``step add 10 28x28x1 m=500``: ``add`` of 10 dreams into the full pool vs the plain reservoir write.
- ``step feedback 24 m=500``: ``feedback`` of 24 ids vs the same record kept in plain columns
  (an ``index_put_`` of the last utility, ``index_add_`` of the sum and the count).
- ``step nearest n=10000 B=b`` (b = 1, 256): ``retrieve(mode="nearest")`` and ``mode="hybrid"``
  (fetch_k 40) with embedding queries vs raw ``q @ X.T`` + ``topk`` over the same embeddings.

TorchRL is a comparison only (``pip install --no-deps torchrl tensordict`` beside this torch);
its row is skipped where it does not import.
"""

from __future__ import annotations

import pytest
import torch

from dreampool_gpu import DreamPool, PoolConfig

SHAPE = (28, 28, 1)
MEMORY, BATCH, FEEDBACK = 500, 10, 24
N, D, K = 10_000, 64, 10
ROUNDS, ITERATIONS = 101, 3


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _stream(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """64 batches of new dreams ``[64, BATCH, 28, 28, 1, 3]`` and labels ``[64, BATCH]`` (the adds cycle)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(64, BATCH, *SHAPE, 3, generator=g), torch.randint(0, 10, (64, BATCH), generator=g)


def _cycle(batches: tuple[torch.Tensor, torch.Tensor]):
    dreams, labels = batches
    i = 0
    while True:
        yield dreams[i % 64], labels[i % 64]
        i += 1


class PlainBuffer:
    """The 30-line tensor buffer a training loop would write: preallocated tensors, reservoir writes."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        self.dreams = torch.zeros(capacity, *SHAPE, 3)
        self.labels = torch.full((capacity,), -1, dtype=torch.int64)
        self.capacity, self.seen = capacity, 0
        self.g = torch.Generator().manual_seed(seed)

    def add(self, dreams: torch.Tensor, labels: torch.Tensor) -> None:
        """Reservoir sampling: the i-th dream ever seen lands at a uniform slot in [0, i] when that is < capacity."""
        n = dreams.shape[0]
        seen = torch.arange(self.seen, self.seen + n)
        slot = torch.where(seen < self.capacity, seen, (torch.rand(n, generator=self.g) * (seen + 1)).long())
        keep = slot < self.capacity
        self.dreams[slot[keep]] = dreams[keep]
        self.labels[slot[keep]] = labels[keep]
        self.seen += n

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(min(self.seen, self.capacity), (n,), generator=self.g)
        return self.dreams[idx], self.labels[idx]


def _full_pool(**config) -> DreamPool:
    pool = DreamPool(
        PoolConfig(
            dream_shape=SHAPE,
            capacity=MEMORY,
            device="cpu",
            coherence_threshold=0.0,
            dream_dtype="float32",
            **config,
        )
    )
    dreams, labels = _stream(1)
    for i in range(MEMORY // BATCH):
        pool.add(dreams[i % 64], coherence=torch.ones(BATCH), class_label=labels[i % 64])
    return pool


def _full_plain() -> PlainBuffer:
    plain = PlainBuffer(MEMORY)
    dreams, labels = _stream(1)
    for i in range(MEMORY // BATCH):
        plain.add(dreams[i % 64], labels[i % 64])
    return plain


def _time(benchmark, fn) -> None:
    benchmark.pedantic(fn, rounds=ROUNDS, iterations=ITERATIONS, warmup_rounds=5)


# ------------------------------------------------------------------ replay step
@pytest.mark.parametrize("variant", ["plain", "pool", "pool-all-columns", "torchrl"])
def test_er_step(benchmark, record_median, variant):
    benchmark.group = f"step ER {'x'.join(map(str, SHAPE))} m={MEMORY} b={BATCH}"
    benchmark.extra_info.update(memory=MEMORY, batch=BATCH, variant=variant, threads=1)
    new = _cycle(_stream(2))
    g = torch.Generator().manual_seed(3)
    ones = torch.ones(BATCH)
    if variant == "plain":
        plain = _full_plain()

        def step():
            dreams, labels = plain.sample(BATCH)
            x, y = next(new)
            plain.add(x, y)
            return dreams, labels

    elif variant.startswith("pool"):
        pool = _full_pool()
        columns = None if variant == "pool-all-columns" else ("class_label",)  # None: features too, every step

        def step():
            ids = pool.sample(BATCH, generator=g)
            dreams = pool.dreams(ids)
            labels = pool.metadata(ids, columns=columns)["class_label"]
            x, y = next(new)
            pool.add(x, coherence=ones, class_label=y)
            return dreams, labels

    else:
        rl = pytest.importorskip("torchrl.data", reason="torchrl is a comparison only (a bench extra)")
        from tensordict import TensorDict

        buffer = rl.ReplayBuffer(storage=rl.LazyTensorStorage(MEMORY), sampler=rl.RandomSampler(), batch_size=BATCH)
        dreams, labels = _stream(1)
        for i in range(MEMORY // BATCH):
            buffer.extend(TensorDict({"dreams": dreams[i % 64], "labels": labels[i % 64]}, batch_size=[BATCH]))

        def step():
            batch = buffer.sample()
            x, y = next(new)
            buffer.extend(TensorDict({"dreams": x, "labels": y}, batch_size=[BATCH]))
            return batch["dreams"], batch["labels"]

    _time(benchmark, step)
    record_median(benchmark, "baseline" if variant == "plain" else variant)


@pytest.mark.parametrize("variant", ["plain", "pool"])
def test_add(benchmark, record_median, variant):
    benchmark.group = f"step add {BATCH} {'x'.join(map(str, SHAPE))} m={MEMORY}"
    benchmark.extra_info.update(memory=MEMORY, batch=BATCH, variant=variant, threads=1)
    new = _cycle(_stream(2))
    ones = torch.ones(BATCH)
    if variant == "plain":
        plain = _full_plain()

        def step():
            x, y = next(new)
            plain.add(x, y)

    else:
        pool = _full_pool()

        def step():
            x, y = next(new)
            return pool.add(x, coherence=ones, class_label=y)

    _time(benchmark, step)
    record_median(benchmark, "baseline" if variant == "plain" else variant)


@pytest.mark.parametrize("variant", ["plain", "pool"])
def test_feedback(benchmark, record_median, variant):
    benchmark.group = f"step feedback {FEEDBACK} m={MEMORY}"
    benchmark.extra_info.update(memory=MEMORY, n=FEEDBACK, variant=variant, threads=1)
    g = torch.Generator().manual_seed(4)
    utility = torch.rand(FEEDBACK, generator=g)
    if variant == "plain":  # the same record in plain columns: last utility, and a running sum and count
        last, total, count = torch.zeros(MEMORY), torch.zeros(MEMORY), torch.zeros(MEMORY, dtype=torch.int32)
        slots = torch.randint(MEMORY, (FEEDBACK,), generator=g)
        ones = torch.ones(FEEDBACK, dtype=torch.int32)

        def fn():
            last.index_put_((slots,), utility)
            total.index_add_(0, slots, utility)
            count.index_add_(0, slots, ones)

    else:
        pool = _full_pool()
        ids = pool.sample(FEEDBACK, generator=g)
        fn = lambda: pool.feedback(ids, utility)  # noqa: E731
    _time(benchmark, fn)
    record_median(benchmark, "baseline" if variant == "plain" else variant)


# --------------------------------------------------------------------- retrieve
@pytest.fixture(scope="module")
def search_pool() -> DreamPool:
    """10K entries (4x4x1 dreams), embedded by the pool's own encoder; the torch engine."""
    pool = DreamPool(
        PoolConfig(
            dream_shape=(4, 4, 1),
            capacity=N,
            embedding_dim=D,
            device="cpu",
            engine="torch",
            coherence_threshold=0.0,
            query_cache_size=0,
            dream_dtype="float32",
        )
    )
    g = torch.Generator().manual_seed(5)
    pool.add(torch.rand(N, 4, 4, 1, 3, generator=g), coherence=torch.ones(N))
    pool.retrieve(torch.rand(1, 3, generator=g), k=1, mode="nearest")  # features of the whole bank now
    return pool


@pytest.mark.parametrize("b", [1, 256])
@pytest.mark.parametrize("variant", ["raw", "nearest", "hybrid"])
def test_retrieve(benchmark, record_median, search_pool, b, variant):
    benchmark.group = f"step nearest n={N} B={b}"
    benchmark.extra_info.update(n=N, B=b, k=K, variant=variant, threads=1)
    pool = search_pool
    g = torch.Generator().manual_seed(6)
    vectors = pool.bank.columns["embeddings"]
    q = vectors[torch.randint(N, (b,), generator=g)] + 0.01 * torch.randn(b, D, generator=g)
    q = torch.nn.functional.normalize(q, dim=1)
    if variant == "raw":
        fn = lambda: (q @ vectors.T).topk(K, dim=1)  # noqa: E731
    elif variant == "nearest":
        fn = lambda: pool.retrieve(q, k=K, mode="nearest")  # noqa: E731
    else:
        fn = lambda: pool.retrieve(q, k=K, mode="hybrid", fetch_k=4 * K)  # noqa: E731
    rounds = ROUNDS if b == 1 else 21
    benchmark.pedantic(fn, rounds=rounds, iterations=ITERATIONS, warmup_rounds=3)
    record_median(benchmark, "baseline" if variant == "raw" else variant)
