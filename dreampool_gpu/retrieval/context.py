"""What a query reads of a pool, and the options of ``retrieve``, each declared once.

:class:`RetrievalContext` is the view of a pool that :func:`~dreampool_gpu.retrieval.request.check_request`
and the mode table's stages receive (a pool's :class:`~dreampool_gpu.parts.PoolParts` is one,
as is a shard's): a query flows pool -> request -> mode -> stages -> gather without calling
back into the pool. :data:`RETRIEVE_DEFAULTS` lists ``retrieve``'s keyword options with their
defaults, for ``DreamPool.retrieve``, ``prepare_retrieve``, ``ShardedDreamPool.retrieve``,
batch jobs and the CLI.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from dreampool_gpu.bank import TensorBank
    from dreampool_gpu.cache import QueryCache
    from dreampool_gpu.config import PoolConfig
    from dreampool_gpu.encoders import Encoder
    from dreampool_gpu.rerank import HybridWeights
    from dreampool_gpu.retrieval.request import Queries
    from dreampool_gpu.search import SearchIndex

RETRIEVE_DEFAULTS: dict[str, Any] = {
    "k": None,
    "mode": None,
    "class_hint": None,
    "classes": None,
    "category": None,
    "utility_threshold": 0.0,
    "utility_prior": None,
    "fetch_k": None,
    "mmr_lambda": None,
    "min_dispersion": 0.0,
    "where": None,
    "chroma_metric": "cosine",
}
"""``retrieve``'s keyword options (every one but ``with_dreams``) and their defaults, in signature order."""


def retrieve_options(values: Mapping[str, Any]) -> dict[str, Any]:
    """The options of :data:`RETRIEVE_DEFAULTS` taken from ``values`` (a ``retrieve`` call's arguments)."""
    return {name: values[name] for name in RETRIEVE_DEFAULTS}


class EncoderAccess(Protocol):
    """The encoder slot as a query sees it (:class:`~dreampool_gpu.encoder_lifecycle.EncoderSlot`)."""

    @property
    def encoder(self) -> Encoder: ...

    @property
    def cache(self) -> QueryCache: ...

    def check_fresh(self) -> None: ...

    def query_embeddings(self, q: Queries, hint: torch.Tensor, prior: torch.Tensor) -> torch.Tensor: ...


class RetrievalContext(Protocol):
    """The parts of a pool a query reads: bank, index, encoder slot, hybrid weights, configuration."""

    @property
    def config(self) -> PoolConfig: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def bank(self) -> TensorBank: ...

    @property
    def index(self) -> SearchIndex: ...

    @property
    def weights(self) -> HybridWeights: ...

    @property
    def encoders(self) -> EncoderAccess: ...
