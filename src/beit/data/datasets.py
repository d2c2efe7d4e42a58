"""Image datasets that survive real-world folders and are deterministic per (seed, epoch, index).

* ``ImageFolderDataset``: every image under a root at any depth (pre-training needs no labels).
* ``LabeledImageFolder``: ``root/<class>/.../<image>``, like torchvision's ImageFolder.
* ``WebDatasetShards``: webdataset tar shards, split per rank and per DataLoader worker.
* ``TensorImageDataset`` + ``decode_image_folder`` (or ``load_image_folder_to_memory``): small images kept
  decoded in RAM; unreadable files are left out at load and counted as skips of the first epoch.

Images are always handed to transforms as 8-bit RGB PIL images: CMYK, grayscale, palette, alpha and
16-bit images are converted (alpha is composited on white). A file that cannot be decoded (truncated,
not an image) never stops an epoch: the dataset returns the next readable sample instead, logs one
warning naming the file and counts it (``num_skipped``, ``bad_paths``). With DataLoader workers these
counters live in the worker processes; call ``verify()`` in the main process first to find bad files
up front, so that every worker skips them and the main-process counters are complete.

Under torchrun every rank scans, verifies or decodes the same folders: what they all find alike (unreadable
entries, files a verify or an in-memory decode meets, classes left without an image) is said once, by the first
rank (:func:`_first_rank`); a file a rank meets reading its own share of the samples, that rank names.

Augmentation runs inside ``seeded(seed, epoch, index)`` so that each sample is a pure function of
(seed, epoch, index) whatever the number of workers or ranks. ``__getitem__`` also accepts an
``(epoch, index)`` pair, for samplers that carry the epoch into persistent workers (where a
``set_epoch`` call made in the main process is not seen).
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import random
import re
import tarfile
import tempfile
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset, IterableDataset
from tqdm.auto import tqdm

from .._text import first_few, repeated
from .seeding import derive_seed, seeded, seeded_for, stable_index

__all__ = [
    "IMG_EXTENSIONS",
    "spread_indices",
    "FileImages",
    "NoReadableImagesError",
    "MemoryBudgetError",
    "local_world_size",
    "check_memory_budget",
    "classes_left_empty",
    "estimate_decoded_bytes",
    "report_unreadable_classes",
    "unreadable_classes",
    "ScanResult",
    "SkipCounter",
    "collate_files",
    "count_skipped_files",
    "ImageFolderDataset",
    "LabeledImageFolder",
    "RepeatedDataset",
    "TensorImageDataset",
    "WebDatasetShards",
    "class_folders",
    "DecodedFolder",
    "LoadDrops",
    "ReportsLoadDrops",
    "decode_image_folder",
    "decode_image",
    "PIL_MAX_IMAGE_PIXELS",
    "set_max_image_pixels",
    "open_image",
    "decode_image_matching",
    "image_size",
    "list_images",
    "load_image_folder_to_memory",
    "check_writable_folder",
    "not_below",
    "output_stems",
    "scan_images",
    "to_rgb",
]

logger = logging.getLogger(__name__)

#: progress bars of this module's long passes over a folder (verify, decode into memory); False hides them
#: (``beit.engine.logging.quiet_console`` does, for drivers that run many trainings in a row)
SHOW_PROGRESS = True


def _first_rank() -> bool:
    """Whether this process speaks for every rank about what they all find alike in the same folders (a scan's
    unreadable entries, the bad files of a verify or an in-memory decode, the classes left without an image): the
    first rank under torchrun (``RANK`` 0), or a process torchrun did not start. The other ranks keep quiet about
    those (each printed the same warnings); rank 0's console lines are also the run's ``log.txt``
    (``beit.engine.logging.setup_logging``). What a rank meets reading its own share of the samples, it says itself.
    (torchrun's ``RANK`` variable: the data room knows no process group.)"""
    return os.environ.get("RANK", "0") == "0"


IMG_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pbm",
)  # fmt: skip

_EXIF_ORIENTATION = 0x0112
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")

Transform = Callable[[Image.Image], Any]


# --------------------------------------------------------------------------------------- decoding
def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB without the silent mistakes of a bare ``convert("RGB")``.

    ``convert("RGB")`` clips 16-bit pixels to 255 (a white image) and drops alpha, which leaves
    whatever colour hides under transparent pixels (often black); here 16-bit data is rescaled and
    alpha is composited on white (the natural background of documents and icons).
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        arr = np.asarray(img).astype(np.float64)
        if mode in _SIXTEEN_BIT_MODES or (mode == "I" and arr.max(initial=0) > 255):
            arr = arr / 257.0  # 0..65535 -> 0..255
        elif mode == "F" and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        gray = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
        return gray.convert("RGB")
    if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB", "1") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # CMYK, YCbCr, L, 1, P, LAB, HSV


def apply_exif_orientation(img: Image.Image) -> Image.Image:
    """``img`` turned upright by its EXIF Orientation tag (``PIL.ImageOps.exif_transpose``), as
    cameras and phones expect; an image without the tag, or with an EXIF block Pillow cannot parse,
    comes back unchanged (a broken EXIF block must not make a readable photo unreadable)."""
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - malformed EXIF: keep the pixels as stored
        return img
    if orientation in (None, 1):
        return img
    try:
        return ImageOps.exif_transpose(img)
    except Exception as err:  # noqa: BLE001
        logger.debug("cannot apply EXIF orientation %s: %s", orientation, err)
        return img


#: PIL's decompression-bomb limit as it ships (``PIL.Image.MAX_IMAGE_PIXELS``, 89,478,485 pixels: about 9,459 px
#: square): the default of the configs' ``data.max_image_pixels``
PIL_MAX_IMAGE_PIXELS: int = 89_478_485
#: carries the limit to DataLoader workers that start a fresh interpreter (spawn) rather than fork: read on import
MAX_IMAGE_PIXELS_ENV = "BEIT_MAX_IMAGE_PIXELS"


def set_max_image_pixels(pixels: int | None) -> None:
    """Set PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) for every image this process and its
    DataLoader workers decode: an image of more than ``pixels`` pixels is decoded with PIL's
    ``DecompressionBombWarning``, one of more than twice as many is refused (``DecompressionBombError``, skipped
    and named like an unreadable file); ``None``: no limit. The training commands call it with their config's
    ``data.max_image_pixels`` (a tokenizer's ``max_image_pixels``) before any image is read. Forked workers inherit
    it; for spawned ones another value than PIL's default travels in the environment (:data:`MAX_IMAGE_PIXELS_ENV`).

    Raises:
        ValueError: ``pixels`` is not a positive int or None.
    """
    if pixels is not None and (isinstance(pixels, bool) or not isinstance(pixels, int) or pixels <= 0):
        raise ValueError(f"max_image_pixels must be a positive number of pixels or None (no limit), got {pixels!r}")
    Image.MAX_IMAGE_PIXELS = pixels
    if pixels == PIL_MAX_IMAGE_PIXELS:
        os.environ.pop(MAX_IMAGE_PIXELS_ENV, None)
    else:
        os.environ[MAX_IMAGE_PIXELS_ENV] = "none" if pixels is None else str(pixels)


def _max_image_pixels_from_env() -> None:
    """In a spawned DataLoader worker: the limit its parent set (:func:`set_max_image_pixels`)."""
    value = os.environ.get(MAX_IMAGE_PIXELS_ENV, "").strip().lower()
    if value == "none":
        Image.MAX_IMAGE_PIXELS = None
    elif value.isdigit() and int(value) > 0:
        Image.MAX_IMAGE_PIXELS = int(value)


_max_image_pixels_from_env()


def open_image(fp: Any) -> Image.Image:
    """``PIL.Image.open(fp)`` (a path, file or ``io.BytesIO``), whose "cannot identify" error says what is wrong
    without the stream object's repr (``<_io.BytesIO object at 0x...>``): callers name the file themselves, and
    whose decompression-bomb error names the setting that raises the limit.

    Raises:
        PIL.UnidentifiedImageError: not an image Pillow reads (empty, damaged, or another kind of file).
        PIL.Image.DecompressionBombError: more than twice ``PIL.Image.MAX_IMAGE_PIXELS`` pixels.
        OSError: the file cannot be read.
    """
    try:
        return Image.open(fp)
    except UnidentifiedImageError:
        raise UnidentifiedImageError("cannot identify the image format (an empty or damaged file, or not an "
                                     "image)") from None
    except Image.DecompressionBombError as e:
        raise Image.DecompressionBombError(
            f"{e} For large images you trust (scans, pages, maps) raise the limit: data.max_image_pixels=N (a "
            f"tokenizer config's max_image_pixels; now {Image.MAX_IMAGE_PIXELS}: an image above twice it is refused, "
            "above it warned about; null: no limit)") from None


