"""CIFAR-10: fine-tuning and linear probing from a pre-trained checkpoint vs from scratch, same budget.

Two arms with the same architecture, data, augmentation and number of epochs:

* ``pretrained``: ``--init`` through ``beit.load_model`` (shared rel-pos -> per-layer, tables resampled when
  ``--img-size`` differs), layer decay ``--layer-decay``;
* ``scratch``: the same architecture with random weights, layer decay ``--scratch-layer-decay`` (1.0: decay
  only makes sense for pre-trained layers).

Each arm is fine-tuned with the paper's recipe (``beit.tasks.classify.finetune``: AdamW, cosine, warmup, drop path,
RandAugment, mixup/cutmix, label smoothing, random erasing) and linearly probed (``beit.tasks.classify.linprobe``: every
block, frozen encoder, features cached once; for ``scratch`` that probes random features, the floor).
All 60k images are decoded once into memory as uint8. Writes ``results.json`` (top-1/top-5 per arm, linear probe
best block and accuracy per block, wall times, throughput), ``curves.png`` (loss / top-1 per epoch, both arms),
``linprobe_blocks.png`` and each run's ``metrics.jsonl`` into ``--out``. Checkpoints stay in a temporary folder
(``--keep-runs`` keeps them under ``--out/runs``: large).

    # GPU (one H100). Each command must finish in 10 minutes: the trainer logs img/s every 50 steps (an epoch
    # is 50,000 images); split the arms over two commands if needed (results.json is merged, not overwritten).
    python benchmarks/cifar10_finetune.py --data data/cifar10 --init pretrained.pth --epochs 5 --out $OUT
    python benchmarks/cifar10_finetune.py --data data/cifar10 --init pt.pth --epochs 5 --arms scratch --out $OUT
    # CPU smoke test: 40 train / 20 test images per class, tiny model, tiny init written on the fly
    python benchmarks/cifar10_finetune.py --smoke --data /work/shared/data/cifar10 --out /tmp/cifar_smoke

``--data`` holds ``train/`` and ``test/`` class folders, or ``train.tar.gz`` / ``test.tar.gz`` (decoded straight
from the archive into memory, nothing extracted).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
SMOKE_ARCH = dict(patch_size=4, depth=2, embed_dim=32, num_heads=2)
ARCH_FIELDS = ("patch_size", "embed_dim", "depth", "num_heads", "attn_head_dim", "mlp_ratio", "qkv_bias",
               "layer_norm_eps", "init_values", "use_abs_pos_emb", "in_chans")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="folder with train/ and test/ class folders (or their .tar.gz)")
    p.add_argument("--init", default="", help="pre-trained checkpoint (any format beit.load_model reads)")
    p.add_argument("--out", required=True, help="folder for results.json, curves and per-run metrics")
    p.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs of EACH arm (the shared budget)")
    p.add_argument("--arms", default="pretrained,scratch", help="comma list: pretrained, scratch")
    p.add_argument("--model", default="beit_base_patch16_224",
                   help="architecture without --init (preset name; --arch-overrides change it)")
    p.add_argument("--arch-overrides", default="", help="without --init: e.g. patch_size=4,depth=6")
    p.add_argument("--img-size", type=int, default=0, help="0 = the checkpoint's (or 224 without --init)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=4e-3, help="peak lr for a total batch of 1024 (scaled linearly)")
    p.add_argument("--warmup-epochs", type=float, default=-1, help="-1 = 20%% of --epochs (the paper: 20 of 100)")
    p.add_argument("--layer-decay", type=float, default=0.65)
    p.add_argument("--scratch-layer-decay", type=float, default=1.0)
    p.add_argument("--drop-path", type=float, default=0.1)
    p.add_argument("--linprobe-epochs", type=int, default=50, help="0 = no linear probe")
    p.add_argument("--linprobe-pool", default="cat", choices=["cat", "avg", "cls"])
    p.add_argument("--workers", type=int, default=12)
    p.add_argument("--compile", action="store_true", help="torch.compile each block")
    p.add_argument("--keep-runs", action="store_true", help="keep checkpoints under --out/runs (large)")
    p.add_argument("--smoke", action="store_true", help="CPU smoke test: small subset, tiny model, 1 epoch")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="extra FinetuneConfig overrides, every arm")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------- data
def _decode_tar(tar_path: Path, per_class: int | None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Decode a ``<class>/<NNNN>.jpg`` tar straight into memory (first ``per_class`` files per class when given)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from beit.data.datasets import decode_image

    items: list[tuple[str, bytes]] = []
    counts: dict[str, int] = {}
    with tarfile.open(tar_path) as tf:
        for m in tf:
            parts = Path(m.name).parts
            if not m.isfile() or len(parts) < 2 or parts[-1].startswith("."):
                continue
            cls = parts[-2]
            if per_class is not None and counts.get(cls, 0) >= per_class:
                continue
            counts[cls] = counts.get(cls, 0) + 1
            items.append((cls, tf.extractfile(m).read()))  # type: ignore[union-attr]
    names = sorted(counts)
    with ThreadPoolExecutor(16) as pool:
        arrays = list(pool.map(lambda it: np.asarray(decode_image(it[1]), dtype=np.uint8), items))
    images = torch.from_numpy(np.stack(arrays))
    labels = torch.tensor([names.index(c) for c, _ in items], dtype=torch.long)
    return images, labels, names


def _subset_folder(src: Path, dst: Path, per_class: int) -> Path:
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        (dst / cls.name).mkdir(parents=True, exist_ok=True)
        for f in sorted(cls.iterdir())[:per_class]:
            shutil.copy(f, dst / cls.name / f.name)
    return dst


def load_split(data: Path, split: str, work: Path, per_class: int | None) -> tuple[torch.Tensor, torch.Tensor, list]:
    """uint8 ``[N, 32, 32, 3]`` images, labels and class names of one split, decoded once."""
    from beit.data.datasets import load_image_folder_to_memory

    folder, tar = data / split, data / f"{split}.tar.gz"
    if folder.is_dir():
        if per_class is not None:
            folder = _subset_folder(folder, work / split, per_class)
        return load_image_folder_to_memory(folder, num_threads=16, progress=False)  # type: ignore[return-value]
    if tar.is_file():
        return _decode_tar(tar, per_class)
    raise FileNotFoundError(f"{data} has neither {split}/ nor {split}.tar.gz")


# ------------------------------------------------------------------------------------------------- runs
def arch_overrides(args: argparse.Namespace) -> tuple[str, dict[str, Any], int]:
    """(preset, overrides, img_size) describing the architecture both arms share."""
    if args.init:
        from beit.tasks.classify import source_config

        src = source_config(args.init)
        over = {k: getattr(src, k) for k in ARCH_FIELDS}
        # layer scale: the paper's init (not the trained checkpoint's mean gamma), or off like the checkpoint
        over["init_values"] = (0.1 if src.embed_dim < 1024 else 1e-5) if src.init_values else None
        img = args.img_size or src.img_hw[0]
        return "beit_base_patch16_224", over, img
    over: dict[str, Any] = {}
    if args.smoke:
        over.update(SMOKE_ARCH)
    for item in filter(None, args.arch_overrides.split(",")):
        k, _, v = item.partition("=")
        over[k.strip()] = json.loads(v) if v.strip()[:1].isdigit() or v.strip() in ("true", "false") else v.strip()
    return args.model, over, args.img_size or (32 if args.smoke else 224)


def write_smoke_init(path: Path, over: dict[str, Any], img_size: int) -> Path:
    """A tiny random pre-training model (shared rel-pos, MIM head): the pretrained arm's code path on CPU."""
    import beit

    torch.manual_seed(1234)  # not the fine-tuning seed: the arms must not share a random patch embedding
    mim = beit.create_model("beit_tiny_patch16_224", head="mim", vocab_size=64, img_size=img_size,
                            **{k: v for k, v in over.items() if k in SMOKE_ARCH})
    return beit.save_model(mim, path)


