from __future__ import annotations

import colorsys
import math

import numpy as np
import pytest
import torch

from dreampool_gpu.dreams import (
    CLASS_NAMES,
    CLASS_RGB,
    NUM_CLASSES,
    _hue_to_category,
    chroma_signature,
    hue_category,
    hue_radians,
    synthetic_dreams,
    validate_dreams,
)
from dreampool_gpu.errors import DimensionMismatchError, InvalidInputError


def _random_dreams(n: int, shape: tuple[int, int, int], device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, *shape, 3), generator=g).to(device)


class TestClasses:
    def test_constants(self):
        assert NUM_CLASSES == 10
        assert len(CLASS_NAMES) == NUM_CLASSES
        rgb = torch.tensor(CLASS_RGB)
        assert rgb.shape == (NUM_CLASSES, 3)
        assert CLASS_RGB[CLASS_NAMES.index("orange")] == (1.0, 0.5, 0.0)
        assert CLASS_RGB[CLASS_NAMES.index("purple")] == (0.5, 0.0, 0.5)
        assert CLASS_RGB[CLASS_NAMES.index("black")] == (0.0, 0.0, 0.0)


class TestValidateDreams:
    def test_accepts_valid_tensor_unchanged(self, device):
        x = _random_dreams(4, (3, 5, 2), device)
        out = validate_dreams(x, dream_shape=(3, 5, 2))
        assert out is x

    def test_accepts_numpy_and_empty_batch(self):
        arr = np.random.default_rng(0).random((2, 2, 2, 1, 3))
        out = validate_dreams(arr)
        assert isinstance(out, torch.Tensor)
        assert out.dtype == torch.float64
        np.testing.assert_array_equal(out.numpy(), arr)
        assert validate_dreams(torch.zeros(0, 4, 4, 2, 3)).shape == (0, 4, 4, 2, 3)

    def test_keeps_half_precision(self, device):
        x = _random_dreams(2, (2, 2, 1), device).half()
        assert validate_dreams(x).dtype == torch.float16

    @pytest.mark.parametrize(
        ("value", "pattern"),
        [
            (float("nan"), "finite"),
            (float("inf"), "finite"),
            (-float("inf"), "finite"),
            (-0.01, r"\[0\.0, 1\.0\]"),
            (1.01, r"\[0\.0, 1\.0\]"),
        ],
    )
    def test_rejects_bad_values_without_mutating(self, device, value, pattern):
        x = _random_dreams(3, (2, 3, 2), device)
        x[1, 0, 2, 1, 2] = value
        before = x.clone()
        with pytest.raises(InvalidInputError, match=pattern):
            validate_dreams(x)
        torch.testing.assert_close(x, before, equal_nan=True)

    def test_rejects_integer_dtype(self):
        with pytest.raises(InvalidInputError, match="floating-point"):
            validate_dreams(torch.zeros(1, 2, 2, 1, 3, dtype=torch.int64))

    @pytest.mark.parametrize("shape", [(2, 2, 1, 3), (1, 2, 2, 1, 1, 3), (3,)])
    def test_rejects_wrong_ndim(self, shape):
        with pytest.raises(DimensionMismatchError, match="dreams: expected shape"):
            validate_dreams(torch.zeros(shape))

    def test_rejects_wrong_trailing_dim(self):
        with pytest.raises(DimensionMismatchError, match=r"got \[1, 2, 2, 1, 4\]"):
            validate_dreams(torch.zeros(1, 2, 2, 1, 4))

    def test_rejects_empty_spatial_dim(self):
        with pytest.raises(DimensionMismatchError, match="R>=1"):
            validate_dreams(torch.zeros(1, 0, 2, 1, 3))

    def test_rejects_wrong_dream_shape(self):
        x = torch.zeros(2, 4, 4, 2, 3)
        with pytest.raises(DimensionMismatchError, match=r"expected shape \[\*, 4, 4, 3, 3\]"):
            validate_dreams(x, dream_shape=(4, 4, 3))

    def test_custom_name_in_message(self):
        with pytest.raises(InvalidInputError, match="invalid query"):
            validate_dreams(torch.full((1, 1, 1, 1, 3), 2.0), name="query")


class TestChroma:
    def test_matches_plain_mean(self, device):
        x = _random_dreams(5, (3, 4, 2), device)
        out = chroma_signature(x)
        assert out.shape == (5, 3)
        assert out.dtype == torch.float32
        assert out.device.type == device.type
        expected = x.cpu().double().reshape(5, -1, 3).mean(dim=1).float()
        torch.testing.assert_close(out.cpu(), expected)

    def test_half_input_accumulates_in_float32(self, device):
        x = torch.full((2, 32, 32, 8, 3), 0.3, device=device).half()
        out = chroma_signature(x)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.cpu(), torch.full((2, 3), float(x[0, 0, 0, 0, 0])))

    def test_empty_batch(self):
        assert chroma_signature(torch.zeros(0, 2, 2, 1, 3)).shape == (0, 3)


