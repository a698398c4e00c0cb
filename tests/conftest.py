"""Shared fixtures: device parametrisation, RNG restore, GPU skips in one place."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from dreampool_gpu.devices import cuda_available, faiss_gpu_available

DEVICES = ["cpu"] + (["cuda"] if cuda_available() else [])

try:  # the test extra installs it; a GPU image may lack it (scripts/gpu_check.sh then runs the rest)
    from hypothesis import HealthCheck, settings
except ImportError:
    settings = None
if settings is not None:
    # Hypothesis: "ci" (default) runs >= 1,000 examples per fuzzed entry point, "nightly" 10,000,
    # "dev" 100 for quick local runs; pick one with HYPOTHESIS_PROFILE.
    _FUZZ = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}
    settings.register_profile("ci", max_examples=1_000, **_FUZZ)
    settings.register_profile("nightly", max_examples=10_000, **_FUZZ)
    settings.register_profile("dev", max_examples=100, **_FUZZ)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    probes = {"gpu": cuda_available(), "faiss_gpu": faiss_gpu_available()}
    for item in items:
        for name, ok in probes.items():
            if name in item.keywords and not ok:
                item.add_marker(pytest.mark.skip(reason=f"{name} unavailable"))


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Every available device: cpu, plus cuda when present."""
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _restore_rng():
    torch_state = torch.get_rng_state()
    np_state = np.random.get_state()  # noqa: NPY002 - saving the legacy global state is the point
    py_state = random.getstate()
    yield
    torch.set_rng_state(torch_state)
    np.random.set_state(np_state)  # noqa: NPY002
    random.setstate(py_state)
