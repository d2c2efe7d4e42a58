"""COCO-format layout datasets (PubLayNet, DocLayNet, DocBank, ...) as torchvision detection samples.

One class reads any COCO file: categories are mapped to contiguous labels ``1..K`` in id order (0 is torchvision's
background), grayscale pages become RGB. Bad input is found when the dataset is built, not half-way through an
epoch: an annotation pointing at a missing image, an unknown category, a malformed box (not four numbers, or a
negative width or height), a box wholly off its page or an ``iscrowd`` other than 0 / 1 (false / true) is skipped
and counted (``on_bad="skip"``) or raises :class:`LayoutDataError` naming the file and the annotation
(``on_bad="error"``); boxes sticking out of the page are clipped, boxes on the page but thinner than
``min_box_size`` (1 px) after clipping are dropped and counted (``degenerate_boxes``) with either setting, and
pages without boxes are kept as negatives. ``dataset.report`` counts it all, and the warning logged at build time
gives the first case of each kind (annotations whose ``image_id`` is in no ``images`` entry of the file, in
neither split, are one case: their count and the first ids). An image entry whose ``file_name`` is not text or
whose ``width`` / ``height`` is not a number is a bad page (skipped or raised as above); an ``area`` that is not a
number is replaced by the box's (counted as ``bad_area``, raised with ``on_bad="error"``). A ``segmentation`` is
checked as the evaluator will read it: an RLE object needs ``size`` [height, width] of its page and ``counts``
covering its pixels, a polygon needs x, y numbers; a bad one is left out (counted as ``bad_segmentation``: the box
stands in for the mask) or raised with ``on_bad="error"``. An image id given to two ``images`` entries is always
an error, and so is an ``annotations`` entry that is not an object, or a category that is not an object with an
integer id of its own.

A page whose JSON ``width`` / ``height`` differ from its image file (``size_mismatch``) is taken in the file's
pixels: its boxes are rescaled from the JSON's size to the file's (the images were resized after annotating),
unless they reach past the JSON's size but fit the file's, which means the JSON's size is the wrong one and
the boxes are already in the file's pixels. Clipping and the empty-box check happen after that, on the file's
page.

Training augmentation (DiT's recipe): optional DETR-style random crop, multi-scale short side, horizontal
flip, all drawn inside ``seeded(seed, epoch, index)`` so a sample is a pure function of that triple.
Masks are rasterized by pycocotools from the transformed polygons, so they are exact at every scale.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..._text import first_few, repeated
from ...data.datasets import (
    NoReadableImagesError,
    RepeatedDataset,
    SkipCounter,
    decode_image_matching,
    first_readable,
    image_size,
)
from ...data.seeding import seeded
from ...engine.config import ConfigError
from ...engine.distributed import is_main
from .config import CROP_RESIZE, DIT_MIN_SIZES, LayoutConfig

__all__ = ["CocoLayoutDataset", "LayoutDataError", "RepeatedDataset", "build_datasets", "build_val_dataset", "collate",
           "check_paths", "image_folders", "split_image_ids", "write_synthetic_pages"]

log = logging.getLogger("beit")



class LayoutDataError(ValueError):
    """The annotation file or an image is unusable; the message names the file and the annotation."""


def _read_json(path: Path) -> dict[str, Any]:
    """A COCO file: ``images``, ``annotations`` and a non-empty ``categories`` list, image ids unique.

    Raises:
        FileNotFoundError: no such file.
        LayoutDataError: not JSON, not a COCO file, no categories, an ``images`` entry without an integer id
            (naming the file, the entry and its id), an ``annotations`` entry that is not an object, a
            ``categories`` entry that is not an object with an integer id or an id given to two categories (naming
            the file and the entry), or an image id given to two ``images`` entries (naming the file and the first
            duplicated ids with their counts, then how many more).
    """
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LayoutDataError(f"{path}: not a JSON file ({e})") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise LayoutDataError(f"{path}: not a COCO file: no '{key}' list")
    if not data["categories"]:
        raise LayoutDataError(f"{path}: no categories")
    odd = [(i, c) for i, c in enumerate(data["categories"]) if not isinstance(c, dict) or not _is_int(c.get("id"))]
    if odd:  # the labels are made from the category ids
        i, c = odd[0]
        what = f"its id is {c.get('id')!r}" if isinstance(c, dict) else f"it is {c!r:.60}, not an object"
        raise LayoutDataError(f"{path}: 'categories' entry {i} has no integer id ({what}; {len(odd)} such "
                              f"entr{'ies' if len(odd) > 1 else 'y'}): a COCO category is e.g. "
                              '{"id": 1, "name": "text"}')
    cat_ids = Counter(c["id"] for c in data["categories"])
    dup = [i for i, n in cat_ids.items() if n > 1]
    if dup:  # one id, two names: which label would its boxes get?
        raise LayoutDataError(f"{path}: category id{'s' if len(dup) > 1 else ''} given to more than one 'categories' "
                              f"entry: {repeated([c['id'] for c in data['categories']], 5)}; category ids must be "
                              "unique")
    odd = [i for i, a in enumerate(data["annotations"]) if not isinstance(a, dict)]
    if odd:
        i = odd[0]
        raise LayoutDataError(f"{path}: 'annotations' entry {i} is {data['annotations'][i]!r:.60}, not an object "
                              f"({len(odd)} such entr{'ies' if len(odd) > 1 else 'y'}, first at "
                              f"{first_few([str(j) for j in odd], 5)})")
    odd = [(i, im) for i, im in enumerate(data["images"]) if not isinstance(im, dict) or not _is_int(im.get("id"))]
    if odd:  # COCO image ids are integers (pycocotools and the detector's targets need them)
        i, im = odd[0]
        what = f"its id is {im.get('id')!r}" if isinstance(im, dict) else f"it is {im!r}, not an object"
        raise LayoutDataError(f"{path}: 'images' entry {i} has no integer id ({what}; {len(odd)} such "
                              f"entr{'ies' if len(odd) > 1 else 'y'}): COCO image ids are integers, e.g. \"id\": 1")
    seen = Counter(im["id"] for im in data["images"])
    dup = [i for i, n in seen.items() if n > 1]
    if dup:  # two pages under one id: their boxes would be merged onto one of them
        # the ids by their repr (repeated shows them so), here and below: an id '7' is not 7
        raise LayoutDataError(f"{path}: {len(dup)} image id{'s' if len(dup) > 1 else ''} given to more than one "
                              f"'images' entry: {repeated([im['id'] for im in data['images']], 5)}; image ids must "
                              "be unique")
    return data


def _is_int(v: Any) -> bool:
    """An integer that fits int64 (a COCO id: the detector's targets and pycocotools hold them so), not a bool."""
    return isinstance(v, int) and not isinstance(v, bool) and -(2**63) <= v < 2**63


def _is_number(v: Any) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _hashable(v: Any) -> bool:
    """Whether ``v`` can be looked up in a dict (an id given as a list or an object cannot)."""
    try:
        hash(v)
    except TypeError:
        return False
    return True


def split_image_ids(ann_file: str | Path, num_val: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """A deterministic train/val split of one COCO file: images sorted by file name, shuffled with a
    fixed legacy NumPy stream (stable across versions), the last ``num_val`` held out.

    Raises:
        FileNotFoundError: no such file.
        LayoutDataError: not a COCO file, or one with duplicated image ids.
        ValueError: ``num_val`` leaves no image on one side.
    """
    data = _read_json(Path(ann_file))
    ids = [im["id"] for im in sorted(data["images"], key=lambda im: (str(im.get("file_name")), im["id"]))]
    if not 0 < num_val < len(ids):
        raise ValueError(f"{ann_file}: cannot hold out {num_val} of {len(ids)} images")
    order = [ids[i] for i in np.random.RandomState(seed).permutation(len(ids))]
    return sorted(order[:-num_val]), sorted(order[-num_val:])


def _well_formed(box: Any) -> bool:
    """A COCO ``bbox``: four finite numbers."""
    return isinstance(box, (list, tuple)) and len(box) == 4 and all(_is_number(v) for v in box)


def _polygons(seg: list[Any]) -> tuple[list[list[float]] | None, str]:
    """The usable polygons of a COCO polygon ``segmentation`` (lists of at least 3 x, y pairs; shorter ones, a point
    or a line, are left out) or None, and what is wrong with it ("" when nothing is): a polygon that is not a list
    of finite numbers."""
    odd = [i for i, p in enumerate(seg) if not isinstance(p, list) or not all(_is_number(v) for v in p)]
    polys = [[float(v) for v in p] for i, p in enumerate(seg) if i not in odd and len(p) >= 6 and len(p) % 2 == 0]
    problem = (f"whose polygon {odd[0]} is {seg[odd[0]]!r:.40}, not a list of x, y numbers" if odd else "")
    return polys or None, problem


def _rle_counts(text: str) -> list[int] | None:
    """The run lengths of COCO's compressed RLE text (pycocotools' ``rleFrString``), or None if it is not one."""
    counts: list[int] = []
    p = 0
    while p < len(text):
        x = k = 0
        more = True
        while more:
            if p >= len(text):
                return None
            c = ord(text[p]) - 48
            if not 0 <= c < 64:
                return None
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        if x < 0:
            return None
        counts.append(x)
    return counts


def _rle_problem(rle: dict[str, Any], height: int, width: int) -> str:
    """What is wrong with an RLE ``segmentation`` of a ``height`` x ``width`` page ("" when nothing is): pycocotools
    needs ``size`` [height, width] (the page's) and ``counts``, COCO's compressed text or a list of run lengths, that
    cover the page's pixels exactly (fewer leave the rest of the mask undefined, more are refused mid-evaluation)."""
    size = rle.get("size")
    if size is None:
        return "without a 'size' ([height, width])"
    if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) for v in size)):
        return f"whose size {size!r:.40} is not [height, width]"
    if size != [height, width]:
        return f"whose size {size} is not its page's [{height}, {width}] ([height, width])"
    counts = rle.get("counts")
    if counts is None:
        return "without 'counts'"
    if isinstance(counts, str):
        runs = _rle_counts(counts)
        if runs is None:
            return "whose counts are not COCO's compressed RLE text"
    elif isinstance(counts, list) and all(_is_int(v) and v >= 0 for v in counts):
        runs = counts
    else:
        return f"whose counts {counts!r:.40} are neither COCO's compressed RLE text nor a list of run lengths"
    if sum(runs) != height * width:
        return f"whose counts cover {sum(runs)} pixels, not the page's {height * width}"
    return ""


