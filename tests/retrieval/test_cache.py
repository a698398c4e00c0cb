"""Query cache (docs/spec.md §Query cache): exact keys, whole batches, LRU order, counters, clear, capacity 0,
and answers that never depend on what was asked before."""

from __future__ import annotations

import pytest
import torch
from _equality import assert_same_results

from dreampool_gpu import DreamPool, PoolConfig
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
    def test_equal_queries_share_a_key(self):
        assert keys_of((0.1234, 0.5, 0.9996), hint=3, prior=0.25) == keys_of((0.1234, 0.5, 0.9996), hint=3, prior=0.25)

    @pytest.mark.parametrize("delta", [1e-7, 0.0001, 0.0004, -0.0004, 0.01])
    def test_any_difference_is_another_key(self, delta):
        """Nearby queries used to share a key (x1000, rounded) and so an embedding."""
        a, b = keys_of((0.3, 0.6, 0.2), (0.3 + delta, 0.6, 0.2))
        assert a != b

    def test_one_ulp_is_another_key(self):
        x = torch.tensor([[0.3, 0.6, 0.2]])
        y = x.clone()
        y[0, 1] = torch.nextafter(y[0, 1], torch.tensor(1.0))
        zeros, none = torch.zeros(1), torch.full((1,), -1)
        assert query_keys(x, none, zeros) != query_keys(y, none, zeros)

    def test_class_hint_and_utility_prior_are_part_of_the_key(self):
        base = keys_of((0.3, 0.6, 0.2))
        assert keys_of((0.3, 0.6, 0.2), hint=2) != base
        assert keys_of((0.3, 0.6, 0.2), prior=0.5) != base

    def test_dtype_is_part_of_the_key(self):
        x = torch.tensor([[0.5, 0.25, 0.125]])
        none, zeros = torch.full((1,), -1), torch.zeros(1)
        assert query_keys(x, none, zeros) != query_keys(x.double(), none, zeros)


class TestQueryCache:
    def test_a_repeated_batch_is_served_without_computing(self):
        cache = QueryCache(8)
        keys = keys_of((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
        first, calls = lookup(cache, keys, tag=10.0)
        assert calls == [[0, 1]] and len(cache) == 2
        again, calls = lookup(cache, keys, tag=99.0)  # different values if it recomputed
        assert calls == []
        assert torch.equal(again, first)

    def test_another_batch_of_the_same_queries_is_computed_whole(self):
        """A hit must equal computing the batch again: rows are never mixed from other batches."""
        cache = QueryCache(8)
        keys = keys_of((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
        lookup(cache, keys, tag=10.0)
        for other in (keys[::-1], keys[:1], [*keys, *keys_of((0.7, 0.7, 0.7))]):
            out, calls = lookup(cache, other, tag=20.0)
            assert calls == [list(range(len(other)))]
            assert out[:, 0].tolist() == [20.0 + i for i in range(len(other))]

    def test_cached_rows_do_not_alias_the_output(self):
        cache = QueryCache(8)
        keys = keys_of((0.1, 0.2, 0.3))
        out, _ = lookup(cache, keys, tag=5.0)
        out.fill_(-1.0)
        again, _ = lookup(cache, keys)
        assert again.tolist() == [[5.0] * D]

    def test_counters_and_hit_rate_count_queries(self):
        cache = QueryCache(8)
        assert (cache.hits, cache.misses, cache.hit_rate) == (0, 0, 0.0)
        a, b, c = keys_of((0.1, 0.1, 0.1), (0.2, 0.2, 0.2), (0.3, 0.3, 0.3))
        lookup(cache, [a, b])  # 2 misses
        lookup(cache, [a, c])  # another batch: 2 misses
        lookup(cache, [a, b])  # 2 hits
        assert (cache.hits, cache.misses) == (2, 4)
        assert cache.hit_rate == pytest.approx(2 / 6)

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

    def test_capacity_counts_queries(self):
        cache = QueryCache(3)
        a, b, c = keys_of((0.1, 0.1, 0.1), (0.2, 0.2, 0.2), (0.3, 0.3, 0.3))
        lookup(cache, [a, b])
        lookup(cache, [c])
        assert len(cache) == 3
        lookup(cache, [b, c])  # 5 queries > 3: the oldest batch goes
        assert len(cache) == 3
        assert lookup(cache, [a, b])[1] == [[0, 1]]

    def test_a_batch_larger_than_capacity_is_not_kept(self):
        cache = QueryCache(2)
        small = keys_of((0.9, 0.9, 0.9))
        lookup(cache, small)
        keys = keys_of((0.1, 0.1, 0.1), (0.2, 0.2, 0.2), (0.3, 0.3, 0.3))
        lookup(cache, keys)
        assert len(cache) == 1
        assert lookup(cache, keys)[1] == [[0, 1, 2]]
        assert lookup(cache, small)[1] == []

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


class TestAnswersDoNotDependOnHistory:
    """docs/spec.md §Query cache: a pool answers as a fresh pool of the same state would."""

    @staticmethod
    def pools(encoder: str) -> tuple[DreamPool, DreamPool]:
        cfg = PoolConfig(dream_shape=(4, 4, 1), capacity=256, coherence_threshold=0.0, encoder=encoder, device="cpu")
        g = torch.Generator().manual_seed(1)
        dreams = torch.rand(200, 4, 4, 1, 3, generator=g)
        out = []
        for _ in range(2):
            pool = DreamPool(cfg)
            pool.add(dreams, coherence=torch.ones(200), class_label=torch.arange(200) % 10)
            out.append(pool)
        return out[0], out[1]

    @pytest.mark.parametrize("encoder", ["features", "learned"])
    @pytest.mark.parametrize("mode", ["nearest", "hybrid", "soft", "diverse"])
    def test_nearby_query_after_another(self, encoder, mode):
        """Ask ``a``, then ``a + 0.0004``: the second answer is the fresh pool's, over many random pairs."""
        used, fresh = self.pools(encoder)
        g = torch.Generator().manual_seed(2)
        for _ in range(50):
            a = torch.rand(1, 3, generator=g) * 0.998
            b = a + 0.0004
            used.retrieve(a, k=10, mode=mode)
            got = used.retrieve(b, k=10, mode=mode)
            fresh.cache.clear()
            want = fresh.retrieve(b, k=10, mode=mode)
            # a neighbour's embedding moves scores by ~1e-4: far outside the promise's tolerance
            assert_same_results(got.ids, got.scores, want.ids, want.scores, where=f"{encoder} {mode}")

    def test_a_query_asked_first_in_another_batch(self):
        """Ask a batch holding ``a``, then ``a`` alone, then the batch again: each answer is a fresh pool's."""
        used, fresh = self.pools("features")
        g = torch.Generator().manual_seed(3)
        for _ in range(20):
            batch = torch.rand(8, 3, generator=g)
            for q in (batch, batch[:1], batch[1:3], batch):
                got = used.retrieve(q, k=10, mode="nearest")
                fresh.cache.clear()
                want = fresh.retrieve(q, k=10, mode="nearest")
                assert_same_results(got.ids, got.scores, want.ids, want.scores)
        assert used.cache.hits > 0  # the repeated batches were served from the cache


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
