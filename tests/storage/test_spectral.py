from __future__ import annotations

import numpy as np
import pytest
import torch

from dreampool_gpu import spectral
from dreampool_gpu.dreams import synthetic_dreams
from dreampool_gpu.errors import DimensionMismatchError, InvalidInputError
from dreampool_gpu.spectral import (
    SPECTRAL_DIM,
    SPECTRAL_FEATURES,
    Window,
    _band_energies,
    _dominant_index,
    _normalised_entropy,
    spectral_features,
    window_vector,
)


def _np_window(n: int, window: str) -> np.ndarray:
    i = np.arange(n, dtype=np.float64)
    if window == "hann":
        return 0.5 - 0.5 * np.cos(2 * np.pi * i / n)
    if window == "hamming":
        return 0.54 - 0.46 * np.cos(2 * np.pi * i / n)
    return np.ones(n)


def _reference_features(dream: np.ndarray, window: str) -> np.ndarray:
    """One dream [R, C, L, 3] in float64, channel by channel."""
    rows, cols = dream.shape[:2]
    n = rows * cols
    w = np.outer(_np_window(rows, window), _np_window(cols, window))
    entropies, bands, totals, dominant = [], [], [], []
    for ch in range(3):
        image = dream[..., ch].astype(np.float64).mean(axis=2) * w
        psd = (np.abs(np.fft.fft2(image)) ** 2).ravel()
        total = psd.sum()
        entropy = 0.0
        if total >= 1e-10 and n > 1:
            p = psd / total
            p = p[p > 1e-10]
            entropy = float(-(p * np.log(p)).sum() / np.log(n))
        entropies.append(entropy)
        bands.append([psd[: n // 4].sum(), psd[n // 4 : 3 * n // 4].sum(), psd[3 * n // 4 :].sum()])
        totals.append(total)
        dominant.append(n - 1 - int(np.argmax(psd[::-1])))
    return np.array([np.mean(entropies), *np.mean(bands, axis=0), sum(totals) / (3 * n), *dominant])


class TestWindow:
    def test_parse(self):
        assert Window("hann") is Window.HANN
        assert Window("Hamming") is Window.HAMMING
        assert Window(Window.NONE) is Window.NONE

    def test_invalid_lists_valid_values(self):
        with pytest.raises(InvalidInputError, match=r"'hann', 'hamming', 'none'"):
            Window("blackman")
        with pytest.raises(InvalidInputError, match="window"):
            spectral_features(torch.rand(1, 2, 2, 1, 3), window="gauss")
        with pytest.raises(ValueError):
            window_vector(4, 3)

    @pytest.mark.parametrize("window", ["hann", "hamming", "none"])
    @pytest.mark.parametrize("n", [1, 2, 5, 16])
    def test_vector_matches_formula(self, device, window, n):
        out = window_vector(n, window, device=device)
        assert out.shape == (n,)
        assert out.dtype == torch.float32
        assert out.device.type == device.type
        np.testing.assert_allclose(out.cpu().numpy(), _np_window(n, window), atol=1e-6)

    def test_hann5_starts_at_zero(self):
        w = window_vector(5, Window.HANN)
        assert float(w[0]) == 0.0
        assert float(window_vector(5, "hamming")[0]) == pytest.approx(0.08)

    def test_dtype(self):
        assert window_vector(4, "hann", dtype=torch.float64).dtype == torch.float64


class TestHelpers:
    def test_bands_of_one_to_eight(self):
        psd = torch.arange(1.0, 9.0)
        assert _band_energies(psd).tolist() == [3.0, 18.0, 15.0]

    def test_bands_batched_and_tiny(self):
        psd = torch.arange(1.0, 9.0).repeat(2, 3, 1)
        assert _band_energies(psd).shape == (2, 3, 3)
        assert _band_energies(torch.tensor([5.0])).tolist() == [0.0, 0.0, 5.0]
        assert _band_energies(torch.tensor([1.0, 2.0])).tolist() == [0.0, 1.0, 2.0]

    def test_entropy_uniform_and_spike(self):
        psd = torch.stack((torch.ones(16), torch.eye(16)[3], torch.zeros(16)))
        out = _normalised_entropy(psd, psd.sum(-1))
        torch.testing.assert_close(out, torch.tensor([1.0, 0.0, 0.0]))

    def test_dominant_ties_go_last(self):
        psd = torch.tensor([[1.0, 5.0, 2.0, 5.0, 0.0], [0.0] * 5, [9.0, 1.0, 1.0, 1.0, 1.0]])
        assert _dominant_index(psd).tolist() == [3, 4, 0]


class TestSpectralFeatures:
    @pytest.mark.parametrize("window", ["hann", "hamming", "none"])
    @pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 2), (7, 4, 3), (8, 8, 2), (16, 16, 4), (5, 1, 2)])
    def test_matches_numpy_reference(self, device, window, shape):
        g = torch.Generator().manual_seed(sum(shape))
        dreams = torch.rand((5, *shape, 3), generator=g)
        out = spectral_features(dreams.to(device), window=window)
        assert out.shape == (5, SPECTRAL_DIM)
        assert out.dtype == torch.float32
        assert out.device.type == device.type
        ref = np.stack([_reference_features(d, window) for d in dreams.numpy()])
        got = out.cpu().double().numpy()
        np.testing.assert_allclose(got[:, 0], ref[:, 0], atol=1e-4)  # entropy
        scale = max(float(np.abs(ref[:, 1:5]).max()), 1e-6)
        np.testing.assert_allclose(got[:, 1:5], ref[:, 1:5], rtol=1e-4, atol=1e-5 * scale)
        np.testing.assert_array_equal(got[:, 5:], ref[:, 5:])

    def test_matches_reference_on_synthetic_classes(self, device):
        g = torch.Generator().manual_seed(0)
        dreams, _ = synthetic_dreams(20, (6, 9, 2), generator=g)
        got = spectral_features(dreams.to(device)).cpu().double().numpy()
        ref = np.stack([_reference_features(d, "hann") for d in dreams.numpy()])
        np.testing.assert_allclose(got[:, :5], ref[:, :5], rtol=1e-4, atol=1e-5)

    def test_feature_names(self):
        assert len(SPECTRAL_FEATURES) == SPECTRAL_DIM == 8
        assert SPECTRAL_FEATURES[0] == "entropy" and SPECTRAL_FEATURES[-1] == "dominant_b"

    def test_constant_dream_is_a_single_spike(self, device):
        dreams = torch.full((2, 4, 6, 2, 3), 0.5, device=device)
        out = spectral_features(dreams, window="none").cpu()
        n = 24
        dc = (0.5 * n) ** 2
        torch.testing.assert_close(out[:, 0], torch.zeros(2))  # entropy of a spike
        torch.testing.assert_close(out[:, 1], torch.full((2,), dc))  # all energy at DC -> low
        torch.testing.assert_close(out[:, 2:4], torch.zeros(2, 2))
        torch.testing.assert_close(out[:, 4], torch.full((2,), dc / n))
        assert out[:, 5:].eq(0).all()

    def test_zero_dream(self, device):
        out = spectral_features(torch.zeros(1, 3, 5, 2, 3, device=device)).cpu()
        assert out[0, :5].eq(0).all()
        assert out[0, 5:].tolist() == [14.0, 14.0, 14.0]

    def test_white_noise_has_high_entropy(self):
        g = torch.Generator().manual_seed(1)
        noise = torch.rand((4, 32, 32, 1, 3), generator=g) - 0.5  # raw values are accepted
        out = spectral_features(noise, window="none")
        assert float(out[:, 0].min()) > 0.85

    def test_single_pixel(self, device):
        dream = torch.tensor([0.2, 0.4, 0.6], device=device).reshape(1, 1, 1, 1, 3)
        hann = spectral_features(dream).cpu()
        assert hann.eq(0).all()  # periodic Hann(1) is [0]
        plain = spectral_features(dream, window="none").cpu()
        expected_high = (0.04 + 0.16 + 0.36) / 3
        torch.testing.assert_close(plain, torch.tensor([[0.0, 0.0, 0.0, expected_high, expected_high, 0.0, 0.0, 0.0]]))

    def test_empty_batch_and_half(self, device):
        assert spectral_features(torch.zeros(0, 4, 4, 2, 3, device=device)).shape == (0, 8)
        g = torch.Generator().manual_seed(9)
        dreams = torch.rand((3, 4, 4, 2, 3), generator=g).to(device)
        half = spectral_features(dreams.half())
        assert half.dtype == torch.float32
        full = spectral_features(dreams)
        torch.testing.assert_close(half[:, :5], full[:, :5], rtol=1e-2, atol=1e-2)

    def test_rejects_bad_input(self):
        with pytest.raises(DimensionMismatchError, match="dreams"):
            spectral_features(torch.rand(4, 4, 2, 3))
        with pytest.raises(InvalidInputError, match="floating-point"):
            spectral_features(torch.zeros(1, 2, 2, 1, 3, dtype=torch.uint8))
        bad = torch.rand(1, 2, 2, 2, 3)
        bad[0, 0, 1, 1, 2] = float("inf")
        with pytest.raises(InvalidInputError, match="finite"):
            spectral_features(bad)

    def test_chunks_that_do_not_divide_the_batch(self, device, monkeypatch):
        g = torch.Generator().manual_seed(12)
        dreams = torch.rand((17, 3, 4, 2, 3), generator=g).to(device)
        whole = spectral_features(dreams)
        # 3 * n * 5 PSD values per chunk -> chunks of 5 dreams (5, 5, 5, 2)
        monkeypatch.setattr(spectral, "_CHUNK_PSD_VALUES", {device.type: 3 * 12 * 5})
        torch.testing.assert_close(spectral_features(dreams), whole)
        monkeypatch.setattr(spectral, "_CHUNK_PSD_VALUES", {device.type: 1})
        torch.testing.assert_close(spectral_features(dreams), whole)

    def test_input_not_mutated(self):
        dreams = torch.rand(2, 4, 4, 2, 3)
        before = dreams.clone()
        spectral_features(dreams)
        torch.testing.assert_close(dreams, before)
