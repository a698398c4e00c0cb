"""DreamPool end to end: every retrieval method against a plain-Python oracle, edge cases, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dreampool_gpu import DreamPool, PoolConfig
from dreampool_gpu.encoders import bank_form
from dreampool_gpu.errors import (
    DimensionMismatchError,
    DreamPoolError,
    InvalidConfigurationError,
    InvalidInputError,
)

SHAPE = (3, 4, 2)


def coloured_dreams(n, *, seed=0, shape=SHAPE):
    """Dreams around a random base colour per dream, so chroma signatures spread out."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 1, 1, 1, 3, generator=g)
    noise = 0.05 * (torch.rand(n, *shape, 3, generator=g) - 0.5)
    return (base + noise).clamp(0, 1)


def make_pool(n=40, *, metric="cosine", capacity=64, seed=0, labels=True, **overrides):
    config = PoolConfig(
        dream_shape=SHAPE, capacity=capacity, device="cpu", metric=metric, coherence_threshold=0.0, **overrides
    )
    pool = DreamPool(config)
    dreams = coloured_dreams(n, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    class_labels = torch.randint(-1, 10, (n,), generator=g) if labels else None
    coherence = torch.rand(n, generator=g)
    ids = pool.add(dreams, coherence=coherence, class_labels=class_labels)
    return pool, dreams, ids


# ----------------------------------------------------------------- oracle
def live_entries(pool):
    """Live entries as plain Python records, oldest first."""
    ids = pool.bank.columns["ids"]
    order = sorted(int(i) for i in ids if i >= 0)
    meta = pool.metadata(torch.tensor(order, dtype=torch.int64))
    return [
        {
            "id": order[j],
            "chroma": [float(x) for x in meta["chroma"][j].double()],
            "emb": [float(x) for x in meta["embeddings"][j].double()],
            "label": int(meta["class_label"][j]),
            "utility": float(meta["utility"][j]),
            "util_mean": float(meta["util_mean"][j]),
            "category": int(meta["hue_category"][j]),
        }
        for j in range(len(order))
    ]


def cos(a, b):
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in b))
    if na < 1e-12 or nb < 1e-12:
        return 0.0
    return sum(x * y for x, y in zip(a, b, strict=False)) / (na * nb)


def emb_score(q, e, metric):
    if metric == "cosine":
        return cos(q, e)
    return -math.sqrt(sum((x - y) ** 2 for x, y in zip(q, e, strict=False)))


def ranked(entries, score, k):
    """Stable ranking: score descending, then insertion order."""
    scored = [(score(e), i, e) for i, e in enumerate(entries)]
    scored.sort(key=lambda t: (-t[0], t[1]))
    return [(e["id"], s) for s, _, e in scored[:k]]


def mmr_loop(cands, rel, vecs, k, lam, delta=0.0):
    """Plain greedy MMR: first the most relevant, then lambda*rel - (1-lambda)*maxsim - delta*max(0, maxsim)."""
    chosen, left = [], list(range(len(cands)))
    while left and len(chosen) < k:
        best, best_val = None, -math.inf
        for i in left:
            if not chosen:
                val = rel[i]
            else:
                ms = max(cos(vecs[i], vecs[j]) for j in chosen)
                val = lam * rel[i] - (1 - lam) * ms - delta * max(0.0, ms)
            if val > best_val:
                best, best_val = i, val
        chosen.append(best)
        left.remove(best)
    return [cands[i] for i in chosen]


def query_embeddings(pool, queries, hint=None):
    """``[B, D]`` embeddings the pool gives dream ``queries`` (the encoder's query side, normalised as stored)."""
    from dreampool_gpu.dreams import chroma_signature
    from dreampool_gpu.spectral import spectral_features

    b = queries.shape[0]
    hint = torch.full((b,), -1) if hint is None else hint
    z = pool.encoder.encode_queries(
        dreams=queries,
        chroma=chroma_signature(queries),
        spectral=spectral_features(queries),
        class_labels=hint,
        utility=torch.zeros(b),
    )
    return bank_form(z, pool.config.metric)


def ids_of(result, row=0):
    return [int(i) for i in result.ids[row] if i >= 0]


