"""How good is a tokenizer: reconstruction error, codebook usage, and a picture to look at.

A tokenizer can reconstruct well while using few codes (a poor MIM target: the ViT learns to
predict a handful of classes), or spread over the codebook while reconstructing badly. Report both.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.utils import make_grid


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean squared error over all elements."""
    return float(torch.mean((a.float() - b.float()) ** 2))


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB, per image then averaged over the batch.

    Per-image averaging is the usual convention (one perfect image does not make the mean infinite:
    its PSNR is capped at 100 dB).
    """
    if a.shape != b.shape:
        raise ValueError(f"psnr needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.float(), b.float()
    if a.dim() < 4:
        a, b = a.reshape(1, -1), b.reshape(1, -1)
    per_image = ((a - b) ** 2).flatten(1).mean(1)
    values = 10 * torch.log10(data_range**2 / per_image.clamp_min(1e-10))
    return float(values.clamp_max(100.0).mean())


def token_histogram(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Counts of every code (LongTensor [vocab_size]); add these up over batches."""
    return torch.bincount(ids.flatten().long().cpu(), minlength=vocab_size)[:vocab_size]


def codebook_usage(hist_or_ids: torch.Tensor, vocab_size: int | None = None) -> dict[str, float]:
    """Usage statistics from a token histogram (or raw ids, with ``vocab_size``).

    ``perplexity`` = exp(entropy of the code distribution): the number of equally used codes that
    would give the same entropy. ``dead_codes``: codes never used.
    """
    if vocab_size is not None:
        hist = token_histogram(hist_or_ids, vocab_size)
    else:
        if hist_or_ids.dim() != 1:
            raise ValueError("pass a 1-D histogram, or raw ids together with vocab_size")
        hist = hist_or_ids
    hist = hist.double()
    total = float(hist.sum())
    n = hist.numel()
    used = int((hist > 0).sum())
    if total > 0:
        p = hist[hist > 0] / total
        entropy = float(-(p * p.log()).sum())
    else:
        entropy = 0.0
    return {
        "perplexity": math.exp(entropy),
        "entropy": entropy,
        "used_codes": used,
        "dead_codes": n - used,
        "dead_fraction": (n - used) / n if n else 0.0,
        "usage_fraction": used / n if n else 0.0,
        "num_tokens": int(total),
    }


def upscale_for_display(images: torch.Tensor, min_side: int = 64) -> torch.Tensor:
    """``[N, C, H, W]`` images enlarged by the smallest integer factor that makes ``min(H, W) >= min_side``
    (nearest neighbour: pixels stay visible squares); unchanged when already that large. For PNG panels of
    16- or 32-px images, which an image viewer would otherwise show as a few dots."""
    k = -(-min_side // max(1, min(images.shape[-2:])))
    return F.interpolate(images, scale_factor=k, mode="nearest") if k > 1 else images


def save_recon_grid(originals: torch.Tensor, recons: torch.Tensor, path: str | os.PathLike, max_images: int = 8) -> str:
    """PNG with originals on the top row and their reconstructions below (cells enlarged to >= 64 px by
    :func:`upscale_for_display`); returns the path."""
    if originals.shape != recons.shape:
        raise ValueError(f"shape mismatch: originals {tuple(originals.shape)} vs recons {tuple(recons.shape)}")
    n = min(max_images, originals.shape[0])
    both = upscale_for_display(torch.cat([originals[:n], recons[:n]]).detach().float().cpu().clamp(0, 1))
    grid = make_grid(both, nrow=n, padding=2, pad_value=1.0)
    array = (grid * 255).round().to(torch.uint8).permute(1, 2, 0)
    if array.shape[-1] == 1:
        array = array[..., 0]
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(array.numpy()).save(path)
    return path
