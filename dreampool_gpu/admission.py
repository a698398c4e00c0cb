"""The route of an add: checks, the coherence gate, admission and eviction, features, the write.

:class:`Admission` is a mixin of :class:`~dreampool_gpu.pool.DreamPool` (the pool sets the
attributes it declares). ``add`` reads the host once: one transfer carries an earlier call's
deferred fault, this call's value checks and the gate's count (docs/api.md, "Checks and host
synchronisation"); everything after it is sized by that count and runs without host reads
for the ``fifo``, ``least_used``, ``lowest_utility``, ``reservoir`` and ``class_balanced``
policies (the last reads the batch's labels and its group counts in that same transfer).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from dreampool_gpu import _validation as v
from dreampool_gpu import checks
from dreampool_gpu.bank import TensorBank
from dreampool_gpu.budget import MemoryBudget
from dreampool_gpu.config import PoolConfig
from dreampool_gpu.dreams import chroma_signature, hue_category, validate_dreams
from dreampool_gpu.encoders import Encoder, FeatureEncoder, bank_form
from dreampool_gpu.errors import CapacityExceededError, InvalidInputError
from dreampool_gpu.eviction import Eviction
from dreampool_gpu.retrieval import request
from dreampool_gpu.search import SearchIndex
from dreampool_gpu.spectral import spectral_of_checked
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

    if TYPE_CHECKING:  # defined by DreamPool and EncoderLifecycle

        @property
        def sync_free(self) -> bool: ...

        def _check_fresh(self) -> None: ...

        def _refit_statistics(self, chroma: torch.Tensor, spectral: torch.Tensor) -> None: ...

    def add(
        self,
        dreams: Any,
        *,
        coherence: Any,
        energy: Any = None,
        violation: Any = None,
        class_labels: Any = None,
        force: bool = False,
    ) -> torch.Tensor:
        """Add a batch of dreams; those below the coherence threshold are rejected.

        Features (chroma, spectral, hue category, embedding) are computed for
        the whole batch at once. Before writing, the eviction policy makes room
        within the capacity and the memory budget (:mod:`dreampool_gpu.budget`);
        when the pool returns, its usage is within the budget. When more dreams
        pass the gate than the whole pool holds, the best that fit by the
        policy admits are kept (:meth:`~dreampool_gpu.eviction.Eviction.admit`) and
        the rest count as dropped, or, with ``strict_budget``, the call raises.

        Args:
            dreams: ``[N, R, C, L, 3]`` float, values in [0, 1], any device.

        Keyword Args:
            coherence: ``[N]`` in [0, 1]. energy: ``[N]`` >= 0 (default 0).
            violation: ``[N]`` in [0, 1] (default 0).
            class_labels: ``[N]`` int in 0..9, -1 = none; or None.
            force: bypass the coherence gate.

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

            def checked() -> tuple[torch.Tensor, ...]:
                batch = v.as_tensor(dreams, "dreams", device=self.device)
                batch = validate_dreams(batch, dream_shape=self.config.dream_shape)
                n = batch.shape[0]
                if coherence is None:
                    raise InvalidInputError("coherence", "[N] values in [0, 1] (a scalar is broadcast)", None)
                coh = request.per_query(coherence, n, "coherence", 0.0, 1.0, self.device)
                eng = request.per_query(energy, n, "energy", 0.0, float("inf"), self.device)
                vio = request.per_query(violation, n, "violation", 0.0, 1.0, self.device)
                return (
                    batch,
                    coh,
                    eng,
                    vio,
                    request.labels(class_labels, n, "class_labels", self.config.num_classes, self.device),
                )

            with checks.deferred(self.sync_free) as deferred:
                batch, coh, eng, vio, labels = checked()
            self._check_fresh()
            n = batch.shape[0]
            passed = coh >= self.config.coherence_threshold
            if force:
                passed = torch.ones_like(passed)
            # the call's one host read: an earlier call's fault, this call's checks, the gate's count
            own = (deferred or checks.DeferredChecks()).first_failure(self.device)
            head = torch.stack([self._fault.code, own, passed.sum()])
            extra = self.eviction.reads(self.bank, labels, passed)  # what the policy decides by, same transfer
            fault, failed, count, *read = (head if extra is None else torch.cat([head, extra])).tolist()
            self._fault.raise_code(fault)
            if failed:  # read them again on the host, to name the bad argument and its values
                with checks.immediate():
                    checked()
            accepted = torch.argsort(passed.to(torch.uint8), descending=True, stable=True)[:count]
            self.bank.check_ids_left(count)
            budget_room = self.budget.room(self.bank, self.index)
            room = self.bank.capacity if budget_room is None else min(self.bank.capacity, budget_room)
            if count > room and self.config.strict_budget:
                raise CapacityExceededError(
                    f"{count} dreams passed the gate but the pool holds at most {room} "
                    f"(capacity {self.bank.capacity}, budget {self.budget.budget_bytes} bytes); strict_budget is set"
                )
            if (
                isinstance(self.encoder, FeatureEncoder)
                and count
                and self.encoder.needs_refit(self.counters["added"] + count)
            ):
                # before admission: the rebuilt index may change what the budget holds
                newcomers = batch[accepted]
                self._refit_statistics(chroma_signature(newcomers), spectral_of_checked(newcomers, self.config.window))
                budget_room = self.budget.room(self.bank, self.index)
                room = self.bank.capacity if budget_room is None else min(self.bank.capacity, budget_room)
            self.counters["rejected"] += n - count
            accepted = accepted[self.eviction.admit(self.bank, coh[accepted], room, self._eviction_need, read)]
            self.counters["dropped"] += count - int(accepted.numel())
            out = torch.full((n,), -1, dtype=torch.int64, device=self.device)
            m = int(accepted.numel())
            if m == 0:
                return out

            kept = batch[accepted]
            chroma = chroma_signature(kept)
            spectral = spectral_of_checked(kept, self.config.window)
            kept_labels = labels[accepted]
            embeddings = bank_form(
                self.encoder.encode_entries(kept, chroma=chroma, spectral=spectral, class_labels=kept_labels),
                self.config.metric,
            )
            values = {
                "dreams": kept,
                "chroma": chroma,
                "spectral": spectral,
                "embeddings": embeddings,
                "coherence": coh[accepted],
                "energy": eng[accepted],
                "violation": vio[accepted],
                "class_label": kept_labels,
                "hue_category": hue_category(chroma),
            }
            self._make_room(m, settle=False)
            slots = self.bank.free_slots(m)
            ids = self.bank.write(slots, values)
            self.index.add(slots)
            out[accepted] = ids
            lost = 0
            if self._make_room(0):  # the index grew past its share: the policy may take new entries too
                gone = self.bank.slots_of(ids) < 0
                lost = int(gone.sum())
                out[accepted[gone]] = -1
                self.counters["evicted"] -= lost  # reported as dropped: never stored, as the caller sees it
                self.counters["dropped"] += lost
            self.counters["added"] += m - lost
            return out

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
        victims = self.eviction.victims(self.bank, count)  # a sampling policy's plan may name more
        while victims.numel():
            self.index.remove(victims)
            self.bank.remove(victims)
            evicted += int(victims.numel())
            count = self.budget.eviction_count(self.bank, self.index, incoming) if settle else 0
            victims = self.eviction.victims(self.bank, count)
        self.counters["evicted"] += evicted
        return evicted

    def _eviction_need(self, incoming: int) -> int:
        """How many entries must leave before ``incoming`` more fit the capacity and the budget."""
        return max(
            self.bank.size + incoming - self.bank.capacity,
            self.budget.eviction_count(self.bank, self.index, incoming),
        )
