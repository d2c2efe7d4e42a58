"""The `beit demo` ablation of benchmarks/RESULTS.md section 5: what moved the held-out digits accuracy.

Run from the repository root after `beit demo --out runs/demo` (its digits and tokenizer are reused):

    python benchmarks/demo_ablation.py plain --img 16 --steps 200 --pad 2          # plain PyTorch loop, no engine
    python benchmarks/demo_ablation.py finetune --pad 0 --lr 3e-3 --ld 1.0 --seeds 0 1 2   # from scratch
    python benchmarks/demo_ablation.py finetune --src runs/demo/pretrain/final --pad 0      # pre-trained arm
    python benchmarks/demo_ablation.py pretrain --steps 600 --lr 4e-3 --ft-steps 150        # MIM, then seeds 0-2

As the demo runs (its batched tensor augmentation, one thread a run as each of its two processes has):

    python benchmarks/demo_ablation.py finetune --src runs/demo/pretrain/final --pad 0 --data-device batched \
        --threads 1 --ft-lr 7e-3 --ld 0.75 --seeds 0 1 2 3 4 5
    python benchmarks/demo_ablation.py pretrain --steps 600 --lr 3e-3 --seed 1 --pad 0 --data-device batched \
        --threads 1 --ft-lr 7e-3 --ld 0.75 --seeds 0 1 2 3 4 5      # another pre-training (its seed), then 6 seeds

Each prints one ``RESULT`` line: the settings and held-out top-1 (%) per seed with their mean. The fine-tuning
flags (``--ft-steps``, ``--ft-lr``, ``--ld``, ``--seeds``), ``--img`` and ``--mask`` default to the demo's
(``DemoConfig``) of the checkout it runs in; the others do not (``--steps`` 200, ``--lr`` 2e-3, ``--pad`` img // 8,
``--data-device`` auto, torch's threads): pass the demo's, as above. A flag that the chosen arm does not use
(``--seed`` outside ``pretrain``, ``--data-device`` with ``plain``) is refused rather than ignored.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from beit.data.demo import load_digits_images, train_test_split
from beit.engine.config import TrainConfig
from beit.models import create_model
from beit.tasks.classify import DataConfig, FinetuneConfig, finetune
from beit.tasks.demo import DemoConfig
from beit.tasks.pretrain import (
    PretrainConfig,
    PretrainDataConfig,
    PretrainModelConfig,
    PretrainTokenizerConfig,
    pretrain,
)

DEMO = DemoConfig()


def plain(a: argparse.Namespace) -> list[float]:
    """AdamW + one-cycle on the digits in memory, optional padded random crop of ``pad`` px: the recipe's brake."""
    torch.manual_seed(0)
    x, y = load_digits_images(a.img)
    xtr, ytr, xte, yte = train_test_split(x, y, 0.2, 0)
    xtr, xte = ((t.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5 for t in (xtr, xte))
    model = create_model("beit_tiny_patch16_224", img_size=a.img, patch_size=DEMO.patch_size, num_classes=10,
                         **DEMO.encoder())
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a.lr, total_steps=a.steps, pct_start=0.1)
    for _ in range(a.steps):
        idx = torch.randint(0, len(xtr), (64,))
        xb = xtr[idx]
        if a.pad:
            padded = F.pad(xb, (a.pad,) * 4, value=-1.0)
            shifts = torch.randint(0, 2 * a.pad + 1, (len(xb), 2))
            xb = torch.stack([p[:, r:r + a.img, c:c + a.img] for p, (r, c) in zip(padded, shifts.tolist())])
        loss = F.cross_entropy(model(xb), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        return [100.0 * float((model(xte).argmax(1) == yte).float().mean())]


def _finetune(src: str, root: Path, out: Path, a: argparse.Namespace, seed: int) -> float:
    overrides = {} if src != "beit_tiny_patch16_224" else dict(patch_size=DEMO.patch_size, **DEMO.encoder())
    steps = a.ft_steps
    train = TrainConfig(output_dir=str(out / f"seed{seed}"), max_steps=steps, batch_size=64, lr=a.ft_lr, min_lr=1e-5,
                        warmup_steps=max(1, steps // 10), weight_decay=0.05, layer_decay=a.ld, eval_every=10**9,
                        num_workers=0, log_every=100, overwrite=True, seed=seed)
    data = DataConfig(train_dir=str(root / "train"), val_dir=str(root / "test"), in_memory=True, auto_augment=None,
                      reprob=0.0, hflip=0.0, color_jitter=0.0, crop_padding=a.pad, device=a.data_device)
    cfg = FinetuneConfig(model=src, model_overrides=overrides, img_size=DEMO.img_size, drop_path=0.0, mixup=0.0,
                         cutmix=0.0, smoothing=0.1, data=data, train=train)
    return float(finetune(cfg)["top1"])


def finetune_arm(a: argparse.Namespace) -> list[float]:
    return [_finetune(a.src, a.demo / "data", a.out / "finetune", a, s) for s in a.seeds]


def pretrain_then_finetune(a: argparse.Namespace) -> list[float]:
    root = a.demo / "data"
    pre = pretrain(PretrainConfig(
        model=PretrainModelConfig(name="beit_tiny_patch16_224", img_size=DEMO.img_size, patch_size=DEMO.patch_size,
                                  drop_path_rate=0.0, **DEMO.encoder()),
        data=PretrainDataConfig(path=str(root / "train"), scale=(0.5, 1.0), color_jitter=0.0, hflip=0.0,
                                in_memory=a.data_device == "batched", device=a.data_device,
                                num_mask_patches=a.mask, min_mask_patches_per_block=DEMO.min_mask_patches_per_block),
        tokenizer=PretrainTokenizerConfig(kind="dvae", path=str(a.demo / "tokenizer" / "dvae.safetensors")),
        train=TrainConfig(output_dir=str(a.out / "pretrain"), max_steps=a.steps, batch_size=64, lr=a.lr,
                          min_lr=1e-5, warmup_steps=max(1, a.steps // 10), weight_decay=0.05, betas=(0.9, 0.98),
                          clip_grad=3.0, image_every=10**9, seed=a.seed, num_workers=0, log_every=100,
                          overwrite=True)))
    print(f"masked-token accuracy {pre['train/mim_acc']:.3f}")
    return [_finetune(pre["model_dir"], root, a.out / "finetune", a, s) for s in a.seeds]


def _threads(text: str) -> int:
    """``--threads``: a whole number >= 1 (torch.set_num_threads refuses the rest with a traceback)."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return n


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; a new flag that the chosen arm would ignore is a usage error (exit 2), as bad values are."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("plain", "finetune", "pretrain"))
    p.add_argument("--demo", type=Path, default=Path("runs/demo"), help="a `beit demo --out` folder")
    p.add_argument("--out", type=Path, default=Path("runs/demo_ablation"))
    p.add_argument("--img", type=int, default=DEMO.img_size, help="plain: image side")
    p.add_argument("--steps", type=int, default=200, help="plain: training steps; pretrain: MIM steps")
    p.add_argument("--lr", type=float, default=2e-3, help="plain: lr; pretrain: MIM lr")
    p.add_argument("--pad", type=int, default=None, help="crop padding in px (finetune: null = img // 8)")
    p.add_argument("--mask", type=int, default=DEMO.num_mask_patches, help="pretrain: masked patches per image")
    p.add_argument("--src", default="beit_tiny_patch16_224", help="finetune: a model folder (default: scratch)")
    p.add_argument("--ft-steps", type=int, default=DEMO.ft_steps)
    p.add_argument("--ft-lr", type=float, default=DEMO.ft_lr)
    p.add_argument("--ld", type=float, default=DEMO.layer_decay, help="layer decay")
    p.add_argument("--seeds", type=int, nargs="+", default=list(DEMO.seeds))
    p.add_argument("--seed", type=int, default=None,
                   help="pretrain: the pre-training's seed (default and the demo's: 0; fine-tuning's: --seeds)")
    p.add_argument("--data-device", default=None, choices=("auto", "cpu", "batched"),
                   help="finetune / pretrain: where images are augmented (default auto; the demo's: batched)")
    p.add_argument("--threads", type=_threads, default=None,
                   help="torch threads (the demo's runs: 1; default: torch's)")
    a = p.parse_args(argv)
    if a.seed is not None and a.what != "pretrain":
        p.error(f"--seed is the pre-training's seed: {a.what} has none (the fine-tuning seeds are --seeds)")
    if a.data_device is not None and a.what == "plain":
        p.error("--data-device: plain augments its in-memory tensors itself (finetune / pretrain only)")
    a.data_device = a.data_device or "auto"
    if a.what == "pretrain" and a.seed is None:
        a.seed = 0
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()
    top1 = {"plain": plain, "finetune": finetune_arm, "pretrain": pretrain_then_finetune}[a.what](a)
    settings = {k: v for k, v in vars(a).items() if k not in ("demo", "out")}
    print(f"RESULT {settings} top1 {[round(t, 2) for t in top1]} mean {statistics.mean(top1):.2f} "
          f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
