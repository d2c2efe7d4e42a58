"""Inference for segmentation: whole-image or sliding-window (mmseg's ``slide_inference``), flip and
multi-scale test-time augmentation, coloured overlays, and a trained segmenter's overlays / label maps for a
list of images (:func:`predict`, :func:`write_overlays`).

Sliding windows: crops of ``crop`` pixels every ``stride`` pixels (ADE20K: 512 / 341), the last window
of a row/column moved back to end at the border; logits of overlapping windows are averaged. A window
larger than the image covers it whole, so the result is then exactly the whole-image one.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from beit.data.datasets import decode_image, decode_image_matching, output_stems
from beit.engine import distributed as D
from beit.engine.precision import autocast_for

from .config import SegmentConfig
from .data import SegEvalTransform, SegmentationDataset
from .model import BeitSegmenter

__all__ = ["colorize", "inference", "make_palette", "overlay", "predict", "save_overlay",
           "slide_logits", "whole_logits", "write_overlays"]

logger = logging.getLogger(__name__)


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def whole_logits(model: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """One forward of the whole ``[B, 3, H, W]`` image -> logits ``[B, C, H, W]``."""
    return model(image)


def slide_logits(model: nn.Module, image: torch.Tensor, num_classes: int, crop: int | Sequence[int] = 512,
                 stride: int | Sequence[int] = 341, batch_windows: int = 8) -> torch.Tensor:
    """Average of the logits of overlapping windows -> ``[B, C, H, W]``; windows run ``batch_windows`` at a time."""
    B, _, H, W = image.shape
    (ch, cw), (sh, sw) = _pair(crop), _pair(stride)
    rows = max(H - ch + sh - 1, 0) // sh + 1
    cols = max(W - cw + sw - 1, 0) // sw + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * sh + ch, H), min(c * sw + cw, W)
            boxes.append((max(y2 - ch, 0), y2, max(x2 - cw, 0), x2))
    logits = image.new_zeros((B, num_classes, H, W), dtype=torch.float32)
    count = image.new_zeros((1, 1, H, W), dtype=torch.float32)
    # windows have one size except when the image is smaller than the crop (then there is one window)
    for i in range(0, len(boxes), batch_windows):
        chunk = boxes[i:i + batch_windows]
        crops = torch.cat([image[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in chunk])
        out = model(crops).float().view(len(chunk), B, num_classes, *crops.shape[-2:])
        for (y1, y2, x1, x2), o in zip(chunk, out):
            logits[:, :, y1:y2, x1:x2] += o
            count[:, :, y1:y2, x1:x2] += 1
    return logits / count


@torch.no_grad()
def inference(model: nn.Module, image: torch.Tensor, num_classes: int, *, mode: str = "slide",
              crop: int | Sequence[int] = 512, stride: int | Sequence[int] = 341, flip: bool = False,
              scales: Sequence[float] = (1.0,), out_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Class probabilities ``[B, C, h, w]`` for a normalized image batch ``[B, 3, H, W]``.

    ``mode`` is ``"whole"`` or ``"slide"``; ``scales`` resizes the input (bilinear) before inference and
    ``flip`` adds the horizontally flipped image; the softmax probabilities of all views are averaged
    (mmseg's ``aug_test``). ``out_size`` (default: the input size) is the size of the returned map, e.g.
    the original image size when the input was resized for testing.
    """
    if mode not in ("whole", "slide"):
        raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
    H, W = image.shape[-2:]
    out_size = tuple(out_size) if out_size is not None else (H, W)
    probs = None
    n = 0
    for s in scales:
        x = image
        if s != 1.0:
            x = F.interpolate(image, size=(max(1, int(H * s + 0.5)), max(1, int(W * s + 0.5))), mode="bilinear",
                              align_corners=False)
        for flipped in ((False, True) if flip else (False,)):
            xi = x.flip(-1) if flipped else x
            if mode == "whole":
                lg = whole_logits(model, xi).float()
            else:
                lg = slide_logits(model, xi, num_classes, crop, stride)
            if flipped:
                lg = lg.flip(-1)
            if lg.shape[-2:] != out_size:
                lg = F.interpolate(lg, size=out_size, mode="bilinear", align_corners=False)
            p = lg.softmax(dim=1)
            probs = p if probs is None else probs + p
            n += 1
    return probs / n


# --------------------------------------------------------------------------------------- drawing
def make_palette(num_classes: int) -> np.ndarray:
    """``[num_classes, 3]`` uint8 colours, the PASCAL VOC bit-interleaving scheme (distinct, stable)."""
    pal = np.zeros((num_classes, 3), dtype=np.uint8)
    for i in range(num_classes):
        c, r, g, b = i + 1, 0, 0, 0  # +1: class 0 gets a colour, not black
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


def colorize(labels: np.ndarray | torch.Tensor, palette: np.ndarray, ignore_index: int | None = None) -> np.ndarray:
    """Label map ``[H, W]`` -> RGB ``[H, W, 3]`` uint8; ignored / out-of-range pixels are black."""
    lab = labels.cpu().numpy() if torch.is_tensor(labels) else np.asarray(labels)
    lab = lab.astype(np.int64)
    valid = (lab >= 0) & (lab < len(palette))
    if ignore_index is not None:
        valid &= lab != ignore_index
    out = np.zeros((*lab.shape, 3), dtype=np.uint8)
    out[valid] = palette[lab[valid]]
    return out