def decode_image(source: str | os.PathLike | bytes, *, exif: bool = True) -> Image.Image:
    """Open and fully decode an image (path or encoded bytes) as RGB; raise on any decode failure.

    ``load()`` is forced here so that a truncated file fails now, inside the dataset's error
    handling, rather than later inside a transform. With ``exif`` (default) the EXIF Orientation
    tag is applied (:func:`apply_exif_orientation`), so camera photos come out upright.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        img = open_image(io.BytesIO(bytes(source)))
        img.load()
    else:
        with open(source, "rb") as f:
            img = open_image(f)
            img.load()
    if exif:
        img = apply_exif_orientation(img)
    return to_rgb(img)


def image_size(source: str | os.PathLike, *, exif: bool = True) -> tuple[int, int]:
    """``(width, height)`` of an image file from its header (no full decode); with ``exif`` (default)
    as :func:`decode_image` returns it, i.e. swapped when the EXIF orientation turns it by 90 degrees.

    Raises:
        OSError: the file cannot be read, or is not an image Pillow reads (``PIL.UnidentifiedImageError``).
        PIL.Image.DecompressionBombError: more than twice ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (the message names
            ``data.max_image_pixels``, as :func:`open_image`'s).
    """
    with open_image(source) as im:
        w, h = im.size
        if exif:
            try:
                orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
            except Exception:  # noqa: BLE001 - malformed EXIF: decode_image keeps the stored pixels
                orientation = 1
            if orientation in (5, 6, 7, 8):
                w, h = h, w
    return w, h


def decode_image_matching(source: str | os.PathLike | bytes, size: tuple[int, int]) -> Image.Image:
    """``decode_image`` for an image whose annotation (mask, boxes) has the pixel size ``size``
    ``(width, height)``: upright by EXIF, unless only the stored pixels have that size (the annotation
    was made on the raw pixels, as tools that ignore EXIF do); then the raw pixels are returned."""
    img = decode_image(source)
    if img.size != tuple(size):
        raw = decode_image(source, exif=False)
        if raw.size == tuple(size):
            return raw
    return img


# --------------------------------------------------------------------------------------- listing
def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def _check_root(root: str | os.PathLike) -> Path:
    path = Path(root).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"image folder does not exist: {str(path)!r}")
    if not path.is_dir():
        raise NotADirectoryError(f"expected a folder of images, got a file: {str(path)!r}")
    return path



class NoReadableImagesError(ValueError, RuntimeError):
    """Every image of a dataset failed to decode (or to transform): a data problem, reported as one line by the
    CLI (a ``ValueError``; also a ``RuntimeError`` as it was before)."""


class _TransformFailed(Exception):
    """A decoded image the transform raised on (its error is ``__cause__``): skipped, counted apart."""


def first_readable(n: int, index: int, is_bad: Callable[[int], bool], read: Callable[[int], Any],
                   mark_bad: Callable[[int, BaseException], None],
                   failures: Callable[[], list[str]], what: str = "read") -> tuple[int, Any]:
    """``(i, read(i))`` for the first sample from ``index`` on (wrapping around the ``n`` samples) that is not
    known bad and reads without an error; each sample whose read raises is passed to ``mark_bad`` and skipped,
    so an epoch never stops on a broken file (an error ``mark_bad`` raises stops the search). The
    replace-the-unreadable-file loop of the CPU datasets and of the device path's ``EncodedImageFiles``.

    Raises:
        NoReadableImagesError: none of the ``n`` samples reads ("none of the n images could be ``what``",
            naming ``failures()``, the first failures).
    """
    for step in range(n):
        i = (index + step) % n
        if is_bad(i):
            continue
        try:
            return i, read(i)
        except Exception as err:  # noqa: BLE001 - any reader error means "unreadable file"
            mark_bad(i, err)
    raise NoReadableImagesError(f"none of the {n} images could be {what}; first failures: {failures()}")


def unreadable_classes(samples: Sequence[tuple[str, int]], classes: Sequence[str], *, num_threads: int = 8
                       ) -> dict[str, list[tuple[str, str]]]:
    """The classes of ``samples`` (``(path, label)``, labels indexing ``classes``) none of whose files decodes, each
    with its files' ``(path, error)``; a class without any sample counts too (with no files).

    The check is honest and cheap: each class's files are fully decoded (:func:`decode_image`, as training does; a
    header read or ``Image.verify()`` passes a truncated JPEG) in order until one decodes, so a healthy set costs one
    decode per class, not a pass over every file; only a class whose files all fail is decoded through. Classes are
    checked in a thread pool.
    """
    by_class: dict[int, list[str]] = {i: [] for i in range(len(classes))}
    for path, label in samples:
        by_class.setdefault(int(label), []).append(path)

    def check(label: int) -> list[tuple[str, str]] | None:
        failures: list[tuple[str, str]] = []
        for path in by_class[label]:
            try:
                decode_image(path)
                return None
            except Exception as err:  # noqa: BLE001 - any decoder error means "unreadable file"
                failures.append((path, f"{type(err).__name__}: {err}"))
        return failures

    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        results = list(pool.map(check, range(len(classes))))
    return {classes[i]: f for i, f in enumerate(results) if f is not None}


def classes_left_empty(samples: Sequence[tuple[str, int]], keep: Iterable[int], classes: Sequence[str],
                       errors: dict[int, str]) -> dict[str, list[tuple[str, str]]]:
    """The classes none of whose samples is among ``keep`` (indices of ``samples``, ``(path, label)``, that were
    read), each with its files' ``(path, error)`` (``errors``: index -> message, "" where none was recorded): the
    form :func:`report_unreadable_classes` takes."""
    kept = {samples[i][1] for i in keep}
    return {name: [(path, errors.get(i, "")) for i, (path, label) in enumerate(samples) if label == c]
            for c, name in enumerate(classes) if c not in kept}


def report_unreadable_classes(root: str | os.PathLike, unreadable: dict[str, list[tuple[str, str]]], *,
                              required: bool, training: bool = True) -> None:
    """Say which classes under ``root`` have no readable image (``unreadable``: :func:`unreadable_classes`' form):
    for a training set (``required``) an error, for a validation set one warning (those classes are missing from
    its metrics; ``training=False``: an evaluation's, which picks no best checkpoint), by the first rank alone under
    torchrun (:func:`_first_rank`: every rank checks the same folder). Nothing happens when ``unreadable`` is empty.

    Raises:
        NoReadableImagesError: ``required`` and some class has no readable image; names each class, its folder,
            how many files it holds and the first one's error.
    """
    if not unreadable:
        return
    shown = []
    for name, failures in unreadable.items():
        folder = os.path.join(str(root), name)
        if failures:
            path, err = failures[0]
            shown.append(f"{name!r} ({folder}: {len(failures)} file{'' if len(failures) == 1 else 's'}, none "
                         f"decodes; {os.path.basename(path)}: {err})")
        else:
            shown.append(f"{name!r} ({folder}: no images)")
    listed = first_few(shown, 5, sep="; ")
    if required:
        raise NoReadableImagesError(
            f"{len(unreadable)} training class{'' if len(unreadable) == 1 else 'es'} without a readable image: "
            f"{listed}. A class with no image would train an output that never sees an example: replace the "
            "broken files, or remove the class folder")
    if not _first_rank():
        return
    one = len(unreadable) == 1
    if not training:
        logger.warning("%d class%s without a readable image: %s; %s missing from the metrics (top-1 / top-5 are over "
                       "the other classes' images; per-class accuracy null)", len(unreadable), "" if one else "es",
                       listed, "it is" if one else "they are")
        return
    logger.warning("%d validation class%s without a readable image: %s; %s missing from the validation metrics "
                   "(best.pt is picked without %s; per-class accuracy null)", len(unreadable), "" if one else "es",
                   listed, "it is" if one else "they are", "it" if one else "them")


class ScanResult(NamedTuple):
    """What :func:`scan_images` found: image ``paths`` (sorted) and the ``skipped`` entries as
    ``(path, reason)``: links that lead nowhere or in a loop, folders that cannot be read."""

    paths: list[str]
    skipped: list[tuple[str, str]]


def _dir_key(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _os_reason(path: str) -> str:
    try:
        os.stat(path)
    except OSError as err:
        return f"{type(err).__name__}: {err.strerror or err}"
    return "not a regular file"


def scan_images(
    root: str | os.PathLike,
    *,
    recursive: bool = True,
    extensions: Sequence[str] = IMG_EXTENSIONS,
) -> ScanResult:
    """Image files under ``root``, visiting each real directory once.

    Links are followed, but a directory already visited (a link to itself, to a parent or to a
    folder listed elsewhere) is not entered again, so no image is listed twice through a link loop.
    Real folders are walked before linked ones, so an image reachable both ways is listed under
    its real path, whatever the order of the file system. An entry that cannot be read (dangling
    link, file link loop, folder without permission) is skipped and returned in ``skipped``.
    """
    path = _check_root(root)
    exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    found: list[tuple[str, str]] = []
    skipped: list[tuple[str, str]] = []
    visited: set[tuple[int, int]] = set()
    root_key = _dir_key(str(path))
    if root_key is not None:
        visited.add(root_key)
    pending: deque[str] = deque([str(path)])  # real folders first, breadth-first
    links: deque[str] = deque()  # linked folders, entered once the real tree is listed
    while pending or links:
        if not pending:
            link = links.popleft()
            key = _dir_key(link)
            if key is None:
                skipped.append((link, _os_reason(link)))
                continue
            if key in visited:
                logger.debug("not entering %s: its folder is already listed", link)
                continue
            visited.add(key)
            pending.append(link)
            continue
        folder = pending.popleft()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as err:
            skipped.append((folder, f"{type(err).__name__}: {err.strerror or err}"))
            continue
        for entry in entries:
            if _is_hidden(entry.name):
                continue
            try:
                is_link = entry.is_symlink()
                is_dir = entry.is_dir()  # follows links; False for a dangling link or a link loop
            except OSError as err:
                skipped.append((entry.path, f"{type(err).__name__}: {err.strerror or err}"))
                continue
            if is_dir:
                if not recursive:
                    continue
                if is_link:
                    links.append(entry.path)
                    continue
                key = _dir_key(entry.path)
                if key is None or key in visited:
                    continue
                visited.add(key)
                pending.append(entry.path)
            elif entry.name.lower().endswith(exts):
                try:
                    ok = entry.is_file() if not is_link else os.path.isfile(entry.path)
                except OSError:
                    ok = False
                if not ok:
                    skipped.append((entry.path, _os_reason(entry.path)))
                    continue
                found.append((Path(entry.path).relative_to(path).as_posix(), entry.path))
    found.sort()
    skipped.sort()
    return ScanResult([full for _, full in found], skipped)


def list_images(
    root: str | os.PathLike,
    *,
    recursive: bool = True,
    extensions: Sequence[str] = IMG_EXTENSIONS,
) -> list[str]:
    """Sorted paths of the images under ``root`` (by relative path, so the order is the same on
    every filesystem and machine). Hidden files and folders (``.*``, ``__MACOSX``) are ignored:
    they are mostly OS metadata such as macOS ``._x.jpg`` files that look like broken images.
    Each real directory is visited once (link loops are not followed twice); entries that cannot
    be read are skipped with one warning naming them (see :func:`scan_images`).
    """
    result = scan_images(root, recursive=recursive, extensions=extensions)
    _warn_skipped_entries(root, result.skipped)
    return result.paths


def _warn_skipped_entries(root: str | os.PathLike, skipped: Sequence[tuple[str, str]]) -> None:
    """One warning naming the entries a scan of ``root`` could not read, if any; by the first rank alone under
    torchrun (:func:`_first_rank`: every rank scans the same folder)."""
    if skipped and _first_rank():
        logger.warning("skipped %d unreadable entries under %s: %s", len(skipped), root,
                       first_few([f"{p} ({why})" for p, why in skipped], 10, sep="; "))


def _unpack_index(index: int | tuple[int, int], default_epoch: int, length: int) -> tuple[int, int]:
    if isinstance(index, (tuple, list)):
        epoch, index = int(index[0]), int(index[1])
    else:
        epoch, index = default_epoch, int(index)
    if index < 0:
        index += length
    if not 0 <= index < length:
        raise IndexError(f"index {index} out of range for a dataset of {length} samples")
    return epoch, index


# --------------------------------------------------------------------------------------- folders
_SKIP_SLOTS = 1025  # slot 0: the main process; 1 + worker id % 1024: DataLoader workers


def _skip_slot() -> int:
    info = torch.utils.data.get_worker_info()
    return 0 if info is None else 1 + info.id % (_SKIP_SLOTS - 1)


_EPOCH_RING = 64  # per-epoch skip counts are kept for the last 64 epochs a process has counted


class SkipCounter:
    """Skipped-sample count shared by a dataset and its DataLoader workers (shared memory, one row per
    process so that no two processes write the same number), in all and per epoch. ``total()`` in the main
    process is the sum over all workers, fork or spawn, persistent or not; each rank sums its own.

    Counts are kept per epoch because the engine's loader workers run ahead into the next epoch while the
    current one is still being trained on. Each row has 64 epoch cells, reused round-robin: a cell is tagged
    with the epoch it counts and reset by its own process when that process first counts a later epoch there,
    so ``total(epoch)`` is exact for any of the last 64 epochs (the engine reads an epoch when it ends).
    """

    def __init__(self) -> None:
        self.counts = torch.zeros(_SKIP_SLOTS, _EPOCH_RING + 1, dtype=torch.int64).share_memory_()  # last: all
        self.tags = torch.full((_SKIP_SLOTS, _EPOCH_RING), -1, dtype=torch.int64).share_memory_()

    def add(self, n: int = 1, epoch: int = 0) -> None:
        """Count ``n`` skips of samples of ``epoch`` in the calling process (main process or DataLoader worker)."""
        row, cell = _skip_slot(), int(epoch) % _EPOCH_RING
        if int(self.tags[row, cell]) != int(epoch):  # this process's cell held an older epoch: start it again
            self.counts[row, cell] = 0
            self.tags[row, cell] = int(epoch)
        self.counts[row, cell] += n
        self.counts[row, _EPOCH_RING] += n

    def total(self, epoch: int | None = None) -> int:
        """Skips counted so far by this process and all its DataLoader workers: of ``epoch`` (one of the last
        64 counted), or of all epochs."""
        if epoch is None:
            return int(self.counts[:, _EPOCH_RING].sum())
        cell = int(epoch) % _EPOCH_RING
        return int(self.counts[:, cell][self.tags[:, cell] == int(epoch)].sum())


def count_skipped_files(seen: torch.Tensor, n: int, index: int, found: int, epoch: int, counter: SkipCounter
                        ) -> None:
    """Count in ``counter`` (of ``epoch``) the files a request of sample ``index`` passed over to reach the
    replacement ``found`` (``index`` up to ``found``, wrapping at ``n`` samples: every one unreadable), each file
    once per epoch:
    ``seen`` (shared int64 ``[n]``, -1 at first) holds the last epoch each file was counted in. So an epoch's
    count is the number of distinct files skipped in it, as the warnings name them (a request that passes over
    two bad files counts two; a bad file met again by another request of the epoch is not counted again)."""
    j = index
    while j != found:
        if int(seen[j]) != int(epoch):
            seen[j] = int(epoch)
            counter.add(epoch=epoch)
        j = (j + 1) % n


class _RobustImageFiles(Dataset):
    """Shared machinery: decode with replacement on failure, counters, seeding, set_epoch.

    A sample whose file cannot be decoded, or whose image the transform cannot handle, is replaced by
    the next usable one; the file is marked bad for every worker (shared memory) and the replacement
    is counted in ``skipped_count()`` (summed over DataLoader workers: the engine logs it per epoch).
    """

    _MAX_TRANSFORM_FAILURES_IN_A_ROW = 8

    def __init__(self, samples: list[tuple[str, int]], transform: Transform | None, seed: int) -> None:
        self.samples = samples
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0
        self._bad: dict[int, str] = {}  # index -> error message, per process
        self._bad_mask = torch.zeros(len(samples), dtype=torch.bool).share_memory_()  # seen by every worker
        self._skips = SkipCounter()
        self._skip_seen = torch.full((len(samples),), -1, dtype=torch.int64).share_memory_()  # count_skipped_files

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of ``epoch`` (call before creating the DataLoader iterator)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_skipped(self) -> int:
        """How many distinct files were found unreadable so far (by this process or its workers)."""
        return int(self._bad_mask.sum())

    @property
    def bad_paths(self) -> list[str]:
        """Paths of the files found unreadable so far (by this process or its workers), in dataset order."""
        return [self.samples[i][0] for i in self._bad_mask.nonzero().flatten().tolist()]

    def skipped_count(self, epoch: int | None = None) -> int:
        """Files skipped so far because they were unreadable or untransformable (each once in every epoch
        that meets it: :func:`count_skipped_files`), summed over this process and its DataLoader workers; those
        of ``epoch`` only when given."""
        return self._skips.total(epoch)

    def _mark_bad(self, index: int, err: BaseException, stage: str = "decode",
                  outcome: str = "a replacement sample is used", warn: bool = True) -> None:
        """Remember sample ``index`` as bad (for every worker) and warn once naming it and what happens
        instead (``outcome``: replaced by the next sample, or, for a folder decoded into memory, left out).
        ``warn=False``: remember it without the warning (a pass every rank makes over the whole folder, on a rank
        other than the first: :func:`_first_rank`)."""
        self._bad_mask[index] = True
        if index not in self._bad:
            self._bad[index] = f"{type(err).__name__}: {err}"
            if not warn:
                return
            what = "unreadable image" if stage == "decode" else "image the transform cannot handle"
            logger.warning(
                "skipping %s %s (%s: %s); %s",
                what,
                self.samples[index][0],
                type(err).__name__,
                err,
                outcome,
            )

    def _first_failures(self) -> list[str]:
        return [f"{self.samples[i][0]}: {msg}" for i, msg in sorted(self._bad.items())[:3]]

    def _get(self, index: int, epoch: int) -> tuple[Any, int]:
        """``(transform(image), target)`` of sample ``index``, or of the next usable one (counted).

        The transform is guarded like decoding: an image it fails on (e.g. smaller than a crop) is
        skipped and counted. Several failures in a row on different files are a broken transform,
        not bad files: that error is raised.
        """
        failures_in_a_row = 0

        def read(i: int) -> Any:
            img = decode_image(self.samples[i][0])  # a decoder error means "unreadable file"
            try:
                return self._transformed(img, epoch, index)
            except Exception as err:  # noqa: BLE001
                raise _TransformFailed(err) from err

        def mark_bad(i: int, err: BaseException) -> None:
            nonlocal failures_in_a_row
            if not isinstance(err, _TransformFailed):
                self._mark_bad(i, err)
                return
            failures_in_a_row += 1
            if failures_in_a_row >= self._MAX_TRANSFORM_FAILURES_IN_A_ROW:
                cause = err.__cause__
                raise RuntimeError(
                    f"the transform failed on {failures_in_a_row} images in a row (last {self.samples[i][0]}: "
                    f"{type(cause).__name__}: {cause}): the transform is broken, not the files"
                ) from cause
            self._mark_bad(i, err.__cause__, stage="transform")

        i, out = first_readable(len(self.samples), index, lambda j: bool(self._bad_mask[j]), read, mark_bad,
                                self._first_failures, what="decoded and transformed")
        if i != index:
            count_skipped_files(self._skip_seen, len(self.samples), index, i, epoch, self._skips)
        return out, self.samples[i][1]

    def verify(self, num_threads: int = 8, progress: bool = False,
               outcome: str = "a replacement sample is used") -> list[str]:
        """Decode every file once (thread pool) and remember the bad ones; return their paths.

        Run it in the main process before building the DataLoader: workers then inherit the list
        and skip those files silently, and ``num_skipped`` / ``bad_paths`` are complete here. ``outcome`` ends
        each bad file's warning: what happens to it (replaced by the next sample; a caller that leaves the bad
        files out, as a verified val set does, says so). Under torchrun every rank verifies the whole set: the
        warnings come from the first rank alone (:func:`_first_rank`); every rank remembers the bad files.
        """
        warn = _first_rank()

        def check(i: int) -> tuple[int, BaseException | None]:
            try:
                decode_image(self.samples[i][0])
                return i, None
            except Exception as err:  # noqa: BLE001
                return i, err

        with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
            results: Iterable = pool.map(check, range(len(self.samples)))
            if progress and SHOW_PROGRESS:
                results = tqdm(results, total=len(self.samples), desc="verify images")
            for i, err in results:
                if err is not None:
                    self._mark_bad(i, err, outcome=outcome, warn=warn)
        return self.bad_paths

    def _transformed(self, img: Image.Image, epoch: int, index: int) -> Any:
        if self.transform is None:
            return img
        with seeded_for(self.transform, self.seed, epoch, index):
            return self.transform(img)


class ImageFolderDataset(_RobustImageFiles):
    """All images under ``root`` at any depth, no class layout needed; yields ``transform(img)``.

    Args:
        root: folder to scan.
        transform: applied to the RGB PIL image inside ``seeded(seed, epoch, index)`` (unless marked
            ``beit.data.seeding.deterministic``: an eval transform draws nothing).
        recursive: scan sub-folders too.
        extensions: file name endings to accept (case-insensitive).
        seed: base seed of the augmentation streams.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Transform | None = None,
        *,
        recursive: bool = True,
        extensions: Sequence[str] = IMG_EXTENSIONS,
        seed: int = 0,
    ) -> None:
        self.root = str(root)
        scan = scan_images(root, recursive=recursive, extensions=extensions)
        _warn_skipped_entries(root, scan.skipped)
        self.unreadable_entries: list[tuple[str, str]] = scan.skipped
        paths = scan.paths
        if not paths:
            raise ValueError(
                f"no images found under {self.root!r} (recursive={recursive}, extensions={tuple(extensions)})"
            )
        super().__init__([(p, -1) for p in paths], transform, seed)

    @property
    def paths(self) -> list[str]:
        return [p for p, _ in self.samples]

    def __getitem__(self, index: int | tuple[int, int]) -> Any:
        epoch, index = _unpack_index(index, self.epoch, len(self))
        return self._get(index, epoch)[0]

    def __repr__(self) -> str:
        return f"ImageFolderDataset(root={self.root!r}, n={len(self)}, seed={self.seed}, epoch={self.epoch})"