# ------------------------------------------------------------------ tests
class TestAdd:
    def test_gate_rejects_below_threshold(self):
        pool = DreamPool(PoolConfig(dream_shape=SHAPE, device="cpu", coherence_threshold=0.5))
        dreams = coloured_dreams(4)
        ids = pool.add(dreams, coherence=torch.tensor([0.1, 0.5, 0.9, 0.49]))
        assert ids.tolist() == [-1, 0, 1, -1]
        assert len(pool) == 2
        assert pool.stats()["rejected"] == 2

    def test_force_bypasses_gate(self):
        pool = DreamPool(PoolConfig(dream_shape=SHAPE, device="cpu", coherence_threshold=0.9))
        ids = pool.add(coloured_dreams(3), coherence=torch.zeros(3), force=True)
        assert ids.tolist() == [0, 1, 2]

    def test_every_dream_rejected(self):
        pool = DreamPool(PoolConfig(dream_shape=SHAPE, device="cpu", coherence_threshold=0.9))
        ids = pool.add(coloured_dreams(5), coherence=torch.full((5,), 0.1))
        assert ids.tolist() == [-1] * 5
        assert len(pool) == 0
        assert pool.retrieve(torch.rand(2, 3), k=3, mode="similar").ids.tolist() == [[-1] * 3] * 2

    def test_fifo_eviction_at_capacity(self):
        pool, _, ids = make_pool(10, capacity=4)
        assert len(pool) == 4
        assert ids.tolist() == [-1] * 6 + [0, 1, 2, 3]  # more passed the gate than fit: newest kept
        more = pool.add(coloured_dreams(2, seed=9), coherence=torch.ones(2))
        assert more.tolist() == [4, 5]
        assert sorted(e["id"] for e in live_entries(pool)) == [2, 3, 4, 5]
        assert pool.stats()["evicted"] == 2

    def test_capacity_one(self):
        pool, dreams, _ = make_pool(3, capacity=1)
        assert len(pool) == 1
        pool.add(dreams[:1], coherence=torch.ones(1))
        assert [e["id"] for e in live_entries(pool)] == [1]
        assert ids_of(pool.retrieve(dreams[:1], k=5, mode="nearest")) == [1]

    def test_stored_dreams_and_scores_round_trip(self):
        pool = DreamPool(PoolConfig(dream_shape=SHAPE, device="cpu", coherence_threshold=0.0))
        dreams = coloured_dreams(3)
        ids = pool.add(
            dreams,
            coherence=torch.tensor([0.2, 0.3, 0.4]),
            energy=torch.tensor([1.0, 2.0, 3.0]),
            violation=torch.tensor([0.0, 0.5, 1.0]),
            class_labels=torch.tensor([1, -1, 9]),
        )
        torch.testing.assert_close(pool.dreams(ids), dreams)
        meta = pool.metadata(ids)
        assert meta["class_label"].tolist() == [1, -1, 9]
        torch.testing.assert_close(meta["energy"], torch.tensor([1.0, 2.0, 3.0]))
        torch.testing.assert_close(meta["chroma"], dreams.mean((1, 2, 3)))

    def test_single_pixel_dreams(self):
        pool = DreamPool(PoolConfig(dream_shape=(1, 1, 1), device="cpu", coherence_threshold=0.0))
        dreams = torch.rand(5, 1, 1, 1, 3)
        ids = pool.add(dreams, coherence=torch.ones(5))
        for mode in ("similar", "diverse", "soft", "hybrid", "nearest", "category"):
            result = pool.retrieve(dreams[:2], k=3, mode=mode)
            assert result.ids.shape == (2, 3)
            assert set(ids_of(result)) <= set(ids.tolist())

    def test_duplicate_dreams_break_ties_oldest_first(self):
        pool = DreamPool(PoolConfig(dream_shape=SHAPE, device="cpu", coherence_threshold=0.0))
        dream = coloured_dreams(1)
        pool.add(dream.expand(6, *dream.shape[1:]).clone(), coherence=torch.ones(6))
        assert ids_of(pool.retrieve(dream, k=3, mode="similar")) == [0, 1, 2]

    @pytest.mark.parametrize("metric", ["cosine", "euclidean"])
    @pytest.mark.parametrize("engine", ["torch", "faiss-flat", "faiss-ivf"])
    @pytest.mark.parametrize("mode", ["nearest", "category"])
    def test_the_oldest_duplicates_make_the_cut(self, engine, mode, metric):
        """More equal scores than k: the k oldest are returned, whatever the slot order."""
        pool = DreamPool(
            PoolConfig(
                dream_shape=SHAPE, device="cpu", coherence_threshold=0.0, capacity=64, engine=engine, metric=metric
            )
        )
        dream = coloured_dreams(1)
        for _ in range(3):  # ids 0..95 through 64 slots: the oldest live ids (32..63) are not in slot order
            pool.add(dream.expand(32, *dream.shape[1:]).clone(), coherence=torch.ones(32))
        hits = pool.retrieve(dream.expand(3, *dream.shape[1:]), k=3, mode=mode)
        assert hits.ids.tolist() == [[32, 33, 34]] * 3

    @pytest.mark.parametrize("engine", ["torch", "faiss-flat", "auto"])
    @pytest.mark.parametrize("mode", ["nearest", "category", "soft", "hybrid"])
    def test_duplicates_in_reused_slots_come_oldest_first(self, engine, mode):
        """Slot order differs from age after eviction; equal scores still go oldest first."""
        pool = DreamPool(
            PoolConfig(dream_shape=SHAPE, device="cpu", coherence_threshold=0.0, capacity=4, engine=engine)
        )
        dream = coloured_dreams(1)
        for _ in range(6):  # ids 0..5 through 4 slots: ids 4 and 5 reuse the slots of 0 and 1
            pool.add(dream, coherence=torch.ones(1))
        queries = dream.expand(3, *dream.shape[1:])  # 3 queries: FAISS brute force serves them
        assert pool.retrieve(queries, k=4, mode=mode).ids.tolist() == [[2, 3, 4, 5]] * 3


