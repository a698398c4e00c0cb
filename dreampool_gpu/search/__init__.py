"""k-NN engines over the bank: the ``SearchIndex`` contract and its implementations."""

from __future__ import annotations

import torch

from dreampool_gpu.bank import TensorBank
from dreampool_gpu.config import PoolConfig
from dreampool_gpu.devices import faiss_available
from dreampool_gpu.errors import InvalidConfigurationError
from dreampool_gpu.retrieval.topk import oldest_first_ties, stable_topk
from dreampool_gpu.search.base import SearchIndex
from dreampool_gpu.search.exact import ExactSearch, pairwise_scores

__all__ = [
    "ExactSearch",
    "SearchIndex",
    "index_nbytes_estimate",
    "make_index",
    "oldest_first_ties",
    "pairwise_scores",
    "stable_topk",
]


def make_index(bank: TensorBank, config: PoolConfig) -> SearchIndex:
    """The k-NN engine ``config.engine`` names, over ``bank``.

    ``torch`` is exact matmul + topk; ``faiss-flat`` exact FAISS brute force
    (torch where FAISS cannot serve); ``faiss-ivf`` IVF-PQ candidates re-scored
    exactly once the pool holds ``ann_threshold`` entries (torch below);
    ``auto`` picks per call from measurements (see :mod:`dreampool_gpu.search.auto`), and is
    the torch engine where FAISS is not installed (a GPU image with torch alone).

    Raises:
        InvalidConfigurationError: a FAISS engine named where FAISS is not installed.
    """
    chunk_bytes = int(config.search_chunk_mb * 2**20)
    exact = ExactSearch(bank, config.metric, chunk_bytes=chunk_bytes)
    if config.engine == "torch":
        return exact
    if not faiss_available():
        if config.engine == "auto":
            return exact
        raise InvalidConfigurationError(
            "engine", config.engine, "'torch' or 'auto' where FAISS is not installed (pip install faiss-cpu)"
        )
    # FAISS loads only for the engines that use it
    from dreampool_gpu.search.auto import AutoSearch, ExactAuto
    from dreampool_gpu.search.faiss_flat import FaissFlatSearch
    from dreampool_gpu.search.faiss_ivf import IVFSearch

    flat = FaissFlatSearch(bank, config.metric, fallback=exact, chunk_bytes=chunk_bytes)
    if config.engine == "faiss-flat":
        return flat

    def ivf(fallback: SearchIndex) -> IVFSearch:
        return IVFSearch(
            bank,
            config.metric,
            fallback=fallback,
            threshold=config.ann_threshold,
            nlist=config.ivf_nlist,
            nprobe=config.ivf_nprobe,
            refine_factor=config.ivf_refine_factor,
            churn_fraction=config.churn_rebuild_fraction,
            chunk_bytes=chunk_bytes,
        )

    if config.engine == "faiss-ivf":
        return ivf(exact)
    chooser = ExactAuto(exact, flat)
    return AutoSearch(chooser, ivf(chooser) if bank.device.type == "cpu" else None)


def index_nbytes_estimate(config: PoolConfig, device: torch.device, n: int) -> int:
    """Bytes the engine ``config.engine`` names holds at ``n`` entries on ``device``, at most.

    Exact engines scan the bank in place (0); the IVF-PQ engine (``faiss-ivf``, and ``auto``
    on CPU where FAISS is installed) reports its own estimate (:func:`dreampool_gpu.search.faiss_ivf.estimate_nbytes`).
    """
    if not (config.engine == "faiss-ivf" or (config.engine == "auto" and device.type == "cpu")):
        return 0
    if not faiss_available():  # auto is the exact torch engine then; faiss-ivf cannot be built
        return 0
    from dreampool_gpu.search import faiss_ivf  # loads FAISS: only for IVF pools

    return faiss_ivf.estimate_nbytes(
        n,
        config.embedding_dim,
        threshold=config.ann_threshold,
        nlist=config.ivf_nlist,
        churn_fraction=config.churn_rebuild_fraction,
    )
