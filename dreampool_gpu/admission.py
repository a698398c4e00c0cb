"""The route of an add: checks, the coherence gate, admission and eviction, features, the write.

:class:`Admission` is a mixin of :class:`~dreampool_gpu.pool.DreamPool` (the pool sets the
attributes it declares). ``add`` reads the host once: one transfer carries an earlier call's
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
from dreampool_gpu.bank import TensorBank
from dreampool_gpu.budget import MemoryBudget
from dreampool_gpu.columns import renamed_argument
from dreampool_gpu.config import PoolConfig
from dreampool_gpu.dreams import chroma_signature, hue_category, validate_dreams
from dreampool_gpu.encoders import Encoder, FeatureEncoder, bank_form
from dreampool_gpu.errors import CapacityExceededError, InvalidInputError
from dreampool_gpu.eviction import Eviction
from dreampool_gpu.notices import Notices
from dreampool_gpu.retrieval import request
from dreampool_gpu.search import SearchIndex, index_nbytes_estimate
from dreampool_gpu.spectral import SPECTRAL_DIM, spectral_of_checked
from dreampool_gpu.streams import StreamOrderedLock


class Admission:
    """``add`` and eviction of :class:`~dreampool_gpu.pool.DreamPool` (a mixin)."""

    config: PoolConfig
    device: torch.device
    bank: TensorBank
    index: SearchIndex
    encoder: Encoder
    eviction: Eviction
    budget: MemoryBudget
    counters: dict[str, int]
    _fault: checks.FaultFlag
    _lock: StreamOrderedLock
    _lazy_for: PoolConfig | None
    _lazy: bool
    _victims: torch.Tensor  # the slots the latest eviction freed
    _notices: Notices

    if TYPE_CHECKING:  # defined by DreamPool and EncoderLifecycle

        @property
        def sync_free(self) -> bool: ...

        def _check_fresh(self) -> None: ...

        def _refit_statistics(self, chroma: torch.Tensor, spectral: torch.Tensor) -> None: ...

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
        """Add a batch of dreams; those below the coherence threshold are rejected.

        Features (chroma, spectral, hue category, embedding) are computed for
        the whole batch at once: here with ``features="eager"``, else (``lazy``, the
        default) by the first call that reads them, for every waiting entry together.
        Before writing, the eviction policy makes room
        within the capacity and the memory budget (:mod:`dreampool_gpu.budget`);
        when the pool returns, its usage is within the budget. When more dreams
        pass the gate than the whole pool holds, the best that fit by the
        policy admits are kept (:meth:`~dreampool_gpu.eviction.Eviction.admit`) and
        the rest count as dropped, or, with ``strict_budget``, the call raises.

        Args:
            dreams: ``[N, R, C, L, 3]`` float, values in [0, 1], any device.

        Keyword Args:
            coherence: ``[N]`` in [0, 1]; required unless ``force`` (then default 1.0).
            energy: ``[N]`` >= 0 (default 0). violation: ``[N]`` in [0, 1] (default 0).
            class_label: ``[N]`` int in ``0..num_classes-1``, -1 = none; or None.
            force: bypass the coherence gate.
            columns: the user columns of the batch (``PoolConfig.columns``), ``{name: [N, *shape]}``
                (a 0-d value is broadcast); a declared column not given gets 0 (False).
            class_labels: the old name of ``class_label`` (a DeprecationWarning).

        Returns:
            ``[N]`` int64 ids on the pool's device, of the dreams stored; -1 where
            rejected or dropped.

        Raises:
            InvalidInputError, DimensionMismatchError: bad input (pool unchanged).
            CapacityExceededError: with ``strict_budget``, more dreams passed the gate
                than the whole pool holds (pool unchanged).
        """
        with self._lock:
            force = v.check_flag(force, "force")
            label_name = "class_label" if class_labels is None else "class_labels"  # errors name what the caller wrote
            class_label = renamed_argument(class_label, class_labels, "class_labels", "class_label")
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
                batch = v.as_tensor(dreams, "dreams", device=self.device)
                batch = validate_dreams(batch, dream_shape=self.config.dream_shape)
                n = batch.shape[0]
                if coherence is None:
                    raise InvalidInputError(
                        "coherence", "[N] values in [0, 1] (a scalar is broadcast); optional only with force=True", None
                    )
                coh = request.per_query(coherence, n, "coherence", 0.0, 1.0, self.device)
                # None: the column's fill (0) is written, no tensor made
                eng = None if energy is None else request.per_query(energy, n, "energy", 0.0, math.inf, self.device)
                vio = None if violation is None else request.per_query(violation, n, "violation", 0.0, 1.0, self.device)
                return (
                    batch,
                    coh,
                    eng,
                    vio,
                    request.labels(class_label, n, label_name, self.config.num_classes, self.device),
                    user_columns.checked_values(self.config.columns, columns, n, self.device),
                )

            with checks.bounded() as bounds:  # value checks: one aminmax per checked tensor, read below
                batch, coh, eng, vio, labels, user = checked()
            self._check_fresh()
            n = batch.shape[0]
            passed = None if force else coh >= self.config.coherence_threshold
            gate = torch.full((), n, dtype=torch.float64) if passed is None else passed.sum(dtype=torch.float64)
            # the call's one host read: an earlier call's fault, the gate's count, the checked values' extremes,
            # and what the eviction policy decides by (Eviction.reads)
            head = [self._fault.code, gate.to(self.device), *bounds.extremes()]
            extra = None
            if type(self.eviction).reads is not Eviction.reads:
                mask = torch.ones(n, dtype=torch.bool, device=self.device) if passed is None else passed
                extra = self.eviction.reads(self.bank, labels, mask)
            if extra is None:
                fault, total, *extremes = checks.host_values(head)
                read: list[int] = []
            else:  # one transfer: small ints are exact in float64
                flat = torch.cat([torch.stack([t.double() for t in head]), extra.double()]).tolist()
                fault, total, extremes = flat[0], flat[1], flat[2 : len(head)]
                read = [int(x) for x in flat[len(head) :]]
            self._fault.raise_code(int(fault))
            if not bounds.hold(extremes):  # read them again on the host, to name the bad argument and its values
                with checks.immediate():
                    checked()
            count = int(total)
            self._notices.gate(n, count, self.config.coherence_threshold)  # from the count just read
            accepted = None  # None while every dream passed: batch order as it is
            if passed is not None and count < n:
                accepted = torch.argsort(passed.to(torch.uint8), descending=True, stable=True)[:count]
            self.bank.check_ids_left(count)
            budget_room = self.budget.room(self.bank, self.index)
            room = self.bank.capacity if budget_room is None else min(self.bank.capacity, budget_room)
            if count > room and self.config.strict_budget:
                raise CapacityExceededError(
                    f"{count} dreams passed the gate but the pool holds at most {room} "
                    f"(capacity {self.bank.capacity}, budget {self.budget.budget_bytes} bytes); strict_budget is set"
                )
            lazy = self._lazy_features()
            if (
                not lazy
                and isinstance(self.encoder, FeatureEncoder)
                and count
                and self.encoder.needs_refit(self.counters["added"] + count)
            ):
                # before admission: the rebuilt index may change what the budget holds
                newcomers = batch if accepted is None else batch[accepted]
                self._refit_statistics(chroma_signature(newcomers), spectral_of_checked(newcomers, self.config.window))
                budget_room = self.budget.room(self.bank, self.index)
                room = self.bank.capacity if budget_room is None else min(self.bank.capacity, budget_room)
            self.counters["rejected"] += n - count
            picked = self.eviction.admit(
                self.bank, coh if accepted is None else coh[accepted], room, self._eviction_need, read
            )
            m = int(picked.numel())
            if m < count:  # else every position, ascending: ``accepted`` as it is
                accepted = picked if accepted is None else accepted[picked]
            self.counters["dropped"] += count - m
            if m == 0:
                return torch.full((n,), -1, dtype=torch.int64, device=self.device)

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
                values.update(self._features_of(kept, kept_labels))
            full = self.bank.size == self.bank.capacity
            evicted = self._make_room(m, settle=False)
            # a full bank frees exactly the victims: those are the lowest free slots, ascending
            slots = self._victims.sort().values if full and evicted == m else self.bank.free_slots(m)
            ids = self.bank.write(slots, values, pending=lazy)
            if not lazy:
                self.index.add(slots)
            if accepted is None:
                out = ids  # a new tensor of this call's
            else:
                out = torch.full((n,), -1, dtype=torch.int64, device=self.device)
                out[accepted] = ids
            lost = 0
            if self._make_room(0):  # the index grew past its share: the policy may take new entries too
                gone = self.bank.slots_of(ids) < 0
                lost = int(gone.sum())
                out[gone if accepted is None else accepted[gone]] = -1
                self.counters["evicted"] -= lost  # reported as dropped: never stored, as the caller sees it
                self.counters["dropped"] += lost
            self.counters["added"] += m - lost
            return out

    # ------------------------------------------------------------ features
    def _lazy_features(self) -> bool:
        """Whether ``add`` leaves the derived columns to :meth:`_settle_features` (``config.features``).

        Lazy only where the engine keeps no vectors of its own at this capacity (no IVF-PQ): there
        the index and the budget would have to follow entries that have no embedding yet.
        """
        if self._lazy_for is not self.config:  # a device move replaces the config
            self._lazy_for = self.config
            self._lazy = self.config.features == "lazy" and not index_nbytes_estimate(
                self.config, self.device, self.bank.capacity
            )
        return self._lazy

    def _features_of(self, dreams: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The derived columns (:data:`~dreampool_gpu.bank.DERIVED`) of checked dreams ``[m, R, C, L, 3]``
        with class labels ``[m]``: chroma, spectral features, hue category and bank-form embedding."""
        chroma = chroma_signature(dreams)
        spectral = spectral_of_checked(dreams, self.config.window)
        embeddings = bank_form(
            self.encoder.encode_entries(dreams, chroma=chroma, spectral=spectral, class_labels=labels),
            self.config.metric,
        )
        return {"chroma": chroma, "spectral": spectral, "embeddings": embeddings, "hue_category": hue_category(chroma)}

    def _settle_features(self) -> None:
        """The bank's settle hook: the derived columns of every waiting entry, in one batch, under the lock.

        Computed from the stored dreams (``dream_dtype``) with the current encoder, then the
        engine hears of the entries (``index.add``). With the ``features`` encoder a refit due
        since the last one (the count of added entries doubled) runs now, on the live entries,
        and re-embeds the bank.
        """
        with self._lock:
            bank = self.bank
            if not bank.pending:
                return
            slots = bank.pending_slots()
            raw = bank.raw
            dreams = raw["dreams"][slots].float()
            labels = raw["class_label"][slots].long()
            refit = isinstance(self.encoder, FeatureEncoder) and self.encoder.needs_refit(self.counters["added"])
            if refit:
                chroma = chroma_signature(dreams)
                values = {
                    "chroma": chroma,
                    "spectral": spectral_of_checked(dreams, self.config.window),
                    "hue_category": hue_category(chroma),
                }
            else:
                values = self._features_of(dreams, labels)
            for name, value in values.items():
                raw[name][slots] = value.to(raw[name].dtype)
            bank.settled()
            if refit:  # fitted on the live entries (the waiting ones included), every embedding anew
                empty = torch.empty(0, device=self.device)
                self._refit_statistics(empty.reshape(0, 3), empty.reshape(0, SPECTRAL_DIM))
            else:
                self.index.add(slots)

    def _make_room(self, incoming: int, *, settle: bool = True) -> int:
        """Evict by the policy until ``incoming`` more entries fit the capacity and the budget.

        The budget's count is ``ceil(bytes_to_free / average entry bytes)``
        (:meth:`MemoryBudget.eviction_count`); with ``settle``, while the pool is still
        over (an index need not shrink with evictions), it evicts again, until it fits
        or is empty. Before a write ``settle`` is off: the estimate frees the slots, and
        any remaining excess is settled after the write, when newcomers rank with
        residents. Returns the number evicted.
        """
        count = self._eviction_need(incoming)
        evicted = 0
        freed = []
        victims = self.eviction.victims(self.bank, count)  # a sampling policy's plan may name more
        while victims.numel():
            self.index.remove(victims)
            self.bank.remove(victims)
            freed.append(victims)
            evicted += int(victims.numel())
            count = self.budget.eviction_count(self.bank, self.index, incoming) if settle else 0
            victims = self.eviction.victims(self.bank, count)
        if freed:
            self._victims = freed[0] if len(freed) == 1 else torch.cat(freed)
        self.counters["evicted"] += evicted
        return evicted

    def _eviction_need(self, incoming: int) -> int:
        """How many entries must leave before ``incoming`` more fit the capacity and the budget."""
        return max(
            self.bank.size + incoming - self.bank.capacity,
            self.budget.eviction_count(self.bank, self.index, incoming),
        )