class TestRetrieveOracle:
    @pytest.fixture(params=["cosine", "euclidean"])
    def metric(self, request):
        return request.param

    def test_similar(self, metric):
        pool, dreams, _ = make_pool(metric=metric)
        queries = coloured_dreams(5, seed=7)
        result = pool.retrieve(queries, k=6, mode="similar")
        entries = live_entries(pool)
        for b in range(5):
            q = queries[b].double().mean((0, 1, 2)).tolist()
            want = ranked(entries, lambda e: cos(q, e["chroma"]), 6)
            assert ids_of(result, b) == [i for i, _ in want]
            torch.testing.assert_close(result.scores[b], torch.tensor([s for _, s in want]), atol=1e-5, rtol=0)

    def test_similar_with_chroma_queries(self):
        pool, _, _ = make_pool()
        chroma = torch.tensor([[0.9, 0.1, 0.1], [0.0, 0.0, 0.0]])
        result = pool.retrieve(chroma, k=4, mode="similar")
        entries = live_entries(pool)
        assert ids_of(result, 0) == [i for i, _ in ranked(entries, lambda e: cos(chroma[0].tolist(), e["chroma"]), 4)]
        # a black query scores 0 against everything: ties resolve oldest first
        assert ids_of(result, 1) == [e["id"] for e in entries[:4]]

    def test_in_class(self):
        pool, _, _ = make_pool()
        queries = coloured_dreams(3, seed=3)
        result = pool.retrieve(queries, k=5, mode="class", class_hint=torch.tensor([2, 5, 7]))
        entries = live_entries(pool)
        for b, label in enumerate([2, 5, 7]):
            q = queries[b].double().mean((0, 1, 2)).tolist()
            pool_cls = [e for e in entries if e["label"] == label]
            assert ids_of(result, b) == [i for i, _ in ranked(pool_cls, lambda e: cos(q, e["chroma"]), 5)]

    def test_balanced(self):
        pool, _, _ = make_pool()
        queries = coloured_dreams(2, seed=4)
        result = pool.retrieve(queries, k=2, mode="balanced", classes=[3, 0, 8])
        assert result.ids.shape == (2, 6)
        entries = live_entries(pool)
        for b in range(2):
            q = queries[b].double().mean((0, 1, 2)).tolist()
            want = []
            for label in (3, 0, 8):
                got = [
                    i for i, _ in ranked([e for e in entries if e["label"] == label], lambda e: cos(q, e["chroma"]), 2)
                ]
                want += got + [-1] * (2 - len(got))
            assert result.ids[b].tolist() == want

    def test_by_utility(self):
        pool, _, ids = make_pool()
        live = ids[ids >= 0]
        pool.feedback(live[:20], torch.linspace(0, 1, 20))
        queries = coloured_dreams(3, seed=5)
        result = pool.retrieve(queries, k=4, mode="utility", utility_threshold=0.5)
        entries = [e for e in live_entries(pool) if not math.isnan(e["utility"]) and e["utility"] >= 0.5]
        for b in range(3):
            q = queries[b].double().mean((0, 1, 2)).tolist()
            assert ids_of(result, b) == [i for i, _ in ranked(entries, lambda e: cos(q, e["chroma"]), 4)]

    @pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
    def test_diverse(self, lam):
        pool, _, _ = make_pool()
        queries = coloured_dreams(3, seed=6)
        result = pool.retrieve(queries, k=5, mode="diverse", mmr_lambda=lam)
        entries = live_entries(pool)
        for b in range(3):
            q = queries[b].double().mean((0, 1, 2)).tolist()
            rel = [cos(q, e["chroma"]) for e in entries]
            want = mmr_loop([e["id"] for e in entries], rel, [e["chroma"] for e in entries], 5, lam)
            assert ids_of(result, b) == want

    def test_nearest(self, metric):
        pool, _, _ = make_pool(metric=metric)
        queries = coloured_dreams(4, seed=8)
        result = pool.retrieve(queries, k=7, mode="nearest")
        q_emb = query_embeddings(pool, queries)
        entries = [e for e in live_entries(pool) if e["id"] < 40]
        for b in range(4):
            q = q_emb[b].double().tolist()
            want = ranked(entries, lambda e: emb_score(q, e["emb"], metric), 7)
            assert ids_of(result, b) == [i for i, _ in want]
            torch.testing.assert_close(result.scores[b], torch.tensor([s for _, s in want]), atol=1e-4, rtol=1e-4)

    def test_nearest_with_embedding_queries(self, metric):
        pool, _, _ = make_pool(metric=metric)
        emb = torch.randn(3, 64)
        result = pool.retrieve(emb, k=5, mode="nearest")
        entries = live_entries(pool)
        q = torch.nn.functional.normalize(emb, dim=1) if metric == "cosine" else emb
        for b in range(3):
            want = ranked(entries, lambda e: emb_score(q[b].double().tolist(), e["emb"], metric), 5)
            assert ids_of(result, b) == [i for i, _ in want]

    def test_category(self):
        pool, _, _ = make_pool()
        queries = coloured_dreams(3, seed=10)
        result = pool.retrieve(queries, k=4, mode="category")
        q_emb = query_embeddings(pool, queries)
        meta = pool.metadata(pool.add(queries, coherence=torch.ones(3)))
        entries = [e for e in live_entries(pool) if e["id"] < 40]
        for b in range(3):
            cat = int(meta["hue_category"][b])
            same = [e for e in entries if e["category"] == cat]
            q = q_emb[b].double().tolist()
            assert ids_of(result, b) == [i for i, _ in ranked(same, lambda e: cos(q, e["emb"]), 4)]

    @pytest.mark.parametrize("mode,lam", [("soft", 1.0), ("hybrid", 0.7), ("hybrid", 0.0)])
    def test_soft_and_hybrid(self, metric, mode, lam):
        pool, _, ids = make_pool(metric=metric)
        live = ids[ids >= 0]
        pool.feedback(live[::3], torch.rand(len(live[::3]), generator=torch.Generator().manual_seed(2)))
        queries = coloured_dreams(3, seed=11)
        hint = torch.tensor([1, -1, 4])
        kwargs = {} if mode == "soft" else {"mmr_lambda": lam}
        result = pool.retrieve(queries, k=5, mode=mode, class_hint=hint, fetch_k=12, **kwargs)
        q_emb = query_embeddings(pool, queries, hint)
        entries = [e for e in live_entries(pool) if e["id"] < 40]
        w = pool.weights
        for b in range(3):
            q = q_emb[b].double().tolist()
            cands = ranked(entries, lambda e: emb_score(q, e["emb"], metric), 12)
            by_id = {e["id"]: e for e in entries}
            sims = [s for _, s in cands]
            lo, hi = min(sims), max(sims)
            base = []
            for cid, s in cands:
                e = by_id[cid]
                sim_norm = 1.0 if hi - lo <= 1e-6 else (s - lo) / (hi - lo)
                h = int(hint[b])
                match = 0.5 if (e["label"] < 0 or h < 0) else float(e["label"] == h)
                base.append(w.alpha * sim_norm + w.beta * min(max(e["util_mean"], 0), 1) + w.gamma * match)
            want = mmr_loop([c for c, _ in cands], base, [by_id[c]["emb"] for c, _ in cands], 5, lam, w.delta)
            assert ids_of(result, b) == want


