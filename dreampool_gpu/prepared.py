"""A fixed-shape retrieve, replayed as a CUDA graph: :meth:`DreamPool.prepare_retrieve`.

An eager ``retrieve`` launches a few dozen small kernels, each with a few microseconds of
host overhead; for one query that fixed cost dominates. With the batch shape, ``k``, the
mode and its options fixed, the whole call (checks on the device, encoder, k-NN,
re-ranking, gathers, usage counts) is captured once as a CUDA graph and replayed with a
single launch. The capture reads the bank's tensors in place, so it stays valid while
the bank's :attr:`~dreampool_gpu.bank.TensorBank.revision` and the encoder's version do
not change; after an ``add``, eviction or fit the next call captures again, and a capture
synchronises the device once (CUDA graph capture does): graphs pay off where the bank
changes rarely (evaluation, batch retrieval), not in a loop that adds every step. On CPU
(or where capture fails) the same call runs eagerly, still skipping the argument parsing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from dreampool_gpu import _validation as v
from dreampool_gpu import checks
from dreampool_gpu.errors import DimensionMismatchError, InvalidInputError
from dreampool_gpu.retrieval.request import check_request
from dreampool_gpu.retrieval.walk import Retrieval, walk

if TYPE_CHECKING:
    from dreampool_gpu.pool import DreamPool

_PER_QUERY = ("class_hint", "category", "utility_prior")
_WARMUP_RUNS = 2  # eager runs on a side stream before capture (allocator, cuBLAS workspaces)


class PreparedRetrieval:
    """``retrieve`` for queries of one shape and dtype, with every other argument fixed.

    Calls take only the queries (``[B, ...]`` as the example given to
    :meth:`DreamPool.prepare_retrieve`, on the pool's device) and return a
    :class:`~dreampool_gpu.pool.Retrieval` whose tensors are reused by the next call
    (clone them to keep them), as with any CUDA graph's outputs. Value checks are
    deferred (a bad query gives empty results and raises at the pool's next host read).

    Attributes:
        graphed: whether calls replay a CUDA graph (False on CPU, or when capture failed).
        captures: how many times the call was captured (once per bank revision it saw).
        reason: why calls run eagerly, when they do.
    """

    def __init__(
        self, pool: DreamPool, example: torch.Tensor, options: dict[str, Any], *, graph: bool, with_dreams: bool
    ) -> None:
        if callable(options.get("where")) and not isinstance(options.get("where"), torch.Tensor):
            raise InvalidInputError(
                "where",
                "a [capacity] bool mask (update it in place between calls) for a prepared retrieve",
                "a callable",
            )
        self.pool = pool
        self.with_dreams = with_dreams
        # per-query options as device tensors now: a copy from host memory cannot be captured
        self.options: dict[str, Any] = {
            name: torch.as_tensor(value).to(pool.device)
            if name in _PER_QUERY and value is not None and not isinstance(value, torch.Tensor)
            else value
            for name, value in options.items()
        }
        self.shape, self.dtype = tuple(example.shape), example.dtype
        self.static = example.detach().clone()
        self.graphed = graph and pool.device.type == "cuda"
        self.reason = None if self.graphed else ("not CUDA" if pool.device.type != "cuda" else "graph=False")
        self.captures = 0
        self._captured: tuple[Any, Retrieval] | None = None  # (CUDA graph, its output)
        self._state: tuple[int, int, int] | None = None
        # a trial run: bad options raise now, named (preparing is not the hot path: it reads the host)
        pending = pool.parts.fault.code.clone()
        pool.parts.fault.clear()
        try:
            with _usage_undone(pool):
                self._run()
            failed = int(pool.parts.fault.code)
            if failed:
                with checks.immediate():
                    check_request(pool.parts, self.static, **self.options)
                raise pool.parts.fault.error(failed)
        finally:
            pool.parts.fault.code.copy_(pending)  # an earlier call's fault stays as it was

    def __call__(self, queries: Any) -> Retrieval:
        """Retrieve for ``queries`` (the prepared shape and dtype, on the pool's device)."""
        pool = self.pool
        t = v.as_tensor(queries, "queries")
        if tuple(t.shape) != self.shape or t.dtype != self.dtype or t.device != pool.device:
            raise DimensionMismatchError(
                f"{list(self.shape)} {self.dtype} on {pool.device} (as prepared)",
                f"{list(t.shape)} {t.dtype} on {t.device}",
                "queries of a prepared retrieve",
            )
        with pool.parts.lock:
            pool.counters["queries"] += self.shape[0]
            if self.graphed:
                self.static.copy_(t)
                state = (pool.bank.revision, pool.encoder.version, id(pool.bank.columns["embeddings"]))
                if state != self._state:
                    self._captured = self._capture()  # None when capture failed: eager from now on
                    self._state = state
                if self._captured is not None:
                    graph, out = self._captured
                    graph.replay()
                    return out
            return self._run(t)

    def _run(self, queries: torch.Tensor | None = None) -> Retrieval:
        """The call, eagerly, on ``queries`` (default: the static input buffer)."""
        queries = self.static if queries is None else queries
        return walk(self.pool.parts, queries, self.options, with_dreams=self.with_dreams, sync_free=True)

    def _capture(self) -> tuple[Any, Retrieval] | None:
        """Capture the call on a side stream after warm-up runs (their usage counts undone).

        Returns:
            ``(graph, output)``, or None when capture failed (``graphed`` turns False, ``reason`` says why).
        """
        device = self.pool.device
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        try:
            with torch.cuda.stream(side):
                with _usage_undone(self.pool):
                    for _ in range(_WARMUP_RUNS):
                        self._run()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                    out = self._run()
        except RuntimeError as exc:  # e.g. a host read on a path the capture cannot hold: run eagerly
            self.graphed, self.reason = False, f"capture failed: {exc}"
            return None
        finally:
            torch.cuda.current_stream(device).wait_stream(side)
        self.captures += 1
        return graph, out


@contextmanager
def _usage_undone(pool: DreamPool) -> Iterator[None]:
    """Restore the bank's usage counts on leaving: runs that are not the caller's count no usage."""
    usage = pool.bank.columns["usage"]
    before = usage.clone()
    try:
        yield
    finally:
        usage.copy_(before)
