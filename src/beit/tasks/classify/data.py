"""The classification data built from the config: image folders (``root/<class>/<image>``, or decoded into
memory), the training augmentation (the paper's recipe, or the document recipe), the eval preprocessing of a
:class:`beit.models.Preprocess`, and the batched on-device training path (``data.device``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision import transforms as T

from ..._text import ALIKE_ON_EVERY_RANK, first_few
from ...data.datasets import (
    IMG_EXTENSIONS,
    LabeledImageFolder,
    MemoryBudgetError,
    NoReadableImagesError,
    TensorImageDataset,
    class_folders,
    classes_left_empty,
    decode_image_folder,
    report_unreadable_classes,
    unreadable_classes,
)
from ...data.gpu_augment import FinetuneAugment
from ...data.gpu_decode import EncodedImageFiles, FinetunePipeline, InMemoryIndices, collate_encoded
from ...data.seeding import deterministic, is_deterministic
from ...data.transforms import (
    SMALL_IMAGE_SIZE,
    build_eval_transform,
    build_finetune_transform,
    build_full_image_transform,
)
from ...engine import distributed as D
from ...engine.config import ConfigError
from ...models.config import Preprocess
from ..device_data import unused_jpeg_decode, wants_device_path
from .config import DataConfig, FinetuneConfig

__all__ = ["build_datasets", "build_device_train", "build_preprocess", "build_train_transform", "build_val",
           "check_image_folders", "check_num_classes", "check_train_classes", "readable_subset"]

logger = logging.getLogger(__name__)


def _gray_first(tf: T.Compose, grayscale: bool) -> T.Compose:
    """``tf``, behind a gray -> 3-channel step when ``grayscale`` (scans: keeps colour out of the decision)."""
    if not grayscale:
        return tf
    gray = T.Compose([T.Grayscale(num_output_channels=3), *tf.transforms])
    return deterministic(gray) if is_deterministic(tf) else gray


def build_preprocess(p: Preprocess) -> Callable[[Image.Image], torch.Tensor]:
    """The eval transform for ``p``: ``beit.data.transforms``' ``build_eval_transform`` (resize + center
    crop) or ``build_full_image_transform`` (whole image to a square), behind an optional grayscale step."""
    if p.resize == "crop":
        tf = build_eval_transform(p.img_size, crop_pct=p.crop_pct, interpolation=p.interpolation,
                                  mean=p.mean, std=p.std)
    elif p.resize == "full":
        tf = build_full_image_transform(False, p.img_size, interpolation=p.interpolation, mean=p.mean, std=p.std)
    else:
        raise ValueError(f"resize must be 'crop' or 'full', got {p.resize!r}")
    return _gray_first(tf, p.grayscale)


def readable_subset(ds: Any, num_threads: int, training: bool = True) -> tuple[Dataset, list[int], list[str]]:
    """Decode every file once and keep the readable ones, so that a broken file is reported and left
    out instead of being replaced by its neighbour (which would count that neighbour twice). A class (of a
    :class:`LabeledImageFolder`) left without any image is named in one warning: it is missing from the metrics
    (``training``: a training run's validation set, else an evaluation's; the warning's words). Under torchrun
    every rank decodes the whole set alike: the warnings are rank 0's.

    Raises:
        NoReadableImagesError: none of the images decodes (a ``ValueError``; under torchrun every rank's alike, the
            CLI prints it once).
    """
    bad = set(ds.verify(num_threads=num_threads, outcome="it is left out"))
    keep = [i for i, (p, _) in enumerate(ds.samples) if p not in bad]
    if not keep:
        raise NoReadableImagesError(f"none of the {len(ds)} images under {ds.root!r} could be decoded")
    warn_left_out(sorted(bad))
    classes = list(getattr(ds, "classes", []))
    if classes:
        report_unreadable_classes(ds.root, classes_left_empty(ds.samples, keep, classes, ds._bad), required=False,
                                  training=training)
    return Subset(ds, keep), keep, sorted(bad)


def decode_in_memory(data: DataConfig, root: str, *, device: torch.device | str | None = None,
                     **kwargs: Any) -> Any:
    """``data.in_memory``: the folder ``root`` decoded (:func:`beit.data.datasets.decode_image_folder` with
    ``data.memory_size`` and ``kwargs``; ``device``: where the images will be copied).

    Raises:
        ConfigError: ``data.in_memory`` where the decoded images would not fit in memory (estimated before decoding),
            saying how to turn it off or make the images smaller.
        ValueError: as ``decode_image_folder``.
    """
    try:
        return decode_image_folder(root, size=data.memory_size, device=device, **kwargs)
    except MemoryBudgetError as e:
        raise ConfigError("data.in_memory", f"{e}: set data.in_memory=false to read them from disk, or "
                                            "data.memory_size=S to decode them at S x S") from None


def check_train_classes(root: str, samples: list[tuple[str, int]], classes: list[str]) -> None:
    """Refuse a training folder with a class none of whose files decodes, before training (the streaming paths:
    in memory, :func:`beit.data.datasets.decode_image_folder` checks as it decodes). One decode per healthy
    class (:func:`beit.data.datasets.unreadable_classes`), not a pass over the set.

    Raises:
        NoReadableImagesError (a ValueError): some class has no readable image, naming it and its folder.
    """
    report_unreadable_classes(root, unreadable_classes(samples, classes), required=True)


def warn_left_out(bad: list[str]) -> None:
    """One warning naming the unreadable images left out (the first 10), if any; under torchrun by rank 0 alone
    (every rank verified the same set and left out the same files: each said so)."""
    if bad and D.is_main():
        logger.warning("left out %d unreadable image%s: %s", len(bad), "" if len(bad) == 1 else "s",
                       first_few(bad, 10))


def build_train_transform(data: DataConfig, img_size: int) -> Any:
    """Training augmentation: the paper's recipe via the data helper, or the document recipe (``resize=full``:
    whole page to ``img_size^2``, no crop, no color augmentation, optional random erasing)."""
    if data.crop_padding is not None and (img_size > SMALL_IMAGE_SIZE or data.resize != "crop"):
        logger.warning("data.crop_padding=%s is ignored: it applies to the padded random crop of img_size <= %d "
                       "(this run: img_size %d, resize=%s)", data.crop_padding, SMALL_IMAGE_SIZE, img_size,
                       data.resize, extra=ALIKE_ON_EVERY_RANK)
    if data.resize == "crop":
        tf = build_finetune_transform(True, img_size, auto_augment=data.auto_augment or None,
                                      color_jitter=data.color_jitter, re_prob=data.reprob, scale=tuple(data.scale),
                                      hflip=data.hflip, interpolation=data.interpolation,
                                      mean=tuple(data.mean), std=tuple(data.std), crop_padding=data.crop_padding)
    else:
        tf = build_full_image_transform(True, img_size, hflip=data.hflip, re_prob=data.reprob,
                                        interpolation=data.interpolation, mean=tuple(data.mean), std=tuple(data.std))
    return _gray_first(tf, data.grayscale)


def check_image_folders(data: DataConfig) -> None:
    """Check, before any image is read, that ``data.train_dir`` (and ``data.val_dir`` when set) are in the
    ImageFolder layout ``<dir>/<class>/<image>``: a folder of images without class sub-folders would otherwise
    make a classifier of 0 classes (in memory) or fail late.

    Images directly in a folder (in no class sub-folder) are named in a warning, under torchrun by rank 0 alone
    (every rank checks the same folders).

    Raises:
        ConfigError: ``data.train_dir`` is empty, a folder does not exist or is a file, or has no class sub-folders
            (naming the key and the folder, and what it holds instead: e.g. "has 8 images but no class sub-folders").
    """
    if not data.train_dir:
        raise ConfigError("data.train_dir", "is empty: point it to a folder of class sub-folders")
    for key, root in (("data.train_dir", data.train_dir), ("data.val_dir", data.val_dir)):
        if not root:
            continue
        try:
            names = class_folders(root)
        except (ValueError, FileNotFoundError, NotADirectoryError) as e:  # each names the folder, not the key
            raise ConfigError(key, str(e)) from None
        if key == "data.train_dir" and len(names) < 2:
            raise ConfigError(key, f"{str(root)!r} has one class sub-folder ({names[0]!r}): a classifier needs at "
                                   "least 2 classes, one sub-folder each (<dir>/<class>/<image>)")
        loose = [e.name for e in os.scandir(root) if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS)]
        if loose and D.is_main():
            logger.warning("%s=%s: %d images directly in it (e.g. %s) belong to no class sub-folder and are not "
                           "used", key, root, len(loose), sorted(loose)[0])


def build_datasets(data: DataConfig, train_transform: Any, eval_transform: Any, *, seed: int = 0,
                   class_names: list[str] | None = None,
                   check_train: Callable[[Dataset, list[str]], None] | None = None
                   ) -> tuple[Dataset, Dataset | None, list[str]]:
    """Train / val datasets from folders (or decoded into memory) and the class names in label order.

    The val folders must hold exactly the training classes; with ``verify_val`` unreadable val images are
    left out (counted and logged) instead of being replaced by a neighbour. In memory, unreadable images are
    left out at load and counted as skipped files of the first epoch (``TensorImageDataset(dropped=...)``).
    ``check_train(train, names)`` runs as soon as the training set is there, before the val set is read (the class
    count, and the run's steps, which need its size: :func:`beit.engine.trainer.check_schedule`); it raises to
    refuse.

    Raises:
        ConfigError: as :func:`check_image_folders` (checked before any image is read).
        ValueError: no readable image, a training class none of whose images decodes (``NoReadableImagesError``,
            naming the class and its folder; a val class without one is a warning), class folders that do not match
            ``class_names``, or a val set that does not fit the training classes.
    """
    check_image_folders(data)
    names = list(class_names) if class_names else None
    if data.in_memory:
        images, labels, names, dropped = decode_in_memory(data, data.train_dir, class_names=names, labeled=True)
        train: Dataset = TensorImageDataset(images, labels, train_transform, seed=seed, dropped=dropped)
    else:
        folder = LabeledImageFolder(data.train_dir, train_transform, class_names=names, seed=seed)
        check_train_classes(data.train_dir, folder.samples, folder.classes)
        train, names = folder, list(folder.classes)
    if check_train is not None:
        check_train(train, list(names))
    return train, build_val(data, eval_transform, names, seed), list(names)


def build_val(data: DataConfig, eval_transform: Any, names: list[str], seed: int) -> Dataset | None:
    """The val dataset of ``data`` for the training classes ``names`` (None without ``val_dir``)."""
    val: Dataset | None = None
    if data.val_dir:
        try:
            if data.in_memory:
                images, labels, _, dropped = decode_in_memory(data, data.val_dir, class_names=names,
                                                              every_class=False)
                val = TensorImageDataset(images, labels, eval_transform, seed=seed, dropped=dropped)
            else:
                vf = LabeledImageFolder(data.val_dir, eval_transform, class_names=names, seed=seed)
                if data.verify_val:
                    val = readable_subset(vf, num_threads=8)[0]
                else:  # a cheap check only: one decode per healthy class
                    report_unreadable_classes(data.val_dir, unreadable_classes(vf.samples, vf.classes),
                                              required=False)
                    val = vf
        except ValueError as e:
            raise ValueError(f"validation set {data.val_dir!r} does not fit the {len(names)} training classes: "
                             f"{e}") from None
    return val


def build_device_train(cfg: FinetuneConfig, device: torch.device | str, class_names: list[str] | None = None
                       ) -> tuple[Dataset, Any, Any, list[str]] | None:
    """The batched on-device training data (``data.device``), or None for the CPU path.

    Returns ``(dataset, collate_fn, pipeline, class_names)``; ``pipeline(batch)`` gives ``(images, labels)``
    on ``device`` with the paper's recipe applied per sample (``beit.data.gpu_augment.FinetuneAugment``).

    Raises:
        ConfigError: ``data.device`` is not auto | cpu | gpu | batched, or ``gpu`` / ``batched`` with a recipe
            the device path lacks;
            or the folders are not in the class layout (:func:`check_image_folders`).
    """
    data = cfg.data
    if not wants_device_path(data.device, device):
        unused_jpeg_decode(data.jpeg_decode, f"data.device={data.device} reads the images on the CPU path")
        return None
    blocker = data.check_device_path()  # again: a config changed after it was loaded
    if blocker is not None:
        logger.info("data.device=auto: CPU data path, because of %s", blocker)
        unused_jpeg_decode(data.jpeg_decode, f"the CPU data path is used ({blocker})")
        return None
    check_image_folders(data)
    try:
        augment = FinetuneAugment(cfg.img_size, scale=tuple(data.scale), hflip=data.hflip,
                                  auto_augment=data.auto_augment or None, re_prob=data.reprob,
                                  mean=tuple(data.mean), std=tuple(data.std), seed=cfg.train.seed,
                                  crop_padding=data.crop_padding)
    except ValueError as e:
        raise ConfigError("data.auto_augment", str(e)) from None
    if data.in_memory:
        unused_jpeg_decode(data.jpeg_decode, "data.in_memory decodes every image once, on the CPU, at start")
        images, labels, names, dropped = decode_in_memory(data, data.train_dir, device=device,
                                                          class_names=class_names or None, labeled=True)
        return (InMemoryIndices(len(images), seed=cfg.train.seed, dropped=dropped), InMemoryIndices.collate,
                FinetunePipeline(augment, device, images, labels, dropped=dropped), list(names))
    ds = EncodedImageFiles.from_folder(data.train_dir, labeled=True, class_names=class_names or None,
                                       seed=cfg.train.seed, jpeg_decode=data.jpeg_decode,
                                       crop=augment.worker_crop())  # workers ship each image's crop
    check_train_classes(data.train_dir, ds.samples, ds.classes)  # type: ignore[attr-defined]
    return (ds, collate_encoded, FinetunePipeline(augment, device, skips=ds.skip_counter, spare_source=ds.spare_image),
            list(ds.classes))  # type: ignore[attr-defined]


def check_num_classes(requested: int, names: list[str], where: str) -> int:
    """The class count, or a clear error when the config asks for another one than the data holds."""
    if requested and requested != len(names):
        raise ValueError(f"num_classes={requested} but {where} has {len(names)} classes ({first_few(names, 8)}); "
                         "set num_classes=0 to take them from the data")
    return len(names)