class TestChunking:
    @pytest.mark.parametrize(
        ("mode", "kwargs"),
        [("similar", {}), ("class", {"class_hint": 3}), ("balanced", {"classes": [1, 4]}), ("utility", {})],
    )
    def test_chroma_methods_chunked_equal_unchunked(self, mode, kwargs):
        whole, _, _ = make_pool(60, capacity=64)
        tiny, _, _ = make_pool(60, capacity=64, search_chunk_mb=1e-4)  # a few queries per chunk
        queries = coloured_dreams(37, seed=9)
        want = whole.retrieve(queries, k=7, mode=mode, **kwargs)
        got = tiny.retrieve(queries, k=7, mode=mode, **kwargs)
        assert torch.equal(got.ids, want.ids) and torch.equal(got.scores, want.scores)


class TestChromaQueries:
    @pytest.mark.parametrize("mode", ["nearest", "soft", "hybrid"])
    def test_chroma_query_carries_no_spectral_evidence(self, mode):
        """A chroma query is its colour with the bank's mean spectral features (docs/spec.md, Encoders)."""
        pool, _, _ = make_pool(60, capacity=64, query_cache_size=0, features="eager")  # the encoder fitted now
        chroma = torch.rand(9, 3, generator=torch.Generator().manual_seed(4))
        enc = pool.encoder
        z = enc.encode_queries(
            dreams=None, chroma=chroma, spectral=None, class_labels=torch.full((9,), -1), utility=torch.zeros(9)
        )
        content = enc.content(chroma, None)
        standardised = (content - enc.mean) / enc.std
        assert torch.equal(enc._content_block(chroma, None)[:, 3:], torch.zeros(9, 6))
        assert standardised[:, :3].abs().sum() > 0
        by_chroma = pool.retrieve(chroma, k=5, mode=mode)
        by_embedding = pool.retrieve(z, k=5, mode=mode)
        assert torch.equal(by_chroma.ids, by_embedding.ids)
        torch.testing.assert_close(by_chroma.scores, by_embedding.scores)


