from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dreampool_gpu.dreams import synthetic_dreams
from dreampool_gpu.errors import DimensionMismatchError, InvalidInputError
from dreampool_gpu.solver import SolverScores, score_dreams


def _hue_degrees(r: float, g: float, b: float) -> float:
    hi, lo = max(r, g, b), min(r, g, b)
    delta = hi - lo
    if delta < 1e-6:
        return 0.0
    if abs(r - hi) < 1e-6:
        h = 60.0 * math.fmod((g - b) / delta, 6.0)
    elif abs(g - hi) < 1e-6:
        h = 60.0 * ((b - r) / delta + 2.0)
    else:
        h = 60.0 * ((r - g) / delta + 4.0)
    return h + 360.0 if h < 0 else h


def _saturation(r: float, g: float, b: float) -> float:
    hi, lo = max(r, g, b), min(r, g, b)
    return 0.0 if hi < 1e-6 else (hi - lo) / hi


def _reference_scores(dream: np.ndarray) -> tuple[float, float, float]:
    """One dream [R, C, L, 3], cell by cell, in float64 (circular mean hue)."""
    rows, cols, layers, _ = dream.shape
    cells = rows * cols * layers
    tv = 0.0
    jumps = 0
    sat_penalty = 0.0
    over_sat = 0.0
    out_of_gamut = 0
    total = [0.0, 0.0, 0.0]
    hues = []
    for r in range(rows):
        for c in range(cols):
            for layer in range(layers):
                px = [float(v) for v in dream[r, c, layer]]
                for k in range(3):
                    total[k] += px[k]
                s = _saturation(*px)
                sat_penalty += (s - 0.5) ** 2
                if s > 0.95:
                    over_sat += s - 0.95
                if any(v < 0.0 or v > 1.0 for v in px):
                    out_of_gamut += 1
                hues.append(_hue_degrees(*px))
                for dr, dc in ((1, 0), (0, 1)):
                    if r + dr < rows and c + dc < cols:
                        other = dream[r + dr, c + dc, layer]
                        d = math.sqrt(sum((px[k] - float(other[k])) ** 2 for k in range(3)))
                        tv += d
                        if d > 0.3:
                            jumps += 1
    energy = tv + 0.1 * sat_penalty / cells
    mean = [t / cells for t in total]
    balance = 1.0 - sum(abs(m - 0.5) for m in mean) / 1.5
    s = sum(math.sin(math.radians(h)) for h in hues) / cells
    co = sum(math.cos(math.radians(h)) for h in hues) / cells
    centre = 0.0 if abs(s) < 1e-6 and abs(co) < 1e-6 else math.degrees(math.atan2(s, co))
    sq = 0.0
    for h in hues:
        d = abs(h - centre) % 360.0
        sq += min(d, 360.0 - d) ** 2
    hue_std = math.sqrt(sq / cells)
    coherence = 0.6 * balance + 0.4 * (1.0 - min(hue_std / 180.0, 1.0))
    violation = min(1.0, (out_of_gamut + over_sat + 0.5 * jumps) / cells)
    return coherence, energy, violation


def _check_against_reference(dreams: torch.Tensor, scores: SolverScores) -> None:
    ref = np.array([_reference_scores(d) for d in dreams.cpu().numpy()]).reshape(-1, 3)
    for i, name in enumerate(("coherence", "energy", "violation")):
        got = getattr(scores, name).cpu().double().numpy()
        np.testing.assert_allclose(got, ref[:, i], rtol=1e-4, atol=1e-6, err_msg=name)