class CocoLayoutDataset(Dataset):
    """Pages of a COCO file as ``(image uint8 [3, H, W], target)``; ``target`` holds torchvision's ``boxes``
    (xyxy float), ``labels`` (1..K), ``image_id`` and, with ``with_masks``, ``masks`` (uint8 [N, H, W]).

    Args:
        ann_file, image_root: the COCO JSON and the folder its ``file_name`` entries are relative to.
        train: augment (crop, multi-scale resize, flip); otherwise pages keep their size (the model resizes).
        image_ids: a subset of the file's images (e.g. from :func:`split_image_ids`).
        on_bad: ``"skip"`` (count in ``report``, log once: under torchrun, where every rank builds the same
            dataset, rank 0 alone) or ``"error"`` (raise at the first problem: a missing or
            unreadable page, a bad image entry or annotation, a malformed box or one wholly off its page; a box
            left thinner than ``min_box_size`` by clipping is dropped either way).
        check_images: open every image header at build time (finds missing / unreadable files and wrong sizes).

    Raises:
        FileNotFoundError: no annotation file or image folder.
        LayoutDataError: not a COCO file, duplicated image ids, ``image_ids`` not in the file, no usable page or
            box, or (with ``on_bad="error"``) the first bad image entry or annotation.
    """

    def __init__(self, ann_file: str | Path, image_root: str | Path, *, train: bool = False,
                 image_ids: Sequence[int] | None = None, with_masks: bool = False,
                 min_sizes: Sequence[int] = DIT_MIN_SIZES, max_size: int = 1333, flip_prob: float = 0.5,
                 crop_prob: float = 0.0, crop_size: tuple[int, int] = (384, 600), seed: int = 0,
                 on_bad: str = "skip", check_images: bool = True, min_box_size: float = 1.0) -> None:
        if on_bad not in ("skip", "error"):
            raise ValueError(f"on_bad must be 'skip' or 'error', got {on_bad!r}")
        self.ann_file, self.root = Path(ann_file), Path(image_root)
        self.train, self.with_masks = train, with_masks
        self.min_sizes, self.max_size = tuple(min_sizes), max_size
        self.flip_prob, self.crop_prob, self.crop_size = flip_prob, crop_prob, tuple(crop_size)
        self.seed, self.epoch, self.on_bad = seed, 0, on_bad
        self.min_box_size, self.check_images = min_box_size, check_images
        self.report: Counter[str] = Counter()
        self._skips = SkipCounter()  # pages replaced at load time, summed over DataLoader workers
        self.problems: list[str] = []
        self._first: dict[str, str] = {}  # kind -> its first message, for the build-time warning
        data = _read_json(self.ann_file)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root} (for {self.ann_file})")

        cats = sorted(data["categories"], key=lambda c: c["id"])
        self.cat_ids = [int(c["id"]) for c in cats]  # label i+1 <-> category id cat_ids[i]
        self.class_names = [str(c.get("name", c["id"])) for c in cats]
        self.categories = [{"id": int(c["id"]), "name": str(c.get("name", c["id"]))} for c in cats]
        cat_to_label = {cid: i + 1 for i, cid in enumerate(self.cat_ids)}

        wanted = set(image_ids) if image_ids is not None else None
        if wanted is not None:
            unknown = wanted - {im.get("id") for im in data["images"]}
            if unknown:
                raise LayoutDataError(f"{self.ann_file}: image ids {first_few([repr(i) for i in sorted(unknown)], 5)} "
                                      "are not in the file")
        images: dict[int, dict[str, Any]] = {}
        all_ids = set()
        for im in data["images"]:
            all_ids.add(im.get("id"))
            if wanted is not None and im.get("id") not in wanted:
                continue
            info = self._check_image(im)
            if info is not None:
                images[info["id"]] = info
        self._resolve_sizes(images, data["annotations"])
        by_file: dict[Path, list[int]] = {}
        for info in images.values():
            by_file.setdefault(Path(os.path.normpath(info["path"])), []).append(info["id"])
        twice = [(f, ids) for f, ids in by_file.items() if len(ids) > 1]
        if twice:  # its boxes under one id: the other taught (and scored) as a page without any region
            f, ids = twice[0]
            more = f" ({len(twice)} such files)" if len(twice) > 1 else ""
            message = (f"the page {f.name} is listed under image ids {', '.join(map(str, ids))}{more}: list each "
                       "page once, with all its boxes under that id")
            self._bad("page_listed_twice", message, count=len(twice))

        self.anns: dict[int, list[dict[str, Any]]] = {i: [] for i in images}
        orphans: list[tuple[Any, Any]] = []  # (annotation id, image id) of annotations of no image of the file
        for ann in data["annotations"]:
            img_id = ann.get("image_id")
            # in no split: counted by every dataset of the file, not silently dropped
            if not _hashable(img_id) or img_id not in all_ids:
                if self.on_bad == "error":
                    self._bad("unknown_image", f"annotation {ann.get('id')} points at image id {img_id!r}, which "
                                               "is not in 'images'")
                orphans.append((ann.get("id"), img_id))
                continue
            if wanted is not None and img_id not in wanted:
                continue
            if img_id not in images:
                self.report["anns_of_skipped_images"] += 1
                continue
            clean = self._check_ann(ann, images[img_id], cat_to_label)
            if clean is not None:
                self.anns[img_id].append(clean)
        if orphans:  # one line for all of them, in the build-time warning
            n, ids = len(orphans), list(dict.fromkeys(repr(i) for _, i in orphans))  # an id may be a list
            shown, annotations = first_few(ids, 5), first_few([repr(a) for a, _ in orphans], 3)
            self._note("unknown_image", f"left out {n} annotation{'s' if n > 1 else ''} whose image_id is not in "
                                        f"'images': image id{'s' if len(ids) > 1 else ''} {shown} (annotation "
                                        f"{'ids' if n > 1 else 'id'} {annotations})", count=n)

        self.images = [images[i] for i in sorted(images)]
        self.report["images"] = len(self.images)
        self.report["boxes"] = sum(len(v) for v in self.anns.values())
        self.report["empty_pages"] = sum(1 for v in self.anns.values() if not any(not a["iscrowd"] for a in v))
        if not self.images:
            raise LayoutDataError(f"{self.ann_file}: no usable image ({self.summary()})")
        if not any(not a["iscrowd"] for v in self.anns.values() for a in v):  # trained (and scored) on nothing
            given = len(data["annotations"])
            raise LayoutDataError(f"{self.ann_file}: no usable box on its {len(self.images)} pages ("
                                  + (f"all {given} annotations left out: {self.summary()}" if given else
                                     "its 'annotations' list is empty") + "): nothing to train on or score")
        self._bad_pages: dict[int, str] = {}  # page index -> why it failed to decode at load time, per process
        self._bad_mask = torch.zeros(len(self.images), dtype=torch.bool).share_memory_()  # seen by every worker
        skipped = {k: v for k, v in self.report.items() if k not in ("images", "boxes", "empty_pages")}
        if skipped and is_main():  # every rank builds the same dataset: said once
            first = "; ".join(f"{k}: {m}" for k, m in self._first.items())
            log.warning(f"{self.ann_file}: {self.summary()}" + (f"; first of each: {first}" if first else ""))

    # --- build-time checks -------------------------------------------------------------------------------

    def _bad(self, kind: str, message: str, count: int = 1) -> None:
        """A problem that ``on_bad`` decides about: raise, or count (``count`` of them) and remember the message.

        Raises:
            LayoutDataError: with ``on_bad="error"``, the message prefixed by the annotation file.
        """
        if self.on_bad == "error":
            raise LayoutDataError(f"{self.ann_file}: {message}")
        self._note(kind, message, count)

    def _note(self, kind: str, message: str, count: int = 1) -> None:
        """Count ``count`` skipped or repaired ``kind`` and remember its message (the first 50 in ``problems``, the
        first of each kind for the build-time warning)."""
        self.report[kind] += count
        self._first.setdefault(kind, message)
        if len(self.problems) < 50:
            self.problems.append(f"{self.ann_file}: {message}")

    def _check_image(self, im: dict[str, Any]) -> dict[str, Any] | None:
        name = im.get("file_name")
        if "id" not in im or not name:
            self._bad("bad_image_entry", f"image entry {im!r:.80} has no id or file_name")
            return None
        if not isinstance(name, str):
            self._bad("bad_image_entry", f"image {im['id']} has file_name {name!r:.60}, not a file name (text)")
            return None
        w, h = im.get("width"), im.get("height")
        for key, v in (("width", w), ("height", h)):
            if v is not None and not (_is_number(v) and v >= 0):  # 0 or none: taken from the file
                self._bad("bad_image_entry", f"image {im['id']} '{name}' has {key} {v!r:.30}, not a number of "
                                             "pixels")
                return None
        path = self.root / name
        if self.check_images:
            if not path.is_file():
                self._bad("missing_image", f"image {im['id']} '{name}' not found under {self.root}")
                return None
            try:  # the size load_image will return: upright by EXIF, or as stored if that is the JSON's size
                fw, fh = image_size(path)
                raw = image_size(path, exif=False)
                if raw == (w, h) and (fw, fh) != (w, h):
                    fw, fh = raw
            except (OSError, Image.DecompressionBombError) as e:  # a page too large names data.max_image_pixels
                self._bad("unreadable_image", f"image {im['id']} '{path}' cannot be read ({e})")
                return None
            # a missing JSON size is the file's; boxes are kept in the file's pixels ("width" / "height"), see
            # _resolve_sizes for a JSON size that disagrees
            return {"id": im["id"], "file_name": name, "path": path, "width": fw, "height": fh, "file_size": (fw, fh),
                    "json_size": (w or fw, h or fh), "scale": (1.0, 1.0)}
        if not (w and h):
            self._bad("bad_image_entry", f"image {im['id']} '{name}' has no width/height (use check_images)")
            return None
        return {"id": im["id"], "file_name": name, "path": path, "width": w, "height": h, "file_size": (w, h),
                "json_size": (w, h), "scale": (1.0, 1.0)}

    def _resolve_sizes(self, images: dict[int, dict[str, Any]], anns: list[Any]) -> None:
        """For each page whose JSON size differs from its file's: the scale from the boxes as given to the file's
        pixels (``info["scale"]``), counted as ``size_mismatch`` with a message naming the page and both sizes.

        The boxes are rescaled from the JSON's size to the file's, unless they reach more than 2% past the JSON's
        size but fit the file's: then the JSON's size is the wrong one and they are in the file's pixels already.
        """
        pages = {i: info for i, info in images.items() if info["json_size"] != info["file_size"]}
        if not pages:
            return
        reach = {i: [0.0, 0.0] for i in pages}  # right- and bottom-most box edge, as given
        for ann in anns:
            r = reach.get(ann.get("image_id")) if isinstance(ann, dict) and _hashable(ann.get("image_id")) else None
            box = ann.get("bbox") if r is not None else None
            if r is not None and _well_formed(box):
                r[0], r[1] = max(r[0], box[0] + box[2]), max(r[1], box[1] + box[3])
        tol = 1.02  # boxes a little past the page's edge are common: clipped, they say nothing about the size
        for i, info in pages.items():
            (jw, jh), (fw, fh), (rx, ry) = info["json_size"], info["file_size"], reach[i]
            past_json = rx > jw * tol or ry > jh * tol
            if past_json and rx <= fw * tol and ry <= fh * tol:
                info["scale"] = (1.0, 1.0)
                how = (f"its boxes reach x={rx:g}, y={ry:g}, past the JSON's size but within the file's: taken as the "
                       "file's pixels")
            else:
                info["scale"] = (fw / jw, fh / jh)
                how = "its boxes are rescaled to the file's size"
            self._note("size_mismatch", f"image {info['id']} '{info['file_name']}': the JSON says {jw}x{jh} but "
                                        f"the file is {fw}x{fh}; {how}")

    def _check_ann(self, ann: dict[str, Any], img: dict[str, Any], cat_to_label: dict[int, int]
                   ) -> dict[str, Any] | None:
        where = f"annotation {ann.get('id')} (image '{img['file_name']}')"
        cid = ann.get("category_id")
        if not _hashable(cid) or cid not in cat_to_label:
            self._bad("unknown_category", f"{where} has category id {cid}, not in 'categories' {self.cat_ids}")
            return None
        crowd = ann.get("iscrowd", 0)
        if crowd not in (0, 1) or not isinstance(crowd, (int, float)):  # bool("no") is True: no guessing
            self._bad("bad_iscrowd", f"{where} has iscrowd {crowd!r:.30}, not 0 or 1 (false or true)")
            return None
        crowd = int(crowd)
        box = ann.get("bbox")
        if not _well_formed(box):
            self._bad("bad_bbox", f"{where} has a malformed bbox {box!r:.60}")
            return None
        if box[2] < 0 or box[3] < 0:
            self._bad("bad_bbox", f"{where} has a bbox {box} of negative width or height (COCO boxes are "
                                  "[x, y, width, height])")
            return None
        # in the page's pixels (the file's, when it was read: see _resolve_sizes), then clipped to that page
        W, H = img["width"], img["height"]
        sx, sy = img.get("scale", (1.0, 1.0))
        x0, y0, x1, y1 = box[0] * sx, box[1] * sy, (box[0] + box[2]) * sx, (box[1] + box[3]) * sy
        if box[2] > 0 and box[3] > 0 and (x0 >= W or y0 >= H or x1 <= 0 or y1 <= 0):
            self._bad("box_off_page", f"{where}: box {[round(v, 2) for v in box]} lies wholly outside its {W}x{H} "
                                      "page")
            return None
        cx0, cy0, cx1, cy1 = min(max(x0, 0), W), min(max(y0, 0), H), min(max(x1, 0), W), min(max(y1, 0), H)
        if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
            self.report["clipped_boxes"] += 1
        if cx1 - cx0 < self.min_box_size or cy1 - cy0 < self.min_box_size:
            self._note("degenerate_boxes", f"{where}: box {[round(v, 2) for v in box]} is empty on its {W}x{H} "
                                           "page (after clipping)")
            return None
        seg, polys = ann.get("segmentation"), None
        if isinstance(seg, dict):  # RLE, in the pixels of the page the box is given on
            h, w = (H, W) if (sx, sy) == (1.0, 1.0) else (img["json_size"][1], img["json_size"][0])
            problem = _rle_problem(seg, h, w)
            if problem:
                self._bad("bad_segmentation", f"{where} has an RLE segmentation {problem}: its box stands in")
                seg = None
        elif isinstance(seg, list):
            polys, problem = _polygons(seg)
            pw, ph = (W, H) if (sx, sy) == (1.0, 1.0) else img["json_size"]
            if not problem and polys and any(not (-pw <= v <= 2 * pw if k % 2 == 0 else -ph <= v <= 2 * ph)
                                             for p in polys for k, v in enumerate(p)):
                # far off the page (pycocotools' rasteriser crashes the process on coordinates like 1e30)
                problem, polys = f"with a point far outside its {pw}x{ph} page", None
            if problem:
                self._bad("bad_segmentation", f"{where} has a segmentation {problem}: left out")
            seg = polys
        elif seg is not None:
            self._bad("bad_segmentation", f"{where} has a segmentation {seg!r:.40}, neither polygons nor an RLE "
                                          "object: its box stands in")
            seg = None
        if seg is None and self.with_masks and not crowd:
            self.report["mask_from_box"] += 1
        if (sx, sy) != (1.0, 1.0):  # polygons to the page's pixels; an RLE cannot be rescaled: the box stands in
            polys = [[v * (sy if k % 2 else sx) for k, v in enumerate(p)] for p in polys] if polys else None
            seg = polys
        area = ann.get("area")
        if area is not None and not (_is_number(area) and area >= 0):
            self._bad("bad_area", f"{where} has area {area!r:.30}, not a number of pixels: its box's area is used")
            area = None
        area = float(area) * sx * sy if area else (cx1 - cx0) * (cy1 - cy0)
        return {"id": ann.get("id"), "bbox": [cx0, cy0, cx1 - cx0, cy1 - cy0], "category_id": cid,
                "label": cat_to_label[cid], "iscrowd": crowd, "area": float(area),
                "polygons": polys, "segmentation": seg}

    # --- Dataset --------------------------------------------------------------------------------------------

    def summary(self) -> str:
        """One line: kept images / boxes and every skipped or repaired count."""
        return ", ".join(f"{k} {v}" for k, v in sorted(self.report.items()))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    @property
    def label_to_cat(self) -> list[int]:
        """``label_to_cat[label - 1]`` is the COCO category id of a torchvision label."""
        return list(self.cat_ids)

    def skipped_count(self, epoch: int | None = None) -> int:
        """Pages replaced because they failed to decode at load time, summed over this process and its
        DataLoader workers (the engine logs it as ``skipped_files``); those of ``epoch`` only when given."""
        return self._skips.total(epoch)

    def load_image(self, index: int) -> Image.Image:
        info = self.images[index]
        try:
            # upright by EXIF unless the annotations were made on the stored pixels; grayscale (DocBank) and
            # palette pages -> 3 channels
            return decode_image_matching(info["path"], info["file_size"])
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, zlib.error... on broken files
            raise LayoutDataError(f"image {info['id']} '{info['path']}' cannot be read "
                                  f"({type(e).__name__}: {e})") from None

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """In training, a page that fails to decode now (header fine at build time, body truncated) is
        replaced by the next readable page (one skip counted per replaced sample); the page is warned about and
        counted in ``report["unreadable_at_load"]`` once, and never decoded again by this process or its
        DataLoader workers. In evaluation the error (naming the file) is raised, since skipping a page would
        change the score.

        Raises:
            LayoutDataError: evaluation: the page cannot be read (naming the file); training: no page can be read
                (naming the annotation file, the image folder and the first failures).
        """
        n = len(self.images)
        if not -n <= int(index) < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} pages")
        index = int(index) % n
        if not self.train:
            return self._sample(index, self.load_image(index), index)
        try:
            i, img = first_readable(n, index, lambda j: bool(self._bad_mask[j]), self.load_image, self._mark_bad,
                                    self._first_failures)
        except NoReadableImagesError:
            raise LayoutDataError(f"{self.ann_file}: none of the {n} pages of {self.root} can be read; first "
                                  f"failures: {self._first_failures()}") from None
        if i != index:  # replaced: one skip per request of a bad page
            self._skips.add(epoch=self.epoch)
        return self._sample(i, img, index)

    def _mark_bad(self, i: int, err: BaseException) -> None:
        """Page ``i`` failed to decode at load time: remember it, warn and count it once."""
        self._bad_mask[i] = True
        if i not in self._bad_pages:
            self._bad_pages[i] = str(err)
            self.report["unreadable_at_load"] += 1
            log.warning(f"{err}; using the next page instead")

    def _first_failures(self) -> list[str]:
        """The errors of the first (up to 3) pages found unreadable at load time by this process."""
        return [msg for _, msg in sorted(self._bad_pages.items())[:3]]

    def _sample(self, i: int, img: Image.Image, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        info = self.images[i]
        fw, fh = img.size
        sx, sy = fw / info["width"], fh / info["height"]  # 1 unless pages were not checked (check_images=False)
        anns = [a for a in self.anns[info["id"]] if not a["iscrowd"]]
        boxes = torch.tensor([[a["bbox"][0] * sx, a["bbox"][1] * sy, (a["bbox"][0] + a["bbox"][2]) * sx,
                               (a["bbox"][1] + a["bbox"][3]) * sy] for a in anns], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([a["label"] for a in anns], dtype=torch.int64)
        polys = [[np.asarray(p).reshape(-1, 2) * (sx, sy) for p in a["polygons"]] if a["polygons"] else None
                 for a in anns] if self.with_masks else None

        W, H = fw, fh
        if self.train:
            with seeded(self.seed, self.epoch, index):
                crop = self._draw_crop(W, H)
                short = self.min_sizes[int(torch.randint(len(self.min_sizes), ()))]
                flip = bool(torch.rand(()) < self.flip_prob)
            # geometry: crop -> resize -> flip, applied to image, boxes and polygons alike
            offset = (0.0, 0.0)
            if crop is not None:
                x0, y0, cw, ch = crop
                img = img.crop((x0, y0, x0 + cw, y0 + ch))
                offset, W, H = (float(x0), float(y0)), cw, ch
                boxes = boxes - torch.tensor([x0, y0, x0, y0], dtype=torch.float32)
                boxes[:, 0::2] = boxes[:, 0::2].clamp(0, W)
                boxes[:, 1::2] = boxes[:, 1::2].clamp(0, H)
            scale = min(short / min(W, H), self.max_size / max(W, H))
            nw, nh = max(1, round(W * scale)), max(1, round(H * scale))
            img = img.resize((nw, nh), Image.BILINEAR)
            rx, ry = nw / W, nh / H
            boxes = boxes * torch.tensor([rx, ry, rx, ry])
            if flip:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
                boxes = torch.stack([nw - boxes[:, 2], boxes[:, 1], nw - boxes[:, 0], boxes[:, 3]], dim=1)
            if polys is not None:
                polys = [[self._move(p, offset, rx, ry, nw if flip else None) for p in ps] if ps else None
                         for ps in polys]
            wh = boxes[:, 2:] - boxes[:, :2]
            keep = (wh >= self.min_box_size).all(dim=1)
            boxes, labels = boxes[keep], labels[keep]
            if polys is not None:
                polys = [p for p, k in zip(polys, keep.tolist()) if k]
            W, H = nw, nh

        image = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
        target = {"boxes": boxes, "labels": labels, "image_id": torch.tensor(info["id"], dtype=torch.int64)}
        if self.with_masks:
            target["masks"] = self._rasterize(polys, boxes, H, W)
        return image, target

    def _draw_crop(self, W: int, H: int) -> tuple[int, int, int, int] | None:
        """DETR-style crop as in DiT: short side to 400/500/600, a crop of 384-600 px there (in page pixels)."""
        if self.crop_prob <= 0 or not bool(torch.rand(()) < self.crop_prob):
            return None
        s = CROP_RESIZE[int(torch.randint(len(CROP_RESIZE), ()))] / min(W, H)
        lo, hi = self.crop_size
        ch = int(torch.randint(min(lo, round(H * s)), min(hi, round(H * s)) + 1, ())) / s
        cw = int(torch.randint(min(lo, round(W * s)), min(hi, round(W * s)) + 1, ())) / s
        cw, ch = max(1, min(W, round(cw))), max(1, min(H, round(ch)))
        x0 = int(torch.randint(W - cw + 1, ()))
        y0 = int(torch.randint(H - ch + 1, ()))
        return x0, y0, cw, ch

    @staticmethod
    def _move(p: np.ndarray, offset: tuple[float, float], rx: float, ry: float, flip_w: int | None) -> np.ndarray:
        q = (p - offset) * (rx, ry)
        if flip_w is not None:
            q[:, 0] = flip_w - q[:, 0]
        return q

    @staticmethod
    def _rasterize(polys: list | None, boxes: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """uint8 [N, H, W] masks; pycocotools clips polygons to the page. No polygon: the box is the mask."""
        from pycocotools import mask as mask_util  # optional (the layout extra): imported where COCO files are read

        out = torch.zeros((len(boxes), H, W), dtype=torch.uint8)
        for i, box in enumerate(boxes.tolist()):
            ps = polys[i] if polys is not None else None
            if ps:
                rles = mask_util.frPyObjects([p.reshape(-1).tolist() for p in ps], H, W)
                with warnings.catch_warnings():  # pycocotools' Cython array vs NumPy 2's copy keyword
                    warnings.simplefilter("ignore", DeprecationWarning)
                    m = mask_util.decode(mask_util.merge(rles))
                out[i] = torch.from_numpy(m)
            if not ps or not out[i].any():  # no polygon, or one that vanished in a crop: fall back to the box
                x0, y0, x1, y1 = box
                out[i, int(y0):max(int(y0) + 1, math.ceil(y1)), int(x0):max(int(x0) + 1, math.ceil(x1))] = 1
        return out

    # --- evaluation ground truth ----------------------------------------------------------------------------

    def coco_gt(self) -> Any:
        """A pycocotools ``COCO`` of exactly this dataset's pages and cleaned annotations (crowd ones
        included), with the original category ids: the ground truth the evaluator scores against."""
        from pycocotools.coco import COCO  # optional (the layout extra): imported where COCO files are read

        anns = []
        for info in self.images:
            fw, fh = info["file_size"]
            sx, sy = fw / info["width"], fh / info["height"]  # as in _sample: predictions are in the file's pixels
            for a in self.anns[info["id"]]:
                x, y, w, h = a["bbox"][0] * sx, a["bbox"][1] * sy, a["bbox"][2] * sx, a["bbox"][3] * sy
                seg = a["segmentation"] if (sx, sy) == (1, 1) else (
                    [(np.asarray(p).reshape(-1, 2) * (sx, sy)).reshape(-1).tolist() for p in a["polygons"]]
                    if a["polygons"] else None)
                seg = seg or [[x, y, x + w, y, x + w, y + h, x, y + h]]
                anns.append({"id": len(anns) + 1, "image_id": info["id"], "category_id": a["category_id"],
                             "bbox": [x, y, w, h], "area": a["area"] * sx * sy, "iscrowd": a["iscrowd"],
                             "segmentation": seg})
        coco = COCO()
        coco.dataset = {"images": [{"id": i["id"], "file_name": i["file_name"], "width": i["file_size"][0],
                                    "height": i["file_size"][1]} for i in self.images],
                        "annotations": anns, "categories": self.categories}
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        return coco


def collate(batch: list[tuple[torch.Tensor, dict[str, torch.Tensor]]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Pages differ in size: keep lists (torchvision pads them into one batch inside the model)."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def write_synthetic_pages(out_dir: str | Path, num_pages: int = 2, size: tuple[int, int] = (96, 128),
                          seed: int = 0, grayscale: bool = False) -> Path:
    """White pages with dark rectangles ("text" lines, grey "figure" blocks) plus their COCO JSON, for tests
    and CPU smoke runs. ``size`` is (width, height). Returns the path of ``annotations.json``."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    W, H = size
    images, anns = [], []
    for i in range(num_pages):
        page = np.full((H, W), 255, dtype=np.uint8)
        y = int(rng.randint(4, 10))
        while y < H - 12:
            if rng.rand() < 0.3 and y < H - 40:  # a figure block
                h, x0, x1, cat, shade = rng.randint(20, 34), rng.randint(6, 20), rng.randint(W // 2, W - 6), 2, 110
            else:  # a text block of 1-2 lines
                h, x0, x1, cat, shade = rng.randint(6, 12), rng.randint(4, 12), rng.randint(W // 2, W - 4), 1, 20
            h, x0, x1 = int(h), int(x0), int(x1)
            page[y:y + h, x0:x1] = shade
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat, "iscrowd": 0,
                         "bbox": [x0, y, x1 - x0, h], "area": (x1 - x0) * h,
                         "segmentation": [[x0, y, x1, y, x1, y + h, x0, y + h]]})
            y += h + int(rng.randint(5, 10))
        name = f"page_{i:03d}.png"
        img = Image.fromarray(page) if grayscale else Image.fromarray(np.stack([page] * 3, -1))
        img.save(out / "images" / name)
        images.append({"id": i + 1, "file_name": name, "width": W, "height": H})
    cats = [{"id": 1, "name": "text"}, {"id": 2, "name": "figure"}]
    path = out / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


# ---------------------------------------------------------------------------------------- from the config
def _images_of(ann: str, images: str) -> Path:
    return Path(images) if images else Path(ann).parent / "images"


def image_folders(cfg: LayoutConfig) -> dict[str, str]:
    """The page-image folders a run of ``cfg`` reads, config key -> folder: ``data.train_images`` and
    ``data.val_images`` as set, or, unset, the ``images`` folder next to ``data.train_ann`` / ``data.val_ann`` they
    stand for. The run's inputs its config does not name (``Trainer(inputs=...)``): an ``--overwrite`` never
    deletes them, e.g. a data set unpacked into the output folder (``images/`` + ``annotations.json``)."""
    d = cfg.data
    folders = {}
    for split in ("train", "val"):
        ann, images = getattr(d, f"{split}_ann"), getattr(d, f"{split}_images")
        if ann or images:
            folders[f"data.{split}_images"] = str(_images_of(ann, images) if ann else images)
    return folders


def check_paths(cfg: LayoutConfig) -> None:
    """``data.train_ann``, ``data.val_ann`` when set, and their image folders exist: what ``beit layout train`` checks
    before the ranks join their process group (under torchrun every rank meets a missing file alike, and the CLI
    prints one line for all: ``beit.cli._report``); :func:`build_datasets` checks the same again.

    Raises:
        ConfigError: no ``data.train_ann``.
        FileNotFoundError: an annotation file or its image folder is missing (naming the config key and the path).
    """
    d = cfg.data
    if not d.train_ann:
        raise ConfigError("data.train_ann", "required: the COCO annotation file to train on")
    _check_paths("train", d.train_ann, d.train_images)
    if d.val_ann:
        _check_paths("val", d.val_ann, d.val_images)


def _check_paths(split: str, ann: str, images: str) -> None:
    """``data.<split>_ann`` and its image folder exist.

    Raises:
        FileNotFoundError: naming the config key (``data.train_ann`` / ``data.val_ann`` / ``data.<split>_images``)
            and the path.
    """
    if not Path(ann).is_file():
        what = "a folder, not a file" if Path(ann).is_dir() else "no such file"
        raise FileNotFoundError(f"data.{split}_ann={ann}: {what} (the COCO annotation JSON)")
    folder = _images_of(ann, images)
    if not folder.is_dir():
        if images:
            raise FileNotFoundError(f"data.{split}_images={images}: no such folder (the page images of {ann})")
        raise FileNotFoundError(f"{folder}: no such folder (data.{split}_images is not set: the page images are looked "
                                f"for in 'images' next to data.{split}_ann; set data.{split}_images=FOLDER)")


def _check_split(cfg: LayoutConfig) -> None:
    """``data.holdout`` pages are held out of ``data.train_ann`` only without a ``data.val_ann`` (which, set, is the
    validation set, and the holdout is not used): the two files being one would validate on the training pages.

    Raises:
        ConfigError: ``data.val_ann`` is ``data.train_ann`` (the same file) and ``data.holdout`` is set.
    """
    d = cfg.data
    if not (d.holdout and d.val_ann and d.train_ann):
        return
    if Path(d.val_ann).resolve() == Path(d.train_ann).resolve():
        pages = f"{d.holdout} page{'s' if d.holdout > 1 else ''}"
        raise ConfigError("data.val_ann", f"{d.val_ann} is data.train_ann, with data.holdout={d.holdout}: a "
                                          "data.val_ann is the validation set and no page is held out, so the "
                                          "validation pages would be the training pages. Leave data.val_ann unset "
                                          f"(data.val_ann='') to hold out {pages} of data.train_ann, or give another "
                                          "file")


def build_val_dataset(cfg: LayoutConfig) -> CocoLayoutDataset | None:
    """Validation pages as they are (the model resizes them): ``data.val_ann``, or the ``data.holdout`` pages
    split off ``data.train_ann`` (when no ``data.val_ann`` is set; with one, ``data.holdout`` is not used); None
    when neither is set.

    Raises:
        ConfigError: ``data.holdout`` without ``data.train_ann``, or with a ``data.val_ann`` that is
            ``data.train_ann``.
        FileNotFoundError: the annotation file or its image folder is missing (naming the config key).
        LayoutDataError: the annotation file is unusable.
    """
    d = cfg.data
    _check_split(cfg)
    if d.val_ann:
        _check_paths("val", d.val_ann, d.val_images)
        return CocoLayoutDataset(d.val_ann, _images_of(d.val_ann, d.val_images), on_bad=d.on_bad,
                                 check_images=d.check_images)
    if d.holdout:
        if not d.train_ann:
            raise ConfigError("data.train_ann", "required with data.holdout: the file the pages are held out of")
        _check_paths("train", d.train_ann, d.train_images)
        _, val_ids = split_image_ids(d.train_ann, d.holdout, d.split_seed)
        return CocoLayoutDataset(d.train_ann, _images_of(d.train_ann, d.train_images), image_ids=val_ids,
                                 on_bad=d.on_bad, check_images=d.check_images)
    return None


def build_datasets(cfg: LayoutConfig, with_val: bool = True,
                   check_train: Callable[[CocoLayoutDataset], None] | None = None
                   ) -> tuple[CocoLayoutDataset, CocoLayoutDataset | None]:
    """Training set (augmented, masks if the model has a mask head) and validation set (plain pages): all of
    ``data.train_ann``, and ``data.val_ann``; or, without a ``data.val_ann``, ``data.train_ann`` less its
    ``data.holdout`` pages, and those pages. ``check_train(train)`` runs as soon as the training set is there, before
    the validation set is read (the run's steps, which need its size: :func:`beit.engine.trainer.check_schedule`); it
    raises to refuse.

    Raises:
        ConfigError: no ``data.train_ann``, a ``data.val_ann`` that is ``data.train_ann`` with ``data.holdout``
            (the holdout would not be used: validation on the training pages), or validation categories that
            differ from training's.
        FileNotFoundError: an annotation file or its image folder is missing (naming the config key).
        LayoutDataError: an annotation file is unusable.
    """
    d = cfg.data
    if not d.train_ann:
        raise ConfigError("data.train_ann", "required: the COCO annotation file to train on")
    _check_split(cfg)
    _check_paths("train", d.train_ann, d.train_images)
    train_ids = None
    if d.holdout and not d.val_ann:
        train_ids, _ = split_image_ids(d.train_ann, d.holdout, d.split_seed)
    train_ds = CocoLayoutDataset(d.train_ann, _images_of(d.train_ann, d.train_images), train=True,
                                 image_ids=train_ids, with_masks=cfg.model.mask_head, min_sizes=d.min_sizes,
                                 max_size=d.max_size, flip_prob=d.flip_prob, crop_prob=d.crop_prob,
                                 crop_size=d.crop_size, seed=cfg.train.seed, on_bad=d.on_bad,
                                 check_images=d.check_images)
    if check_train is not None:
        check_train(train_ds)
    val_ds = build_val_dataset(cfg) if with_val else None
    if val_ds is not None and (val_ds.cat_ids != train_ds.cat_ids or val_ds.class_names != train_ds.class_names):
        val = [f"{i}: {n}" for i, n in zip(val_ds.cat_ids, val_ds.class_names)]
        train = [f"{i}: {n}" for i, n in zip(train_ds.cat_ids, train_ds.class_names)]
        raise ConfigError("data.val_ann", f"categories {val} differ from training's {train} (ids and names must match)")
    return train_ds, val_ds