class TestEdges:
    @pytest.mark.parametrize("mode", ["similar", "diverse", "soft", "hybrid", "nearest", "category", "utility"])
    def test_empty_pool(self, mode):
        pool = DreamPool(PoolConfig(dream_shape=SHAPE, device="cpu"))
        result = pool.retrieve(coloured_dreams(2), k=3, mode=mode)
        assert result.ids.tolist() == [[-1] * 3] * 2
        assert torch.isinf(result.scores).all()

    @pytest.mark.parametrize("mode", ["similar", "diverse", "soft", "hybrid", "nearest"])
    def test_k_zero(self, mode):
        pool, dreams, _ = make_pool(5)
        result = pool.retrieve(dreams[:2], k=0, mode=mode)
        assert result.ids.shape == (2, 0)

    @pytest.mark.parametrize("mode", ["similar", "diverse", "soft", "hybrid", "nearest"])
    def test_k_larger_than_pool(self, mode):
        pool, dreams, _ = make_pool(5)
        result = pool.retrieve(dreams[:2], k=9, mode=mode)
        assert result.ids.shape == (2, 9)
        for b in range(2):
            assert sorted(ids_of(result, b)) == list(range(5))
            assert result.ids[b, 5:].tolist() == [-1] * 4

    def test_usage_counts_bump(self):
        pool, dreams, _ = make_pool(5)
        result = pool.retrieve(dreams[:2], k=2, mode="nearest")
        usage = pool.metadata(torch.arange(5))["usage"]
        expected = torch.zeros(5, dtype=usage.dtype)
        for i in result.ids.flatten().tolist():
            expected[i] += 1
        assert usage.tolist() == expected.tolist()

    def test_with_dreams_gathers(self):
        pool, dreams, _ = make_pool(5)
        result = pool.retrieve(dreams[:2], k=7, mode="nearest", with_dreams=True)
        assert result.dreams.shape == (2, 7, *SHAPE, 3)
        for b in range(2):
            for j, i in enumerate(result.ids[b].tolist()):
                want = dreams[i] if i >= 0 else torch.zeros_like(dreams[0])
                torch.testing.assert_close(result.dreams[b, j], want)


class TestFeedback:
    def test_running_mean_and_last(self):
        pool, _, _ = make_pool(5)
        pool.feedback(torch.tensor([0, 0, 1]), torch.tensor([0.2, 0.6, 1.0]))
        pool.feedback(torch.tensor([0]), torch.tensor([0.7]))
        meta = pool.metadata(torch.tensor([0, 1, 2]))
        torch.testing.assert_close(meta["util_mean"], torch.tensor([0.5, 1.0, 0.0]))
        torch.testing.assert_close(meta["utility"][:2], torch.tensor([0.7, 1.0]))
        assert math.isnan(float(meta["utility"][2]))
        assert meta["feedback_count"].tolist() == [3, 1, 0]

    def test_padding_and_evicted_ids_skipped(self):
        pool, _, _ = make_pool(4, capacity=4)
        pool.add(coloured_dreams(2, seed=3), coherence=torch.ones(2))  # ids 4, 5 evict 0, 1
        assert pool.feedback(torch.tensor([-1, 0, 5]), torch.tensor([0.5, 0.5, 0.5])) == 1

    def test_never_issued_id_raises(self):
        pool, _, _ = make_pool(3)
        with pytest.raises(InvalidInputError, match="ids"):
            pool.feedback(torch.tensor([99]), torch.tensor([0.5]))


