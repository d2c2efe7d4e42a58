"""Semantic-segmentation data: ADE20K / image-mask folders / "<img> <mask>" lists, and mmseg's ADE20K pipeline.

Layouts:

* ADE20K: ``images/{training,validation}/*.jpg`` + ``annotations/{training,validation}/*.png``, 150 classes,
  ``reduce_zero_label`` (label 0 "other" -> ignore, k -> k - 1).
* a generic pair of folders (image and mask with the same relative path, suffixes configurable) with a
  class list (names, or a file with one name per line);
* a list file of ``<image> <mask>`` lines relative to a root (CamVid's ``train.txt``; its void is 11).

Training augmentation is mmseg's standard ADE20K pipeline: resize to a random ratio (0.5-2.0) of a base
scale keeping the aspect ratio, random crop whose largest class covers < ``cat_max_ratio`` of the labelled
pixels (up to 10 tries), horizontal flip, photometric distortion, normalize, pad to the crop size with the
ignore index. Every random number is drawn inside ``beit.data.seeding.seeded(seed, epoch, index)``, so a
sample is a pure function of (seed, epoch, index) whatever the number of workers.

Bad input (a mask whose size differs from its image, label values outside the classes that are not the
ignore index, an image without a mask or the reverse, an unreadable file) raises :class:`BadSampleError`
naming the file with ``on_bad_sample="error"``; with ``"skip"`` the sample is dropped and counted.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from beit._text import first_few
from beit.data.datasets import (
    NoReadableImagesError,
    RepeatedDataset,
    SkipCounter,
    decode_image_matching,
    first_readable,
    image_size,
    list_images,
    open_image,
)
from beit.data.seeding import seeded
from beit.engine import distributed as D
from beit.engine.config import ConfigError
from beit.engine.rundir import CLASS_SOURCES, class_list_key, class_list_source

from .config import SegDataConfig, SegmentConfig

__all__ = [
    "ADE20K_CLASSES",
    "CAMVID_CLASSES",
    "BadSampleError",
    "SegEvalTransform",
    "SegTrainTransform",
    "SegmentationDataset",
    "build_datasets",
    "class_names",
    "collate_eval",
    "folder_pairs",
    "list_pairs",
    "load_class_names",
    "photometric_distortion",
    "read_mask",
]

logger = logging.getLogger(__name__)

ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
)  # fmt: skip

CAMVID_CLASSES: tuple[str, ...] = (
    "Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian",
    "Bicyclist",
)  # fmt: skip  (SegNet's CamVid: 11 classes, 11 = void)

Pair = tuple[str, str]


class BadSampleError(ValueError):
    """An image/mask pair that cannot be used; the message names the file."""


# --------------------------------------------------------------------------------------- listing
def folder_pairs(img_dir: str | os.PathLike, ann_dir: str | os.PathLike, img_suffix: str = ".jpg",
                 seg_suffix: str = ".png") -> tuple[list[Pair], list[str]]:
    """(image, mask) pairs matched by relative path, and a list of problems (unpaired files).

    ``img_suffix`` may be "" to accept any image extension.
    """
    img_dir, ann_dir = Path(img_dir), Path(ann_dir)
    for d, what in ((img_dir, "image"), (ann_dir, "mask")):
        if not d.is_dir():
            raise FileNotFoundError(f"{what} folder does not exist: {str(d)!r}")
    exts = (img_suffix,) if img_suffix else None
    images = list_images(img_dir, extensions=exts) if exts else list_images(img_dir)
    masks = {Path(p).relative_to(ann_dir).as_posix() for p in list_images(ann_dir, extensions=(seg_suffix,))}
    pairs, problems, used = [], [], set()
    for img in images:
        rel = Path(img).relative_to(img_dir)
        stem = rel.as_posix()[: -len(rel.suffix)] if rel.suffix else rel.as_posix()
        mask_rel = stem + seg_suffix
        if mask_rel in masks:
            pairs.append((img, str(ann_dir / mask_rel)))
            used.add(mask_rel)
        else:
            problems.append(f"{img}: no mask {str(ann_dir / mask_rel)!r}")
    for m in sorted(masks - used):
        problems.append(f"{ann_dir / m}: mask without an image in {str(img_dir)!r}")
    return pairs, problems


def list_pairs(list_file: str | os.PathLike, root: str | os.PathLike | None = None) -> tuple[list[Pair], list[str]]:
    """Pairs from ``<image> <mask>`` lines (paths relative to ``root``, default the list's folder)."""
    list_file = Path(list_file)
    if not list_file.is_file():
        raise FileNotFoundError(f"pair list not found: {str(list_file)!r}")
    base = Path(root) if root is not None else list_file.parent
    pairs, problems = [], []
    for n, line in enumerate(list_file.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            problems.append(f"{list_file}:{n}: expected '<image> <mask>', got {line!r}")
            continue
        img, mask = (str(base / p) for p in parts)
        missing = [p for p in (img, mask) if not os.path.isfile(p)]
        if missing:
            problems.append(f"{list_file}:{n}: file not found: {', '.join(repr(p) for p in missing)}")
            continue
        pairs.append((img, mask))
    return pairs, problems


def load_class_names(classes: str | os.PathLike | Sequence[str] | None, num_classes: int = 0) -> list[str]:
    """Class names from a list or a text file (UTF-8, one name a line: line k names class k - 1); ``class_<i>``
    names when none are given. Blank lines at the end of the file and spaces around a name are ignored.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the path is a folder, or not a text file (not UTF-8: an image, say); the file names no class;
            a blank line comes before the last name (it would shift every later name to the wrong label; the
            message gives its line number); the names are not ``num_classes``; nothing given and no
            ``num_classes``. Each message names the file.
    """
    if classes is None or (isinstance(classes, (list, tuple)) and not classes) or classes == "":
        if num_classes <= 0:
            raise ValueError("give the class names (a list or a file) or num_classes")
        return [f"class_{i}" for i in range(num_classes)]
    if isinstance(classes, (str, os.PathLike)):
        names = _read_class_file(Path(classes))
        source = f"class list file {str(classes)!r}"
    else:
        names, source = [str(c) for c in classes], "the class list"
    if num_classes and len(names) != num_classes:
        raise ValueError(f"{source} has {len(names)} class names but num_classes={num_classes}")
    return names


def _read_class_file(path: Path) -> list[str]:
    """The names in a class list file, one a line (see :func:`load_class_names`, which raises what it raises)."""
    what = f"class list file {str(path)!r}"
    fix = "give a text file with one class name a line (line k names class k - 1)"
    if path.is_dir():
        raise ValueError(f"{what} is a folder, not a file: {fix}")
    if not path.exists():
        raise FileNotFoundError(f"{what} not found")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} is not a text file (byte {e.start} is not UTF-8 text): {fix}") from None
    # lines end at \n (\r\n too) only: str.splitlines would also cut a name at U+2028, \x1c, ... into two classes
    lines = [ln.strip() for ln in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    while lines and not lines[-1]:  # blank lines at the end: nothing follows them to shift
        lines.pop()
    if not lines:
        raise ValueError(f"{what} is empty (it names no class): {fix}")
    blank = [n for n, ln in enumerate(lines, 1) if not ln]
    if blank:
        at = first_few(blank, 5)
        lines_are = f"line {at} is blank but names follow it" if len(blank) == 1 else \
            f"lines {at} are blank but names follow them"
        raise ValueError(f"{what}: {lines_are}: every line names one class (line k is class k - 1), so a blank "
                         "line would shift the later names to the wrong labels; remove it, or write the name of the "
                         "class it stands for")
    return lines


# --------------------------------------------------------------------------------------- decoding
def read_mask(path: str | os.PathLike) -> np.ndarray:
    """A label map as int64 ``[H, W]``: palette / gray / 16-bit PNGs; RGB only if the 3 channels agree."""
    with open(path, "rb") as f:
        m = open_image(f)  # its "cannot identify" error without the stream's repr (the caller names the file)
        m.load()
    arr = np.asarray(m)
    if arr.ndim == 3:
        if arr.shape[2] >= 3 and (arr[..., 0] == arr[..., 1]).all() and (arr[..., 0] == arr[..., 2]).all():
            arr = arr[..., 0]
        else:
            raise BadSampleError(f"{path}: mask is a colour image ({m.mode}); segmentation masks must hold one "
                                 "class index per pixel (mode L, P or I;16)")
    return arr.astype(np.int64)


# --------------------------------------------------------------------------------------- transforms
def _rescale_size(w: int, h: int, scale: Sequence[int]) -> tuple[int, int]:
    """mmcv ``imrescale``: the largest size keeping the aspect ratio with long <= max(scale), short <= min(scale)."""
    f = min(max(scale) / max(w, h), min(scale) / min(w, h))
    return max(1, int(w * f + 0.5)), max(1, int(h * f + 0.5))


def _resize_pair(img: Image.Image, mask: np.ndarray | None, size: tuple[int, int]
                 ) -> tuple[Image.Image, np.ndarray | None]:
    if img.size == size:
        return img, mask
    img = img.resize(size, Image.BILINEAR)
    if mask is not None:
        mask = np.asarray(Image.fromarray(mask.astype(np.int32)).resize(size, Image.NEAREST)).astype(np.int64)
    return img, mask


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """[3, H, W] RGB in [0, 255] -> H in degrees [0, 360), S in [0, 1], V in [0, 255]."""
    r, g, b = x.unbind(0)
    maxc, minc = x.max(0).values, x.min(0).values
    d = maxc - minc
    s = torch.where(maxc > 0, d / maxc.clamp(min=1e-6), torch.zeros_like(maxc))
    dd = d.clamp(min=1e-6)
    h = torch.where(maxc == r, torch.remainder((g - b) / dd, 6.0),
                    torch.where(maxc == g, (b - r) / dd + 2.0, (r - g) / dd + 4.0))
    h = torch.where(d > 0, h * 60.0, torch.zeros_like(h))
    return torch.stack([h, s, maxc])


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    h, s, v = hsv.unbind(0)
    out = []
    for n in (5.0, 3.0, 1.0):  # r, g, b
        k = torch.remainder(n + h / 60.0, 6.0)
        out.append(v - v * s * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0))
    return torch.stack(out)


def _randint(low: int, high: int) -> int:
    """Uniform integer in [low, high] from the (per-sample seeded) global torch RNG."""
    return int(torch.randint(low, high + 1, ()).item())


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()).item())


