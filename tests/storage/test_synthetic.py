"""Labelled synthetic sets: shapes, ranges, determinism, class balance, what tells the classes apart."""

from __future__ import annotations

import pytest
import torch

from dreampool_gpu.errors import InvalidInputError
from dreampool_gpu.synthetic import DATASETS, make_dataset


@pytest.mark.parametrize("name", list(DATASETS))
def test_shapes_ranges_and_determinism(name):
    a = make_dataset(name, 64, shape=(5, 7, 2), seed=3)
    b = make_dataset(name, 64, shape=(5, 7, 2), seed=3)
    assert a.dreams.shape == (64, 5, 7, 2, 3) and a.dreams.dtype == torch.float32
    assert float(a.dreams.min()) >= 0.0 and float(a.dreams.max()) <= 1.0
    assert a.labels.dtype == torch.int64 and 0 <= int(a.labels.min()) and int(a.labels.max()) < a.num_classes
    assert torch.equal(a.dreams, b.dreams) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.dreams, make_dataset(name, 64, shape=(5, 7, 2), seed=4).dreams)


def test_frequency_orientation_classes_share_their_colour_statistics():
    """Only the layout separates the classes: mean colours per class agree within noise."""
    d = make_dataset("frequency_orientation", 4000, seed=0)
    means = torch.stack([d.dreams[d.labels == c].mean((0, 1, 2, 3)) for c in range(d.num_classes)])
    assert float((means - means.mean(0)).abs().max()) < 0.03


def test_hard_variant_is_noisier():
    easy = make_dataset("colour_structure", 500, seed=0)
    hard = make_dataset("colour_structure_hard", 500, seed=0)
    assert torch.equal(easy.labels, hard.labels)
    assert float(hard.dreams.std()) > float(easy.dreams.std())


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"name": "nope", "n": 3}, "name"),
        ({"name": "colours", "n": -1}, "n"),
        ({"name": "colours", "n": 3, "shape": (4, 4)}, "shape"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(InvalidInputError, match=name):
        make_dataset(**kwargs)
