"""dreampool_gpu: long-term memory of dreams on a CUDA (or CPU) tensor bank.

Gated adds, exact and FAISS k-NN, batched MMR and hybrid re-ranking, utility
feedback and a memory budget. See README.md for a tour.
"""

from __future__ import annotations

from dreampool_gpu.config import PoolConfig
from dreampool_gpu.devices import resolve_device
from dreampool_gpu.distributed import ShardedDreamPool
from dreampool_gpu.encoders import Encoder, FeatureEncoder
from dreampool_gpu.errors import DreamPoolError
from dreampool_gpu.fitting import FitReport
from dreampool_gpu.learned import LearnedEncoder
from dreampool_gpu.pool import DreamPool, Retrieval
from dreampool_gpu.prepared import PreparedRetrieval
from dreampool_gpu.rerank import HybridWeights, mmr
from dreampool_gpu.solver import score_dreams
from dreampool_gpu.spectral import spectral_features
from dreampool_gpu.stats import PoolStats
from dreampool_gpu.sync_guard import forbid_host_sync

__version__ = "0.1.0"

__all__ = [
    # pool
    "DreamPool",
    "ShardedDreamPool",
    "Retrieval",
    "PreparedRetrieval",
    "PoolStats",
    # config
    "PoolConfig",
    "HybridWeights",
    # encoders
    "Encoder",
    "FeatureEncoder",
    "LearnedEncoder",
    "FitReport",
    # building blocks
    "mmr",
    "score_dreams",
    "spectral_features",
    "resolve_device",
    "forbid_host_sync",
    # errors
    "DreamPoolError",
    "__version__",
]
