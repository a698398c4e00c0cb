"""The pool's counters, defined once: names and meanings (``stats()``, metrics, ``inspect``)."""

from __future__ import annotations

COUNTERS: dict[str, str] = {
    "added": "entries stored",
    "rejected": "dreams rejected by the coherence gate",
    "evicted": "entries evicted",
    "dropped": "accepted dreams that did not fit the pool",
    "queries": "queries answered",
    "feedback": "utility feedback records",
}
"""Counter name -> what it counts."""


def new_counters() -> dict[str, int]:
    """Every counter at zero."""
    return dict.fromkeys(COUNTERS, 0)