class TestHueRadians:
    def test_matches_colorsys(self, device):
        rng = np.random.default_rng(1)
        rgb = rng.random((500, 3)).astype(np.float32)
        out = hue_radians(torch.from_numpy(rgb).to(device)).cpu().numpy()
        expected = np.array([colorsys.rgb_to_hsv(*map(float, c))[0] * 2 * math.pi for c in rgb])
        assert out.dtype == np.float32
        # compare on the circle: 359.99° and 0.01° are neighbours
        diff = np.abs(out - expected)
        np.testing.assert_allclose(np.minimum(diff, 2 * math.pi - diff), 0.0, atol=1e-4)

    def test_range_and_greys(self, device):
        rgb = torch.tensor(
            [[0.5, 0.5, 0.5], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 1e-7], [1.0, 0.0, 0.0]],
            device=device,
        )
        out = hue_radians(rgb).cpu()
        assert out[:3].eq(0).all()
        assert bool(((out >= 0) & (out < 2 * math.pi)).all())
        assert out[4] == 0

    def test_primary_hues(self):
        rgb = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
        torch.testing.assert_close(hue_radians(rgb), torch.tensor([2 * math.pi / 3, 4 * math.pi / 3, math.pi / 3]))

    def test_batched_shape(self):
        assert hue_radians(torch.rand(2, 3, 4, 3)).shape == (2, 3, 4)

    def test_rejects_bad_trailing_dim(self):
        with pytest.raises(DimensionMismatchError, match="rgb"):
            hue_radians(torch.rand(4, 2))


class TestHueCategory:
    def test_known_cases(self):
        hues = torch.tensor([0.0, 2.25 * 2 * math.pi, 0.25 * 2 * math.pi, 2 * math.pi - 1e-6])
        assert _hue_to_category(hues).tolist() == [0, 3, 3, 0]

    def test_greys_are_zero(self, device):
        chroma = torch.tensor([[0.5, 0.5, 0.5], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], device=device)
        out = hue_category(chroma)
        assert out.dtype == torch.int64
        assert out.device.type == device.type
        assert out.tolist() == [0, 0, 0]

    def test_every_sector_spans_30_degrees(self):
        offsets = torch.linspace(-14.9, 14.9, 41)
        for i in range(12):
            hues = torch.deg2rad(30.0 * i + offsets)
            assert _hue_to_category(hues).eq(i).all(), i

    def test_from_rgb(self, device):
        # red, yellow, green, cyan, blue, magenta sit on centres 0, 2, 4, 6, 8, 10
        chroma = torch.tensor([CLASS_RGB[i] for i in (0, 3, 1, 4, 2, 5)], device=device)
        assert hue_category(chroma).tolist() == [0, 2, 4, 6, 8, 10]
        # a red leaning to magenta by 10° stays in category 0 (the original gave 11)
        leaning = torch.tensor([[1.0, 0.0, 10.0 / 60.0]], device=device)
        assert hue_category(leaning).tolist() == [0]

    def test_category_counts_are_uniform_over_hues(self):
        hues = torch.arange(0, 360, 0.5, dtype=torch.float64)
        counts = torch.bincount(_hue_to_category(torch.deg2rad(hues)), minlength=12)
        assert counts.tolist() == [60] * 12


class TestSyntheticDreams:
    def test_shape_range_labels(self, device):
        g = torch.Generator().manual_seed(3)
        dreams, labels = synthetic_dreams(50, (4, 5, 2), generator=g, device=device)
        assert dreams.shape == (50, 4, 5, 2, 3)
        assert dreams.dtype == torch.float32
        assert labels.dtype == torch.int64
        assert dreams.device.type == device.type
        assert labels.device.type == device.type
        assert float(dreams.min()) >= 0.0 and float(dreams.max()) <= 1.0
        assert bool(((labels >= 0) & (labels < NUM_CLASSES)).all())
        colours = torch.tensor(CLASS_RGB, device=device)[labels]
        deviation = (dreams - colours[:, None, None, None, :]).abs()
        assert float(deviation.max()) <= 0.1 + 1e-6
        validate_dreams(dreams, dream_shape=(4, 5, 2))

    def test_classes_subset_and_zero_noise(self):
        dreams, labels = synthetic_dreams(40, (2, 2, 1), classes=[2, 7], noise=0.0)
        assert set(labels.tolist()) <= {2, 7}
        expected = torch.tensor(CLASS_RGB)[labels][:, None, None, None, :].expand_as(dreams)
        torch.testing.assert_close(dreams, expected)

    def test_seeded_is_reproducible(self):
        a = synthetic_dreams(8, (3, 3, 1), generator=torch.Generator().manual_seed(7))
        b = synthetic_dreams(8, (3, 3, 1), generator=torch.Generator().manual_seed(7))
        torch.testing.assert_close(a[0], b[0])
        assert a[1].tolist() == b[1].tolist()

    def test_noise_is_spread(self):
        g = torch.Generator().manual_seed(0)
        dreams, labels = synthetic_dreams(20, (8, 8, 2), classes=[7], generator=g)
        assert labels.eq(7).all()
        # purple (0.5, 0, 0.5): red channel is unclamped uniform on [0.4, 0.6]
        red = dreams[..., 0]
        assert 0.4 <= float(red.min()) < 0.41 and 0.59 < float(red.max()) <= 0.6
        assert abs(float(red.mean()) - 0.5) < 0.01

    def test_empty(self):
        dreams, labels = synthetic_dreams(0)
        assert dreams.shape == (0, 16, 16, 4, 3)
        assert labels.shape == (0,)

    @pytest.mark.parametrize(
        ("kwargs", "pattern"),
        [
            ({"n": -1}, "n"),
            ({"n": 2, "dream_shape": (2, 0, 1)}, "dream_shape"),
            ({"n": 2, "dream_shape": (2, 2)}, "dream_shape"),
            ({"n": 2, "classes": [3, 10]}, "classes"),
            ({"n": 2, "classes": []}, "classes"),
            ({"n": 2, "classes": [0.5]}, "classes"),
            ({"n": 2, "noise": -0.1}, "noise"),
            ({"n": 2, "noise": float("nan")}, "noise"),
        ],
    )
    def test_rejects_bad_arguments(self, kwargs, pattern):
        with pytest.raises(InvalidInputError, match=pattern):
            synthetic_dreams(**kwargs)
