"""Fused attention with a learned per-head bias shared by the batch (BEiT's relative-position bias), in Triton.

    out = softmax(q @ k^T / sqrt(d) + bias) @ v,   q, k, v: [B, H, L, d],  bias: [H, L, L] (the same for every image)

PyTorch's SDPA takes such a bias only as a dense float mask: that rules out the flash kernel, and the bias
gradient comes back as a ``[B, H, L, L]`` tensor that autograd then sums over the batch. Here:

- forward: FlashAttention-2's online softmax (Dao, 2023) with the bias tile added inside the kernel; it
  saves only the output and the per-row log-sum-exp;
- backward: dK/dV and dQ kernels as in FlashAttention-2, plus a third kernel that owns one ``[BM, BN]`` tile
  of ``d(bias)`` for one head and loops over the batch, so the reduction over images happens in registers
  (no ``[B, H, L, L]`` tensor, no atomics, deterministic);
- any sequence length (197 = 14x14+1, 577, 1025, ...): out-of-range rows and columns are masked, nothing is
  padded; fp32 accumulation, q/k/v in fp16, bf16 or fp32.

The kernels are wrapped as the custom op ``beit::fused_bias_attention`` (one opaque node for ``torch.compile``)
with its autograd formula registered. :func:`supported` says which inputs it takes; ``beit.models.attention``
falls back to SDPA for the rest (CPU, dropout, head dims that are not a power of two in [16, 128]).
"""

from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs have no Triton
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "fused_bias_attention", "supported"]

_HEAD_DIMS = (16, 32, 64, 128)


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
              dropout_p: float = 0.0) -> bool:
    """True when :func:`fused_bias_attention` takes these inputs (else use SDPA).

    Needs Triton, CUDA tensors, q/k/v ``[B, H, L, d]`` of one float dtype with ``d`` in 16/32/64/128, no
    dropout, and a bias broadcast over the batch: ``[H, L, L]`` or ``[1, H, L, L]``.
    """
    if not (HAS_TRITON and q.is_cuda and dropout_p == 0.0 and bias is not None):
        return False
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape or q.shape[-1] not in _HEAD_DIMS:
        return False
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or not (q.dtype == k.dtype == v.dtype):
        return False
    _, H, L, _ = q.shape
    shape = tuple(bias.shape)
    return shape == (H, L, L) or shape == (1, H, L, L)