def find_classes(root: str | os.PathLike) -> list[str]:
    """Sorted names of the non-hidden sub-folders of ``root`` (links to folders count).

    Entries that cannot be read (a file link loop, a dangling link) are not classes: they are skipped
    with a warning naming them. A link back to ``root`` or one of its parents is not a class either
    (it would hold every image again).
    """
    path = _check_root(root)
    real_root = os.path.realpath(path)
    names: list[str] = []
    skipped: list[tuple[str, str]] = []
    for entry in os.scandir(path):
        if _is_hidden(entry.name):
            continue
        try:
            is_dir = entry.is_dir()
        except OSError as err:
            skipped.append((entry.path, f"{type(err).__name__}: {err.strerror or err}"))
            continue
        if not is_dir:
            if entry.is_symlink() and not os.path.exists(entry.path):
                skipped.append((entry.path, _os_reason(entry.path)))
            continue
        target = os.path.realpath(entry.path)
        if real_root == target or real_root.startswith(target.rstrip(os.sep) + os.sep):
            skipped.append((entry.path, f"link to {target}, which contains the image folder itself"))
            continue
        names.append(entry.name)
    _warn_skipped_entries(root, sorted(skipped))
    return sorted(names)


def class_folders(root: str | os.PathLike) -> list[str]:
    """The class sub-folders of ``root`` (:func:`find_classes`), which must be in the ImageFolder layout
    ``root/<class>/<image>``: one sub-folder per class.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        NotADirectoryError: ``root`` is a file.
        ValueError: ``root`` has no class sub-folders. The message names it and says what it holds instead:
            images directly in it (a single class's folder, or unlabelled images), other files, or nothing.
    """
    names = find_classes(root)
    if names:
        return names
    images: list[str] = []
    others: list[str] = []
    for entry in sorted(os.scandir(_check_root(root)), key=lambda e: e.name):
        if _is_hidden(entry.name):
            continue
        (images if entry.name.lower().endswith(IMG_EXTENSIONS) else others).append(entry.name)
    layout = "the ImageFolder layout <dir>/<class>/<image> is needed, one sub-folder per class"
    if images:
        more = f" (and {len(others)} other files)" if others else ""
        raise ValueError(f"{str(root)!r} has {len(images)} images but no class sub-folders: {layout}; found "
                         f"{len(images)} images directly in it ({first_few(images, 3)}){more}. If it holds the "
                         "images of one class, give its parent folder")
    found = f"{len(others)} files that are not images ({first_few(others, 3)})" if others else "nothing: it is empty"
    raise ValueError(f"{str(root)!r} has no class sub-folders and no images: {layout}; found {found}")


