"""The fused-bias attention kernel on the GPU: numerics against the eager reference, then speed.

    python benchmarks/attention_kernel.py --json $OUT/attention_kernel.json [--bwd split,twopass,onepass]

1. Numerics: for BEiT's shapes (L = 197, 65, 577, 1025: tiles never divide them) the Triton kernel's output and
   its four gradients (dq, dk, dv, d(bias) summed over the batch) against ``eager_attention`` computed in fp64
   from the same inputs, next to SDPA's error on the same inputs: the kernel passes when its error is within
   the tolerance below and no worse than 2x SDPA's at the same precision. Once per backward of ``--bwd``
   (``attention_triton.BWD``: the split kernels, or the two- / one-pass kernels).
2. Speed of one attention forward+backward at BEiT-B's pre-training shape (B 128, 12 heads, 197 tokens, d 64,
   bf16): SDPA with the bias as a float mask (today's path), our kernel ([B, H, L, d] interface, and the packed
   [B, L, 3, H, d] form the model calls, once per backward), FlexAttention with the bias as a
   captured tensor (its learnable-bias support), and SDPA with no bias (flash: the bound).
3. The backward op alone (``beit::fused_bias_attention_bwd``, all its kernels and the small ops around them: the
   per-layer backward of a training step's profile) for each backward, and for the two- and one-pass ones at
   each batch split of ``--chunks`` (``attention_triton.ONEPASS_CHUNKS``; "auto" is its default).
4. With NVIDIA's ``cudnn`` package installed (``pip install nvidia-cudnn-frontend``): ``attn_impl=cudnn_bias``
   (``attention_cudnn``, cuDNN's fused kernels with the bias and its batch-summed gradient) through the same
   numerics check (bf16 and fp16: cuDNN takes no fp32), in the speed table, and its backward op alone.
The full training steps with each kernel are rows of ``train_throughput.py`` (``ours_mim_fused_c``,
``ours_mim_cudnnbias_c`` ...).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch
import torch.nn.functional as F

from beit.models import attention_cudnn as CU
from beit.models import attention_triton as T
from beit.models.attention import eager_attention, sdpa_attention
from beit.models.attention_triton import fused_bias_attention, fused_bias_attention_packed

SHAPES = [(16, 12, 197, 64), (16, 12, 65, 64), (4, 16, 577, 64), (2, 12, 1025, 64), (8, 6, 197, 32),
          (4, 8, 197, 128)]
TOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 1e-3}  # max |err| / max |ref|


def _grads(fn, q, k, v, bias, g):
    q, k, v, bias = (t.detach().clone().requires_grad_() for t in (q, k, v, bias))
    out = fn(q, k, v, bias)
    grads = torch.autograd.grad(out, (q, k, v, bias), g)
    return [out.detach(), *grads]


def _same(a: torch.Tensor, b: torch.Tensor, exact: bool) -> bool:
    """Equal, or (dQ of the one-pass backward, added atomically in a varying order) equal up to rounding: within
    8 units in the last place of the dtype at the tensor's largest value."""
    if exact:
        return torch.equal(a, b)
    return (a.double() - b.double()).abs().max().item() <= 8 * torch.finfo(a.dtype).eps * b.double().abs().max().item()


NAMES = ["out", "dq", "dk", "dv", "dbias"]  # what _grads returns, in its order


