"""The stages of a query over one bank: candidates (chroma or embeddings) and re-rank (MMR, hybrid).

Every function takes checked inputs (see :mod:`~dreampool_gpu.retrieval.request`) and
returns ``(scores, slots)`` ``[B, width]`` on the bank's device: best first, equal
scores oldest first, ``-inf`` / ``-1`` padding. Slots, not ids: the pool gathers.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch

from dreampool_gpu import checks
from dreampool_gpu.bank import TensorBank
from dreampool_gpu.cache import QueryCache, query_keys
from dreampool_gpu.config import Metric, PoolConfig
from dreampool_gpu.encoders import Encoder, bank_form
from dreampool_gpu.errors import InvalidInputError
from dreampool_gpu.rerank import (
    HybridWeights,
    class_match,
    hybrid_scores,
    mmr_row_bytes,
    mmr_unchecked,
    row_chunks,
    rowwise_cosine,
)
from dreampool_gpu.retrieval.topk import empty_results, oldest_first_ties, stable_topk_by_age
from dreampool_gpu.search import SearchIndex

CHROMA_METRICS = ("cosine", "euclidean")


def chroma_scores(queries: torch.Tensor, chroma: torch.Tensor, metric: str) -> torch.Tensor:
    """``[b, n]`` chroma scores, higher is better: cosine (hue direction), or minus the RGB
    distance (brightness-aware; exact differences, batch-size invariant)."""
    if metric == "cosine":
        return rowwise_cosine(queries, chroma)
    return -torch.cdist(queries.float(), chroma.float(), compute_mode="donot_use_mm_for_euclid_dist")


def both(mask: torch.Tensor | None, keep: torch.Tensor | None) -> torch.Tensor | None:
    """``mask & keep`` where both are given (``keep`` ``[capacity]`` broadcasts over query rows)."""
    if keep is None:
        return mask
    return keep[None, :] if mask is None else mask & (keep[None, :] if mask.dim() == 2 else keep)


def by_value(
    keys: torch.Tensor,
    width: int,
    run: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Answer queries grouped by ``keys`` (``[B]`` int): ``run(rows, value)`` per value present.

    Each call gets the ``[b]`` rows holding one value and returns their
    ``[b, width]`` (scores, slots); they are scattered back into ``[B, width]``.
    A per-query filter with few distinct values (classes, hue categories) is
    then a shared ``[capacity]`` mask per group rather than a ``[B, capacity]`` one.
    """
    scores = torch.full((keys.shape[0], width), float("-inf"), device=keys.device)
    slots = torch.full((keys.shape[0], width), -1, dtype=torch.int64, device=keys.device)
    for value in keys.unique().tolist():
        rows = torch.nonzero(keys == value).squeeze(1)
        part_scores, part_slots = run(rows, value)
        scores[rows], slots[rows] = part_scores.float(), part_slots
    return scores, slots


# ------------------------------------------------------------ candidates
def embed_queries(
    encoder: Encoder,
    cache: QueryCache,
    config: PoolConfig,
    chroma: torch.Tensor | None,
    spectral: torch.Tensor | None,
    dreams: torch.Tensor | None,
    hint: torch.Tensor,
    prior: torch.Tensor,
) -> torch.Tensor:
    """``[B, D]`` query embeddings in the bank's form from dreams (``[B, R, C, L, 3]``) or
    chroma (``[B, 3]``), with the class hints and utility priors ``[B]``.

    Chroma-only queries go through ``cache`` (keyed by chroma, hint and prior), except in
    sync-free calls: building a key reads the query on the host.
    """
    if chroma is None:  # unreachable: parse_queries always gives chroma or embeddings
        raise InvalidInputError("queries", "dreams, chroma or embeddings", None)

    def compute(rows: torch.Tensor) -> torch.Tensor:
        z = encoder.encode_queries(
            dreams=None if dreams is None else dreams[rows],
            chroma=chroma[rows],
            spectral=None if spectral is None else spectral[rows],  # None: chroma only
            class_labels=hint[rows],
            utility=prior[rows],
        )
        return bank_form(z, config.metric)

    count = chroma.shape[0]
    every = torch.arange(count, device=chroma.device)
    if dreams is not None or cache.capacity == 0 or checks.sync_free():  # a cache key is a host read
        return compute(every)
    out = torch.empty(count, config.embedding_dim, device=chroma.device)
    return cache.get_or_compute(query_keys(chroma, hint, prior), compute, out)


