"""Bad input, fuzzed (tests/_fuzz.py): PoolConfig from dicts and files."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import yaml
from _fuzz import (
    check_config,
    config_dicts,
    junk,
    valid_configs,
    yaml_dicts,
)
from hypothesis import event, given
from hypothesis import strategies as st

from dreampool_gpu import PoolConfig
from dreampool_gpu.errors import DreamPoolError


@pytest.fixture(scope="module")
def scratch():
    root = tempfile.mkdtemp(prefix="dreampool-fuzz-scratch-")
    yield root
    shutil.rmtree(root, ignore_errors=True)


class TestFuzzConfig:
    @given(values=valid_configs | config_dicts | junk)
    def test_from_dict(self, values):
        try:
            cfg = PoolConfig.from_dict(values)
        except DreamPoolError as exc:
            event(f"rejected: {type(exc).__name__}")
            return
        event("accepted")
        check_config(cfg)

    @given(
        content=st.one_of(
            valid_configs.map(lambda d: yaml.safe_dump(d).encode()),
            yaml_dicts.map(lambda d: yaml.safe_dump(d).encode()),
            st.text(max_size=60).map(str.encode),
            st.binary(max_size=60),
            st.sampled_from(
                [
                    b"capacity: [",
                    b"- 1\n- 2",
                    b"!!python/object:os.system {}",
                    b"\xff\xfe",
                    b"{a: *b}",
                    b"capacity: 1e999",
                    b"dream_shape: !!binary aGVsbG8=",
                    b"&a [*a]",
                    b"[" * 3000 + b"]" * 3000,
                    b"capacity: " + b"9" * 5000,
                ]
            ),
        )
    )
    def test_from_file(self, content, scratch):
        path = os.path.join(scratch, "config.yaml")
        with open(path, "wb") as f:
            f.write(content)
        try:
            cfg = PoolConfig.from_file(path)
        except DreamPoolError as exc:
            event(f"rejected: {type(exc).__name__}")
            return
        event("accepted")
        check_config(cfg)

    @pytest.mark.parametrize("path", ["<scratch>", "missing.yaml", None, 3, ["a"]])
    def test_from_file_not_a_file(self, scratch, path):
        where = scratch if path == "<scratch>" else os.path.join(scratch, path) if isinstance(path, str) else path
        with pytest.raises(DreamPoolError, match="<file>"):
            PoolConfig.from_file(where)
