"""FeatureEncoder and the Encoder protocol: feature layout (docs/spec.md §Encoders), layer norm."""

from __future__ import annotations

import pytest
import torch

from dreampool_gpu.encoders import Encoder, FeatureEncoder

FULL_WIDTH = 3 + 6 + 10 + 2


def batch(n: int = 5, seed: int = 0, device: torch.device | str = "cpu"):
    """Chroma ``[n, 3]`` and the other inputs as keyword args.

    spectral ``[n, 8]``, class_labels ``[n]`` (row 0 unknown, -1) and utility ``[n]``.
    """
    g = torch.Generator().manual_seed(seed)
    chroma = torch.rand(n, 3, generator=g)
    spectral = torch.cat([torch.rand(n, 1, generator=g), 100 * torch.rand(n, 4, generator=g),
                          torch.randint(0, 64, (n, 3), generator=g).float()], dim=1)
    labels = torch.randint(-1, 10, (n,), generator=g)
    labels[0] = -1
    rest = {"spectral": spectral, "class_labels": labels, "utility": torch.rand(n, generator=g)}
    return chroma.to(device), {name: t.to(device) for name, t in rest.items()}


def rows(inputs: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    return {name: t[i:i + 1] for name, t in inputs.items()}


class TestFeatureLayout:
    def test_full_layout_in_spec_order(self):
        chroma, inputs = batch()
        spectral, labels = inputs["spectral"], inputs["class_labels"]
        f = FeatureEncoder().features(chroma, **inputs)
        assert f.shape == (5, FULL_WIDTH) and f.dtype == torch.float32
        torch.testing.assert_close(f[:, 0:3], chroma)
        # spectral: entropy as is; band energies, mean PSD and mean dominant index as log1p
        torch.testing.assert_close(f[:, 3], spectral[:, 0])
        torch.testing.assert_close(f[:, 4:8], torch.log1p(spectral[:, 1:5]))
        torch.testing.assert_close(f[:, 8], torch.log1p(spectral[:, 5:8].mean(1)))
        for row, label in enumerate(labels.tolist()):
            expected = torch.full((10,), 0.1) if label < 0 else torch.eye(10)[label]
            torch.testing.assert_close(f[row, 9:19], expected)
        torch.testing.assert_close(f[:, 19], inputs["utility"])
        assert f[:, 20].tolist() == [0.5] * 5  # bias weight without a bias profile

    def test_query_defaults(self):
        chroma = torch.rand(4, 3)
        f = FeatureEncoder().features(chroma)
        assert torch.equal(f[:, 3:9], torch.zeros(4, 6))  # no spectral: zeros
        assert torch.equal(f[:, 9:19], torch.full((4, 10), 0.1))  # no class: 0.1 everywhere
        assert torch.equal(f[:, 19:21], torch.tensor([[0.0, 0.5]] * 4))  # no utility: 0, bias 0.5

    def test_nan_utility_is_zero(self):
        f = FeatureEncoder().features(torch.rand(2, 3), utility=torch.tensor([float("nan"), 0.7]))
        assert f[:, 19].tolist() == pytest.approx([0.0, 0.7])

    @pytest.mark.parametrize(
        ("parts", "width"),
        [({}, FULL_WIDTH), ({"include_spectral": False}, 15), ({"include_class": False}, 11),
         ({"include_utility": False}, 19),
         ({"include_spectral": False, "include_class": False, "include_utility": False}, 3)],
    )
    def test_parts_switched_off_change_the_width(self, parts, width):
        chroma, inputs = batch()
        encoder = FeatureEncoder(16, **parts)
        f = encoder.features(chroma, **inputs)
        assert encoder.feature_dim == f.shape[1] == width
        assert encoder.projection.shape == (width, 16)
        torch.testing.assert_close(f[:, :3], chroma)  # chroma always leads
        assert encoder.encode(chroma, **inputs).shape == (5, 16)

    def test_class_only_follows_chroma_when_spectral_is_off(self):
        encoder = FeatureEncoder(include_spectral=False)
        f = encoder.features(torch.rand(1, 3), class_labels=torch.tensor([4]))
        assert f[0, 3:13].tolist() == [0, 0, 0, 0, 1, 0, 0, 0, 0, 0]


class TestProjection:
    def test_same_seed_same_projection(self):
        assert torch.equal(FeatureEncoder(seed=3).projection, FeatureEncoder(seed=3).projection)

    def test_different_seed_different_projection(self):
        chroma = torch.rand(4, 3)
        a, b = FeatureEncoder(seed=0), FeatureEncoder(seed=1)
        assert not torch.allclose(a.projection, b.projection)
        assert not torch.allclose(a.encode(chroma), b.encode(chroma))

    @pytest.mark.parametrize("dim", [8, 21, 64])
    def test_projection_is_orthonormal(self, dim):
        p = FeatureEncoder(dim).projection.double()
        small = min(p.shape)
        gram = p @ p.T if dim >= FULL_WIDTH else p.T @ p  # orthonormal rows, or columns when D < F
        torch.testing.assert_close(gram, torch.eye(small, dtype=torch.float64), atol=1e-5, rtol=0)

    def test_same_encoder_on_every_device(self, device):
        chroma, inputs = batch()
        cpu = FeatureEncoder(seed=5).encode(chroma, **inputs)
        there = FeatureEncoder(seed=5, device=device)
        out = there.encode(chroma.to(device), **{name: t.to(device) for name, t in inputs.items()})
        assert out.device.type == device.type
        torch.testing.assert_close(out.cpu(), cpu, atol=1e-5, rtol=1e-5)


class TestEncode:
    def test_batched_equals_row_by_row(self, device):
        chroma, inputs = batch(7, device=device)
        encoder = FeatureEncoder(32, device=device)
        whole = encoder.encode(chroma, **inputs)
        single = torch.cat([encoder.encode(chroma[i:i + 1], **rows(inputs, i)) for i in range(7)])
        torch.testing.assert_close(whole, single, atol=1e-5, rtol=1e-5)

    def test_repeated_calls_are_identical(self):
        chroma, inputs = batch()
        encoder = FeatureEncoder()
        assert torch.equal(encoder.encode(chroma, **inputs), encoder.encode(chroma, **inputs))

    @pytest.mark.parametrize("dim", [8, 64, 128])
    def test_layer_norm_per_row(self, dim):
        chroma, inputs = batch(9)
        z = FeatureEncoder(dim).encode(chroma, **inputs)
        assert z.shape == (9, dim) and z.dtype == torch.float32
        torch.testing.assert_close(z.mean(1), torch.zeros(9), atol=1e-5, rtol=0)
        torch.testing.assert_close(z.var(1, unbiased=False), torch.ones(9), atol=1e-4, rtol=0)

    def test_encode_is_projection_then_layer_norm(self):
        chroma, inputs = batch()
        encoder = FeatureEncoder(16)
        raw = encoder.features(chroma, **inputs) @ encoder.projection
        var = raw.var(1, unbiased=False, keepdim=True)
        expected = (raw - raw.mean(1, keepdim=True)) / torch.sqrt(var + 1e-8)
        torch.testing.assert_close(encoder.encode(chroma, **inputs), expected)

    def test_every_part_moves_the_embedding(self):
        chroma, inputs = batch()
        encoder = FeatureEncoder()
        base = encoder.encode(chroma)
        assert not torch.allclose(encoder.encode(chroma, spectral=inputs["spectral"]), base)
        known = inputs["class_labels"].clamp(min=0)
        assert not torch.allclose(encoder.encode(chroma, class_labels=known), base)
        assert not torch.allclose(encoder.encode(chroma, utility=inputs["utility"]), base)


class TestProtocol:
    def test_feature_encoder_is_an_encoder(self):
        assert isinstance(FeatureEncoder(), Encoder)

    def test_user_encoder_satisfies_the_protocol(self):
        class Constant:
            dim = 4

            def encode(self, chroma, *, spectral=None, class_labels=None, utility=None):
                return torch.ones(chroma.shape[0], self.dim)

        class NoEncode:
            dim = 4

        assert isinstance(Constant(), Encoder)
        assert not isinstance(NoEncode(), Encoder)
