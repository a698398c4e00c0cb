"""Retrieval over a sharded pool: every rank's queries gathered, each shard's candidates
taken by the single pool's mode table, sent to the query's owner, merged (and re-ranked).

The result equals that of one :class:`DreamPool` holding every shard's entries in
global id order (ties broken oldest first, the age order being the global id order).
"""

from __future__ import annotations

import dataclasses
import struct
import types
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch

from dreampool_gpu import _validation as v
from dreampool_gpu.config import RetrievalMode
from dreampool_gpu.distributed import fit, routing
from dreampool_gpu.distributed.collectives import _fingerprint, _pack, _pad_rows, _unpack, local
from dreampool_gpu.distributed.routing import _shard_where
from dreampool_gpu.errors import InvalidInputError
from dreampool_gpu.merge import merge_candidates
from dreampool_gpu.pool import Retrieval
from dreampool_gpu.rerank import mmr_row_bytes, row_chunks
from dreampool_gpu.retrieval import request, stages
from dreampool_gpu.retrieval.modes import EMBEDDING_MODES, MODES, RERANK_MODES
from dreampool_gpu.retrieval.request import Queries
from dreampool_gpu.retrieval.topk import empty_results, pad_results

if TYPE_CHECKING:
    from dreampool_gpu.distributed.pool import ShardedDreamPool

_MODES = list(RetrievalMode)


def _bits(x: float) -> int:
    """The float64 bit pattern of ``x`` as an int (exact comparison across ranks)."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _crc(text: str) -> int:
    return zlib.crc32(text.encode())


# the retrieve arguments every rank must share, in the order of _Request.fields (after the counts)
_AGREED = (
    "mode",
    "k",
    "fetch_k",
    "mmr_lambda",
    "min_dispersion",
    "utility_threshold",
    "classes",
    "category",
    "with_dreams",
    "chroma_metric",
    "where",
)


@dataclass
class _Request:
    """One rank's checked retrieve: the single pool's request, over this rank's shard.

    ``r.keep`` is this shard's ``where`` mask; ``embedded`` the ``[B, D]`` query
    embeddings of an embedding mode; ``passing`` the shard's live entries passing
    ``where``; ``where_print`` a fingerprint of the ``where`` function (0: none).
    """

    r: request.Request
    embedded: torch.Tensor | None
    with_dreams: bool
    passing: int
    where_print: int

    def fields(self) -> list[int]:
        """Status fields: this rank's counts, then the arguments of :data:`_AGREED`."""
        r = self.r
        return [
            r.q.count,
            self.passing,
            _MODES.index(r.mode),
            r.k,
            r.fetch,
            _bits(r.lam),
            _bits(r.min_dispersion),
            _bits(r.utility_threshold),
            _crc(repr(r.classes)),
            int(r.categories is not None),
            int(self.with_dreams),
            stages.CHROMA_METRICS.index(r.chroma_metric),
            self.where_print,
        ]


def _where_print(where: Any) -> int:
    """A fingerprint of a ``where`` callable's code (0 for None), compared across ranks.

    Functions and lambdas by their bytecode, constants and names, nested code (a
    comprehension) included, not by the values a closure captures; ``functools.partial``
    by its function and arguments; other callables by their type.
    """
    if where is None:
        return 0
    func = getattr(where, "func", where)  # functools.partial
    code = getattr(func, "__code__", None)
    text = type(where).__qualname__ if not isinstance(code, types.CodeType) else _code_text(code)
    if func is not where:
        text += repr((getattr(where, "args", ()), sorted(getattr(where, "keywords", {}).items())))
    return _fingerprint(text.encode())


def _code_text(code: types.CodeType) -> str:
    """``code`` as text that is the same in every process (no addresses, no set order)."""

    def const(c: Any) -> str:
        if isinstance(c, types.CodeType):
            return _code_text(c)
        if isinstance(c, (tuple, frozenset)):
            parts = [const(x) for x in c]
            return f"{type(c).__name__}({sorted(parts) if isinstance(c, frozenset) else parts})"
        return repr(c)

    return repr((code.co_code, [const(c) for c in code.co_consts], code.co_names))


