"""The ``SearchIndex`` contract every k-NN engine of the pool fulfils."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from dreampool_gpu.errors import InvalidInputError

if TYPE_CHECKING:
    from dreampool_gpu.bank import TensorBank


class SearchIndex(ABC):
    """k-NN over the live rows of a :class:`~dreampool_gpu.bank.TensorBank`'s embeddings.

    Engines read the bank's ``embeddings`` column; they may keep derived state
    (compressed codes, a trained quantiser) but never a second full copy of the
    vectors. Results are slots, not ids: the pool maps them.

    Attributes:
        bank: the bank whose entries the engine indexes.
        kind: the engine's name (stable; checkpoints match serialized state by it).
        last_engine: ``kind`` of the engine that answered the latest search
            (engines that delegate, e.g. to exact search for a masked query, say so);
            None before the first search.
    """

    bank: TensorBank
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

    def state_dict(self) -> dict[str, Any]:
        """The engine's state: ``kind``, the bank ``revision`` it answers for, and ``data``.

        ``data`` is :meth:`serialize`'s bytes, or None for an engine that holds nothing
        worth saving (it rebuilds from the bank). Host values only.
        """
        return {"kind": self.kind, "revision": self.bank.revision, "data": self.serialize()}

    def load_state_dict(self, state: Mapping[str, Any]) -> bool:
        """Adopt ``state`` (from :meth:`state_dict`) when it fits, else rebuild from the bank.

        The saved ``data`` is restored when it is this engine's ``kind`` and was made at
        the bank's current ``revision`` (revisions count within one process: a checkpoint
        reader that proved the data belongs to the loaded bank stamps it with the bank's
        revision). Otherwise, or when ``data`` is None, the engine is rebuilt from the
        bank's live entries, so it never answers from a stale state.

        Returns:
            True when the saved data was restored, False when the engine was rebuilt.

        Raises:
            InvalidInputError: ``state`` is not a mapping with ``kind``, ``revision`` and ``data``.
            Exception: whatever :meth:`deserialize` raises on damaged data; the engine
                was rebuilt from the bank first, so it stays usable.
        """
        if not isinstance(state, Mapping) or not {"kind", "revision", "data"} <= set(state):
            raise InvalidInputError("state", "a mapping with kind, revision and data", type(state).__name__)
        data = state["data"]
        if data is not None and not isinstance(data, bytes):
            raise InvalidInputError("state['data']", "bytes or None", type(data).__name__)
        self.reset()
        if data is not None and state["kind"] == self.kind and state["revision"] == self.bank.revision:
            try:
                self.deserialize(data)
                return True
            except Exception:
                self.reset()
                self.add(self.bank.slots_by_age())
                raise
        self.add(self.bank.slots_by_age())
        return False

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