if HAS_TRITON:

    @triton.jit
    def _fwd_kernel(Q, K, V, Bias, Out, Lse,
                    sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sob, soh, sol,
                    H, L, scale,
                    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_d = tl.arange(0, D)
        m_ok = offs_m < L
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sql + offs_d[None, :], mask=m_ok[:, None], other=0.0)
        m_i = tl.full([BM], float("-inf"), tl.float32)
        l_i = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, D], tl.float32)
        bias_row = Bias + h * L * L + offs_m[:, None] * L
        for start_n in range(0, L, BN):
            offs_n = start_n + tl.arange(0, BN)
            n_ok = offs_n < L
            k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skl + offs_d[None, :], mask=n_ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
            s += tl.load(bias_row + offs_n[None, :], mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
            s = tl.where(n_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svl + offs_d[None, :], mask=n_ok[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m_i = m_new
        acc = acc / l_i[:, None]
        tl.store(Out + b * sob + h * soh + offs_m[:, None] * sol + offs_d[None, :], acc.to(Out.dtype.element_ty),
                 mask=m_ok[:, None])
        tl.store(Lse + bh * L + offs_m, m_i + tl.log(l_i), mask=m_ok)

    @triton.jit
    def _bwd_dkdv_kernel(Q, K, V, Bias, DO, Lse, Delta, DK, DV,
                         sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdob, sdoh, sdol,
                         H, L, scale,
                         D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
        pid_n = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_n = pid_n * BN + tl.arange(0, BN)
        offs_d = tl.arange(0, D)
        n_ok = offs_n < L
        k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skl + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svl + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        dk = tl.zeros([BN, D], tl.float32)
        dv = tl.zeros([BN, D], tl.float32)
        for start_m in range(0, L, BM):
            offs_m = start_m + tl.arange(0, BM)
            m_ok = offs_m < L
            q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sql + offs_d[None, :], mask=m_ok[:, None],
                        other=0.0)
            do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdol + offs_d[None, :], mask=m_ok[:, None],
                         other=0.0)
            lse = tl.load(Lse + bh * L + offs_m, mask=m_ok, other=0.0)
            delta = tl.load(Delta + bh * L + offs_m, mask=m_ok, other=0.0)
            ok = m_ok[:, None] & n_ok[None, :]
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
            s += tl.load(Bias + h * L * L + offs_m[:, None] * L + offs_n[None, :], mask=ok, other=0.0).to(tl.float32)
            p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)  # [BM, BN]
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
        # dk/dv are [B, H, L, D] contiguous
        base = bh * L * D + offs_n[:, None] * D + offs_d[None, :]
        tl.store(DK + base, (dk * scale).to(DK.dtype.element_ty), mask=n_ok[:, None])
        tl.store(DV + base, dv.to(DV.dtype.element_ty), mask=n_ok[:, None])

    @triton.jit
    def _bwd_dq_kernel(Q, K, V, Bias, DO, Lse, Delta, DQ,
                       sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdob, sdoh, sdol,
                       H, L, scale,
                       D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_d = tl.arange(0, D)
        m_ok = offs_m < L
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sql + offs_d[None, :], mask=m_ok[:, None], other=0.0)
        do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdol + offs_d[None, :], mask=m_ok[:, None],
                     other=0.0)
        lse = tl.load(Lse + bh * L + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(Delta + bh * L + offs_m, mask=m_ok, other=0.0)
        dq = tl.zeros([BM, D], tl.float32)
        for start_n in range(0, L, BN):
            offs_n = start_n + tl.arange(0, BN)
            n_ok = offs_n < L
            ok = m_ok[:, None] & n_ok[None, :]
            k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skl + offs_d[None, :], mask=n_ok[:, None], other=0.0)
            v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svl + offs_d[None, :], mask=n_ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
            s += tl.load(Bias + h * L * L + offs_m[:, None] * L + offs_n[None, :], mask=ok, other=0.0).to(tl.float32)
            p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
        tl.store(DQ + bh * L * D + offs_m[:, None] * D + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
                 mask=m_ok[:, None])

    @triton.jit
    def _bwd_dbias_kernel(Q, K, V, Bias, DO, Lse, Delta, DBias,
                          sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdob, sdoh, sdol,
                          B, H, L, scale, per_chunk,
                          D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
        # one [BM, BN] tile of d(bias) for head h, summed in registers over one chunk of the batch
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        h = tl.program_id(2) % H
        chunk = tl.program_id(2) // H
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        offs_d = tl.arange(0, D)
        m_ok = offs_m < L
        n_ok = offs_n < L
        ok = m_ok[:, None] & n_ok[None, :]
        bias = tl.load(Bias + h * L * L + offs_m[:, None] * L + offs_n[None, :], mask=ok, other=0.0).to(tl.float32)
        acc = tl.zeros([BM, BN], tl.float32)
        for b in range(chunk * per_chunk, tl.minimum(chunk * per_chunk + per_chunk, B)):
            bh = b * H + h
            q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sql + offs_d[None, :], mask=m_ok[:, None],
                        other=0.0)
            k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skl + offs_d[None, :], mask=n_ok[:, None], other=0.0)
            v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svl + offs_d[None, :], mask=n_ok[:, None], other=0.0)
            do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdol + offs_d[None, :], mask=m_ok[:, None],
                         other=0.0)
            lse = tl.load(Lse + bh * L + offs_m, mask=m_ok, other=0.0)
            delta = tl.load(Delta + bh * L + offs_m, mask=m_ok, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale + bias
            p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            acc += p * (dp - delta[:, None])
        tl.store(DBias + (chunk * H + h) * L * L + offs_m[:, None] * L + offs_n[None, :], acc, mask=ok)


# (BM, BN, num_warps, num_stages) per kernel; ``benchmarks/attention_kernel.py --tune`` measures the choices
CONFIGS: dict[str, tuple[int, int, int, int]] = {  # best of a grid on one H200, B 128 x 12 heads x 197 x 64, bf16
    "fwd": (64, 32, 4, 3), "dkdv": (64, 32, 4, 2), "dq": (64, 32, 4, 3), "dbias": (64, 64, 4, 3),
}
DBIAS_CHUNKS = 4  # the batch is split over this many programs per d(bias) tile (partial sums added after)


def _cfg(kernel: str, d: int) -> tuple[int, int, int, int]:
    bm, bn, warps, stages = CONFIGS[kernel]
    if d > 64:  # keep the [BM, d] and [BN, d] tiles within shared memory
        bm, bn = min(bm, 64), min(bn, 64)
    return bm, bn, warps, stages


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 inputs: exact fp32 products, no TF32


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _inner(t: torch.Tensor) -> torch.Tensor:
    """The kernels read rows with unit stride in the last dim; views of a qkv projection already have it."""
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("beit::fused_bias_attention_fwd", mutates_args=())
def _fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, L, d = q.shape
    out = torch.empty((B, H, L, d), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, L), device=q.device, dtype=torch.float32)
    BM, BN, warps, stages = _cfg("fwd", d)
    _fwd_kernel[(triton.cdiv(L, BM), B * H)](
        q, k, v, bias, out, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        H, L, d ** -0.5, D=d, BM=BM, BN=BN, PREC=_prec(q.dtype), num_warps=warps, num_stages=stages)
    return out, lse


