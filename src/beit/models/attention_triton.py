"""Fused attention with a learned per-head bias shared by the batch (BEiT's relative-position bias), in Triton.

    out = softmax(q @ k^T / sqrt(d) + bias) @ v,   q, k, v: [B, H, L, d],  bias: [H, L, L] (the same for every image)

PyTorch's SDPA takes such a bias only as a dense float mask: that rules out the flash kernel, and the bias
gradient comes back as a ``[B, H, L, L]`` tensor that autograd then sums over the batch. Here:

- forward: FlashAttention-2's online softmax (Dao, 2023) with the bias tile added inside the kernel; it
  saves only the output and the per-row log-sum-exp;
- backward, three choices (:data:`BWD`, or the environment variable ``BEIT_ATTN_BWD``):

  - ``split`` (the default): dK/dV and dQ kernels as in FlashAttention-2, plus a third kernel that owns one
    ``[BM, BN]`` tile of ``d(bias)`` for one head and loops over the batch, so the reduction over images
    happens in registers (no ``[B, H, L, L]`` tensor, no atomics, deterministic); 9 tile products a tile;
  - ``onepass``: one kernel over (key block, head, batch chunk) that loops over its chunk's images and, per
    image, over the query blocks: dK/dV accumulated in registers, dQ added atomically into an fp32 buffer
    (the order of the adds varies: dQ's last bits may differ from run to run), and ``dS`` added into the
    program's own columns of ``d(bias)`` (plain stores: the batch sum needs no atomics and stays
    deterministic); 5 tile products a tile, as FlashAttention-2's backward;
  - ``twopass``: the dQ kernel of ``split``, then the one-pass kernel without dQ (7 products, no atomics);
- any sequence length (197 = 14x14+1, 577, 1025, ...): out-of-range rows and columns are masked, nothing is
  padded; fp32 accumulation, q/k/v in fp16, bf16 or fp32;
- no copies around the kernels: q, k, v are read in place from the qkv projection's ``[B, L, 3, H, d]``
  output, the result is written as ``[B, L, H, d]`` (the output projection's input once flattened), their
  gradient comes back as one ``[B, L, 3, H, d]`` tensor, and ``rowsum(dO * O)`` is computed by the dQ kernel
  (``onepass``: by a small kernel before it; it was four eager fp32 ops inside the op, which
  ``torch.compile`` cannot fuse).

The kernels are wrapped as the custom ops ``beit::fused_bias_attention_fwd`` / ``_bwd`` (opaque nodes for
``torch.compile``) with the autograd formula registered. :func:`supported_packed` / :func:`supported` say which
inputs they take; ``beit.models.attention`` falls back to SDPA for the rest (CPU, dropout, head dims that are
not a power of two in [16, 128]).
"""

from __future__ import annotations

import os
from typing import Any

import torch

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs have no Triton
    import triton
    import triton.language as tl
    from triton.runtime.errors import OutOfResources

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "fused_bias_attention", "fused_bias_attention_packed", "supported", "supported_packed"]

_HEAD_DIMS = (16, 32, 64, 128)


def _takes(x: torch.Tensor, bias: torch.Tensor | None, dropout_p: float, H: int, L: int, d: int) -> bool:
    if not (HAS_TRITON and x.is_cuda and dropout_p == 0.0 and bias is not None and d in _HEAD_DIMS):
        return False
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    return tuple(bias.shape) in ((H, L, L), (1, H, L, L))


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
              dropout_p: float = 0.0) -> bool:
    """True when :func:`fused_bias_attention` takes these inputs (else use SDPA).

    Needs Triton, CUDA tensors, q/k/v ``[B, H, L, d]`` of one float dtype with ``d`` in 16/32/64/128, no
    dropout, and a bias broadcast over the batch: ``[H, L, L]`` or ``[1, H, L, L]``.
    """
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape or not (q.dtype == k.dtype == v.dtype):
        return False
    _, H, L, d = q.shape
    return _takes(q, bias, dropout_p, H, L, d)


