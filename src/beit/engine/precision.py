"""The one precision decision: when to run under bf16 autocast.

Every task and the trainer ask here, so that ``precision: auto`` means the same thing everywhere:
bf16 autocast on CUDA, fp32 elsewhere (CPU autocast is slower than fp32 on most CPUs). Master
weights, optimizer state and losses stay fp32; only the matmuls / convs inside the context run in
bf16 (``torch.autocast``'s op lists).
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("auto", "bf16", "fp32")


def use_bf16(device: torch.device | str, precision: str = "auto") -> bool:
    """Whether ``precision`` ("auto" | "bf16" | "fp32") on ``device`` means bf16 autocast.

    ``auto``: bf16 on CUDA, fp32 on any other device. ``bf16``: bf16 on any device (CPU autocast
    included). Raises ``ValueError`` for any other value, naming it.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {' | '.join(PRECISIONS)}, got {precision!r}")
    return precision == "bf16" or (precision == "auto" and torch.device(device).type == "cuda")


def autocast_for(device: torch.device | str, precision: str = "auto") -> contextlib.AbstractContextManager:
    """``torch.autocast(device.type, bfloat16)`` when :func:`use_bf16` says so, else a no-op context."""
    if not use_bf16(device, precision):
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


__all__ = ["PRECISIONS", "autocast_for", "use_bf16"]
