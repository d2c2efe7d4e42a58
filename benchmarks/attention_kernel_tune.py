"""Tile sizes for the fused-bias attention kernels: time each kernel alone over a grid of launch configs.

    python benchmarks/attention_kernel_tune.py --json $OUT/tune.json [--kernels onepass,twopass]

Prints, for BEiT-B's pre-training shape (B 128, 12 heads, 197 tokens, d 64, bf16, q/k/v read from the packed
``[B, L, 3, H, d]`` projection as the model calls them), the time of the forward, dK/dV, dQ and d(bias) kernels
and of the one- and two-pass backward kernels (``onepass``: dK/dV, dQ by atomics and d(bias); ``twopass``: the
same without dQ) for each (BM, BN, warps, stages), best first; for the d(bias) kernel and the one- and two-pass
kernels also each batch split (``chunks``; the latter two at their automatic split first, then the best four
configs at each split of ``--chunks``; they also try one query block over the whole sequence, which keeps the
d(bias) sum in registers). The chosen values go into ``beit.models.attention_triton.CONFIGS``
(and ``DBIAS_CHUNKS`` / ``ONEPASS_CHUNKS``).
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import triton
from triton.testing import do_bench

from beit.models import attention_triton as T

KERNELS = ("fwd", "dkdv", "dq", "dbias", "onepass", "twopass")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="")
    ap.add_argument("--shape", default="128,12,197,64")
    ap.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated, of {', '.join(KERNELS)}")
    ap.add_argument("--chunks", default="2,4,6,8,12,16,32", help="batch splits for the one- and two-pass kernels")
    args = ap.parse_args()
    B, H, L, d = map(int, args.shape.split(","))
    qkv = torch.randn(B, L, 3, H, d, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.unbind(2)
    bias = torch.randn(H, L, L, device="cuda")
    out, lse = T._fwd(qkv, bias)
    do = torch.randn_like(out)
    delta = (do.float() * out.float()).sum(-1).transpose(1, 2).contiguous()  # [B, H, L]
    dq, dk, dv = torch.empty_like(qkv).unbind(2)
    dq_acc = torch.zeros((B, L, H, d), device="cuda")
    common = (*T._bhl(q), *T._bhl(k), *T._bhl(v), *T._bhl(do))
    scale = d ** -0.5

    def launch(kernel: str, bm: int, bn: int, warps: int, stages: int, chunks: int):
        kw = dict(D=d, BM=bm, BN=bn, PREC="tf32", num_warps=warps, num_stages=stages)
        if kernel == "fwd":
            o = torch.empty_like(out)
            return lambda: T._fwd_kernel[(triton.cdiv(L, bm), B * H)](
                q, k, v, bias, o, lse, *T._bhl(q), *T._bhl(k), *T._bhl(v), *T._bhl(o), H, L, scale, **kw)
        if kernel == "dkdv":
            return lambda: T._bwd_dkdv_kernel[(triton.cdiv(L, bn), B * H)](
                q, k, v, bias, do, lse, delta, dk, dv, *common, *T._bhl(dk), H, L, scale, **kw)
        if kernel == "dq":
            d2 = torch.empty_like(delta)
            return lambda: T._bwd_dq_kernel[(triton.cdiv(L, bm), B * H)](
                q, k, v, bias, do, out, lse, d2, dq, *common, *T._bhl(out), *T._bhl(dq), H, L, scale, **kw)
        per = triton.cdiv(B, chunks)
        n = triton.cdiv(B, per)
        db = torch.empty((n, H, L, L), device="cuda")
        if kernel == "dbias":
            return lambda: T._bwd_dbias_kernel[(triton.cdiv(L, bm), triton.cdiv(L, bn), H * n)](
                q, k, v, bias, do, lse, delta, db, *common, B, H, L, scale, per, **kw)
        # onepass / twopass: the main kernel alone (the dQ accumulator is not re-zeroed: timing only)
        return lambda: T._bwd_onepass_kernel[(triton.cdiv(L, bn), H, n)](
            q, k, v, bias, do, lse, delta, dq_acc, dk, dv, db, *common, *T._bhl(dk), *T._bhl(dq_acc),
            B, H, L, scale, per, ATOMIC_DQ=kernel == "onepass", DBIAS_REGS=bm >= L, **kw)

    def time_one(kernel: str, bm: int, bn: int, warps: int, stages: int, chunks: int) -> dict:
        try:
            ms = do_bench(launch(kernel, bm, bn, warps, stages, chunks), warmup=5, rep=20)
        except Exception as e:  # noqa: BLE001 - out of shared memory etc.: skip that config
            ms, err = float("inf"), type(e).__name__
        else:
            err = ""
        return {"bm": bm, "bn": bn, "warps": warps, "stages": stages, "chunks": chunks, "ms": ms, "err": err}

    def show(r: dict) -> str:
        return f"{r['bm']}x{r['bn']} w{r['warps']} s{r['stages']} c{r['chunks']} {r['ms']:.3f}"

    tiles = [(64, 64), (128, 64), (64, 128), (128, 128), (64, 32), (32, 64), (128, 32), (32, 32)]
    chunk_opts = [int(c) for c in args.chunks.split(",")]
    results: dict[str, list] = {}
    for kernel in args.kernels.split(","):
        rows = []
        # one- and two-pass: also one query block over the whole sequence (d(bias) summed in registers)
        wide = [(triton.next_power_of_2(L), bn) for bn in (16, 32, 64)] if kernel in ("onepass", "twopass") else []
        for (bm, bn), warps, stages in itertools.product(tiles + wide, (4, 8), (1, 2, 3)):
            if kernel == "dbias":
                rows += [time_one(kernel, bm, bn, warps, stages, c) for c in (4, 8, 16, 32)]
            elif kernel in ("onepass", "twopass"):  # the split T.ONEPASS_CHUNKS=None picks for this key block
                programs = H * triton.cdiv(L, bn)
                sms = torch.cuda.get_device_properties(qkv.device).multi_processor_count
                auto = max(1, min(B, round(T.ONEPASS_WAVES * sms / programs)))
                rows.append(time_one(kernel, bm, bn, warps, stages, auto))
            else:
                rows.append(time_one(kernel, bm, bn, warps, stages, 1))
        if kernel in ("onepass", "twopass"):
            rows.sort(key=lambda r: r["ms"])
            for r in rows[:4]:
                rows += [time_one(kernel, r["bm"], r["bn"], r["warps"], r["stages"], c) for c in chunk_opts]
        rows.sort(key=lambda r: r["ms"])
        results[kernel] = rows
        bm, bn, warps, stages = T.CONFIGS[kernel]
        now = [r for r in rows if (r["bm"], r["bn"], r["warps"], r["stages"]) == (bm, bn, warps, stages)]
        print(f"{kernel}: configured {' / '.join(show(r) for r in now[:3])}; best: "
              + "; ".join(show(r) for r in rows[:4]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
