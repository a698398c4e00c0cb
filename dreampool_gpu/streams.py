"""The pool's lock, which also orders its work across CUDA streams: :class:`StreamOrderedLock`.

A training loop may call the pool from several threads on several CUDA streams (a
background writer adding dreams beside the training step that retrieves). The lock
orders the host side; on the device each call runs on its caller's current stream,
and without more a read on one stream could run before a write issued earlier on
another. So every call first makes its stream wait for an event recorded at the end
of the previous call (whatever stream that was), and records its own at the end: the
pool's calls run on the device in the order they took the lock, with no host wait.
Tensors the pool keeps from call to call (the bank's age order, the fault flag) are
marked as used on each caller's stream, so the allocator never hands their memory to
another stream while a call may still read them.

While the caller's stream is capturing a CUDA graph (``torch.cuda.graph``), the lock orders
the host side only: waiting on an event recorded outside a capture is not allowed inside
it, and a replayed graph's work is ordered by the stream it is replayed on, like any
captured work.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import TracebackType

import torch


class StreamOrderedLock:
    """A re-entrant lock; on CUDA the outermost hold also orders streams (see the module docstring).

    Args:
        device: returns the pool's current device (it may move).
        kept: returns the tensors the pool keeps across calls (marked on each caller's stream).
    """

    def __init__(self, device: Callable[[], torch.device], kept: Callable[[], list[torch.Tensor]]) -> None:
        self._lock = threading.RLock()
        self._depth = 0
        self._device = device
        self._kept = kept
        self._done: torch.cuda.Event | None = None

    def __enter__(self) -> StreamOrderedLock:
        self._lock.acquire()
        self._depth += 1
        try:
            device = self._device()
            if self._depth == 1 and device.type == "cuda" and not _capturing(device):
                stream = torch.cuda.current_stream(device)
                if self._done is not None:
                    stream.wait_event(self._done)
                for t in self._kept():
                    if t.device.type == "cuda":
                        t.record_stream(stream)
        except BaseException:
            self._depth -= 1
            self._lock.release()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        try:
            device = self._device()
            if self._depth == 1 and device.type == "cuda" and not _capturing(device):
                done = torch.cuda.Event()
                done.record(torch.cuda.current_stream(device))
                self._done = done
        finally:
            self._depth -= 1
            self._lock.release()


def _capturing(device: torch.device) -> bool:
    """Whether ``device``'s current stream is capturing a CUDA graph."""
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()
