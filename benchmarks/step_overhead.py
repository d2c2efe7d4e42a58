"""Where a small model's training step spends its time (issue 17, the CIFAR-size rows): host vs device, by
how the model is compiled and what the engine adds around the step.

The 21M BEiT of issue 17's CIFAR rows (384 wide, 12 blocks, 4-px patches, 65 tokens) at batch 512 does ~4 TFLOP
a step: a few milliseconds of an H100/H200. Steps that take much longer are host-bound: Python, dispatch,
the compiled regions' guards and wrappers, the optimizer's launches, the host syncs. Each variant runs the
same fine-tuning step (mixup/cutmix + soft-target CE, fused AdamW) on one GPU-resident batch:

  blocks        regional compile (the engine's ``compile_blocks``), one host sync a step on the loss
  blocks_engine the same plus what ``Trainer.train_one_epoch`` adds (its own functions): the grad norm,
                the weights probe and the stacked finiteness check (one sync)
  blocks_nosync regional compile, no host sync
  whole         ``model.compile()`` (one graph for the whole model: ``train.compile_scope=model``), one sync
  whole_engine  the same plus the engine's per-step pieces (as ``blocks_engine``)
  whole_engine_ld  the same with layer-wise lr decay 0.75 (the fine-tuning recipe): the engine's ~2 x (depth
                + 2) param groups, one fused AdamW call each (the ``*_engine`` rows use the engine's groups and
                optimizer too, without layer decay: 2 groups)
  whole_engine_ld_copt  the same with the optimizer step compiled (``torch.compile`` of ``opt.step``: each group's
                lr a device tensor, so a new lr is no recompile; every group's update in a few fused kernels)
  whole_nosync  the same, no sync
  cudagraphs    ``torch.compile(model, mode="reduce-overhead")`` (CUDA graphs), one sync
  eager         no compile, one sync

For each: img/s over ``--steps`` after ``--warmup``, and from ``torch.profiler`` over 5 steps the wall time a
step and the device-busy time a step (sum of kernel times): wall >> device means host-bound.

    python3 benchmarks/step_overhead.py --json $OUT/step_overhead.json     # on a GPU
    python3 benchmarks/step_overhead.py --device cpu --tiny                # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import beit
from beit.engine import load_config
from beit.engine import optim as O
from beit.engine.precision import autocast_for
from beit.engine.trainer import _weights_probe, grad_norm_, step_checks
from beit.tasks.classify import FinetuneConfig, make_step_fn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_pipeline import device_busy  # noqa: E402  (the profile's device time, counted as data_pipeline counts it)

VARIANTS = ("blocks", "blocks_engine", "blocks_nosync", "whole", "whole_engine", "whole_engine_ld",
            "whole_engine_ld_copt", "whole_nosync", "cudagraphs", "eager")


def _model(a: argparse.Namespace, variant: str, device: torch.device) -> torch.nn.Module:
    wide = dict(embed_dim=32, depth=2, num_heads=2) if a.tiny else dict(embed_dim=384, depth=12, num_heads=6)
    m = beit.create_model("beit_small_patch16_224", num_classes=10, img_size=32, patch_size=4, **wide)
    m = m.to(device).train()
    if device.type != "cuda" or variant == "eager":
        return m
    if variant.startswith("blocks"):
        from beit.engine.distributed import compile_blocks

        compile_blocks(m, "none")
        return m
    if variant == "cudagraphs":
        return torch.compile(m, mode="reduce-overhead")
    m.compile()
    return m


def _step(model: torch.nn.Module, variant: str, device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], None]:
    cfg = load_config(FinetuneConfig, None, ["model=beit_small_patch16_224"])  # mixup .8, cutmix 1, ls .1
    step_fn = make_step_fn(cfg, 10)
    engine = "_engine" in variant
    if engine:  # the trainer's param groups (weight decay, layer decay) and optimizer
        groups = O.param_groups(model, 0.05, 0.75 if "_ld" in variant else 1.0, 1e-4)
        opt = O.build_optimizer(groups, 1e-4)
        if variant.endswith("_copt") and device.type == "cuda":
            for g in groups:
                g["lr"] = torch.tensor(1e-4 * g["lr_scale"], device=device)
            opt = torch.optim.AdamW(groups, lr=torch.tensor(1e-4, device=device), weight_decay=0.05,
                                    foreach=True, capturable=True)
            opt.step = torch.compile(opt.step)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    params = [p for g in opt.param_groups for p in g["params"]]
    sync = not variant.endswith("nosync")
    probe: list[torch.Tensor | None] = [None]
    tensor_lr = torch.is_tensor(opt.param_groups[0]["lr"])

    def run(x: torch.Tensor, y: torch.Tensor) -> None:
        for g in opt.param_groups:  # as the trainer sets the scheduled lr every step
            if tensor_lr:
                g["lr"].fill_(1e-4 * g["lr_scale"])
            else:
                g["lr"] = 1e-4 * g.get("lr_scale", 1.0)
        with autocast_for(device, "auto"):
            loss, _ = step_fn(model, (x, y))
        loss.backward()
        if engine:  # the trainer's own pieces (no clipping: the fine-tuning recipe's clip_grad is None)
            ok = bool(torch.isfinite(step_checks(loss, grad_norm_(params, None), probe[0])).all())
        elif sync:
            ok = bool(torch.isfinite(loss))
        else:
            ok = True
        if not ok:
            raise FloatingPointError("non-finite loss")
        opt.step()
        if engine:
            probe[0] = _weights_probe(params)
        opt.zero_grad(set_to_none=True)

    return run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(a: argparse.Namespace, variant: str, device: torch.device) -> dict[str, float]:
    torch.manual_seed(0)
    model = _model(a, variant, device)
    run = _step(model, variant, device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (a.batch,), generator=g).to(device)
    t0 = time.perf_counter()
    for _ in range(a.warmup):
        run(x.clone(), y)  # mixup works in place
    _sync(device)
    out: dict[str, float] = {"warmup_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    for _ in range(a.steps):
        run(x.clone(), y)
    _sync(device)
    out["img_per_s"] = a.steps * a.batch / (time.perf_counter() - t0)
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    n = 5
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            run(x.clone(), y)
        _sync(device)
        wall = time.perf_counter() - t0
    ka = prof.key_averages()
    out["profiled_wall_ms"] = 1e3 * wall / n
    out["device_busy_ms"], out["device_events"] = device_busy(ka, n)
    if a.tables:
        print(ka.table(sort_by="self_cpu_time_total", row_limit=15), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--only", default=",".join(VARIANTS))
    ap.add_argument("--tables", action="store_true", help="print the profiler's host-time table per variant")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device)
    if a.tiny:
        a.batch, a.steps, a.warmup = min(a.batch, 16), min(a.steps, 3), min(a.warmup, 1)
    torch.backends.cuda.matmul.allow_tf32 = True
    res: dict[str, dict[str, float]] = {}
    for v in a.only.split(","):
        try:
            res[v] = measure(a, v, device)
        except Exception as e:  # noqa: BLE001 - one variant failing (e.g. CUDA graphs) must not lose the others
            res[v] = {"error": f"{type(e).__name__}: {e}"[:300]}
        print(v, json.dumps(res[v]), flush=True)
        torch._dynamo.reset()
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                       "torch": torch.__version__, "batch": a.batch, "steps": a.steps, "rows": res}, f, indent=1)


if __name__ == "__main__":
    main()
