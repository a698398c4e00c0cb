"""The ``SearchIndex`` contract every k-NN engine of the pool fulfils."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch


class SearchIndex(ABC):
    """k-NN over the live rows of a :class:`~dreampool_gpu.bank.TensorBank`'s embeddings.

    Engines read the bank's ``embeddings`` column; they may keep derived state
    (compressed codes, a trained quantiser) but never a second full copy of the
    vectors. Results are slots, not ids: the pool maps them.

    Attributes:
        kind: the engine's name (stable; checkpoints match serialized state by it).
        last_engine: ``kind`` of the engine that answered the latest search
            (engines that delegate, e.g. to exact search for a masked query, say so);
            None before the first search.
    """

    kind: str = "abstract"
    last_engine: str | None = None

    def add(self, slots: torch.Tensor) -> None:  # noqa: B027 - optional hook
        """Entries were written at ``slots`` ``[m]`` (int64, bank device)."""

    def remove(self, slots: torch.Tensor) -> None:  # noqa: B027 - optional hook
        """Entries at ``slots`` ``[m]`` were evicted; they must never be returned."""

    def reset(self) -> None:  # noqa: B027 - optional hook
        """The bank was cleared or reloaded; drop every derived structure."""

    def nbytes(self) -> int:
        """Bytes of derived state held by the engine (0 for pure scans)."""
        return 0

    def describe(self) -> dict[str, Any]:
        """Plain facts for ``DreamPool.stats()``: kind, last engine, index bytes."""
        return {"kind": self.kind, "last_engine": self.last_engine, "index_bytes": self.nbytes()}

    def serialize(self) -> bytes | None:
        """Derived state worth saving in a checkpoint (None: rebuild from the bank)."""
        return None

    def deserialize(self, data: bytes) -> None:  # noqa: B027 - optional hook
        """Restore what :meth:`serialize` returned, for the bank it was saved with."""

    @abstractmethod
    def search(
        self, queries: torch.Tensor, k: int, *, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k live entries for each query.

        Args:
            queries: ``[B, D]`` float32 on the bank's device (unit vectors for cosine).
            k: neighbours per query (may exceed the pool size).

        Keyword Args:
            mask: optional ``[capacity]`` or ``[B, capacity]`` bool; only True slots qualify.

        Returns:
            ``(scores, slots)``, each ``[B, k]``: scores float32 (cosine, or minus the
            euclidean distance; higher is better), slots int64, best first,
            padded with ``-inf`` / ``-1``.
        """
