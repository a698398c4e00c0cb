"""Thread safety: 4 writer and 4 reader threads share one pool, 10,000 operations in all.

Writers add (with eviction churn), give feedback and save to one shared path;
readers retrieve in every mode and read dreams, metadata and stats. Afterwards:
every issued id is unique and ids form 0..next_id-1 with no gaps, the size stays
within capacity and matches the counters, every returned id was alive when
returned, the memory budget (which sizes the pool) holds, and the search index
agrees with the bank.

"Alive when returned" is checked two ways. With FIFO eviction the live ids are
always the newest ``size <= capacity`` issued, so an id below
``next_id - capacity`` read *before* a call was dead throughout it: no call
may return one. Every 8th read also holds the pool's (re-entrant) lock around
the call and compares the returned ids with the bank at that instant.
"""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from dreampool_gpu import DreamPool, PoolConfig, persist

SHAPE = (4, 4, 2)
CAPACITY = 200
BUDGET_MB = 0.1  # holds ~120 entries of SHAPE: the budget, not CAPACITY, bounds the pool
THREADS = 4
OPS_PER_THREAD = 1250  # 8 threads x 1250 = 10,000 operations
MODES = [
    ("similar", {}),
    ("class", {"class_hint": 3}),
    ("balanced", {"classes": [0, 4]}),
    ("utility", {"utility_threshold": 0.2}),
    ("diverse", {}),
    ("soft", {}),
    ("hybrid", {"class_hint": 1}),
    ("category", {}),
    ("nearest", {}),
]


def live_ids(pool):
    ids = pool.bank.columns["ids"]
    return set(ids[ids >= 0].tolist())


def assert_index_agrees(pool):
    """Each live entry finds itself, and a full-k search returns exactly the live slots."""
    slots = pool.bank.slots_by_age()
    if slots.numel() == 0:
        return
    queries = pool.bank.columns["embeddings"][slots[:16]]
    _, found = pool.index.search(queries, CAPACITY)
    alive = set(slots.tolist())
    for row in found.tolist():
        assert {s for s in row if s >= 0} == alive


class Workload:
    def __init__(self, pool, path):
        self.pool = pool
        self.path = path
        self.start = threading.Barrier(2 * THREADS)
        self.lock = threading.Lock()  # guards the tallies below, not the pool
        self.issued: list[int] = []
        self.offered = 0
        self.feedback = 0
        self.queries = 0
        self.returned = 0
        self.strict_checks = 0
        self.saves = 0

    def writer(self, seed):
        rng = random.Random(seed)
        g = torch.Generator().manual_seed(seed)
        pool = self.pool
        self.start.wait()
        for op in range(OPS_PER_THREAD):
            if op % 250 == 249:
                pool.save(self.path)
                with self.lock:
                    self.saves += 1
            elif op % 3 == 2:
                top = pool.bank.next_id
                ids = torch.tensor([rng.randrange(-1, max(top, 1)) for _ in range(6)])
                recorded = pool.feedback(ids, torch.rand(6, generator=g))
                with self.lock:
                    self.feedback += recorded
            else:
                n = rng.randint(1, 8)
                dreams = torch.rand(n, *SHAPE, 3, generator=g)
                ids = pool.add(
                    dreams, coherence=torch.rand(n, generator=g), class_label=torch.randint(-1, 10, (n,), generator=g)
                )
                with self.lock:
                    self.issued += [i for i in ids.tolist() if i >= 0]
                    self.offered += n

    def reader(self, seed):
        rng = random.Random(seed)
        g = torch.Generator().manual_seed(seed)
        pool = self.pool
        self.start.wait()
        for op in range(OPS_PER_THREAD):
            kind = op % 4
            if kind == 3:
                ids = torch.tensor([rng.randrange(-1, pool.bank.next_id + 1) for _ in range(5)])
                ids = ids.clamp(max=pool.bank.next_id - 1)
                meta = pool.metadata(ids) if op % 8 == 3 else None
                dreams = pool.dreams(ids)
                assert dreams.shape == (5, *SHAPE, 3)
                if meta is not None:
                    assert bool((meta["ids"][meta["found"]] == ids[meta["found"]]).all())
                stats = pool.stats()
                assert stats["size"] <= pool.capacity and stats["memory"]["within_budget"]
                continue
            mode, kwargs = MODES[rng.randrange(len(MODES))]
            queries = torch.rand(rng.randint(1, 4), 3, generator=g)
            k = rng.randint(0, 12)
            strict = op % 8 == 0
            floor = pool.bank.next_id - pool.capacity  # ids below this were dead before the call
            if strict:
                with pool._lock:
                    hits = pool.retrieve(queries, k=k, mode=mode, **kwargs)
                    alive = live_ids(pool)
            else:
                hits = pool.retrieve(queries, k=k, mode=mode, **kwargs)
            width = k * len(kwargs["classes"]) if mode == "balanced" else k  # balanced: k per class
            assert hits.ids.shape == (queries.shape[0], width)
            for row in hits.ids.tolist():
                present = [i for i in row if i >= 0]
                assert len(set(present)) == len(present), (mode, row)  # no entry twice per query
            got = [i for i in hits.ids.flatten().tolist() if i >= 0]
            assert all(i >= floor for i in got), (mode, floor, got)
            if strict:
                assert set(got) <= alive, (mode, set(got) - alive)
            with self.lock:
                self.queries += queries.shape[0]
                self.returned += len(got)
                self.strict_checks += strict


