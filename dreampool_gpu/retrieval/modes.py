"""The mode table: each retrieval mode as one row (candidate column, filter, re-rank, options, stages).

``DreamPool.retrieve`` runs ``MODES[mode].run`` on a checked
:class:`~dreampool_gpu.retrieval.request.Request`; ``batch`` and the CLI read the
options from here. A row's ``run`` composes the stages of
:mod:`~dreampool_gpu.retrieval.stages` and returns ``[B, width]`` (scores, slots).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from dreampool_gpu import checks
from dreampool_gpu.config import RetrievalMode
from dreampool_gpu.errors import InvalidInputError
from dreampool_gpu.retrieval import stages
from dreampool_gpu.retrieval.context import RETRIEVE_DEFAULTS
from dreampool_gpu.retrieval.topk import empty_results

if TYPE_CHECKING:
    from dreampool_gpu.retrieval.context import RetrievalContext
    from dreampool_gpu.retrieval.request import Request

Result = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class ModeSpec:
    """One retrieval mode.

    Attributes:
        mode: the mode. column: the bank column candidates come from (``chroma`` or
            ``embeddings``). filter: the argument that restricts candidates besides
            ``where`` (None: none). rerank: the re-rank stage (None, ``mmr`` or ``hybrid``).
        options: the keyword arguments of ``retrieve`` the mode reads, besides ``k``,
            ``mode``, ``where`` and ``with_dreams`` (every mode accepts every option; the
            others are ignored). run: ``(context, request) -> (scores, slots)``.
    """

    mode: RetrievalMode
    column: str
    filter: str | None
    rerank: str | None
    options: tuple[str, ...]
    run: Callable[[RetrievalContext, Request], Result]


def _chroma(ctx: RetrievalContext, req: Request, queries: torch.Tensor, mask: torch.Tensor | None) -> Result:
    """Chroma candidates of ``queries`` ``[b, 3]`` within ``mask`` and the request's ``where``."""
    return stages.chroma_candidates(
        ctx.bank,
        queries,
        req.k,
        stages.both(mask, req.keep),
        metric=req.chroma_metric,
        chunk_mb=ctx.config.search_chunk_mb,
    )


def _chroma_of(req: Request) -> torch.Tensor:
    chroma = req.q.chroma
    if chroma is None:  # unreachable: parse_queries refuses embedding queries in chroma modes
        raise InvalidInputError("queries", "dreams or chroma for a chroma method", "embeddings")
    return chroma


def _similar(ctx: RetrievalContext, req: Request) -> Result:
    return _chroma(ctx, req, _chroma_of(req), None)


def _class(ctx: RetrievalContext, req: Request) -> Result:
    """Chroma candidates within each query's class: one ``[B, capacity]`` mask in a sync-free call
    while it fits ``search_chunk_mb`` (grouping by class reads the hints on the host), else per class."""
    labels, chroma = ctx.bank.columns["class_label"], _chroma_of(req)
    if checks.sync_free() and req.q.count * ctx.bank.capacity <= ctx.config.search_chunk_mb * 2**20:
        return _chroma(ctx, req, chroma, labels[None, :] == req.hint[:, None])
    return stages.by_value(req.hint, req.k, lambda rows, c: _chroma(ctx, req, chroma[rows], (labels == c)[None, :]))


def _balanced(ctx: RetrievalContext, req: Request) -> Result:
    labels, chroma = ctx.bank.columns["class_label"], _chroma_of(req)
    parts = [_chroma(ctx, req, chroma, (labels == c)[None, :]) for c in req.classes]
    if not parts:
        return empty_results(req.q.count, ctx.device)
    return torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1)


def _utility(ctx: RetrievalContext, req: Request) -> Result:
    return _chroma(ctx, req, _chroma_of(req), (ctx.bank.columns["utility"] >= req.utility_threshold)[None, :])


