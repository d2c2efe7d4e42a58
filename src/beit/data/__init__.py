"""Data: datasets, transforms, masking and per-sample seeding for BEiT.

Every augmenting dataset implements ``set_epoch`` and draws its random numbers inside
``seeding.seeded(seed, epoch, index)``, so samples are pure functions of (seed, epoch, index).
"""

from .datasets import (
    IMG_EXTENSIONS,
    FileImages,
    ImageFolderDataset,
    LabeledImageFolder,
    RepeatedDataset,
    TensorImageDataset,
    WebDatasetShards,
    collate_files,
    decode_image,
    list_images,
    load_image_folder_to_memory,
    scan_images,
    to_rgb,
)
from .demo import load_digits_images, train_test_split
from .masking import BlockwiseMaskGenerator
from .seeding import derive_seed, generator_for, seeded, stable_index
from .transforms import (
    PretrainTransform,
    build_eval_transform,
    build_finetune_transform,
    build_full_image_transform,
    build_linear_probe_transform,
    collate_pretrain,
    default_mask_generator,
    interpolation_mode,
)

__all__ = [
    "IMG_EXTENSIONS",
    "BlockwiseMaskGenerator",
    "FileImages",
    "ImageFolderDataset",
    "LabeledImageFolder",
    "PretrainTransform",
    "RepeatedDataset",
    "TensorImageDataset",
    "WebDatasetShards",
    "build_eval_transform",
    "build_finetune_transform",
    "build_full_image_transform",
    "build_linear_probe_transform",
    "collate_files",
    "collate_pretrain",
    "decode_image",
    "default_mask_generator",
    "derive_seed",
    "generator_for",
    "interpolation_mode",
    "list_images",
    "load_digits_images",
    "load_image_folder_to_memory",
    "scan_images",
    "seeded",
    "stable_index",
    "to_rgb",
    "train_test_split",
]
