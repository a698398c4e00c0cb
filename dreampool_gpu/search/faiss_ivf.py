"""Approximate k-NN for large pools: FAISS IVF-PQ codes, candidates re-scored from the bank.

The index holds only compressed codes: an inverted file over ``nlist`` coarse
centroids with product-quantised residuals of ``d / 4`` bytes per vector, plus
FAISS's 8-byte label per vector. Labels are bank slots. A search asks FAISS for
``k * refine_factor`` candidates, then scores them exactly against the bank's
full vectors, so the vectors exist once (in the bank) and every returned score
is exact.

Life cycle (all derived from the bank):

- *build*: once the pool holds ``threshold`` entries, train on a seeded sample of
  live rows and add every live row; again when the pool has doubled since the
  last build (``nlist`` follows the size).
- *add*: new slots are encoded and added with their slot as label.
- *evict*: nothing happens at once (FAISS GPU IVF cannot remove, and on CPU a
  removal scans every list: 2-5 ms per call at 1M rows). Candidates whose slot
  is free are dropped at search time; a slot that was freed and written again
  is re-scored against its new vector, and its stale code only duplicates the
  label, which is removed. When evictions since the last refresh exceed
  ``churn_fraction`` of the pool (docs/spec.md §Memory budget, the 10% churn rule), the index is
  refreshed: on CPU the evicted labels are removed in one pass and the live
  entries at those slots re-added; on GPU the lists are emptied and refilled
  from the bank.

Below the threshold, for masked queries, and for ``k`` at or above the pool
size, the ``fallback`` engine (exact) answers.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import faiss
import numpy as np
import torch

from dreampool_gpu.bank import TensorBank
from dreampool_gpu.config import Metric
from dreampool_gpu.devices import faiss_gpu_available
from dreampool_gpu.retrieval.topk import pad_results
from dreampool_gpu.search.base import SearchIndex
from dreampool_gpu.search.faiss_flat import gpu_resources

MIN_TRAIN_ROWS = 1024  # smallest pool an IVF is trained on: PQ codebooks have 256 centroids
PQ_DIMS_PER_BYTE = 4  # one byte of PQ code per 4 dimensions: d/4 bytes a vector
PQ_BITS = 8
TRAIN_ROWS_PER_LIST = 64  # coarse k-means sample: 64 rows per centroid
PQ_TRAIN_ROWS = 32 * 1024  # PQ codebook sample (128 rows per code)
LABEL_BYTES = 8  # FAISS stores an int64 label per vector
_MAGIC = b"DPIVFPQ1"
_HEADER = struct.Struct("<8sqq")  # magic, size at the last build, number of pending slots


def pq_subquantizers(d: int) -> int:
    """Number of PQ sub-quantisers for dimension ``d``: the largest divisor of ``d`` <= d/4."""
    return max([m for m in range(1, d // PQ_DIMS_PER_BYTE + 1) if d % m == 0], default=1)


def auto_nlist(n: int) -> int:
    """Coarse centroids for ``n`` vectors: the power of two nearest ``2 * sqrt(n)``, at most n/39.

    FAISS wants at least 39 training rows per centroid; ``2 * sqrt(n)`` sits at
    the low end of its 4..16 sqrt(n) guideline because every list is also
    re-scored exactly (measured in docs/benchmarks.md).
    """
    target = 2.0 * math.sqrt(max(n, 1))
    nlist = 2 ** round(math.log2(target))
    return max(1, min(nlist, n // 39))


def estimate_nbytes(n: int, d: int, *, threshold: int, nlist: int, churn_fraction: float) -> int:
    """Bytes an :class:`IVFSearch` over ``n`` entries of dimension ``d`` holds, at most.

    None below ``max(threshold, MIN_TRAIN_ROWS)`` entries (exact search serves there). Per
    :meth:`IVFSearch.nbytes`: ``m + 8`` bytes per code (``m`` PQ bytes, an int64 label),
    with up to ``churn_fraction x n`` stale codes and as many pending int64 slots before a
    refresh; plus ``nlist x D`` float32 centroids (``nlist`` as the index picks it at ``n``
    when 0) and ``256 x D`` float32 codebooks. Non-decreasing in ``n``.
    """
    if n < max(threshold, MIN_TRAIN_ROWS):
        return 0
    code = pq_subquantizers(d) * PQ_BITS // 8 + LABEL_BYTES
    stale = math.ceil(churn_fraction * n)
    lists = max(1, min(nlist or auto_nlist(n), n // 39))
    return (n + stale) * code + stale * 8 + (lists + (1 << PQ_BITS)) * d * 4


class IVFSearch(SearchIndex):
    """IVF-PQ candidates from FAISS, re-scored exactly against the bank.

    Args:
        bank: the bank whose live rows are searched.
        metric: cosine (inner product of unit vectors) or euclidean.

    Keyword Args:
        fallback: exact engine answering below the threshold and what IVF cannot.
        threshold: pool size at which the index is trained (at least ``MIN_TRAIN_ROWS``).
        nlist: coarse centroids; 0 picks :func:`auto_nlist` of the size at build time.
        nprobe: lists visited per query.
        refine_factor: candidates re-scored per query = ``k * refine_factor``.
        churn_fraction: evictions since the last refresh, as a fraction of the
            pool size, that trigger a refresh.
        chunk_bytes: bound on temporary memory: rows gathered per step (adds and
            re-scoring), FAISS GPU scratch.
    """

    kind = "faiss-ivf"

    def __init__(
        self,
        bank: TensorBank,
        metric: Metric,
        *,
        fallback: SearchIndex,
        threshold: int,
        nlist: int,
        nprobe: int,
        refine_factor: int,
        churn_fraction: float,
        chunk_bytes: int,
    ) -> None:
        self.bank = bank
        self.metric = metric
        self.fallback = fallback
        self.threshold = max(threshold, MIN_TRAIN_ROWS)
        self.nlist = nlist
        self.nprobe = nprobe
        self.refine_factor = refine_factor
        self.churn_fraction = churn_fraction
        self.chunk_bytes = chunk_bytes
        self.on_gpu = bank.device.type == "cuda" and faiss_gpu_available()
        self.builds = 0
        self.refreshes = 0
        self._gpu_res: faiss.StandardGpuResources | None = None
        self._index: Any = None  # faiss.IndexIVFPQ, or a GpuIndexIVFPQ on CUDA
        self._built_size = 0
        self._built_nlist = 0
        self._pending: list[torch.Tensor] = []  # CPU int64 slots evicted since the last refresh

    # ------------------------------------------------------------- state
    @property
    def trained(self) -> bool:
        """Whether the IVF index exists (the pool crossed the threshold)."""
        return self._index is not None

    @property
    def stale(self) -> int:
        """Entries in the index whose slot was evicted since the last refresh."""
        return 0 if self._index is None else int(self._index.ntotal) - self.bank.size

    def reset(self) -> None:
        """Drop the index; it is trained again when the pool crosses the threshold."""
        self._index = None
        self._built_size = 0
        self._pending.clear()
        self.fallback.reset()

    def nbytes(self) -> int:
        """Bytes of the index's payload: codes, labels, centroids, codebooks, pending slots.

        FAISS keeps each inverted list in a ``std::vector`` that grows by
        doubling, so the allocated heap is up to ~1.8x the payload (measured:
        1.21x after a bulk build, 1.76x after 10% more adds in batches of 256).
        """
        if self._index is None:
            return 0
        d = self.bank.embedding_dim
        m = pq_subquantizers(d)
        codes = int(self._index.ntotal) * (m * PQ_BITS // 8 + LABEL_BYTES)
        centroids = self._built_nlist * d * 4
        codebooks = (1 << PQ_BITS) * d * 4
        return codes + centroids + codebooks + sum(p.numel() for p in self._pending) * 8

    def describe(self) -> dict[str, Any]:
        """See :meth:`SearchIndex.describe`; adds the IVF's shape and maintenance counters."""
        return {
            **super().describe(),
            "trained": self.trained,
            "threshold": self.threshold,
            "on_gpu": self.on_gpu,
            "nlist": self._built_nlist,
            "nprobe": self.nprobe,
            "refine_factor": self.refine_factor,
            "ntotal": 0 if self._index is None else int(self._index.ntotal),
            "stale": self.stale,
            "builds": self.builds,
            "refreshes": self.refreshes,
        }

    # ------------------------------------------------------------ updates
    def add(self, slots: torch.Tensor) -> None:
        """Encode the entries at ``slots``; train first when the pool crosses the threshold."""
        if self._index is None:
            if self.bank.size >= self.threshold:
                self.build()
            return
        self._add_rows(slots)
        self._maintain()

    def remove(self, slots: torch.Tensor) -> None:
        """Note evicted ``slots``; searches skip them, the next refresh removes them."""
        if self._index is not None and slots.numel():
            self._pending.append(slots.to("cpu", torch.int64))

    def build(self) -> None:
        """Train a fresh IVF-PQ on a seeded sample of live rows and add every live row."""
        live = torch.nonzero(self.bank.alive()).squeeze(1)
        n = int(live.numel())
        d = self.bank.embedding_dim
        nlist = max(1, min(self.nlist or auto_nlist(n), n // 39))
        metric = faiss.METRIC_INNER_PRODUCT if self.metric is Metric.COSINE else faiss.METRIC_L2
        # an IndexIVFPQ; faiss types index_factory's result as the base Index, without these fields
        index: Any = faiss.index_factory(d, f"IVF{nlist},PQ{pq_subquantizers(d)}x{PQ_BITS}", metric)
        index.cp.min_points_per_centroid = 1  # small pools: no "too few points" warning
        index.pq.cp.min_points_per_centroid = 1
        index.pq.cp.max_points_per_centroid = PQ_TRAIN_ROWS >> PQ_BITS
        index.do_polysemous_training = False  # 10x the training time, for a search mode not used here
        index.use_precomputed_table = -1  # an nlist x 256 x m table would outweigh the codes
        generator = torch.Generator().manual_seed(0)
        sample_size = min(n, max(TRAIN_ROWS_PER_LIST * nlist, PQ_TRAIN_ROWS))
        pick = torch.randperm(n, generator=generator)[:sample_size].sort().values
        train_rows = self.bank.columns["embeddings"][live[pick.to(live.device)]]
        index.train(train_rows.cpu().numpy())
        index.nprobe = self.nprobe
        self._index = self._to_device(index)
        self._pending.clear()
        self._add_rows(live)
        self._built_size = n
        self._built_nlist = nlist
        self.builds += 1

    def _to_device(self, index: Any) -> Any:
        if not self.on_gpu:
            return index
        if self._gpu_res is None:
            self._gpu_res = gpu_resources(self.chunk_bytes)
        # a GpuIndexIVFPQ; faiss types index_cpu_to_gpu's result as the base GpuIndex, without nprobe
        gpu: Any = faiss.index_cpu_to_gpu(self._gpu_res, self.bank.device.index, index)
        gpu.nprobe = self.nprobe
        return gpu

    def _add_rows(self, slots: torch.Tensor) -> None:
        """Add the bank's rows at ``slots`` with their slots as labels, a chunk at a time."""
        embeddings = self.bank.columns["embeddings"]
        rows = max(1, self.chunk_bytes // (4 * self.bank.embedding_dim))
        for chunk in slots.split(rows):
            vectors = embeddings[chunk]
            if self.on_gpu:
                self._index.add_with_ids(vectors, chunk)
            else:
                self._index.add_with_ids(vectors.cpu().numpy(), chunk.cpu().numpy())

    def _maintain(self) -> None:
        """Rebuild after the pool doubled; refresh after ``churn_fraction`` evictions."""
        size = self.bank.size
        if size >= max(2 * self._built_size, self.threshold):
            self.build()
        elif self.stale > self.churn_fraction * size:
            self._refresh()

    def _refresh(self) -> None:
        if self.on_gpu or not self._pending:  # GPU IVF has no remove_ids: refill from the bank
            self._index.reset()  # keeps the trained centroids and codebooks
            self._add_rows(torch.nonzero(self.bank.alive()).squeeze(1))
        else:
            evicted = torch.cat(self._pending).unique()
            self._index.remove_ids(faiss.IDSelectorBatch(evicted.numpy()))
            back = evicted[self.bank.columns["ids"][evicted.to(self.bank.device)].cpu() >= 0]
            self._add_rows(back.to(self.bank.device))
        self._pending.clear()
        self.refreshes += 1

    # ------------------------------------------------------------- search
    def search(
        self, queries: torch.Tensor, k: int, *, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """See :meth:`SearchIndex.search`; exact scores of approximate candidates."""
        if k == 0:  # nothing to rank: [B, 0] whatever the engine state
            return (
                torch.empty(queries.shape[0], 0, device=queries.device),
                torch.empty(queries.shape[0], 0, dtype=torch.int64, device=queries.device),
            )
        if self._index is not None:
            self._maintain()
        if mask is not None or self._index is None or k >= self.bank.size or queries.shape[0] == 0:
            out = self.fallback.search(queries, k, mask=mask)
            self.last_engine = self.fallback.last_engine
            return out
        self.last_engine = self.kind
        b = queries.shape[0]
        candidates = min(k * self.refine_factor, int(self._index.ntotal))
        per_query = candidates * (self.bank.embedding_dim + 4) * 4
        step = max(1, self.chunk_bytes // per_query)
        parts = [self._search_chunk(queries[s : s + step].contiguous(), k, candidates) for s in range(0, b, step)]
        scores = torch.cat([p[0] for p in parts])
        slots = torch.cat([p[1] for p in parts])
        # a query whose probed lists held fewer than k live entries (k < size) gets the exact answer
        short = (slots < 0).any(dim=1)
        if bool(short.any()):
            exact_scores, exact_slots = self.fallback.search(queries[short], k)
            scores[short], slots[short] = exact_scores, exact_slots
        return scores, slots

    def _search_chunk(self, queries: torch.Tensor, k: int, candidates: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.on_gpu:
            _, labels = self._index.search(queries, candidates)
        else:
            _, found = self._index.search(queries.cpu().numpy(), candidates)
            labels = torch.from_numpy(found).to(self.bank.device)
        return self._rescore(queries, labels, k)

    def _rescore(self, queries: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k of the candidate slots ``labels`` ``[B, C]`` (-1 = none) from the bank."""
        slots = labels.clamp(min=0)
        keep = (labels >= 0) & (self.bank.columns["ids"][slots] >= 0)
        if self._pending:  # a slot freed and written again since the refresh is listed twice
            ordered, order = labels.sort(dim=1, stable=True)
            repeat = torch.zeros_like(keep)
            repeat.scatter_(1, order[:, 1:], ordered[:, 1:] == ordered[:, :-1])
            keep &= ~repeat
        rows = self.bank.columns["embeddings"][slots]  # [B, C, D]
        if self.metric is Metric.COSINE:
            scores = torch.bmm(rows, queries.unsqueeze(2)).squeeze(2)
        else:
            scores = -torch.linalg.vector_norm(rows - queries.unsqueeze(1), dim=2)
        scores = scores.masked_fill(~keep, float("-inf"))
        top, pick = scores.topk(min(k, scores.shape[1]), dim=1)
        return pad_results(top, slots.gather(1, pick), k)

    # ------------------------------------------------------ checkpoints
    def serialize(self) -> bytes | None:
        """The trained index (FAISS's own format) and pending evictions; None before training."""
        if self._index is None:
            return None
        index = faiss.index_gpu_to_cpu(self._index) if self.on_gpu else self._index
        pending = torch.cat(self._pending) if self._pending else torch.empty(0, dtype=torch.int64)
        header = _HEADER.pack(_MAGIC, self._built_size, pending.numel())
        return header + pending.numpy().tobytes() + faiss.serialize_index(index).tobytes()

    def deserialize(self, data: bytes) -> None:
        """Restore :meth:`serialize`'s bytes for the bank they were saved with.

        Raises:
            ValueError: not this engine's format, or an index for another dimension or metric.
        """
        if len(data) < _HEADER.size:
            raise ValueError(f"IVF state of {len(data)} bytes is shorter than its header")
        magic, built_size, n_pending = _HEADER.unpack_from(data)
        body = _HEADER.size + 8 * n_pending
        if magic != _MAGIC or n_pending < 0 or built_size < 0 or body > len(data):
            raise ValueError("not a serialized dreampool IVF-PQ index")
        pending = torch.from_numpy(np.frombuffer(data, dtype=np.int64, count=n_pending, offset=_HEADER.size).copy())
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8, offset=body))
        metric = faiss.METRIC_INNER_PRODUCT if self.metric is Metric.COSINE else faiss.METRIC_L2
        if not isinstance(index, faiss.IndexIVFPQ) or index.d != self.bank.embedding_dim or index.metric_type != metric:
            raise ValueError(f"saved index is {type(index).__name__} d={index.d}, not IVF-PQ for this pool")
        if (pending >= self.bank.capacity).any() or (pending < 0).any():
            raise ValueError("saved pending slots lie outside the bank")
        index.nprobe = self.nprobe
        self._index = self._to_device(index)
        self._built_size = built_size
        self._built_nlist = int(index.nlist)
        self._pending = [pending] if n_pending else []
