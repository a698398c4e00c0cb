"""The walk of one query batch over a pool's parts: check -> mode -> stages -> gather.

:func:`walk` is ``DreamPool.retrieve``'s device work, and a prepared retrieve's
(:mod:`dreampool_gpu.prepared`): the request is checked against the parts
(:func:`~dreampool_gpu.retrieval.request.check_request`), the mode's row of
:data:`~dreampool_gpu.retrieval.modes.MODES` runs its stages over them, and the slots
become ids (and dreams), with usage counted. The caller holds the pool's lock.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from dreampool_gpu import checks
from dreampool_gpu.retrieval.modes import CHROMA_MODES, MODES
from dreampool_gpu.retrieval.request import Request, check_request

if TYPE_CHECKING:
    from dreampool_gpu.bank import TensorBank
    from dreampool_gpu.parts import PoolParts


@dataclass(frozen=True)
class Retrieval:
    """Result of :meth:`DreamPool.retrieve`, on the pool's device.

    Attributes:
        ids: ``[B, k]`` int64 entry ids, best first, -1 padding.
        scores: ``[B, k]`` float32, higher is better, ``-inf`` padding. Chroma
            methods: chroma cosine; nearest: embedding similarity (cosine, or minus
            the euclidean distance); soft/hybrid: hybrid base score; diverse: chroma
            cosine of each pick (the order is MMR's).
        dreams: ``[B, k, R, C, L, 3]`` when asked for with ``with_dreams=True``
            (zeros at padding), else None.
    """

    ids: torch.Tensor
    scores: torch.Tensor
    dreams: torch.Tensor | None = None

    @property
    def mask(self) -> torch.Tensor:
        """``[B, k]`` bool, True where a result is present."""
        return self.ids >= 0


def walk(parts: PoolParts, queries: Any, options: dict[str, Any], *, with_dreams: bool, sync_free: bool) -> Retrieval:
    """One retrieve over ``parts``: ``options`` as :data:`~dreampool_gpu.retrieval.context.RETRIEVE_DEFAULTS`
    names them; ``sync_free``: value checks deferred (a failed one empties the results)."""
    if sync_free:
        with checks.deferred() as deferred:
            scores, slots, req = _ranked(parts, queries, options)
            if deferred is not None and deferred.flags:  # a failed check empties the results
                ok = parts.fault.record("retrieve", deferred)
                slots = torch.where(ok, slots, -1)
                scores = torch.where(ok, scores, float("-inf"))
        return _gathered(parts.bank, scores, slots, with_dreams=with_dreams, full=False, host=False)
    scores, slots, req = _ranked(parts, queries, options)
    return _gathered(parts.bank, scores, slots, with_dreams=with_dreams, full=req.full, host=True)


def _ranked(parts: PoolParts, queries: Any, options: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, Request]:
    """``[B, width]`` (scores, slots) of the checked request's mode, and the request."""
    req = check_request(parts, queries, **options)
    parts.bank.settle()  # every mode reads derived columns: waiting entries get them now, in one batch
    if req.mode not in CHROMA_MODES:
        parts.notices.unfitted(parts.encoder, parts.encoders.fitted)
    scores, slots = MODES[req.mode].run(parts, req)
    return scores, slots, req


def _gathered(
    bank: TensorBank, scores: torch.Tensor, slots: torch.Tensor, *, with_dreams: bool, full: bool, host: bool
) -> Retrieval:
    """The result of ``[B, k]`` (scores, slots), usage counted. ``full``: no slot is padding (a stage saw it
    on the host); ``host``: checks are read at once, so a CPU call may read it here (at no transfer's cost)."""
    usage = bank.raw["usage"]
    if full or (
        host and slots.device.type == "cpu" and not checks.sync_free() and slots.numel() and int(slots.min()) >= 0
    ):  # no padding: no masks, usage +1 each
        usage.put_(slots, _ones(slots.numel()), accumulate=True)
        dreams = bank.raw["dreams"][slots] if with_dreams else None
        return Retrieval(ids=bank.raw["ids"].take(slots), scores=scores, dreams=dreams)
    safe, valid = slots.clamp(min=0), slots >= 0
    ids = bank.gather_valid("ids", safe, valid)
    usage.index_add_(0, safe.view(-1), valid.view(-1).to(usage.dtype))  # +1 per returned entry; padding adds 0
    dreams = bank.gather_valid("dreams", safe, valid) if with_dreams else None
    return Retrieval(ids=ids, scores=scores, dreams=dreams)


@functools.lru_cache(maxsize=16)  # a caller asks for the same few B * k call after call
def _ones(n: int) -> torch.Tensor:
    """``[n]`` int32 ones on CPU: usage's increments (read only)."""
    return torch.ones(n, dtype=torch.int32)
