"""Crash safety: a process saving a large pool is SIGKILLed at random moments.

Each run starts a child (this file run as a script) that loads the checkpoint,
then adds and saves in a loop, printing ``start N`` before and ``done N`` after
each save (N = next_id). The parent kills it at a random moment, then loads the
checkpoint: it must verify and hold either the last completed save or the one
in flight, never anything else. The next run's child continues from there.
Half the runs force the portable two-rename swap instead of ``RENAME_EXCHANGE``.

``DREAMPOOL_CRASH_RUNS`` sets the number of runs (default 6; nightly: more).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import warnings

import torch

from dreampool_gpu import DreamPool, PoolConfig, persist
from dreampool_gpu.persist import CheckpointRecoveryWarning

SHAPE = (16, 16, 4)
CAPACITY = 4000  # ~48 MB of checkpoint: a save takes a few hundred ms here
RUNS = int(os.environ.get("DREAMPOOL_CRASH_RUNS", "6"))
MAX_CHILD_SAVES = 200  # a child the parent failed to kill still stops


def child(path: str, swap: str) -> None:
    """Load ``path``, then add and save forever (until killed)."""
    if swap == "two-renames":
        persist._rename_exchange = lambda a, b: False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointRecoveryWarning)
        pool = DreamPool.load(path)
    g = torch.Generator().manual_seed(os.getpid())
    for _ in range(MAX_CHILD_SAVES):
        pool.add(torch.rand(3, *SHAPE, 3, generator=g), coherence=torch.ones(3), force=True)
        print("start", pool.bank.next_id, flush=True)
        pool.save(path)
        print("done", pool.bank.next_id, flush=True)


def build_initial(path) -> float:
    """Save a full pool at ``path``; return the seconds one save took."""
    pool = DreamPool(PoolConfig(dream_shape=SHAPE, capacity=CAPACITY, device="cpu", coherence_threshold=0.0))
    g = torch.Generator().manual_seed(0)
    for _ in range(CAPACITY // 1000):
        pool.add(torch.rand(1000, *SHAPE, 3, generator=g), coherence=torch.rand(1000, generator=g))
    start = time.perf_counter()
    pool.save(path)
    return time.perf_counter() - start


def check_invariants(pool: DreamPool) -> None:
    ids = pool.bank.columns["ids"]
    live = ids[ids >= 0]
    assert live.numel() == pool.bank.size <= CAPACITY
    assert live.unique().numel() == live.numel()
    assert int(live.max()) < pool.bank.next_id
    hits = pool.retrieve(torch.rand(2, 3), k=4, mode="nearest")
    assert bool((hits.ids >= 0).all())


class TestCrash:
    def test_sigkill_during_saves_never_loses_the_checkpoint(self, tmp_path):
        ck = tmp_path / "ck"
        save_s = build_initial(ck)
        rng = random.Random(1234)
        expected = DreamPool.load(ck).bank.next_id
        outcomes = []
        for run in range(RUNS):
            swap = "exchange" if run % 2 == 0 else "two-renames"
            proc = subprocess.Popen([sys.executable, __file__, str(ck), swap], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
            lines: list[str] = []
            reader = threading.Thread(target=lambda p=proc, out=lines: out.extend(p.stdout), daemon=True)
            reader.start()
            deadline = time.monotonic() + 120
            while not any(line.startswith("start") for line in lines):
                assert proc.poll() is None, proc.stderr.read()
                assert time.monotonic() < deadline, "child never started saving"
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 3.0 * save_s))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            reader.join()
            proc.stderr.close()
            assert proc.returncode == -signal.SIGKILL, "child finished before it was killed"

            events = [line.split() for line in lines]
            done = [int(n) for kind, n in events if kind == "done"]
            last_done = done[-1] if done else expected
            in_flight = int(events[-1][1]) if events[-1][0] == "start" else None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", CheckpointRecoveryWarning)  # two-renames window
                loaded = DreamPool.load(ck)
            assert loaded.bank.next_id in {last_done, in_flight}, (loaded.bank.next_id, last_done, in_flight)
            check_invariants(loaded)
            outcomes.append((swap, len(done), in_flight is not None, loaded.bank.next_id == in_flight))
            expected = loaded.bank.next_id

        DreamPool.load(ck).save(ck)  # leftovers of the killed writers are cleaned by the next save
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
        mid_save = sum(1 for _, _, flying, _ in outcomes if flying)
        print(f"\ncrash test: {RUNS} kills, {mid_save} during a save "
              f"({sum(1 for *_, new in outcomes if new)} of those had already landed); "
              f"save {save_s:.2f}s; runs (swap, completed saves, mid-save, new landed): {outcomes}")
        if RUNS >= 4:
            assert mid_save >= 1, "no kill landed during a save: the test did not test anything"


if __name__ == "__main__":
    child(sys.argv[1], sys.argv[2])
