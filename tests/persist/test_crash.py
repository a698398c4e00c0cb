"""Crash safety: a process saving a large pool is SIGKILLed at random moments.

Each run starts a child (this file run as a script) that loads the checkpoint,
then adds and saves in a loop, printing ``start N`` before and ``done N`` after
each save (N = next_id). Every filesystem step of a save (each file written, each
directory fsync, rename, exchange and removal) first prints ``step NAME`` and
waits for the parent's go-ahead on stdin. The parent picks a random step among
the next few saves and kills the child there, then loads the checkpoint: it must
verify and hold either the last completed save or the one in flight, never
anything else. The next run's child continues from there. Half the runs force
the portable two-rename swap instead of ``RENAME_EXCHANGE``. The moment of the
kill is counted in steps, not measured with a clock, so it lands inside a save
on any machine.

``DREAMPOOL_CRASH_RUNS`` sets the number of runs (default 6; nightly: more).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import warnings

import pytest
import torch

from dreampool_gpu import DreamPool, PoolConfig, persist
from dreampool_gpu.persist import CheckpointRecoveryWarning

SHAPE = (16, 16, 4)
CAPACITY = 4000  # ~48 MB of checkpoint
RUNS = int(os.environ.get("DREAMPOOL_CRASH_RUNS", "6"))
MAX_CHILD_SAVES = 200  # a child the parent failed to kill still stops
MAX_KILL_STEP = 30  # the kill lands on one of the first 30 steps: within the first ~3 saves


def _paused(fn, name):
    """``fn`` behind a handshake: print ``step name``, wait for a line on stdin, then run."""

    def step(*args, **kwargs):
        print("step", name, flush=True)
        sys.stdin.readline()
        return fn(*args, **kwargs)

    return step


def child(path: str, swap: str) -> None:
    """Load ``path``, then add and save forever (until killed), pausing before every filesystem step."""
    if swap == "two-renames":
        persist.files._rename_exchange = lambda a, b: False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointRecoveryWarning)
        pool = DreamPool.load(path)
    persist.files._write_file = _paused(persist.files._write_file, "write")
    persist.files._fsync_dir = _paused(persist.files._fsync_dir, "fsync")
    persist.files._rename_exchange = _paused(persist.files._rename_exchange, "exchange")
    os.rename = _paused(os.rename, "rename")
    shutil.rmtree = _paused(shutil.rmtree, "rmtree")
    g = torch.Generator().manual_seed(os.getpid())
    for _ in range(MAX_CHILD_SAVES):
        pool.add(torch.rand(3, *SHAPE, 3, generator=g), coherence=torch.ones(3), force=True)
        print("start", pool.bank.next_id, flush=True)
        pool.save(path)
        print("done", pool.bank.next_id, flush=True)


def build_initial(path) -> None:
    """Save a full pool at ``path``."""
    pool = DreamPool(PoolConfig(dream_shape=SHAPE, capacity=CAPACITY, device="cpu", coherence_threshold=0.0))
    g = torch.Generator().manual_seed(0)
    for _ in range(CAPACITY // 1000):
        pool.add(torch.rand(1000, *SHAPE, 3, generator=g), coherence=torch.rand(1000, generator=g))
    pool.save(path)


def run_child_until_step(ck, swap: str, kill_step: int, stderr_path) -> tuple[list[list[str]], str]:
    """Run a child on ``ck``, SIGKILL it at its ``kill_step``-th step; its event lines and last step."""
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, __file__, str(ck), swap],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            bufsize=1,
        )
        events, steps, where = [], 0, ""
        for line in proc.stdout:
            kind, arg = line.split()
            if kind != "step":
                events.append([kind, arg])
                continue
            steps += 1
            if steps == kill_step:
                where = arg
                proc.send_signal(signal.SIGKILL)
                break
            proc.stdin.write("\n")
            proc.stdin.flush()
        proc.wait()
        proc.stdout.close()
        proc.stdin.close()
    assert proc.returncode == -signal.SIGKILL, f"child ended before it was killed: {stderr_path.read_text()}"
    return events, where


def check_invariants(pool: DreamPool) -> None:
    ids = pool.bank.columns["ids"]
    live = ids[ids >= 0]
    assert live.numel() == pool.bank.size <= CAPACITY
    assert live.unique().numel() == live.numel()
    assert int(live.max()) < pool.bank.next_id
    hits = pool.retrieve(torch.rand(2, 3), k=4, mode="nearest")
    assert bool((hits.ids >= 0).all())


@pytest.mark.slow
class TestCrash:
    def test_sigkill_during_saves_never_loses_the_checkpoint(self, tmp_path):
        ck = tmp_path / "ck"
        build_initial(ck)
        rng = random.Random(1234)
        expected = DreamPool.load(ck).bank.next_id
        outcomes = []
        for run in range(RUNS):
            swap = "exchange" if run % 2 == 0 else "two-renames"
            events, where = run_child_until_step(ck, swap, rng.randint(1, MAX_KILL_STEP), tmp_path / "stderr.txt")
            done = [int(n) for kind, n in events if kind == "done"]
            last_done = done[-1] if done else expected
            in_flight = int(events[-1][1]) if events and events[-1][0] == "start" else None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", CheckpointRecoveryWarning)  # two-renames window
                loaded = DreamPool.load(ck)
            assert loaded.bank.next_id in {last_done, in_flight}, (loaded.bank.next_id, last_done, in_flight)
            check_invariants(loaded)
            outcomes.append((swap, len(done), where, in_flight is not None, loaded.bank.next_id == in_flight))
            expected = loaded.bank.next_id

        (tmp_path / "stderr.txt").unlink()
        DreamPool.load(ck).save(ck)  # leftovers of the killed writers are cleaned by the next save
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
        mid_save = sum(1 for *_, flying, _ in outcomes if flying)
        print(
            f"\ncrash test: {RUNS} kills, {mid_save} during a save "
            f"({sum(1 for *_, new in outcomes if new)} of those had already landed); "
            f"runs (swap, completed saves, killed before step, mid-save, new landed): {outcomes}"
        )
        if RUNS >= 4:
            assert mid_save >= 1, "no kill landed during a save: the test did not test anything"


if __name__ == "__main__":
    child(sys.argv[1], sys.argv[2])
