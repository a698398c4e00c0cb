"""Requests by global id in a sharded pool: each id checked and answered at its owner
(feedback, update, dreams, metadata, diversity), and uniform draws over the union of the shards."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from dreampool_gpu import _validation as v
from dreampool_gpu import errors
from dreampool_gpu.columns import Columns, as_returned
from dreampool_gpu.distributed.collectives import _pack, _pad_rows, _unpack, local
from dreampool_gpu.distributed.ids import TAG_BITS, owner_of
from dreampool_gpu.errors import InvalidInputError
from dreampool_gpu.rerank import diversity_stats
from dreampool_gpu.retrieval import request
from dreampool_gpu.updates import checked_update

if TYPE_CHECKING:
    from dreampool_gpu.distributed.pool import ShardedDreamPool


def _shard_where(where: Any) -> Any:
    """``where`` as a sharded pool takes it: None or a callable of the metadata columns.

    A ``[capacity]`` mask names the slots of one pool; a sharded pool has a bank per
    shard, so a mask is refused rather than applied to an unknown shard.

    Raises:
        InvalidInputError: a tensor, array or anything else that is not callable.
    """
    if where is None or (callable(where) and not isinstance(where, (torch.Tensor, np.ndarray))):
        return where
    raise InvalidInputError(
        "where",
        "None or a callable of the metadata columns, run on every shard "
        "(a [capacity] mask names the slots of one pool, and a sharded pool has one bank per shard)",
        type(where).__name__,
    )


def owned(sp: ShardedDreamPool, ids: torch.Tensor) -> torch.Tensor:
    """``ids`` where this rank owns them, -1 elsewhere."""
    return torch.where((ids >= 0) & (owner_of(ids, sp.world_size) == sp.rank), ids, torch.full_like(ids, -1))


def issued(sp: ShardedDreamPool, ids: torch.Tensor) -> torch.Tensor:
    """``[n]`` bool: ids (owned by this rank) that this shard has issued or inherited."""
    tags = ids >> TAG_BITS
    ok = torch.zeros_like(ids, dtype=torch.bool)
    for tag, mark in sp._watermarks.items():
        mark = sp.shard.bank.next_id if tag == sp._issuing else mark
        ok |= (tags == tag) & (ids < mark)
    return ok


def route_ids(
    sp: ShardedDreamPool, ids: Any, error: BaseException | None = None
) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    """Validate this rank's ids, agree, gather and check every id at its owner (collective).

    ``error``: this rank's input already failed (the ranks still agree, then raise).
    Returns this rank's flat ``[n]`` ids, every rank's count and every rank's
    ids concatenated in rank order.
    """

    def parse() -> torch.Tensor:
        t = v.as_tensor(ids, "ids", device=sp.shard.device)
        v.check_int(t, "ids")
        t = t.long()
        if t.numel() and bool((t < -1).any()):
            raise InvalidInputError("ids", "global ids >= 0, or -1 padding", "ids below -1")
        return t

    t, error = local(parse) if error is None else (None, error)
    table = sp._net.agree([0 if t is None else t.numel()], error)
    counts = table[:, 0].tolist()
    flat = cast(torch.Tensor, t).reshape(-1)  # parsed: agree raised on every rank if any parse failed
    everyone = sp._net.all_gather(_pad_rows(flat, max(counts)))
    gathered = torch.cat([everyone[r, :c] for r, c in enumerate(counts)]).to(sp.shard.device)
    mine = owned(sp, gathered)
    unknown = torch.zeros(sp.world_size, dtype=torch.int64)
    with sp.shard.parts.lock:
        unknown[sp.rank] = int(((mine >= 0) & ~issued(sp, mine)).any())
    unknown = sp._net.all_reduce(unknown).cpu()
    if bool(unknown.any()):
        owners = torch.nonzero(unknown).squeeze(1).tolist()
        raise InvalidInputError(
            "ids", "ids issued by this sharded pool (or -1)", f"unknown ids owned by rank(s) {owners}"
        )
    return flat, counts, gathered


def lookup(sp: ShardedDreamPool, ids: torch.Tensor, counts: list[int], names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Columns ``names`` (plus ``found``) of valid ``ids`` ``[n]``, each fetched from its owner."""
    nmax = max(counts)
    table = sp._net.all_gather(_pad_rows(ids, nmax)).to(sp.shard.device)  # [W, nmax]
    with sp.shard.parts.lock:
        slots = sp.shard.bank.slots_of(owned(sp, table))
        cols = {name: sp.shard.bank.gather(name, slots) for name in names}
        cols["found"] = slots >= 0
    rows, layout = _pack(
        {n: c.reshape(sp.world_size * nmax, *c.shape[2:]) for n, c in cols.items()}, sp.world_size * nmax
    )
    counts_out = [nmax] * sp.world_size
    received = sp._net.all_to_all(rows, counts_out, counts_out).reshape(sp.world_size, nmax, rows.shape[1])
    got = _unpack(received[:, : ids.numel()], layout)  # [W sources, n, ...]
    source = owner_of(ids, sp.world_size).to(sp._net.device)
    pick = torch.arange(ids.numel(), device=sp._net.device)
    return {name: t[source, pick].to(sp.shard.device) for name, t in got.items()}


