"""Image tokenizers: images in [0, 1] <-> discrete visual tokens (BEiT's MIM targets).

- ``load_tokenizer("dalle", encoder="encoder.pkl", decoder="decoder.pkl")``: OpenAI's frozen DALL-E
  dVAE (vocab 8192, 8x downsampling), read without importing ``dall_e`` or running pickled code.
- ``load_tokenizer("dvae", "my_dvae.safetensors")``: a dVAE trained with :mod:`beit.tokenizers.train`.
"""

from __future__ import annotations

import os

import torch

from .base import Tokenizer, TokenizerCheckpointError, map_pixels, unmap_pixels
from .dalle import DalleDecoder, DalleDecoderConfig, DalleEncoder, DalleEncoderConfig, DalleTokenizer
from .dvae import DiscreteVAE, DVAEConfig, gumbel_temperature
from .safe_pickle import UnsafeCheckpointError

TOKENIZER_KINDS = ("dalle", "dvae")


def load_tokenizer(
    kind: str,
    path: str | os.PathLike | None = None,
    *,
    encoder: str | os.PathLike | None = None,
    decoder: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    **kwargs: object,
) -> Tokenizer:
    """Load a frozen tokenizer in eval mode.

    ``kind="dalle"``: ``encoder`` (or ``path``) is the official ``encoder.pkl`` or a safetensors file
    written by ``DalleTokenizer.save``; ``decoder`` is optional (only ``decode`` needs it); extra
    keyword arguments go to :class:`DalleTokenizer` (``precision``, ``channels_last``).
    ``kind="dvae"``: ``path`` is a safetensors file written by ``DiscreteVAE.save``.
    """
    if kind == "dalle":
        if encoder is not None and path is not None and os.fspath(encoder) != os.fspath(path):
            raise ValueError("give the DALL-E encoder file once: either path or encoder=")
        enc = encoder if encoder is not None else path
        if enc is None:
            raise ValueError('load_tokenizer("dalle") needs encoder=PATH (the official encoder.pkl)')
        return DalleTokenizer.load(enc, decoder, device=device, **kwargs)  # type: ignore[arg-type]
    if kind == "dvae":
        if path is None or encoder is not None or decoder is not None or kwargs:
            raise ValueError('load_tokenizer("dvae", PATH) takes just the safetensors path (and device)')
        return DiscreteVAE.load(path, device=device).eval()
    raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {TOKENIZER_KINDS}")


__all__ = [
    "TOKENIZER_KINDS",
    "DVAEConfig",
    "DalleDecoder",
    "DalleDecoderConfig",
    "DalleEncoder",
    "DalleEncoderConfig",
    "DalleTokenizer",
    "DiscreteVAE",
    "Tokenizer",
    "TokenizerCheckpointError",
    "UnsafeCheckpointError",
    "gumbel_temperature",
    "load_tokenizer",
    "map_pixels",
    "unmap_pixels",
]
