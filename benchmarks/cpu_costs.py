"""Per-item CPU costs of the loader's work on the device path (one core), the figures RESULTS.md section 9 quotes:

  decode_ms          a 500x375 JPEG (q90, made from the CamVid frames or random smooth images) decoded by
                     libjpeg-turbo (torchvision.io.decode_jpeg on CPU) and by PIL
  mask_us            one blockwise mask (8x8 grid, CIFAR pre-training) drawn from a generator seeded by
                     (seed, epoch, index), as the device path does, and inside ``seeded(...)``, as before
  copy_ms            a decoded photo copied into the batch buffer as libjpeg-turbo wrote it (H x W x 3, what the
                     workers do since the sixth session) and made C x H x W contiguous first (as before)
  box_us             one image's random-resized-crop box in a worker (``WorkerCrop``: its uniforms and box)
  worker_ms          one pre-training sample as a loader worker makes it on the device path (read, probe,
                     libjpeg-turbo decode, crop box, cut, 14x14 mask: ``EncodedImageFiles[i]``) and the
                     batch's collation into one buffer, per image (batch 128)
  weights_ms         the resize's filter matrices of a batch of 128 crops of 500x375 photos to 224 px
                     (``gpu_augment._aa_weights``, both axes), on CPU

    OMP_NUM_THREADS=1 python benchmarks/cpu_costs.py [--photos .carry/data/CamVid/train]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from beit.data.gpu_augment import PretrainViews, _aa_weights
from beit.data.gpu_decode import EncodedImageFiles, collate_encoded
from beit.data.seeding import generator_for, seeded
from beit.data.transforms import PretrainTransform, default_mask_generator


def _per_item(fn, items, repeat: int = 3) -> float:
    for it in items[:5]:
        fn(it)
    t = time.perf_counter()
    for _ in range(repeat):
        for it in items:
            fn(it)
    return (time.perf_counter() - t) / (repeat * len(items))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", default="", help="a folder of photos to resize to 500x375 (default: synthetic)")
    ap.add_argument("--n", type=int, default=50)
    a = ap.parse_args()
    torch.set_num_threads(1)
    files = sorted(Path(a.photos).rglob("*.jpg"))[: a.n] if a.photos else []
    rng = np.random.default_rng(0)
    imgs = [Image.open(f).convert("RGB") for f in files] or [
        Image.fromarray(np.clip(rng.normal(128, 40, (24, 32, 3)), 0, 255).astype(np.uint8)) for _ in range(a.n)]
    datas = []
    for im in imgs:
        buf = io.BytesIO()
        im.resize((500, 375), Image.BICUBIC).save(buf, "JPEG", quality=90)
        datas.append(buf.getvalue())
    tv = _per_item(lambda d: decode_jpeg(torch.frombuffer(bytearray(d), dtype=torch.uint8), mode=ImageReadMode.RGB),
                   datas)
    pil = _per_item(lambda d: np.asarray(Image.open(io.BytesIO(d)).convert("RGB")), datas)
    masks = default_mask_generator(8)
    idx = list(range(2000))
    gen = _per_item(lambda i: masks(generator_for(0, 0, i)), idx, 1)

    def old(i: int) -> torch.Tensor:
        with seeded(0, 0, i):
            return masks()

    sd = _per_item(old, idx, 1)
    decoded = [decode_jpeg(torch.frombuffer(bytearray(d), dtype=torch.uint8), mode=ImageReadMode.RGB) for d in datas]
    buf = torch.empty(375 * 500 * 3, dtype=torch.uint8)
    hwc = _per_item(lambda im: buf.view(375, 500, 3).copy_(im.permute(1, 2, 0)), decoded)
    chw = _per_item(lambda im: buf.view(375, 500, 3).copy_(im.contiguous().permute(1, 2, 0)), decoded)
    g = torch.Generator().manual_seed(0)
    top, h = torch.randint(0, 100, (128,), generator=g), torch.randint(60, 275, (128,), generator=g)
    left, w = torch.randint(0, 100, (128,), generator=g), torch.randint(60, 400, (128,), generator=g)
    cpu = torch.device("cpu")
    weights = _per_item(lambda _: (_aa_weights(top, h, 375, 224, cpu), _aa_weights(left, w, 500, 224, cpu)),
                        [0] * 3, 2)
    print(f"decode_ms  libjpeg-turbo {tv * 1e3:.2f}  PIL {pil * 1e3:.2f}  ({len(datas)} JPEGs 500x375, "
          f"{'photos' if files else 'synthetic'})")
    print(f"mask_us    seeded generator {gen * 1e6:.0f}  inside seeded() {sd * 1e6:.0f}")
    print(f"copy_ms    into the batch buffer as decoded {hwc * 1e3:.2f}  made C x H x W contiguous first "
          f"{chw * 1e3:.2f}")
    print(f"weights_ms resize matrices of 128 crops to 224 px {weights * 1e3:.1f}")
    t = PretrainTransform(224, 16, 8, color_jitter=0.4)
    crop = PretrainViews.from_transform(t).worker_crop()
    box = _per_item(lambda i: crop(i, 0, 375, 500), idx, 1)
    with tempfile.TemporaryDirectory() as tmp:
        for i, d in enumerate(datas * (128 // len(datas) + 1)):
            Path(tmp, f"{i:04d}.jpg").write_bytes(d)
        ds = EncodedImageFiles.from_folder(tmp, mask_generator=t.mask_generator, seed=0, jpeg_decode="workers",
                                           crop=crop)
        n = min(len(ds), 128)
        batch = _per_item(lambda _: collate_encoded([ds[i] for i in range(n)]), [0] * 3, 1) / n
    print(f"box_us     a worker's crop box {box * 1e6:.0f}")
    print(f"worker_ms  a pre-training sample made in a worker and collated (batch {n}) {batch * 1e3:.2f}")


if __name__ == "__main__":
    main()