class LabeledImageFolder(_RobustImageFiles):
    """``root/<class>/**/<image>`` with integer labels; yields ``(transform(img), label)``.

    Args:
        root: folder with one sub-folder per class.
        transform: applied to the RGB PIL image inside ``seeded(seed, epoch, index)`` (unless marked
            ``beit.data.seeding.deterministic``: an eval transform draws nothing).
        class_names: the classes in label order; must name exactly the sub-folders. Defaults to
            the sorted sub-folder names (torchvision's convention).
        extensions: file name endings to accept (case-insensitive).
        seed: base seed of the augmentation streams.
        allow_empty: a class folder without images is kept as a class without samples (an evaluation set, whose
            report gives such a class no accuracy), not refused.

    Raises:
        FileNotFoundError / NotADirectoryError: ``root`` does not exist / is a file.
        ValueError: ``root`` has no class sub-folders (:func:`class_folders`: the message says what it holds),
            ``class_names`` gives a name more than once or does not match the sub-folders, or a class folder has no
            images (unless ``allow_empty``).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Transform | None = None,
        class_names: Sequence[str] | None = None,
        *,
        extensions: Sequence[str] = IMG_EXTENSIONS,
        seed: int = 0,
        allow_empty: bool = False,
    ) -> None:
        self.root = str(root)
        try:
            folders = class_folders(root)
        except ValueError as e:
            raise ValueError(f"{e} (ImageFolderDataset reads images without labels)") from None
        if class_names is None:
            class_names = folders
        else:
            class_names = [str(c) for c in class_names]
            if len(set(class_names)) < len(class_names):
                raise ValueError(f"class_names has names given more than once: {repeated(class_names, 5)}")
            missing = sorted(set(class_names) - set(folders))
            extra = sorted(set(folders) - set(class_names))
            if missing or extra:
                raise ValueError(
                    f"class_names does not match the sub-folders of {self.root!r}: "
                    f"no folder for {missing}; folders not in class_names: {extra}"
                )
        self.classes: list[str] = list(class_names)
        self.class_to_idx: dict[str, int] = {c: i for i, c in enumerate(self.classes)}
        # one scan of the whole tree, so that a link inside a class folder to the root, to itself or
        # to another class is not followed twice: every image is listed once, under its real class
        scan = scan_images(root, recursive=True, extensions=extensions)
        _warn_skipped_entries(root, scan.skipped)
        self.unreadable_entries: list[tuple[str, str]] = scan.skipped
        by_class: dict[str, list[str]] = {c: [] for c in self.classes}
        for p in scan.paths:
            parts = Path(p).relative_to(Path(root).expanduser()).parts
            if len(parts) > 1 and parts[0] in by_class:
                by_class[parts[0]].append(p)
        samples: list[tuple[str, int]] = []
        empty: list[str] = []
        for c in self.classes:
            if not by_class[c]:
                empty.append(c)
            samples.extend((p, self.class_to_idx[c]) for p in by_class[c])
        if empty and not allow_empty:
            raise ValueError(
                f"class folders without images under {self.root!r}: {empty} "
                f"(extensions={tuple(extensions)}); put images in them or remove them (class_names must list every "
                "class folder: leaving one out of it is refused too)"
            )
        super().__init__(samples, transform, seed)

    @property
    def targets(self) -> list[int]:
        return [t for _, t in self.samples]

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[Any, int]:
        epoch, index = _unpack_index(index, self.epoch, len(self))
        return self._get(index, epoch)

    def __repr__(self) -> str:
        return (
            f"LabeledImageFolder(root={self.root!r}, n={len(self)}, classes={len(self.classes)}, "
            f"seed={self.seed}, epoch={self.epoch})"
        )


# --------------------------------------------------------------------------------------- one result per file
class FileImages(Dataset):
    """Images of a list of files for commands that write one result per file (predict, encode).

    Unlike the training datasets, a file is never replaced by its neighbour: ``__getitem__(i)``
    returns ``{"index": i, "image": transform(img) | None, "error": "" | "Type: message"}``, and
    :func:`collate_files` keeps the indices with the images, so results stay aligned with the files
    whatever fails, in any DataLoader worker. Decoding applies EXIF orientation.

    Args:
        paths: the files, in output order.
        transform: applied to the RGB PIL image (must return a tensor of one fixed shape).
    """

    def __init__(self, paths: Sequence[str | os.PathLike], transform: Transform) -> None:
        self.paths = [str(p) for p in paths]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            img = decode_image(self.paths[index])
        except Exception as err:  # noqa: BLE001 - any decoder error means "unreadable file"
            return {"index": index, "image": None, "error": f"unreadable: {type(err).__name__}: {err}"}
        try:
            return {"index": index, "image": self.transform(img), "error": ""}
        except Exception as err:  # noqa: BLE001
            return {"index": index, "image": None, "error": f"transform failed: {type(err).__name__}: {err}"}


def collate_files(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch :class:`FileImages` items: ``index`` (int64 ``[k]``) and ``image`` (``[k, ...]``, or None
    when k = 0) of the files that worked, and ``failed``: ``[(index, error), ...]`` of the others."""
    good = [b for b in batch if not b["error"]]
    return {
        "index": torch.tensor([b["index"] for b in good], dtype=torch.long),
        "image": torch.stack([b["image"] for b in good]) if good else None,
        "failed": [(b["index"], b["error"]) for b in batch if b["error"]],
    }


