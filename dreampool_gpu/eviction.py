"""Eviction policies as objects: which residents leave first, and which newcomers a full pool admits.

One class per :class:`~dreampool_gpu.config.EvictionPolicy` (:func:`policy_for`). ``add``
asks its policy once per call (:meth:`Eviction.admit`) which of the batch to store, and
:meth:`Eviction.order` whenever residents must leave; how many must leave is the
capacity's and the budget's business (:mod:`dreampool_gpu.budget`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dreampool_gpu.bank import TensorBank
from dreampool_gpu.config import EvictionPolicy


class Eviction:
    """Base policy: first in, first out; a batch larger than the room keeps its newest dreams."""

    policy = EvictionPolicy.FIFO

    def key(self, bank: TensorBank) -> torch.Tensor | None:
        """``[capacity]`` float64 key per slot, lowest leaves first; None: age alone."""
        return None

    def order(self, bank: TensorBank) -> torch.Tensor:
        """``[size]`` int64 slots of live entries, first to leave first (lowest key, ties oldest first)."""
        by_age = bank.slots_by_age()
        key = self.key(bank)
        if key is None:
            return by_age
        return by_age[torch.sort(key[by_age], stable=True).indices]

    def admit(self, bank: TensorBank, coherence: torch.Tensor, room: int, need: Callable[[int], int]) -> torch.Tensor:
        """Positions of the batch (``coherence`` ``[m]``) that the pool stores when ``room`` fit at most.

        The best ``room`` by the policy's order, as if the whole batch were stored and
        then evicted down to ``room``: new entries have no usage and no feedback, so
        only ``lowest_coherence`` looks at a value; the others keep the batch's last
        (newest) dreams. ``need(j)`` is how many entries must leave for ``j`` newcomers
        to fit (a policy whose newcomers rank with residents reads it).

        Returns:
            ``[j]`` int64 positions into the batch, ascending (batch order).
        """
        m = coherence.shape[0]
        positions = torch.arange(m, device=coherence.device)
        if m <= room:
            return positions
        return positions[m - room :]


class LowestCoherence(Eviction):
    """The lowest coherence leaves first; newcomers rank with residents."""

    policy = EvictionPolicy.LOWEST_COHERENCE

    def key(self, bank: TensorBank) -> torch.Tensor | None:
        return bank.columns["coherence"].double()

    def admit(self, bank: TensorBank, coherence: torch.Tensor, room: int, need: Callable[[int], int]) -> torch.Tensor:
        """The ``room`` most coherent of the batch (ties to the later dream), less those outranked.

        Room for them is made from the residents and the batch together: the
        ``need`` lowest-coherence entries of both leave (ties: older first, residents
        before the batch, earlier dreams of the batch before later ones); newcomers
        among them are never stored.
        """
        m = coherence.shape[0]
        kept = torch.arange(m, device=coherence.device)
        if m > room:
            kept = torch.sort(coherence, stable=True).indices[m - room :].sort().values
        leaving = need(int(kept.numel()))
        if leaving <= 0:
            return kept
        residents = bank.columns["coherence"][self.order(bank)]
        union = torch.cat([residents.double(), coherence[kept].double()])
        gone = torch.sort(union, stable=True).indices[:leaving]
        outranked = gone[gone >= residents.numel()] - residents.numel()
        keep = torch.ones(kept.numel(), dtype=torch.bool, device=coherence.device)
        keep[outranked] = False
        return kept[keep]


class LeastUsed(Eviction):
    """The entry retrieved least often leaves first."""

    policy = EvictionPolicy.LEAST_USED

    def key(self, bank: TensorBank) -> torch.Tensor | None:
        return bank.columns["usage"].double()


class LowestUtility(Eviction):
    """The lowest running mean of feedback (``util_mean``) leaves first.

    An entry without feedback ranks as an average entry: at the mean ``util_mean`` of
    the live entries that have feedback (0 while none has). Counting it as 0 would
    evict every newcomer before it could be retrieved and rated, keeping rated
    entries forever; ranking it at the mean lets below-average entries go first.
    """

    policy = EvictionPolicy.LOWEST_UTILITY

    def key(self, bank: TensorBank) -> torch.Tensor | None:
        cols = bank.columns
        util = cols["util_mean"].double()
        rated = (cols["feedback_count"] > 0) & bank.alive()
        prior = (util * rated).sum() / rated.sum().clamp(min=1)  # no host sync
        return torch.where(rated, util, prior)


_POLICIES: dict[EvictionPolicy, type[Eviction]] = {
    cls.policy: cls for cls in (Eviction, LowestCoherence, LeastUsed, LowestUtility)
}


def policy_for(policy: EvictionPolicy) -> Eviction:
    """The policy object of a configured :class:`EvictionPolicy`."""
    return _POLICIES[policy]()
