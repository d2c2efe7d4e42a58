"""Tile sizes for the fused-bias attention kernels: time each kernel alone over a grid of launch configs.

    python benchmarks/attention_kernel_tune.py --json $OUT/tune.json

Prints, for BEiT-B's pre-training shape (B 128, 12 heads, 197 tokens, d 64, bf16), the time of the forward,
dK/dV, dQ and d(bias) kernels for each (BM, BN, warps, stages) and d(bias) batch split, best first; the
chosen values go into ``beit.models.attention_triton.CONFIGS``.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import triton
from triton.testing import do_bench

from beit.models import attention_triton as T


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="")
    ap.add_argument("--shape", default="128,12,197,64")
    args = ap.parse_args()
    B, H, L, d = map(int, args.shape.split(","))
    qkv = torch.randn(B, L, 3, H, d, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    bias = torch.randn(H, L, L, device="cuda")
    out, lse = T._fwd(q, k, v, bias)
    do = torch.randn_like(out)
    delta = (do.float() * out.float()).sum(-1).contiguous()
    dq, dk, dv = torch.empty_like(out), torch.empty_like(out), torch.empty_like(out)
    common = (*T._strides(q), *T._strides(k), *T._strides(v), *T._strides(do))
    scale = d ** -0.5

    def launch(kernel: str, bm: int, bn: int, warps: int, stages: int, chunks: int = 8):
        kw = dict(D=d, BM=bm, BN=bn, PREC="tf32", num_warps=warps, num_stages=stages)
        if kernel == "fwd":
            o = torch.empty_like(out)
            return lambda: T._fwd_kernel[(triton.cdiv(L, bm), B * H)](
                q, k, v, bias, o, lse, *T._strides(q), *T._strides(k), *T._strides(v), *T._strides(o),
                H, L, scale, **kw)
        if kernel == "dkdv":
            return lambda: T._bwd_dkdv_kernel[(triton.cdiv(L, bn), B * H)](
                q, k, v, bias, do, lse, delta, dk, dv, *common, H, L, scale, **kw)
        if kernel == "dq":
            return lambda: T._bwd_dq_kernel[(triton.cdiv(L, bm), B * H)](
                q, k, v, bias, do, lse, delta, dq, *common, H, L, scale, **kw)
        per = triton.cdiv(B, chunks)
        n = triton.cdiv(B, per)
        db = torch.empty((n, H, L, L), device="cuda")
        return lambda: T._bwd_dbias_kernel[(triton.cdiv(L, bm), triton.cdiv(L, bn), H * n)](
            q, k, v, bias, do, lse, delta, db, *common, B, H, L, scale, per, **kw)

    tiles = [(64, 64), (128, 64), (64, 128), (128, 128), (64, 32), (32, 64), (128, 32), (32, 32)]
    results: dict[str, list] = {}
    for kernel in ("fwd", "dkdv", "dq", "dbias"):
        rows = []
        chunk_opts = (4, 8, 16, 32) if kernel == "dbias" else (8,)
        for (bm, bn), warps, stages, chunks in itertools.product(tiles, (4, 8), (1, 2, 3), chunk_opts):
            try:
                ms = do_bench(launch(kernel, bm, bn, warps, stages, chunks), warmup=5, rep=20)
            except Exception as e:  # noqa: BLE001 - out of shared memory etc.: skip that config
                ms = float("inf")
                err = type(e).__name__
            else:
                err = ""
            rows.append({"bm": bm, "bn": bn, "warps": warps, "stages": stages, "chunks": chunks, "ms": ms, "err": err})
        rows.sort(key=lambda r: r["ms"])
        results[kernel] = rows
        base = next(r for r in rows if (r["bm"], r["bn"], r["warps"], r["stages"], r["chunks"]) == (64, 64, 4, 2, 8))
        print(f"{kernel}: default 64x64 w4 s2 {base['ms']:.3f} ms; best: " + "; ".join(
            f"{r['bm']}x{r['bn']} w{r['warps']} s{r['stages']} c{r['chunks']} {r['ms']:.3f}" for r in rows[:4]),
            flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
