"""The route of an add: checks, the coherence gate, admission and eviction, features, the write.

:class:`Admitter` is a part of a :class:`~dreampool_gpu.pool.DreamPool`: it owns the eviction
policy and what the latest eviction freed, and reads the other parts of the pool's
:class:`~dreampool_gpu.parts.PoolParts`. ``add`` reads the host once: one transfer carries an earlier call's
deferred fault, this call's value checks and the gate's count (docs/api.md, "Checks and host
synchronisation"); everything after it is sized by that count and runs without host reads
for the ``fifo``, ``least_used``, ``lowest_utility``, ``reservoir`` and ``class_balanced``
policies (the last reads the batch's labels and its group counts in that same transfer).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from dreampool_gpu import _validation as v
from dreampool_gpu import checks, user_columns
from dreampool_gpu.columns import renamed_argument
from dreampool_gpu.config import PoolConfig
from dreampool_gpu.dreams import chroma_signature, hue_category, validate_dreams
from dreampool_gpu.encoders import FeatureEncoder, bank_form
from dreampool_gpu.errors import CapacityExceededError, InvalidInputError
from dreampool_gpu.eviction import Eviction
from dreampool_gpu.search import index_nbytes_estimate
from dreampool_gpu.spectral import SPECTRAL_DIM, spectral_of_checked

if TYPE_CHECKING:
    from dreampool_gpu.parts import PoolParts


class Admitter:
    """The admission part of a pool: the gate, the room, the eviction policy, the write.

    Args:
        parts: the pool's parts (config, device, bank, index, budget, encoder slot,
            counters, fault flag, notices, lock), read at each call.
        eviction: the eviction policy (an :class:`~dreampool_gpu.eviction.Eviction`).

    Attributes:
        eviction: the policy. victims: the slots the latest eviction freed.
    """

    def __init__(self, parts: PoolParts, eviction: Eviction) -> None:
        self.parts = parts
        self.eviction = eviction
        self.victims = torch.empty(0, dtype=torch.int64)
        self._lazy_for: PoolConfig | None = None  # the config _lazy was decided for
        self._lazy = False

    def add(
        self,
        dreams: Any,
        *,
        coherence: Any = None,
        energy: Any = None,
        violation: Any = None,
        class_label: Any = None,
        force: bool = False,
        columns: Any = None,
        class_labels: Any = None,
    ) -> torch.Tensor:
        """:meth:`DreamPool.add` (the caller holds the pool's lock)."""
        parts = self.parts
        force = v.check_flag(force, "force")
        label_name = "class_label" if class_labels is None else "class_labels"  # errors name what the caller wrote
        class_label = renamed_argument(class_label, class_labels, "class_labels", "class_label", depth=2)
        if coherence is None and force:
            coherence = 1.0

        def checked() -> tuple[
            torch.Tensor,
            torch.Tensor,
            torch.Tensor | None,
            torch.Tensor | None,
            torch.Tensor,
            dict[str, torch.Tensor],
        ]:
            batch = v.as_tensor(dreams, "dreams", device=parts.device)
            batch = validate_dreams(batch, dream_shape=parts.config.dream_shape)
            n = batch.shape[0]
            if coherence is None:
                raise InvalidInputError(
                    "coherence", "[N] values in [0, 1] (a scalar is broadcast); optional only with force=True", None
                )
            coh = v.per_item(coherence, n, "coherence", 0.0, 1.0, parts.device)
            # None: the column's fill (0) is written, no tensor made
            eng = None if energy is None else v.per_item(energy, n, "energy", 0.0, math.inf, parts.device)
            vio = None if violation is None else v.per_item(violation, n, "violation", 0.0, 1.0, parts.device)
            return (
                batch,
                coh,
                eng,
                vio,
                v.class_labels(class_label, n, label_name, parts.config.num_classes, parts.device),
                user_columns.checked_values(parts.config.columns, columns, n, parts.device),
            )

        with checks.bounded() as bounds:  # value checks: one aminmax per checked tensor, read below
            batch, coh, eng, vio, labels, user = checked()
        parts.encoders.check_fresh()
        n = batch.shape[0]
        # coherence is checked to lie in [0, 1]: a threshold <= 0 passes every dream (the check raises below)
        passed = None if force or parts.config.coherence_threshold <= 0.0 else coh >= parts.config.coherence_threshold
        # the call's one host read: an earlier call's fault, the gate's count, the checked values' extremes,
        # and what the eviction policy decides by (Eviction.reads)
        gate = [] if passed is None else [passed.sum(dtype=torch.float64)]
        head = [parts.fault.code, *gate, *bounds.extremes()]
        extra = None
        if type(self.eviction).reads is not Eviction.reads:
            mask = torch.ones(n, dtype=torch.bool, device=parts.device) if passed is None else passed
            extra = self.eviction.reads(parts.bank, labels, mask)
        if extra is None:
            flat = checks.host_values(head)
            read: list[int] = []
        else:  # one transfer: small ints are exact in float64
            flat = torch.cat([torch.stack([t.double() for t in head]), extra.double()]).tolist()
            read = [int(x) for x in flat[len(head) :]]
        fault, total = flat[0], (n if passed is None else flat[1])
        extremes = flat[1 + len(gate) : len(head)]
        parts.fault.raise_code(int(fault))
        if not bounds.hold(extremes):  # read them again on the host, to name the bad argument and its values
            with checks.immediate():
                checked()
        count = int(total)
        parts.notices.gate(n, count, parts.config.coherence_threshold)  # from the count just read
        accepted = None  # None while every dream passed: batch order as it is
        if passed is not None and count < n:
            accepted = torch.argsort(passed.to(torch.uint8), descending=True, stable=True)[:count]
        parts.bank.check_ids_left(count)
        budget_room = parts.budget.room(parts.bank, parts.index)
        room = parts.bank.capacity if budget_room is None else min(parts.bank.capacity, budget_room)
        if count > room and parts.config.strict_budget:
            raise CapacityExceededError(
                f"{count} dreams passed the gate but the pool holds at most {room} "
                f"(capacity {parts.bank.capacity}, budget {parts.budget.budget_bytes} bytes); strict_budget is set"
            )
        lazy = self.lazy_features()
        if (
            not lazy
            and isinstance(parts.encoders.encoder, FeatureEncoder)
            and count
            and parts.encoders.encoder.needs_refit(parts.counters["added"] + count)
        ):
            # before admission: the rebuilt index may change what the budget holds
            newcomers = batch if accepted is None else batch[accepted]
            parts.encoders.refit_statistics(
                chroma_signature(newcomers), spectral_of_checked(newcomers, parts.config.window)
            )
            budget_room = parts.budget.room(parts.bank, parts.index)
            room = parts.bank.capacity if budget_room is None else min(parts.bank.capacity, budget_room)
        parts.counters["rejected"] += n - count
        if count <= room and type(self.eviction).admit is Eviction.admit:
            picked, m = None, count  # the base policy admits every dream that fits
        else:
            picked = self.eviction.admit(
                parts.bank, coh if accepted is None else coh[accepted], room, self.eviction_need, read
            )
            m = int(picked.numel())
        if m < count:  # else every position, ascending: ``accepted`` as it is
            accepted = picked if accepted is None else accepted[picked]
        parts.counters["dropped"] += count - m
        if m == 0:
            return torch.full((n,), -1, dtype=torch.int64, device=parts.device)

        if accepted is None:  # every dream, in batch order
            kept, kept_labels = batch, labels
        else:
            kept, kept_labels = batch.index_select(0, accepted), labels[accepted]
        per_dream = (("coherence", coh), ("energy", eng), ("violation", vio), *user.items())
        values = {  # an absent column (energy or violation not given) gets its fill value
            name: t if accepted is None else t[accepted] for name, t in per_dream if t is not None
        }
        values.update(dreams=kept, class_label=kept_labels)
        if not lazy:
            values.update(self.features_of(kept, kept_labels))
        full = parts.bank.size == parts.bank.capacity
        evicted = self.make_room(m, settle=False)
        # a full bank frees exactly the victims: those are the lowest free slots, ascending
        slots = self.victims.sort().values if full and evicted == m else parts.bank.free_slots(m)
        ids = parts.bank.write(slots, values, pending=lazy)
        if not lazy:
            parts.index.add(slots)
        if accepted is None:
            out = ids  # a new tensor of this call's
        else:
            out = torch.full((n,), -1, dtype=torch.int64, device=parts.device)
            out[accepted] = ids
        lost = 0
        if self.make_room(0):  # the index grew past its share: the policy may take new entries too
            gone = parts.bank.slots_of(ids) < 0
            lost = int(gone.sum())
            out[gone if accepted is None else accepted[gone]] = -1
            parts.counters["evicted"] -= lost  # reported as dropped: never stored, as the caller sees it
            parts.counters["dropped"] += lost
        parts.counters["added"] += m - lost
        return out

    # ------------------------------------------------------------ features
    def lazy_features(self) -> bool:
        """Whether ``add`` leaves the derived columns to :meth:`settle_features` (``config.features``).

        Lazy only where the engine keeps no vectors of its own at this capacity (no IVF-PQ): there
        the index and the budget would have to follow entries that have no embedding yet.
        """
        parts = self.parts
        if self._lazy_for is not parts.config:  # a device move replaces the config
            self._lazy_for = parts.config
            self._lazy = parts.config.features == "lazy" and not index_nbytes_estimate(
                parts.config, parts.device, parts.bank.capacity
            )
        return self._lazy

    def features_of(self, dreams: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The derived columns (:data:`~dreampool_gpu.bank.DERIVED`) of checked dreams ``[m, R, C, L, 3]``
        with class labels ``[m]``: chroma, spectral features, hue category and bank-form embedding."""
        parts = self.parts
        chroma = chroma_signature(dreams)
        spectral = spectral_of_checked(dreams, parts.config.window)
        embeddings = bank_form(
            parts.encoders.encoder.encode_entries(dreams, chroma=chroma, spectral=spectral, class_labels=labels),
            parts.config.metric,
        )
        return {"chroma": chroma, "spectral": spectral, "embeddings": embeddings, "hue_category": hue_category(chroma)}

    def settle_features(self) -> None:
        """The bank's settle hook: the derived columns of every waiting entry, in one batch, under the lock.

        Computed from the stored dreams (``dream_dtype``) with the current encoder, then the
        engine hears of the entries (``index.add``). With the ``features`` encoder a refit due
        since the last one (the count of added entries doubled) runs now, on the live entries,
        and re-embeds the bank.
        """
        parts = self.parts
        with parts.lock:
            bank = parts.bank
            if not bank.pending:
                return
            slots = bank.pending_slots()
            raw = bank.raw
            dreams = raw["dreams"][slots].float()
            labels = raw["class_label"][slots].long()
            refit = isinstance(parts.encoders.encoder, FeatureEncoder) and parts.encoders.encoder.needs_refit(
                parts.counters["added"]
            )
            if refit:
                chroma = chroma_signature(dreams)
                values = {
                    "chroma": chroma,
                    "spectral": spectral_of_checked(dreams, parts.config.window),
                    "hue_category": hue_category(chroma),
                }
            else:
                values = self.features_of(dreams, labels)
            for name, value in values.items():
                raw[name][slots] = value.to(raw[name].dtype)
            bank.settled()
            if refit:  # fitted on the live entries (the waiting ones included), every embedding anew
                empty = torch.empty(0, device=parts.device)
                parts.encoders.refit_statistics(empty.reshape(0, 3), empty.reshape(0, SPECTRAL_DIM))
            else:
                parts.index.add(slots)

    def make_room(self, incoming: int, *, settle: bool = True) -> int:
        """Evict by the policy until ``incoming`` more entries fit the capacity and the budget.

        The budget's count is ``ceil(bytes_to_free / average entry bytes)``
        (:meth:`MemoryBudget.eviction_count`); with ``settle``, while the pool is still
        over (an index need not shrink with evictions), it evicts again, until it fits
        or is empty. Before a write ``settle`` is off: the estimate frees the slots, and
        any remaining excess is settled after the write, when newcomers rank with
        residents. Returns the number evicted.
        """
        parts = self.parts
        count = self.eviction_need(incoming)
        evicted = 0
        freed = []
        victims = self._victims(count)  # a sampling policy's plan may name more
        policy = type(self.eviction)
        oldest = policy.victims is Eviction.victims and policy.order is Eviction.order and policy.key is Eviction.key
        while victims.numel():
            parts.index.remove(victims)
            parts.bank.remove(victims, oldest=oldest)  # FIFO's victims are the oldest, in age order
            freed.append(victims)
            evicted += int(victims.numel())
            count = parts.budget.eviction_count(parts.bank, parts.index, incoming) if settle else 0
            victims = self._victims(count)
        if freed:
            self.victims = freed[0] if len(freed) == 1 else torch.cat(freed)
        parts.counters["evicted"] += evicted
        return evicted

    def _victims(self, count: int) -> torch.Tensor:
        """The policy's victims for ``count``; the base policy's none for ``count <= 0`` without a kernel."""
        if count <= 0 and type(self.eviction).victims is Eviction.victims:
            return _NO_SLOTS
        return self.eviction.victims(self.parts.bank, count)

    def eviction_need(self, incoming: int) -> int:
        """How many entries must leave before ``incoming`` more fit the capacity and the budget."""
        parts = self.parts
        return max(
            parts.bank.size + incoming - parts.bank.capacity,
            parts.budget.eviction_count(parts.bank, parts.index, incoming),
        )


_NO_SLOTS = torch.empty(0, dtype=torch.int64)  # no victims (only its numel is read)
