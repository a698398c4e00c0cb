"""Benchmark fixtures: the device under test and a speed-up summary.

``DREAMPOOL_BENCH_DEVICE`` picks the device (default ``cpu``); asking for CUDA
where it is absent fails the benchmark instead of silently measuring the CPU.
"""

from __future__ import annotations

import os

import pytest
import torch

from dreampool_gpu.devices import resolve_device
from dreampool_gpu.errors import DeviceUnavailableError, InvalidConfigurationError

_MEDIANS = pytest.StashKey[dict[str, dict[str, float]]]()


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    """The device named by ``DREAMPOOL_BENCH_DEVICE`` (default ``cpu``)."""
    spec = os.environ.get("DREAMPOOL_BENCH_DEVICE", "cpu")
    try:
        return resolve_device(spec)
    except (DeviceUnavailableError, InvalidConfigurationError) as exc:
        pytest.fail(f"DREAMPOOL_BENCH_DEVICE={spec!r} cannot be used: {exc}", pytrace=False)


@pytest.fixture
def record_median(request):
    """Store a finished benchmark's median under ``(group, role)`` for the summary.

    Roles ``"baseline"`` and ``"batched"`` of one group are printed as a ratio. The
    role also lands in the JSON (``extra_info["role"]``), where ``benchmarks/report.py``
    turns every non-baseline role into a cost ratio against its group's baseline.
    """

    def record(benchmark, role: str) -> None:
        benchmark.extra_info["role"] = role
        if benchmark.stats is None:  # --benchmark-disable: nothing was timed
            return
        medians = request.config.stash.setdefault(_MEDIANS, {})
        medians.setdefault(benchmark.group, {})[role] = benchmark.stats.stats.median

    return record


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    medians = config.stash.get(_MEDIANS, {})
    pairs = {g: m for g, m in medians.items() if {"baseline", "batched"} <= m.keys()}
    if not pairs:
        return
    terminalreporter.section("speed-up (median baseline / median batched)")
    for group, m in sorted(pairs.items()):
        terminalreporter.write_line(
            f"{group}: baseline {m['baseline'] * 1e3:.1f} ms, batched {m['batched'] * 1e3:.1f} ms, "
            f"speed-up {m['baseline'] / m['batched']:.1f}x"
        )
