"""Bad input, fuzzed (tests/_fuzz.py): state dicts and checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from _fuzz import (
    attempt,
    bits,
    check_bank,
    copy_state_dict,
    fresh_pool,
    junk,
    live_ids,
    mutate_state_dict,
    resign,
    saved_checkpoint,
    template,
    tree_digest,
)
from hypothesis import event, given
from hypothesis import strategies as st

from dreampool_gpu import DreamPool
from dreampool_gpu.errors import DreamPoolError
from dreampool_gpu.persist import MANIFEST


@pytest.fixture(scope="module")
def scratch():
    root = tempfile.mkdtemp(prefix="dreampool-fuzz-scratch-")
    yield root
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(os.path.dirname(saved_checkpoint()), ignore_errors=True)


class TestFuzzStateDict:
    @pytest.mark.filterwarnings("ignore::dreampool_gpu.persist.CheckpointRecoveryWarning")  # damaged index bytes
    @given(data=st.data())
    def test_load_state_dict(self, data):
        pool = fresh_pool()
        sd = copy_state_dict(template())
        mutate_state_dict(data.draw, sd)
        _, error = attempt(pool, lambda: pool.load_state_dict(sd))
        if error is not None:
            return
        check_bank(pool)
        mine = pool.state_dict()
        for name, t in mine["bank"].items():  # the pool now holds exactly what was given (dreams cast)
            assert torch.equal(bits(t), bits(sd["bank"][name].to(t.dtype))), name
        assert {k: mine["state"][k] for k in ("size", "next_id", "extent")} == {
            k: sd["state"][k] for k in ("size", "next_id", "extent")
        }


class TestFuzzCheckpoint:
    @given(data=st.data())
    def test_load_damaged(self, data, scratch):
        draw = data.draw
        ck = os.path.join(scratch, "ck")
        shutil.rmtree(ck, ignore_errors=True)
        shutil.copytree(saved_checkpoint(), ck)
        files = sorted(os.listdir(ck))
        for _ in range(draw(st.integers(1, 3))):
            name = draw(st.sampled_from(files + ["index.bin", "notes.txt"]))
            path = os.path.join(ck, name)
            data_ = Path(path).read_bytes() if os.path.exists(path) else b""
            how = draw(st.sampled_from(["flip", "truncate", "append", "delete", "replace", "json", "resign"]))
            if how == "flip" and data_:
                i = draw(st.integers(0, len(data_) - 1))
                data_ = data_[:i] + bytes([data_[i] ^ draw(st.integers(1, 255))]) + data_[i + 1 :]
            elif how == "truncate":
                data_ = data_[: draw(st.integers(0, max(0, len(data_) - 1)))]
            elif how == "append":
                data_ += draw(st.binary(min_size=1, max_size=16))
            elif how == "replace":
                data_ = draw(st.binary(max_size=64))
            elif how == "json":
                data_ = json.dumps(
                    draw(
                        st.one_of(
                            st.dictionaries(st.text(max_size=8), st.integers() | st.text()),
                            st.integers(),
                            st.lists(st.integers()),
                        )
                    )
                ).encode()
            if how == "delete":
                if os.path.exists(path):
                    os.remove(path)
                continue
            with open(path, "wb") as f:
                f.write(data_)
            if how == "resign" and name != MANIFEST and os.path.exists(os.path.join(ck, MANIFEST)):
                try:
                    resign(ck, name)
                except (ValueError, AttributeError, TypeError):  # the manifest itself was damaged before
                    pass
        before = tree_digest(scratch)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loaded = DreamPool.load(ck)
        except DreamPoolError as exc:
            event(f"rejected: {type(exc).__name__}")
            loaded = None
        else:
            event("accepted")
            check_bank(loaded)
        assert tree_digest(scratch) == before  # loading never writes

    @given(
        name=st.one_of(
            st.text(st.characters(blacklist_characters="/", blacklist_categories=("Cs",)), min_size=0, max_size=24),
            st.just("ck"),
            st.just(".."),
            st.just("."),
            st.just("file"),
        ),
        wrap=st.sampled_from(["str", "path", "bytes", "junk"]),
        junk_value=junk.filter(lambda x: not isinstance(x, str)),
    )  # a str would be a path relative to cwd
    def test_save_paths(self, name, wrap, junk_value, scratch):
        pool = fresh_pool()
        where = os.path.join(scratch, "save")
        os.makedirs(where, exist_ok=True)
        open(os.path.join(where, "file"), "w").close()
        full = os.path.join(where, name)
        path = {
            "str": full,
            "path": Path(full) if name else full,
            "bytes": full.encode("utf-8", "surrogatepass"),
            "junk": junk_value,
        }[wrap]
        _, error = attempt(pool, lambda: pool.save(path))
        if error is None:
            loaded = DreamPool.load(path)
            check_bank(loaded)
            assert live_ids(loaded) == live_ids(pool)