def feedback(sp: ShardedDreamPool, ids: Any, utility: Any) -> int:
    """:meth:`ShardedDreamPool.feedback` on ``sp``."""
    shard = sp.shard

    def parse() -> tuple[torch.Tensor, torch.Tensor]:
        id_t = v.as_tensor(ids, "ids", device=shard.device)
        v.check_int(id_t, "ids")
        u = v.as_tensor(utility, "utility", device=shard.device)
        v.check_float(u, "utility")
        if u.dim() == 0:
            u = u.expand(id_t.shape)
        if u.shape != id_t.shape:
            raise errors.DimensionMismatchError(list(id_t.shape), list(u.shape), "utility")
        v.check_finite(u, "utility")
        v.check_range(u, "utility", 0.0, 1.0)
        return id_t, u.reshape(-1).float()

    parsed, error = local(parse)
    _, counts, everyone_ids = route_ids(sp, None if parsed is None else parsed[0], error)
    values = sp._net.all_gather(_pad_rows(parsed[1], max(counts)))
    everyone_u = torch.cat([values[r, :c] for r, c in enumerate(counts)]).to(shard.device)
    mine = owned(sp, everyone_ids)
    with shard.parts.lock:
        found = (shard.bank.slots_of(mine) >= 0).to(torch.int64)
    per_source = torch.stack([part.sum() for part in found.split(counts)])
    recorded = sp._net.all_reduce(per_source).cpu()
    keep = mine >= 0
    shard.feedback(mine[keep], everyone_u[keep])
    return int(recorded[sp.rank])


def update(sp: ShardedDreamPool, ids: Any, columns: dict[str, Any]) -> int:
    """:meth:`ShardedDreamPool.update` on ``sp``."""
    shard = sp.shard
    names = tuple(shard.config.columns)

    def parse() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with shard.parts.lock:
            return checked_update(shard.config, ids, columns, shard.device)

    parsed, error = local(parse)
    given = 0 if parsed is None else sum(1 << names.index(name) for name in parsed[1])
    table = sp._net.agree([given], error)
    if bool((table[:, 0] != table[0, 0]).any()):
        sets = [[n for i, n in enumerate(names) if mask >> i & 1] for mask in table[:, 0].tolist()]
        raise InvalidInputError("columns", "the same user columns named on every rank", sets)
    flat, values = cast(tuple[torch.Tensor, dict[str, torch.Tensor]], parsed)
    _, counts, everyone_ids = route_ids(sp, flat)
    rows, layout = _pack(values, flat.numel())
    gathered = sp._net.all_gather(_pad_rows(rows, max(counts)))
    everyone = _unpack(torch.cat([gathered[r, :c] for r, c in enumerate(counts)]), layout)
    mine = owned(sp, everyone_ids)
    with shard.parts.lock:
        found = (shard.bank.slots_of(mine) >= 0).to(torch.int64)
    per_source = torch.stack([part.sum() for part in found.split(counts)])
    written = sp._net.all_reduce(per_source).cpu()
    keep = mine >= 0
    if bool(keep.any()):
        shard.update(mine[keep], **{name: t.to(shard.device)[keep] for name, t in everyone.items()})
    return int(written[sp.rank])


def dreams(sp: ShardedDreamPool, ids: Any) -> torch.Tensor:
    """:meth:`ShardedDreamPool.dreams` on ``sp``."""
    flat, counts, _ = route_ids(sp, ids)
    shape = v.as_tensor(ids, "ids").shape
    out = lookup(sp, flat, counts, ("dreams",))["dreams"]
    return out.reshape(*shape, *out.shape[1:])


