"""How `beit demo`'s runs scale with intra-op threads on a small CPU (RESULTS.md section 5, the demo's lanes).

Times one of the demo's fine-tuning runs (150 steps, the pre-trained arm) or 200 of its pre-training steps, on the
data, tokenizer and encoder of an earlier `beit demo --out DEMO`, with THREADS intra-op threads:

    python benchmarks/demo_lanes_probe.py ft 2 DEMO /tmp/p_ft2
    python benchmarks/demo_lanes_probe.py ft 1 DEMO /tmp/p_ft1
    python benchmarks/demo_lanes_probe.py ft 1 DEMO /tmp/p_a & python benchmarks/demo_lanes_probe.py ft 1 DEMO /tmp/p_b
    python benchmarks/demo_lanes_probe.py pre 2 DEMO /tmp/p_pre2

Prints "<stage> <threads> threads <seconds> s <top-1 or masked-token accuracy>".
"""

from __future__ import annotations

import argparse
import time

import torch

from beit.engine.config import TrainConfig
from beit.engine.logging import quiet_console
from beit.tasks.classify import DataConfig, FinetuneConfig, finetune
from beit.tasks.demo import DemoConfig
from beit.tasks.pretrain import (
    PretrainConfig,
    PretrainDataConfig,
    PretrainModelConfig,
    PretrainTokenizerConfig,
    pretrain,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["ft", "pre"])
    p.add_argument("threads", type=int)
    p.add_argument("demo", help="the --out folder of an earlier `beit demo`")
    p.add_argument("out", help="where this run writes (replaced)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    c = DemoConfig()
    common = dict(num_workers=0, overwrite=True, seed=0, output_dir=a.out)
    if a.stage == "ft":
        cfg = FinetuneConfig(
            model=f"{a.demo}/pretrain/final", model_overrides={}, img_size=c.img_size, drop_path=0.0, mixup=0.0,
            cutmix=0.0, smoothing=0.1,
            data=DataConfig(train_dir=f"{a.demo}/data/train", val_dir=f"{a.demo}/data/test", in_memory=True,
                            auto_augment=None, reprob=0.0, hflip=0.0, color_jitter=0.0, crop_padding=c.crop_padding,
                            device=c.data_device),
            train=TrainConfig(max_steps=c.ft_steps, batch_size=c.batch_size, lr=c.ft_lr, min_lr=1e-5,
                              warmup_steps=c.ft_steps // 10, weight_decay=0.05, layer_decay=c.layer_decay,
                              eval_every=2, log_every=25, **common))
        run, key = finetune, "top1"
    else:
        cfg = PretrainConfig(
            model=PretrainModelConfig(name="beit_tiny_patch16_224", img_size=c.img_size, patch_size=c.patch_size,
                                      drop_path_rate=0.0, **c.encoder()),
            data=PretrainDataConfig(path=f"{a.demo}/data/train", in_memory=True, device=c.data_device,
                                    scale=(0.5, 1.0), color_jitter=0.0, hflip=0.0,
                                    num_mask_patches=c.num_mask_patches,
                                    min_mask_patches_per_block=c.min_mask_patches_per_block),
            tokenizer=PretrainTokenizerConfig(kind="dvae", path=f"{a.demo}/tokenizer/dvae.safetensors"),
            train=TrainConfig(max_steps=200, batch_size=c.batch_size, lr=c.pre_lr, min_lr=1e-5, warmup_steps=20,
                              weight_decay=0.05, betas=(0.9, 0.98), clip_grad=3.0, image_every=10**9, log_every=50,
                              **common),
            vis_samples=6)
        run, key = pretrain, "train/mim_acc"
    t = time.perf_counter()
    with quiet_console():
        result = run(cfg)
    print(f"{a.stage} {a.threads} threads {time.perf_counter() - t:.1f} s {result.get(key)}")


if __name__ == "__main__":
    main()
