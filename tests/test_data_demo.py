"""scikit-learn digits as the offline demo image set."""

from __future__ import annotations

import pytest
import torch

from beit.data.demo import load_digits_images, train_test_split


def test_digits_shapes_and_values() -> None:
    images, labels = load_digits_images(32)
    assert images.shape == (1797, 32, 32, 3) and images.dtype == torch.uint8
    assert labels.shape == (1797,) and labels.dtype == torch.long
    assert set(labels.tolist()) == set(range(10))
    assert torch.equal(images[..., 0], images[..., 2])  # gray replicated to RGB
    assert images.max() == 255 and images.min() == 0
    raw, raw_labels = load_digits_images(8)
    from sklearn.datasets import load_digits

    expected = torch.as_tensor(load_digits().images * 255 / 16).round().to(torch.uint8)
    assert torch.equal(raw[..., 0], expected) and torch.equal(raw_labels, labels)
    with pytest.raises(ValueError):
        load_digits_images(4)


def test_split_is_deterministic_and_stratified() -> None:
    images, labels = load_digits_images(16)
    a = train_test_split(images, labels, 0.2, seed=0)
    b = train_test_split(images, labels, 0.2, seed=0)
    c = train_test_split(images, labels, 0.2, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[3], c[3]) or not torch.equal(a[2], c[2])
    x_tr, y_tr, x_te, y_te = a
    assert len(x_tr) + len(x_te) == 1797 and len(x_te) == len(y_te)
    counts = torch.bincount(y_te, minlength=10).float() / torch.bincount(labels, minlength=10).float()
    assert torch.allclose(counts, torch.full((10,), 0.2), atol=0.01)