def retrieve(sp: ShardedDreamPool, queries: Any, options: dict[str, Any], with_dreams: Any) -> Retrieval:
    """:meth:`ShardedDreamPool.retrieve` on ``sp``: ``options`` are its keyword arguments but ``with_dreams``."""
    shard = sp.shard
    req, error = local(lambda: _parse(sp, queries, options, with_dreams))
    fields = [0] * (2 + len(_AGREED)) if req is None else req.fields()
    table = sp._net.agree([*fields, shard.counters["added"]], error)
    for i, name in enumerate(_AGREED):
        column = table[:, 2 + i]
        if bool((column != column[0]).any()):
            differ = torch.nonzero(column != column[0]).squeeze(1).tolist()
            raise InvalidInputError(name, "the same value on every rank", f"rank(s) {differ} differ from rank 0")
    fit.refit_if_due(shard, sp._net, int(table[:, -1].sum()))
    counts, sizes = table[:, 0].tolist(), table[:, 1].tolist()
    if req.r.mode is RetrievalMode.DIVERSE:
        scores, ids = _diverse(sp, req, sizes)
    else:
        scores, ids = _sharded_topk(sp, req, counts)
    with shard.parts.lock:
        shard.counters["queries"] += req.r.q.count
    flat = ids.reshape(-1)
    _count_usage(sp, flat, [c * ids.shape[1] for c in counts])
    dreams = None
    if req.with_dreams:
        found = routing.lookup(sp, flat, [c * ids.shape[1] for c in counts], ("dreams",))
        dreams = found["dreams"].reshape(*ids.shape, *found["dreams"].shape[1:])
    return Retrieval(ids=ids, scores=scores, dreams=dreams)


def _parse(sp: ShardedDreamPool, queries: Any, options: dict[str, Any], with_dreams: Any) -> _Request:
    """This rank's retrieve arguments, checked by the single pool's :func:`request.check_request`.

    ``k`` and ``fetch_k`` are bounded by the whole sharded pool's capacity; ``where``
    is evaluated on this rank's shard.
    """
    shard = sp.shard
    where = _shard_where(options["where"])
    with shard.parts.lock:
        r = request.check_request(shard.parts, queries, **options, total_capacity=sp.total_capacity)
        embedded = shard.parts.encoders.query_embeddings(r.q, r.hint, r.prior) if r.mode in EMBEDDING_MODES else None
        alive = shard.bank.alive()
        passing = int((alive if r.keep is None else alive & r.keep).sum())
    return _Request(r, embedded, v.check_flag(with_dreams, "with_dreams"), passing, _where_print(where))


def _sharded_topk(sp: ShardedDreamPool, req: _Request, counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather queries, take each shard's candidates, send them to the owners, merge (and re-rank)."""
    shard, r, b = sp.shard, req.r, req.r.q.count
    nmax = max(counts)
    if r.mode in EMBEDDING_MODES:
        cats = r.categories if r.categories is not None else torch.full((b,), -1, device=shard.device)
        # the parse set these: embeddings for an embedding mode, query chroma for a chroma mode
        mine = {"embedded": cast(torch.Tensor, req.embedded), "category": cats.long()}
    else:
        mine = {"chroma": cast(torch.Tensor, r.q.chroma), "hint": r.hint}
    rows, layout = _pack({name: _pad_rows(t, nmax) for name, t in mine.items()}, nmax)
    table = sp._net.all_gather(rows)
    everyone = _unpack(torch.cat([table[rank, :c] for rank, c in enumerate(counts)]), layout)
    everyone = {name: t.to(shard.device) for name, t in everyone.items()}
    width = max(r.fetch, r.k) if r.mode in RERANK_MODES else r.k
    with shard.parts.lock:
        cand = _candidates(sp, req, everyone, width)
    blocks = cand["scores"].shape[1]
    packed, cand_layout = _pack(cand, cand["scores"].shape[0])
    received = sp._net.all_to_all(packed, counts, [b] * sp.world_size)
    got = _unpack(received.reshape(sp.world_size, b, packed.shape[1]).transpose(0, 1), cand_layout)
    got = {name: t.to(shard.device) for name, t in got.items()}  # each [b, W, blocks, width, ...]
    if r.mode not in RERANK_MODES:
        parts = [merge_candidates(got["scores"][:, :, j], got["ids"][:, :, j], r.k)[:2] for j in range(blocks)]
        return torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1)
    return _rerank(sp, req, got, width)


def _candidates(
    sp: ShardedDreamPool, req: _Request, q_all: dict[str, torch.Tensor], width: int
) -> dict[str, torch.Tensor]:
    """This shard's best ``width`` per gathered query: ``[T, blocks, width]`` scores and ids (+ payload).

    Chroma modes run the single pool's row of the mode table (:data:`MODES`) on this
    shard, with the gathered queries; embedding modes take the engine's k-NN
    (:func:`stages.knn`), the candidate stage of their row. ``where`` is this shard's mask.
    """
    shard, r = sp.shard, req.r
    bank, count = shard.bank, next(iter(q_all.values())).shape[0]
    if r.mode in EMBEDDING_MODES:
        cats = q_all["category"] if r.categories is not None else None
        if count:
            scores, slots = stages.knn(bank, shard.index, shard.config, q_all["embedded"], width, cats, r.keep)
        else:
            scores, slots = empty_results(0, shard.device)
        if scores.shape[1] < width:  # no queries: keep the [0, width] layout
            scores, slots = pad_results(scores, slots, width)
        out = {"scores": scores.float()[:, None], "ids": bank.gather("ids", slots)[:, None]}
        if r.mode in RERANK_MODES:
            out.update(
                util=bank.gather("util_mean", slots)[:, None],
                label=bank.gather("class_label", slots)[:, None],
                vectors=bank.gather("embeddings", slots)[:, None],
                points=bank.gather("chroma", slots)[:, None],
            )
        return out
    blocks = len(r.classes) if r.mode is RetrievalMode.BALANCED else 1
    if count == 0:
        scores, slots = empty_results(0, shard.device)
    else:
        everyone = dataclasses.replace(
            r,
            q=Queries(count, chroma=q_all["chroma"]),
            given_hint=q_all["hint"],
            given_prior=torch.zeros(count, device=shard.device),
            categories=None,
        )
        scores, slots = MODES[r.mode].run(shard.parts, everyone)
    return {
        "scores": scores.float().reshape(count, blocks, r.k),
        "ids": bank.gather("ids", slots).reshape(count, blocks, r.k),
    }


