"""Query cache (docs/spec.md §Query cache): key rounding, LRU order, counters, clear, capacity 0."""

from __future__ import annotations

import pytest
import torch

from dreampool_gpu.cache import QueryCache, query_keys

D = 4


def keys_of(*chromas: tuple[float, float, float], hint: int = -1, prior: float = 0.0) -> list:
    chroma = torch.tensor(chromas, dtype=torch.float32)
    n = chroma.shape[0]
    return query_keys(chroma, torch.full((n,), hint), torch.full((n,), prior))


class Recorder:
    """``compute`` callback: row i embeds as ``[tag + i] * D``; records the rows asked for."""

    def __init__(self, tag: float = 0.0) -> None:
        self.tag = tag
        self.calls: list[list[int]] = []

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        self.calls.append(rows.tolist())
        return (self.tag + rows.float())[:, None].expand(-1, D).clone()


def lookup(cache: QueryCache, keys, tag: float = 0.0) -> tuple[torch.Tensor, list[list[int]]]:
    compute = Recorder(tag)
    out = cache.get_or_compute(keys, compute, torch.empty(len(keys), D))
    return out, compute.calls


class TestKeys:
    def test_components_times_1000_rounded(self):
        assert keys_of((0.1234, 0.5, 0.9996), hint=3, prior=0.25) == [(123, 500, 1000, 3, 250)]

    @pytest.mark.parametrize("delta", [0.0001, 0.0003, -0.0004])
    def test_queries_within_a_thousandth_share_a_key(self, delta):
        a, b = keys_of((0.3, 0.6, 0.2), (0.3 + delta, 0.6 - delta, 0.2 + delta))
        assert a == b

    @pytest.mark.parametrize("delta", [0.002, -0.0015, 0.01])
    def test_farther_queries_do_not(self, delta):
        a, b = keys_of((0.3, 0.6, 0.2), (0.3 + delta, 0.6, 0.2))
        assert a != b

    def test_class_hint_and_utility_prior_are_part_of_the_key(self):
        base = keys_of((0.3, 0.6, 0.2))
        assert keys_of((0.3, 0.6, 0.2), hint=2) != base
        assert keys_of((0.3, 0.6, 0.2), prior=0.5) != base


class TestQueryCache:
    def test_hits_are_served_without_computing(self):
        cache = QueryCache(8)
        keys = keys_of((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
        first, calls = lookup(cache, keys, tag=10.0)
        assert calls == [[0, 1]] and len(cache) == 2
        again, calls = lookup(cache, keys[::-1], tag=99.0)  # different values if it recomputed
        assert calls == []
        assert torch.equal(again, first.flip(0))

    def test_only_missing_rows_are_computed(self):
        cache = QueryCache(8)
        lookup(cache, keys_of((0.1, 0.2, 0.3)), tag=10.0)
        keys = keys_of((0.7, 0.7, 0.7), (0.1, 0.2, 0.3), (0.9, 0.1, 0.1))
        out, calls = lookup(cache, keys, tag=20.0)
        assert calls == [[0, 2]]
        assert out[:, 0].tolist() == [20.0, 10.0, 22.0]

    def test_cached_rows_do_not_alias_the_output(self):
        cache = QueryCache(8)
        keys = keys_of((0.1, 0.2, 0.3))
        out, _ = lookup(cache, keys, tag=5.0)
        out.fill_(-1.0)
        again, _ = lookup(cache, keys)
        assert again.tolist() == [[5.0] * D]

    def test_counters_and_hit_rate(self):
        cache = QueryCache(8)
        assert (cache.hits, cache.misses, cache.hit_rate) == (0, 0, 0.0)
        a, b, c = keys_of((0.1, 0.1, 0.1), (0.2, 0.2, 0.2), (0.3, 0.3, 0.3))
        lookup(cache, [a, b])  # 2 misses
        lookup(cache, [a, c])  # 1 hit, 1 miss
        lookup(cache, [a, b, c])  # 3 hits
        assert (cache.hits, cache.misses) == (4, 3)
        assert cache.hit_rate == pytest.approx(4 / 7)

    def test_lru_eviction_order_at_capacity(self):
        cache = QueryCache(2)
        a, b, c = keys_of((0.1, 0.1, 0.1), (0.2, 0.2, 0.2), (0.3, 0.3, 0.3))
        lookup(cache, [a])
        lookup(cache, [b])
        lookup(cache, [a])  # a is now the most recently used: b goes first
        lookup(cache, [c])
        assert len(cache) == 2
        assert lookup(cache, [a])[1] == [] and lookup(cache, [c])[1] == []
        assert lookup(cache, [b])[1] == [[0]]  # b was evicted; re-adding it evicts a (LRU)
        assert lookup(cache, [a])[1] == [[0]]

    def test_one_batch_larger_than_capacity_keeps_its_last_rows(self):
        cache = QueryCache(2)
        keys = keys_of((0.1, 0.1, 0.1), (0.2, 0.2, 0.2), (0.3, 0.3, 0.3))
        lookup(cache, keys)
        assert len(cache) == 2
        assert lookup(cache, keys[1:])[1] == []
        assert lookup(cache, keys[:1])[1] == [[0]]

    def test_clear_drops_entries_and_counters(self):
        cache = QueryCache(8)
        keys = keys_of((0.1, 0.2, 0.3))
        lookup(cache, keys)
        lookup(cache, keys)
        cache.clear()
        assert (len(cache), cache.hits, cache.misses, cache.hit_rate) == (0, 0, 0, 0.0)
        assert lookup(cache, keys)[1] == [[0]]

    def test_capacity_zero_disables_the_cache(self):
        cache = QueryCache(0)
        keys = keys_of((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
        for tag in (1.0, 2.0):
            out, calls = lookup(cache, keys, tag=tag)
            assert calls == [[0, 1]] and out[:, 0].tolist() == [tag, tag + 1]
        assert len(cache) == 0 and cache.hits == 0


class TestStateDict:
    def test_state_is_the_capacity_and_loading_empties(self):
        cache = QueryCache(4)
        lookup(cache, keys_of((0.1, 0.2, 0.3), (0.4, 0.5, 0.6)))
        lookup(cache, keys_of((0.1, 0.2, 0.3)))
        assert cache.state_dict() == {"capacity": 4}
        other = QueryCache(2)
        lookup(other, keys_of((0.7, 0.8, 0.9)))
        other.load_state_dict(cache.state_dict())
        assert len(other) == 0 and other.hits == other.misses == 0
        assert other.capacity == 2  # its own: the pool's query_cache_size

    @pytest.mark.parametrize("state", [None, {}, {"capacity": -1}, {"capacity": True}, {"capacity": 1.5}])
    def test_malformed_refused_and_cache_kept(self, state):
        from dreampool_gpu.errors import InvalidInputError

        cache = QueryCache(4)
        lookup(cache, keys_of((0.1, 0.2, 0.3)))
        with pytest.raises(InvalidInputError, match="capacity"):
            cache.load_state_dict(state)
        assert len(cache) == 1 and cache.misses == 1
