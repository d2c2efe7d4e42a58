"""The pre-training data built from the config: images (a folder, decoded into memory, or webdataset shards)
with the two views and the blockwise mask per sample, on the CPU in the workers (:func:`build_dataset`) or as
encoded bytes augmented in batches on the device (:func:`build_device_data`).
"""

from __future__ import annotations

from typing import Any

import torch

from ...data.datasets import (
    ImageFolderDataset,
    MemoryBudgetError,
    TensorImageDataset,
    WebDatasetShards,
    decode_image_folder,
)
from ...data.gpu_augment import PretrainViews
from ...data.gpu_decode import EncodedImageFiles, EncodedWebDataset, InMemoryIndices, PretrainPipeline, collate_encoded
from ...data.masking import BlockwiseMaskGenerator
from ...data.transforms import PretrainTransform
from ...engine.config import ConfigError
from ..device_data import unused_jpeg_decode, wants_device_path
from .config import PretrainConfig, shard_urls

__all__ = ["build_dataset", "build_device_data", "build_transform"]


def build_transform(cfg: PretrainConfig, tokenizer_downsample: int) -> PretrainTransform:
    """The per-sample views and mask of ``cfg``: patch view, tokenizer view (``tokenizer_downsample`` pixels per
    token) and BEiT's blockwise mask over the patch grid (``transform.mask_generator``)."""
    m, d = cfg.model, cfg.data
    grid = m.img_size // m.patch_size
    masks = BlockwiseMaskGenerator((grid, grid), d.num_mask_patches, d.min_mask_patches_per_block,
                                   d.max_mask_patches_per_block)
    return PretrainTransform(
        input_size=m.img_size, patch_size=m.patch_size, tokenizer_downsample=tokenizer_downsample,
        scale=tuple(d.scale), color_jitter=d.color_jitter, hflip=d.hflip, mean=tuple(d.mean), std=tuple(d.std),
        mask_generator=masks,
    )


def _memory_images(cfg: PretrainConfig, device: torch.device | str | None = None) -> tuple[torch.Tensor, list[str]]:
    """``data.in_memory``: the first ``data.max_images`` (0 = all) images of ``data.path`` decoded once (the others
    are not read), uint8 ``[N, H, W, 3]``; and the unreadable files left out (counted as skipped files). ``device``:
    where the images will be copied (the device path).

    Raises:
        ConfigError: ``data.in_memory`` where the decoded images would not fit in memory (RAM, or ``device``'s),
            estimated from the headers before decoding; saying how to turn it off or cap it.
    """
    try:
        images, _, _, dropped = decode_image_folder(cfg.data.path, labeled=False,  # every image at any depth
                                                    max_images=cfg.data.max_images, device=device)
    except MemoryBudgetError as e:
        raise ConfigError("data.in_memory", f"{e}: set data.in_memory=false to read them from disk, or "
                                            "data.max_images=N to keep the first N") from None
    return images, dropped


def build_dataset(cfg: PretrainConfig, tokenizer_downsample: int) -> torch.utils.data.Dataset:
    d = cfg.data
    transform = build_transform(cfg, tokenizer_downsample)
    seed = cfg.train.seed
    urls = shard_urls(d.path)
    if urls:
        return WebDatasetShards(urls, transform=transform, seed=seed, num_samples=d.num_samples)
    if d.in_memory:
        images, dropped = _memory_images(cfg)
        return TensorImageDataset(images, transform=transform, seed=seed, dropped=dropped)
    ds = ImageFolderDataset(d.path, transform=transform, seed=seed)
    if d.max_images and d.max_images < len(ds):
        ds = torch.utils.data.Subset(ds, range(d.max_images))
        ds.set_epoch = ds.dataset.set_epoch  # type: ignore[attr-defined]  # keep per-epoch augmentation
    return ds


def build_device_data(cfg: PretrainConfig, tokenizer_downsample: int, device: torch.device | str
                      ) -> tuple[torch.utils.data.Dataset, Any, Any] | None:
    """The batched on-device data path (``data.device``), or None for the CPU path.

    Returns ``(dataset, collate_fn, pipeline)``: the workers read (and, with ``data.jpeg_decode=workers``,
    decode) the images and draw masks, ``pipeline(batch)`` makes the two views on ``device``. Folders,
    webdataset shards and ``data.in_memory``.

    Raises:
        ConfigError: ``data.device`` is not auto | cpu | gpu | batched.
    """
    d = cfg.data
    if not wants_device_path(d.device, device):
        unused_jpeg_decode(d.jpeg_decode, f"data.device={d.device} reads the images on the CPU path")
        return None
    t = build_transform(cfg, tokenizer_downsample)
    masks = t.mask_generator
    views = PretrainViews.from_transform(t, seed=cfg.train.seed)
    seed = cfg.train.seed
    urls = shard_urls(d.path)
    if urls:
        shards = EncodedWebDataset(urls, mask_generator=masks, seed=seed, num_samples=d.num_samples,
                                   jpeg_decode=d.jpeg_decode)
        return shards, collate_encoded, PretrainPipeline(views, device, skips=shards.skip_counter)
    if d.in_memory:
        unused_jpeg_decode(d.jpeg_decode, "data.in_memory decodes every image once, on the CPU, at start")
        images, dropped = _memory_images(cfg, device)
        return (InMemoryIndices(len(images), mask_generator=masks, seed=seed, dropped=dropped), InMemoryIndices.collate,
                PretrainPipeline(views, device, images, dropped=dropped))
    ds = EncodedImageFiles.from_folder(d.path, mask_generator=masks, seed=seed, jpeg_decode=d.jpeg_decode,
                                       crop=views.worker_crop())  # workers ship each image's crop, not the photo
    if d.max_images:
        ds.samples = ds.samples[: d.max_images]
    return ds, collate_encoded, PretrainPipeline(views, device, skips=ds.skip_counter, spare_source=ds.spare_image)

