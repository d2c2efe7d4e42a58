"""Attention kernels with an additive per-head bias, behind one swappable function.

BEiT adds a learned relative-position bias before the softmax. ``sdpa`` passes it to PyTorch's
fused kernels as a float mask; ``eager`` is the literal formula, kept as the reference the fast
paths are tested against. ``fused_bias`` is our Triton kernel (``attention_triton``): the bias added
inside a flash-style kernel and its gradient summed over the batch in-kernel; it runs where it supports
the inputs (CUDA, no dropout, head dim 16-128) and falls back to ``sdpa`` elsewhere, so it is safe to choose
on any machine. ``cudnn_bias`` (``attention_cudnn``) runs cuDNN's fused attention kernels with the bias and its
batch-summed gradient, through NVIDIA's ``cudnn`` package where it is installed (fp16 / bf16 on CUDA); elsewhere,
and for a shape cuDNN refuses (with a warning), it runs ``fused_bias``. Faster kernels register themselves in
``ATTENTION_IMPLS``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import attention_cudnn, attention_triton

AttentionFn = Callable[..., torch.Tensor]


def eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, dropout_p: float = 0.0
) -> torch.Tensor:
    """q, k, v: [B, H, L, d]; bias broadcastable to [B, H, L, L]."""
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if bias is not None:
        attn = attn + bias
    attn = attn.float().softmax(dim=-1).to(v.dtype)
    if dropout_p > 0:
        attn = F.dropout(attn, p=dropout_p)
    return attn @ v


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, dropout_p: float = 0.0
) -> torch.Tensor:
    if bias is not None:
        bias = bias.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)


def _pinned_sdpa(*backends: str) -> AttentionFn:
    """SDPA restricted to the named backends, in priority order (falls back to the later ones)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = [getattr(SDPBackend, b) for b in backends]

    def attention(q, k, v, bias, dropout_p=0.0):  # noqa: ANN001, ANN202
        with sdpa_kernel(chosen, set_priority=True):
            return sdpa_attention(q, k, v, bias, dropout_p)

    return attention


def fused_bias_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, dropout_p: float = 0.0
) -> torch.Tensor:
    """Our Triton kernel where :func:`beit.models.attention_triton.supported` says it runs, else SDPA."""
    if attention_triton.supported(q, k, v, bias, dropout_p):
        return attention_triton.fused_bias_attention(q, k, v, bias)
    return sdpa_attention(q, k, v, bias, dropout_p)


ATTENTION_IMPLS: dict[str, AttentionFn] = {
    "eager": eager_attention,
    "sdpa": sdpa_attention,
    # PyTorch's cuDNN attention takes an additive bias but returns no gradient for it, so SDPA falls back to the
    # next backend for a learned bias (``cudnn_bias`` below gets the gradient from cuDNN through its own package)
    "cudnn": _pinned_sdpa("CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH"),
    "efficient": _pinned_sdpa("EFFICIENT_ATTENTION", "MATH"),
    "fused_bias": fused_bias_attention,
}


def fused_bias_attention_packed(qkv: torch.Tensor, bias: torch.Tensor | None, dropout_p: float = 0.0) -> torch.Tensor:
    """``fused_bias`` on the qkv projection's ``[B, L, 3, H, d]`` output, returning ``[B, L, H * d]``: the
    kernel reads and writes those layouts in place (no transposes or stacks around it); where it does not run,
    the same result through SDPA."""
    if attention_triton.supported_packed(qkv, bias, dropout_p):
        return attention_triton.fused_bias_attention_packed(qkv, bias).flatten(2)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return sdpa_attention(q, k, v, bias, dropout_p).transpose(1, 2).flatten(2)


def cudnn_bias_attention_packed(qkv: torch.Tensor, bias: torch.Tensor | None, dropout_p: float = 0.0) -> torch.Tensor:
    """cuDNN's fused attention with the bias on the ``[B, L, 3, H, d]`` projection output, returning ``[B, L, H * d]``,
    where :func:`beit.models.attention_cudnn.supported_packed` says it runs; else :func:`fused_bias_attention_packed`
    (the Triton kernel, then SDPA)."""
    if attention_cudnn.supported_packed(qkv, bias, dropout_p):
        return attention_cudnn.cudnn_bias_attention_packed(qkv, bias).flatten(2)
    return fused_bias_attention_packed(qkv, bias, dropout_p)


def cudnn_bias_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, dropout_p: float = 0.0
) -> torch.Tensor:
    """:func:`cudnn_bias_attention_packed` for ``[B, H, L, d]`` q, k, v (stacked into its layout: one copy)."""
    B, H, L, d = q.shape
    out = cudnn_bias_attention_packed(torch.stack((q, k, v), dim=2).transpose(1, 3), bias, dropout_p)
    return out.view(B, L, H, d).transpose(1, 2)


ATTENTION_IMPLS["cudnn_bias"] = cudnn_bias_attention

# implementations that also take the packed form (used by the model when its ``attn_impl`` is one of them)
PACKED_ATTENTION_IMPLS: dict[str, Callable[..., torch.Tensor]] = {"fused_bias": fused_bias_attention_packed,
                                                                   "cudnn_bias": cudnn_bias_attention_packed}


def get_attention(name: str) -> AttentionFn:
    try:
        return ATTENTION_IMPLS[name]
    except KeyError:
        raise ValueError(f"unknown attention implementation {name!r}; choose from {sorted(ATTENTION_IMPLS)}") from None
