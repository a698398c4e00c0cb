"""Exact k-NN by FAISS brute force over the bank's embedding memory, read in place.

On CPU the bank's ``embeddings`` rows ``[:extent]`` are handed to
``faiss.knn_inner_product`` / ``faiss.knn_L2sqr`` through a numpy view (no
copy); free slots below the extent are excluded with an ``IDSelectorBitmap``
built from the ``ids`` column and cached per bank revision. On CUDA, with a
GPU build of FAISS, ``faiss.knn_gpu`` (brute force, via
``faiss.contrib.torch_utils``) reads the torch tensor in place; it takes no
selector, so it asks for ``k + free slots`` neighbours and drops the free ones.

Where FAISS cannot serve a call (a per-query mask, a CUDA bank without GPU
FAISS, a non-float32 query, ``k`` beyond the GPU selection limit), the torch
engine answers and :attr:`last_engine` says so.
"""

from __future__ import annotations

import faiss
import numpy as np
import torch

from dreampool_gpu.bank import TensorBank
from dreampool_gpu.config import Metric
from dreampool_gpu.devices import faiss_gpu_available
from dreampool_gpu.retrieval.topk import pad_results
from dreampool_gpu.search.base import SearchIndex
from dreampool_gpu.search.exact import ExactSearch, refine_euclidean

GPU_MAX_K = 2048  # largest k FAISS GPU k-selection accepts (faiss/gpu/utils/DeviceDefs.cuh)


def gpu_resources(temp_bytes: int) -> faiss.StandardGpuResources:
    """FAISS GPU resources with ``temp_bytes`` of scratch memory; enables torch tensors."""
    import faiss.contrib.torch_utils  # noqa: F401 - registers torch tensor support in faiss

    res = faiss.StandardGpuResources()
    res.setTempMemory(temp_bytes)
    return res


class FaissFlatSearch(SearchIndex):
    """Exact FAISS brute-force k-NN over ``bank.columns["embeddings"]`` in place.

    Args:
        bank: the bank whose live rows are searched.
        metric: cosine (inner product of the bank's unit vectors) or euclidean.

    Keyword Args:
        fallback: the torch engine that answers what FAISS cannot.
        chunk_bytes: bound on temporary memory: FAISS GPU scratch, rows re-scored at a time.
    """

    kind = "faiss-flat"

    def __init__(self, bank: TensorBank, metric: Metric, *, fallback: ExactSearch, chunk_bytes: int) -> None:
        self.bank = bank
        self.metric = metric
        self.fallback = fallback
        self.chunk_bytes = chunk_bytes
        self._gpu_res: faiss.StandardGpuResources | None = None
        self._selector_revision = -1
        self._selector: tuple[np.ndarray, faiss.IDSelectorBitmap] | None = None

    def serves(self, queries: torch.Tensor, k: int) -> bool:
        """Whether FAISS (not the torch fallback) would answer this unmasked call."""
        if queries.dtype != torch.float32:
            return False
        if self.bank.device.type == "cpu":
            return True
        margin = self.bank.extent - self.bank.size
        return faiss_gpu_available() and min(k, self.bank.size) + margin <= GPU_MAX_K

    def search(
        self, queries: torch.Tensor, k: int, *, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """See :meth:`SearchIndex.search`."""
        if mask is not None or not self.serves(queries, k):
            out = self.fallback.search(queries, k, mask=mask)
            self.last_engine = self.fallback.kind
            return out
        self.last_engine = self.kind
        b = queries.shape[0]
        k_eff = min(k, self.bank.size)
        if k_eff == 0 or b == 0:
            empty = torch.empty(b, 0, dtype=torch.int64, device=queries.device)
            return pad_results(queries.new_empty(b, 0), empty, k)
        queries = queries.contiguous()
        if self.bank.device.type == "cpu":
            scores, slots = self._search_cpu(queries, k_eff)
        else:
            scores, slots = self._search_gpu(queries, k_eff)
        if self.metric is Metric.EUCLIDEAN:  # FAISS L2 is squared, and expanded for batches
            slots = torch.where(torch.isfinite(scores), slots, torch.full_like(slots, -1))
            embeddings = self.bank.columns["embeddings"]
            scores, slots = refine_euclidean(queries, embeddings, slots, chunk_bytes=self.chunk_bytes)
        return pad_results(scores, slots, k)

    def _scores(self, distances: torch.Tensor) -> torch.Tensor:
        """Higher-is-better scores: inner products as they are, squared L2 negated."""
        return distances if self.metric is Metric.COSINE else -distances

    def _bitmap_selector(self) -> faiss.IDSelectorBitmap:
        """Selector of live slots below the extent, rebuilt when the bank's revision moves."""
        if self._selector is None or self._selector_revision != self.bank.revision:
            alive = self.bank.alive()[: self.bank.extent].numpy()
            bits = np.packbits(alive, bitorder="little")  # bit i of the map = slot i
            self._selector = (bits, faiss.IDSelectorBitmap(alive.size, faiss.swig_ptr(bits)))
            self._selector_revision = self.bank.revision
        return self._selector[1]

    def _search_cpu(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        extent = self.bank.extent
        rows = self.bank.columns["embeddings"][:extent].numpy()  # a view of the bank
        xq = queries.numpy()
        b, d = xq.shape
        distances = np.empty((b, k), dtype=np.float32)
        labels = np.empty((b, k), dtype=np.int64)
        selector = self._bitmap_selector() if self.bank.size < extent else None
        args = (faiss.swig_ptr(xq), faiss.swig_ptr(rows), d, b, extent, k)
        out = (faiss.swig_ptr(distances), faiss.swig_ptr(labels))
        if self.metric is Metric.COSINE:
            faiss.knn_inner_product(*args, *out, selector)
        else:
            faiss.knn_L2sqr(*args, *out, None, selector)
        return self._scores(torch.from_numpy(distances)), torch.from_numpy(labels)

    def _search_gpu(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._gpu_res is None:
            self._gpu_res = gpu_resources(self.chunk_bytes)
        extent = self.bank.extent
        margin = extent - self.bank.size  # free slots below the extent may rank anywhere
        metric = faiss.METRIC_INNER_PRODUCT if self.metric is Metric.COSINE else faiss.METRIC_L2
        distances, labels = faiss.knn_gpu(
            self._gpu_res,
            queries,
            self.bank.columns["embeddings"][:extent],
            k + margin,
            metric=metric,
            device=self.bank.device.index,
        )
        scores = self._scores(distances)
        if margin:
            live = self.bank.alive()[labels.clamp(min=0)] & (labels >= 0)
            scores = scores.masked_fill(~live, float("-inf"))
            scores, pick = scores.topk(k, dim=1)
            labels = labels.gather(1, pick)
        return scores, labels
