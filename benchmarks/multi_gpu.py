"""Multi-GPU training throughput on the real engine: one run per call, under ``torchrun``; ``report`` tabulates.

A run is ``beit.engine.Trainer`` with the task's own model and step function, built from the shipped preset
(``pretrain_base``: BEiT-B/16 MIM with a DALL-E-architecture tokenizer in the loop; ``finetune_base``: BEiT-B/16
classification with layer decay, mixup/cutmix, drop path), fed by a GPU-resident synthetic dataset so the CPU
loader is not the limit: the loader yields sample indices only, and the step gathers that batch from tensors
made once on the device (images, tokenizer views and blockwise masks from the real mask generator; labels).
The tokenizer has random weights (no official weights offline): its FLOPs are those of OpenAI's dVAE.
Checkpoints are off during the timed loop (``--save`` times one full ``Trainer.save`` after it).

img/s is the engine's own logged ``train/img_per_s`` (all ranks, per optimizer step: batch x world size /
wall time of the window); a run's figure is the median over its log windows after ``--warmup-windows``
(compile and recompiles land in those).

    torchrun --standalone --nproc_per_node 2 benchmarks/multi_gpu.py run --task pretrain --mode ddp \\
        --steps 120 --out /tmp/mg/pretrain_ddp_2.json
    python benchmarks/multi_gpu.py report /tmp/mg --json $OUT/multi_gpu.json
    BEIT_SMOKE_CPU=1 bash benchmarks/multi_gpu.sh /tmp/mg_cpu      # the same on CPU (gloo), tiny models

Presets are found by path or by the name of a shipped preset (``--preset``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
PRESETS = {"pretrain": "pretrain_base", "finetune": "finetune_base"}
# tiny shapes for the CPU smoke mode (BEIT_SMOKE_CPU=1 / --tiny): a 64 px image of 16 px patches (4x4 grid)
TARGET_EFFICIENCY = 0.9  # issue 15: 2 GPUs >= 1.8x one GPU's img/s
TINY_MODEL = {"embed_dim": 32, "depth": 2, "num_heads": 2}


def find_preset(name: str) -> Path:
    """A YAML path as given, else the shipped preset of that name (``beit.configs.resolve_config``).

    Raises:
        FileNotFoundError: naming the value and listing the presets.
    """
    from beit.configs import resolve_config

    return Path(resolve_config(name))


# ------------------------------------------------------------------------------------------------ data
class IndexDataset(torch.utils.data.Dataset):
    """``len`` sample indices; the step function turns a batch of them into tensors already on the device."""

    def __init__(self, length: int):
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> int:
        return i


def gpu_bank(task: str, n: int, img: int, grid: int, tok_px: int, num_mask: int, min_block: int,
             num_classes: int, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    """``n`` synthetic samples made once on ``device``.

    pretrain: ``image`` [n, 3, img, img] (normalised), ``tok_image`` [n, 3, tok_px, tok_px] in [0, 1],
    ``mask`` [n, grid, grid] bool from the real :class:`BlockwiseMaskGenerator`; finetune: ``image`` and
    ``label`` [n] int64 in ``[0, num_classes)``.
    """
    g = torch.Generator().manual_seed(seed)
    bank = {"image": torch.randn(n, 3, img, img, generator=g)}
    if task == "pretrain":
        from beit.data.masking import BlockwiseMaskGenerator

        gen = BlockwiseMaskGenerator((grid, grid), num_mask, min_block)
        bank["tok_image"] = torch.rand(n, 3, tok_px, tok_px, generator=g)
        bank["mask"] = torch.stack([gen(generator=g) for _ in range(n)])
    else:
        bank["label"] = torch.randint(0, num_classes, (n,), generator=g)
    return {k: v.to(device) for k, v in bank.items()}


def bank_step(step_fn: Any, bank: dict[str, torch.Tensor], task: str) -> Any:
    """The task's ``step_fn`` on the batch the loader's indices pick out of ``bank`` (a gather on the device)."""
    n = len(bank["image"])

    def step(model: torch.nn.Module, idx: torch.Tensor) -> Any:
        idx = idx.to(bank["image"].device, non_blocking=True) % n
        if task == "pretrain":
            batch = {k: v[idx] for k, v in bank.items()}
        else:
            batch = (bank["image"][idx], bank["label"][idx])
        return step_fn(model, batch)

    return step


# ------------------------------------------------------------------------------------------------ run
def build(args: argparse.Namespace, out_dir: Path) -> tuple[Any, Any, dict[str, Any]]:
    """Model, step function and the engine's TrainConfig from the preset, as the task's own entry point does."""
    from beit.engine import distributed as D
    from beit.engine.config import load_config

    device = D.device()
    common = [f"train.output_dir={out_dir}", f"train.max_steps={args.steps}",
              f"train.warmup_steps={max(1, args.steps // 10)}", f"train.log_every={args.log_every}",
              f"train.batch_size={args.batch}", "train.num_workers=0", f"train.compile={str(args.compile).lower()}",
              f"train.distributed={args.mode if args.mode in ('ddp', 'fsdp') else 'ddp'}",
              "train.ckpt_every=100000000", "train.image_every=0", "train.eval_every=0", "train.keep_last=0"]
    if args.task == "pretrain":
        from beit.tasks.pretrain import PretrainConfig, build_tokenizer, make_step_fn, model_config
        from beit.tokenizers.dalle import DalleEncoder, DalleTokenizer

        # a random-weight tokenizer of the DALL-E architecture, written once per rank, then loaded the real way
        torch.manual_seed(0)
        tok_path = out_dir / f"dalle_random_rank{D.rank()}.safetensors"
        DalleTokenizer(DalleEncoder(**({"n_hid": 16, "vocab_size": 64} if args.tiny else {}))).save(tok_path)
        ov = [f"data.path={out_dir}", f"tokenizer.path={tok_path}", "tokenizer.kind=dalle"] + common
        if args.tiny:
            ov += ["model.img_size=64", "model.patch_size=16", "data.num_mask_patches=6",
                   "data.min_mask_patches_per_block=2"] + [f"model.{k}={v}" for k, v in TINY_MODEL.items()]
        cfg = load_config(PretrainConfig, find_preset(args.preset or PRESETS["pretrain"]), ov + args.overrides)
        tokenizer = build_tokenizer(cfg.tokenizer, device)
        from beit.models import create_model

        torch.manual_seed(cfg.train.seed)
        model = create_model(model_config(cfg, tokenizer.vocab_size))
        m, d = cfg.model, cfg.data
        grid = m.img_size // m.patch_size
        bank = gpu_bank("pretrain", args.bank, m.img_size, grid, grid * tokenizer.downsample, d.num_mask_patches,
                        d.min_mask_patches_per_block, 0, device, cfg.train.seed + D.rank())
        info = {"model": f"{m.name} img {m.img_size}/{m.patch_size}", "tokenizer": "dalle (random weights), "
                f"{cfg.tokenizer.precision}, {grid * tokenizer.downsample}px view"}
        step_fn = make_step_fn(tokenizer, mask_budget=d.num_mask_patches)  # as beit pretrain
        return model, bank_step(step_fn, bank, "pretrain"), {"cfg": cfg.train, **info}

    from beit.tasks.classify import FinetuneConfig, build_model, make_step_fn, scaled_train_config

    num_classes = 1000
    ov = ["model=beit_base_patch16_224", f"num_classes={num_classes}", f"data.train_dir={out_dir}"] + common
    if args.tiny:
        ov += ["img_size=64"] + [f"model_overrides.{k}={v}" for k, v in TINY_MODEL.items()]
    cfg = load_config(FinetuneConfig, find_preset(args.preset or PRESETS["finetune"]), ov + args.overrides)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, num_classes, [f"c{i}" for i in range(num_classes)])
    bank = gpu_bank("finetune", args.bank, cfg.img_size, 0, 0, 0, 0, num_classes, device,
                    cfg.train.seed + D.rank())
    info = {"model": f"{cfg.model} img {cfg.img_size}, {num_classes} classes, mixup {cfg.mixup} cutmix {cfg.cutmix}"}
    return model, bank_step(make_step_fn(cfg, num_classes), bank, "finetune"), \
        {"cfg": scaled_train_config(cfg.train, cfg.ref_batch), **info}


def run(args: argparse.Namespace) -> int:
    """One timed run on this process group; rank 0 writes ``--out`` (JSON)."""
    from beit.engine import Trainer
    from beit.engine import distributed as D

    D.init_distributed()  # backend settings (TF32, cuDNN) stay as the CLI leaves them
    tmp = Path(args.work or tempfile.gettempdir()) / f"beit_multi_gpu_{args.task}_{args.mode}_{D.world_size()}"
    tmp.mkdir(parents=True, exist_ok=True)
    if D.is_main():
        (tmp / "metrics.jsonl").unlink(missing_ok=True)
    D.barrier()
    model, step_fn, info = build(args, tmp)
    train_cfg = info.pop("cfg")
    # one epoch longer than the run: no epoch boundary inside the timed loop
    dataset = IndexDataset((args.steps + 1) * args.batch * D.world_size())
    trainer = Trainer(model, dataset, step_fn, train_cfg, run_config=train_cfg)
    trainer.save = lambda: None  # no checkpoint writes in the timed loop (see --save)
    t0 = time.perf_counter()
    save_s = None
    try:
        trainer.fit()
        if args.save:
            del trainer.save  # the real Trainer.save again (collective: every rank)
            t1 = time.perf_counter()
            trainer.save()
            save_s = time.perf_counter() - t1
    except Exception as e:  # rank 0 records what its windows logged and the error, then every rank fails
        write_result(args, tmp, info, time.perf_counter() - t0, None, f"{type(e).__name__}: {e}")
        raise
    write_result(args, tmp, info, time.perf_counter() - t0, save_s, "")
    D.barrier()
    D.cleanup()
    return 0


def write_result(args: argparse.Namespace, tmp: Path, info: dict[str, Any], wall: float, save_s: float | None,
                 error: str) -> None:
    """Rank 0: the run's JSON (``args.out``) from the engine's ``metrics.jsonl``, and one line on stdout."""
    from beit.engine import distributed as D

    if D.is_main():
        rows = [json.loads(line) for line in open(tmp / "metrics.jsonl")] if (tmp / "metrics.jsonl").exists() else []
        windows = [r["img_per_s"] for r in rows if r.get("split") == "train" and "img_per_s" in r]
        timed = windows[args.warmup_windows:]
        mem = max((r.get("max_mem_gb", 0.0) for r in rows), default=0.0)
        result = {
            "task": args.task, "mode": args.mode if D.world_size() > 1 else "single", "gpus": D.world_size(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "img_per_s": statistics.median(timed) if timed else None,
            "windows": windows, "warmup_windows": args.warmup_windows, "steps": args.steps,
            "batch_per_gpu": args.batch, "log_every": args.log_every, "compile": args.compile,
            "max_mem_gb": mem, "wall_s": wall, "save_s": save_s, "error": error,
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": " ".join(sys.argv), **info,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        ips = f"{result['img_per_s']:.0f}" if result["img_per_s"] else "-"
        print(f"{args.task} {result['mode']} x{D.world_size()}: {ips} img/s (median of {len(timed)} windows "
              f"after {args.warmup_windows}), {mem:.1f} GiB, {wall:.0f}s{'; ERROR ' + error if error else ''}",
              flush=True)


# ------------------------------------------------------------------------------------------------ report
def report(args: argparse.Namespace) -> int:
    """One table of every ``*.json`` run in ``args.dir``: scaling = img/s(N GPUs) / img/s(1 GPU), same task."""
    runs = []
    for p in sorted(Path(args.dir).glob("*.json")):
        try:
            r = json.loads(p.read_text())
        except json.JSONDecodeError:
            continue
        if isinstance(r, dict) and "task" in r and "gpus" in r:
            runs.append(r)
    if not runs:
        print(f"no runs in {args.dir}", file=sys.stderr)
        return 1
    base = {r["task"]: r["img_per_s"] for r in runs if r["gpus"] == 1 and r.get("img_per_s")}
    order = {"single": 0, "ddp": 1, "fsdp": 2}
    runs.sort(key=lambda r: (r["task"], r["gpus"], order.get(r["mode"], 9)))
    lines = [f"{'task':9s} {'mode':7s} {'GPUs':>4s} {'img/s':>8s} {'per GPU':>8s} {'scaling':>8s} {'effic.':>7s} "
             f"{'GiB':>6s}  note"]
    for r in runs:
        ips, b = r.get("img_per_s"), base.get(r["task"])
        r["scaling"] = ips / b if ips and b else None
        r["efficiency"] = r["scaling"] / r["gpus"] if r["scaling"] else None
        f = (lambda v, spec: format(v, spec) if v is not None else "-".rjust(int(spec.split(".")[0])))
        note = r.get("error") or ""
        lines.append(f"{r['task']:9s} {r['mode']:7s} {r['gpus']:4d} {f(ips, '8.0f')} "
                     f"{f(ips / r['gpus'] if ips else None, '8.0f')} {f(r['scaling'], '7.2f')}x "
                     f"{f(r['efficiency'] and 100 * r['efficiency'], '6.1f')}% {r.get('max_mem_gb', 0):6.1f}  "
                     f"{note[:100]}")
    first = next((r for r in runs if "device" in r), runs[0])
    g = first.get
    head = (f"multi_gpu on {g('device', '?')}, torch {g('torch', '?')}, {g('date', '?')}; batch "
            f"{g('batch_per_gpu', '?')}/GPU, {g('steps', '?')} steps, img/s = median of the log windows after the "
            f"first {g('warmup_windows', '?')}, compile {g('compile', '?')}")
    for r in runs:
        if r["gpus"] > 1 and r.get("efficiency"):
            verdict = "met" if r["efficiency"] >= TARGET_EFFICIENCY else "NOT met"
            lines.append(f"{r['task']} {r['mode']} x{r['gpus']}: scaling efficiency {100 * r['efficiency']:.1f}% "
                         f"(target >= {100 * TARGET_EFFICIENCY:.0f}%: {verdict})")
    table = "\n".join([head] + lines)
    print(table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"table": table, "runs": runs}, indent=1))
    failed = [r for r in runs if r.get("error") or not r.get("img_per_s")]
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="one timed run (under torchrun for several GPUs)")
    r.add_argument("--task", choices=["pretrain", "finetune"], required=True)
    r.add_argument("--mode", choices=["ddp", "fsdp"], default="ddp", help="ignored on 1 GPU (no wrapper)")
    r.add_argument("--preset", default="", help="YAML path or preset name (default: pretrain_base / finetune_base)")
    r.add_argument("--steps", type=int, default=120)
    r.add_argument("--batch", type=int, default=128, help="per GPU (the presets' own value)")
    r.add_argument("--log-every", type=int, default=10, help="steps per img/s window")
    r.add_argument("--warmup-windows", type=int, default=3, help="log windows left out of the median")
    r.add_argument("--bank", type=int, default=512, help="synthetic samples kept on the device")
    r.add_argument("--compile", default="true", choices=["true", "false"])
    r.add_argument("--tiny", action="store_true", help="tiny model (CPU smoke mode)")
    r.add_argument("--save", action="store_true", help="after the timed loop, time one Trainer.save")
    r.add_argument("--work", default="", help="scratch folder (default: the temp dir)")
    r.add_argument("--out", required=True, help="JSON result (rank 0)")
    r.add_argument("overrides", nargs="*", metavar="key=value", help="more preset overrides, e.g. train.accum_steps=2")
    q = sub.add_parser("report", help="the table of every run JSON in a folder")
    q.add_argument("dir")
    q.add_argument("--json", default="", help="write the table and runs here")
    args = p.parse_args(argv)
    if args.cmd == "run":
        args.compile = args.compile == "true"
        return run(args)
    return report(args)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
