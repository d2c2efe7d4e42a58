"""The segmentation task's config: :class:`SegmentConfig` (model, data, test, the engine's ``train``) and its
validation. Recipe defaults are the paper's ADE20K setup for a pre-trained-only BEiT checkpoint (unilm
``upernet_beit_base_12_512_slide_160k_ade20k_pt.py``); the presets are ``beit/configs/segment_*.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...data.datasets import PIL_MAX_IMAGE_PIXELS
from ...engine.config import ConfigError, TrainConfig
from ..backbone_config import check_model_overrides

__all__ = ["IMAGENET_MEAN_255", "IMAGENET_STD_255", "SHAPE_KEYS", "SegDataConfig", "SegModelConfig", "SegTestConfig",
           "SegmentConfig"]

IMAGENET_MEAN_255 = [123.675, 116.28, 103.53]
IMAGENET_STD_255 = [58.395, 57.12, 57.375]


@dataclass
class SegModelConfig:
    """The network. ``init`` = a pre-trained BEiT checkpoint; empty = random init of ``arch``."""

    init: str = ""  # any file/dir/Hub id beit.load_model reads; "" = from scratch
    arch: str = "beit_base_patch16_224"  # preset used from scratch
    embed_dim: int | None = None  # the preset's shape (None = its value); with init: must equal the checkpoint's
    depth: int | None = None
    num_heads: int | None = None
    patch_size: int | None = None
    drop_path_rate: float = 0.1
    out_indices: list[int] | None = None  # None: 3,5,7,11 for depth 12, evenly spaced otherwise
    channels: int = 512  # UperNet width (the paper's base config: 768)
    aux_channels: int = 256
    aux_weight: float = 0.4
    dropout: float = 0.1
    pool_scales: list[int] = field(default_factory=lambda: [1, 2, 3, 6])
    # Filled in by training: the backbone's BeitConfig, so eval / predict rebuild the network from the
    # checkpoint alone (without the pre-trained file).
    backbone: dict[str, Any] | None = None
    # Filled in by training: the names of the classes the heads were trained for, resolved from data.classes /
    # data.classes_file / ADE20K's list, so eval / predict need no class list file. Not an input: set data.classes.
    classes: list[str] | None = None

    def validate(self) -> None:
        for name in ("channels", "aux_channels"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, f"must be > 0, got {getattr(self, name)}")
        if self.aux_weight < 0:
            raise ConfigError("aux_weight", f"must be >= 0, got {self.aux_weight}")
        if not 0 <= self.dropout < 1:
            raise ConfigError("dropout", f"must be in [0, 1), got {self.dropout}")
        if self.out_indices is not None and len(self.out_indices) != 4:
            raise ConfigError("out_indices", f"needs 4 block indices, got {list(self.out_indices)}")
        if any(scale < 1 for scale in self.pool_scales):  # 0 failed at the first step inside a conv
            raise ConfigError("pool_scales", f"the pyramid pooling's output sizes must be >= 1 (the recipe's: "
                                             f"[1, 2, 3, 6]; [] for none), got {list(self.pool_scales)}")
        # the architecture of a stored run (backbone) comes from it: a shape the user gave that disagrees would be
        # dropped silently, so it is an error; one that agrees is fine. model.init's shape is only known once the
        # file is read: build_backbone checks it the same way.
        for name in ("embed_dim", "depth", "num_heads", "patch_size"):
            value = getattr(self, name)
            if value is None or not self.backbone or self.backbone.get(name, value) == value:
                continue
            have = self.backbone[name]
            raise ConfigError(name, f"{name}={value} but the checkpoint's stored backbone has {name}={have}: a "
                                    f"checkpoint's architecture comes from its tensors. Remove model.{name} or set it "
                                    f"to {have}")


@dataclass
class SegDataConfig:
    """Where the pairs are and how training samples are augmented (mmseg's ADE20K pipeline)."""

    format: str = "ade20k"  # ade20k | folder | list
    root: str = ""
    train_split: str = "training"  # ade20k / folder: fills {split}
    val_split: str = "validation"
    img_dir: str = "images/{split}"  # folder format, relative to root
    ann_dir: str = "annotations/{split}"
    img_suffix: str = ".jpg"
    seg_suffix: str = ".png"
    train_list: str = "train.txt"  # list format: "<image> <mask>" lines, relative to root
    val_list: str = "val.txt"
    # names; or classes_file; ade20k: its 150 names. null = [] (and classes_file null = "")
    classes: list[str] | None = field(default_factory=list)
    classes_file: str | None = ""  # a text file, one class name a line (line k: class k - 1)
    num_classes: int = 0  # 0 = len(classes)
    ignore_index: int = 255
    reduce_zero_label: bool = True  # ADE20K: label 0 ("other") is ignored, k -> k - 1
    on_bad_sample: str = "error"  # error | skip
    verify: bool = False  # check every pair before training (decodes all masks)
    repeat: int = 1  # passes over the train set per epoch, each its own draw (beit.data.RepeatedDataset)
    crop_size: int = 512
    img_scale: list[int] = field(default_factory=lambda: [2048, 512])  # (long, short) base scale
    ratio_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True
    test_scale: list[int] | None = field(default_factory=lambda: [2048, 512])  # None: original size
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN_255))  # 0-255 scale
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD_255))
    max_image_pixels: int | None = PIL_MAX_IMAGE_PIXELS  # PIL's decompression-bomb limit (its default): larger
    # images warn, above twice it they are skipped as unreadable; raise it for large scans / pages; null = no limit

    def validate(self) -> None:
        if self.classes is None:  # data.classes=null: no list (as [])
            self.classes = []
        if self.classes_file is None:
            self.classes_file = ""
        choices = {"format": ("ade20k", "folder", "list"), "on_bad_sample": ("error", "skip")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(name, f"must be one of {allowed}, got '{getattr(self, name)}'")
        if self.crop_size <= 0:
            raise ConfigError("crop_size", f"must be > 0, got {self.crop_size}")
        if len(self.img_scale) != 2 or min(self.img_scale) <= 0:
            raise ConfigError("img_scale", f"needs two positive sizes, got {list(self.img_scale)}")
        if len(self.ratio_range) != 2 or not 0 < self.ratio_range[0] <= self.ratio_range[1]:
            raise ConfigError("ratio_range", f"needs 0 < low <= high, got {list(self.ratio_range)}")
        if not 0 < self.cat_max_ratio <= 1:
            raise ConfigError("cat_max_ratio", f"must be in (0, 1], got {self.cat_max_ratio}")
        if self.repeat < 1:
            raise ConfigError("repeat", f"must be >= 1, got {self.repeat}")
        if not 0 <= self.flip_prob <= 1:  # a probability: 2 was taken (always flip)
            raise ConfigError("flip_prob", f"is a probability, in [0, 1]; got {self.flip_prob}")
        if self.num_classes < 0:
            raise ConfigError("num_classes", f"must be >= 0, got {self.num_classes}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError("mean", "mean and std need 3 values each, std > 0")


@dataclass
class SegTestConfig:
    """Inference used by eval: whole image or sliding windows, optional flip / multi-scale."""

    mode: str = "slide"  # slide | whole
    crop: int = 0  # window size; 0 = data.crop_size
    stride: int = 0  # window step; 0 = two thirds of the window (341 for 512: the ADE20K recipe's)
    flip: bool = False
    scales: list[float] = field(default_factory=lambda: [1.0])
    max_images: int = 0  # evaluate on the first N val images only; 0 = all
    overlays: int = 2  # coloured overlays written by `segment eval` / visualize (0 = none)

    def window(self, crop_size: int) -> tuple[int, int]:
        """``(window, stride)`` of the sliding inference: ``crop`` (0: ``crop_size``, the training crop) and
        ``stride`` (0: two thirds of the window)."""
        crop = self.crop or crop_size
        return crop, self.stride or max(1, crop * 2 // 3)

    def validate(self) -> None:
        if self.mode not in ("slide", "whole"):
            raise ConfigError("mode", f"must be 'slide' or 'whole', got '{self.mode}'")
        if self.stride < 0 or self.crop < 0:
            raise ConfigError("stride", "stride and crop must be >= 0 (0: from the window / data.crop_size)")
        if not self.scales or min(self.scales) <= 0:
            raise ConfigError("scales", f"needs positive ratios, got {list(self.scales)}")


def _default_train() -> TrainConfig:
    return TrainConfig(output_dir="runs/segment", lr=7e-4, min_lr=0.0, weight_decay=0.05, betas=(0.9, 0.999),
                       layer_decay=0.65, schedule="poly", poly_power=1.0, warmup_steps=1500, max_steps=160_000,
                       batch_size=2, eval_every=0, ckpt_every=4000, log_every=50)


SHAPE_KEYS = ("embed_dim", "depth", "num_heads", "patch_size")  # model.<key>: from-scratch shape shortcuts


@dataclass
class SegmentConfig:
    train: TrainConfig = field(default_factory=_default_train)
    model: SegModelConfig = field(default_factory=SegModelConfig)
    # BeitConfig fields of the backbone (as every task's model_overrides), e.g. {attn_impl: eager}
    model_overrides: dict[str, Any] = field(default_factory=dict)
    data: SegDataConfig = field(default_factory=SegDataConfig)
    test: SegTestConfig = field(default_factory=SegTestConfig)

    def validate(self) -> None:
        check_model_overrides(self.model_overrides, {"head": "nothing: the segmenter's backbone has none",
                                                     "img_size": "data.crop_size",
                                                     "drop_path_rate": "model.drop_path_rate"})
        for k in SHAPE_KEYS:
            mine, theirs = getattr(self.model, k), self.model_overrides.get(k)
            if mine is not None and theirs is not None and mine != theirs:
                raise ConfigError(f"model_overrides.{k}", f"{theirs} but model.{k}={mine}: set one of them")
        window, stride = self.test.window(self.data.crop_size)
        if self.test.mode == "slide" and stride > window:
            raise ConfigError("test.stride", f"{stride} is larger than the sliding window ({window}: test.crop, or "
                                             "data.crop_size when 0): pixels between windows would get no "
                                             f"prediction; use {window} or less (0: two thirds of the window)")

