"""FeatureEncoder and the Encoder protocol: blocks, standardisation, labels that never hurt (docs/spec.md)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dreampool_gpu.encoders import Encoder, FeatureEncoder
from dreampool_gpu.learned import LearnedEncoder, ModuleEncoder


def features(n: int = 6, seed: int = 0):
    """chroma ``[n, 3]`` and spectral ``[n, 8]`` with realistic magnitudes."""
    g = torch.Generator().manual_seed(seed)
    chroma = torch.rand(n, 3, generator=g)
    spectral = torch.cat(
        [
            torch.rand(n, 1, generator=g),
            100 * torch.rand(n, 4, generator=g),
            torch.randint(0, 64, (n, 3), generator=g).float(),
        ],
        dim=1,
    )
    return chroma, spectral


def fitted(n: int = 200, **kwargs) -> FeatureEncoder:
    encoder = FeatureEncoder(**kwargs)
    chroma, spectral = features(n, seed=9)
    encoder.fit_statistics(chroma, spectral, fitted_on=n)
    return encoder


def unlabelled(n: int) -> torch.Tensor:
    return torch.full((n,), -1)


class TestBlocks:
    def test_width_and_block_order(self):
        enc = FeatureEncoder(num_classes=12)
        assert enc.feature_dim == 3 + 6 + 13 + 2
        chroma, spectral = features()
        f = enc.features(chroma, spectral=spectral, class_labels=torch.tensor([0, 11, -1, 3, -1, 5]), entries=True)
        assert f.shape == (6, enc.feature_dim)
        torch.testing.assert_close(f[:, :9].norm(dim=1), torch.ones(6))  # content: unit length
        cls = f[:, 9:22]
        assert cls[0, 0] == cls[1, 11] == cls[2, 12] == 0.5  # labelled: own slot; unlabelled: "unknown" slot
        torch.testing.assert_close(cls.norm(dim=1), torch.full((6,), 0.5))  # every entry: the same norm

    def test_queries_without_hint_have_no_class_block(self):
        enc = fitted()
        chroma, spectral = features()
        hints = torch.tensor([-1, 2, -1, 7, -1, -1])
        f = enc.features(chroma, spectral=spectral, class_labels=hints, entries=False)
        cls = f[:, 9:20]
        assert torch.equal(cls[hints < 0], torch.zeros(4, 11))
        assert cls[1, 2] == cls[3, 7] == 0.5

    @pytest.mark.parametrize(
        ("parts", "width"),
        [
            ({}, 22),
            ({"include_spectral": False}, 16),
            ({"include_class": False}, 11),
            ({"include_utility": False}, 20),
            ({"include_spectral": False, "include_class": False, "include_utility": False}, 3),
        ],
    )
    def test_parts_switched_off_change_the_width(self, parts, width):
        chroma, spectral = features()
        encoder = FeatureEncoder(16, **parts)
        f = encoder.features(chroma, spectral=spectral, class_labels=unlabelled(6), entries=True)
        assert encoder.feature_dim == f.shape[1] == width
        assert encoder.projection.shape == (width, 16)
        z = encoder.encode_entries(torch.empty(0), chroma=chroma, spectral=spectral, class_labels=unlabelled(6))
        assert z.shape == (6, 16)

    def test_projection_keeps_inner_products(self):
        enc = fitted()
        chroma, spectral = features(8, seed=3)
        f = enc.features(chroma, spectral=spectral, class_labels=torch.arange(8) - 1, entries=True)
        z = enc.encode_entries(torch.empty(0), chroma=chroma, spectral=spectral, class_labels=torch.arange(8) - 1)
        torch.testing.assert_close(z @ z.T, f @ f.T, atol=1e-5, rtol=1e-5)

    def test_chroma_query_has_neutral_spectral_part(self):
        enc = fitted()
        chroma, _ = features(4)
        block = enc._content_block(chroma, None)
        assert torch.equal(block[:, 3:], torch.zeros(4, 6))
        torch.testing.assert_close(block.norm(dim=1), torch.ones(4))


class TestLabelsNeverHurt:
    def test_unhinted_query_ranks_a_labelled_pool_as_an_unlabelled_one(self):
        enc = fitted()
        chroma, spectral = features(50, seed=5)
        labels = torch.randint(0, 10, (50,), generator=torch.Generator().manual_seed(1))
        labels[::4] = -1  # a mixed pool
        plain = F.normalize(
            enc.encode_entries(torch.empty(0), chroma=chroma, spectral=spectral, class_labels=unlabelled(50)), dim=1
        )
        tagged = F.normalize(
            enc.encode_entries(torch.empty(0), chroma=chroma, spectral=spectral, class_labels=labels), dim=1
        )
        q_chroma, q_spectral = features(7, seed=6)
        q = F.normalize(
            enc.encode_queries(
                dreams=None, chroma=q_chroma, spectral=q_spectral, class_labels=unlabelled(7), utility=torch.zeros(7)
            ),
            dim=1,
        )
        torch.testing.assert_close(q @ tagged.T, q @ plain.T, atol=1e-6, rtol=1e-6)

    def test_a_hint_lifts_exactly_the_matching_entries(self):
        enc = fitted()
        chroma, spectral = features(30, seed=5)
        labels = torch.arange(30) % 6 - 1  # classes 0..4 and unlabelled entries
        entries = enc.encode_entries(torch.empty(0), chroma=chroma, spectral=spectral, class_labels=labels)
        q_chroma, q_spectral = features(1, seed=6)

        def query(hint: int) -> torch.Tensor:
            return enc.encode_queries(
                dreams=None,
                chroma=q_chroma,
                spectral=q_spectral,
                class_labels=torch.tensor([hint]),
                utility=torch.zeros(1),
            )

        gain = (query(3) @ entries.T - query(-1) @ entries.T)[0]  # dot products before normalisation
        torch.testing.assert_close(gain, (labels == 3).float() * 0.25, atol=1e-5, rtol=0)


class TestStatistics:
    def test_noise_does_not_collapse(self):
        """Uniform-noise dreams differ only slightly; standardised features keep them apart."""
        from dreampool_gpu.dreams import chroma_signature
        from dreampool_gpu.spectral import spectral_features

        dreams = torch.rand(500, 8, 8, 2, 3, generator=torch.Generator().manual_seed(0))
        chroma, spectral = chroma_signature(dreams), spectral_features(dreams)
        enc = FeatureEncoder()
        raw = F.normalize(
            enc.encode_entries(dreams, chroma=chroma, spectral=spectral, class_labels=unlabelled(500)), dim=1
        )
        enc.fit_statistics(chroma, spectral, fitted_on=500)
        z = F.normalize(
            enc.encode_entries(dreams, chroma=chroma, spectral=spectral, class_labels=unlabelled(500)), dim=1
        )
        off_diagonal = (z @ z.T).fill_diagonal_(-1)
        raw_off = (raw @ raw.T).fill_diagonal_(-1)
        assert float(raw_off.max()) > 0.9999  # unstandardised: everything is one point
        assert float(off_diagonal.max()) < 0.999
        assert float(z.std(0).max()) > 10 * float(raw.std(0).max())

    def test_refit_schedule_and_version(self):
        enc = FeatureEncoder()
        assert enc.needs_refit(1) and not enc.needs_refit(0)
        chroma, spectral = features(10)
        before = enc.version
        enc.fit_statistics(chroma, spectral, fitted_on=10)
        assert enc.version == before + 1
        assert not enc.needs_refit(19) and enc.needs_refit(20)

    def test_constant_feature_stays_finite(self):
        enc = FeatureEncoder()
        chroma = torch.full((5, 3), 0.5)
        spectral = torch.ones(5, 8)
        enc.fit_statistics(chroma, spectral, fitted_on=5)
        z = enc.encode_entries(torch.empty(0), chroma=chroma + 0.01, spectral=spectral, class_labels=unlabelled(5))
        assert bool(torch.isfinite(z).all())

    def test_state_dict_round_trip(self):
        enc = fitted(seed=3)
        other = FeatureEncoder(seed=3)
        other.load_state_dict(enc.state_dict())
        chroma, spectral = features(4)
        kwargs = {"chroma": chroma, "spectral": spectral, "class_labels": torch.tensor([1, -1, 2, -1])}
        assert torch.equal(enc.encode_entries(torch.empty(0), **kwargs), other.encode_entries(torch.empty(0), **kwargs))


class TestProtocol:
    def test_shipped_encoders_satisfy_it(self):
        assert isinstance(FeatureEncoder(), Encoder)
        assert isinstance(LearnedEncoder((4, 4, 2), 16), Encoder)
        assert isinstance(
            ModuleEncoder(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(96, 16)), (4, 4, 2), 16), Encoder
        )

    def test_same_seed_same_encoder(self):
        a, b = FeatureEncoder(seed=5), FeatureEncoder(seed=5)
        assert torch.equal(a.projection, b.projection)
        assert not torch.equal(a.projection, FeatureEncoder(seed=6).projection)
        la, lb = LearnedEncoder((4, 4, 2), 16, seed=2), LearnedEncoder((4, 4, 2), 16, seed=2)
        assert all(torch.equal(x, y) for x, y in zip(la.state_dict().values(), lb.state_dict().values(), strict=True))