def snapshot(pool):
    return (
        {k: v.clone() for k, v in pool.bank.columns.items()},
        pool.bank.size,
        pool.bank.next_id,
        dict(pool.counters),
        pool.cache.hits,
        pool.cache.misses,
    )


def assert_same(a, b):
    cols_a, *rest_a = a
    cols_b, *rest_b = b
    assert rest_a == rest_b
    for name in cols_a:
        assert torch.equal(cols_a[name].nan_to_num(-7.0), cols_b[name].nan_to_num(-7.0)), name


class TestCategoryFilter:
    @pytest.mark.parametrize("mode", ["nearest", "soft", "hybrid"])
    def test_candidates_restricted_to_the_category(self, mode):
        pool, dreams, _ = make_pool(60)
        queries = dreams[:4]
        wanted = torch.tensor([0, 3, 6, 9])
        hits = pool.retrieve(queries, k=5, mode=mode, category=wanted)
        for b in range(4):
            found = hits.ids[b][hits.ids[b] >= 0]
            assert bool((pool.metadata(found)["hue_category"] == wanted[b]).all())
        in_category = pool.bank.columns["hue_category"][pool.bank.alive()]
        for b in range(4):  # as many as the category holds, up to k
            assert int((hits.ids[b] >= 0).sum()) == min(5, int((in_category == wanted[b]).sum()))

    def test_nearest_with_a_category_equals_category_mode(self):
        pool, dreams, _ = make_pool(60)
        a = pool.retrieve(dreams[:5], k=6, mode="nearest", category=2)
        b = pool.retrieve(dreams[:5], k=6, mode="category", category=2)
        assert torch.equal(a.ids, b.ids) and torch.equal(a.scores, b.scores)

    def test_no_category_no_filter(self):
        pool, dreams, _ = make_pool(60)
        a = pool.retrieve(dreams[:3], k=6, mode="hybrid")
        assert len({int(c) for c in pool.metadata(a.ids[a.ids >= 0])["hue_category"]}) > 1


class TestDiversity:
    def test_matches_pairwise_loop_and_skips_padding(self):
        pool, dreams, _ = make_pool(30)
        hits = pool.retrieve(dreams[:3], k=5, mode="diverse")
        ids = hits.ids.clone()
        ids[2, 1:] = -1  # one live entry: no pairs
        got = pool.diversity(ids)
        for b in range(2):
            chroma = pool.metadata(ids[b])["chroma"].double()
            d = [float((chroma[i] - chroma[j]).norm()) for i in range(5) for j in range(i + 1, 5)]
            assert got["mean"][b].item() == pytest.approx(sum(d) / len(d), abs=1e-5)
            assert (got["min"][b].item(), got["max"][b].item()) == pytest.approx((min(d), max(d)), abs=1e-5)
        assert all(math.isnan(got[key][2].item()) for key in ("mean", "min", "max"))

    def test_needs_a_batch_of_result_sets(self):
        pool, _, _ = make_pool(5)
        with pytest.raises(DimensionMismatchError):
            pool.diversity(torch.tensor([0, 1, 2]))


class TestArgumentTypes:
    def test_config_must_be_a_pool_config(self):
        for junk in ("junk", {"capacity": 4}, 3):
            with pytest.raises(InvalidConfigurationError, match="config"):
                DreamPool(junk)

    def test_balanced_accepts_numpy_and_torch_integers(self):
        pool, dreams, _ = make_pool(20)
        plain = pool.retrieve(dreams[:2], k=2, mode="balanced", classes=[0, 1])
        other = pool.retrieve(dreams[:2], k=2, mode="balanced", classes=[np.int64(0), torch.tensor(1)])
        assert torch.equal(plain.ids, other.ids)


def test_numpy_integer_counts_are_ints():
    """``k`` and ``n`` read from a numpy array (np.int64, np.int32) answer as Python ints do; np.bool_ is refused."""
    pool, dreams, _ = make_pool(20)
    for k in (np.int64(3), np.int32(3)):
        assert torch.equal(pool.retrieve(dreams[:2], k=k).ids, pool.retrieve(dreams[:2], k=3).ids)
        g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        assert torch.equal(pool.sample(k, generator=g1), pool.sample(3, generator=g2))
    with pytest.raises(InvalidInputError, match="k"):
        pool.retrieve(dreams[:2], k=np.bool_(True))
    with pytest.raises(InvalidInputError, match="k"):
        pool.retrieve(dreams[:2], k=np.int64(-1))


