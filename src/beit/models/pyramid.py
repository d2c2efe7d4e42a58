"""The simple feature pyramid of BEiT for dense tasks (segmentation, detection).

A plain ViT has one stride (the patch size). The paper's code takes four blocks and resamples them to
strides 4, 8, 16 and 32 px: 2x2 transposed convolutions up, identity, or max-pooling down.
"""

from __future__ import annotations

import math

from torch import nn

PYRAMID_STRIDES = (4, 8, 16, 32)


def default_out_indices(depth: int) -> tuple[int, int, int, int]:
    """Four blocks ending at the last one: depth 12 -> (3, 5, 7, 11), 24 -> (7, 11, 15, 23) as in the
    paper's code; other depths are evenly spaced (``depth // 4 * k - 1``); tiny test models repeat blocks."""
    if depth < 4:
        return tuple(min(depth - 1, max(0, round((k + 1) * depth / 4) - 1)) for k in range(4))  # type: ignore[return-value]
    if depth == 12:
        return (3, 5, 7, 11)
    if depth == 24:
        return (7, 11, 15, 23)
    step = depth // 4
    return (step - 1, 2 * step - 1, 3 * step - 1, depth - 1)


def _norm(kind: str, dim: int) -> nn.Module:
    if kind == "bn":  # the paper's SyncBN comes from nn.SyncBatchNorm.convert_sync_batchnorm under DDP
        return nn.BatchNorm2d(dim)
    if kind == "gn":
        return nn.GroupNorm(math.gcd(32, dim), dim)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"pyramid norm must be bn | gn | none, got {kind!r}")


def pyramid_branch(dim: int, factor: float, norm: str = "bn") -> nn.Module:
    """Resample a [B, dim, h, w] map by ``factor``: > 1 transposed convs (norm + GELU between them),
    1 identity, < 1 max-pooling. Patch 16 -> strides 4, 8, 16, 32 is factors 4, 2, 1, 1/2."""
    if factor == 1:
        return nn.Identity()
    if factor < 1:
        k = round(1 / factor)
        return nn.MaxPool2d(kernel_size=k, stride=k)
    layers: list[nn.Module] = []
    for i in range(round(math.log2(factor))):
        if i > 0:
            layers += [_norm(norm, dim), nn.GELU()]
        layers.append(nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2))
    return nn.Sequential(*layers)
