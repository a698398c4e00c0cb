"""Calls from several threads and CUDA streams see each other's work in lock order."""

from __future__ import annotations

import threading

import pytest
import torch

from dreampool_gpu import DreamPool, PoolConfig

SHAPE = (8, 8, 2)


def _writer_reader(device: str, rounds: int = 20) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A writer thread adds a batch (on a side stream on CUDA); the reader, told it is done,
    retrieves those very dreams on its own stream. Returns (added ids, top-1 ids) per round."""
    pool = DreamPool(PoolConfig(dream_shape=SHAPE, capacity=4096, device=device, engine="torch", checks="deferred"))
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(64, *SHAPE, 3, generator=g).to(device) for _ in range(rounds)]
    added: list[torch.Tensor] = []
    ready = [threading.Event() for _ in range(rounds)]

    def writer() -> None:
        side = torch.cuda.Stream(device=device) if device.startswith("cuda") else None
        for i, batch in enumerate(batches):
            if side is not None:
                with torch.cuda.stream(side):
                    side.wait_stream(torch.cuda.default_stream(device))  # the batch was made on the default stream
                    added.append(pool.add(batch, coherence=1.0))
            else:
                added.append(pool.add(batch, coherence=1.0))
            ready[i].set()

    thread = threading.Thread(target=writer)
    thread.start()
    out = []
    for i, batch in enumerate(batches):
        if not ready[i].wait(timeout=60):
            raise TimeoutError("writer thread stalled")
        out.append((added[i], pool.retrieve(batch, k=1, mode="nearest").ids[:, 0]))
    thread.join(timeout=60)
    return out


def test_reader_sees_writer_in_lock_order_on_cpu():
    for ids, top in _writer_reader("cpu"):
        assert torch.equal(ids, top)


@pytest.mark.gpu
def test_reader_on_default_stream_sees_writer_on_side_stream():
    if not torch.cuda.is_available():
        pytest.skip("gpu unavailable")
    for ids, top in _writer_reader("cuda"):
        assert torch.equal(ids.cpu(), top.cpu())


def test_lock_is_released_when_entering_fails():
    from dreampool_gpu.streams import StreamOrderedLock

    def kept() -> list[torch.Tensor]:
        raise TypeError("an encoder whose tensors cannot be listed")

    lock = StreamOrderedLock(lambda: torch.device("cuda"), kept)  # the CUDA branch: raises on any machine
    with pytest.raises((TypeError, AssertionError, RuntimeError)):
        with lock:
            pass
    taken = []
    thread = threading.Thread(target=lambda: taken.append(lock._lock.acquire(timeout=5)))
    thread.start()
    thread.join(timeout=10)
    assert taken == [True]


@pytest.mark.gpu
def test_a_replay_gather_captures_as_a_cuda_graph():
    """dreams + metadata of the ids sample returned, captured once and replayed, answer as eagerly."""
    if not torch.cuda.is_available():
        pytest.skip("gpu unavailable")
    pool = DreamPool(PoolConfig(dream_shape=(4, 4, 1), capacity=64, device="cuda", coherence_threshold=0.0))
    g = torch.Generator().manual_seed(0)
    pool.add(torch.rand(48, 4, 4, 1, 3, generator=g).cuda(), coherence=1.0, class_label=torch.arange(48).cuda() % 5)
    ids = pool.sample(8, generator=g)

    def gather():
        return pool.dreams(ids), pool.metadata(ids, columns=("class_label",))["class_label"]

    eager = gather()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            gather()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = gather()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured[0], eager[0]) and torch.equal(captured[1], eager[1])
