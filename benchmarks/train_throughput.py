"""Training-step throughput: ours vs Hugging Face vs timm, in one process on one GPU.

Every row is a full step: forward, loss, backward, fused AdamW step, under bf16 autocast, on
random data already on the GPU (the loader is measured by loader_throughput.py). Prints a table
(img/s, ratio to the peers, MFU, peak memory) and writes JSON.

    python benchmarks/train_throughput.py --batch 128 --json $OUT/throughput.json
    python benchmarks/train_throughput.py --only ours_mim_cudnn,hf_mim_sdpa   # a subset
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from collections.abc import Callable

import torch
import torch.nn.functional as F

import beit

H100_BF16_DENSE_TFLOPS = 989.0  # spec sheet, SXM; MFU is reported against it
GFLOP_PER_IMG = {"base": 106.0, "large": 370.0}  # fwd+bwd, 224/16, 197 tokens (~3x forward)


def _mask(batch: int, n: int = 196, k: int = 75, device: str = "cuda") -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(0)
    idx = torch.rand(batch, n, generator=g).argsort(dim=1)[:, :k]
    m = torch.zeros(batch, n, dtype=torch.bool)
    m.scatter_(1, idx, True)
    return m.to(device)


def _timeit(step: Callable[[], None], warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def _opt(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), fused=True)


def _compile_blocks(model: torch.nn.Module) -> None:
    """Regional compilation as the engine does it: every block in place, one graph shared by all."""
    from beit.engine.distributed import compile_blocks

    compile_blocks(model)


# ------------------------------------------------------------------------------------------ systems
def ours_mim(batch: int, attn: str = "sdpa", compile: str = "none", bias: bool = True, size: str = "base"):
    kw = dict(head="mim", attn_impl=attn)
    if not bias:
        kw.update(use_shared_rel_pos_bias=False, use_rel_pos_bias=False)
    model = beit.create_model(f"beit_{size}_patch16_224", **kw).cuda().train()
    if compile == "blocks":
        _compile_blocks(model)
    elif compile == "full":
        model = torch.compile(model)
    opt = _opt(model)
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    mask = _mask(batch)
    labels = torch.randint(0, 8192, (int(mask.sum()),), device="cuda")

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x, mask).float(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def ours_mim_with_tokenizer(batch: int, attn: str = "cudnn", compile: str = "blocks"):
    body = ours_mim(batch, attn=attn, compile=compile)
    tok = _our_tokenizer("fp16")  # the official code's precision; ids agree 99.7% with fp32
    view = torch.rand(batch, 3, 112, 112, device="cuda")

    def step() -> None:
        with torch.no_grad():
            tok.encode(view, validate=False)
        body()

    return step


def hf_mim(batch: int, attn: str = "sdpa"):
    import transformers

    cfg = transformers.BeitConfig(use_mask_token=True, use_shared_relative_position_bias=True,
                                  use_relative_position_bias=False, layer_scale_init_value=0.1)
    model = transformers.BeitForMaskedImageModeling(cfg).cuda().train()
    try:
        model.set_attn_implementation(attn)
    except Exception:
        model.config._attn_implementation = attn
    opt = _opt(model)
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    mask = _mask(batch)
    labels = torch.randint(0, 8192, (int(mask.sum()),), device="cuda")

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(pixel_values=x, bool_masked_pos=mask).logits  # lm_head on all 196 tokens
            loss = F.cross_entropy(logits[mask].float(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _cls_step(model: torch.nn.Module, batch: int, img_size: int = 224):
    opt = _opt(model)
    x = torch.randn(batch, 3, img_size, img_size, device="cuda")
    y = torch.randint(0, 1000, (batch,), device="cuda")

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def timm_cls(batch: int, name: str = "beit_base_patch16_224", compile: bool = False):
    import timm

    model = timm.create_model(name, num_classes=1000).cuda().train()
    if compile:
        model = torch.compile(model)
    return _cls_step(model, batch)


def ours_cls(batch: int, attn: str = "cudnn", compile: str = "blocks", img_size: int = 224):
    model = beit.create_model("beit_base_patch16_224", num_classes=1000, attn_impl=attn,
                              img_size=img_size).cuda().train()
    if compile == "blocks":
        _compile_blocks(model)
    elif compile == "full":
        model = torch.compile(model)
    return _cls_step(model, batch, img_size)


def dalle_pkg_encoder(batch: int):
    import dall_e

    enc = dall_e.Encoder().cuda().eval()  # the package runs its convs in fp16 on CUDA by default
    x = torch.rand(batch, 3, 112, 112, device="cuda")

    def step() -> None:
        with torch.no_grad():
            enc(x).argmax(1)

    return step


def _our_tokenizer(precision: str = "fp16", compile: bool = True):
    """Our DALL-E-compatible encoder (random weights: the FLOPs are those of the official one)."""
    from beit.tokenizers import DalleEncoder, DalleTokenizer

    tok = DalleTokenizer(DalleEncoder(), precision=precision, channels_last=True).cuda()
    if compile:
        tok.encoder.compile()
    return tok


def ours_encoder(batch: int, precision: str = "bf16", compile: bool = True):
    tok = _our_tokenizer(precision, compile)
    x = torch.rand(batch, 3, 112, 112, device="cuda")

    def step() -> None:
        tok.encode(x, validate=False)

    return step


SYSTEMS: dict[str, tuple[str, Callable]] = {
    "ours_mim_sdpa": ("ours MIM step, SDPA (default dispatch), eager", lambda b: ours_mim(b, "sdpa")),
    "ours_mim_cudnn": ("ours MIM step, cuDNN attention, eager", lambda b: ours_mim(b, "cudnn")),
    "ours_mim_sdpa_c": ("ours MIM step, SDPA, compiled blocks", lambda b: ours_mim(b, "sdpa", "blocks")),
    "ours_mim_cudnn_c": ("ours MIM step, cuDNN attention, compiled blocks", lambda b: ours_mim(b, "cudnn", "blocks")),
    "ours_mim_eager_c": ("ours MIM step, attention as plain ops fused by Inductor, compiled blocks",
                         lambda b: ours_mim(b, "eager", "blocks")),
    "ours_mim_sdpa_full": ("ours MIM step, SDPA, whole model compiled", lambda b: ours_mim(b, "sdpa", "full")),
    "ours_mim_nobias_c": ("ours MIM step without rel-pos bias (flash bound), compiled",
                          lambda b: ours_mim(b, "sdpa", "blocks", bias=False)),
    "ours_mim_fused_c": ("ours MIM step, fused_bias Triton attention, compiled blocks",
                         lambda b: ours_mim(b, "fused_bias", "blocks")),
    "ours_mim_cudnnbias_c": ("ours MIM step, cudnn_bias (cuDNN fused attention, bias grad from cuDNN), compiled "
                             "blocks", lambda b: ours_mim(b, "cudnn_bias", "blocks")),
    "ours_mim_tok": ("ours MIM step + DALL-E tokenizer (fp16, compiled) in the loop",
                     lambda b: ours_mim_with_tokenizer(b)),
    "hf_mim_sdpa": ("Hugging Face BeitForMaskedImageModeling, sdpa", lambda b: hf_mim(b, "sdpa")),
    "hf_mim_eager": ("Hugging Face BeitForMaskedImageModeling, eager", lambda b: hf_mim(b, "eager")),
    "timm_beit_cls": ("timm beit_base_patch16_224 classification, eager", lambda b: timm_cls(b)),
    "timm_beit_cls_c": ("timm beit_base_patch16_224 classification, compiled", lambda b: timm_cls(b, compile=True)),
    "timm_vit_cls_c": ("timm vit_base_patch16_224 (no bias), compiled",
                       lambda b: timm_cls(b, "vit_base_patch16_224", True)),
    "ours_cls_c": ("ours BEiT-B classification fine-tune step, cuDNN, compiled blocks", lambda b: ours_cls(b)),
    "ours_mim_large_c": ("ours BEiT-L MIM step, cuDNN, compiled blocks (batch 64)",
                         lambda b: ours_mim(64, "cudnn", "blocks", size="large")),
    "ours_mim_large_sdpa_c": ("ours BEiT-L MIM step, SDPA, compiled blocks (batch 64)",
                              lambda b: ours_mim(64, "sdpa", "blocks", size="large")),
    "ours_mim_large_fused_c": ("ours BEiT-L MIM step, fused_bias, compiled blocks (batch 64)",
                               lambda b: ours_mim(64, "fused_bias", "blocks", size="large")),
    "ours_cls512_sdpa_c": ("ours BEiT-B at 512 px (1025 tokens, per-layer bias: segmentation's backbone), SDPA, "
                           "compiled blocks (batch 16)", lambda b: ours_cls(16, "sdpa", img_size=512)),
    "ours_cls512_fused_c": ("ours BEiT-B at 512 px, fused_bias, compiled blocks (batch 16)",
                            lambda b: ours_cls(16, "fused_bias", img_size=512)),
    "ours_mim_large_cudnnbias_c": ("ours BEiT-L MIM step, cudnn_bias, compiled blocks (batch 64)",
                                   lambda b: ours_mim(64, "cudnn_bias", "blocks", size="large")),
    "ours_cls512_cudnnbias_c": ("ours BEiT-B at 512 px, cudnn_bias, compiled blocks (batch 16)",
                                lambda b: ours_cls(16, "cudnn_bias", img_size=512)),
    "dalle_pkg_enc": ("dall-e package encoder 112px (fp16 convs)", dalle_pkg_encoder),
    "ours_enc_c": ("ours DALL-E encoder 112px, bf16 channels_last, compiled", ours_encoder),
    "ours_enc_fp16_c": ("ours DALL-E encoder 112px, fp16 channels_last, compiled",
                        lambda b: ours_encoder(b, "fp16")),
}


def _profile(key: str, step: Callable[[], None], path: str, steps: int = 3) -> None:
    """Append the ops of ``steps`` steps, by device time (top 30), to ``path``: where a row's step time goes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70)
    with open(path, "a") as f:
        f.write(f"\n===== {key}: {steps} steps, ops by self CUDA time\n{table}\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=6)
    ap.add_argument("--only", default="", help="comma-separated keys of SYSTEMS")
    ap.add_argument("--json", default="")
    ap.add_argument("--profile", default="", help="also write torch.profiler tables (3 steps of each row) to FILE")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True  # the tokenizer's convs pick their fastest algorithms
    keys = [k for k in args.only.split(",") if k] or list(SYSTEMS)
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, batch {args.batch}", flush=True)
    results = {}
    for key in keys:
        desc, build = SYSTEMS[key]
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        step = None
        batch = 64 if "large" in key else 16 if "512" in key else args.batch
        try:
            t_build = time.perf_counter()
            step = build(args.batch)
            sec = _timeit(step, args.warmup, args.steps)
            ips = batch / sec
            mem = torch.cuda.max_memory_allocated() / 2**30
            gflop = GFLOP_PER_IMG["large" if "large" in key else "base"]
            known = "enc" not in key and "512" not in key  # GFLOP_PER_IMG is for 224-px steps
            mfu = ips * gflop / (H100_BF16_DENSE_TFLOPS * 1e3) if known else float("nan")
            results[key] = dict(desc=desc, img_per_s=ips, step_ms=sec * 1e3, peak_gib=mem, mfu=mfu,
                                setup_s=time.perf_counter() - t_build, batch=batch)
            print(f"{key:20s} {ips:8.0f} img/s  {sec * 1e3:7.1f} ms/step  {mem:6.1f} GiB  MFU {mfu:5.1%}  | {desc}",
                  flush=True)
            if args.profile:
                _profile(key, step, args.profile)
        except Exception as e:  # one broken peer must not hide the other rows
            results[key] = dict(desc=desc, error=f"{type(e).__name__}: {e}")
            print(f"{key:20s} FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            traceback.print_exc(limit=3)
        del step
    # the peers a row is compared with, where they ran ([kernel]'s target is a share of ours_mim_nobias_c)
    ref = {k: results.get(k, {}).get("img_per_s")
           for k in ("hf_mim_sdpa", "timm_beit_cls_c", "ours_mim_sdpa", "ours_mim_nobias_c")}
    lines = []
    for k, r in results.items():
        parts = [f"{r['img_per_s'] / v:.2f}x {p}" for p, v in ref.items() if v and p != k] if "img_per_s" in r else []
        if parts:
            lines.append(f"  {k:20s} " + ", ".join(parts))
    if lines:
        print("\nratios:\n" + "\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, batch=args.batch,
                           steps=args.steps, results=results), f, indent=2)


if __name__ == "__main__":
    main()