class TestErrorsLeaveStateUnchanged:
    BAD_ADDS = [
        ({"dreams": "nan"}, InvalidInputError),
        ({"dreams": "range"}, InvalidInputError),
        ({"dreams": "shape"}, DimensionMismatchError),
        ({"dreams": "int"}, InvalidInputError),
        ({"coherence": torch.tensor([0.5, 1.5, 0.5])}, InvalidInputError),
        ({"coherence": torch.tensor([0.5, 0.5])}, DimensionMismatchError),
        ({"energy": torch.tensor([-1.0, 0.0, 0.0])}, InvalidInputError),
        ({"violation": torch.tensor([float("inf"), 0.0, 0.0])}, InvalidInputError),
        ({"class_labels": torch.tensor([0, 10, 1])}, InvalidInputError),
        ({"class_labels": torch.tensor([0.5, 1.0, 1.0])}, InvalidInputError),
        ({"coherence": 1.5}, InvalidInputError),  # Python numbers: checked on the host
        ({"coherence": float("nan")}, InvalidInputError),
        ({"energy": -1}, InvalidInputError),
        ({"energy": 1e39}, InvalidInputError),  # finite as a float, inf as float32
        ({"violation": float("inf")}, InvalidInputError),
    ]

    @pytest.mark.parametrize("bad,error", BAD_ADDS)
    def test_bad_add(self, bad, error):
        pool, _, _ = make_pool(10, capacity=10)
        before = snapshot(pool)
        dreams = coloured_dreams(3, seed=42)
        kwargs = {"coherence": torch.ones(3)}
        if bad.get("dreams") == "nan":
            dreams[1, 0, 0, 0, 0] = float("nan")
        elif bad.get("dreams") == "range":
            dreams[1, 0, 0, 0, 0] = 1.5
        elif bad.get("dreams") == "shape":
            dreams = torch.rand(3, 2, 2, 2, 3)
        elif bad.get("dreams") == "int":
            dreams = (dreams * 0).long()
        kwargs.update({k: v for k, v in bad.items() if k != "dreams"})
        with pytest.raises(error):
            pool.add(dreams, **kwargs)
        assert_same(before, snapshot(pool))

    def test_python_numbers_store_as_tensors_do(self):
        dreams = coloured_dreams(3, seed=43)
        values = {"coherence": 1, "energy": 2.5, "violation": 0.25}
        columns = tuple(values)
        got, want = make_pool(4, capacity=10)[0], make_pool(4, capacity=10)[0]
        a = got.add(dreams, **values)
        b = want.add(dreams, **{k: torch.full((3,), float(x)) for k, x in values.items()})
        assert torch.equal(a, b)
        for name, column in got.metadata(a, columns=columns).items():
            assert torch.equal(column, want.metadata(b, columns=columns)[name]), name

    @pytest.mark.parametrize(
        "kwargs,error",
        [
            ({"k": -1}, InvalidInputError),
            ({"k": 2.5}, InvalidInputError),
            ({"mode": "telepathy"}, InvalidInputError),
            ({"mode": "class"}, InvalidInputError),
            ({"mode": "class", "class_hint": 12}, InvalidInputError),
            ({"mode": "class", "class_hint": -1}, InvalidInputError),
            ({"mode": "class", "class_hint": torch.tensor([3, -1])}, InvalidInputError),
            ({"mode": "balanced", "classes": [1.0]}, InvalidInputError),
            ({"mode": "balanced", "classes": [True]}, InvalidInputError),
            ({"mode": "balanced", "classes": torch.tensor([True, False])}, InvalidInputError),
            ({"mode": "balanced", "classes": object()}, InvalidInputError),
            ({"mode": "balanced", "classes": [1, 99]}, InvalidInputError),
            ({"mode": "hybrid", "mmr_lambda": 1.5}, InvalidInputError),
            ({"mode": "category", "category": 12}, InvalidInputError),
            ({"mode": "similar", "queries": torch.randn(2, 64)}, DimensionMismatchError),
            ({"mode": "nearest", "queries": torch.randn(2, 7)}, DimensionMismatchError),
            ({"mode": "nearest", "queries": torch.full((2, 64), float("nan"))}, InvalidInputError),
            ({"mode": "similar", "queries": torch.tensor([[0.5, 2.0, 0.1]])}, InvalidInputError),
        ],
    )
    def test_bad_retrieve(self, kwargs, error):
        pool, dreams, _ = make_pool(10)
        before = snapshot(pool)
        queries = kwargs.pop("queries", dreams[:2])
        with pytest.raises(error):
            pool.retrieve(queries, **kwargs)
        assert_same(before, snapshot(pool))

    @pytest.mark.parametrize(
        "ids,utility",
        [
            (torch.tensor([0, 1]), torch.tensor([0.5, 1.5])),
            (torch.tensor([0, 1]), torch.tensor([0.5, float("nan")])),
            (torch.tensor([0, 1]), torch.tensor([0.5])),
            (torch.tensor([0.0, 1.0]), torch.tensor([0.5, 0.5])),
            (torch.tensor([0, -5]), torch.tensor([0.5, 0.5])),
        ],
    )
    def test_bad_feedback(self, ids, utility):
        pool, _, _ = make_pool(10)
        before = snapshot(pool)
        with pytest.raises(DreamPoolError):
            pool.feedback(ids, utility)
        assert_same(before, snapshot(pool))


