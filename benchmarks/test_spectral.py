"""Batched ``spectral_features`` vs a per-dream numpy loop, 10K dreams of 16x16x4.

The baseline is what a careful numpy user would write without batching: each
dream's three channels go through one ``np.fft.fft2`` call and vectorised
reductions; only the loop over dreams is Python. Both compute the same eight
features (checked before timing).

    pytest benchmarks/test_spectral.py --benchmark-only
    DREAMPOOL_BENCH_DEVICE=cuda pytest benchmarks/test_spectral.py --benchmark-only
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dreampool_gpu.dreams import synthetic_dreams
from dreampool_gpu.spectral import SPECTRAL_DIM, spectral_features

N_DREAMS = 10_000
DREAM_SHAPE = (16, 16, 4)
ROUNDS = 5
GROUP = "spectral-10k-16x16x4"


def _hann(n: int) -> np.ndarray:
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)).astype(np.float32)


def _numpy_features(dream: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Eight spectral features of one dream ``[R, C, L, 3]`` (float32 numpy)."""
    rows, cols = dream.shape[:2]
    n = rows * cols
    image = dream.mean(axis=2) * window[:, :, None]  # [R, C, 3]
    spectrum = np.fft.fft2(image, axes=(0, 1))
    psd = (spectrum.real**2 + spectrum.imag**2).reshape(n, 3)  # row-major flat index
    total = psd.sum(axis=0)
    live = total >= 1e-10
    p = psd / np.where(live, total, 1.0)
    keep = p > 1e-10
    terms = np.where(keep, p * np.log(np.where(keep, p, 1.0)), 0.0)
    entropy = np.where(live, -terms.sum(axis=0) / np.log(n), 0.0)
    q1, q3 = n // 4, 3 * n // 4
    bands = np.array([psd[:q1].sum(), psd[q1:q3].sum(), psd[q3:].sum()]) / 3.0
    dominant = (n - 1) - np.argmax(psd[::-1], axis=0)
    return np.concatenate(([entropy.mean()], bands, [total.sum() / (3 * n)], dominant))


def _numpy_loop(dreams: np.ndarray) -> np.ndarray:
    rows, cols = dreams.shape[1:3]
    window = np.outer(_hann(rows), _hann(cols))
    out = np.empty((len(dreams), SPECTRAL_DIM), dtype=np.float64)
    for i, dream in enumerate(dreams):
        out[i] = _numpy_features(dream, window)
    return out


@pytest.fixture(scope="module")
def dreams_cpu() -> torch.Tensor:
    dreams, _ = synthetic_dreams(N_DREAMS, DREAM_SHAPE, generator=torch.Generator().manual_seed(0))
    return dreams


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def test_same_features(dreams_cpu):
    sample = dreams_cpu[:200]
    got = spectral_features(sample).double().numpy()
    want = _numpy_loop(sample.numpy())
    np.testing.assert_allclose(got[:, :5], want[:, :5], rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(got[:, 5:], want[:, 5:])


@pytest.mark.benchmark(group=GROUP)
def test_numpy_per_dream_loop(benchmark, dreams_cpu, record_median):
    dreams = dreams_cpu.numpy()
    out = benchmark.pedantic(_numpy_loop, args=(dreams,), rounds=ROUNDS, iterations=1)
    assert out.shape == (N_DREAMS, SPECTRAL_DIM)
    record_median(benchmark, "baseline")


@pytest.mark.benchmark(group=GROUP)
def test_batched_torch(benchmark, dreams_cpu, bench_device, record_median):
    dreams = dreams_cpu.to(bench_device)

    def run() -> torch.Tensor:
        out = spectral_features(dreams)
        _synchronize(bench_device)
        return out

    out = benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    assert out.shape == (N_DREAMS, SPECTRAL_DIM)
    assert out.device == bench_device
    benchmark.extra_info["device"] = str(bench_device)
    benchmark.extra_info["torch_threads"] = torch.get_num_threads()
    if bench_device.type == "cuda":
        benchmark.extra_info["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(bench_device)
    record_median(benchmark, "batched")