def run_arm(arm: str, args: argparse.Namespace, preset: str, over: dict[str, Any], img_size: int,
            train: tuple, test: tuple, runs: Path, out: Path) -> dict[str, Any]:
    from beit.data.datasets import TensorImageDataset
    from beit.engine import load_config
    from beit.engine.logging import read_metrics
    from beit.tasks.classify import (
        FinetuneConfig,
        LinprobeConfig,
        build_preprocess,
        build_train_transform,
        finetune,
        linprobe,
    )

    names = train[2]
    model = args.init if arm == "pretrained" else preset
    warm = args.warmup_epochs if args.warmup_epochs >= 0 else 0.2 * args.epochs
    ld = args.layer_decay if arm == "pretrained" else args.scratch_layer_decay
    ft_over = [f"model={model}", f"img_size={img_size}", f"drop_path={args.drop_path}", "ref_batch=1024",
               f"train.output_dir={runs / arm / 'finetune'}", f"train.epochs={args.epochs}",
               f"train.warmup_epochs={warm}", f"train.batch_size={args.batch_size}", f"train.lr={args.lr}",
               f"train.layer_decay={ld}", f"train.num_workers={args.workers}", "train.keep_last=1",
               f"train.ckpt_every={10**9}", f"train.compile={str(args.compile).lower()}",
               f"train.log_every={5 if args.smoke else 50}", "data.in_memory=true"]
    if arm == "scratch":  # the same architecture, fresh weights, fine-tuning layout of rel-pos
        ft_over += [f"model_overrides.{k}={json.dumps(v)}" for k, v in over.items()]
    cfg = load_config(FinetuneConfig, None, ft_over + list(args.overrides))
    ds_train = TensorImageDataset(train[0], train[1], build_train_transform(cfg.data, img_size), seed=cfg.train.seed)
    eval_tf = build_preprocess(cfg.data.preprocess(img_size))
    ds_test = TensorImageDataset(test[0], test[1], eval_tf)

    print(f"[{arm}] fine-tune: {len(ds_train)} train / {len(ds_test)} test, {args.epochs} epochs, "
          f"model={model}, img {img_size}", flush=True)
    t0 = time.perf_counter()
    ft = finetune(cfg, train_dataset=ds_train, val_dataset=ds_test, class_names=names)
    ft_wall = time.perf_counter() - t0
    run_dir = Path(ft["output_dir"])
    rows = read_metrics(run_dir / "metrics.jsonl", split=None)
    train_rows = [r for r in rows if r["split"] == "train"]
    result: dict[str, Any] = {"finetune": {
        "top1": ft.get("top1"), "top5": ft.get("top5"), "best_top1": ft.get("best/top1"),
        "best_step": ft.get("best/step"), "steps": ft["step"], "epochs": args.epochs, "wall_s": ft_wall,
        "img_per_s": sum(r.get("img_per_s", 0) for r in train_rows) / max(len(train_rows), 1),
        "max_mem_gb": max((r["max_mem_gb"] for r in train_rows if "max_mem_gb" in r), default=None),
        "lr_peak": max((r.get("lr", 0) for r in train_rows), default=None), "layer_decay": ld,
    }}
    dst = out / "runs" / arm
    dst.mkdir(parents=True, exist_ok=True)
    for f in ("metrics.jsonl", "curves.png", "config.yaml", "log.txt"):
        if (run_dir / f).is_file():
            shutil.copy(run_dir / f, dst / f"finetune_{f}")
    if (run_dir / "eval" / "confusion.png").is_file():
        shutil.copy(run_dir / "eval" / "confusion.png", dst / "confusion.png")
        shutil.copy(run_dir / "eval" / "metrics.json", dst / "eval_metrics.json")
    print(f"[{arm}] fine-tune top-1 {result['finetune']['top1']:.2f}% in {ft_wall:.0f}s", flush=True)

    if args.linprobe_epochs > 0:
        lp_over = [f"model={model}", f"img_size={img_size}", f"pool={args.linprobe_pool}", "layers=all",
                   f"train.output_dir={runs / arm / 'linprobe'}", f"train.epochs={args.linprobe_epochs}",
                   f"train.batch_size={min(1024, len(ds_train))}", f"extract_batch_size={4 * args.batch_size}",
                   f"extract_num_workers={args.workers}"]
        if arm == "scratch":
            lp_over += [f"model_overrides.{k}={json.dumps(v)}" for k, v in over.items()]
        lp_cfg = load_config(LinprobeConfig, None, lp_over)
        plain = TensorImageDataset(train[0], train[1], eval_tf)
        t0 = time.perf_counter()
        lp = linprobe(lp_cfg, train_dataset=plain, val_dataset=ds_test, class_names=names)
        result["linprobe"] = {"best_block": lp["best_block"], "best_top1": lp["best_top1"], "depth": lp["depth"],
                              "top1_per_block": lp["top1"], "pool": lp["pool"], "epochs": args.linprobe_epochs,
                              "feature_s": lp["feature_seconds"], "wall_s": time.perf_counter() - t0}
        shutil.copy(Path(lp_cfg.train.output_dir) / "linprobe.json", dst / "linprobe.json")
        print(f"[{arm}] linear probe best block {lp['best_block']}/{lp['depth']} top-1 {lp['best_top1']:.2f}%",
              flush=True)
    return result