@pytest.mark.slow
class TestThreads:
    def test_four_writers_four_readers(self, tmp_path):
        config = PoolConfig(
            dream_shape=SHAPE,
            capacity=CAPACITY,
            device="cpu",
            coherence_threshold=0.3,
            eviction_policy="fifo",
            query_cache_size=32,
            memory_budget_mb=BUDGET_MB,
        )
        pool = DreamPool(config)
        assert pool.capacity < CAPACITY  # derived from the budget
        work = Workload(pool, tmp_path / "ck")
        with ThreadPoolExecutor(2 * THREADS) as ex:
            futures = [ex.submit(work.writer, 100 + i) for i in range(THREADS)]
            futures += [ex.submit(work.reader, 200 + i) for i in range(THREADS)]
            for f in futures:
                f.result()  # re-raises a thread's failure here

        bank, counters = pool.bank, pool.counters
        assert sorted(work.issued) == list(range(bank.next_id))  # unique, no gaps, none lost
        assert counters["added"] == bank.next_id
        assert counters["added"] + counters["rejected"] + counters["dropped"] == work.offered
        assert bank.size == counters["added"] - counters["evicted"] <= pool.capacity
        assert pool.stats()["memory"]["within_budget"]
        live = live_ids(pool)
        assert len(live) == bank.size
        assert live == set(range(bank.next_id - bank.size, bank.next_id))  # FIFO keeps the newest
        assert counters["feedback"] == work.feedback
        assert counters["queries"] == work.queries
        assert_index_agrees(pool)
        assert work.returned > 1000 and work.strict_checks > 100 and work.saves == THREADS * 5

        saved = DreamPool.load(tmp_path / "ck")
        assert saved.bank.next_id <= bank.next_id
        saved_live = live_ids(saved)
        assert len(saved_live) == saved.bank.size <= pool.capacity
        assert saved_live == set(range(saved.bank.next_id - saved.bank.size, saved.bank.next_id))
        assert_index_agrees(saved)


class TestReadersDuringSaves:
    @pytest.mark.filterwarnings("ignore::dreampool_gpu.persist.CheckpointRecoveryWarning")
    @pytest.mark.parametrize("swap", ["exchange", "two-renames"])
    def test_every_load_is_one_whole_checkpoint(self, tmp_path, monkeypatch, swap):
        """3 threads load while a 4th adds and saves to the same path: no load fails or mixes two saves."""
        if swap == "two-renames":
            monkeypatch.setattr(persist.files, "_rename_exchange", lambda a, b: False)
        pool = DreamPool(PoolConfig(dream_shape=SHAPE, capacity=64, device="cpu", coherence_threshold=0.0))
        g = torch.Generator().manual_seed(0)
        pool.add(torch.rand(64, *SHAPE, 3, generator=g), coherence=torch.ones(64))
        ck = tmp_path / "ck"
        pool.save(ck)
        written = {pool.bank.next_id}  # next_id of every checkpoint a save may have put in place
        done = threading.Event()
        loads = []

        def writer():
            try:
                for _ in range(40):
                    pool.add(torch.rand(5, *SHAPE, 3, generator=g), coherence=torch.ones(5))
                    written.add(pool.bank.next_id)
                    pool.save(ck)
            finally:
                done.set()

        def reader():
            while not done.is_set():
                loaded = DreamPool.load(ck)
                top, size = loaded.bank.next_id, loaded.bank.size
                assert top in written and size == 64
                assert live_ids(loaded) == set(range(top - size, top))  # that checkpoint's entries, whole
                loads.append(top)

        with ThreadPoolExecutor(4) as ex:
            futures = [ex.submit(writer)] + [ex.submit(reader) for _ in range(3)]
            for f in futures:
                f.result()
        assert len(loads) >= 10 and len(set(loads)) >= 3, loads