@_fwd.register_fake
def _(q, k, v, bias):  # noqa: ANN001, ANN202
    B, H, L, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((B, H, L), dtype=torch.float32)


@torch.library.custom_op("beit::fused_bias_attention_bwd", mutates_args=())
def _bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
         out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    B, H, L, d = q.shape
    do = _inner(do)
    delta = (do.float() * out.float()).sum(-1).contiguous()  # [B, H, L]
    dq = torch.empty((B, H, L, d), device=q.device, dtype=q.dtype)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    chunks = min(DBIAS_CHUNKS, B)
    per_chunk = triton.cdiv(B, chunks)
    chunks = triton.cdiv(B, per_chunk)
    dbias = torch.empty((chunks, H, L, L), device=q.device, dtype=torch.float32)
    common = (*_strides(q), *_strides(k), *_strides(v), *_strides(do))
    prec = _prec(q.dtype)
    BM, BN, warps, stages = _cfg("dkdv", d)
    _bwd_dkdv_kernel[(triton.cdiv(L, BN), B * H)](q, k, v, bias, do, lse, delta, dk, dv, *common, H, L, d ** -0.5,
                                                  D=d, BM=BM, BN=BN, PREC=prec, num_warps=warps, num_stages=stages)
    BM, BN, warps, stages = _cfg("dq", d)
    _bwd_dq_kernel[(triton.cdiv(L, BM), B * H)](q, k, v, bias, do, lse, delta, dq, *common, H, L, d ** -0.5,
                                                D=d, BM=BM, BN=BN, PREC=prec, num_warps=warps, num_stages=stages)
    BM, BN, warps, stages = _cfg("dbias", d)
    _bwd_dbias_kernel[(triton.cdiv(L, BM), triton.cdiv(L, BN), H * chunks)](
        q, k, v, bias, do, lse, delta, dbias, *common, B, H, L, d ** -0.5, per_chunk,
        D=d, BM=BM, BN=BN, PREC=prec, num_warps=warps, num_stages=stages)
    return dq, dk, dv, dbias.sum(0).to(bias.dtype)


@_bwd.register_fake
def _(do, q, k, v, bias, out, lse):  # noqa: ANN001, ANN202
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    return dq, torch.empty_like(dq), torch.empty_like(dq), torch.empty_like(bias)


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    q, k, v, bias = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, bias, out, lse)


def _backward(ctx, do, dlse):  # noqa: ANN001, ANN202
    q, k, v, bias, out, lse = ctx.saved_tensors
    dq, dk, dv, dbias = _bwd(do, q, k, v, bias, out, lse)
    return dq, dk, dv, dbias


_fwd.register_autograd(_backward, setup_context=_setup_context)


def fused_bias_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d) + bias) v`` in one Triton kernel; gradients for q, k, v and bias.

    Args:
        q, k, v: ``[B, H, L, d]`` CUDA tensors of one dtype (fp16, bf16 or fp32), unit stride in ``d``.
        bias: ``[H, L, L]`` or ``[1, H, L, L]``, shared by the batch (any float dtype; added in fp32). Its
            gradient is summed over the batch inside the kernel.

    Returns:
        ``[B, H, L, d]`` in q's dtype (contiguous).

    Raises:
        ValueError: for inputs :func:`supported` refuses (check it first to fall back).
    """
    if not supported(q, k, v, bias):
        raise ValueError(f"fused_bias_attention does not take q {tuple(q.shape)} {q.dtype} on {q.device} with "
                         f"bias {None if bias is None else tuple(bias.shape)}")
    H, L = q.shape[1], q.shape[2]
    bias = bias.reshape(H, L, L)
    if not bias.is_contiguous():
        bias = bias.contiguous()
    out, _ = _fwd(_inner(q), _inner(k), _inner(v), bias)
    return out