def chroma_candidates(
    bank: TensorBank, queries: torch.Tensor, k: int, mask: torch.Tensor | None, *, metric: str, chunk_mb: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable top-k ``[B, k]`` by chroma over live entries (oldest wins ties).

    Args:
        queries: ``[B, 3]`` float32 chroma. mask: None, or ``[1 or B, capacity]`` bool
            (only True slots qualify). metric: ``cosine`` or ``euclidean`` (minus the RGB distance).
        chunk_mb: query rows go in chunks whose ``[b, n]`` scores and tie-break keys stay
            under it; rows are batch-size invariant, so chunking changes nothing.
    """
    by_age = bank.slots_by_age()
    chroma = bank.columns["chroma"][by_age]
    shared = None if mask is None or mask.shape[0] > 1 else ~mask[:, by_age]  # one gather for every chunk

    def scores(rows: slice) -> torch.Tensor:
        sim = chroma_scores(queries[rows], chroma, metric)
        if mask is not None:
            excluded = shared if shared is not None else ~mask[rows][:, by_age]
            sim = sim.masked_fill(excluded.expand_as(sim), float("-inf"))
        return sim

    return stable_topk_by_age(by_age, queries.shape[0], k, scores, chunk_mb)


def knn(
    bank: TensorBank,
    index: SearchIndex,
    config: PoolConfig,
    embedded: torch.Tensor,
    k: int,
    categories: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's k-NN ``[B, k]`` (scores, slots): :func:`neighbours` without its host flag."""
    scores, slots, _ = neighbours(bank, index, config, embedded, k, categories, keep)
    return scores, slots


def neighbours(
    bank: TensorBank,
    index: SearchIndex,
    config: PoolConfig,
    embedded: torch.Tensor,
    k: int,
    categories: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The engine's k-NN ``[B, k]`` (scores, slots), equal scores oldest first (docs/spec.md §Retrieval),
    and whether the CPU tie scan saw every row's k-th score finite (then no slot is padding: the
    engines pad with ``-inf`` / -1), which spares the gathers their own check.

    On CPU the engine is asked for one more neighbour; rows where a tie
    straddles the k-th place (exact duplicates) are re-selected exactly in age
    order (:func:`_reselect_ties`), so the oldest of the tied entries make the
    cut. On CUDA (and in sync-free calls, see :mod:`dreampool_gpu.checks`) that check
    would cost a host synchronisation: there ties are ordered oldest first within the
    k returned, and the cut is the engine's.

    With ``categories`` (``[B]`` hue categories) each query searches only its
    category: on CUDA with one ``[B, capacity]`` mask while it fits
    ``search_chunk_mb`` (no host synchronisation), otherwise one shared mask
    per category present. ``keep`` (``[capacity]`` bool, the ``where`` filter)
    restricts every search.
    """
    if k == 0:
        return (*empty_results(embedded.shape[0], bank.device), False)
    cpu = bank.device.type == "cpu" and not checks.sync_free()
    fetch = k + 1 if cpu and 0 < k < bank.size else k
    if categories is None:
        scores, slots = index.search(embedded, fetch, mask=keep)
    elif not cpu and embedded.shape[0] * bank.capacity <= config.search_chunk_mb * 2**20:
        hue = bank.columns["hue_category"]
        scores, slots = index.search(embedded, fetch, mask=both(hue[None, :] == categories[:, None], keep))
    else:
        hue = bank.columns["hue_category"]
        scores, slots = by_value(
            categories, fetch, lambda rows, c: index.search(embedded[rows], fetch, mask=both(hue == c, keep))
        )
    if fetch > k:
        # Equal entries sit side by side in the best-first row, but a matmul may round them
        # apart by a few ulps (another BLAS path for another batch size or CPU). A row with
        # scores within rounding of each other is re-selected with element-wise scores, which
        # give identical vectors identical scores, so the oldest of equal entries make the cut.
        # Rows whose k-th and (k+1)-th places are that close may hide a tied entry beyond
        # the k+1 fetched: those are re-selected over the whole bank; the others only re-score
        # their k+1 candidates.
        if scores.numel() <= _HOST_TIE_SCAN:  # a few scores: scanned and re-ordered on the host (CPU)
            host = scores.tolist()
            near_rows, cut_rows, full = host_near_ties(host, embedded.shape[1], k)
            if not near_rows:
                return scores[:, :k], slots[:, :k], full
            scores, slots = _host_rescored(bank, config, embedded, host, slots, near_rows, k)
            cut = torch.tensor(cut_rows, device=scores.device) if cut_rows else None
        else:
            near = near_ties(scores, embedded.shape[1])
            if not bool(near.any()):
                return scores.narrow(1, 0, k), slots.narrow(1, 0, k), False
            rows = torch.nonzero(near.any(dim=1)).squeeze(1)
            cut = torch.nonzero(near[:, k - 1]).squeeze(1)
            scores, slots = scores.clone(), slots.clone()
            scores[rows], slots[rows] = _rescore_candidates(bank, config, embedded[rows], slots[rows])
            scores, slots = scores[:, :k].contiguous(), slots[:, :k].contiguous()
        if cut is not None and cut.numel():
            scores[cut], slots[cut] = _reselect_ties(
                bank, config, embedded[cut], k, None if categories is None else categories[cut], keep
            )
        return scores, slots, False
    return (*oldest_first_ties(scores, slots, bank.columns["ids"]), False)


def near_ties(scores: torch.Tensor, dim: int) -> torch.Tensor:
    """``[B, k-1]`` bool: neighbours of a best-first row whose scores differ by at most rounding.

    Two float32 dot products of the same ``dim``-vectors summed in another order differ by
    at most about ``dim * 2**-23`` of the sum of absolute products (at most ``1 + |score|``
    here: unit vectors for cosine, exact differences for euclidean). -inf padding gives NaN
    differences: never a tie.
    """
    tol = max(1e-6, dim * 2.0**-23)
    return scores.diff(dim=1).abs() <= tol * (1.0 + scores[:, 1:].abs())


_HOST_TIE_SCAN = 512  # up to this many scores (CPU), Python scans a row faster than the ~10 kernels of near_ties
_MINUS_INF, _PLUS_INF = float("-inf"), float("inf")


def host_near_ties(rows: list[list[float]], dim: int, k: int) -> tuple[list[int], list[int], bool]:
    """:func:`near_ties` of best-first rows read on the host: the rows with any near neighbours, those
    whose ``k``-th and ``(k+1)``-th places are near (``near[:, k - 1]``), and whether every row's
    ``k``-th score is finite."""
    tol = max(1e-6, dim * 2.0**-23)
    near, cut, full = [], [], bool(rows)
    for i, row in enumerate(rows):
        full = full and row[k - 1] > _MINUS_INF
        # a descending row whose least gap beats the largest tolerance has no near pair (NaN, -inf: compare False)
        if len(row) > 1 and min(map(operator.sub, row, row[1:])) > tol * (1.0 + max(abs(row[1]), abs(row[-1]))):
            continue
        close = [abs(b - a) <= tol * (1.0 + abs(b)) for a, b in zip(row, row[1:], strict=False)]  # -inf: never
        if any(close):
            near.append(i)
            if close[k - 1]:
                cut.append(i)
    return near, cut, full


def _pair_scores(config: PoolConfig, queries: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """``[b, m]`` scores of ``queries`` ``[b, D]`` against ``vectors`` ``[b, m, D]`` (``[1, m, D]``: shared),
    one pair at a time.

    Element-wise products summed per pair (cosine) or exact differences (euclidean): identical
    vectors score identically wherever they sit, which a matmul does not promise.
    """
    q = queries.to(vectors.dtype).unsqueeze(1)
    if config.metric is Metric.COSINE:
        return (q * vectors).sum(-1).float()
    return -(q - vectors).float().pow(2).sum(-1).sqrt()


def _rescore_candidates(
    bank: TensorBank, config: PoolConfig, embedded: torch.Tensor, slots: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``[b, m]`` candidates ``slots`` (-1 padding) re-scored pair by pair.

    Returns best-first rows, equal scores oldest first.
    """
    vectors = bank.columns["embeddings"][slots.clamp(min=0)]
    scores = _pair_scores(config, embedded, vectors).masked_fill(slots < 0, float("-inf"))
    order = bank.columns["ids"][slots.clamp(min=0)].sort(dim=1, stable=True).indices
    scores, slots = scores.gather(1, order), slots.gather(1, order)
    order = scores.sort(dim=1, descending=True, stable=True).indices
    return scores.gather(1, order), slots.gather(1, order)


def _host_rescored(
    bank: TensorBank,
    config: PoolConfig,
    embedded: torch.Tensor,
    host: list[list[float]],
    slots: torch.Tensor,
    near_rows: list[int],
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, k]`` rows from the engine's ``[B, k + 1]`` (scores read on the host as ``host``), CPU: the rows
    ``near_rows`` re-scored and ordered as :func:`_rescore_candidates` does (pair scores, best first, equal
    scores oldest first, padding last), in Python over the values read; the others as the engine gave them."""
    every = len(near_rows) == len(host)
    picked = slots if every else slots[torch.tensor(near_rows)]
    safe = picked.clamp(min=0)
    queries = embedded if every else embedded[torch.tensor(near_rows)]
    pair = _pair_scores(config, queries, bank.columns["embeddings"][safe]).tolist()
    ids = bank.columns["ids"].take(safe).tolist()
    slot_rows = slots.tolist()
    out_scores, out_slots = [row[:k] for row in host], [row[:k] for row in slot_rows]
    for j, i in enumerate(near_rows):
        row_slots = slot_rows[i]
        # (minus score, id, slot): ascending is best first, equal scores oldest first; padding (+inf) last
        minus = [_PLUS_INF if slot < 0 else -x for slot, x in zip(row_slots, pair[j], strict=True)]
        keys = sorted(zip(minus, ids[j], row_slots, strict=True))
        out_scores[i], out_slots[i] = [-key[0] for key in keys[:k]], [key[2] for key in keys[:k]]
    return torch.tensor(out_scores, dtype=torch.float32), torch.tensor(out_slots, dtype=torch.int64)


def _reselect_ties(
    bank: TensorBank,
    config: PoolConfig,
    embedded: torch.Tensor,
    k: int,
    categories: torch.Tensor | None,
    keep: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ``[b, k]`` k-NN of rows with near ties: everything above the k-th score, then the
    oldest (lowest id) of the entries equal to it; in slot layout, with no age-order copy.
    Slots are -1 (scores -inf) where fewer than k entries qualify.

    Scored pair by pair (:func:`_pair_scores`: a matmul can round identical vectors
    differently, which would split a group of exact duplicates), in query chunks of
    ``search_chunk_mb``. Rows come back best first, equal scores oldest first.
    """
    extent = bank.extent
    vectors = bank.columns["embeddings"][:extent]
    step = max(1, int(config.search_chunk_mb * 2**20) // max(1, vectors.numel() * vectors.element_size()))
    rows = range(0, embedded.shape[0], step)
    sim = torch.cat([_pair_scores(config, embedded[i : i + step], vectors[None]) for i in rows])
    if keep is not None or bank.size < extent:  # else every slot up to the extent is live
        excluded = ~bank.alive()[:extent] if keep is None else ~(bank.alive()[:extent] & keep[:extent])
        sim.masked_fill_(excluded[None, :], float("-inf"))
    if categories is not None:
        sim.masked_fill_(bank.columns["hue_category"][None, :extent] != categories[:, None], float("-inf"))
    values, top = sim.topk(k, dim=1)
    kth = values[:, -1:]
    ids = bank.columns["ids"][:extent]
    never = torch.iinfo(torch.int64).max
    tied_ids, tied = torch.where(sim == kth, ids[None, :], never).topk(k, dim=1, largest=False)  # oldest tied
    # of the top-k, those above the k-th score all make it; the oldest tied entries fill the rest
    key = torch.cat([torch.where(values > kth, -1, never), tied_ids], dim=1)
    chosen = torch.cat([top, tied], dim=1).gather(1, key.topk(k, dim=1, largest=False).indices)
    chosen = chosen.gather(1, ids[chosen].sort(dim=1, stable=True).indices)  # then best first, ties oldest first
    scores = sim.gather(1, chosen)
    order = scores.sort(dim=1, descending=True, stable=True).indices
    scores, chosen = scores.gather(1, order), chosen.gather(1, order)
    return scores, chosen.masked_fill(scores == float("-inf"), -1)  # fewer than k qualify: padding


# -------------------------------------------------------------- re-rank
def diverse(
    bank: TensorBank,
    queries: torch.Tensor,
    k: int,
    lam: float,
    min_dispersion: float,
    keep: torch.Tensor | None,
    *,
    metric: str,
    chunk_mb: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MMR over the whole pool (``keep``'s entries) on chroma signatures (candidates oldest first)."""
    by_age = bank.slots_by_age()
    excluded = None if keep is None else ~keep[by_age]
    scores, picks = diverse_over(
        queries, bank.columns["chroma"][by_age], k, lam, min_dispersion, excluded, metric=metric, chunk_mb=chunk_mb
    )
    slots = torch.where(picks >= 0, by_age[picks.clamp(min=0)] if by_age.numel() else picks, picks)
    return scores, slots


def diverse_over(
    queries: torch.Tensor,
    chroma: torch.Tensor,
    k: int,
    lam: float,
    min_dispersion: float,
    excluded: torch.Tensor | None,
    *,
    metric: str,
    chunk_mb: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MMR of ``queries`` (``[B, 3]`` chroma) over candidates ``chroma`` ``[n, 3]`` (oldest first).

    ``excluded``: ``[n]`` bool, candidates that never qualify (None: none). Queries go
    through in chunks whose ``[b, n]`` relevance and MMR state stay under ``chunk_mb``;
    on CPU every row is bit-identical to an unchunked run (on CUDA up to cuBLAS
    rounding, see ``rerank.rowwise_cosine``). Returns ``[B, k]`` (scores, candidate
    positions), -1 padding. The sharded pool runs it over the union of its shards.
    """
    n = chroma.shape[0]
    row_bytes = 4 * n + mmr_row_bytes(n, chroma.shape[1], shared=True)  # relevance + MMR state
    parts = []
    for rows in row_chunks(queries.shape[0], row_bytes, chunk_mb):
        # chroma scores as in chroma_candidates: batch-size invariant, so chunks change nothing
        relevance = chroma_scores(queries[rows], chroma, metric)
        if excluded is not None:  # -inf marks a filtered candidate for mmr: no host round trip
            relevance = relevance.masked_fill(excluded[None, :], float("-inf"))
        parts.append(mmr_unchecked(relevance, chroma, k, mmr_lambda=lam, min_dispersion=min_dispersion, points=chroma))
    picks = torch.cat([p[0] for p in parts])
    scores = torch.cat([p[1] for p in parts])
    return scores, picks


def hybrid(
    bank: TensorBank,
    similarity: torch.Tensor,
    candidates: torch.Tensor,
    hint: torch.Tensor | None,
    k: int,
    lam: float,
    min_dispersion: float,
    weights: HybridWeights,
    *,
    chunk_mb: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates ``[B, m]`` (similarity, slots) -> hybrid base score -> MMR on embeddings -> ``[B, k]``.

    The re-ranking runs in query chunks whose gathered ``[b, m, D]`` vectors and MMR
    state stay under ``chunk_mb``; on CPU every row is bit-identical to an unchunked
    run (on CUDA up to cuBLAS rounding, see ``rerank.rowwise_cosine``).
    """
    m = candidates.shape[1]
    embeddings, chroma = bank.columns["embeddings"], bank.columns["chroma"]
    d, p = embeddings.shape[1], chroma.shape[1]
    # bank.gather makes two copies of each gathered row; ~8 [m] int64/float rows score them
    gathered = 2 * m * (d * embeddings.element_size() + p * chroma.element_size()) + 8 * 8 * m
    row_bytes = gathered + mmr_row_bytes(m, d)
    score_parts, slot_parts = [], []
    names = ("util_mean", "embeddings", "chroma") + (() if hint is None else ("class_label",))
    chunks = row_chunks(candidates.shape[0], row_bytes, chunk_mb)
    for rows in chunks:
        cand = candidates if len(chunks) == 1 else candidates[rows]
        valid = cand >= 0
        got = _gather_candidates(bank, names, cand, valid)
        picks, scores = hybrid_rerank(
            similarity if len(chunks) == 1 else similarity[rows],
            valid,
            got["util_mean"],
            got.get("class_label"),
            got["embeddings"],
            got["chroma"],
            None if hint is None else hint[rows],
            k,
            lam,
            min_dispersion,
            weights,
        )
        score_parts.append(scores)
        slot_parts.append(torch.where(picks >= 0, cand.gather(1, picks.clamp(min=0)), picks))
    if len(chunks) == 1:
        return score_parts[0], slot_parts[0]
    return torch.cat(score_parts), torch.cat(slot_parts)


def _gather_candidates(
    bank: TensorBank, names: tuple[str, ...], cand: torch.Tensor, valid: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Columns ``names`` at candidate slots ``cand`` ``[b, m]`` (-1 padding: fill values).

    Plain gathers when no candidate is padding, which CPU reads at no transfer's cost.
    """
    if cand.device.type == "cpu" and not checks.sync_free() and bool(valid.all()):
        cols = bank.columns
        return {name: cols[name][cand] for name in names}
    safe = cand.clamp(min=0)
    return {name: bank.gather_valid(name, safe, valid) for name in names}


def hybrid_rerank(
    similarity: torch.Tensor,
    valid: torch.Tensor,
    util: torch.Tensor,
    labels: torch.Tensor | None,
    vectors: torch.Tensor,
    points: torch.Tensor,
    hint: torch.Tensor | None,
    k: int,
    lam: float,
    min_dispersion: float,
    weights: HybridWeights,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gathered candidates -> hybrid base score -> MMR: ``[b, k]`` (candidate positions, scores).

    Args:
        similarity, valid, util, labels: ``[b, m]`` engine score, candidate present,
            ``util_mean`` and class label of each candidate. vectors: ``[b, m, D]``
            embeddings; points: ``[b, m, 3]`` chroma. hint: ``[b]`` class hints (-1 none);
            None: no query has one (every class match is 0.5, and ``labels`` may be None).

    Used by :func:`hybrid` (one bank) and the sharded pool (candidates of every shard).
    """
    match = 0.5 if hint is None or labels is None else class_match(labels.long(), hint)
    invalid = ~valid  # engine scores are finite at every present candidate
    base = hybrid_scores(similarity.masked_fill(invalid, float("-inf")), util, match, weights, invalid=invalid)
    return mmr_unchecked(
        base, vectors, k, mmr_lambda=lam, delta=weights.delta, min_dispersion=min_dispersion, points=points
    )
