"""TensorBank internals: preallocated columns, ids, slot reuse, age order, per-column bytes.

Pool-level FIFO eviction lives in test_pool.py and test_budget.py, and the total bytes per
entry in test_budget.py::TestSizes; this file checks the bank's own bookkeeping.
"""

from __future__ import annotations

import math

import pytest
import torch

from dreampool_gpu.bank import TensorBank, column_specs

SHAPE = (3, 2, 2)
DIM = 8


def make_bank(device: torch.device, capacity: int = 6, dtype=torch.float32) -> TensorBank:
    return TensorBank(capacity, SHAPE, DIM, device=device, dream_dtype=dtype)


def add(bank: TensorBank, n: int) -> torch.Tensor:
    """Write ``n`` entries (chroma 0.5) into the lowest free slots; return their ids."""
    slots = bank.free_slots(n)
    assert slots.numel() == n
    return bank.write(slots, {"chroma": torch.full((n, 3), 0.5, device=bank.device)})


def evict_oldest(bank: TensorBank, n: int) -> list[int]:
    """FIFO: remove the ``n`` oldest entries; return their ids."""
    slots = bank.slots_by_age()[:n]
    ids = bank.gather("ids", slots).tolist()
    bank.remove(slots)
    return ids


def live_ids(bank: TensorBank) -> list[int]:
    return bank.gather("ids", bank.slots_by_age()).tolist()


class TestColumns:
    def test_preallocated_with_capacity_and_fill(self, device):
        bank = make_bank(device, capacity=5, dtype=torch.float16)
        specs = column_specs(SHAPE, DIM, torch.float16)
        assert list(bank.columns) == list(specs)
        for name, spec in specs.items():
            column = bank.columns[name]
            assert column.shape == (5, *spec.shape), name
            assert column.dtype == spec.dtype and column.device.type == device.type, name
        assert bank.columns["dreams"].shape == (5, *SHAPE, 3)
        assert bank.columns["embeddings"].shape == (5, DIM)
        assert bank.columns["ids"].tolist() == [-1] * 5
        assert bank.columns["utility"].isnan().all()  # no utility yet
        assert (bank.size, bank.next_id, bank.extent) == (0, 0, 0)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
    def test_exact_bytes_per_column(self, device, dtype):
        capacity = 7
        bank = make_bank(device, capacity=capacity, dtype=dtype)
        nbytes = bank.nbytes()
        for name, spec in column_specs(SHAPE, DIM, dtype).items():
            column = bank.columns[name]
            by_hand = capacity * math.prod(spec.shape) * spec.dtype.itemsize
            assert nbytes[name] == by_hand == column.numel() * column.element_size(), name
        assert nbytes["dreams"] == capacity * math.prod(SHAPE) * 3 * dtype.itemsize
        assert nbytes["ids"] == capacity * 8 and nbytes["class_label"] == capacity * 4

    def test_bytes_do_not_change_with_occupancy(self, device):
        bank = make_bank(device)
        empty = bank.nbytes()
        add(bank, 4)
        assert bank.nbytes() == empty


class TestIds:
    def test_ids_are_int64_and_increasing(self, device):
        bank = make_bank(device)
        first, second = add(bank, 3), add(bank, 2)
        assert first.dtype == torch.int64
        assert first.tolist() == [0, 1, 2] and second.tolist() == [3, 4]
        assert bank.next_id == 5 and bank.size == 5

    def test_ids_never_reused_after_remove_or_clear(self, device):
        bank = make_bank(device, capacity=3)
        add(bank, 3)
        evict_oldest(bank, 2)
        assert add(bank, 2).tolist() == [3, 4]
        bank.clear()
        assert bank.size == 0 and not bank.alive().any()
        assert add(bank, 1).tolist() == [5]

    def test_slots_of_maps_missing_ids_to_minus_one(self, device):
        bank = make_bank(device)
        add(bank, 4)
        evict_oldest(bank, 1)
        # live, evicted / padding, never issued
        query = torch.tensor([[3, 0], [-1, 99]], device=device)
        slots = bank.slots_of(query)
        assert slots.shape == (2, 2)
        assert slots.tolist() == [[3, -1], [-1, -1]]
        assert bank.gather("ids", slots).tolist() == [[3, -1], [-1, -1]]


class TestSlots:
    def test_freed_slots_are_reused_lowest_first(self, device):
        bank = make_bank(device, capacity=4)
        add(bank, 4)
        bank.remove(bank.slots_of(torch.tensor([2, 0], device=device)))
        assert bank.free_slots(4).tolist() == [0, 2]
        ids = add(bank, 2)
        assert bank.slots_of(ids).tolist() == [0, 2]
        assert bank.extent == 4

    def test_alive_mask(self, device):
        bank = make_bank(device, capacity=5)
        assert bank.alive().tolist() == [False] * 5
        add(bank, 3)
        bank.remove(bank.slots_of(torch.tensor([1], device=device)))
        alive = bank.alive()
        assert alive.dtype == torch.bool and alive.tolist() == [True, False, True, False, False]
        assert int(alive.sum()) == bank.size == 2

    def test_gather_fills_free_slots(self, device):
        bank = make_bank(device)
        add(bank, 1)
        rows = bank.gather("chroma", torch.tensor([0, -1], device=device))
        assert rows.tolist() == [[0.5] * 3, [0.0] * 3]
        assert bank.gather("class_label", torch.tensor([-1], device=device)).tolist() == [-1]


class TestAgeOrder:
    def test_fifo_cycle_matches_a_queue(self, device):
        """Evicting the oldest at capacity over several rounds behaves like a plain FIFO queue."""
        capacity = 5
        bank = make_bank(device, capacity=capacity)
        queue = add(bank, capacity).tolist()
        for step, n in enumerate([2, 1, 3, 5, 1]):
            assert evict_oldest(bank, n) == queue[:n], step
            queue = queue[n:] + add(bank, n).tolist()
            assert live_ids(bank) == queue, step
            assert bank.size == capacity

    def test_order_is_by_age_not_by_slot(self, device):
        bank = make_bank(device, capacity=3)
        add(bank, 3)
        bank.remove(bank.slots_of(torch.tensor([0], device=device)))
        new = add(bank, 1)  # lands in slot 0 but is the youngest
        assert bank.slots_of(new).tolist() == [0]
        assert bank.slots_by_age().tolist() == [1, 2, 0]


class TestRevision:
    def test_every_mutation_bumps_the_revision(self, device):
        bank = make_bank(device)
        seen = [bank.revision]
        add(bank, 2)
        seen.append(bank.revision)
        evict_oldest(bank, 1)
        seen.append(bank.revision)
        bank.clear()
        seen.append(bank.revision)
        assert seen == sorted(set(seen))  # strictly increasing

    def test_reads_do_not_bump_it(self, device):
        bank = make_bank(device)
        add(bank, 2)
        before = bank.revision
        bank.slots_by_age()
        bank.alive()
        bank.nbytes()
        bank.slots_of(torch.tensor([0], device=device))
        bank.gather("chroma", torch.tensor([0], device=device))
        assert bank.revision == before