def check_writable_folder(folder: str | os.PathLike, label: str) -> None:
    """Refuse, before the work whose results go there, a ``folder`` that outputs cannot be written into (a read-only
    folder, ``/proc``, another user's): a file is created in it and removed; where it does not exist yet (the
    command makes it), in its nearest existing parent. ``label`` starts the message (``"--out /proc/x.png"``).

    Raises:
        ValueError: ``"<label>: cannot write in <folder> (<reason>): give a folder you can write to"`` (naming the
            missing folder that would be made there too); ``"<label>: <path> is a file, not a folder"`` where a
            file stands in the folder's path; a link in the path that points nowhere (naming both).
    """
    target = Path(os.path.abspath(os.fspath(folder)))
    dangling = next((p for p in (target, *target.parents) if p.is_symlink() and not p.exists()), None)
    if dangling is not None:  # mkdir would fail there after the work ("File exists")
        raise ValueError(f"{label}: {dangling} is a link to {os.readlink(dangling)}, which does not exist")
    existing = next((p for p in (target, *target.parents) if p.exists()), None)
    if existing is None:
        return
    if not existing.is_dir():
        raise ValueError(f"{label}: {existing} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".beit-write-check-", dir=existing)
    except OSError as e:  # os.access would not do: root "may" write in /proc, and no file is made there
        reason = e.strerror or type(e).__name__
        if e.errno == errno.ENOENT:  # /proc, /sys: a folder that exists but takes no new files
            reason = f"it takes no new files: {reason}"
        made = "" if existing == target else f", where {target} would be made"
        raise ValueError(f"{label}: cannot write in {existing}{made} ({reason}): give a folder you can write "
                         "to") from None
    os.close(fd)
    os.unlink(probe)


def output_stems(paths: Sequence[str | os.PathLike], suffixes: Sequence[str] = (".png",),
                 out_dir: str | os.PathLike | None = None, manifest: str | None = None) -> list[str]:
    """One distinct output name (no suffix) per input file, for commands writing a file per input (segment and
    layout predict write ``<name><suffix>`` for each of ``suffixes``): the file's name without its extension
    (``a.jpg``, ``b.png``, ``c.jpeg`` -> ``a``, ``b``, ``c``); where a stem repeats in other folders, the folder
    relative to the inputs' common folder (``/`` as ``__``) and the stem (``x/a.jpg``, ``y/a.png`` -> ``x__a``,
    ``y__a``). The input's extension is never part of the name.

    Raises:
        ValueError: two inputs would get the same name (``a.jpg`` and ``a.png`` in one folder, or a file given
            twice), naming them, rather than one result silently overwriting the other; or (``out_dir`` given)
            an output would be written over one of the inputs (``--out`` is the pages' own folder and an output
            name is an input's name), naming both; or (``out_dir`` and ``manifest`` given) an output would replace
            a file already there while ``out_dir`` holds no ``manifest`` (the file an earlier run of the command
            writes, e.g. ``index.json``): the files are someone else's (ground-truth masks beside the images); or
            (``out_dir`` given) no file can be written there (:func:`check_writable_folder`), before the work.
    """
    full = [os.path.abspath(os.fspath(p)) for p in paths]
    stems = [Path(p).stem for p in full]
    counts = Counter(stems)
    base = os.path.commonpath([os.path.dirname(p) for p in full]) if full else ""
    names = []
    for p, stem in zip(full, stems):
        rel = os.path.relpath(os.path.dirname(p), base) if counts[stem] > 1 else os.curdir
        names.append(stem if rel == os.curdir else f"{rel.replace(os.sep, '__')}__{stem}")
    by_name: dict[str, list[str]] = {}
    for p, name in zip(full, names):
        by_name.setdefault(name, []).append(p)
    clashes = [(name, ps) for name, ps in by_name.items() if len(ps) > 1]
    if clashes:
        shared = [(name, distinct) for name, ps in clashes if len(distinct := list(dict.fromkeys(ps))) > 1]
        said = [f"files given more than once: {repeated(full, 5)}"] if len(set(full)) < len(full) else []
        if shared:
            said.append(first_few([f"{' and '.join(repr(p) for p in ps)} would share "
                                   f"{' and '.join(name + s for s in suffixes)}" for name, ps in shared], 5, sep="; "))
        raise ValueError(f"{len(clashes)} output name(s) taken by more than one input: {'; '.join(said)}. The outputs "
                         "are named by the file name without its extension, so one result would overwrite another: "
                         "give each file once; of two files of one name, rename one (or move it to another folder) "
                         "or predict it in a separate run with another output folder")
    if out_dir is not None:
        out = os.fspath(out_dir)
        check_writable_folder(out, f"--out {out}")
        outputs = [(os.path.join(out, n + s), p) for n, p in zip(names, full) for s in suffixes]  # (file, its input)
        inputs = {os.path.realpath(p) for p in full}
        over = [(o, p) for o, p in outputs if os.path.realpath(o) in inputs]
        if over:
            shown = first_few([f"{o!r} (for {p!r})" for o, p in over], 3, sep="; ")
            raise ValueError(f"{len(over)} output file(s) would be written over input images: {shown}. Give --out "
                             "a folder of its own (not the images' folder)")
        folders = [o for o, _ in outputs if os.path.isdir(o)]
        if folders:  # no run replaces a folder with its file: it failed there, after the outputs before it
            raise ValueError(f"--out {out}: {len(folders)} folder(s) stand where this command writes "
                             f"files ({first_few([repr(t) for t in folders], 3)}): move them away or give --out a "
                             "folder of its own")
        there = ([o for o, _ in outputs if os.path.lexists(o)]
                 if manifest is not None and not os.path.exists(os.path.join(out, manifest)) else [])
        if there:
            raise ValueError(f"--out {out} already holds {len(there)} file(s) of the names this "
                             f"command writes ({first_few([repr(t) for t in there], 3)}) and no {manifest} "
                             "of an earlier run: they are not its outputs, so they are not replaced; give --out "
                             "a folder of its own")
    return names


def names_folder(out: str | os.PathLike) -> bool:
    """Whether an output path ``out`` names a folder: an existing one, or one said with a trailing ``/`` (``Path()``
    drops it, and ``results/`` of a folder not made yet became a file named ``results``)."""
    return Path(out).is_dir() or os.fspath(out).endswith(("/", os.sep))


def lies_within(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether ``path`` is ``folder`` or inside it (``~`` expanded, links resolved; neither need exist yet); False
    when either cannot be resolved. Where an output would land among the images a run reads."""
    try:
        return Path(path).expanduser().resolve().is_relative_to(Path(folder).expanduser().resolve())
    except (OSError, RuntimeError):  # a link loop, an unreadable part of the path
        return False


def not_below(files: Iterable[str | os.PathLike], folder: str | os.PathLike,
              out_dir: str | os.PathLike) -> list[str | os.PathLike]:
    """``files`` (found under ``folder``) without those inside ``out_dir`` when that output folder lies below
    ``folder``: an earlier run's outputs written there are not inputs (segment and layout predict read a folder
    of images and write into one, possibly inside it)."""
    root, out = Path(folder).resolve(), Path(out_dir).resolve()
    if out == root or not out.is_relative_to(root):
        return list(files)
    return [f for f in files if not Path(f).resolve().is_relative_to(out)]


# --------------------------------------------------------------------------------------- shards
_WDS_META = re.compile(r"__[^/]*__($|/)")  # webdataset's names of metadata members, left out as it does
_END_ATTR = "_beit_end_of_headers"  # the header error that ended a tar's members (see _EndCheckedTarInfo)


class _EndCheckedTarInfo(tarfile.TarInfo):
    """A ``TarInfo`` that notes on its ``TarFile`` why the members ended: ``tarfile`` stops silently at a zero block
    (the end-of-archive marker, ``EOFHeaderError``) and also, past the first member, where the data ends
    (``EmptyHeaderError``), breaks off inside a header (``TruncatedHeaderError``) or a header is garbage
    (``InvalidHeaderError``): a shard cut short between members read as a shorter one."""

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.HeaderError as e:
            setattr(tarfile_, _END_ATTR, e)
            raise


def _tar_end_reason(error: Exception | None, offset: int) -> str:
    """Why ``tarfile`` stopped reading members at byte ``offset``, short of the end-of-archive marker, in words."""
    if isinstance(error, tarfile.InvalidHeaderError):
        return f"a damaged member header at byte {offset}, before the tar's end-of-archive marker"
    inside = " inside a member's header" if isinstance(error, tarfile.TruncatedHeaderError) else ""
    return f"the data ends at byte {offset}{inside}, before the tar's end-of-archive marker: cut short?"


class WebDatasetShards(IterableDataset):
    """Samples from webdataset tar shards (``<key>.jpg|png|webp`` [+ ``<key>.cls``]) for large sets.

    Yields what the folder datasets yield: ``transform(img)``, or ``(transform(img), label)`` when
    ``label_key`` is set. Shards are (optionally) shuffled per epoch with the same order on every
    rank, then split by rank (``wds.split_by_node``) and by DataLoader worker
    (``wds.split_by_worker``), so every shard is read exactly once per epoch across the job. Each
    sample is augmented inside ``seeded(seed, epoch, hash(__key__))``: it does not depend on which
    rank or worker reads it. Not resumable mid-epoch, and ranks can get different sample counts
    when shards differ in size (use equal-size shards, at least ``world_size * num_workers`` of them).
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        transform: Transform | None = None,
        *,
        label_key: str | None = None,
        image_keys: Sequence[str] = ("jpg", "jpeg", "png", "webp"),
        shuffle_shards: bool = True,
        shuffle_buffer: int = 0,
        seed: int = 0,
        num_samples: int | None = None,
    ) -> None:
        if isinstance(urls, (str, os.PathLike)):
            import braceexpand

            self.urls = list(braceexpand.braceexpand(str(urls)))
            self.pattern = str(urls)
        else:
            self.urls = [str(u) for u in urls]
            self.pattern = first_few(self.urls, 3)
        if not self.urls:
            raise ValueError("WebDatasetShards needs at least one shard url")
        for u in self.urls:
            if "://" not in u and not u.startswith("pipe:") and not os.path.exists(u):
                raise FileNotFoundError(f"webdataset shard does not exist: {u!r}")
        self.transform = transform
        self.label_key = label_key
        self.image_keys = tuple(k.lower() for k in image_keys)
        self.shuffle_shards = shuffle_shards
        self.shuffle_buffer = int(shuffle_buffer)
        self.seed = int(seed)
        self.epoch = 0
        # set_epoch's value, shared with the DataLoader's workers: a persistent worker keeps the dataset copy it was
        # started with, so each pass (__iter__) takes its epoch from here
        self._shared_epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        self.num_skipped = 0  # in this process (see skipped_count() for the sum over workers)
        self.bad_keys: list[str] = []
        self.num_samples = num_samples
        self._skips = SkipCounter()
        self._bad_shards = SkipCounter()  # shards whose reading failed, per epoch, over workers

    def skipped_count(self, epoch: int | None = None) -> int:
        """Samples skipped so far (unreadable, unlabelled or untransformable), summed over this
        process and its DataLoader workers; those of ``epoch`` only when given."""
        return self._skips.total(epoch)

    @property
    def skip_counter(self) -> SkipCounter:
        """The shared per-epoch skip counter (a device pipeline adds its decoder's failures to it)."""
        return self._skips

    def __len__(self) -> int:
        """Nominal samples of one epoch over all ranks (a stream cannot count itself: ``num_samples``)."""
        if self.num_samples is None:
            raise TypeError("WebDatasetShards has no length unless num_samples= (images per epoch) is given")
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Select the shard order, augmentation stream and skip count of ``epoch`` (call before creating the
        DataLoader iterator; persistent workers see it too)."""
        self.epoch = int(epoch)
        self._shared_epoch[0] = self.epoch

    def _shards_for_epoch(self) -> list[str]:
        urls = list(self.urls)
        if self.shuffle_shards:
            random.Random(derive_seed(self.seed, self.epoch, 0)).shuffle(urls)  # same on every rank
        return urls

    def _skip(self, key: str, why: str) -> None:
        self.num_skipped += 1
        self._skips.add(epoch=self.epoch)
        self.bad_keys.append(key)
        logger.warning("skipping webdataset sample %s: %s", key, why)

    def _shard_failed(self, exn: Exception, url: str | None = None) -> bool:
        """The handler of shard errors (a shard that cannot be opened, a tar that is not one, one that breaks off
        or is cut short, :meth:`_shard_files`): one warning through beit's logger naming the shard (``url``, else
        the one webdataset appends to the error's args), counted as a skipped file (of this epoch) and as a failed
        shard; reading goes on with the next shard (returns True)."""
        args = list(getattr(exn, "args", ()))
        if url is None:
            url = next((a for a in reversed(args) if isinstance(a, str) and a in self.urls), "?")
        reason = str(args[0]).split(" @ ")[0] if args else ""  # webdataset appends " @ <stream object>"
        self.num_skipped += 1
        self._skips.add(epoch=self.epoch)
        self._bad_shards.add(epoch=self.epoch)
        self.bad_keys.append(url)
        logger.warning("skipping webdataset shard %s (%s: %s): it cannot be read from there on", url,
                       type(exn).__name__, reason)
        return True

    def _shard_files(self, sources: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """The files of each opened shard (``{"url", "stream"}``, webdataset's ``url_opener``), as webdataset's
        ``tar_file_expander`` gives them to ``group_by_keys``: ``{"fname", "data", "__url__"}``, then ``{}`` at the
        end of each shard (a sample never joins files of two shards). Unlike it, a shard that breaks off is one
        failure (:meth:`_shard_failed`, named once: webdataset's reader reported a cut inside a member twice, the
        first time without the shard's name), and so is a tar cut short between members, which ``tarfile`` ends
        silently: without its end-of-archive marker (:class:`_EndCheckedTarInfo`). The files read before the
        failure are kept."""
        for source in sources:
            url, stream = source["url"], source["stream"]
            try:
                tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndCheckedTarInfo)
                for member in tar:
                    name = member.name
                    if member.isreg() and name and not _WDS_META.match(name):
                        yield {"fname": name, "data": tar.extractfile(member).read(), "__url__": url}
                    tar.members = []  # a stream's members are not kept
                end = getattr(tar, _END_ATTR, None)
                if not isinstance(end, tarfile.EOFHeaderError):
                    raise tarfile.ReadError(_tar_end_reason(end, tar.offset))
            except Exception as exn:  # noqa: BLE001 - any failure of a shard: named, counted, the next shard read
                self._shard_failed(exn, url)
            finally:
                close = getattr(stream, "close", None)
                if close is not None:
                    with contextlib.suppress(Exception):
                        close()
            yield {}

    def no_batch_message(self, batch_size: int) -> str:
        """Why a pass over the shards gave no full batch of ``batch_size``, naming the shard pattern and how many
        shard reads failed and samples were skipped (each named in a warning): the trainer's error."""
        return (f"the webdataset shards {self.pattern} ({len(self.urls)} shard{'' if len(self.urls) == 1 else 's'}) "
                f"yield no full batch of {batch_size}: {self._bad_shards.total()} shard read(s) failed and "
                f"{self._skips.total() - self._bad_shards.total()} sample(s) were skipped (named in the warnings); "
                "check that the files are webdataset tar shards of images, or lower train.batch_size")

    def _fields(self, sample: dict[str, Any]) -> tuple[str, bytes, int] | None:
        """A shard sample's name, image bytes and integer label (-1 without ``label_key``); ``None`` after
        skipping it (named and counted) when the image or the label is missing or the label is not an int."""
        key = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        data = next((sample[k] for k in sample if k.lower() in self.image_keys), None)
        if data is None:
            self._skip(key, f"no image among keys {sorted(k for k in sample if not k.startswith('__'))}")
            return None
        target = -1
        if self.label_key is not None:
            raw = sample.get(self.label_key)
            try:
                target = int(raw.decode() if isinstance(raw, (bytes, bytearray)) else raw)
            except (TypeError, ValueError):
                self._skip(key, f"missing or non-integer label {self.label_key!r}: {raw!r}")
                return None
        return key, data, target

    def _decode(self, sample: dict[str, Any]) -> tuple[Image.Image, int] | None:
        fields = self._fields(sample)
        if fields is None:
            return None
        key, data, target = fields
        try:
            img = decode_image(data)
        except Exception as err:  # noqa: BLE001
            self._skip(key, f"{type(err).__name__}: {err}")
            return None
        return img, target

    def __iter__(self) -> Iterator[Any]:
        import webdataset as wds
        from webdataset.tariterators import group_by_keys, url_opener
        from webdataset.utils import pytorch_worker_info

        rank, world_size, worker, num_workers = pytorch_worker_info()
        self.epoch = int(self._shared_epoch[0])  # in a persistent worker, its copy's epoch is that of an earlier pass
        shards = self._shards_for_epoch()
        if len(shards) < world_size * num_workers and worker == 0 and rank == 0:  # alike on every rank: said once
            logger.warning(
                "%d shards for %d ranks x %d workers: some readers get no data",
                len(shards),
                world_size,
                num_workers,
            )
        stream = wds.split_by_worker(wds.split_by_node([{"url": u} for u in shards]))
        files = self._shard_files(url_opener(stream, handler=self._shard_failed))
        samples: Iterable[dict[str, Any]] = group_by_keys(files, handler=self._shard_failed)
        if self.shuffle_buffer > 1:
            rng = random.Random(derive_seed(self.seed, self.epoch, 1 + rank * 4096 + worker))
            samples = _buffer_shuffle(samples, self.shuffle_buffer, rng)
        epoch = self.epoch
        for sample in samples:
            decoded = self._decode(sample)
            if decoded is None:
                continue
            img, target = decoded
            if self.transform is not None:
                try:
                    with seeded(self.seed, epoch, stable_index(str(sample.get("__key__", "")))):
                        img = self.transform(img)
                except Exception as err:  # noqa: BLE001 - guarded like decoding: skip and count
                    self._skip(f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}",
                               f"transform failed ({type(err).__name__}: {err})")
                    continue
            yield (img, target) if self.label_key is not None else img


def _buffer_shuffle(src: Iterable[Any], bufsize: int, rng: random.Random) -> Iterator[Any]:
    buf: list[Any] = []
    for item in src:
        if len(buf) < bufsize:
            buf.append(item)
            continue
        j = rng.randrange(len(buf))
        buf[j], item = item, buf[j]
        yield item
    rng.shuffle(buf)
    yield from buf


# --------------------------------------------------------------------------------------- in memory
class LoadDrops:
    """The files a folder decoded into memory left out (unreadable), reported as the dataset's skipped samples.

    Every file is decoded once, at load, so its drops are counted once per run (a resumed run decodes the
    folder again): as skips of the first epoch the dataset is set to (``set_epoch``; the epoch a run starts
    or resumes at, epoch 0 before any call), like the replaced samples of the folder datasets, which the
    engine reads through ``skipped_count(epoch)``. Under torchrun every rank decodes the whole folder and the
    engine sums the ranks' counts: only the first rank (``RANK`` 0) counts them.

    Args:
        paths: the files left out.
        counted: whether this process counts them; None = it is the first rank.
    """

    def __init__(self, paths: Sequence[str] = (), *, counted: bool | None = None) -> None:
        self.paths = [str(p) for p in paths]
        self.counted = _first_rank() if counted is None else bool(counted)
        self.first_epoch: int | None = None

    def set_epoch(self, epoch: int) -> None:
        """Note the epoch the dataset is used at; the first one set is the epoch the drops are counted in."""
        if self.first_epoch is None:
            self.first_epoch = int(epoch)

    def count(self, epoch: int | None = None) -> int:
        """Drops counted by this process: all of them (``epoch`` None or the first epoch), else 0."""
        n = len(self.paths) if self.counted else 0
        if epoch is None:
            return n
        return n if int(epoch) == (self.first_epoch if self.first_epoch is not None else 0) else 0


class ReportsLoadDrops:
    """For datasets over a folder decoded into memory: the files left out at load (``self.drops``, a
    :class:`LoadDrops`) reported as the engine reads a dataset's skipped samples."""

    drops: LoadDrops

    @property
    def num_skipped(self) -> int:
        """How many files were left out when the images were decoded."""
        return len(self.drops.paths)

    @property
    def bad_paths(self) -> list[str]:
        """The files left out when the images were decoded."""
        return list(self.drops.paths)

    def skipped_count(self, epoch: int | None = None) -> int:
        """Samples skipped, as the engine reads it: the files dropped at load, in the first epoch trained
        (:class:`LoadDrops`; the first rank only); nothing is skipped afterwards (every image is decoded)."""
        return self.drops.count(epoch)


class TensorImageDataset(ReportsLoadDrops, Dataset):
    """Small decoded images kept in memory (CIFAR-sized): uint8 ``[N, H, W, 3]`` or ``[N, 3, H, W]``.

    With a ``transform`` each sample is handed to it as an RGB PIL image (so torchvision / timm
    transforms work unchanged) inside ``seeded(seed, epoch, index)`` (not one marked
    ``beit.data.seeding.deterministic``: it draws nothing). Without one, the raw
    ``[H, W, 3]`` uint8 tensor is returned, so that a DataLoader yields ``[B, H, W, 3]`` batches for
    the GPU fast path (``beit.data.gpu_augment.PretrainViews``); add a ``mask_generator`` to get
    ``{"image": [H, W, 3] uint8, "mask": bool [h, w]}`` instead, the mask drawn per sample in the
    workers (it is the slow part of that path). Labels, when given, come back as ``(sample, label)``.

    ``dropped`` names the files left out when the images were decoded (:func:`decode_image_folder`); they are
    ``num_skipped`` / ``bad_paths`` here and the engine counts them (``skipped_count``) in the first epoch
    trained, once per run (:class:`LoadDrops`), as it counts the replaced samples of the folder datasets.

    Raises:
        TypeError: ``images`` is not uint8.
        ValueError: ``images`` is not ``[N, H, W, 3|1]`` / ``[N, 3|1, H, W]`` / ``[N, H, W]``, ``labels`` is
            not ``[N]``, or both ``transform`` and ``mask_generator`` are given.
    """

    def __init__(
        self,
        images: torch.Tensor | np.ndarray,
        labels: torch.Tensor | Sequence[int] | None = None,
        transform: Transform | None = None,
        *,
        mask_generator: Callable[[], torch.Tensor] | None = None,
        seed: int = 0,
        dropped: Sequence[str] = (),
    ) -> None:
        if transform is not None and mask_generator is not None:
            raise ValueError(
                "mask_generator is for the raw-tensor path (transform=None); PretrainTransform draws its own"
            )
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8:
            raise TypeError(f"images must be uint8, got {images.dtype} (scale to 0..255 first)")
        if images.ndim == 3:  # grayscale [N, H, W]
            images = images.unsqueeze(-1)
        if images.ndim != 4:
            raise ValueError(f"images must be [N, H, W, 3] or [N, 3, H, W], got shape {tuple(images.shape)}")
        if images.shape[-1] not in (1, 3) and images.shape[1] in (1, 3):
            images = images.permute(0, 2, 3, 1)  # NCHW -> NHWC
        if images.shape[-1] == 1:
            images = images.expand(-1, -1, -1, 3)
        if images.shape[-1] != 3:
            raise ValueError(f"images must be [N, H, W, 3] or [N, 3, H, W], got shape {tuple(images.shape)}")
        self.images = images.contiguous()
        if labels is not None:
            labels = torch.as_tensor(labels, dtype=torch.long)
            if labels.shape != (len(self.images),):
                raise ValueError(f"labels must have shape [{len(self.images)}], got {tuple(labels.shape)}")
        self.labels = labels
        self.transform = transform
        self.mask_generator = mask_generator
        self.seed = int(seed)
        self.epoch = 0
        self.drops = LoadDrops(dropped)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of ``epoch``."""
        self.epoch = int(epoch)
        self.drops.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int | tuple[int, int]) -> Any:
        epoch, index = _unpack_index(index, self.epoch, len(self))
        x: Any = self.images[index]
        if self.transform is not None:
            img = Image.fromarray(x.numpy(), mode="RGB")
            with seeded_for(self.transform, self.seed, epoch, index):
                x = self.transform(img)
        elif self.mask_generator is not None:
            with seeded(self.seed, epoch, index):
                x = {"image": x, "mask": self.mask_generator()}
        if self.labels is None:
            return x
        return x, int(self.labels[index])


def _resize_center_crop(img: Image.Image, size: int | tuple[int, int]) -> Image.Image:
    """Scale ``img`` (bicubic) so that it covers ``size`` (int: square, or ``(width, height)``), then
    center-crop to exactly that size; any input size works, thin strips included."""
    wh = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if img.size == wh:
        return img
    return ImageOps.fit(img, wh, method=Image.BICUBIC)


class MemoryBudgetError(ValueError):
    """The images a folder would decode into memory do not fit in the memory there is (RAM, or the device's when
    they go there): refused before decoding; the task names its config key (``data.in_memory``)."""


#: the share of the available RAM (and of the free device memory, where the images are copied there) that images
#: decoded into memory may take; above it decoding is refused rather than the process being killed by the OS
MEMORY_SHARE = 0.5


#: where a container's memory limit and use are read: cgroup v2, then v1 (limit, usage)
CGROUP_MEMORY_FILES = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                       ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"))


def cgroup_memory_left(files: Sequence[tuple[str, str]] = CGROUP_MEMORY_FILES) -> int | None:
    """Bytes this process's container may still allocate (its cgroup's memory limit minus its use), or None where
    no limit is set ("max" in v2, a huge number in v1) or none can be read. A container (Docker, Kubernetes, SLURM)
    is killed at its limit while ``/proc/meminfo`` shows the whole host's memory."""
    for limit_file, usage_file in files:
        try:
            limit_text = Path(limit_file).read_text().strip()
            if limit_text == "max":
                return None
            limit = int(limit_text)
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit >= 2**60:  # v1's "no limit" (PAGE_COUNTER_MAX in bytes)
            return None
        return max(0, limit - usage)
    return None


