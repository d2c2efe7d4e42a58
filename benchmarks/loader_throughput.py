"""Pre-training data pipeline throughput: decode + two-view augmentation + blockwise masking.

Two paths: 224px JPEGs from a folder through DataLoader workers (the ImageNet-style path), and small
images kept decoded in memory with the views made on the GPU (the CIFAR path).

    python benchmarks/loader_throughput.py --workers 16 --json $OUT/loader.json
    python benchmarks/loader_throughput.py --cifar data/cifar10/train    # real CIFAR-10 images in memory
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from beit.data.datasets import ImageFolderDataset, TensorImageDataset, load_image_folder_to_memory
from beit.data.gpu_augment import PretrainViews
from beit.data.masking import BlockwiseMaskGenerator
from beit.data.transforms import PretrainTransform, collate_pretrain


def make_jpegs(root: Path, n: int, size: tuple[int, int] = (375, 500)) -> None:
    """ImageNet-sized JPEGs (500x375, q90) with some structure, so the decoder does real work."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    base = rng.integers(0, 255, (size[0] // 8, size[1] // 8, 3), dtype=np.uint8)
    for i in range(n):
        img = Image.fromarray(np.roll(base, i, axis=1)).resize((size[1], size[0]), Image.BILINEAR)
        img.save(root / f"{i:05d}.jpg", quality=90)


def _endless(loader: torch.utils.data.DataLoader):
    """Batches without end: a new pass starts when one runs out."""
    while True:
        yield from loader


def folder_path(root: Path, workers: int, batch: int, batches: int) -> float:
    ds = ImageFolderDataset(root, transform=PretrainTransform(224, 16, 8), seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                                         collate_fn=collate_pretrain, drop_last=True, persistent_workers=True,
                                         prefetch_factor=4)
    it = _endless(loader)
    next(it)  # workers up
    t0 = time.perf_counter()
    n = 0
    for _ in range(batches):
        n += next(it)["image"].shape[0]
    return n / (time.perf_counter() - t0)


def memory_gpu_path(images: torch.Tensor, workers: int, batch: int, batches: int) -> float:
    """uint8 images in RAM; masks drawn in workers; crops, flips, jitter and the two views on the GPU."""
    cfg = PretrainTransform(32, 4, 4, mask_generator=BlockwiseMaskGenerator((8, 8), 26, 4))
    ds = TensorImageDataset(images, mask_generator=cfg.mask_generator, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                                         persistent_workers=workers > 0, pin_memory=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    views = PretrainViews.from_transform(cfg, seed=0)  # crop boxes and flips drawn on the CPU, applied on the device
    it = _endless(loader)
    t0 = time.perf_counter()
    n = 0
    for i in range(batches):
        b = next(it)
        images = b["image"].to(device, non_blocking=True).permute(0, 3, 1, 2)  # [B, H, W, 3] -> [B, 3, H, W]
        index = torch.arange(i * batch, (i + 1) * batch)  # the views only need distinct per-sample ids here
        out = views(images, index, 0, masks=b["mask"].to(device))
        n += out["image"].shape[0]
    if device == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--cifar", default="", help="a folder of CIFAR class folders for the in-memory path")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    out = {"workers": args.workers, "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        make_jpegs(Path(tmp), args.images)
        print(f"wrote {args.images} JPEGs 500x375 in {time.perf_counter() - t:.1f}s", flush=True)
        ips = folder_path(Path(tmp), args.workers, args.batch, args.batches)
        out["jpeg224_img_per_s"] = ips
        print(f"224px JPEG folder -> two views + mask, {args.workers} workers: {ips:.0f} img/s", flush=True)
    if args.cifar:
        images, _, _ = load_image_folder_to_memory(args.cifar, progress=False)
    else:
        images = torch.randint(0, 255, (10000, 32, 32, 3), dtype=torch.uint8)
    ips = memory_gpu_path(images, min(args.workers, 8), 256, args.batches)
    out["memory32_gpu_views_img_per_s"] = ips
    print(f"32px in memory, views on {'GPU' if torch.cuda.is_available() else 'CPU'}: {ips:.0f} img/s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