def supported_packed(qkv: torch.Tensor, bias: torch.Tensor | None, dropout_p: float = 0.0) -> bool:
    """True when :func:`fused_bias_attention_packed` takes these inputs (else use SDPA): as :func:`supported`,
    for one ``[B, L, 3, H, d]`` tensor."""
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        return False
    _, L, _, H, d = qkv.shape
    return _takes(qkv, bias, dropout_p, H, L, d)


if HAS_TRITON:

    @triton.jit
    def _tile(Ptr, sb, sh, sl, b, h, offs, ok, offs_d):
        """The ``[len(offs), D]`` rows ``offs`` of image ``b``, head ``h`` of a tensor given by its strides
        (batch, head, token; unit stride in ``d``); rows past ``L`` read as 0."""
        return tl.load(Ptr + b * sb + h * sh + offs[:, None] * sl + offs_d[None, :], mask=ok[:, None], other=0.0)

    @triton.jit
    def _bias_tile(Bias, h, L, offs_m, offs_n, ok):
        """Head ``h``'s ``[BM, BN]`` bias tile (rows ``offs_m``, columns ``offs_n``) in fp32; 0 outside ``ok``."""
        return tl.load(Bias + h * L * L + offs_m[:, None] * L + offs_n[None, :], mask=ok, other=0.0).to(tl.float32)

    @triton.jit
    def _grad_tile(q, k, v, do, lse, delta, bias, ok, scale, PREC: tl.constexpr):
        """The backward's shared step for one ``[BM, BN]`` tile: the probabilities ``P`` (recomputed from the
        saved log-sum-exp; 0 outside ``ok``) and ``dS = P * (dO V^T - delta)``, the gradient of the scores
        (and of the bias)."""
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale + bias
        p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        return p, p * (dp - delta[:, None])

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
        q = _tile(Q, sqb, sqh, sql, b, h, offs_m, m_ok, offs_d)
        m_i = tl.full([BM], float("-inf"), tl.float32)
        l_i = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, D], tl.float32)
        bias_row = Bias + h * L * L + offs_m[:, None] * L
        for start_n in range(0, L, BN):
            offs_n = start_n + tl.arange(0, BN)
            n_ok = offs_n < L
            k = _tile(K, skb, skh, skl, b, h, offs_n, n_ok, offs_d)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
            s += tl.load(bias_row + offs_n[None, :], mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
            s = tl.where(n_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = _tile(V, svb, svh, svl, b, h, offs_n, n_ok, offs_d)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m_i = m_new
        acc = acc / l_i[:, None]
        tl.store(Out + b * sob + h * soh + offs_m[:, None] * sol + offs_d[None, :], acc.to(Out.dtype.element_ty),
                 mask=m_ok[:, None])
        tl.store(Lse + bh * L + offs_m, m_i + tl.log(l_i), mask=m_ok)

    @triton.jit
    def _bwd_dq_kernel(Q, K, V, Bias, DO, Out, Lse, Delta, DQ,
                       sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdob, sdoh, sdol, sob, soh, sol, sgb, sgh, sgl,
                       H, L, scale,
                       D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
        # runs first: also writes delta = rowsum(dO * O) for its rows, which the other two kernels read
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_d = tl.arange(0, D)
        m_ok = offs_m < L
        q = _tile(Q, sqb, sqh, sql, b, h, offs_m, m_ok, offs_d)
        do = _tile(DO, sdob, sdoh, sdol, b, h, offs_m, m_ok, offs_d)
        o = _tile(Out, sob, soh, sol, b, h, offs_m, m_ok, offs_d)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        tl.store(Delta + bh * L + offs_m, delta, mask=m_ok)
        lse = tl.load(Lse + bh * L + offs_m, mask=m_ok, other=0.0)
        dq = tl.zeros([BM, D], tl.float32)
        for start_n in range(0, L, BN):
            offs_n = start_n + tl.arange(0, BN)
            n_ok = offs_n < L
            ok = m_ok[:, None] & n_ok[None, :]
            k = _tile(K, skb, skh, skl, b, h, offs_n, n_ok, offs_d)
            v = _tile(V, svb, svh, svl, b, h, offs_n, n_ok, offs_d)
            _, ds = _grad_tile(q, k, v, do, lse, delta, _bias_tile(Bias, h, L, offs_m, offs_n, ok), ok, scale, PREC)
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
        tl.store(DQ + b * sgb + h * sgh + offs_m[:, None] * sgl + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
                 mask=m_ok[:, None])

    @triton.jit
    def _bwd_dkdv_kernel(Q, K, V, Bias, DO, Lse, Delta, DK, DV,
                         sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdob, sdoh, sdol, sgb, sgh, sgl,
                         H, L, scale,
                         D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
        pid_n = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_n = pid_n * BN + tl.arange(0, BN)
        offs_d = tl.arange(0, D)
        n_ok = offs_n < L
        k = _tile(K, skb, skh, skl, b, h, offs_n, n_ok, offs_d)
        v = _tile(V, svb, svh, svl, b, h, offs_n, n_ok, offs_d)
        dk = tl.zeros([BN, D], tl.float32)
        dv = tl.zeros([BN, D], tl.float32)
        for start_m in range(0, L, BM):
            offs_m = start_m + tl.arange(0, BM)
            m_ok = offs_m < L
            q = _tile(Q, sqb, sqh, sql, b, h, offs_m, m_ok, offs_d)
            do = _tile(DO, sdob, sdoh, sdol, b, h, offs_m, m_ok, offs_d)
            lse = tl.load(Lse + bh * L + offs_m, mask=m_ok, other=0.0)
            delta = tl.load(Delta + bh * L + offs_m, mask=m_ok, other=0.0)
            ok = m_ok[:, None] & n_ok[None, :]
            p, ds = _grad_tile(q, k, v, do, lse, delta, _bias_tile(Bias, h, L, offs_m, offs_n, ok), ok, scale, PREC)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
        base = b * sgb + h * sgh + offs_n[:, None] * sgl + offs_d[None, :]
        tl.store(DK + base, (dk * scale).to(DK.dtype.element_ty), mask=n_ok[:, None])
        tl.store(DV + base, dv.to(DV.dtype.element_ty), mask=n_ok[:, None])

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
        bias = _bias_tile(Bias, h, L, offs_m, offs_n, ok)
        acc = tl.zeros([BM, BN], tl.float32)
        for b in range(chunk * per_chunk, tl.minimum(chunk * per_chunk + per_chunk, B)):
            bh = b * H + h
            q = _tile(Q, sqb, sqh, sql, b, h, offs_m, m_ok, offs_d)
            k = _tile(K, skb, skh, skl, b, h, offs_n, n_ok, offs_d)
            v = _tile(V, svb, svh, svl, b, h, offs_n, n_ok, offs_d)
            do = _tile(DO, sdob, sdoh, sdol, b, h, offs_m, m_ok, offs_d)
            lse = tl.load(Lse + bh * L + offs_m, mask=m_ok, other=0.0)
            delta = tl.load(Delta + bh * L + offs_m, mask=m_ok, other=0.0)
            _, ds = _grad_tile(q, k, v, do, lse, delta, bias, ok, scale, PREC)
            acc += ds
        tl.store(DBias + (chunk * H + h) * L * L + offs_m[:, None] * L + offs_n[None, :], acc, mask=ok)


    @triton.jit
    def _bwd_pre_kernel(DO, Out, Delta, DQAcc, sdob, sdoh, sdol, sob, soh, sol, sab, sah, sal,
                        H, L, D: tl.constexpr, BM: tl.constexpr):
        # the one-pass backward's preamble: delta = rowsum(dO * O) per row, and the rows of the fp32 dQ
        # accumulator zeroed (the one-pass kernel adds into them)
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_d = tl.arange(0, D)
        m_ok = offs_m < L
        do = _tile(DO, sdob, sdoh, sdol, b, h, offs_m, m_ok, offs_d)
        o = _tile(Out, sob, soh, sol, b, h, offs_m, m_ok, offs_d)
        tl.store(Delta + bh * L + offs_m, tl.sum(do.to(tl.float32) * o.to(tl.float32), 1), mask=m_ok)
        tl.store(DQAcc + b * sab + h * sah + offs_m[:, None] * sal + offs_d[None, :], tl.zeros([BM, D], tl.float32),
                 mask=m_ok[:, None])

    @triton.jit
    def _bwd_onepass_kernel(Q, K, V, Bias, DO, Lse, Delta, DQAcc, DK, DV, DBias,
                            sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdob, sdoh, sdol, sgb, sgh, sgl,
                            sab, sah, sal,
                            B, H, L, scale, per_chunk,
                            D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
                            ATOMIC_DQ: tl.constexpr, DBIAS_REGS: tl.constexpr):
        # one program owns key block pid_n of head h for the images of one batch chunk: per image it sweeps
        # the query blocks, keeps dK/dV in registers, adds dQ atomically (ATOMIC_DQ) and adds dS into its own
        # columns of the chunk's d(bias) partial sum (no other program touches them: plain loads and stores;
        # DBIAS_REGS, where one query block covers the sequence: summed in registers, stored once at the end)
        pid_n = tl.program_id(0)
        h = tl.program_id(1)
        chunk = tl.program_id(2)
        offs_n = pid_n * BN + tl.arange(0, BN)
        offs_d = tl.arange(0, D)
        n_ok = offs_n < L
        dbias_cols = DBias + (chunk * H + h) * L * L + offs_n[None, :]
        first = chunk * per_chunk
        dbias_acc = tl.zeros([BM, BN], tl.float32)  # DBIAS_REGS only
        for b in range(first, tl.minimum(first + per_chunk, B)):
            if not DBIAS_REGS:
                # the previous image's d(bias) stores, made by other threads of this program, are read below
                tl.debug_barrier()
            bh = b * H + h
            # images after the chunk's first add to the d(bias) sum already stored; a block, not a scalar: in
            # Triton's interpreter "block & scalar comparison" is an int32 mask, which 3.8's tl.load took and 3.9's
            # refuses (compiled for sm_90 by Triton 3.8 and 3.9, both forms give the same PTX)
            summing = (offs_n * 0 + b) > first
            k = _tile(K, skb, skh, skl, b, h, offs_n, n_ok, offs_d)
            v = _tile(V, svb, svh, svl, b, h, offs_n, n_ok, offs_d)
            dk = tl.zeros([BN, D], tl.float32)
            dv = tl.zeros([BN, D], tl.float32)
            for start_m in range(0, L, BM):
                offs_m = start_m + tl.arange(0, BM)
                m_ok = offs_m < L
                ok = m_ok[:, None] & n_ok[None, :]
                q = _tile(Q, sqb, sqh, sql, b, h, offs_m, m_ok, offs_d)
                do = _tile(DO, sdob, sdoh, sdol, b, h, offs_m, m_ok, offs_d)
                lse = tl.load(Lse + bh * L + offs_m, mask=m_ok, other=0.0)
                delta = tl.load(Delta + bh * L + offs_m, mask=m_ok, other=0.0)
                p, ds = _grad_tile(q, k, v, do, lse, delta, _bias_tile(Bias, h, L, offs_m, offs_n, ok), ok, scale,
                                   PREC)
                dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
                if ATOMIC_DQ:
                    tl.atomic_add(DQAcc + b * sab + h * sah + offs_m[:, None] * sal + offs_d[None, :],
                                  tl.dot(ds.to(k.dtype), k, input_precision=PREC) * scale, mask=m_ok[:, None],
                                  sem="relaxed")
                if DBIAS_REGS:
                    dbias_acc += ds
                else:
                    dbias = dbias_cols + offs_m[:, None] * L
                    # the chunk's first image starts the sum (nothing is read: the buffer is never zeroed)
                    tl.store(dbias, ds + tl.load(dbias, mask=ok & summing[None, :], other=0.0), mask=ok)
            base = b * sgb + h * sgh + offs_n[:, None] * sgl + offs_d[None, :]
            tl.store(DK + base, (dk * scale).to(DK.dtype.element_ty), mask=n_ok[:, None])
            tl.store(DV + base, dv.to(DV.dtype.element_ty), mask=n_ok[:, None])
        if DBIAS_REGS:
            rows = tl.arange(0, BM)
            tl.store(dbias_cols + rows[:, None] * L, dbias_acc, mask=(rows < L)[:, None] & n_ok[None, :])


# (BM, BN, num_warps, num_stages) per kernel; ``benchmarks/attention_kernel.py --tune`` measures the choices
CONFIGS: dict[str, tuple[int, int, int, int]] = {  # best of a grid on one H200, B 128 x 12 heads x 197 x 64, bf16
    "fwd": (64, 32, 4, 3), "dkdv": (64, 32, 4, 2), "dq": (64, 32, 4, 3), "dbias": (64, 64, 4, 3),
    # not tuned yet: the dK/dV kernel's config for the kernels that do its work and more
    "onepass": (64, 32, 4, 2), "twopass": (64, 32, 4, 2),
}
DBIAS_CHUNKS = 4  # the batch is split over this many programs per d(bias) tile (partial sums added after)

#: The backward kernels: ``split`` (dQ, dK/dV and d(bias) kernels), ``twopass`` (the dQ kernel, then one kernel
#: for dK/dV and d(bias)) or ``onepass`` (one kernel for all four, dQ added atomically). Read when the backward
#: runs; the environment variable ``BEIT_ATTN_BWD`` sets it at import. ``split`` stays the default until a GPU
#: measures the others faster (``benchmarks/attention_kernel.py --bwd split,twopass,onepass``).
BACKWARDS = ("split", "twopass", "onepass")
BWD = os.environ.get("BEIT_ATTN_BWD", "split")
#: Batch chunks of the one- and two-pass kernels: programs run over (key block, head, chunk), each chunk's images
#: one after another, and the chunks' d(bias) partial sums are added after. None: enough chunks for about
#: ``ONEPASS_WAVES`` programs per multiprocessor.
ONEPASS_CHUNKS: int | None = None
ONEPASS_WAVES = 4


def _cfg(kernel: str, d: int) -> tuple[int, int, int, int]:
    bm, bn, warps, stages = CONFIGS[kernel]
    if d > 64:  # keep the [BM, d] and [BN, d] tiles within shared memory
        bm, bn = min(bm, 64), min(bn, 64)
    return bm, bn, warps, stages


def _candidates(kernel: str, d: int) -> list[tuple[int, int, int, int]]:
    """Launch configs to try in order: the tuned one, fewer pipeline stages, then smaller tiles (each needs less
    shared memory: fp32 inputs at head dim 128 need ~4x what the bf16 tuning at 64 did)."""
    bm, bn, warps, stages = _cfg(kernel, d)
    out = [(bm, bn, warps, s) for s in range(stages, 0, -1)] + [(min(bm, 32), min(bn, 32), warps, 1), (16, 16, 4, 1)]
    return list(dict.fromkeys(out))


#: (kernel, head dim, dtype, device) -> the first launch config of ``_candidates`` that fitted the GPU
_FITTED: dict[tuple[str, int, torch.dtype, torch.device], tuple[int, int, int, int]] = {}


def _launch(name: str, kernel: Any, grid: Any, like: torch.Tensor, d: int, *args: Any,
            tile_consts: Any = None, **consts: Any) -> None:
    """``kernel[grid(BM, BN)](*args, **consts, **tile_consts(BM, BN))`` with the first config of
    :func:`_candidates` whose shared memory fits this GPU (Triton raises ``OutOfResources`` before launching, so
    a retry is safe), remembered per kernel, head dim, dtype and device. The tuned configs fit an H100/H200 in
    bf16; other dtypes, head dims and GPUs with less shared memory take a smaller one instead of failing."""
    key = (name, d, like.dtype, like.device)
    tries = [_FITTED[key]] if key in _FITTED else _candidates(name, d)
    for i, (bm, bn, warps, stages) in enumerate(tries):
        try:
            more = tile_consts(bm, bn) if tile_consts is not None else {}
            kernel[grid(bm, bn)](*args, **consts, **more, BM=bm, BN=bn, num_warps=warps, num_stages=stages)
        except OutOfResources:
            if i == len(tries) - 1:
                raise
            continue
        _FITTED[key] = (bm, bn, warps, stages)
        return


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 inputs: exact fp32 products, no TF32


def _inner(t: torch.Tensor) -> torch.Tensor:
    """The kernels read rows with unit stride in the last dim; views of a qkv projection already have it."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _bhl(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, token) strides of a ``[B, L, H, d]`` tensor (a slice of the packed ``[B, L, 3, H, d]``)."""
    return t.stride(0), t.stride(2), t.stride(1)


@torch.library.custom_op("beit::fused_bias_attention_fwd", mutates_args=())
def _fwd(qkv: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, L, _, H, d = qkv.shape
    q, k, v = qkv.unbind(2)  # [B, L, H, d] views: read in place through their strides
    out = torch.empty((B, L, H, d), device=qkv.device, dtype=qkv.dtype)
    lse = torch.empty((B, H, L), device=qkv.device, dtype=torch.float32)
    _launch("fwd", _fwd_kernel, lambda bm, bn: (triton.cdiv(L, bm), B * H), qkv, d,
            q, k, v, bias, out, lse, *_bhl(q), *_bhl(k), *_bhl(v), *_bhl(out), H, L, d ** -0.5,
            D=d, PREC=_prec(qkv.dtype))
    return out, lse


@_fwd.register_fake
def _(qkv, bias):  # noqa: ANN001, ANN202
    B, L, _, H, d = qkv.shape
    return qkv.new_empty((B, L, H, d)), qkv.new_empty((B, H, L), dtype=torch.float32)


@torch.library.custom_op("beit::fused_bias_attention_bwd", mutates_args=())
def _bwd(do: torch.Tensor, qkv: torch.Tensor, bias: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
         ) -> tuple[torch.Tensor, torch.Tensor]:
    if BWD not in BACKWARDS:
        raise ValueError(f"attention_triton.BWD (environment variable BEIT_ATTN_BWD) is {BWD!r}; "
                         f"one of {', '.join(BACKWARDS)}")
    B, L, _, H, d = qkv.shape
    do = _inner(do)
    q, k, v = qkv.unbind(2)
    dqkv = torch.empty((B, L, 3, H, d), device=qkv.device, dtype=qkv.dtype)  # the qkv projection's layout
    dq, dk, dv = dqkv.unbind(2)
    delta = torch.empty((B, H, L), device=qkv.device, dtype=torch.float32)  # written by the dQ / pre kernel
    if BWD != "split":
        return dqkv, _bwd_fused(BWD == "onepass", do, q, k, v, bias, out, lse, delta, dq, dk, dv).to(bias.dtype)
    chunks = min(DBIAS_CHUNKS, B)
    per_chunk = triton.cdiv(B, chunks)
    chunks = triton.cdiv(B, per_chunk)
    dbias = torch.empty((chunks, H, L, L), device=qkv.device, dtype=torch.float32)
    common = (*_bhl(q), *_bhl(k), *_bhl(v), *_bhl(do))
    prec = _prec(qkv.dtype)
    _launch("dq", _bwd_dq_kernel, lambda bm, bn: (triton.cdiv(L, bm), B * H), qkv, d,
            q, k, v, bias, do, out, lse, delta, dq, *common, *_bhl(out), *_bhl(dq), H, L, d ** -0.5, D=d, PREC=prec)
    _launch("dkdv", _bwd_dkdv_kernel, lambda bm, bn: (triton.cdiv(L, bn), B * H), qkv, d,
            q, k, v, bias, do, lse, delta, dk, dv, *common, *_bhl(dk), H, L, d ** -0.5, D=d, PREC=prec)
    _launch("dbias", _bwd_dbias_kernel, lambda bm, bn: (triton.cdiv(L, bm), triton.cdiv(L, bn), H * chunks), qkv, d,
            q, k, v, bias, do, lse, delta, dbias, *common, B, H, L, d ** -0.5, per_chunk, D=d, PREC=prec)
    return dqkv, (dbias[0] if chunks == 1 else dbias.sum(0)).to(bias.dtype)


def _onepass_chunks(B: int, H: int, L: int, d: int, device: torch.device, kernel: str = "onepass") -> int:
    """:data:`ONEPASS_CHUNKS`, or as many batch chunks as give about :data:`ONEPASS_WAVES` programs a
    multiprocessor with ``kernel``'s configured key block (``onepass`` or ``twopass``; at most one chunk an
    image)."""
    if ONEPASS_CHUNKS is not None:
        return max(1, min(ONEPASS_CHUNKS, B))
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    programs = H * triton.cdiv(L, _cfg(kernel, d)[1])
    return max(1, min(B, round(ONEPASS_WAVES * sms / programs)))


def _bwd_fused(onepass: bool, do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
               out: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor,
               dv: torch.Tensor) -> torch.Tensor:
    """The backward with dK, dV and d(bias) from one pass over the score tiles (FlashAttention-2's Algorithm 2,
    Dao 2023, with the bias; the loop order of the backward in Triton's fused-attention tutorial), and dQ from
    the same pass (``onepass``) or from the dQ kernel run before it (``twopass``).

    q, k, v, do, out, dq, dk, dv are ``[B, L, H, d]`` views (any strides with a unit stride in ``d``), lse and
    delta ``[B, H, L]`` fp32, bias ``[H, L, L]`` contiguous. Writes dq, dk, dv in place and returns d(bias),
    ``[H, L, L]`` fp32, summed over the batch.

    - delta = rowsum(dO * O) comes first, from its own small kernel (``onepass``, which also zeroes an fp32
      ``[B, L, H, d]`` dQ accumulator) or from the dQ kernel (``twopass``);
    - the main kernel runs over (key block, head, batch chunk). For each image of its chunk it loads the key and
      value block, sweeps the query blocks, recomputes P from lse and dS = P * (dO V^T - delta) per tile, and
      accumulates dV += P^T dO and dK += dS^T Q in registers, written once per image; ``onepass`` adds
      dS K / sqrt(d) into the dQ accumulator with relaxed fp32 atomics (each element gets one add per key block:
      the order varies, so dQ may differ from run to run in its last bits), copied into dq at the end;
    - d(bias)[h, :, key block] for a chunk is owned by one program: the chunk's first image stores dS, the
      others add to it (plain loads and stores, no atomics; a barrier at each image makes the previous image's
      stores visible to all the program's threads). Where one query block covers the sequence (``BM >= L``,
      e.g. a 256-row block for BEiT's 197 tokens) the sum stays in registers and is stored once. The chunks'
      partial sums, ``[chunks, H, L, L]`` fp32, are added after (one torch op; none with one chunk), so d(bias)
      is deterministic.
    """
    B, L, H, d = q.shape
    dev = q.device
    name = "onepass" if onepass else "twopass"
    chunks = _onepass_chunks(B, H, L, d, dev, name)
    per_chunk = triton.cdiv(B, chunks)
    chunks = triton.cdiv(B, per_chunk)  # no empty chunk: each one's partial sum is stored by its first image
    dbias = torch.empty((chunks, H, L, L), device=dev, dtype=torch.float32)
    common = (*_bhl(q), *_bhl(k), *_bhl(v), *_bhl(do))
    prec = _prec(q.dtype)
    scale = d ** -0.5
    if onepass:
        dq_acc = torch.empty((B, L, H, d), device=dev, dtype=torch.float32)
        _bwd_pre_kernel[(triton.cdiv(L, 64), B * H)](do, out, delta, dq_acc, *_bhl(do), *_bhl(out), *_bhl(dq_acc),
                                                     H, L, D=d, BM=64, num_warps=4)
    else:
        dq_acc = dq  # not written by the main kernel (ATOMIC_DQ off): the dQ kernel fills it and delta
        _launch("dq", _bwd_dq_kernel, lambda bm, bn: (triton.cdiv(L, bm), B * H), q, d,
                q, k, v, bias, do, out, lse, delta, dq, *common, *_bhl(out), *_bhl(dq), H, L, scale, D=d, PREC=prec)
    _launch(name, _bwd_onepass_kernel, lambda bm, bn: (triton.cdiv(L, bn), H, chunks), q, d,
            q, k, v, bias, do, lse, delta, dq_acc, dk, dv, dbias, *common, *_bhl(dk), *_bhl(dq_acc),
            B, H, L, scale, per_chunk, D=d, PREC=prec, ATOMIC_DQ=onepass,
            tile_consts=lambda bm, bn: {"DBIAS_REGS": bm >= L})
    if onepass:
        dq.copy_(dq_acc)
    return dbias[0] if chunks == 1 else dbias.sum(0)


@_bwd.register_fake
def _(do, qkv, bias, out, lse):  # noqa: ANN001, ANN202
    return qkv.new_empty(qkv.shape), torch.empty_like(bias)


def register_autograd_pair(fwd: Any, bwd: Any) -> None:
    """The autograd formula of a pair of attention custom ops: ``fwd(qkv, bias) -> (out, stats)`` and
    ``bwd(do, qkv, bias, out, stats) -> (dqkv, dbias)`` (``stats``: the forward's softmax statistics, not
    differentiated). Saves qkv, bias and the forward's two outputs. Used by this kernel and ``attention_cudnn``."""

    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
        ctx.save_for_backward(*inputs, *output)

    def backward(ctx, do, dstats):  # noqa: ANN001, ANN202
        return bwd(do, *ctx.saved_tensors)

    fwd.register_autograd(backward, setup_context=setup_context)


register_autograd_pair(_fwd, _bwd)


def _packed(qkv: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The op without the input checks (tests run it on CPU tensors in Triton's interpreter)."""
    H, L = qkv.shape[3], qkv.shape[1]
    bias = bias.reshape(H, L, L)
    if not bias.is_contiguous():
        bias = bias.contiguous()
    return _fwd(_inner(qkv), bias)[0]


def fused_bias_attention_packed(qkv: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d) + bias) v`` from the qkv projection's own layout, with no copies around it.

    Args:
        qkv: ``[B, L, 3, H, d]`` CUDA tensor (q, k, v along dim 2; fp16, bf16 or fp32; unit stride in ``d``),
            e.g. ``linear(x).reshape(B, L, 3, H, d)``. Its gradient comes back in the same layout.
        bias: ``[H, L, L]`` or ``[1, H, L, L]``, shared by the batch (any float dtype; added in fp32). Its
            gradient is summed over the batch inside the kernel.

    Returns:
        ``[B, L, H, d]`` in qkv's dtype, contiguous: ``.flatten(2)`` is the output projection's input.

    Raises:
        ValueError: for inputs :func:`supported_packed` refuses (check it first to fall back).
    """
    if not supported_packed(qkv, bias):
        raise ValueError(f"fused_bias_attention does not take qkv {tuple(qkv.shape)} {qkv.dtype} on {qkv.device} "
                         f"with bias {None if bias is None else tuple(bias.shape)}")
    return _packed(qkv, bias)


def fused_bias_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d) + bias) v`` in one Triton kernel; gradients for q, k, v and bias.

    The ``[B, H, L, d]`` interface of :func:`fused_bias_attention_packed`: q, k, v are stacked into its layout
    first (one copy; the model calls the packed form).

    Args:
        q, k, v: ``[B, H, L, d]`` CUDA tensors of one dtype (fp16, bf16 or fp32).
        bias: ``[H, L, L]`` or ``[1, H, L, L]``, shared by the batch.

    Returns:
        ``[B, H, L, d]`` in q's dtype (a transposed view of a ``[B, L, H, d]`` tensor).

    Raises:
        ValueError: for inputs :func:`supported` refuses (check it first to fall back).
    """
    if not supported(q, k, v, bias):
        raise ValueError(f"fused_bias_attention does not take q {tuple(q.shape)} {q.dtype} on {q.device} with "
                         f"bias {None if bias is None else tuple(bias.shape)}")
    return _packed(torch.stack((q, k, v), dim=0).permute(1, 3, 0, 2, 4), bias).transpose(1, 2)
