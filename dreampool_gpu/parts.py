"""The parts a :class:`~dreampool_gpu.pool.DreamPool` is made of, and the one function that builds them.

A pool owns one :class:`PoolParts`: the bank (:class:`~dreampool_gpu.bank.TensorBank`), the
memory budget, the search index, the hybrid weights, the counters, the deferred-check fault
flag, the once-per-pool notices and the pool's lock, plus two parts with state and methods of
their own: the encoder slot (:class:`~dreampool_gpu.encoder_lifecycle.EncoderSlot`: encoder,
embedded version, query cache) and the admitter (:class:`~dreampool_gpu.admission.Admitter`:
gate, room, eviction policy, write). :func:`build_parts` builds them from a config, for a new
pool (``DreamPool.__init__``, and so ``DreamPool.load``) and for a device move (``DreamPool.to``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from dreampool_gpu import checks
from dreampool_gpu.admission import Admitter
from dreampool_gpu.bank import TensorBank, column_specs
from dreampool_gpu.budget import MemoryBudget, check_allocation, entry_nbytes, fit_capacity
from dreampool_gpu.cache import QueryCache
from dreampool_gpu.config import PoolConfig
from dreampool_gpu.counters import new_counters
from dreampool_gpu.devices import resolve_device
from dreampool_gpu.encoder_lifecycle import EncoderSlot, make_encoder
from dreampool_gpu.encoders import Encoder
from dreampool_gpu.errors import InvalidConfigurationError
from dreampool_gpu.eviction import Eviction, policy_for
from dreampool_gpu.lookup import IdLookup
from dreampool_gpu.notices import Notices
from dreampool_gpu.rerank import HybridWeights
from dreampool_gpu.search import SearchIndex, make_index
from dreampool_gpu.streams import StreamOrderedLock

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(eq=False)
class PoolParts:
    """Everything one pool holds; the pool's methods delegate to these.

    Attributes:
        config: the pool's :class:`PoolConfig`. device: where every tensor lives.
        bank: the entries. budget: the memory budget. index: the k-NN engine over the bank.
        weights: the hybrid score's weights. counters: ``stats()``'s counters.
        fault: the first failed deferred check. notices: the once-per-pool warnings.
        lock: the pool's lock (the same object across device moves).
        encoders: the encoder slot. admitter: the add route and its eviction policy.
        ids: checked slots of ids for the gathers by id.
    """

    config: PoolConfig
    device: torch.device
    bank: TensorBank
    budget: MemoryBudget
    index: SearchIndex
    weights: HybridWeights
    counters: dict[str, int]
    fault: checks.FaultFlag
    notices: Notices
    lock: StreamOrderedLock
    encoders: EncoderSlot = field(init=False)
    admitter: Admitter = field(init=False)
    ids: IdLookup = field(init=False)

    @property
    def encoder(self) -> Encoder:
        """The encoder slot's encoder."""
        return self.encoders.encoder

    @property
    def cache(self) -> QueryCache:
        """The encoder slot's query cache."""
        return self.encoders.cache

    @property
    def eviction(self) -> Eviction:
        """The admitter's eviction policy."""
        return self.admitter.eviction


def build_parts(
    config: PoolConfig,
    lock: StreamOrderedLock,
    *,
    encoder: Any = None,
    eviction: Any = None,
    moved: PoolParts | None = None,
    budget: MemoryBudget | None = None,
) -> PoolParts:
    """The parts of a pool of ``config``, guarded by ``lock``.

    A new pool (``moved`` None): a budget, a bank of the capacity that fits it (as configured,
    lowered or derived), the encoder (``encoder``: see ``DreamPool``), the eviction policy
    (``eviction``, else ``config.eviction_policy``), fresh counters. A device move: ``moved``'s
    bank, encoder, eviction policy, counters and notices, already on ``config.device``, with
    ``budget`` (checked by the caller) and every other device-bound part built anew there
    (index rebuilt from the bank, query cache empty).

    Raises:
        InvalidConfigurationError: ``eviction`` is not an :class:`~dreampool_gpu.eviction.Eviction`;
            the bank cannot be allocated (see :func:`~dreampool_gpu.budget.check_allocation`).
        DeviceUnavailableError: ``config.device`` is CUDA and absent.
    """
    device = resolve_device(config.device)
    if budget is None:
        budget = MemoryBudget(config.memory_budget_mb, device=device, threshold=config.budget_threshold)
    if moved is None:
        if eviction is not None and not isinstance(eviction, Eviction):
            raise InvalidConfigurationError(
                "eviction", type(eviction).__name__, "an eviction.Eviction instance (or None for the config's policy)"
            )
        bank = _new_bank(config, device, budget)
        policy = (
            eviction
            if eviction is not None
            else policy_for(config.eviction_policy, seed=config.eviction_seed, num_classes=config.num_classes)
        )
        chosen = make_encoder(encoder, config, device)
        fitted = encoder is not None or config.encoder != "learned"  # a given one may be trained
        counters, notices = new_counters(), Notices()
        fault = checks.FaultFlag(device)
    else:
        bank, policy, chosen, fitted = moved.bank, moved.eviction, moved.encoder, moved.encoders.fitted
        counters, notices, fault = moved.counters, moved.notices, moved.fault
    index = make_index(bank, config)
    if moved is not None:
        index.add(bank.slots_by_age())
    weights = HybridWeights(config.alpha, config.beta, config.gamma, config.delta, config.mmr_lambda)
    parts = PoolParts(config, device, bank, budget, index, weights, counters, fault, notices, lock)
    parts.encoders = EncoderSlot(parts, chosen, fitted=fitted, cache=QueryCache(config.query_cache_size))
    parts.admitter = Admitter(parts, policy)
    parts.ids = IdLookup(bank)
    bank.settle_hook = parts.admitter.settle_features  # lazy features: computed when first read
    return parts


def _new_bank(config: PoolConfig, device: torch.device, budget: MemoryBudget) -> TensorBank:
    """An empty bank for ``config`` on ``device``: the capacity as configured, lowered (or, when
    None, derived) so the preallocated bank fits ``budget``; never written back into the config."""
    dream_dtype = _DTYPES.get(config.dream_dtype, torch.float16 if device.type == "cuda" else torch.float32)
    specs = column_specs(config.dream_shape, config.embedding_dim, dream_dtype, config.columns)
    capacity = fit_capacity(config, entry_bytes=entry_nbytes(specs), budget_bytes=budget.budget_bytes, device=device)
    check_allocation(config, specs, capacity, device)  # a typed error, not the allocator's
    return TensorBank(
        capacity,
        config.dream_shape,
        config.embedding_dim,
        device=device,
        dream_dtype=dream_dtype,
        user=config.columns,
    )
