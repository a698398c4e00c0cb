"""Warnings a pool gives once: a gate that rejects (almost) a whole batch, a learned encoder never fitted.

Both are ``UserWarning`` s about calls that succeed but probably do not do what the
caller meant. Each is given at most once per pool (:class:`Notices`), and costs no host
read: the gate's count is the number ``add`` reads anyway, and fitting is a host flag.
"""

from __future__ import annotations

import warnings

from dreampool_gpu.encoders import Encoder
from dreampool_gpu.learned import LearnedEncoder

REJECT_SHARE = 0.9  # an add warns when its gate rejects more than this share of a batch ...
REJECT_MIN_BATCH = 8  # ... of at least this many dreams, or every dream of a batch of any size


class Notices:
    """The once-per-pool warnings of one pool (which were given already)."""

    def __init__(self) -> None:
        self._given: set[str] = set()

    def _once(self, key: str, message: str, stacklevel: int) -> None:
        if key not in self._given:
            self._given.add(key)
            warnings.warn(message + " (warned once per pool)", UserWarning, stacklevel=stacklevel + 1)

    def gate(self, n: int, passed: int, threshold: float) -> None:
        """After an add's gate: warn when it rejected all ``n`` dreams, or more than
        :data:`REJECT_SHARE` of ``n >= REJECT_MIN_BATCH``; ``passed`` is the gate's count."""
        rejected = n - passed
        if n == 0 or not (passed == 0 or (n >= REJECT_MIN_BATCH and rejected > REJECT_SHARE * n)):
            return
        self._once(
            "gate",
            f"add: the coherence gate rejected {rejected} of {n} dreams (coherence below "
            f"coherence_threshold={threshold:g}), which are not stored; pass force=True to store them "
            f"whatever their coherence, or lower PoolConfig(coherence_threshold=...)",
            stacklevel=4,  # the caller of DreamPool.add (through Admitter.add)
        )

    def unfitted(self, encoder: Encoder, fitted: bool) -> None:
        """Before an embedding-mode retrieval: warn when ``encoder`` is the pool's learned one, never fitted."""
        if fitted or not isinstance(encoder, LearnedEncoder):
            return
        self._once(
            "unfitted",
            "retrieve: the embedding modes rank by the learned encoder, which was never fitted (its "
            "random weights retrieve at about chance): call pool.fit_encoder() first, or use "
            "PoolConfig(encoder='features')",
            stacklevel=4,  # the caller of retrieve
        )
