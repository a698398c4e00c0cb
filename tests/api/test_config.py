"""PoolConfig: shipped presets, field validation messages, unknown keys, dict/YAML round trips.

Budget fields are covered in test_budget.py::TestConfig, IVF/engine fields in
test_faiss_search.py::TestConfig and random dicts/files in test_fuzz.py::TestFuzzConfig;
this file covers the presets and the remaining fields.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from dreampool_gpu.config import EvictionPolicy, Metric, PoolConfig
from dreampool_gpu.errors import InvalidConfigurationError

PRESETS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_presets_found():
    assert {p.name for p in PRESETS} >= {"default.yaml", "cpu-small.yaml", "gpu-large.yaml"}


class TestPresets:
    @pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
    def test_loads_with_the_file_values(self, path):
        cfg = PoolConfig.from_file(path)
        as_dict = cfg.to_dict()
        for key, value in yaml.safe_load(path.read_text()).items():
            assert as_dict[key] == value, key  # every key in the file took effect

    @pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
    def test_round_trips_through_dict_and_yaml(self, path, tmp_path):
        cfg = PoolConfig.from_file(path)
        assert PoolConfig.from_dict(cfg.to_dict()) == cfg
        copy = tmp_path / "copy.yaml"
        copy.write_text(yaml.safe_dump(cfg.to_dict()))
        assert PoolConfig.from_file(copy) == cfg

    def test_default_preset_is_the_dataclass_default(self):
        defaults = PoolConfig.from_file(next(p for p in PRESETS if p.name == "default.yaml"))
        assert defaults == PoolConfig()


# field, bad value, text of the allowed range that the message must contain
INVALID = [
    ("dream_shape", (4, 4), "three positive ints"),
    ("dream_shape", (4, 0, 1), "three positive ints"),
    ("capacity", 0, "an int >= 1"),
    ("capacity", 2.5, "an int >= 1"),
    ("coherence_threshold", 1.5, "[0, 1]"),
    ("coherence_threshold", -0.1, "[0, 1]"),
    ("retrieval_limit", -1, "an int >= 0"),
    ("retrieval_mode", "fuzzy", "one of similar"),
    ("embedding_dim", 0, "an int >= 1"),
    ("embedding_dim", 3, "other than 3"),
    ("device", "gpu", '"cuda:N"'),
    ("metric", "manhattan", "one of cosine, euclidean"),
    ("dream_dtype", "int8", "one of auto, float32, float16, bfloat16"),
    ("eviction_policy", "random", "one of fifo"),
    ("query_cache_size", -1, "an int >= 0"),
    ("window", "blackman", "one of hann, hamming, none"),
    ("include_spectral", 1, "true or false"),
    ("encoder_seed", -1, "an int >= 0"),
    ("alpha", 1.1, "[0, 1]"),
    ("beta", -0.5, "[0, 1]"),
    ("gamma", True, "[0, 1]"),
    ("delta", "0.1", "[0, 1]"),
    ("mmr_lambda", 2, "[0, 1]"),
    ("fetch_factor", 0, "an int >= 1"),
    ("search_chunk_mb", 0, "a positive number of MiB"),
    ("rerank_chunk_mb", float("inf"), "a positive number of MiB"),
]


class TestValidation:
    @pytest.mark.parametrize(("field", "value", "allowed"), INVALID, ids=lambda x: str(x)[:20])
    def test_message_names_field_and_range(self, field, value, allowed):
        with pytest.raises(InvalidConfigurationError, match=re.escape(field)) as info:
            PoolConfig(**{field: value})
        assert info.value.field == field and allowed in info.value.expected
        assert allowed in str(info.value)
        assert isinstance(info.value, ValueError)

    @pytest.mark.parametrize(("field", "value", "allowed"), INVALID[:8], ids=lambda x: str(x)[:20])
    def test_from_dict_validates_too(self, field, value, allowed):
        with pytest.raises(InvalidConfigurationError, match=re.escape(allowed)):
            PoolConfig.from_dict({field: value})

    def test_replace_validates(self):
        with pytest.raises(InvalidConfigurationError, match="alpha"):
            PoolConfig().replace(alpha=3.0)

    @pytest.mark.parametrize("value", [0.0, 1.0, 0, 1])
    def test_unit_range_is_inclusive(self, value):
        assert PoolConfig(alpha=value, mmr_lambda=value, coherence_threshold=value).alpha == value

    def test_enum_fields_accept_strings(self):
        cfg = PoolConfig(metric="euclidean", eviction_policy="least_used", retrieval_mode="hard")
        assert cfg.metric is Metric.EUCLIDEAN and cfg.eviction_policy is EvictionPolicy.LEAST_USED
        assert cfg.to_dict()["metric"] == "euclidean"

    def test_frozen(self):
        with pytest.raises(dataclasses.FrozenInstanceError):
            PoolConfig().capacity = 5  # type: ignore[misc]


class TestUnknownKeys:
    def test_from_dict_rejects_unknown_keys(self):
        with pytest.raises(InvalidConfigurationError, match="max_sizee.*a known field") as info:
            PoolConfig.from_dict({"capacity": 10, "max_sizee": 10})
        assert info.value.field == "max_sizee"

    def test_from_file_rejects_unknown_keys(self, tmp_path):
        path = tmp_path / "typo.yaml"
        path.write_text("capacity: 10\nuse_hnsw: true\n")
        with pytest.raises(InvalidConfigurationError, match="use_hnsw"):
            PoolConfig.from_file(path)

    def test_empty_file_gives_defaults(self, tmp_path):
        path = tmp_path / "empty.yaml"
        path.write_text("# nothing set\n")
        assert PoolConfig.from_file(path) == PoolConfig()