def available_memory() -> int | None:
    """Bytes of RAM available to new allocations: ``MemAvailable`` of ``/proc/meminfo`` (else free pages), or what
    the container's cgroup limit leaves (:func:`cgroup_memory_left`) where that is less; None where none can be
    read."""
    host = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    host = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if host is None:
        try:
            host = int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            host = None
    box = cgroup_memory_left()
    known = [m for m in (host, box) if m is not None]
    return min(known) if known else None


def free_device_memory(device: torch.device | str | None) -> int | None:
    """Free bytes on a CUDA ``device`` (``torch.cuda.mem_get_info``), None for any other device or when unknown."""
    if device is None or torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return None
    try:
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    except RuntimeError:
        return None


def estimate_decoded_bytes(paths: Sequence[str], size: int | None = None, *, sample: int = 256) -> int:
    """Bytes that ``paths`` take decoded as uint8 RGB: ``size x size`` each when ``size`` is given, else the mean pixel
    count of up to ``sample`` files spread over the list, read from their headers (PIL opens lazily: no decode),
    times the count; files whose header does not read are left out of the mean."""
    n = len(paths)
    if size is not None:
        return n * int(size) * int(size) * 3
    pixels = []
    with warnings.catch_warnings():  # a large header is what this looks for, not a decompression bomb to flag
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        for i in spread_indices(n, sample):
            try:
                w, h = image_size(paths[i], exif=False)
            except Exception:  # noqa: BLE001 - an unreadable file is left out when decoding too
                continue
            pixels.append(w * h)
    return int(np.mean(pixels) * 3 * n) if pixels else 0