def overlay(image: np.ndarray | Image.Image, labels: np.ndarray | torch.Tensor, palette: np.ndarray,
            alpha: float = 0.5, ignore_index: int | None = None) -> np.ndarray:
    """Blend the coloured label map over an RGB image (``alpha`` = weight of the colours)."""
    img = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image).astype(np.float32)
    col = colorize(labels, palette, ignore_index).astype(np.float32)
    if img.shape[:2] != col.shape[:2]:
        raise ValueError(f"image {img.shape[:2]} and label map {col.shape[:2]} differ in size")
    return np.clip(img * (1 - alpha) + col * alpha, 0, 255).astype(np.uint8)


def save_overlay(path: str | os.PathLike, image: np.ndarray | Image.Image, labels: np.ndarray | torch.Tensor,
                 palette: np.ndarray, alpha: float = 0.5, gt: np.ndarray | torch.Tensor | None = None,
                 ignore_index: int | None = None) -> Path:
    """Write a PNG: the overlay of ``labels`` (and, if ``gt`` is given, the ground-truth overlay beside it)."""
    panels = [overlay(image, labels, palette, alpha, ignore_index)]
    if gt is not None:
        panels.append(overlay(image, gt, palette, alpha, ignore_index))
    arr = np.concatenate(panels, axis=1) if len(panels) > 1 else panels[0]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


# --------------------------------------------------------------------------------------- a trained segmenter
@torch.no_grad()
def write_overlays(model: nn.Module, val_ds: SegmentationDataset, cfg: SegmentConfig, out_dir: str | Path,
                   n: int, prefix: str = "overlay") -> list[Path]:
    """Overlays (prediction | ground truth) of the first ``n`` val images as PNGs."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    t, palette, paths = cfg.test, make_palette(val_ds.num_classes), []
    for i in range(min(n, len(val_ds))):
        item = val_ds[i]
        if item is None:  # skipped bad sample
            continue
        crop, stride = t.window(cfg.data.crop_size)
        probs = inference(model, item["image"][None].to(device), val_ds.num_classes, mode=t.mode,
                          crop=crop, stride=stride, out_size=tuple(item["mask"].shape))
        pred = probs.argmax(1)[0].cpu()
        img = decode_image_matching(item["path"], (item["mask"].shape[-1], item["mask"].shape[-2]))
        paths.append(save_overlay(Path(out_dir) / f"{prefix}_{i:03d}.png", img, pred, palette, gt=item["mask"],
                                  ignore_index=val_ds.ignore_index))
    model.train(was_training)
    return paths


@torch.no_grad()
def predict(model: BeitSegmenter, cfg: SegmentConfig, inputs: list[str | Path], out_dir: str | Path,
            alpha: float = 0.5) -> list[Path]:
    """For each image: ``<stem>_overlay.png`` (colours over the image) and ``<stem>_labels.png`` (class ids).

    ``<stem>`` is the file name without its extension, whatever the extension; a stem that repeats in other
    folders becomes ``<dir>__<stem>`` (:func:`beit.data.datasets.output_stems`). A file that cannot be read is
    skipped with a warning; ``index.json`` in ``out_dir`` has one entry per input, in input order: its outputs, or
    its ``error``, and ``num_skipped``. Returns the overlays written.

    Raises:
        ValueError: two inputs would get the same output name (``a.jpg`` and ``a.png`` in one folder, or a
            file given twice; checked before anything is written), or none of the images could be read.
    """
    stems = output_stems(inputs, ("_overlay.png", "_labels.png"), out_dir=out_dir, manifest="index.json")
    device = D.device()
    model.to(device).eval()
    tf = SegEvalTransform(cfg.data.test_scale, cfg.data.mean, cfg.data.std)
    palette, t, out = make_palette(model.num_classes), cfg.test, Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written, index = [], []
    for path, stem in zip(inputs, stems):
        try:
            img = decode_image(path)
        except Exception as err:  # noqa: BLE001 - any decoder error means unreadable
            logger.warning("skipping unreadable image %s (%s: %s)", path, type(err).__name__, err)
            index.append({"input": str(path), "error": f"unreadable: {type(err).__name__}: {err}"})
            continue
        x = tf.image(img)[None].to(device)
        with autocast_for(device, cfg.train.precision):
            crop, stride = t.window(cfg.data.crop_size)
            probs = inference(model, x, model.num_classes, mode=t.mode, crop=crop, stride=stride, flip=t.flip,
                              scales=t.scales, out_size=(img.height, img.width))
        pred = probs.argmax(1)[0].cpu().numpy()
        written.append(save_overlay(out / f"{stem}_overlay.png", img, pred, palette, alpha))
        Image.fromarray(pred.astype("uint8" if model.num_classes <= 256 else "int32")).save(out / f"{stem}_labels.png")
        index.append({"input": str(path), "overlay": str(written[-1]), "labels": str(out / f"{stem}_labels.png")})
    skipped = sum("error" in e for e in index)
    (out / "index.json").write_text(json.dumps({"files": index, "num_skipped": skipped}, indent=1))
    if skipped:
        logger.warning("skipped %d of %d images (see %s)", skipped, len(index), out / "index.json")
    if not written:
        raise ValueError(f"none of the {len(index)} images could be read (see {out / 'index.json'})")
    return written
