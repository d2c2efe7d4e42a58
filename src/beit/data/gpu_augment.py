"""Per-sample augmentation of whole batches on their device (GPU, or CPU tensors for tests and laptops).

The CPU path (``PretrainTransform``, ``build_finetune_transform``) augments one PIL image at a time in
DataLoader workers; here a batch of uint8 images already on the device gets the same recipe, each
sample with its own random parameters:

* ``PretrainViews``: BEiT's pre-training views: colour jitter (brightness, contrast, saturation in a
  random order per sample, as ``T.ColorJitter``), ONE random-resized crop (torchvision's sampling) and a
  horizontal flip shared by the patch view (``input_size``, bicubic, normalised) and the tokenizer view
  (``tokenizer_size``, bicubic with antialiasing, in [0, 1]; the official code uses Lanczos, which
  torch does not have).
* ``FinetuneAugment``: the fine-tuning recipe: random-resized crop (padded random crop at <= 32 px, as
  unilm for CIFAR), flip, timm's RandAugment (``rand-m9-mstd0.5-inc1``: same op set, magnitudes and
  probabilities, parsed by timm itself), normalisation and random erasing ('pixel' mode). Mixup/cutmix
  and label smoothing stay with timm's ``Mixup`` in the task's step (it works on device batches).

Random numbers are a pure function of ``(seed, epoch, index)`` (``per_sample_uniforms``: a
counter-based hash computed on CPU, vectorised), so a sample's augmentation does not depend on the
batch it lands in, on the number of workers or ranks, or on the device; all parameters are drawn on
CPU before anything is launched on the device and moved from pinned memory (:func:`to_device_async`), so
nothing here waits for the GPU. The one exception is
the Gaussian noise of random erasing, drawn on the device from a generator seeded by the batch's
(seed, epoch, first index).

Differences from the CPU path, by design: jitter runs after the crop (on the views; the contrast mean is
that of the patch view, not of the whole image), the RandAugment geometric ops use bilinear sampling with
a hard-edged fill, and pixels are not re-quantised to 8 bits between ops.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.data.auto_augment import rand_augment_transform
from torchvision.transforms.v2 import functional as TF2

from .seeding import derive_seed
from .transforms import small_image_padding

logger = logging.getLogger(__name__)

__all__ = [
    "FinetuneAugment",
    "PretrainViews",
    "WorkerCrop",
    "crop_box",
    "crop_boxes",
    "per_sample_uniforms",
    "sample_uniforms",
    "resized_crops",
    "to_device_async",
]

# ------------------------------------------------------------------------------------------ random numbers
_C1 = 0xBF58476D1CE4E5B9 - (1 << 64)  # splitmix64 constants as signed int64
_C2 = 0x94D049BB133111EB - (1 << 64)
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)


def _lsr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (wrapping multiplication)."""
    x = x ^ _lsr(x, 30)
    x = x * _C1
    x = x ^ _lsr(x, 27)
    x = x * _C2
    return x ^ _lsr(x, 31)


def _signed(v: int) -> int:
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


def per_sample_uniforms(seed: int, epoch: int, index: torch.Tensor, n: int, stream: int = 0) -> torch.Tensor:
    """``n`` uniform numbers in [0, 1) per sample, a pure function of (seed, epoch, index, stream).

    Args:
        seed, epoch: the run's seed and the epoch (non-negative ints).
        index: int64 ``[B]`` dataset indices (CPU).
        n: how many numbers per sample.
        stream: separates the uses (crop, flip, RandAugment, ...) so they never share numbers.

    Returns:
        float64 ``[B, n]`` on CPU, 53-bit uniforms.
    """
    index = torch.as_tensor(index, dtype=torch.int64).cpu().view(-1)
    base = _signed(derive_seed(seed, epoch, (1 << 40) + int(stream)))
    key = _mix(index * _GOLDEN + base)
    k = torch.arange(1, n + 1, dtype=torch.int64) * _signed(0xD1B54A32D192ED03)
    bits = _mix(key.view(-1, 1) + k.view(1, -1))
    return _lsr(bits, 11).to(torch.float64) * (1.0 / (1 << 53))


_M64 = (1 << 64) - 1


def _mix_int(x: int) -> int:
    """``_mix`` on one unsigned 64-bit Python int (the same bits as the int64 tensor version)."""
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _M64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def sample_uniforms(seed: int, epoch: int, index: int, n: int, stream: int = 0) -> list[float]:
    """One sample's row of :func:`per_sample_uniforms` (the same numbers, bit for bit), in plain Python: for a
    loader worker that needs one sample's numbers (a batch-of-one tensor call costs ~10x more)."""
    base = derive_seed(seed, epoch, (1 << 40) + int(stream)) & _M64
    key = _mix_int((int(index) * (_GOLDEN & _M64) + base) & _M64)
    step = 0xD1B54A32D192ED03
    return [(_mix_int((key + k * step) & _M64) >> 11) * (1.0 / (1 << 53)) for k in range(1, n + 1)]