def local_world_size() -> int:
    """The processes of this host under torchrun (``LOCAL_WORLD_SIZE``), at least 1; 1 when it is unset or not a
    number. The one reading of it (the in-memory check here, the engine's loader-worker cap)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def check_memory_budget(nbytes: int, n: int, root: str | os.PathLike, device: torch.device | str | None = None
                        ) -> None:
    """Refuse to decode ``n`` images of about ``nbytes`` (:func:`estimate_decoded_bytes`) under ``root`` into memory
    when they would take more than :data:`MEMORY_SHARE` of the available RAM (times the ranks of this host under
    torchrun: each decodes the whole folder), or of the free memory of a CUDA ``device`` they are copied to.

    Raises:
        MemoryBudgetError: they would not fit; one line with the estimate and the memory there is.
    """
    ranks = local_world_size()
    gib = 2.0 ** 30
    ram = available_memory()
    what = f"the {n} images under {str(root)!r} decode to about {nbytes / gib:.2f} GiB (estimated from the headers)"
    if ram is not None and nbytes * ranks > MEMORY_SHARE * ram:
        per = f" in each of the {ranks} ranks of this host" if ranks > 1 else ""
        raise MemoryBudgetError(f"{what}{per}, more than {MEMORY_SHARE:.0%} of the {ram / gib:.2f} GiB of RAM "
                                "available")
    free = free_device_memory(device)
    if free is not None and nbytes > MEMORY_SHARE * free:
        raise MemoryBudgetError(f"{what}, more than {MEMORY_SHARE:.0%} of the {free / gib:.2f} GiB free on {device}, "
                                "where they are copied")


class DecodedFolder(NamedTuple):
    """A folder decoded into memory (:func:`decode_image_folder`): uint8 ``images`` ``[N, H, W, 3]``, int64
    ``labels`` ``[N]`` (None when unlabeled), the ``class_names``, and the files ``dropped`` (unreadable)."""

    images: torch.Tensor
    labels: torch.Tensor | None
    class_names: list[str]
    dropped: list[str]


def decode_image_folder(
    root: str | os.PathLike,
    size: int | None = None,
    *,
    class_names: Sequence[str] | None = None,
    labeled: bool | None = None,
    num_threads: int = 8,
    progress: bool = True,
    every_class: bool = True,
    max_images: int = 0,
    device: torch.device | str | None = None,
) -> DecodedFolder:
    """Decode a whole folder into a uint8 ``[N, H, W, 3]`` tensor (thread pool, tqdm progress bar).

    Worth it for small images (CIFAR: 50k JPEGs, 150 MB decoded): decoding once instead of every
    epoch frees the DataLoader workers. ``labeled=None`` uses the class layout when ``root`` has
    sub-folders. ``size`` resizes the short side (bicubic) and center-crops to ``size x size``.
    Without it the images keep their size when they all share one; images of another size than the
    most common one are resized (bicubic) and center-cropped to it, with one warning that counts
    and names them. Unreadable images are left out (``dropped``), each named in a warning; hand them to
    :class:`TensorImageDataset` (``dropped=``) so that the engine counts them as skipped files. A class (labeled)
    none of whose images decodes is an error with ``every_class`` (a training set, the default) and one warning
    without it (a validation set: :func:`report_unreadable_classes`). Under torchrun every rank decodes the whole
    folder: the progress bar and the warnings are the first rank's (:func:`_first_rank`), the error every rank's.

    ``max_images`` (0 = all) keeps the first files (in the listing's order) before anything is decoded. Before
    decoding, the decoded size is estimated from the image headers and checked against the memory there is
    (:func:`check_memory_budget`; ``device``: the device the images will be copied to). The images are copied into
    one preallocated array as they are taken from the decoded list, so the peak stays about one copy of the set.

    Raises:
        FileNotFoundError / NotADirectoryError: ``root`` does not exist / is a file.
        ValueError: no images under ``root``, or (labeled) the class sub-folders are missing or do not match
            ``class_names`` (as :class:`LabeledImageFolder`).
        NoReadableImagesError (a ValueError): none of the images could be decoded; or ``every_class`` and some
            class has no image that decodes, naming it.
        MemoryBudgetError (a ValueError): the decoded images would not fit in memory (:func:`check_memory_budget`).
    """
    if labeled is None:
        labeled = class_names is not None or bool(find_classes(root))
    # Under torchrun every rank decodes the same folder: one progress bar and one set of warnings (rank 0's)
    first_rank = _first_rank()
    progress = progress and first_rank
    if labeled:
        ds: _RobustImageFiles = LabeledImageFolder(root, class_names=class_names)
        names = list(ds.classes)  # type: ignore[attr-defined]
    else:
        ds = ImageFolderDataset(root)
        names = []
    if max_images and max_images < len(ds.samples):
        ds.samples = ds.samples[:max_images]
    check_memory_budget(estimate_decoded_bytes([p for p, _ in ds.samples], size), len(ds.samples), root, device)

    def load(i: int) -> np.ndarray | None:
        path = ds.samples[i][0]
        try:
            img = decode_image(path)
        except Exception as err:  # noqa: BLE001
            ds._mark_bad(i, err, outcome="it is left out of the images decoded into memory", warn=first_rank)
            return None
        if size is not None:
            img = _resize_center_crop(img, size)
        return np.asarray(img, dtype=np.uint8)

    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        results: Iterable = pool.map(load, range(len(ds)))
        if progress and SHOW_PROGRESS:
            results = tqdm(results, total=len(ds), desc=f"decoding {os.path.basename(str(root))}")
        arrays = list(results)
    keep = [i for i, a in enumerate(arrays) if a is not None]
    if not keep:
        raise NoReadableImagesError(f"none of the {len(ds)} images under {str(root)!r} could be decoded")
    dropped = [ds.samples[i][0] for i, a in enumerate(arrays) if a is None]
    if labeled:
        unreadable = classes_left_empty(ds.samples, keep, names, ds._bad)
        report_unreadable_classes(root, unreadable, required=every_class)  # every rank stops on the error
    if dropped and first_rank:
        # a validation or held-out set's are not counted anywhere else: the words say when they are
        logger.warning("left out %d unreadable images under %s (of %d); a training set counts them as skipped files "
                       "of its first epoch", len(dropped), root, len(ds))
    shapes = Counter(arrays[i].shape for i in keep)
    if len(shapes) > 1:  # the most common size; on a tie the larger one
        shape = max(shapes, key=lambda sh: (shapes[sh], sh[0] * sh[1], sh))
        odd = [i for i in keep if arrays[i].shape != shape]
        for i in odd:
            img = Image.fromarray(arrays[i], mode="RGB")
            arrays[i] = np.asarray(_resize_center_crop(img, (shape[1], shape[0])), dtype=np.uint8)
        shown = first_few([ds.samples[i][0] for i in odd], 5)
        if first_rank:
            logger.warning("resized %d of %d images under %s to the common size %dx%d (short side, then center "
                           "crop): %s", len(odd), len(keep), root, shape[1], shape[0], shown)
    out = np.empty((len(keep), *arrays[keep[0]].shape), dtype=np.uint8)
    for j, i in enumerate(keep):  # one copy at a time, each decoded image let go once copied (np.stack holds both)
        out[j] = arrays[i]
        arrays[i] = None
    images = torch.from_numpy(out)
    labels = torch.tensor([ds.samples[i][1] for i in keep], dtype=torch.long) if labeled else None
    return DecodedFolder(images, labels, names, dropped)


def load_image_folder_to_memory(root: str | os.PathLike, size: int | None = None, **kwargs: Any
                                ) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
    """:func:`decode_image_folder` (same arguments) without the names of the files left out (unreadable ones are
    skipped with a warning); raises as it does.

    Returns:
        images ``[N, H, W, 3]`` uint8, labels ``[N]`` int64 (None when unlabeled), class names.
    """
    images, labels, names, _ = decode_image_folder(root, size, **kwargs)
    return images, labels, names


class RepeatedDataset(Dataset):
    """``times`` passes over a map-style ``dataset`` per epoch, each pass its own augmentation draw.

    The one repeat wrapper of the package (mmseg's ``RepeatDataset``, used by segmentation and layout
    through their ``data.repeat``): small sets then give long epochs, so the engine checkpoints and
    evaluates per epoch rather than every few steps. Meaning, exactly: ``len = len(dataset) * times``;
    item ``i`` of epoch ``e`` is item ``i % n`` of ``dataset`` at epoch ``e * times + i // n`` (``n =
    len(dataset)``), so pass ``p`` of epoch ``e`` is what ``dataset`` gives at its epoch ``e * times + p``:
    every pass a different draw, every sample still a pure function of (seed, epoch, index), and with
    ``times=1`` the wrapped dataset unchanged. ``dataset`` must implement ``set_epoch`` (every augmenting
    dataset here does); each DataLoader worker holds its own copy, so setting it per item is safe.

    Raises ``ValueError`` for ``times < 1`` or a dataset without ``set_epoch``.
    """

    def __init__(self, dataset: Dataset, times: int) -> None:
        if times < 1:
            raise ValueError(f"times must be >= 1, got {times}")
        if not callable(getattr(dataset, "set_epoch", None)):
            raise ValueError(f"RepeatedDataset needs a dataset with set_epoch(epoch); "
                             f"{type(dataset).__name__} has none")
        self.dataset, self.times, self.epoch = dataset, int(times), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset) * self.times  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        n = len(self.dataset)  # type: ignore[arg-type]
        self.dataset.set_epoch(self.epoch * self.times + int(index) // n)  # type: ignore[attr-defined]
        return self.dataset[int(index) % n]

    def skipped_count(self, epoch: int | None = None) -> int:
        """Samples the wrapped dataset replaced in this dataset's ``epoch`` (its epochs ``epoch * times`` to
        ``epoch * times + times - 1``; all when None), as the engine reads it; 0 when it counts none."""
        count = getattr(self.dataset, "skipped_count", None)
        if count is None:
            return 0
        if epoch is None:
            return int(count())
        return sum(int(count(int(epoch) * self.times + p)) for p in range(self.times))


def spread_indices(length: int, n: int) -> list[int]:
    """``min(n, length)`` indices spread evenly over ``range(length)``, first and last included: the samples a
    panel shows. Class-sorted folders would otherwise show ``n`` images of the first class."""
    if n <= 0 or length <= 0:
        return []
    if n >= length:
        return list(range(length))
    if n == 1:
        return [0]
    return [round(i * (length - 1) / (n - 1)) for i in range(n)]
