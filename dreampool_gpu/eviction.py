"""Eviction policies as objects: which residents leave first, and which newcomers a full pool admits.

One class per :class:`~dreampool_gpu.config.EvictionPolicy` (:func:`policy_for`). ``add``
asks its policy once per call (:meth:`Eviction.admit`) which of the batch to store, and
:meth:`Eviction.victims` (by default the head of :meth:`Eviction.order`) whenever residents
must leave; how many must leave is the capacity's and the budget's business
(:mod:`dreampool_gpu.budget`). The sampling policies (``reservoir``, ``class_balanced``)
decide on the host from their own seeded generator and counts, which ride in the pool's
``state_dict`` and checkpoints (:meth:`Eviction.state_dict`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._python_dispatch import _disable_current_modes

from dreampool_gpu.bank import TensorBank
from dreampool_gpu.config import EvictionPolicy
from dreampool_gpu.devices import host_to_device


class Eviction:
    """Base policy: first in, first out; a batch larger than the room keeps its newest dreams."""

    policy = EvictionPolicy.FIFO

    def __init__(self, *, seed: int = 0, num_classes: int = 10) -> None:
        """``seed`` and ``num_classes`` are read by the sampling policies only."""

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

    def victims(self, bank: TensorBank, count: int) -> torch.Tensor:
        """``[>= count]`` int64 slots that leave now: the first ``count`` of :meth:`order` (none for 0)."""
        if count <= 0:
            return torch.empty(0, dtype=torch.int64, device=bank.device)
        return self.order(bank)[:count]

    def reads(self, bank: TensorBank, labels: torch.Tensor, passed: torch.Tensor) -> torch.Tensor | None:
        """int64 values :meth:`admit` needs on the host, read with ``add``'s one host read; None: nothing.

        ``labels`` ``[n]`` int64 and ``passed`` ``[n]`` bool are the whole batch's, on the pool's device.
        """
        return None

    def state_dict(self) -> dict[str, Any]:
        """The policy's state as plain JSON values (empty: it has none)."""
        return {}

    def load_state_dict(self, state: dict[str, Any] | None, bank: TensorBank) -> None:
        """Take ``state`` (checked by :func:`check_state`; None: start afresh over ``bank``'s entries)."""

    def admit(
        self,
        bank: TensorBank,
        coherence: torch.Tensor,
        room: int,
        need: Callable[[int], int],
        read: Sequence[int] = (),
    ) -> torch.Tensor:
        """Positions of the batch (``coherence`` ``[m]``) that the pool stores when ``room`` fit at most.

        The best ``room`` by the policy's order, as if the whole batch were stored and
        then evicted down to ``room``: new entries have no usage and no feedback, so
        only ``lowest_coherence`` looks at a value; the others keep the batch's last
        (newest) dreams. ``need(j)`` is how many entries must leave for ``j`` newcomers
        to fit (a policy whose newcomers rank with residents reads it); ``read`` holds the
        host values of :meth:`reads`.

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

    def admit(
        self,
        bank: TensorBank,
        coherence: torch.Tensor,
        room: int,
        need: Callable[[int], int],
        read: Sequence[int] = (),
    ) -> torch.Tensor:
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


GENERATOR_BYTES = int(torch.Generator().get_state().numel())


def check_state(state: Any) -> str | None:
    """What is wrong with a saved policy state (a :meth:`Eviction.state_dict`), or None when it loads."""
    if not isinstance(state, dict):
        return f"a mapping, not {type(state).__name__}"
    if not state:
        return None
    seen, generator = state.get("seen"), state.get("generator")
    if isinstance(seen, bool) or not isinstance(seen, int) or seen < 0:
        return f"seen: an int >= 0, got {seen!r:.80}"
    try:
        ok = isinstance(generator, str) and len(bytes.fromhex(generator)) == GENERATOR_BYTES
    except ValueError:
        ok = False
    if not ok:
        return f"generator: a hex string of {GENERATOR_BYTES} bytes"
    per_label = state.get("seen_per_label", [])
    if not isinstance(per_label, list) or not all(
        isinstance(pair, (list, tuple))
        and len(pair) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) for x in pair)
        and pair[0] >= -1
        and pair[1] >= 0
        for pair in per_label
    ):
        return "seen_per_label: a list of [label >= -1, count >= 0] pairs"
    return None


@contextmanager
def _on_host() -> Iterator[None]:
    """Work on host tensors (a CPU generator's draws, values already read): it never waits for a device.

    Hidden from :func:`~dreampool_gpu.sync_guard.forbid_host_sync`, which cannot tell a
    host tensor from a device tensor on a CPU pool.
    """
    with _disable_current_modes(), torch._C.DisableTorchFunction():
        yield


def _group_counts(labels: torch.Tensor, groups: int) -> torch.Tensor:
    """``[groups]`` int64 counts of ``labels + 1`` (a scatter: ``bincount`` reads its maximum on CUDA)."""
    group = labels.long() + 1
    return torch.zeros(groups, dtype=torch.int64, device=labels.device).scatter_add_(0, group, torch.ones_like(group))


class _Sampling(Eviction):
    """A policy that samples the admitted stream: a seeded CPU generator, the count of dreams seen, a plan.

    Decisions are drawn on the host (they depend on counts the host knows, not on device
    data), so they cost no device wait; :meth:`admit` leaves the residents its newcomers
    replace as a plan that the next :meth:`victims` returns. Beyond the plan (the budget
    asks for more), residents leave by :meth:`order`.
    """

    def __init__(self, *, seed: int = 0, num_classes: int = 10) -> None:
        self.seed = seed
        self.num_classes = num_classes
        self.generator = torch.Generator().manual_seed(seed)
        self.seen = 0
        self._plan: torch.Tensor | None = None

    def order(self, bank: TensorBank) -> torch.Tensor:
        """``[size]`` live slots in a random order drawn from the generator."""
        live = bank.slots_by_age()
        with _on_host():
            perm = torch.randperm(live.numel(), generator=self.generator)
        return live[host_to_device(perm, bank.device)]

    def victims(self, bank: TensorBank, count: int) -> torch.Tensor:
        plan, self._plan = self._plan, None
        if plan is None:
            return super().victims(bank, count)
        extra = count - int(plan.numel())
        if extra <= 0:
            return plan
        order = self.order(bank)
        planned = torch.zeros(bank.capacity, dtype=torch.bool, device=bank.device)
        planned.index_fill_(0, plan, True)  # a scalar fill: no host-to-device copy
        rest = order[torch.sort(planned[order].to(torch.uint8), stable=True).indices[:extra]]
        return torch.cat([plan, rest])

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "generator": self.generator.get_state().numpy().tobytes().hex()}

    def load_state_dict(self, state: dict[str, Any] | None, bank: TensorBank) -> None:
        """Take ``state``; without one, the generator is seeded anew and the residents count as the dreams seen."""
        self._plan = None
        if state:
            raw = torch.frombuffer(bytearray(bytes.fromhex(state["generator"])), dtype=torch.uint8)
            self.generator.set_state(raw)
            self.seen = int(state["seen"])
        else:
            self.generator.manual_seed(self.seed)
            self.seen = bank.size


class Reservoir(_Sampling):
    """Reservoir sampling over the admitted stream (Algorithm R): each of ``n`` dreams seen stays with chance ``M/n``.

    ``M`` is the room (capacity, or fewer under a budget). The first ``M`` dreams that
    pass the gate enter; the ``n``-th after them replaces a uniformly random resident
    with probability ``M/n`` and is dropped otherwise. A batch
    is decided as that sequence, one dream after another, from one draw of the generator
    per dream past the room (a later dream may replace an earlier one of its batch).
    """

    policy = EvictionPolicy.RESERVOIR

    def admit(
        self,
        bank: TensorBank,
        coherence: torch.Tensor,
        room: int,
        need: Callable[[int], int],
        read: Sequence[int] = (),
    ) -> torch.Tensor:
        """Positions of the batch stored; the residents they replace become the plan.

        The reservoir has ``room`` positions: the residents, oldest first, then free ones,
        which the first ``room`` dreams of the stream fill in batch order. Dream ``n >
        room`` draws ``j`` uniform in ``[0, n)``; ``j < room`` writes position ``j``
        (replacing its resident, or filling it if free). Each position keeps its last
        writer: a newcomer overwritten later in its batch is never stored. Entries the
        budget evicted beyond the plan leave free positions that only draws refill, so
        they bring no bias towards the newest dreams.
        """
        m = coherence.shape[0]
        size = bank.size
        free = min(m, max(0, room - size), max(0, room - self.seen))  # the first M dreams of the stream
        position = list(range(size, size + free))
        if free < m:  # one draw per dream past the room, in stream order (a batch is a few dreams: plain ints)
            with _on_host():
                u = torch.rand(m - free, generator=self.generator, dtype=torch.float64).tolist()
            for count, draw in enumerate(u, start=self.seen + free + 1):
                j = min(int(draw * count), count - 1)
                position.append(j if j < room else -1)
        last = {p: i for i, p in enumerate(position) if p >= 0}  # each position keeps its last writer
        self.seen += m
        replaced = sorted(p for p in last if p < size)
        if replaced:
            self._plan = bank.slots_by_age()[host_to_device(torch.tensor(replaced, dtype=torch.int64), bank.device)]
        kept = torch.tensor(sorted(last.values()), dtype=torch.int64)
        return host_to_device(kept, coherence.device)


class ClassBalanced(_Sampling):
    """Class-balanced reservoir: a full pool evicts from the group (class) with the most entries.

    Unlabelled entries (-1) are a group of their own. A newcomer enters a pool with room
    to spare. In a full pool, a newcomer whose group is smaller than the largest replaces
    a uniformly random member of the largest group (ties: the lowest label, unlabelled
    before class 0); a newcomer of a largest group replaces a uniformly random member of
    its own group with probability ``m_c / n_c`` (its group's entries over the dreams of
    its group seen), and is dropped otherwise: within the group, a reservoir sample.
    The batch's labels and the residents' group counts come with ``add``'s one host read.
    """

    policy = EvictionPolicy.CLASS_BALANCED

    def __init__(self, *, seed: int = 0, num_classes: int = 10) -> None:
        super().__init__(seed=seed, num_classes=num_classes)
        self.seen_per_group = [0] * (num_classes + 1)

    def state_dict(self) -> dict[str, Any]:
        seen = [[g - 1, n] for g, n in enumerate(self.seen_per_group) if n]
        return {**super().state_dict(), "seen_per_label": seen}

    def load_state_dict(self, state: dict[str, Any] | None, bank: TensorBank) -> None:
        """As :meth:`_Sampling.load_state_dict`, and the dreams seen per label (without them: the residents').

        Counts of labels beyond ``num_classes`` are dropped (no such dream can arrive).
        """
        super().load_state_dict(state, bank)
        self.seen_per_group = [0] * (self.num_classes + 1)
        if state and "seen_per_label" in state:
            for label, n in state["seen_per_label"]:
                if label < self.num_classes:
                    self.seen_per_group[label + 1] = n
        else:
            self.seen_per_group = [int(n) for n in self._group_counts(bank).tolist()]  # a load reads the host

    def reads(self, bank: TensorBank, labels: torch.Tensor, passed: torch.Tensor) -> torch.Tensor | None:
        """The batch's labels (-2 where the gate rejected) and the residents' ``[num_classes + 1]`` group counts."""
        return torch.cat([torch.where(passed, labels.long(), -2), self._group_counts(bank)])

    def _group_counts(self, bank: TensorBank) -> torch.Tensor:
        """``[num_classes + 1]`` int64 entries per group (unlabelled first), on the pool's device."""
        labels = torch.where(bank.alive(), bank.columns["class_label"].long(), -1)
        counts = _group_counts(labels, self.num_classes + 1)
        counts[0] -= bank.capacity - bank.size  # free slots were counted as unlabelled
        return counts

    def order(self, bank: TensorBank) -> torch.Tensor:
        """``[size]`` live slots, largest group first, one at a time: each leaves while its group is the largest.

        Within a group a random order from the generator; ties between groups go to the lowest label.
        """
        live = super().order(bank)
        group = bank.columns["class_label"][live].long() + 1
        by_group = torch.sort(group, stable=True).indices
        live, group = live[by_group], group[by_group]
        counts = _group_counts(group - 1, self.num_classes + 1)
        rank = torch.arange(live.numel(), device=live.device) - (torch.cumsum(counts, 0) - counts)[group]
        left = counts[group] - rank  # the group's entries when this one leaves
        return live[torch.sort(group - left * (self.num_classes + 2), stable=True).indices]

    def admit(
        self,
        bank: TensorBank,
        coherence: torch.Tensor,
        room: int,
        need: Callable[[int], int],
        read: Sequence[int] = (),
    ) -> torch.Tensor:
        """Positions of the batch stored, decided one dream after another; the replaced residents become the plan."""
        groups = len(self.seen_per_group)
        labels = [label for label in read[: len(read) - groups] if label != -2]
        counts = list(read[len(read) - groups :])
        m = coherence.shape[0]
        with _on_host():
            u = torch.rand(m, generator=self.generator, dtype=torch.float64).tolist()
        residents = list(counts)
        members: dict[tuple[int, int], tuple[bool, int]] = {}  # (group, index) -> (newcomer?, rank or position)

        def member(g: int, k: int) -> tuple[bool, int]:
            return members.get((g, k), (False, k))

        def take(g: int, k: int) -> tuple[bool, int]:
            """Remove member ``k`` of group ``g`` (the last takes its place)."""
            gone, last = member(g, k), member(g, counts[g] - 1)
            members[(g, k)] = last
            members.pop((g, counts[g] - 1), None)
            counts[g] -= 1
            return gone

        replaced: list[int] = []  # within-group order of residents (groups by label, oldest first)
        start = [0, *itertools.accumulate(residents)]
        dropped: set[int] = set()
        total = sum(counts)
        for i, label in enumerate(labels):
            g = label + 1
            self.seen += 1
            self.seen_per_group[g] += 1
            if total < room:
                total += 1
            else:
                largest = max(counts)
                if counts[g] < largest:
                    v = counts.index(largest)
                    gone, at = take(v, min(int(u[i] * counts[v]), counts[v] - 1)), v
                else:
                    j = int(u[i] * self.seen_per_group[g])
                    if j >= counts[g]:
                        dropped.add(i)
                        continue
                    gone, at = take(g, j), g
                if gone[0]:
                    dropped.add(gone[1])
                else:
                    replaced.append(start[at] + gone[1])
            members[(g, counts[g])] = (True, i)
            counts[g] += 1
        if replaced:
            live = bank.slots_by_age()
            grouped = live[torch.sort(bank.columns["class_label"][live], stable=True).indices]
            self._plan = grouped[host_to_device(torch.tensor(replaced, dtype=torch.int64), bank.device)]
        kept = torch.tensor([i for i in range(m) if i not in dropped], dtype=torch.int64)
        return host_to_device(kept, coherence.device)


_POLICIES: dict[EvictionPolicy, type[Eviction]] = {
    cls.policy: cls for cls in (Eviction, LowestCoherence, LeastUsed, LowestUtility, Reservoir, ClassBalanced)
}


def policy_type(policy: EvictionPolicy) -> type[Eviction]:
    """The class that implements a configured :class:`EvictionPolicy`."""
    return _POLICIES[policy]


def policy_for(policy: EvictionPolicy, *, seed: int = 0, num_classes: int = 10) -> Eviction:
    """The policy object of a configured :class:`EvictionPolicy` (``seed``: of its generator, if it draws)."""
    return policy_type(policy)(seed=seed, num_classes=num_classes)
