"""k-NN engines over the bank: the ``SearchIndex`` contract and its implementations."""

from __future__ import annotations

from dreampool_gpu.bank import TensorBank
from dreampool_gpu.config import PoolConfig
from dreampool_gpu.search.base import SearchIndex
from dreampool_gpu.search.exact import ExactSearch, pairwise_scores, stable_topk

__all__ = ["ExactSearch", "SearchIndex", "make_index", "pairwise_scores", "stable_topk"]


def make_index(bank: TensorBank, config: PoolConfig) -> SearchIndex:
    """The k-NN engine the pool uses for ``config`` over ``bank``."""
    return ExactSearch(bank, config.metric, chunk_bytes=int(config.search_chunk_mb * 2**20))