def _rerank(
    sp: ShardedDreamPool, req: _Request, got: dict[str, torch.Tensor], width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft/hybrid at the query's owner: merged candidates -> the single pool's hybrid re-rank -> k."""
    shard, r, b = sp.shard, req.r, req.r.q.count
    if r.k == 0:
        return empty_results(b, shard.device)
    sim, cand, pos = merge_candidates(got["scores"][:, :, 0], got["ids"][:, :, 0], width)
    valid = cand >= 0
    take = pos.clamp(min=0)

    def column(name: str, fill: float) -> torch.Tensor:
        flat = got[name][:, :, 0].reshape(b, sp.world_size * width, *got[name].shape[4:])
        idx = take.reshape(b, width, *([1] * (flat.dim() - 2))).expand(b, width, *flat.shape[2:])
        picked = flat.gather(1, idx)
        mask = valid.reshape(b, width, *([1] * (picked.dim() - 2)))
        return picked.masked_fill(~mask, fill)

    util, label = column("util", 0.0), column("label", -1)
    vectors, points = column("vectors", 0.0), column("points", 0.0)
    d, p = vectors.shape[2], points.shape[2]
    row_bytes = 2 * width * (4 * d + 4 * p) + 64 * width + mmr_row_bytes(width, d)
    score_parts, id_parts = [], []
    for rows in row_chunks(b, row_bytes, shard.config.rerank_chunk_mb):
        picks, scores = stages.hybrid_rerank(
            sim[rows],
            valid[rows],
            util[rows],
            label[rows],
            vectors[rows],
            points[rows],
            r.hint[rows],
            r.k,
            r.lam,
            r.min_dispersion,
            shard.weights,
        )
        score_parts.append(scores)
        id_parts.append(torch.where(picks >= 0, cand[rows].gather(1, picks.clamp(min=0)), picks))
    return torch.cat(score_parts), torch.cat(id_parts)


def _diverse(sp: ShardedDreamPool, req: _Request, sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """MMR over the whole pool: every shard's (id, chroma) passing ``where`` gathered, then
    :func:`stages.diverse_over` at the query's owner."""
    shard, r = sp.shard, req.r
    nmax = max(sizes)
    with shard.parts.lock:
        by_age = shard.bank.slots_by_age()
        if r.keep is not None:
            by_age = by_age[r.keep[by_age]]
        mine = {"ids": shard.bank.columns["ids"][by_age], "chroma": shard.bank.columns["chroma"][by_age]}
        rows, layout = _pack({name: _pad_rows(t, nmax) for name, t in mine.items()}, nmax)
    table = sp._net.all_gather(rows)
    union = _unpack(torch.cat([table[rank, :c] for rank, c in enumerate(sizes)]), layout)
    order = union["ids"].argsort(stable=True)
    ids = union["ids"][order].to(shard.device)
    chroma = union["chroma"][order].to(shard.device)
    query_chroma = cast(torch.Tensor, r.q.chroma)  # diverse is a chroma mode: its queries carry chroma
    scores, picks = stages.diverse_over(
        query_chroma,
        chroma,
        r.k,
        r.lam,
        r.min_dispersion,
        None,
        metric=r.chroma_metric,
        chunk_mb=shard.config.rerank_chunk_mb,
    )
    out = torch.where(picks >= 0, ids[picks.clamp(min=0)] if ids.numel() else picks, picks)
    return scores, out


def _count_usage(sp: ShardedDreamPool, ids: torch.Tensor, counts: list[int]) -> None:
    """Add 1 to the usage of every returned entry, on its owner (one all_gather of the result ids)."""
    table = sp._net.all_gather(_pad_rows(ids, max(counts)))
    flat = torch.cat([table[r, :c] for r, c in enumerate(counts)]).to(sp.shard.device)
    with sp.shard.parts.lock:
        slots = sp.shard.bank.slots_of(routing.owned(sp, flat))
        usage = sp.shard.bank.columns["usage"]
        usage.index_add_(0, slots.clamp(min=0), (slots >= 0).to(usage.dtype))