def metadata(sp: ShardedDreamPool, ids: Any) -> Columns:
    """:meth:`ShardedDreamPool.metadata` on ``sp``."""
    flat, counts, _ = route_ids(sp, ids)
    shape = v.as_tensor(ids, "ids").shape
    names = [n for n in sp.shard.bank.columns if n != "dreams"]
    out = lookup(sp, flat, counts, names)
    return Columns({n: as_returned(t.reshape(*shape, *t.shape[1:])) for n, t in out.items()})


def diversity(sp: ShardedDreamPool, ids: Any) -> dict[str, torch.Tensor]:
    """:meth:`ShardedDreamPool.diversity` on ``sp``."""

    def check() -> None:
        t = v.as_tensor(ids, "ids")
        if t.dim() != 2:
            raise errors.DimensionMismatchError("[B, k] ids", list(t.shape), "ids")

    _, error = local(check)
    flat, counts, _ = route_ids(sp, ids, error)
    found = lookup(sp, flat, counts, ("chroma",))
    b, k = v.as_tensor(ids, "ids").shape
    chroma = found["chroma"]
    return diversity_stats(chroma.reshape(b, k, *chroma.shape[1:]), found["found"].reshape(b, k))


def sample(
    sp: ShardedDreamPool, n: int, *, where: Any = None, replace: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """:meth:`ShardedDreamPool.sample` on ``sp``."""
    shard = sp.shard

    def parse() -> tuple[int, torch.Tensor]:
        count = v.check_count(n, "n")
        v.check_flag(replace, "replace")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise InvalidInputError("generator", "a torch.Generator or None", type(generator).__name__)
        with shard.parts.lock:
            keep = request.where_mask(_shard_where(where), shard.bank, shard.device)
            slots = shard.bank.slots_by_age()
            if keep is not None:
                slots = slots[keep[slots]]
            return count, shard.bank.columns["ids"][slots].sort().values.cpu()

    parsed, error = local(parse)
    table = sp._net.agree([0 if parsed is None else parsed[0], int(replace is True)], error)
    ids = cast("tuple[int, torch.Tensor]", parsed)[1]  # parsed: agree raised on every rank otherwise
    tags, per_tag = (ids >> TAG_BITS).unique_consecutive(return_counts=True)  # ids sorted: tags too
    pairs = list(zip(tags.tolist(), per_tag.tolist(), strict=True))
    listing = sorted(pair for part in sp._net.all_gather_objects(pairs) for pair in part)  # tags are unique
    total = sum(c for _, c in listing)
    draws = [
        (int(c) if total else 0) if with_replacement else min(int(c), total)
        for c, with_replacement in table[:, :2].tolist()
    ]
    if max(draws) == 0:
        return torch.empty(0, dtype=torch.int64, device=shard.device)
    # a draw is a position in the union (tag-major = global id order), sent as (tag, index within tag)
    mine_n = draws[sp.rank]
    if not mine_n:
        pos = ids[:0]
    elif replace:
        pos = torch.randint(total, (mine_n,), generator=generator)
    else:
        pos = torch.randperm(total, generator=generator)[:mine_n]
    all_tags = torch.tensor([t for t, _ in listing], dtype=torch.int64)
    sizes = torch.tensor([c for _, c in listing], dtype=torch.int64)
    ends = sizes.cumsum(0)
    which = torch.searchsorted(ends, pos, right=True)
    keys = (all_tags[which] << TAG_BITS) + pos - (ends - sizes)[which]
    asked = sp._net.all_gather(_pad_rows(keys, max(draws))).cpu()  # [W, max draws], -1 padding
    mine = (asked >= 0) & (owner_of(asked, sp.world_size) == sp.rank)
    first = torch.searchsorted(ids, (asked >> TAG_BITS) << TAG_BITS)  # my first id of the key's tag
    at = (first + (asked & ((1 << TAG_BITS) - 1))).clamp(max=max(ids.numel() - 1, 0))
    answer = torch.where(mine, ids[at] if ids.numel() else torch.zeros_like(asked), torch.zeros_like(asked))
    answer = sp._net.all_reduce(answer).cpu()  # every key answered by its one owner
    return answer[sp.rank, : draws[sp.rank]].to(shard.device)
