"""Bad input, fuzzed (tests/_fuzz.py): retrieve."""

from __future__ import annotations

import torch
from _fuzz import (
    CAPACITY,
    CHROMA_MODES,
    DIM,
    ORDERED_MODES,
    SHAPE,
    argument,
    attempt,
    counts,
    expected_width,
    fresh_pool,
    junk,
    live_ids,
    modes,
    tensors,
)
from hypothesis import given
from hypothesis import strategies as st

from dreampool_gpu.config import RetrievalMode


# ------------------------------------------------------------------ retrieve
class TestFuzzRetrieve:
    @given(data=st.data())
    def test_retrieve(self, data):
        draw = data.draw
        pool = fresh_pool()
        clean = draw(st.booleans())
        b = draw(st.integers(0, 4))
        mode = draw(
            st.one_of(st.none(), st.sampled_from([m.value for m in RetrievalMode] + ["hard"]))
            if clean
            else st.one_of(st.none(), modes)
        )
        name = pool.config.retrieval_mode if mode is None else mode
        chroma_only = isinstance(name, str) and name in CHROMA_MODES
        shapes = [(b, *SHAPE, 3), (b, 3)] + ([] if clean and chroma_only else [(b, DIM)])
        queries = draw(tensors(draw(st.sampled_from(shapes)), clean=clean))
        k = draw(st.one_of(st.none(), st.integers(0, CAPACITY)) if clean else st.one_of(st.none(), counts))
        class_mode = clean and mode == "class"  # class mode needs a hint naming a class
        class_hint = draw(
            argument((b,), kind="int", low=0 if class_mode else -1, high=9, optional=not class_mode, clean=clean)
        )
        class_lists = st.one_of(st.lists(st.integers(0, 9), max_size=4), st.lists(st.integers(0, 9)).map(tuple))
        classes = draw(
            class_lists if clean else st.one_of(st.none(), class_lists, st.lists(st.integers(-2, 12), max_size=4), junk)
        )
        category = draw(
            argument((b,), kind="int", low=0, high=11, optional=not (clean and mode == "category"), clean=clean)
        )  # embedding queries in category mode need one
        threshold = draw(st.floats(-1, 2) if clean else st.one_of(st.floats(-1, 2), junk))
        prior = draw(argument((b,), optional=True, clean=clean))
        fetch_k = draw(st.one_of(st.none(), st.integers(0, 30)) if clean else st.one_of(st.none(), counts))
        lam = draw(st.one_of(st.none(), st.floats(0, 1)) if clean else st.one_of(st.none(), st.floats(0, 1), junk))
        dispersion = draw(st.floats(0, 0.5) if clean else st.one_of(st.floats(0, 0.5), st.floats(allow_nan=True), junk))
        with_dreams = draw(st.booleans())
        alive = live_ids(pool)
        hits, error = attempt(
            pool,
            lambda: pool.retrieve(
                queries,
                k=k,
                mode=mode,
                class_hint=class_hint,
                classes=classes,
                category=category,
                utility_threshold=threshold,
                utility_prior=prior,
                fetch_k=fetch_k,
                mmr_lambda=lam,
                min_dispersion=dispersion,
                with_dreams=with_dreams,
            ),
        )
        assert error is None or not clean, error
        if error is not None:
            return
        mode_ = (pool.config.default_mode if mode is None else RetrievalMode.parse(mode)).value
        k_ = pool.config.retrieval_limit if k is None else int(k)
        rows = torch.as_tensor(queries).shape[0]
        width = expected_width(k_, mode_, classes)
        assert hits.ids.shape == hits.scores.shape == (rows, width)
        assert hits.ids.dtype == torch.int64 and hits.scores.dtype == torch.float32
        present = hits.ids >= 0
        assert torch.equal(present, torch.isfinite(hits.scores))  # padding is (-1, -inf) together
        assert set(hits.ids[present].tolist()) <= alive
        repeats = mode_ == "balanced" and len(set(classes)) < len(classes)  # a class asked twice answers twice
        for row in hits.ids.tolist():
            got = [i for i in row if i >= 0]
            assert len(set(got)) == len(got) or repeats
        if mode_ in ORDERED_MODES:
            s = hits.scores.nan_to_num(neginf=-1e9)
            assert bool((s[:, :-1] >= s[:, 1:]).all())
        if with_dreams:
            assert hits.dreams.shape == (rows, width, *SHAPE, 3)
        else:
            assert hits.dreams is None