# ------------------------------------------------------------------------------------------------- plots
def plot(out: Path, arms: dict[str, Any]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from beit.engine.logging import read_metrics

    fig = Figure(figsize=(12, 4))
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for arm in arms:
        rows = read_metrics(out / "runs" / arm / "finetune_metrics.jsonl", split=None)
        steps = max((r["step"] for r in rows), default=1)
        epochs = max(arms[arm]["finetune"]["epochs"], 1)
        per_epoch = steps / epochs
        tr = [r for r in rows if r["split"] == "train"]
        ev = [r for r in rows if r["split"] == "eval" and "top1" in r]
        ax_loss.plot([r["step"] / per_epoch for r in tr], [r["loss"] for r in tr], label=arm)
        ax_acc.plot([r["step"] / per_epoch for r in ev], [r["top1"] for r in ev], marker="o", label=arm)
    ax_loss.set(title="train loss (mixup soft targets)", xlabel="epoch")
    ax_acc.set(title="test top-1 (%)", xlabel="epoch")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)

    probes = {a: r["linprobe"] for a, r in arms.items() if "linprobe" in r}
    if probes:
        fig = Figure(figsize=(6, 4))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        for arm, lp in probes.items():
            per_block = {int(b): a for b, a in lp["top1_per_block"].items()}  # JSON round trips make keys str
            blocks = sorted(per_block)
            ax.plot(blocks, [per_block[b] for b in blocks], marker="o", label=arm)
        ax.set(title="linear probe top-1 per block", xlabel="block", ylabel="top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "linprobe_blocks.png", dpi=100)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    if args.smoke:
        torch.set_num_threads(1)  # tiny model on a shared CPU: one thread is much faster
        args.epochs, args.batch_size, args.workers = min(args.epochs, 1), 32, 0
        args.linprobe_epochs = min(args.linprobe_epochs, 3)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = sorted(set(arms) - {"pretrained", "scratch"})
    if bad or not arms:
        raise SystemExit(f"--arms: unknown {bad}; choose from pretrained, scratch")

    work = Path(tempfile.mkdtemp(prefix="cifar_ft_"))
    runs = out / "runs_full" if args.keep_runs else work / "runs"
    try:
        if args.smoke and not args.init and "pretrained" in arms:
            args.init = str(write_smoke_init(work / "smoke_init", SMOKE_ARCH, 32))
        if "pretrained" in arms and not args.init:
            raise SystemExit("--init is required for the pretrained arm (or use --arms scratch)")
        preset, over, img_size = arch_overrides(args)
        per_class = (40, 20) if args.smoke else (None, None)
        t0 = time.perf_counter()
        train = load_split(Path(args.data), "train", work, per_class[0])
        test = load_split(Path(args.data), "test", work, per_class[1])
        print(f"decoded {len(train[0])} train + {len(test[0])} test images in {time.perf_counter() - t0:.1f}s",
              flush=True)
        if train[2] != test[2]:
            raise SystemExit(f"train and test classes differ: {train[2]} vs {test[2]}")

        results_path = out / "results.json"
        results = json.loads(results_path.read_text()) if results_path.is_file() else {"arms": {}}
        for arm in arms:
            results["arms"][arm] = run_arm(arm, args, preset, over, img_size, train, test, runs, out)
            results.update({
                "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                "torch": torch.__version__, "smoke": args.smoke, "init": args.init, "img_size": img_size,
                "architecture": {"preset": preset, **over}, "num_train": len(train[0]), "num_test": len(test[0]),
                "classes": train[2], "args_" + arm: {k: v for k, v in vars(args).items()},
            })
            results_path.write_text(json.dumps(results, indent=2, default=str))  # after every arm
        plot(out, results["arms"])
        results["wall_s_last_command"] = time.perf_counter() - t_start
        results_path.write_text(json.dumps(results, indent=2, default=str))
        print(json.dumps({a: {"finetune_top1": r["finetune"]["top1"],
                              "linprobe_best": (r.get("linprobe") or {}).get("best_top1"),
                              "linprobe_block": (r.get("linprobe") or {}).get("best_block")}
                          for a, r in results["arms"].items()}, indent=2))
        print(f"wrote {results_path}, {out / 'curves.png'} in {time.perf_counter() - t_start:.0f}s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
