"""The ``auto`` engine: per call, the exact engine measured fastest, IVF for large pools.

Rules, from ``benchmarks/test_search.py`` and a batch-size sweep (figures in
docs/benchmarks.md), on the 2-core CPU sandbox and an H100:

- CPU, exact: FAISS brute force for query batches of 2 to 15 (``FAISS_BATCHES``:
  at 20K entries 91 vs 215 us at B = 2, 269 vs 314 us at B = 8), whose SIMD scan
  beats torch's thin matmul; torch matmul + topk otherwise (one query is a
  matrix-vector product where torch was as fast or faster below 30K entries,
  and from 16 to 64 queries the two are within 10% until torch's blocked GEMM
  pulls ahead).
- CPU, approximate: the IVF-PQ engine once the pool holds ``ann_threshold``
  entries (20K by default: exact wins at 10K, IVF from 30K; at 1M it is 25x the
  exact throughput at B = 256 with recall@10 0.985); below it, the rule above.
- CUDA: torch matmul + topk. The GPU image used for measuring had no GPU build
  of FAISS, so FAISS GPU brute force and GPU IVF stay explicit engines that
  ``auto`` does not pick until measured.
"""

from __future__ import annotations

from typing import Any

import torch

from dreampool_gpu.search.base import SearchIndex
from dreampool_gpu.search.exact import ExactSearch
from dreampool_gpu.search.faiss_flat import FaissFlatSearch
from dreampool_gpu.search.faiss_ivf import IVFSearch

FAISS_BATCHES = range(2, 16)  # CPU query batch sizes where FAISS brute force beat torch


def prefer_faiss_flat(device: torch.device, rows: int, batch: int) -> bool:
    """Whether FAISS brute force beat torch matmul + topk for ``batch`` queries over ``rows``."""
    return device.type == "cpu" and batch in FAISS_BATCHES


class ExactAuto(SearchIndex):
    """Exact k-NN by whichever of torch and FAISS brute force measured faster per call.

    Args:
        torch_engine: the torch matmul + topk engine (also answers masked queries).
        flat: the FAISS brute-force engine.
    """

    kind = "exact-auto"

    def __init__(self, torch_engine: ExactSearch, flat: FaissFlatSearch) -> None:
        self.torch_engine = torch_engine
        self.flat = flat
        self.bank = torch_engine.bank

    def search(
        self, queries: torch.Tensor, k: int, *, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """See :meth:`SearchIndex.search`."""
        bank = self.torch_engine.bank
        use_flat = mask is None and prefer_faiss_flat(bank.device, bank.extent, queries.shape[0])
        engine: SearchIndex = self.flat if use_flat else self.torch_engine
        out = engine.search(queries, k, mask=mask)
        self.last_engine = engine.last_engine
        return out


class AutoSearch(SearchIndex):
    """The pool's default engine: exact below ``ann_threshold``, IVF-PQ above it (CPU).

    Args:
        exact: the per-call exact chooser.
        ivf: the approximate engine (its fallback is ``exact``), or None where
            ``auto`` never goes approximate (CUDA).
    """

    kind = "auto"

    def __init__(self, exact: ExactAuto, ivf: IVFSearch | None) -> None:
        self.exact = exact
        self.ivf = ivf
        self.bank = exact.bank

    @property
    def _engine(self) -> SearchIndex:
        return self.exact if self.ivf is None else self.ivf

    def add(self, slots: torch.Tensor) -> None:
        """See :meth:`SearchIndex.add`."""
        self._engine.add(slots)

    def remove(self, slots: torch.Tensor) -> None:
        """See :meth:`SearchIndex.remove`."""
        self._engine.remove(slots)

    def reset(self) -> None:
        """See :meth:`SearchIndex.reset`."""
        self._engine.reset()

    def nbytes(self) -> int:
        """See :meth:`SearchIndex.nbytes`."""
        return self._engine.nbytes()

    def describe(self) -> dict[str, Any]:
        """See :meth:`SearchIndex.describe`; the IVF's facts under ``"ivf"`` when it exists."""
        out = super().describe()
        if self.ivf is not None:
            out["ivf"] = self.ivf.describe()
        return out

    def serialize(self) -> bytes | None:
        """See :meth:`SearchIndex.serialize`."""
        return self._engine.serialize()

    def deserialize(self, data: bytes) -> None:
        """See :meth:`SearchIndex.deserialize`."""
        self._engine.deserialize(data)

    def search(
        self, queries: torch.Tensor, k: int, *, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """See :meth:`SearchIndex.search`."""
        out = self._engine.search(queries, k, mask=mask)
        self.last_engine = self._engine.last_engine
        return out
