"""``beit demo``: the whole BEiT method in a few CPU minutes, offline, on real images.

scikit-learn ships 1,797 real 8x8 handwritten digits; upsampled to 32x32 they go through exactly the
commands a user runs on their own data: train a visual tokenizer, pre-train a BEiT by masked image
modeling, then fine-tune it and a from-scratch twin with the same recipe and steps.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from PIL import Image

from ..data.demo import load_digits_images, train_test_split
from ..engine.config import TrainConfig
from ..tokenizers.dvae import DVAEConfig
from .classify import DataConfig, FinetuneConfig, finetune
from .pretrain import PretrainConfig, PretrainDataConfig, PretrainModelConfig, PretrainTokenizerConfig, pretrain
from .tokenizer import TokenizerTrainConfig, train_tokenizer

# one place for the demo's sizes: a 32px image, 4px patches -> 8x8 tokens, a 4-layer 96-wide BEiT
IMG, PATCH = 32, 4
ENCODER = dict(embed_dim=96, depth=4, num_heads=3)
STEPS_PRE, STEPS_FT, NUM_WORKERS = 300, 200, 0  # ~2.5 min on 2 CPU cores


def write_digits(root: Path) -> tuple[Path, Path]:
    """Digits as PNG class folders (train 80% / test 20%, stratified), like a user's own data."""
    images, labels = load_digits_images(size=IMG)
    x_tr, y_tr, x_te, y_te = train_test_split(images, labels, test_fraction=0.2, seed=0)
    for split, xs, ys in (("train", x_tr, y_tr), ("test", x_te, y_te)):
        for i, (x, y) in enumerate(zip(xs, ys)):
            d = root / split / f"digit_{int(y)}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x.numpy()).save(d / f"{i:04d}.png")
    return root / "train", root / "test"


def run_demo(out: str | Path = "runs/demo", quick: bool = False) -> dict[str, Any]:
    out = Path(out)
    t0 = time.perf_counter()
    steps = dict(tok=12, pre=12, ft=12) if quick else dict(tok=300, pre=STEPS_PRE, ft=STEPS_FT)
    # overwrite: running the demo again replaces its previous run (training commands refuse that by default)
    common = dict(num_workers=NUM_WORKERS, log_every=10 if quick else 50, seed=0, overwrite=True)
    train_dir, test_dir = write_digits(out / "data")
    print(f"[1/4] wrote the digits as images: {train_dir} (train), {test_dir} (test)", flush=True)

    tok_cfg = TokenizerTrainConfig(
        data_dir=str(train_dir), val_dir=str(test_dir), img_size=IMG, grid_images=8,
        # a KL pull towards the uniform prior keeps the codebook in use (without it: ~5 of 128 codes)
        model=DVAEConfig(vocab_size=128, hidden=48, downsample=PATCH, num_res_blocks=1, codebook_dim=32,
                         kl_weight=0.03, temperature_anneal_steps=steps["tok"]),
        train=TrainConfig(output_dir=str(out / "tokenizer"), max_steps=steps["tok"], batch_size=64, lr=3e-3,
                          min_lr=1e-4, warmup_steps=10, weight_decay=0.0, eval_every=1000, **common),
    )
    tok = train_tokenizer(tok_cfg)
    psnr, ppl = tok.get("heldout_psnr", float("nan")), tok.get("heldout_perplexity", float("nan"))
    print(f"[2/4] ({time.perf_counter() - t0:.0f}s) tokenizer: held-out PSNR {psnr:.1f} dB, codebook perplexity "
          f"{ppl:.1f} of 128", flush=True)

    pre_cfg = PretrainConfig(
        model=PretrainModelConfig(name="beit_tiny_patch16_224", img_size=IMG, patch_size=PATCH,
                                  drop_path_rate=0.0, **ENCODER),
        data=PretrainDataConfig(path=str(train_dir), scale=(0.5, 1.0), color_jitter=0.0, hflip=0.0,
                                num_mask_patches=26, min_mask_patches_per_block=4),
        tokenizer=PretrainTokenizerConfig(kind="dvae", path=tok["tokenizer_path"]),
        train=TrainConfig(output_dir=str(out / "pretrain"), max_steps=steps["pre"], batch_size=64, lr=2e-3,
                          min_lr=1e-5, warmup_steps=max(1, steps["pre"] // 10), weight_decay=0.05,
                          betas=(0.9, 0.98), clip_grad=3.0, image_every=10**9, **common),
        vis_samples=6,
    )
    pre = pretrain(pre_cfg)
    mim_acc = pre.get("train/mim_acc", float("nan"))
    print(f"[3/4] ({time.perf_counter() - t0:.0f}s) pre-trained: masked-token accuracy {mim_acc:.3f}", flush=True)

    ft_train = TrainConfig(output_dir="", max_steps=steps["ft"], batch_size=64, lr=2e-3, min_lr=1e-5,
                           warmup_steps=max(1, steps["ft"] // 10), weight_decay=0.05, layer_decay=0.75,
                           eval_every=1000, **common)
    data = DataConfig(train_dir=str(train_dir), val_dir=str(test_dir), in_memory=True, auto_augment=None,
                      reprob=0.0, hflip=0.0, scale=(0.6, 1.0), color_jitter=0.0)
    arms = {}
    for arm, source, overrides in (
        ("pretrained", pre["model_dir"], {}),
        ("scratch", "beit_tiny_patch16_224", dict(patch_size=PATCH, **ENCODER)),
    ):
        cfg = FinetuneConfig(model=source, model_overrides=overrides, img_size=IMG, drop_path=0.0, mixup=0.0,
                             cutmix=0.0, smoothing=0.1, data=data,
                             train=replace(ft_train, output_dir=str(out / f"finetune_{arm}")))
        arms[arm] = finetune(cfg)
    acc = {arm: r.get("top1", float("nan")) for arm, r in arms.items()}
    n_test = sum(1 for _ in test_dir.rglob("*.png"))
    print(f"[4/4] ({time.perf_counter() - t0:.0f}s) fine-tuned {steps['ft']} steps each: pre-trained "
          f"{acc['pretrained']:.1f}% vs from scratch {acc['scratch']:.1f}% top-1 on {n_test} held-out digits",
          flush=True)
    pngs = {
        "tokenizer reconstructions": tok.get("recon_grid"),
        "masked-prediction panel": pre.get("panel"),
        "pre-training curves": pre.get("curves"),
        "fine-tune curves (pre-trained)": str(out / "finetune_pretrained" / "curves.png"),
        "fine-tune curves (scratch)": str(out / "finetune_scratch" / "curves.png"),
    }
    for name, path in pngs.items():
        print(f"  {name}: {path}")
    summary = dict(top1=acc, seconds=round(time.perf_counter() - t0, 1), pngs=pngs,
                   tokenizer={k: tok.get(k) for k in ("heldout_psnr", "heldout_perplexity", "heldout_dead_codes")},
                   mim_acc=mim_acc)
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"done in {summary['seconds']}s; summary: {out / 'demo_summary.json'}")
    return summary