def crop_box(height: int, width: int, u: Sequence[float], scale: tuple[float, float] = (0.08, 1.0),
             ratio: tuple[float, float] = (3 / 4, 4 / 3), attempts: int = 10) -> tuple[int, int, int, int]:
    """One image's :func:`crop_boxes` box ``(top, left, h, w)`` from its ``2 * attempts + 2`` uniforms, in plain
    Python (the same float64 operations in the same order; ``round`` is half-to-even in both).

    Raises:
        ValueError: fewer than ``2 * attempts + 2`` uniforms.
    """
    if len(u) < 2 * attempts + 2:
        raise ValueError(f"crop_box needs {2 * attempts + 2} uniforms, got {len(u)}")
    H, W = float(height), float(width)
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    for a in range(attempts):
        target = H * W * (scale[0] + (scale[1] - scale[0]) * u[a])
        aspect = math.exp(lo + (hi - lo) * u[attempts + a])
        w, h = float(round(math.sqrt(target * aspect))), float(round(math.sqrt(target / aspect)))
        if w > 0 and h > 0 and w <= W and h <= H:
            top = min(math.floor(u[-2] * (H - h + 1)), H - h)
            left = min(math.floor(u[-1] * (W - w + 1)), W - w)
            return int(top), int(left), int(h), int(w)
    in_ratio = W / H  # torchvision's fallback: the whole image cut to the ratio range, centred
    fw = W if in_ratio < ratio[0] else (float(round(H * ratio[1])) if in_ratio > ratio[1] else W)
    fh = float(round(W / ratio[0])) if in_ratio < ratio[0] else H
    return int((H - fh) // 2), int((W - fw) // 2), int(fh), int(fw)


def _normal(u1: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    """Box-Muller: standard normals from two uniforms in [0, 1)."""
    return torch.sqrt(-2.0 * torch.log1p(-u1)) * torch.cos(2 * math.pi * u2)


# ------------------------------------------------------------------------------------------ crops
def crop_boxes(
    heights: torch.Tensor,
    widths: torch.Tensor,
    u: torch.Tensor,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> torch.Tensor:
    """torchvision's ``RandomResizedCrop.get_params`` for a batch of images of different sizes.

    Args:
        heights, widths: ``[B]`` image sizes in pixels.
        u: ``[B, 2 * attempts + 2]`` uniforms in [0, 1) (e.g. from ``per_sample_uniforms``).
        scale, ratio: area fraction and aspect (w / h) ranges.

    Returns:
        int64 ``[B, 4]`` boxes ``(top, left, h, w)``: the first of ``attempts`` draws that fits, else the
        largest centre crop within the ratio range (torchvision's fallback).
    """
    if u.shape[1] < 2 * attempts + 2:
        raise ValueError(f"crop_boxes needs {2 * attempts + 2} uniforms per sample, got {u.shape[1]}")
    H = heights.to(torch.float64).view(-1, 1)
    W = widths.to(torch.float64).view(-1, 1)
    target = H * W * (scale[0] + (scale[1] - scale[0]) * u[:, :attempts])
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + (hi - lo) * u[:, attempts : 2 * attempts])
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (h > 0) & (w <= W) & (h <= H)
    first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    H, W = H.squeeze(1), W.squeeze(1)
    top = torch.floor(u[:, -2] * (H - h + 1)).clamp(max=H - h)
    left = torch.floor(u[:, -1] * (W - w + 1)).clamp(max=W - w)
    # fallback: whole image cut to the ratio range, centred
    in_ratio = W / H
    fw = torch.where(in_ratio < ratio[0], W, torch.where(in_ratio > ratio[1], torch.round(H * ratio[1]), W))
    fh = torch.where(in_ratio < ratio[0], torch.round(W / ratio[0]), H)
    has = ok.any(dim=1)
    h, w = torch.where(has, h, fh), torch.where(has, w, fw)
    top = torch.where(has, top, torch.div(H - fh, 2, rounding_mode="floor"))
    left = torch.where(has, left, torch.div(W - fw, 2, rounding_mode="floor"))
    return torch.stack([top, left, h, w], dim=1).to(torch.int64)


@dataclass(frozen=True)
class WorkerCrop:
    """One sample's random-resized-crop box, drawn from the same numbers as the views' ``params`` (the first 22
    uniforms of ``(seed, epoch, index, stream)``), for the loader's workers: a worker that decodes the image
    cuts the box out before the pixels travel, so the batch carries the crop (~half the photo on average with
    the recipe's scale (0.08, 1)) instead of the photo, and the views take it whole (``cropped``).

    A small picklable object (no tensors) for ``DataLoader`` workers; made by ``PretrainViews.worker_crop()``
    and ``FinetuneAugment.worker_crop()``.
    """

    seed: int
    stream: int
    scale: tuple[float, float]
    ratio: tuple[float, float]

    def __call__(self, index: int, epoch: int, height: int, width: int) -> tuple[int, int, int, int]:
        """``(top, left, h, w)`` of sample ``index`` in epoch ``epoch`` for an image of ``height`` x ``width``: the
        box ``crop_boxes`` draws from ``per_sample_uniforms`` (tested equal), in plain Python (a worker does this
        once an image: ~20 us against ~300 us for the batched tensor code on a batch of one)."""
        u = sample_uniforms(self.seed, epoch, index, 22, stream=self.stream)
        return crop_box(height, width, u, self.scale, self.ratio)


def _whole_if_cropped(box: torch.Tensor, cropped: torch.Tensor | None, heights: torch.Tensor,
                      widths: torch.Tensor) -> torch.Tensor:
    """``box`` [B, 4], with the whole image ``(0, 0, h, w)`` for the samples whose image is already their crop."""
    if cropped is None or not bool(cropped.any()):
        return box
    whole = torch.stack([torch.zeros_like(heights), torch.zeros_like(widths), heights, widths], 1).to(box.dtype)
    return torch.where(cropped.view(-1, 1), whole, box)


def _sizes(images: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.device, torch.Tensor, torch.Tensor]:
    """Device and CPU int64 heights, widths ``[B]`` of a batch tensor or a list of images."""
    if torch.is_tensor(images):
        B, _, H, W = images.shape
        return images.device, torch.full((B,), H), torch.full((B,), W)
    imgs = list(images)
    if not imgs:
        raise ValueError("empty batch of images")
    return (imgs[0].device, torch.tensor([im.shape[-2] for im in imgs]), torch.tensor([im.shape[-1] for im in imgs]))


def resized_crops(
    images: torch.Tensor | Sequence[torch.Tensor],
    boxes: torch.Tensor,
    sizes: Sequence[tuple[int, int]],
) -> list[torch.Tensor]:
    """Each image's box, resized (bicubic, antialiased like PIL) to every size in ``sizes``.

    The resize runs as two batched matrix products with per-sample separable filter matrices
    (:func:`_aa_weights`: the weights of ``F.interpolate(mode="bicubic", antialias=True)``, as PIL resizes a
    crop), a fixed number of kernels whatever the batch size, on images zero-padded to the largest of their
    chunk (``MAX_CHUNK_BYTES`` of float32 per chunk). Pixels outside a box never contribute. On CUDA the
    products take float16 operands with float32 accumulation (half the bytes of the padded batch, tensor
    cores; within half a grey level of float32, 0.05 on average: a CUDA test bounds it); elsewhere float32.

    Args:
        images: uint8 or float ``[B, 3, H, W]``, or a list of ``[3, H_i, W_i]`` (sizes may differ), on one device.
        boxes: int64 ``[B, 4]`` (top, left, h, w) on CPU, inside their images.
        sizes: output ``(h, w)`` of each view.

    Returns:
        one float ``[B, 3, h, w]`` tensor per size, values in the input's 0..255 or 0..1 range (not clamped).

    Raises:
        ValueError: an empty batch, a box count unlike the image count, or a box not inside its image (named).
    """
    batch = torch.is_tensor(images) and images.ndim == 4
    imgs: Any = images if batch else list(images)
    if len(imgs) == 0:
        raise ValueError("empty batch of images")
    if len(imgs) != len(boxes):
        raise ValueError(f"{len(imgs)} images but {len(boxes)} boxes")
    shapes = [tuple(images.shape[-2:])] * len(imgs) if batch else [tuple(im.shape[-2:]) for im in imgs]
    hw = torch.tensor(shapes, dtype=torch.int64)
    bad = ((boxes[:, :2] < 0) | (boxes[:, 2:] < 1) | (boxes[:, :2] + boxes[:, 2:] > hw)).any(1)
    if bool(bad.any()):
        k = int(bad.nonzero()[0])
        raise ValueError(f"crop box {boxes[k].tolist()} (top, left, h, w) of sample {k} is not inside its "
                         f"{shapes[k][0]}x{shapes[k][1]} image")
    device = imgs[0].device
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    outs = [torch.empty(len(imgs), 3, h, w, device=device) for h, w in sizes]
    for chunk in _size_chunks(shapes):
        x = _padded(imgs, chunk, dtype)  # [n, 3, Hc, Wc]
        b = boxes[chunk]
        whole = chunk == list(range(len(imgs)))
        idx = None if whole else to_device_async(torch.tensor(chunk), device)
        for out, (oh, ow) in zip(outs, sizes):
            wy = _aa_weights(b[:, 0], b[:, 2], x.shape[-2], oh, device).to(dtype)  # [n, oh, Hc]
            wx = _aa_weights(b[:, 1], b[:, 3], x.shape[-1], ow, device).to(dtype)  # [n, ow, Wc]
            # float32 products on CPU (where the user enabled TF32 they round to it); no global precision
            # flag is touched here
            y = wy.unsqueeze(1) @ (x @ wx.transpose(1, 2).unsqueeze(1))  # [n, 3, oh, ow]
            if idx is None:
                out.copy_(y)
            else:
                out.index_copy_(0, idx, y.to(out.dtype))
    return outs


MAX_CHUNK_BYTES = 1 << 30  # float32 bytes of one padded chunk of images in resized_crops


def _size_chunks(shapes: Sequence[tuple[int, int]], max_bytes: int | None = None) -> list[list[int]]:
    """Indices of images of ``shapes`` in chunks whose zero-padded float32 batch stays under ``max_bytes``
    (one chunk when the images share a size, as they mostly do; otherwise by increasing area, so padding
    stays small)."""
    max_bytes = MAX_CHUNK_BYTES if max_bytes is None else max_bytes
    if len(set(shapes)) == 1:
        step = max(1, max_bytes // (12 * shapes[0][0] * shapes[0][1]))
        return [list(range(i, min(i + step, len(shapes)))) for i in range(0, len(shapes), step)]
    order = sorted(range(len(shapes)), key=lambda i: shapes[i][0] * shapes[i][1])
    chunks: list[list[int]] = []
    cur: list[int] = []
    hmax = wmax = 0
    for i in order:
        h, w = max(hmax, shapes[i][0]), max(wmax, shapes[i][1])
        if cur and 12 * (len(cur) + 1) * h * w > max_bytes:
            chunks.append(cur)
            cur, h, w = [], shapes[i][0], shapes[i][1]
        cur.append(i)
        hmax, wmax = h, w
    chunks.append(cur)
    return chunks


def _padded(imgs: torch.Tensor | Sequence[torch.Tensor], chunk: list[int], dtype: torch.dtype = torch.float32
            ) -> torch.Tensor:
    """``[n, 3, Hmax, Wmax]`` of ``dtype`` of the chunk's images (rows of a batch tensor, or list items),
    zero-padded at the bottom and right (the filter weights of padded pixels are zero)."""
    if torch.is_tensor(imgs):
        return imgs[chunk[0] : chunk[-1] + 1].to(dtype)  # a batch tensor's chunks are contiguous ranges
    sel = [imgs[i] for i in chunk]
    if len({tuple(im.shape) for im in sel}) == 1:
        return torch.stack(sel).to(dtype)
    H, W = max(im.shape[-2] for im in sel), max(im.shape[-1] for im in sel)
    x = torch.zeros(len(sel), 3, H, W, device=sel[0].device, dtype=dtype)
    for k, im in enumerate(sel):
        x[k, :, : im.shape[-2], : im.shape[-1]] = im
    return x


def _aa_weights(start: torch.Tensor, length: torch.Tensor, padded: int, out: int, device: torch.device
                ) -> torch.Tensor:
    """Resampling matrices ``[n, out, padded]``: row ``i`` of sample ``k`` holds the weights over input pixels
    ``start..start+length`` that ``F.interpolate(mode="bicubic", antialias=True, align_corners=False)`` (and
    PIL's ``Image.resize(BICUBIC)``) give output pixel ``i`` when resizing that span to ``out`` pixels:
    the bicubic kernel (a = -0.5) stretched by the downscale factor, normalised per row; zero elsewhere.
    (ATen ``UpSample.h``: ``_compute_indices_min_size_weights_aa``.)

    The weights are computed (float64) for each row's taps only, at most ``ceil(2 * support) + 1`` of them
    (``support`` = 2 x the batch's largest downscale factor), then scattered into the zero matrix: computing
    them over all ``padded`` columns took ~30 elementwise passes over ``[n, out, padded]`` float64 tensors
    (2.35 s against 0.06 s for a batch of 128 crops to 224 px on one CPU core: ``benchmarks/cpu_costs.py``).

    ``start``, ``length``: int64 ``[n]`` on CPU (the crop boxes' offsets and extents in this axis)."""
    n = len(start)
    support_max = 2.0 * max(float(length.max()) / out, 1.0) if n else 2.0
    taps = max(1, min(math.ceil(2 * support_max) + 1, padded))
    span = to_device_async(torch.stack([start, length]).to(torch.float64), device)  # one copy, not two
    start, length = span[0].view(-1, 1, 1), span[1].view(-1, 1, 1)
    scale = length / out
    support = torch.where(scale >= 1, 2.0 * scale, torch.full_like(scale, 2.0))
    invscale = torch.where(scale >= 1, 1.0 / scale, torch.ones_like(scale))
    i = torch.arange(out, device=device, dtype=torch.float64).view(1, -1, 1)
    center = scale * (i + 0.5)
    xmin = torch.floor(center - support + 0.5).clamp(min=0)
    xmax = torch.minimum(torch.floor(center + support + 0.5), length)
    j = xmin + torch.arange(taps, device=device, dtype=torch.float64).view(1, 1, -1)  # crop coordinates
    t = ((j - center + 0.5) * invscale).abs()
    a = -0.5
    w = torch.where(t < 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                    torch.where(t < 2, (((t - 5) * t + 8) * t - 4) * a, torch.zeros_like(t)))
    w = torch.where(j < xmax, w, torch.zeros_like(w))  # taps past the span's end (or the row's support)
    w = w / w.sum(-1, keepdim=True)
    # a valid tap's column start + j < start + length <= padded; the clamp only moves zero-weight taps
    cols = (j + start).clamp(max=padded - 1).long()
    dense = torch.zeros(n, out, padded, device=device, dtype=torch.float32)
    return dense.scatter_add_(2, cols.expand(n, out, taps), w.float().expand(n, out, taps))


def _gray(x: torch.Tensor) -> torch.Tensor:
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (factor * x + (1 - factor) * other).clamp(0, 1)


_SMOOTH = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13  # PIL's SMOOTH filter


class _DeviceConstants:
    """Copies of small constant CPU tensors per device, made once: a blocking copy of a CPU tensor waits for
    all queued GPU work, so none is made per batch."""

    def __init__(self) -> None:
        self._copies: dict[tuple[str, str], torch.Tensor] = {}

    def get(self, name: str, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        key = (name, str(device))
        if key not in self._copies:
            self._copies[key] = t.to(device)
        return self._copies[key]


_MODULE_CONSTANTS = _DeviceConstants()


def to_device_async(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A CPU tensor on ``device`` without making the host wait for the GPU: on CUDA the copy is made from
    pinned memory (the caching host allocator keeps the block alive until the copy is done).

    A copy from pageable memory may first wait for the work queued on its stream (CUDA runtime API, "API
    synchronization behavior"): on the prefetch stream, after this batch's resize kernels, that would hold the
    host until they had run beside the training step, and the step's next launches with it. Other devices:
    ``t.to(device)``."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)  # pin_memory() returns a pinned tensor itself
    return t.to(device)


def _col(v: torch.Tensor, device: torch.device) -> torch.Tensor:
    return to_device_async(v.to(torch.float32), device).view(-1, 1, 1, 1)


# ------------------------------------------------------------------------------------------ pre-training
def _finish_views_eager(patch: torch.Tensor, tok: torch.Tensor, per: torch.Tensor, mean: torch.Tensor,
                        std: torch.Tensor, active: tuple[bool, bool, bool]) -> tuple[torch.Tensor, torch.Tensor]:
    """Both views from 0..255 to [0, 1], flipped, colour-jittered in each sample's order, the patch view
    normalised. ``per`` [B, 7]: flip (0/1), brightness, contrast, saturation factors, the order (3 op ids)."""
    patch = (patch / 255.0).clamp(0, 1)
    tok = (tok / 255.0).clamp(0, 1)
    flip = per[:, 0].view(-1, 1, 1, 1) > 0.5
    patch = torch.where(flip, patch.flip(-1), patch)
    tok = torch.where(flip, tok.flip(-1), tok)
    for step in range(3):
        op = per[:, 4 + step]
        for k in range(3):
            if not active[k]:
                continue
            f = torch.where(op == k, per[:, 1 + k], torch.ones_like(per[:, 1 + k])).view(-1, 1, 1, 1)
            if k == 0:
                patch, tok = (patch * f).clamp(0, 1), (tok * f).clamp(0, 1)
            elif k == 1:
                m = _gray(patch).mean(dim=(1, 2, 3), keepdim=True)
                patch, tok = _blend(patch, m, f), _blend(tok, m, f)
            else:
                patch, tok = _blend(patch, _gray(patch), f), _blend(tok, _gray(tok), f)
    return (patch - mean) / std, tok


class _CompiledOnCuda:
    """``fn`` compiled with ``torch.compile`` (fixed shapes) for CUDA tensors, eager elsewhere: the dozens of
    elementwise passes of the colour jitter become a few fused kernels, which matters because they run beside
    the training step on the same GPU. If compiling fails (no Triton, an unsupported setup), a warning and the
    eager function from then on."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self._compiled: Any = None
        self._failed = False

    def __call__(self, first: torch.Tensor, *args: Any) -> Any:
        if not first.is_cuda or self._failed:
            return self.fn(first, *args)
        if self._compiled is None:
            self._compiled = torch.compile(self.fn, dynamic=False)
        try:
            return self._compiled(first, *args)
        except Exception as e:  # noqa: BLE001 - the eager function is the same computation
            # not marked ALIKE_ON_EVERY_RANK: each rank compiles on its own GPU, and the error may be that rank's
            # alone (out of memory there, its compile cache); the rank that runs eagerly, slower, must say so
            logger.warning("compiling %s failed (%s: %s); running it eagerly", self.fn.__name__,
                           type(e).__name__, (str(e).splitlines() or [""])[0][:200])
            self._failed = True
            return self.fn(first, *args)


_finish_views = _CompiledOnCuda(_finish_views_eager)


class PretrainViews:
    """BEiT's two pre-training views of one crop per sample, for a batch on its device.

    Args:
        input_size: patch view ``(H, W)`` for the ViT.
        tokenizer_size: tokenizer view ``(h, w)`` (``input_size // patch * tokenizer downsample``).
        scale, ratio: random-resized-crop ranges (the recipe: (0.08, 1), (3/4, 4/3)).
        color_jitter: (brightness, contrast, saturation) strengths; hue is not supported.
        hflip: flip probability, shared by both views.
        mean, std: normalisation of the patch view.
        seed: the run's seed (random numbers are a function of (seed, epoch, index)).

    Raises:
        ValueError: a hue jitter or a bad range, naming the argument.
    """

    STREAM = 11

    def __init__(
        self,
        input_size: tuple[int, int],
        tokenizer_size: tuple[int, int],
        *,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        color_jitter: Sequence[float] = (0.4, 0.4, 0.4),
        hflip: float = 0.5,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        seed: int = 0,
    ) -> None:
        cj = [float(c) for c in color_jitter]
        if len(cj) == 4 and cj[3] > 0:
            raise ValueError(f"color_jitter: hue jitter is not supported on the tensor path, got {tuple(cj)}")
        if len(cj) not in (3, 4) or min(cj) < 0:
            raise ValueError(f"color_jitter must be (brightness, contrast, saturation) >= 0, got {tuple(cj)}")
        if not 0 < scale[0] <= scale[1] <= 1 or not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"scale must be in (0, 1] and ratio > 0, ordered; got scale={scale}, ratio={ratio}")
        self.input_size = tuple(int(v) for v in input_size)
        self.tokenizer_size = tuple(int(v) for v in tokenizer_size)
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.jitter = tuple(cj[:3])
        self.hflip = float(hflip)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.seed = int(seed)
        self._constants = _DeviceConstants()

    @classmethod
    def from_transform(cls, t: Any, seed: int = 0) -> PretrainViews:
        """The same recipe as a ``beit.data.transforms.PretrainTransform``."""
        return cls(t.input_size, t.tokenizer_size, scale=t.scale, ratio=t.ratio, color_jitter=t.color_jitter,
                   hflip=t.hflip, mean=t.mean, std=t.std, seed=seed)

    def worker_crop(self) -> WorkerCrop:
        """The crop box of ``params``, for the loader's workers (``EncodedImageFiles(crop=...)``)."""
        return WorkerCrop(self.seed, self.STREAM, self.scale, self.ratio)

    def params(self, index: torch.Tensor, epoch: int, heights: torch.Tensor, widths: torch.Tensor
               ) -> dict[str, torch.Tensor]:
        """CPU parameters of each sample: ``box`` [B, 4] (top, left, h, w), ``flip`` bool [B],
        ``jitter`` float [B, 3] factors (brightness, contrast, saturation), ``order`` int [B, 3]."""
        u = per_sample_uniforms(self.seed, epoch, index, 22 + 1 + 3 + 1, stream=self.STREAM)
        box = crop_boxes(heights, widths, u[:, :22], self.scale, self.ratio)
        flip = u[:, 22] < self.hflip
        lo = torch.tensor([max(0.0, 1 - j) for j in self.jitter], dtype=torch.float64)
        hi = torch.tensor([1 + j for j in self.jitter], dtype=torch.float64)
        jitter = lo + (hi - lo) * u[:, 23:26]
        perms = torch.tensor([[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]])
        order = perms[(u[:, 26] * 6).long().clamp(max=5)]
        return {"box": box, "flip": flip, "jitter": jitter, "order": order}

    def __call__(
        self,
        images: torch.Tensor | Sequence[torch.Tensor],
        index: torch.Tensor,
        epoch: int,
        masks: torch.Tensor | None = None,
        cropped: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Views of a batch.

        Args:
            images: uint8 ``[B, 3, H, W]`` or a list of ``[3, H_i, W_i]`` on the device.
            index: int64 ``[B]`` dataset indices (CPU); epoch: the epoch.
            masks: bool ``[B, h, w]`` blockwise masks (drawn in the workers), passed through.
            cropped: bool ``[B]`` (CPU): the image is already the sample's crop box (cut by ``worker_crop()``
                in a worker), taken whole; the other parameters are the sample's own as always.

        Returns:
            ``{"image": float [B, 3, H, W] normalised, "tok_image": float [B, 3, h, w] in [0, 1]}``
            (+ ``"mask"`` when given), on the images' device.
        """
        device, hs, ws = _sizes(images)
        p = self.params(index, epoch, hs, ws)
        box = _whole_if_cropped(p["box"], cropped, hs, ws)
        patch, tok = resized_crops(images, box, [self.input_size, self.tokenizer_size])
        # the per-sample numbers in one copy: flip, 3 jitter factors, the jitter order (as floats, exact)
        per = to_device_async(torch.cat([p["flip"].view(-1, 1).float(), p["jitter"].float(), p["order"].float()], 1),
                              device)
        c = self._constants
        image, tok = _finish_views(patch, tok, per, c.get("mean", self.mean, device), c.get("std", self.std, device),
                                   tuple(j > 0 for j in self.jitter))
        out = {"image": image, "tok_image": tok}
        if masks is not None:
            out["mask"] = to_device_async(masks, device)
        return out


# ------------------------------------------------------------------------------------------ RandAugment
_SIGNED = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel", "ColorIncreasing",
           "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"}
_GEOMETRIC = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}
_SUPPORTED = _SIGNED | {"AutoContrast", "Equalize", "Invert", "PosterizeIncreasing", "Posterize",
                        "SolarizeIncreasing", "Solarize", "SolarizeAdd", "Color", "Contrast", "Brightness",
                        "Sharpness"}


def _level_arg(name: str, level: torch.Tensor, sign: torch.Tensor, hparams: dict) -> torch.Tensor:
    """timm's ``LEVEL_TO_ARG`` for a vector of magnitudes (``sign``: +-1, timm's ``_randomly_negate``)."""
    lv = level / 10.0
    if name == "Rotate":
        return lv * 30.0 * sign
    if name in ("ShearX", "ShearY"):
        return lv * 0.3 * sign
    if name in ("TranslateXRel", "TranslateYRel"):
        return lv * float(hparams.get("translate_pct", 0.45)) * sign
    if name.endswith("Increasing") and name != "PosterizeIncreasing" and name != "SolarizeIncreasing":
        return torch.clamp(1.0 + lv * 0.9 * sign, min=0.1)
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return lv * 1.8 + 0.1
    if name == "PosterizeIncreasing":
        return 4 - torch.floor(lv * 4)
    if name == "Posterize":
        return torch.floor(lv * 4)
    if name == "SolarizeIncreasing":
        return 256 - torch.clamp(torch.floor(lv * 256), max=256)
    if name == "Solarize":
        return torch.clamp(torch.floor(lv * 256), max=256)
    if name == "SolarizeAdd":
        return torch.clamp(torch.floor(lv * 110), max=128)
    return torch.zeros_like(level)


def _affine(x: torch.Tensor, mats: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """PIL ``Image.transform(AFFINE)`` per sample: ``mats`` float32 [n, 2, 3] on ``x``'s device maps output
    pixel coordinates (pixel centres at +0.5) to input ones; outside pixels get ``fill`` [1, 3, 1, 1]."""
    n, _, H, W = x.shape
    ys = torch.arange(H, device=x.device, dtype=torch.float32) + 0.5
    xs = torch.arange(W, device=x.device, dtype=torch.float32) + 0.5
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    pts = torch.stack([gx, gy, torch.ones_like(gx)], dim=-1)  # [H, W, 3]
    src = torch.einsum("hwk,nck->nhwc", pts, mats)  # [n, H, W, 2] input pixel coordinates
    grid = torch.stack([src[..., 0] * 2 / W - 1, src[..., 1] * 2 / H - 1], dim=-1)
    ones = torch.ones(n, 1, H, W, device=x.device, dtype=x.dtype)
    out = F.grid_sample(torch.cat([x, ones], 1), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    inside = (out[:, 3:] > 0.5).to(x.dtype)
    return out[:, :3] * inside + fill * (1 - inside)


def _geometric_mats(name: str, arg: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """float64 ``[n, 2, 3]`` output-to-input maps of a geometric op for per-sample ``arg`` [n] (CPU)."""
    n = arg.shape[0]
    m = torch.zeros(n, 2, 3, dtype=torch.float64)
    m[:, 0, 0] = 1
    m[:, 1, 1] = 1
    if name == "ShearX":
        m[:, 0, 1] = arg
    elif name == "ShearY":
        m[:, 1, 0] = arg
    elif name == "TranslateXRel":
        m[:, 0, 2] = arg * W
    elif name == "TranslateYRel":
        m[:, 1, 2] = arg * H
    elif name == "Rotate":  # PIL rotate: counter-clockwise about the centre
        a = -arg * math.pi / 180
        c, s = torch.cos(a), torch.sin(a)
        cx, cy = W / 2, H / 2
        m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = c, s, -s, c
        m[:, 0, 2] = cx - c * cx - s * cy
        m[:, 1, 2] = cy + s * cx - c * cy
    return m


def _sharp_degenerate(x: torch.Tensor) -> torch.Tensor:
    k = _MODULE_CONSTANTS.get("smooth", _SMOOTH, x.device).to(x.dtype)
    blurred = F.conv2d(x, k.expand(3, 1, 3, 3), groups=3)
    out = x.clone()
    out[..., 1:-1, 1:-1] = blurred
    return out


def _color_op(name: str, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """One non-geometric RandAugment op on float ``[n, 3, H, W]`` in [0, 1] with per-sample arguments ``a``
    (float32 ``[n, 1, 1, 1]`` on ``x``'s device): PIL's ``ImageOps`` / ``ImageEnhance`` as timm calls them
    (torchvision's tensor kernels for the per-image autocontrast and equalize)."""
    if name == "AutoContrast":
        return TF2.autocontrast_image(x)
    if name == "Equalize":
        return TF2.equalize_image((x * 255).round().to(torch.uint8)).float() / 255
    if name == "Invert":
        return 1 - x
    if name.startswith("Posterize"):  # keep the top `bits` bits: mask 0xFF << (8 - bits) & 0xFF = 256 - 2^(8-bits)
        bits = a.to(torch.int64).clamp(0, 8)
        mask = (256 - torch.pow(2, 8 - bits)).to(torch.uint8)
        return ((x * 255).round().to(torch.uint8) & mask).float() / 255
    if name.startswith("Solarize") and name != "SolarizeAdd":
        v = (x * 255).round()
        return torch.where(v >= a, 255 - v, v) / 255
    if name == "SolarizeAdd":
        v = (x * 255).round()
        return torch.where(v < 128, (v + a).clamp(max=255), v) / 255
    if name.startswith("Color"):
        return _blend(x, _gray(x), a)
    if name.startswith("Contrast"):
        m = ((_gray(x) * 255).mean(dim=(1, 2, 3), keepdim=True) + 0.5).floor() / 255  # PIL: int(mean + .5)
        return _blend(x, m, a)
    if name.startswith("Brightness"):
        return (x * a).clamp(0, 1)
    if name.startswith("Sharpness"):
        return _blend(x, _sharp_degenerate(x), a)
    raise ValueError(f"RandAugment op {name!r} has no tensor implementation")


def _apply_op(name: str, x: torch.Tensor, arg: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """One RandAugment op on float [n, 3, H, W] in [0, 1] with per-sample args (CPU [n]): the per-op reference
    that the batched form (:func:`_randaugment_layers`) is tested against."""
    fill = fill.to(x.device)
    if name in _GEOMETRIC:
        mats = _geometric_mats(name, arg, x.shape[-2], x.shape[-1]).to(torch.float32)
        return _affine(x, to_device_async(mats, x.device), fill)
    return _color_op(name, x, _col(arg, x.device))


def _randaugment_layers(x: torch.Tensor, ops: torch.Tensor, args: torch.Tensor, mats: torch.Tensor,
                        fill: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
    """RandAugment layers on a batch with a fixed number of kernels whatever the op choices: every op of a
    layer is computed for the whole batch and each sample keeps its own op's result (the geometric ops share
    one resampling by per-sample affine maps). Compiled on CUDA the selections fuse and the host launches a
    fixed handful of kernels, where dispatching each op on its own subset of samples took dozens of launches
    and index copies a layer (26 ms of host time a CIFAR batch of 512, RESULTS.md section 9). Uncompiled
    (CPU tensors, or the eager fallback) it does ~15x the arithmetic of that dispatch: about 3x its time on CPU.

    Args:
        x: float ``[B, 3, H, W]`` in [0, 1].
        ops: ``[B, L]`` op index per sample and layer, -1 where the layer does not apply (float or int).
        args: float ``[B, L]`` the op's argument (timm's level-to-arg).
        mats: float32 ``[B, L, 2, 3]`` the geometric op's output-to-input map (identity for other ops).
        fill: ``[1, 3, 1, 1]`` fill colour in [0, 1]; names: the op names (timm's order).
    """
    geo = [k for k, name in enumerate(names) if name in _GEOMETRIC]
    for j in range(ops.shape[1]):
        op = ops[:, j].view(-1, 1, 1, 1)
        a = args[:, j].view(-1, 1, 1, 1).to(x.dtype)
        out = x
        if geo:
            is_geo = torch.zeros_like(op, dtype=torch.bool)
            for k in geo:
                is_geo = is_geo | (op == k)
            out = torch.where(is_geo, _affine(x, mats[:, j].to(x.dtype), fill), out)
        for k, name in enumerate(names):
            if name not in _GEOMETRIC:
                out = torch.where(op == k, _color_op(name, x, a), out)
        x = out
    return x


def _finetune_finish_eager(x: torch.Tensor, per: torch.Tensor, fill: torch.Tensor, mean: torch.Tensor,
                           std: torch.Tensor, noise: torch.Tensor | None, names: tuple[str, ...], layers: int
                           ) -> torch.Tensor:
    """The device part of :class:`FinetuneAugment` after the crop, in one function (compiled on CUDA: a few
    fused kernels whatever the batch's op choices; its input is always ``[B, 3, S, S]``, so one graph serves
    every batch of a size): flip, RandAugment, normalisation, random erasing.

    Args:
        x: the crops ``[B, 3, S, S]``, uint8 or float in 0..255.
        per: float32 ``[B, 6 + 8 * layers]`` (its integers are exact in float32): flip, erase box (top, left,
            h, w), erase flag, then per layer: op (-1 = none), arg, affine map (6).
        fill, mean, std: ``[1, 3, 1, 1]``; noise: N(0, 1) ``[B, 3, S, S]``, or None when no sample is erased.
        names: the RandAugment op names; layers: how many layers (0: none).
    """
    B, S = x.shape[0], x.shape[-1]
    x = (x.float() / 255).clamp(0, 1)
    x = torch.where(per[:, 0].view(-1, 1, 1, 1) > 0.5, x.flip(-1), x)
    if layers:
        ra = per[:, 6:].reshape(B, layers, 8)
        x = _randaugment_layers(x, ra[..., 0], ra[..., 1], ra[..., 2:].reshape(B, layers, 2, 3), fill, names)
    x = (x - mean) / std
    if noise is not None:
        r = torch.arange(S, device=x.device, dtype=per.dtype).view(1, S, 1)
        c = r.view(1, 1, S)
        t, lf, h, w, on = (per[:, 1 + i].view(-1, 1, 1) for i in range(5))
        inside = (r >= t) & (r < t + h) & (c >= lf) & (c < lf + w) & (on > 0.5)
        x = torch.where(inside.unsqueeze(1), noise, x)
    return x.contiguous()


def _padded_crops(imgs: torch.Tensor | list[torch.Tensor], boxes: torch.Tensor, size: int, pad: int
                  ) -> torch.Tensor:
    """``RandomCrop(size, padding=pad)`` per sample: uint8 ``[B, 3, size, size]`` windows ``boxes`` (CPU
    ``[B, 4]``: top, left in padded coordinates) of the zero-padded images. A list of images of different sizes
    is cut window by window (a copy each): padding them all to the batch's largest height and largest width
    first took gigabytes for a tall and a wide strip in one batch."""
    if not torch.is_tensor(imgs):
        out = torch.zeros(len(imgs), 3, size, size, dtype=torch.uint8, device=imgs[0].device)
        for k, im in enumerate(imgs):
            top, left = int(boxes[k, 0]) - pad, int(boxes[k, 1]) - pad  # the window in the image's coordinates
            y0, x0 = max(top, 0), max(left, 0)
            y1, x1 = min(top + size, im.shape[-2]), min(left + size, im.shape[-1])
            if y1 > y0 and x1 > x0:
                out[k, :, y0 - top : y1 - top, x0 - left : x1 - left] = im[:, y0:y1, x0:x1]
        return out
    x = _padded(imgs, list(range(len(boxes))), torch.uint8)
    x = F.pad(x, (pad,) * 4) if pad else x
    B, device = x.shape[0], x.device
    ar = torch.arange(size, device=device)
    b = to_device_async(boxes[:, :2], device)
    rows, cols = b[:, 0:1] + ar.view(1, size), b[:, 1:2] + ar.view(1, size)
    bidx = torch.arange(B, device=device).view(B, 1, 1)
    return x.permute(0, 2, 3, 1)[bidx, rows.view(B, size, 1), cols.view(B, 1, size)].permute(0, 3, 1, 2)


def _at_least(imgs: torch.Tensor | Sequence[torch.Tensor], size: int) -> torch.Tensor | list[torch.Tensor]:
    """Images with a side under ``size`` scaled up (bicubic, aspect kept) until both sides are ``size`` or more,
    as the CPU path's ``EnsureMinSize`` before its small-image crop; the others unchanged (uint8)."""
    def up(x: torch.Tensor) -> torch.Tensor:  # [n, 3, h, w]
        h, w = x.shape[-2:]
        scale = size / min(h, w)
        hw = (max(size, math.ceil(h * scale - 1e-6)), max(size, math.ceil(w * scale - 1e-6)))
        return F.interpolate(x.float(), size=hw, mode="bicubic", align_corners=False).round_().clamp_(0, 255).to(
            torch.uint8)

    if torch.is_tensor(imgs):
        return up(imgs) if min(imgs.shape[-2:]) < size else imgs
    return [up(im[None])[0] if min(im.shape[-2:]) < size else im for im in imgs]


_finetune_finish = _CompiledOnCuda(_finetune_finish_eager)


class _RandAugmentSpec:
    """timm's parse of a ``rand-...`` string: op names, layers, probability, magnitude (mean, std, max)."""

    def __init__(self, config: str, fill: tuple[int, int, int]) -> None:
        if not config.startswith("rand"):
            raise ValueError(f"auto_augment {config!r}: the tensor path implements RandAugment ('rand-...') only")
        ra = rand_augment_transform(config, {"img_mean": fill, "translate_const": 100})
        if ra.choice_weights is not None:
            raise ValueError(f"auto_augment {config!r}: weighted op choice ('tweights') is not supported")
        self.names = [op.name for op in ra.ops]
        unknown = sorted(set(self.names) - _SUPPORTED)
        if unknown:
            raise ValueError(f"auto_augment {config!r}: ops {unknown} have no tensor implementation")
        op = ra.ops[0]
        self.num_layers = ra.num_layers
        self.prob = float(op.prob)
        self.magnitude = float(op.magnitude)
        self.mstd = float(op.magnitude_std)
        self.mmax = float(op.magnitude_max or 10)
        self.hparams = dict(op.hparams)


# ------------------------------------------------------------------------------------------ fine-tuning
class FinetuneAugment:
    """The fine-tuning recipe for a batch on its device, per sample (see module docstring).

    Args:
        input_size: output side (square).
        scale, ratio: random-resized-crop ranges; for ``input_size <= 32`` a padded random crop
            instead (``crop_padding`` px of padding, default ``input_size // 8``, as the CPU path).
        hflip: flip probability.
        auto_augment: timm RandAugment string (``rand-m9-mstd0.5-inc1``) or None.
        re_prob: random-erasing probability ('pixel' mode: N(0, 1) noise in normalised units).
        mean, std: normalisation.
        seed: the run's seed.

    Raises:
        ValueError: an auto_augment policy or op without a tensor implementation, naming it.
    """

    STREAM = 23

    def __init__(
        self,
        input_size: int = 224,
        *,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        auto_augment: str | None = "rand-m9-mstd0.5-inc1",
        re_prob: float = 0.25,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        seed: int = 0,
        crop_padding: int | None = None,
    ) -> None:
        self.input_size = int(input_size)
        self.small = self.input_size <= 32
        self.pad = small_image_padding(self.input_size, crop_padding)  # as the CPU path
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.hflip = float(hflip)
        self.re_prob = float(re_prob)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        fill = tuple(min(255, round(255 * m)) for m in mean)
        self.fill = torch.tensor(fill, dtype=torch.float32).view(1, 3, 1, 1) / 255
        self.ra = _RandAugmentSpec(auto_augment, fill) if auto_augment else None  # type: ignore[arg-type]
        self.seed = int(seed)
        self._constants = _DeviceConstants()

    # --- parameters (CPU) -----------------------------------------------------------------------------
    def worker_crop(self) -> WorkerCrop | None:
        """The random-resized-crop box of ``params``, for the loader's workers (``EncodedImageFiles(crop=...)``);
        None for small images (their padded random crop needs the padding: the device cuts it)."""
        return None if self.small else WorkerCrop(self.seed, self.STREAM, self.scale, self.ratio)

    def _crop(self, u: torch.Tensor, hs: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
        if self.small:  # RandomCrop(size, padding=size // 8) on the padded image
            s, p2 = self.input_size, 2 * self.pad
            top = torch.floor(u[:, 0] * (hs + p2 - s + 1)).clamp(max=hs + p2 - s)
            left = torch.floor(u[:, 1] * (ws + p2 - s + 1)).clamp(max=ws + p2 - s)
            return torch.stack([top, left, torch.full_like(top, s), torch.full_like(top, s)], 1).long()
        return crop_boxes(hs, ws, u, self.scale, self.ratio)

    def ra_params(self, u: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per layer: (op index [B], applied bool [B], argument [B]) from 5 uniforms per layer."""
        assert self.ra is not None
        out = []
        n_ops = len(self.ra.names)
        for j in range(self.ra.num_layers):
            uj = u[:, 5 * j : 5 * j + 5]
            op = (uj[:, 0] * n_ops).long().clamp(max=n_ops - 1)
            applied = uj[:, 1] <= self.ra.prob if self.ra.prob < 1 else torch.ones_like(uj[:, 1], dtype=torch.bool)
            mag = torch.full_like(uj[:, 0], self.ra.magnitude)
            if math.isinf(self.ra.mstd):
                mag = uj[:, 2] * self.ra.magnitude
            elif self.ra.mstd > 0:
                mag = mag + self.ra.mstd * _normal(uj[:, 2], uj[:, 3])
            mag = mag.clamp(0, self.ra.mmax)
            sign = torch.where(uj[:, 4] > 0.5, -1.0, 1.0).to(torch.float64)
            # every op's argument for every sample, then each sample's own: no per-op masking on the host
            every = torch.stack([_level_arg(name, mag, sign, self.ra.hparams) for name in self.ra.names], 1)
            arg = every.gather(1, op.view(-1, 1)).squeeze(1)
            out.append((op, applied, arg))
        return out

    def params(self, index: torch.Tensor, epoch: int, heights: torch.Tensor, widths: torch.Tensor
               ) -> dict[str, Any]:
        """CPU parameters of each sample: ``box`` [B, 4], ``flip`` [B], ``ra`` (per layer: op, applied, arg),
        ``erase`` bool [B] and ``erase_box`` [B, 4] (top, left, h, w)."""
        n_ra = 5 * (self.ra.num_layers if self.ra else 0)
        u = per_sample_uniforms(self.seed, epoch, index, 22 + 1 + n_ra + 23, stream=self.STREAM)
        p: dict[str, Any] = {"box": self._crop(u[:, :22], heights, widths), "flip": u[:, 22] < self.hflip}
        p["ra"] = self.ra_params(u[:, 23 : 23 + n_ra]) if self.ra else []
        ue = u[:, 23 + n_ra :]
        p["erase"], p["erase_box"] = self._erase_boxes(ue)
        return p

    def _erase_boxes(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """timm RandomErasing (count 1, area 0.02..1/3, aspect 0.3..1/0.3, 10 attempts), vectorised;
        ``u`` [B, 23]: probability, 10 areas, 10 aspects, top, left."""
        S = self.input_size
        area = S * S * (0.02 + (1 / 3 - 0.02) * u[:, 1:11])
        lo, hi = math.log(0.3), math.log(1 / 0.3)
        ar = torch.exp(lo + (hi - lo) * u[:, 11:21])
        h = torch.round(torch.sqrt(area * ar))
        w = torch.round(torch.sqrt(area / ar))
        ok = (w < S) & (h < S)
        first = ok.to(torch.uint8).argmax(1, keepdim=True)
        h, w = h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1)
        top = torch.floor(u[:, 21] * (S - h + 1)).clamp(max=S - h)
        left = torch.floor(u[:, 22] * (S - w + 1)).clamp(max=S - w)
        erase = (u[:, 0] < self.re_prob) & ok.any(1)
        return erase, torch.stack([top, left, h, w], 1).long()

    def _packed(self, p: dict[str, Any], S: int) -> torch.Tensor:
        """The per-sample parameters as one float32 ``[B, 6 + 8 * layers]`` tensor (one pinned copy), in the
        layout :func:`_finetune_finish_eager` reads."""
        B = len(p["flip"])
        cols = [p["flip"].float().view(-1, 1), p["erase_box"].float(), p["erase"].float().view(-1, 1)]
        for op, applied, arg in p["ra"]:
            assert self.ra is not None
            mats = torch.eye(2, 3, dtype=torch.float64).expand(B, 2, 3).clone()
            for k, name in enumerate(self.ra.names):
                if name not in _GEOMETRIC:
                    continue
                sel = (op == k) & applied
                if bool(sel.any()):
                    mats[sel] = _geometric_mats(name, arg[sel], S, S)
            cols += [torch.where(applied, op, -1).float().view(-1, 1), arg.float().view(-1, 1),
                     mats.view(B, 6).float()]
        return torch.cat(cols, 1)

    # --- device work ----------------------------------------------------------------------------------
    def __call__(self, images: torch.Tensor | Sequence[torch.Tensor], index: torch.Tensor, epoch: int,
                 cropped: torch.Tensor | None = None) -> torch.Tensor:
        """Augmented, normalised float ``[B, 3, S, S]`` from uint8 ``[B, 3, H, W]`` or a list of ``[3, H_i, W_i]``
        on the device; ``index`` int64 [B] (CPU) and ``epoch`` select the random parameters; ``cropped`` bool
        [B] (CPU): the image is already the sample's crop box (``worker_crop()``), taken whole."""
        S = self.input_size
        if self.small:  # images smaller than the crop are scaled up first, as the CPU path
            images = _at_least(images if torch.is_tensor(images) else list(images), S)
        device, hs, ws = _sizes(images)
        B = len(hs)
        p = self.params(index, epoch, hs, ws)
        if self.small:
            if cropped is not None and bool(cropped.any()):
                raise ValueError("FinetuneAugment: small images cannot come pre-cropped (worker_crop() is None)")
            x = _padded_crops(images, p["box"], S, self.pad)
        else:
            x = resized_crops(images, _whole_if_cropped(p["box"], cropped, hs, ws), [(S, S)])[0]
        noise = None
        if self.re_prob > 0 and bool(p["erase"].any()):
            g = torch.Generator(device=device)
            g.manual_seed(derive_seed(self.seed, epoch, int(index.view(-1)[0])))
            noise = torch.randn((B, 3, S, S), generator=g, device=device)
        c = self._constants
        names = tuple(self.ra.names) if self.ra else ()
        return _finetune_finish(x, to_device_async(self._packed(p, S), device), c.get("fill", self.fill, device),
                                c.get("mean", self.mean, device), c.get("std", self.std, device), noise, names,
                                self.ra.num_layers if self.ra else 0)