def _diverse(ctx: RetrievalContext, req: Request) -> Result:
    return stages.diverse(
        ctx.bank,
        _chroma_of(req),
        req.k,
        req.lam,
        req.min_dispersion,
        req.keep,
        metric=req.chroma_metric,
        chunk_mb=ctx.config.rerank_chunk_mb,
    )


def _embedded(ctx: RetrievalContext, req: Request) -> torch.Tensor:
    """``[B, D]`` query embeddings, through the query cache where it applies."""
    if req.q.embeddings is not None:  # embedding queries: no hint or prior is read
        return req.q.embeddings
    return ctx.encoders.query_embeddings(req.q, req.hint, req.prior)


def _nearest(ctx: RetrievalContext, req: Request) -> Result:
    scores, slots, req.full = stages.neighbours(
        ctx.bank, ctx.index, ctx.config, _embedded(ctx, req), req.k, req.categories, req.keep
    )
    return scores, slots


def _hybrid(ctx: RetrievalContext, req: Request) -> Result:
    """Soft candidates (``fetch`` k-NN, within ``categories``) -> hybrid base score -> MMR -> k."""
    if req.k == 0:
        return empty_results(req.q.count, ctx.device)
    similarity, candidates = stages.knn(
        ctx.bank, ctx.index, ctx.config, _embedded(ctx, req), max(req.fetch, req.k), req.categories, req.keep
    )
    return stages.hybrid(
        ctx.bank,
        similarity,
        candidates,
        req.given_hint,
        req.k,
        req.lam,
        req.min_dispersion,
        ctx.weights,
        chunk_mb=ctx.config.rerank_chunk_mb,
    )


_CHROMA = ("chroma_metric",)
_EMBEDDED = ("class_hint", "utility_prior", "category")
_RERANKED = (*_EMBEDDED, "fetch_k", "mmr_lambda", "min_dispersion")
_M = RetrievalMode
MODES: dict[RetrievalMode, ModeSpec] = {
    spec.mode: spec
    for spec in (
        ModeSpec(_M.SIMILAR, "chroma", None, None, _CHROMA, _similar),
        ModeSpec(_M.CLASS, "chroma", "class_hint", None, ("class_hint", *_CHROMA), _class),
        ModeSpec(_M.BALANCED, "chroma", "classes", None, ("classes", *_CHROMA), _balanced),
        ModeSpec(_M.UTILITY, "chroma", "utility_threshold", None, ("utility_threshold", *_CHROMA), _utility),
        ModeSpec(_M.DIVERSE, "chroma", None, "mmr", ("mmr_lambda", "min_dispersion", *_CHROMA), _diverse),
        ModeSpec(_M.SOFT, "embeddings", "category", "hybrid", _RERANKED, _hybrid),
        ModeSpec(_M.HYBRID, "embeddings", "category", "hybrid", _RERANKED, _hybrid),
        ModeSpec(_M.CATEGORY, "embeddings", "category", None, _EMBEDDED, _nearest),
        ModeSpec(_M.NEAREST, "embeddings", "category", None, _EMBEDDED, _nearest),
    )
}
"""Every mode, in :class:`RetrievalMode` order."""

CHROMA_MODES = frozenset(m for m, spec in MODES.items() if spec.column == "chroma")
"""Modes whose candidates come from the chroma column (they take no embedding queries)."""
EMBEDDING_MODES = frozenset(m for m, spec in MODES.items() if spec.column == "embeddings")
"""Modes that search the embeddings through the pool's engine."""
FILTERED_MODES = frozenset(m for m, spec in MODES.items() if spec.filter == "category")
"""Modes that read ``category`` as a candidate filter."""
RERANK_MODES = frozenset(m for m, spec in MODES.items() if spec.rerank == "hybrid")
"""Modes that re-rank ``fetch_k`` embedding candidates (hybrid score, then MMR)."""

OPTIONS = tuple(o for o in RETRIEVE_DEFAULTS if any(o in spec.options for spec in MODES.values()))
"""The keyword options of ``DreamPool.retrieve`` a batch job or the CLI passes through
(scalars or lists: ``where`` and ``with_dreams`` are library-only)."""
