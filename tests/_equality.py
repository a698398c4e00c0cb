"""The equality docs/spec.md promises between two answers to the same retrieval.

Two calls that ask the same question in another way (another batch size or chunking,
shards, deferred or immediate checks, another CPU) return scores within ``SCORE_TOL``
(relative to 1 + |score|) and the same ids up to ties: an id may change place only with
another whose score is within the tolerance, and at the k-th place an id may be replaced
by one whose score ties with it. The same holds for MMR orders (``diverse``, ``soft``,
``hybrid``), whose rows are in pick order: two candidates whose scores tie up to the
tolerance may be picked in either order, and of two exact duplicates either may be picked.
Bit-equality is asserted only where the code makes it
true by construction (the stored state after a save/load round trip, the same call twice); it is never compared
with values recorded on another machine.
"""

from __future__ import annotations

import torch

SCORE_TOL = 1e-5


def _close(a: float, b: float, tol: float) -> bool:
    return abs(a - b) <= tol * (1.0 + max(abs(a), abs(b)))


def assert_same_results(
    ids_a: torch.Tensor,
    scores_a: torch.Tensor,
    ids_b: torch.Tensor,
    scores_b: torch.Tensor,
    *,
    tol: float = SCORE_TOL,
    where: str = "",
) -> None:
    """Fail unless two ``[B, k]`` results agree as the spec promises.

    Args:
        ids_a, scores_a, ids_b, scores_b: ``[B, k]`` int64 ids (-1 padding) and float scores (-inf padding).
        tol: score tolerance, relative to ``1 + |score|``.
        where: text put in front of a failure message.
    """
    assert ids_a.shape == ids_b.shape == scores_a.shape == scores_b.shape, (
        f"{where} shapes {tuple(ids_a.shape)} vs {tuple(ids_b.shape)}"
    )
    ia, ib = ids_a.cpu().tolist(), ids_b.cpu().tolist()
    sa, sb = scores_a.double().cpu().tolist(), scores_b.double().cpu().tolist()
    for r, (row_ia, row_ib, row_sa, row_sb) in enumerate(zip(ia, ib, sa, sb, strict=True)):
        at = f"{where} row {r}: ids {row_ia} vs {row_ib}, scores {row_sa} vs {row_sb}"
        assert [i < 0 for i in row_ia] == [i < 0 for i in row_ib], f"padding differs: {at}"
        for x, y in zip(row_sa, row_sb, strict=True):
            if x == float("-inf") or y == float("-inf"):
                assert x == y, f"padding score differs: {at}"
            else:
                assert _close(x, y, tol), f"scores differ beyond {tol}: {at}"
        valid = [i for i, v in enumerate(row_ia) if v >= 0]
        if not valid:
            continue
        last_a, last_b = row_sa[valid[-1]], row_sb[valid[-1]]
        for ids_x, sc_x, ids_y, sc_y, last_y in (
            (row_ia, row_sa, row_ib, row_sb, last_b),
            (row_ib, row_sb, row_ia, row_sa, last_a),
        ):
            for p in valid:
                if ids_x[p] == ids_y[p]:
                    continue
                # moved within a group of tied scores, replaced by an entry tied with it (an exact
                # duplicate in an MMR order), or out at the k-th place against a tie
                moved = any(ids_y[q] == ids_x[p] and _close(sc_x[p], sc_y[q], 2 * tol) for q in valid)
                replaced = _close(sc_x[p], sc_y[p], 2 * tol) and ids_x[p] not in ids_y
                out = _close(sc_x[p], last_y, 2 * tol)
                assert moved or replaced or out, f"id {ids_x[p]} at place {p} not up to a tie: {at}"
