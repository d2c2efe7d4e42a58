"""What every image tokenizer offers, and the input checks they share.

BEiT pre-training only needs ``encode`` (images -> token ids, the MIM targets); ``decode`` is for
looking at what the tokens mean and for judging a tokenizer. Both the frozen DALL-E dVAE and our
trainable dVAE subclass :class:`Tokenizer`, so the pre-training code never has to know which it has.
"""

from __future__ import annotations

import torch
from torch import nn

LOGIT_LAPLACE_EPS = 0.1  # DALL-E's logit_laplace_eps: pixels are squeezed into [eps, 1 - eps]
_RANGE_TOL = 1e-3  # resampling (bicubic/lanczos on a GPU) may overshoot [0, 1] by a hair


class TokenizerCheckpointError(ValueError):
    """A tokenizer file that exists but is not what it should be (wrong kind, shapes or metadata)."""


class Tokenizer(nn.Module):
    """Base class: images in [0, 1] <-> LongTensor token ids on a grid ``downsample`` times coarser.

    Subclasses set ``vocab_size``, ``downsample`` and ``in_chans`` and implement ``encode``/``decode``.
    ``.to(device)``, ``.eval()`` and ``.state_dict()`` come from ``nn.Module``.
    """

    vocab_size: int
    downsample: int
    in_chans: int

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images float [B, C, H, W] in [0, 1] -> token ids LongTensor [B, H/d, W/d]."""
        raise NotImplementedError

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids LongTensor [B, h, w] -> images float [B, C, h*d, w*d] in [0, 1]."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


def map_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """[0, 1] -> [eps, 1 - eps]: the input space of the DALL-E encoder (logit-Laplace support)."""
    return (1 - 2 * eps) * x + eps


def unmap_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """Inverse of :func:`map_pixels`, clamped back into [0, 1]."""
    return torch.clamp((x - eps) / (1 - 2 * eps), 0, 1)


def check_images(images: torch.Tensor, in_chans: int, downsample: int, check_range: bool = True) -> torch.Tensor:
    """Validate a tokenizer input and return it as float32.

    Tokenizers are fed a separate, un-normalized view of the image; passing the ViT's normalized
    view (or raw 0-255 pixels) silently gives garbage tokens, so the message says which it looks
    like. ``check_range`` costs one device sync; turn it off in a tight loop once the data is known.
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor of images, got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"expected images of shape [B, C, H, W], got shape {tuple(images.shape)}")
    b, c, h, w = images.shape
    if c != in_chans:
        raise ValueError(
            f"expected {in_chans} channels, got {c} (shape {tuple(images.shape)}); "
            "images must be channels-first [B, C, H, W]"
        )
    if h % downsample or w % downsample:
        raise ValueError(
            f"image height and width must be divisible by {downsample}, got {h}x{w}; "
            "resize or crop first (BEiT uses 112x112 for a 14x14 token grid)"
        )
    if not images.is_floating_point():
        hint = " (looks like 0-255 pixels: divide by 255)" if images.dtype == torch.uint8 else ""
        raise TypeError(f"expected float images in [0, 1], got dtype {images.dtype}{hint}")
    images = images.float()
    if check_range and images.numel():
        lo, hi = (float(v) for v in torch.aminmax(images))
        if lo < -_RANGE_TOL or hi > 1 + _RANGE_TOL:
            if lo < -_RANGE_TOL:
                hint = "looks normalized with mean/std; pass the un-normalized [0, 1] view"
            elif hi > 2:
                hint = "looks like 0-255 pixel values: divide by 255"
            else:
                hint = "clamp it into [0, 1]"
            raise ValueError(f"expected images in [0, 1], got values in [{lo:.4g}, {hi:.4g}] ({hint})")
        if lo < 0 or hi > 1:
            images = images.clamp(0, 1)
    return images


def check_ids(ids: torch.Tensor, vocab_size: int, check_range: bool = True) -> torch.Tensor:
    """Validate token ids [B, h, w] before decoding; out-of-range ids would index garbage."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor of token ids, got {type(ids).__name__}")
    if ids.dim() != 3:
        raise ValueError(f"expected token ids of shape [B, h, w], got shape {tuple(ids.shape)}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"expected integer token ids, got dtype {ids.dtype}")
    ids = ids.long()
    if check_range and ids.numel():
        lo, hi = (int(v) for v in torch.aminmax(ids))
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"token ids must be in [0, {vocab_size}), got values in [{lo}, {hi}]")
    return ids