def _case(B: int, H: int, L: int, d: int, dtype: torch.dtype) -> tuple:
    """Seeded inputs of one shape in the model's layout (q, k, v permuted views of one ``[B, L, 3, H, d]``), and
    the fp64 eager reference's output and gradients."""
    torch.manual_seed(0)
    qkv = torch.randn(B, L, 3, H, d, device="cuda").to(dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    bias = torch.randn(1, H, L, L, device="cuda")
    g = torch.randn(B, H, L, d, device="cuda").to(dtype)
    ref = _grads(lambda *a: eager_attention(*a), *(t.double() for t in (q, k, v, bias)), g.double())
    return q, k, v, bias, g, ref


def _errors(row: dict, ref: list, ours: list, sdpa: list, dtype: torch.dtype) -> bool:
    """Each result's max error relative to the reference's largest value, ours and SDPA's, into ``row``; whether
    ours is within the tolerance and no worse than 2x SDPA's."""
    ok = True
    for n, r, a, sd in zip(NAMES, ref, ours, sdpa):
        scale = r.abs().max().item()
        row[n] = {"ours": (a.double() - r).abs().max().item() / scale,
                  "sdpa": (sd.double() - r).abs().max().item() / scale}
        ok &= row[n]["ours"] <= TOL[dtype] and row[n]["ours"] <= max(2 * row[n]["sdpa"], TOL[dtype] / 10)
    return ok


def _say(label: str, row: dict) -> None:
    print(f"{label:8s} {row['dtype']:8s} {str(tuple(row['shape'])):20s} " + "  ".join(
        f"{n} {row[n]['ours']:.1e} (sdpa {row[n]['sdpa']:.1e})" for n in NAMES)
        + f"  {'PASS' if row['pass'] else 'FAIL'}", flush=True)


def check(dtype: torch.dtype, bwd: str) -> list[dict]:
    T.BWD = bwd
    rows = []
    for B, H, L, d in SHAPES:
        q, k, v, bias, g, ref = _case(B, H, L, d, dtype)
        ours = _grads(lambda q, k, v, b: fused_bias_attention(q, k, v, b), q, k, v, bias, g)
        sdpa = _grads(lambda q, k, v, b: sdpa_attention(q, k, v, b.to(q.dtype)), q, k, v, bias, g)
        row = {"shape": [B, H, L, d], "dtype": str(dtype).split(".")[-1], "bwd": bwd}
        ok = _errors(row, ref, ours, sdpa, dtype)
        # the packed form the model calls reads/writes the projection's layout: the same numbers as above
        packed = _grads(lambda q, k, v, b: fused_bias_attention_packed(
            torch.stack((q, k, v), 2).transpose(1, 3), b).transpose(1, 2), q, k, v, bias, g)
        row["packed_equals_unpacked"] = all(_same(a, p, exact=not (bwd == "onepass" and n == "dq"))
                                            for n, a, p in zip(NAMES, ours, packed))
        row["pass"] = bool(ok and row["packed_equals_unpacked"])
        rows.append(row)
        _say(bwd, row)
    return rows


def _refusals(kind: str | None = None) -> list[str]:
    """The graphs (``kind``: fwd, bwd, or both) cuDNN refused so far (``attention_cudnn`` ran the Triton kernel
    for them)."""
    return [str(p) for k, p in CU._PLANS.items() if isinstance(p, Exception) and kind in (None, k[0])]


def check_cudnn(dtype: torch.dtype) -> list[dict]:
    """``cudnn_bias_attention_packed`` against fp64 eager, with the tolerance and SDPA rule of :func:`check`."""
    rows = []
    for B, H, L, d in SHAPES:
        q, k, v, bias, g, ref = _case(B, H, L, d, dtype)
        row = {"shape": [B, H, L, d], "dtype": str(dtype).split(".")[-1], "bwd": "cudnn"}
        CU._PLANS.clear()  # this shape's refusals on their own
        try:
            with warnings.catch_warnings():  # a graph cuDNN refuses runs the Triton kernel: said below, once
                warnings.simplefilter("ignore", RuntimeWarning)
                ours = _grads(lambda q, k, v, b: CU.cudnn_bias_attention_packed(
                    torch.stack((q, k, v), 2).transpose(1, 3), b).transpose(1, 2), q, k, v, bias, g)
            if refused := _refusals():
                raise RuntimeError("cuDNN refused, the Triton kernel ran: " + " | ".join(refused)[:600])
        except Exception as e:  # noqa: BLE001 - a refused shape is a result, not the end of the run
            row.update(error=f"{type(e).__name__}: {str(e)[:600]}", **{"pass": False})
            rows.append(row)
            print(f"cudnn    {row['dtype']:8s} {str((B, H, L, d)):20s} FAILED {row['error']}", flush=True)
            continue
        sdpa = _grads(lambda q, k, v, b: sdpa_attention(q, k, v, b.to(q.dtype)), q, k, v, bias, g)
        row["pass"] = _errors(row, ref, ours, sdpa, dtype)
        rows.append(row)
        _say("cudnn", row)
    return rows


def _bench(fn, args, steps: int = 30) -> float:
    for _ in range(5):
        fn(*args)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn(*args)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps * 1e3


def speed(bwds: list[str], B: int = 128, H: int = 12, L: int = 197, d: int = 64) -> dict:
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention)
    CU._PLANS.clear()  # refusals seen here are of this shape's graphs
    qkv = torch.randn(B, L, 3, H, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(1, H, L, L, device="cuda", requires_grad=True)
    g = torch.randn(B, H, L, d, device="cuda", dtype=torch.bfloat16)

    def run(kind: str):
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if kind == "sdpa_bias":
            out = sdpa_attention(q, k, v, bias)
        elif kind == "fused":
            out = fused_bias_attention(q, k, v, bias)
        elif kind == "fused_packed":  # what the model calls: no stack/transpose copies around the kernels
            out = fused_bias_attention_packed(qkv, bias).transpose(1, 2)
        elif kind == "cudnn_packed":  # attn_impl=cudnn_bias, as the model calls it
            out = CU.cudnn_bias_attention_packed(qkv, bias).transpose(1, 2)
        elif kind == "flex":
            b3 = bias[0].to(torch.bfloat16)

            def score_mod(score, b, h, qi, ki):  # noqa: ANN001, ANN202
                return score + b3[h, qi, ki]

            out = flex(q.contiguous(), k.contiguous(), v.contiguous(), score_mod=score_mod)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        out.backward(g)

    res = {}
    rows = [("sdpa_bias", bwds[0]), ("fused", bwds[0]), *(("fused_packed", b) for b in bwds), ("flex", bwds[0]),
            *((("cudnn_packed", bwds[0]),) if CU.HAS_CUDNN_FRONTEND else ()), ("sdpa_nobias", bwds[0])]
    for kind, bwd in rows:
        T.BWD = bwd
        name = f"{kind}[{bwd}]" if kind.startswith("fused") else kind
        torch.cuda.reset_peak_memory_stats()
        try:
            ms = _bench(run, (kind,))
            res[name] = {"ms": ms, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
            if kind == "cudnn_packed" and _refusals():  # timed, but it was the Triton kernel
                res[name]["fell_back"] = _refusals()
                print(f"attention fwd+bwd {name:22s} NOTE: cuDNN refused, the Triton kernel ran: {_refusals()}")
            print(f"attention fwd+bwd {name:22s} {ms:7.3f} ms  peak {res[name]['peak_gib']:.2f} GiB", flush=True)
        except Exception as e:  # noqa: BLE001 - one failing peer must not hide the others
            res[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(f"attention fwd+bwd {name:22s} FAILED {res[name]['error']}", flush=True)
    return res


def backward_only(bwds: list[str], chunk_opts: list[int | None], B: int = 128, H: int = 12, L: int = 197,
                  d: int = 64) -> dict:
    """The backward op alone, per backward (and batch split for the two- and one-pass kernels), in ms."""
    qkv = torch.randn(B, L, 3, H, d, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(H, L, L, device="cuda")
    out, lse = T._fwd(qkv, bias)
    do = torch.randn_like(out)
    res = {}
    for bwd in bwds:
        for chunks in (chunk_opts if bwd != "split" else [None]):
            T.BWD, T.ONEPASS_CHUNKS = bwd, chunks
            name = bwd if bwd == "split" else f"{bwd} chunks={'auto' if chunks is None else chunks}"
            if bwd != "split":
                name += f" ({T._onepass_chunks(B, H, L, d, qkv.device, bwd)})"
            try:
                ms = _bench(T._bwd, (do, qkv, bias, out, lse), steps=50)
                res[name] = {"ms": ms}
                print(f"attention bwd only {name:28s} {ms:7.3f} ms  ({ms / B * 1e3:.2f} us an image)", flush=True)
            except Exception as e:  # noqa: BLE001 - one failing backward must not hide the others
                res[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                print(f"attention bwd only {name:28s} FAILED {res[name]['error']}", flush=True)
    T.ONEPASS_CHUNKS = None
    if CU.HAS_CUDNN_FRONTEND:
        try:
            out_c, stats = CU._fwd(qkv, bias)
            ms = _bench(CU._bwd, (torch.randn_like(out_c), qkv, bias, out_c, stats), steps=50)
            res["cudnn"] = {"ms": ms, **({"fell_back": _refusals("bwd")} if _refusals("bwd") else {})}
            print(f"attention bwd only {'cudnn':28s} {ms:7.3f} ms  ({ms / B * 1e3:.2f} us an image)", flush=True)
        except Exception as e:  # noqa: BLE001
            res["cudnn"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(f"attention bwd only {'cudnn':28s} FAILED {res['cudnn']['error']}", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default="")
    ap.add_argument("--bwd", default=",".join(T.BACKWARDS),
                    help=f"comma-separated backwards to check and time, of {', '.join(T.BACKWARDS)} (default: all)")
    ap.add_argument("--chunks", default="auto",
                    help="comma-separated batch splits to time the two- and one-pass backwards at (auto or numbers)")
    ap.add_argument("--skip-check", action="store_true", help="timings only")
    args = ap.parse_args()
    bwds = args.bwd.split(",")
    if unknown := sorted(set(bwds) - set(T.BACKWARDS)):
        ap.error(f"--bwd: unknown {', '.join(unknown)}; one of {', '.join(T.BACKWARDS)}")
    chunk_opts = [None if c == "auto" else int(c) for c in args.chunks.split(",")]
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    rows = [] if args.skip_check else [r for bwd in bwds for dt in (torch.bfloat16, torch.float32)
                                       for r in check(dt, bwd)]
    if not CU.HAS_CUDNN_FRONTEND:
        print("cudnn_bias: the cudnn package (nvidia-cudnn-frontend) is not installed: not checked or timed")
    elif not args.skip_check:
        rows += [r for dt in (torch.bfloat16, torch.float16) for r in check_cudnn(dt)]
    res = {"numerics": rows, "speed": speed(bwds), "backward_only": backward_only(bwds, chunk_opts),
           "all_pass": bool(rows) and all(r["pass"] for r in rows)}
    if rows:
        print(f"numerics: {'ALL PASS' if res['all_pass'] else 'SOME FAIL'}")
        for bwd in sorted({r["bwd"] for r in rows}, key=[*bwds, "cudnn"].index):
            print(f"numerics {bwd}: " + ("pass" if all(r["pass"] for r in rows if r["bwd"] == bwd) else "FAIL"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