def photometric_distortion(img: torch.Tensor, brightness_delta: int = 32, contrast: tuple[float, float] = (0.5, 1.5),
                           saturation: tuple[float, float] = (0.5, 1.5), hue_delta: int = 18) -> torch.Tensor:
    """mmseg's ``PhotoMetricDistortion`` on a float [3, H, W] image in [0, 255]; each step with prob. 0.5.

    brightness -> contrast (first or last, at random) -> saturation (HSV S scale) -> hue (shift of up to
    ``hue_delta`` OpenCV units = 2 degrees each).
    """
    if _randint(0, 1):
        img = (img + _uniform(-brightness_delta, brightness_delta)).clamp(0, 255)
    contrast_first = _randint(0, 1) == 1
    if contrast_first and _randint(0, 1):
        img = (img * _uniform(*contrast)).clamp(0, 255)
    sat = _uniform(*saturation) if _randint(0, 1) else None
    hue = _randint(-hue_delta, hue_delta) * 2.0 if _randint(0, 1) else None
    if sat is not None or hue is not None:
        hsv = _rgb_to_hsv(img)
        if sat is not None:
            hsv[1] = (hsv[1] * sat).clamp(0, 1)
        if hue is not None:
            hsv[0] = torch.remainder(hsv[0] + hue, 360.0)
        img = _hsv_to_rgb(hsv).clamp(0, 255)
    if not contrast_first and _randint(0, 1):
        img = (img * _uniform(*contrast)).clamp(0, 255)
    return img


