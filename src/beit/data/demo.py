"""Offline demo data: scikit-learn's bundled handwritten digits as small RGB images.

1,797 real 8x8 grayscale digits ship inside scikit-learn (no download), which makes them the one
real image set every example, test and smoke run can rely on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["load_digits_images", "train_test_split"]


def load_digits_images(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits as uint8 ``[N, size, size, 3]`` images and int64 ``[N]`` labels (N = 1797).

    The 0..16 intensities are scaled to 0..255 (white strokes on black), upsampled bilinearly to
    ``size`` and replicated to 3 channels, so every RGB pipeline takes them unchanged.
    """
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an int >= 8 (the digits are 8x8), got {size!r}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # optional dependency ("beit[data]")
        raise ImportError("load_digits_images needs scikit-learn: pip install 'beit[data]'") from err
    digits = load_digits()
    x = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) * (255.0 / 16.0)  # [N, 1, 8, 8]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    images = x.round().clamp(0, 255).to(torch.uint8).squeeze(1).unsqueeze(-1).expand(-1, -1, -1, 3).contiguous()
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    return images, labels


def train_test_split(
    images: torch.Tensor,
    labels: torch.Tensor,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deterministic stratified split: the same ``test_fraction`` of every class goes to the test set.

    Returns ``(train_images, train_labels, test_images, test_labels)``; both parts keep the
    original order, so results do not depend on anything but ``seed``.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    g = torch.Generator().manual_seed(int(seed))
    is_test = torch.zeros(len(labels), dtype=torch.bool)
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        n_test = int(round(len(idx) * test_fraction))
        is_test[idx[torch.randperm(len(idx), generator=g)[:n_test]]] = True
    return images[~is_test], labels[~is_test], images[is_test], labels[is_test]
