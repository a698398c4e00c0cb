"""LRU cache from exact query batches to their embeddings (docs/spec.md §Query cache)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch

from dreampool_gpu.errors import InvalidInputError

Key = tuple[str, bytes]


def query_keys(chroma: torch.Tensor, class_hint: torch.Tensor, utility_prior: torch.Tensor) -> list[Key]:
    """One key per query ``[3]`` chroma, ``[]`` class hint, ``[]`` utility prior: their dtypes and exact bytes.

    Two queries share a key only when every input of their embedding is bit-for-bit
    the same. One host transfer for the whole batch.
    """
    parts = (chroma, class_hint[:, None], utility_prior[:, None])
    packed = torch.cat([_row_bytes(p) for p in parts], dim=1).cpu().numpy()
    dtypes = ",".join(str(p.dtype) for p in parts) + f"x{chroma.shape[1]}"
    return [(dtypes, row.tobytes()) for row in packed]


def _row_bytes(t: torch.Tensor) -> torch.Tensor:
    """``[B, m]`` -> ``[B, m * itemsize]`` uint8: each row's bytes (a dense copy: broadcast inputs have stride 0)."""
    dense = torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)
    return dense.view(torch.uint8).reshape(t.shape[0], t.shape[1] * t.element_size())


class QueryCache:
    """LRU map from a whole batch of query keys to its ``[B, D]`` embeddings, with hit and miss counters.

    A batch is served from the cache only when the very same batch (same queries, same
    order, same bytes) was computed before, so a hit is exactly what computing it again
    gives: encoders need not give a query the same last bits in every batch (a BLAS
    takes other paths for other batch sizes), and a cache of single queries would make
    an answer depend on the batch the query was first asked in.

    Args:
        capacity: query embeddings kept, summed over the cached batches (a larger batch is
            not kept); 0 disables the cache (every lookup computes).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.hits = 0
        self.misses = 0
        self._store: OrderedDict[tuple[Key, ...], torch.Tensor] = OrderedDict()
        self._rows = 0

    def __len__(self) -> int:
        """Query embeddings held."""
        return self._rows

    @property
    def hit_rate(self) -> float:
        """hits / (hits + misses), counted in queries; 0 before any lookup."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def get_or_compute(
        self, keys: list[Key], compute: Callable[[torch.Tensor], torch.Tensor], out: torch.Tensor
    ) -> torch.Tensor:
        """Fill ``out`` ``[B, D]``: copied from the cache when this batch was computed before, else computed.

        Args:
            keys: one key per row of ``out`` (:func:`query_keys`).
            compute: given ``[B]`` int64 row indices (all rows, in order), returns their
                ``[B, D]`` embeddings (one batched call).
            out: destination, on the embeddings' device.
        """
        batch = tuple(keys)
        cached = self._store.get(batch) if self.capacity else None
        if cached is not None:
            self._store.move_to_end(batch)
            self.hits += len(batch)
            if out.is_cuda:  # kept across calls: never reused by another stream while this one reads it
                cached.record_stream(torch.cuda.current_stream(out.device))
            return out.copy_(cached)
        self.misses += len(batch)
        computed = compute(torch.arange(len(batch), device=out.device))
        out.copy_(computed)
        if 0 < len(batch) <= self.capacity:
            self._store[batch] = computed
            self._rows += len(batch)
            while self._rows > self.capacity:
                self._rows -= self._store.popitem(last=False)[1].shape[0]
        return out

    def state_dict(self) -> dict[str, Any]:
        """The cache's state: ``{"capacity": int}``.

        Entries are derived (query embeddings under the encoder state of the moment) and
        the hit and miss counts describe this process's lookups, so neither is carried:
        a loaded pool starts with an empty cache and recomputes on the first miss.
        """
        return {"capacity": self.capacity}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Adopt ``state`` (from :meth:`state_dict`): the cache is emptied and its counters reset.

        The capacity stays this cache's own (the pool's ``query_cache_size``), as a pool
        keeps its own configuration when it loads another's state.

        Raises:
            InvalidInputError: ``state`` is not a mapping with an int ``capacity`` >= 0.
        """
        capacity = state.get("capacity") if isinstance(state, Mapping) else None
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise InvalidInputError("state", "a mapping with an int capacity >= 0", repr(state)[:80])
        self.clear()

    def clear(self) -> None:
        """Drop every entry and reset the counters."""
        self._store.clear()
        self._rows = 0
        self.hits = 0
        self.misses = 0