def _to_chw(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img, dtype=np.float32)).permute(2, 0, 1).contiguous()


class SegTrainTransform:
    """mmseg's ADE20K training pipeline: (PIL image, label map) -> (normalized [3, c, c], long [c, c]).

    Random numbers come from the global torch RNG, which :class:`SegmentationDataset` seeds per sample.
    """

    def __init__(self, crop_size: int | Sequence[int] = 512, img_scale: Sequence[int] = (2048, 512),
                 ratio_range: Sequence[float] = (0.5, 2.0), cat_max_ratio: float = 0.75, flip_prob: float = 0.5,
                 photometric: bool = True, mean: Sequence[float] = (123.675, 116.28, 103.53),
                 std: Sequence[float] = (58.395, 57.12, 57.375), ignore_index: int = 255) -> None:
        self.crop = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
        self.img_scale, self.ratio_range = tuple(img_scale), tuple(ratio_range)
        self.cat_max_ratio, self.flip_prob, self.photometric = cat_max_ratio, flip_prob, photometric
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.ignore_index = ignore_index

    def _crop_box(self, h: int, w: int) -> tuple[int, int]:
        ch, cw = self.crop
        return _randint(0, max(h - ch, 0)), _randint(0, max(w - cw, 0))

    def __call__(self, img: Image.Image, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        r = _uniform(*self.ratio_range)
        scale = (int(self.img_scale[0] * r), int(self.img_scale[1] * r))
        img, mask = _resize_pair(img, mask, _rescale_size(*img.size, scale))
        H, W = mask.shape
        ch, cw = self.crop
        y0, x0 = self._crop_box(H, W)
        if self.cat_max_ratio < 1.0:  # avoid crops dominated by one class (e.g. all sky)
            for _ in range(10):
                sub = mask[y0:y0 + ch, x0:x0 + cw]
                cnt = np.bincount(sub[sub != self.ignore_index].ravel())
                cnt = cnt[cnt > 0]
                if len(cnt) > 1 and cnt.max() / cnt.sum() < self.cat_max_ratio:
                    break
                y0, x0 = self._crop_box(H, W)
        x = _to_chw(img)[:, y0:y0 + ch, x0:x0 + cw]
        m = torch.from_numpy(np.ascontiguousarray(mask[y0:y0 + ch, x0:x0 + cw]))
        if float(torch.rand(()).item()) < self.flip_prob:
            x, m = x.flip(-1), m.flip(-1)
        if self.photometric:
            x = photometric_distortion(x)
        x = (x - self.mean) / self.std
        ph, pw = ch - x.shape[1], cw - x.shape[2]
        if ph > 0 or pw > 0:  # bottom/right, image with 0 (the mean), labels with the ignore index
            x = torch.nn.functional.pad(x, (0, pw, 0, ph), value=0.0)
            m = torch.nn.functional.pad(m, (0, pw, 0, ph), value=self.ignore_index)
        return x.contiguous(), m.long().contiguous()


class SegEvalTransform:
    """Test pipeline: resize keeping the ratio to ``scale`` (None = as is), normalize; the label stays at full size."""

    def __init__(self, scale: Sequence[int] | None = (2048, 512), mean: Sequence[float] = (123.675, 116.28, 103.53),
                 std: Sequence[float] = (58.395, 57.12, 57.375)) -> None:
        self.scale = tuple(scale) if scale else None
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def image(self, img: Image.Image) -> torch.Tensor:
        if self.scale is not None:
            img, _ = _resize_pair(img, None, _rescale_size(*img.size, self.scale))
        return (_to_chw(img) - self.mean) / self.std

    def __call__(self, img: Image.Image, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return self.image(img), torch.from_numpy(mask).long()


# --------------------------------------------------------------------------------------- dataset
class SegmentationDataset(Dataset):
    """Image / label-map pairs with per-sample seeded augmentation and checked labels.

    ``__getitem__`` returns ``(image, mask)`` for training, and a dict ``{"image", "mask", "path"}`` when
    ``train=False`` (eval images keep their own size: use batch size 1 or :func:`collate_eval`; a bad pair
    gives ``None`` there with ``on_bad_sample="skip"``, so it is left out of the metrics, not repeated).

    Args:
        pairs: (image path, mask path) pairs.
        num_classes: labels must be in ``[0, num_classes)`` or equal ``ignore_index`` (after reduction).
        transform: a :class:`SegTrainTransform` / :class:`SegEvalTransform` (``(PIL, labels) -> tensors``).
        reduce_zero_label: ADE20K's convention: 0 ("other") -> ignore, k -> k - 1 (255 stays ignored).
        classes_source: where the class list came from, for the error on a label value outside the classes
            (:func:`beit.engine.rundir.class_list_source`, e.g. ``data.classes_file '/d/classes.txt'``); "" = not
            said.
        on_bad_sample: ``"error"`` raises :class:`BadSampleError` naming the file; ``"skip"`` drops the
            sample (the next good one is returned) and counts it in ``num_skipped`` / ``bad_samples``.
        problems: listing problems (unpaired files) found by :func:`folder_pairs` / :func:`list_pairs`;
            raised or counted according to ``on_bad_sample``.

    Under torchrun every rank lists (and :meth:`verify` checks) the same pairs: the warnings naming the bad ones
    found so are rank 0's; a bad pair a rank meets loading its own share of the samples, that rank names.
    """

    def __init__(self, pairs: Sequence[Pair], num_classes: int, *, transform: Any, train: bool = True,
                 ignore_index: int = 255, reduce_zero_label: bool = False, on_bad_sample: str = "error",
                 class_names: Sequence[str] | None = None, seed: int = 0, problems: Sequence[str] = (),
                 classes_source: str = "") -> None:
        if on_bad_sample not in ("error", "skip"):
            raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
        self.pairs = [(str(a), str(b)) for a, b in pairs]
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.transform, self.train = transform, train
        self.reduce_zero_label, self.on_bad_sample = reduce_zero_label, on_bad_sample
        self.class_names = list(class_names) if class_names is not None else [f"class_{i}" for i in range(num_classes)]
        self.classes_source = classes_source
        self.seed, self.epoch = seed, 0
        self.bad_samples: list[tuple[str, str]] = []  # (path, reason)
        self._skips = SkipCounter()  # replaced samples, summed over DataLoader workers
        self._reset_bad()
        for p in problems:
            self._bad(p.split(":")[0], p, warn=D.is_main())  # every rank lists the same pairs: said once
        if not self.pairs:
            raise BadSampleError("no usable image/mask pairs" + (f" ({len(self.bad_samples)} skipped)"
                                                                  if self.bad_samples else ""))

    @property
    def num_skipped(self) -> int:
        return len(self.bad_samples)

    def skipped_count(self, epoch: int | None = None) -> int:
        """Bad pairs met while loading (a training sample replaced, an eval sample dropped), one per request,
        summed over this process and its DataLoader workers (the engine logs it as ``skipped_files``); those of
        ``epoch`` only when given."""
        return self._skips.total(epoch)

    def _bad(self, path: str, reason: str, warn: bool = True) -> None:
        """A bad pair: raise (``on_bad_sample="error"``), or remember it and warn once (``warn=False``: remember it
        without the warning, which another rank gives).

        Raises:
            BadSampleError: with ``on_bad_sample="error"``: ``reason`` (which names the file) and the config key
                that skips such pairs instead.
        """
        if self.on_bad_sample == "error":
            raise BadSampleError(f"{reason} (set data.on_bad_sample=skip to leave bad samples out and count them)")
        if (path, reason) not in self.bad_samples:
            self.bad_samples.append((path, reason))
            if warn:
                logger.warning("skipping bad sample: %s", reason)

    def _reset_bad(self) -> None:
        """Forget the pairs found bad while loading (``self.pairs`` was just set)."""
        self._bad_reasons: dict[int, str] = {}  # pair index -> why it is bad, per process
        self._bad_mask = torch.zeros(len(self.pairs), dtype=torch.bool).share_memory_()  # seen by every worker

    def _mark_bad(self, index: int, err: BaseException) -> None:
        """Pair ``index`` failed to load: raise (``on_bad_sample="error"``), or remember it (warned about once,
        never decoded again by this process or its DataLoader workers).

        Raises:
            BadSampleError: with ``on_bad_sample="error"``, naming the file.
            Exception: ``err`` itself when it is not a :class:`BadSampleError` (a bug, not a bad file).
        """
        if not isinstance(err, BadSampleError):
            raise err
        self._bad(self.pairs[index][0], str(err))  # raises with on_bad_sample="error"
        self._bad_mask[index] = True
        self._bad_reasons.setdefault(index, str(err))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple[Image.Image, np.ndarray]:
        """Decode and check one pair: (RGB image, label map in training label space); raises BadSampleError."""
        img_path, mask_path = self.pairs[index]
        try:
            raw = read_mask(mask_path)
        except BadSampleError:
            raise
        except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, zlib.error... on broken files
            raise BadSampleError(f"{mask_path}: cannot read mask ({type(e).__name__}: {e})") from None
        try:  # upright by EXIF, unless the mask was drawn on the stored pixels
            img = decode_image_matching(img_path, (raw.shape[1], raw.shape[0]))
        except Exception as e:  # noqa: BLE001 - as above
            raise BadSampleError(f"{img_path}: cannot read image ({type(e).__name__}: {e})") from None
        if raw.shape != (img.height, img.width):
            raise BadSampleError(f"{mask_path}: mask is {raw.shape[1]}x{raw.shape[0]} but its image {img_path} "
                                 f"is {img.width}x{img.height}")
        return img, self.check_labels(raw, mask_path)

    def check_labels(self, raw: np.ndarray, mask_path: str) -> np.ndarray:
        """The label map ``raw`` of ``mask_path`` in training label space, checked against the classes.

        Raises:
            BadSampleError: a label value (after ``reduce_zero_label``) outside ``[0, num_classes)`` that is not
                the ignore index; the message names the mask file, the values as stored in it, where the class
                list came from (e.g. the classes file) with its count and what to change.
        """
        mask = self.convert_labels(raw)
        bad = (mask != self.ignore_index) & ((mask < 0) | (mask >= self.num_classes))
        if not bad.any():
            return mask
        vals = np.unique(raw[bad])
        shown = f"[{first_few(vals.tolist(), 5)}]"
        source = self.classes_source or "the class list"
        if len(vals) == 1:  # the ignore index is compared after reduce_zero_label
            ignore = f"set data.ignore_index={int(np.unique(mask[bad])[0])} if {int(vals[0])} marks unlabelled pixels"
        else:
            ignore = "set data.ignore_index to the value that marks unlabelled pixels, if one of them does"
        raise BadSampleError(
            f"{mask_path}: label values {shown} are outside the {self.num_classes} classes of {source} and are not "
            f"the ignore index {self.ignore_index} (reduce_zero_label={self.reduce_zero_label}): extend that list to "
            f"name every label value of the masks (in label order), use the list made for these masks, or {ignore}")

    def convert_labels(self, raw: np.ndarray) -> np.ndarray:
        if not self.reduce_zero_label:
            return raw
        out = raw - 1
        out[(raw == 0) | (raw == 255)] = self.ignore_index
        return out

    def verify(self) -> int:
        """Check every pair now (decodes all masks); with ``skip`` drop the bad ones. Returns how many were bad.

        Call it in the main process before training so that DataLoader workers never meet a bad file and
        ``num_skipped`` is complete (workers keep their own counters). Under torchrun every rank checks every pair:
        the bad ones are named by rank 0 alone.
        """
        good, n_bad, warn = [], 0, D.is_main()
        for i in range(len(self.pairs)):
            try:
                img_path, mask_path = self.pairs[i]
                size = image_size(img_path)
                raw = read_mask(mask_path)
                if raw.shape == (size[0], size[1]) and image_size(img_path, exif=False) == (size[1], size[0]):
                    size = (size[1], size[0])  # mask drawn on the stored pixels of an EXIF-rotated photo
                if raw.shape != (size[1], size[0]):
                    raise BadSampleError(f"{mask_path}: mask is {raw.shape[1]}x{raw.shape[0]} but its image "
                                         f"{img_path} is {size[0]}x{size[1]}")
                self.check_labels(raw, mask_path)
                good.append(self.pairs[i])
            except Exception as e:  # noqa: BLE001 - a broken file of any kind is a bad pair
                n_bad += 1
                self._bad(self.pairs[i][0], str(e) if isinstance(e, BadSampleError) else f"{self.pairs[i][0]}: {e}",
                          warn=warn)
        if not good:
            raise BadSampleError(f"no usable image/mask pairs ({n_bad} bad)")
        self.pairs = good
        self._reset_bad()
        return n_bad

    def _load_good(self, index: int) -> tuple[int, Image.Image, np.ndarray]:
        """``(j, image, labels)`` of pair ``index``, or of the next usable pair ``j`` (pairs known bad are not
        decoded again).

        Raises:
            BadSampleError: a bad pair with ``on_bad_sample="error"`` (naming the file), or no usable pair at all
                (how many pairs, the first failures).
        """
        try:
            j, (img, mask) = first_readable(len(self.pairs), index, lambda k: bool(self._bad_mask[k]), self.load,
                                            self._mark_bad, self._first_failures)
        except NoReadableImagesError:
            raise BadSampleError(f"none of the {len(self.pairs)} image/mask pairs can be used; first failures: "
                                 f"{self._first_failures()}") from None
        return j, img, mask

    def _first_failures(self) -> list[str]:
        """Why the first (up to 3) pairs found bad by this process are bad (each message names its file)."""
        return [reason for _, reason in sorted(self._bad_reasons.items())[:3]]

    def __getitem__(self, index: int) -> Any:
        """Training: ``(image, mask)`` of sample ``index``, or of the next usable pair (counted once in
        ``skipped_count``); eval: a dict, or None for a bad pair (counted, never replaced).

        Raises:
            BadSampleError: a bad pair with ``on_bad_sample="error"``, or (training) no usable pair at all.
        """
        n = len(self.pairs)
        if not -n <= int(index) < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} pairs")
        index = int(index) % n
        if not self.train:  # eval: a bad pair is dropped (None), never replaced by a sample counted twice
            if not self._bad_mask[index]:  # a pair known bad is not decoded again
                try:
                    img, mask = self.load(index)
                except BadSampleError as e:
                    self._mark_bad(index, e)
                else:
                    x, m = self.transform(img, mask)
                    return {"image": x, "mask": m, "path": self.pairs[index][0]}
            self._skips.add(epoch=self.epoch)
            return None
        j, img, mask = self._load_good(index)
        if j != index:  # replaced: one skip per request of a bad sample
            self._skips.add(epoch=self.epoch)
        with seeded(self.seed, self.epoch, index):
            return self.transform(img, mask)


def collate_eval(batch: list[dict | None]) -> dict[str, Any]:
    """Eval batches of images that may differ in size: lists, not stacked tensors (skipped samples dropped)."""
    batch = [b for b in batch if b is not None]
    return {k: [b[k] for b in batch] for k in ("image", "mask", "path")}


# --------------------------------------------------------------------------------------- from the config
def class_names(dcfg: SegDataConfig) -> list[str]:
    """The class list: ``classes`` / ``classes_file`` / ADE20K's 150 names / ``class_<i>``.

    Raises:
        ConfigError: naming the key to change: both ``data.classes`` and ``data.classes_file`` set (saying how to
            clear either); ``data.classes_file`` missing, a folder, not a text file, empty, or with a blank line
            before its last name (:func:`load_class_names`); names that are not ``data.num_classes``; fewer than 2
            classes; neither names nor ``data.num_classes``.
    """
    classes, classes_file = list(dcfg.classes or []), dcfg.classes_file or ""
    if classes and classes_file:
        shown = first_few(classes, 3)
        raise ConfigError("data.classes", f"data.classes ({len(classes)} names: {shown}; a preset or -c file may set "
                                          f"it) and data.classes_file {classes_file!r} are both set: give one. To use "
                                          "the file, clear the list: data.classes=[]; to use the list, clear the "
                                          "file: data.classes_file=null")
    if classes_file:
        try:
            names = load_class_names(classes_file)
        except FileNotFoundError as e:
            raise ConfigError("data.classes_file", f"{e}: give the path of the list (a text file, one class name a "
                                                   "line), or the names themselves: data.classes=[a,b,...]") from None
        except (OSError, ValueError) as e:
            raise ConfigError("data.classes_file", str(e)) from None
    elif classes:
        names = classes
    elif dcfg.format == "ade20k" and dcfg.num_classes in (0, len(ADE20K_CLASSES)):
        return list(ADE20K_CLASSES)
    elif dcfg.num_classes <= 0:
        raise ConfigError("data.num_classes", "no class names given: set data.num_classes=N, or give the names: "
                                              "data.classes=[a,b,...] or data.classes_file=FILE (one name a line)")
    else:
        names = [f"class_{i}" for i in range(dcfg.num_classes)]
    source = _classes_source(dcfg)
    if dcfg.num_classes and len(names) != dcfg.num_classes:
        raise ConfigError("data.num_classes", f"{dcfg.num_classes}, but {source} gives {len(names)}: set "
                                              f"data.num_classes={len(names)} (or 0: the number of names), or give "
                                              f"{dcfg.num_classes} names")
    if len(names) < 2:
        raise ConfigError(class_list_key(_class_keys(dcfg)),
                          f"{source} gives {len(names)}: segmentation needs at least 2 classes")
    return names


def _class_keys(dcfg: SegDataConfig) -> dict[str, Any]:
    """The data keys that give the class list (:data:`beit.engine.rundir.CLASS_SOURCES`), dotted, with their values."""
    return {k: getattr(dcfg, k.split(".", 1)[1]) for k in CLASS_SOURCES}


def _classes_source(dcfg: SegDataConfig) -> str:
    """Where :func:`class_names` takes the class names from, for messages: the engine's one wording
    (:func:`beit.engine.rundir.class_list_source`: ``data.classes_file '/d/classes.txt'``, ``data.classes``,
    ``data.num_classes``), or ADE20K's built-in list. Messages say the count themselves."""
    if (not dcfg.classes_file and not dcfg.classes and dcfg.format == "ade20k"
            and dcfg.num_classes in (0, len(ADE20K_CLASSES))):
        return "ADE20K's class list (data.format=ade20k; give data.classes_file for another list)"
    return class_list_source(_class_keys(dcfg))


def check_data_root(dcfg: SegDataConfig) -> Path:
    """``data.root`` as a folder that exists, checked before a training run builds its model or makes its folder.

    Raises:
        ConfigError: ``data.root`` is empty or no folder.
    """
    if not dcfg.root:
        raise ConfigError("data.root", "set the dataset root (data.root=/path/to/data)")
    root = Path(dcfg.root).expanduser()
    if not root.is_dir():
        raise ConfigError("data.root", f"no such folder: {dcfg.root!r}")
    return root


def _pairs(dcfg: SegDataConfig, split: str) -> tuple[list[tuple[str, str]], list[str]]:
    root = check_data_root(dcfg)
    name = dcfg.train_split if split == "train" else dcfg.val_split
    if dcfg.format == "list":
        return list_pairs(root / (dcfg.train_list if split == "train" else dcfg.val_list), root)
    if dcfg.format == "ade20k":
        img_dir, ann_dir, img_suffix, seg_suffix = "images/{split}", "annotations/{split}", ".jpg", ".png"
    else:
        img_dir, ann_dir, img_suffix, seg_suffix = dcfg.img_dir, dcfg.ann_dir, dcfg.img_suffix, dcfg.seg_suffix
    return folder_pairs(root / img_dir.format(split=name), root / ann_dir.format(split=name), img_suffix, seg_suffix)


def build_datasets(cfg: SegmentConfig, splits: tuple[str, ...] = ("train", "val")) -> dict[str, Dataset]:
    """``{"train": augmenting dataset, "val": eval dataset}`` from the data config."""
    d = cfg.data
    names = class_names(d)
    out: dict[str, Dataset] = {}
    for split in splits:
        pairs, problems = _pairs(d, split)
        if split == "train":
            tf = SegTrainTransform(d.crop_size, d.img_scale, d.ratio_range, d.cat_max_ratio, d.flip_prob,
                                   d.photometric, d.mean, d.std, d.ignore_index)
        else:
            tf = SegEvalTransform(d.test_scale, d.mean, d.std)
        ds = SegmentationDataset(pairs, len(names), transform=tf, train=split == "train", ignore_index=d.ignore_index,
                                 reduce_zero_label=d.reduce_zero_label, on_bad_sample=d.on_bad_sample,
                                 class_names=names, seed=cfg.train.seed, problems=problems,
                                 classes_source=_classes_source(d))
        if d.verify:
            ds.verify()
        if ds.num_skipped and D.is_main():  # every rank found the same: said once
            logger.warning("%s: %d bad samples skipped, %d used", split, ds.num_skipped, len(ds))
        out[split] = RepeatedDataset(ds, d.repeat) if split == "train" and d.repeat > 1 else ds
    return out