class TestDevices:
    def test_results_on_pool_device(self, device):
        pool = DreamPool(PoolConfig(dream_shape=SHAPE, device=str(device), coherence_threshold=0.0))
        dreams = coloured_dreams(6)
        pool.add(dreams, coherence=torch.ones(6))
        result = pool.retrieve(dreams[:2], k=3, mode="hybrid", with_dreams=True)
        assert result.ids.device.type == device.type
        assert result.scores.device.type == device.type
        assert result.dreams.device.type == device.type

    @pytest.mark.gpu
    def test_cuda_matches_cpu(self):
        results = []
        for dev in ("cpu", "cuda"):
            pool = DreamPool(PoolConfig(dream_shape=SHAPE, device=dev, coherence_threshold=0.0, dream_dtype="float32"))
            dreams = coloured_dreams(30)
            pool.add(dreams, coherence=torch.ones(30))
            results.append(pool.retrieve(dreams[:5], k=4, mode="nearest").ids.cpu())
        assert torch.equal(results[0], results[1])


class TestStats:
    def test_counts_and_bytes(self):
        pool, _, _ = make_pool(10, capacity=8)
        stats = pool.stats()
        assert stats["size"] == 8
        assert stats["evicted"] + stats["dropped"] == 2
        assert stats["bank_bytes"] == sum(t.numel() * t.element_size() for t in pool.bank.columns.values())
        assert stats["bytes_by_column"]["embeddings"] == 8 * 64 * 4


def test_replay_calls_work_under_inference_mode():
    """An evaluation loop under torch.inference_mode() samples, gathers and records as outside it."""
    pool = DreamPool(PoolConfig(dream_shape=(2, 2, 1), capacity=32, coherence_threshold=0.0, device="cpu"))
    g = torch.Generator().manual_seed(0)
    pool.add(torch.rand(16, 2, 2, 1, 3, generator=g), coherence=1.0, class_label=torch.arange(16) % 4)
    outside = pool.sample(6, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ids = pool.sample(6, generator=torch.Generator().manual_seed(1))
        dreams = pool.dreams(ids)
        labels = pool.metadata(ids, columns=("class_label",))["class_label"]
        assert pool.feedback(ids, torch.full((6,), 0.5)) == 6
    assert torch.equal(ids, outside)
    assert torch.equal(dreams, pool.dreams(outside))
    assert torch.equal(labels, pool.metadata(outside, columns=("class_label",))["class_label"])


def test_inputs_that_require_grad_are_stored_and_compared_as_values():
    """A generator's output (requires grad) enters as its values: no autograd graph in the bank or in answers."""
    config = PoolConfig(
        dream_shape=(2, 2, 1), capacity=8, coherence_threshold=0.0, device="cpu", columns={"logits": ((4,), "float32")}
    )
    pool, plain = DreamPool(config), DreamPool(config)
    g = torch.Generator().manual_seed(0)
    dreams, logits = torch.rand(5, 2, 2, 1, 3, generator=g), torch.randn(5, 4, generator=g)
    w = torch.ones(1, requires_grad=True)
    ids = pool.add(dreams * w, coherence=torch.ones(5) * w, energy=torch.zeros(5) * w, columns={"logits": logits * w})
    plain.add(dreams, coherence=torch.ones(5), energy=torch.zeros(5), columns={"logits": logits})
    pool.update(ids[:2], logits=torch.zeros(2, 4) * w)
    plain.update(ids[:2], logits=torch.zeros(2, 4))
    assert pool.feedback(ids, torch.full((5,), 0.5) * w) == plain.feedback(ids, torch.full((5,), 0.5)) == 5
    assert not any(t.requires_grad for t in pool.bank.columns.values())
    got, want = pool.metadata(ids), plain.metadata(ids)
    assert all(torch.equal(got[name], want[name]) for name in ("logits", "coherence", "utility", "class_label"))
    query = torch.rand(2, 2, 2, 1, 3, generator=g)
    for mode in ("nearest", "hybrid", "similar", "diverse"):
        out = pool.retrieve(query * w, k=3, mode=mode)
        assert not out.scores.requires_grad
        assert torch.equal(out.ids, plain.retrieve(query, k=3, mode=mode).ids)