class TestScoreDreams:
    @pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 2), (4, 4, 3), (2, 7, 1), (6, 1, 2)])
    def test_matches_cell_loop_random(self, device, shape):
        g = torch.Generator().manual_seed(sum(shape))
        dreams = torch.rand((6, *shape, 3), generator=g)
        scores = score_dreams(dreams.to(device))
        for field in scores:
            assert field.shape == (6,)
            assert field.dtype == torch.float32
            assert field.device.type == device.type
        _check_against_reference(dreams, scores)

    def test_matches_cell_loop_synthetic(self, device):
        g = torch.Generator().manual_seed(11)
        dreams, _ = synthetic_dreams(10, (4, 3, 2), generator=g)
        _check_against_reference(dreams, score_dreams(dreams.to(device)))

    def test_matches_cell_loop_out_of_gamut(self):
        g = torch.Generator().manual_seed(5)
        dreams = torch.rand((4, 3, 3, 2, 3), generator=g) * 1.6 - 0.3
        scores = score_dreams(dreams)
        assert float(scores.violation.max()) > 0.1
        _check_against_reference(dreams, scores)

    def test_ranges(self, device):
        g = torch.Generator().manual_seed(2)
        scores = score_dreams(torch.rand((20, 4, 4, 2, 3), generator=g).to(device))
        assert bool(((scores.coherence >= 0) & (scores.coherence <= 1)).all())
        assert bool((scores.energy >= 0).all())
        assert bool(((scores.violation >= 0) & (scores.violation <= 1)).all())

    def test_grey_mean_gives_full_balance(self, device):
        grey = torch.full((1, 3, 3, 2, 3), 0.5, device=device)
        scores = score_dreams(grey)
        # balance 1, all hues 0 -> hue consistency 1, flat -> energy 0.1 * 0.25
        torch.testing.assert_close(scores.coherence.cpu(), torch.tensor([1.0]))
        torch.testing.assert_close(scores.energy.cpu(), torch.tensor([0.025]))
        torch.testing.assert_close(scores.violation.cpu(), torch.tensor([0.0]))

    def test_hues_across_zero_are_consistent(self, device):
        # alternating cells at hue 355° and 5°, same saturation/value
        h355 = (1.0, 0.0, 5.0 / 60.0)
        h5 = (1.0, 5.0 / 60.0, 0.0)
        cells = torch.tensor([h355, h5] * 8).reshape(1, 4, 4, 1, 3).to(device)
        scores = score_dreams(cells)
        mean_rgb = cells.reshape(-1, 3).mean(0).cpu()
        balance = 1.0 - float((mean_rgb - 0.5).abs().sum()) / 1.5
        hue_consistency = (float(scores.coherence[0]) - 0.6 * balance) / 0.4
        assert hue_consistency == pytest.approx(1.0 - 5.0 / 180.0, abs=1e-4)
        assert hue_consistency > 0.97

    def test_noisy_red_is_near_original_figure(self):
        g = torch.Generator().manual_seed(0)
        dreams, _ = synthetic_dreams(20, classes=[0], generator=g)
        mean_coherence = float(score_dreams(dreams).coherence.mean())
        # the original's arithmetic mean gave ~0.14; the circular mean lifts hue consistency
        assert 0.1 < mean_coherence < 0.6

    def test_half_precision_and_empty(self, device):
        g = torch.Generator().manual_seed(4)
        dreams = torch.rand((3, 2, 3, 2, 3), generator=g).to(device)
        full = score_dreams(dreams)
        half = score_dreams(dreams.half())
        assert half.energy.dtype == torch.float32
        torch.testing.assert_close(half.energy, full.energy, rtol=5e-3, atol=5e-3)
        empty = score_dreams(torch.zeros(0, 2, 2, 1, 3, device=device))
        assert all(f.shape == (0,) for f in empty)

    def test_input_not_mutated(self):
        dreams = torch.rand(2, 3, 3, 1, 3) * 2 - 0.5
        before = dreams.clone()
        score_dreams(dreams)
        torch.testing.assert_close(dreams, before)

    def test_rejects_bad_input(self):
        with pytest.raises(DimensionMismatchError, match="dreams"):
            score_dreams(torch.rand(3, 3, 1, 3))
        with pytest.raises(InvalidInputError, match="floating-point"):
            score_dreams(torch.ones(1, 2, 2, 1, 3, dtype=torch.int32))
        nan = torch.rand(1, 2, 2, 1, 3)
        nan[0, 1, 1, 0, 1] = float("nan")
        with pytest.raises(InvalidInputError, match="finite"):
            score_dreams(nan)
