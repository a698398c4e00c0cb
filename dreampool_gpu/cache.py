"""LRU cache from quantised query signatures to embeddings (docs/spec.md §Query cache)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch

from dreampool_gpu.errors import InvalidInputError

Key = tuple[int, ...]


def query_keys(chroma: torch.Tensor, class_hint: torch.Tensor, utility_prior: torch.Tensor) -> list[Key]:
    """One key per query: chroma, class hint and utility prior, each x1000 and rounded.

    Queries within about 0.001 per component share a key. The original keyed on
    chroma alone although class and utility change the embedding; they are part
    of the key here. One host transfer for the whole batch.
    """
    chroma_q = torch.round(chroma.float() * 1000).long()
    util_q = torch.round(utility_prior.float() * 1000).long()
    packed = torch.cat([chroma_q, class_hint.long()[:, None], util_q[:, None]], dim=1).cpu()
    return [tuple(row) for row in packed.tolist()]


class QueryCache:
    """LRU map ``key -> [D]`` embedding with hit and miss counters.

    Args:
        capacity: entries kept; 0 disables the cache (every lookup computes).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.hits = 0
        self.misses = 0
        self._store: OrderedDict[Key, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._store)

    @property
    def hit_rate(self) -> float:
        """hits / (hits + misses), 0 before any lookup."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def get_or_compute(
        self, keys: list[Key], compute: Callable[[torch.Tensor], torch.Tensor], out: torch.Tensor
    ) -> torch.Tensor:
        """Fill ``out`` ``[B, D]`` row by row: cached rows copied, missing rows computed.

        Args:
            keys: one key per row of ``out``.
            compute: given ``[m]`` int64 row indices of the misses, returns their
                ``[m, D]`` embeddings (one batched call).
            out: destination, on the embeddings' device.
        """
        missing = []
        hit_rows, hit_values = [], []
        for row, key in enumerate(keys):
            cached = self._store.get(key) if self.capacity else None
            if cached is None:
                missing.append(row)
            else:
                self._store.move_to_end(key)
                hit_rows.append(row)
                hit_values.append(cached)
        self.hits += len(hit_rows)
        self.misses += len(missing)
        if hit_rows:
            if out.is_cuda:  # kept across calls: never reused by another stream while this one reads it
                stream = torch.cuda.current_stream(out.device)
                for value in hit_values:
                    value.record_stream(stream)
            out[torch.tensor(hit_rows, device=out.device)] = torch.stack(hit_values)
        if missing:
            index = torch.tensor(missing, device=out.device)
            computed = compute(index)
            out[index] = computed
            if self.capacity:
                for row, value in zip(missing, computed, strict=False):
                    self._store[keys[row]] = value
                    self._store.move_to_end(keys[row])
                    if len(self._store) > self.capacity:
                        self._store.popitem(last=False)
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
        self.hits = 0
        self.misses = 0
