"""The layout task's config: :class:`LayoutConfig` (the detector's :class:`DetectorConfig`, the data, the
engine's ``train``) and its validation. Defaults are DiT's PubLayNet recipe; presets ``beit/configs/layout_*.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...data.datasets import PIL_MAX_IMAGE_PIXELS
from ...engine.config import ConfigError, TrainConfig, stored_config
from ..backbone_config import check_model_overrides

__all__ = ["CROP_RESIZE", "DIT_MIN_SIZES", "DetectorConfig", "LayoutConfig", "LayoutDataConfig", "config_from_dict"]

DIT_MIN_SIZES = tuple(range(480, 801, 32))  # DiT / Detectron2 multi-scale training short sides
CROP_RESIZE = (400, 500, 600)  # DETR-style crop: short side before cropping


@dataclass
class DetectorConfig:
    """The detector's architecture; ``backbone`` is filled in by :func:`build_detector` so that a training
    checkpoint can be rebuilt without the file it was initialised from."""

    arch: str = "beit_base_patch16_224"  # preset used when training from scratch
    init: str = ""  # pre-trained BEiT (any format beit.load_model reads); "" = from scratch
    backbone_overrides: dict[str, Any] = field(default_factory=dict)  # BeitConfig fields, e.g. depth
    drop_path_rate: float = 0.1
    out_indices: list[int] | None = None  # blocks feeding the pyramid; None: depth/3, /2, 2/3, last
    fpn_channels: int = 256
    pyramid_norm: str = "bn"  # between the two deconvs of the stride-4 level: bn (official) | gn | none
    mask_head: bool = True  # Mask R-CNN (segm AP too) or Faster R-CNN (boxes only)
    min_size_test: int = 800  # short side pages are resized to at evaluation / prediction
    max_size_test: int = 1333
    pixel_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # DiT: 127.5 / 127.5 on 0-255 pixels
    pixel_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)  # one per pyramid level (4 + max-pooled)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    box_head_dim: int = 1024  # torchvision's TwoMLPHead width
    mask_head_dim: int = 256  # torchvision's 4-conv mask head width
    score_thresh: float = 0.05
    detections_per_img: int = 100
    # filled in by build_detector, so that eval / predict need neither the init file nor the annotations:
    backbone: dict[str, Any] = field(default_factory=dict)  # the resolved BeitConfig
    class_names: list[str] = field(default_factory=list)  # label i+1 <-> class_names[i]
    category_ids: list[int] = field(default_factory=list)  # ... <-> COCO category id category_ids[i]

    def validate(self) -> None:
        if self.pyramid_norm not in ("bn", "gn", "none"):
            raise ConfigError("pyramid_norm", f"must be bn | gn | none, got {self.pyramid_norm!r}")
        if len(self.anchor_sizes) not in (4, 5):
            raise ConfigError("anchor_sizes", f"one size per level (4 or 5 levels), got {list(self.anchor_sizes)}")
        if self.out_indices is not None and len(self.out_indices) != 4:
            raise ConfigError("out_indices", f"must name 4 blocks, got {list(self.out_indices)}")
        if not 0.0 <= self.score_thresh < 1.0:
            raise ConfigError("score_thresh", f"must be in [0, 1), got {self.score_thresh}")
        for name in ("min_size_test", "max_size_test", "detections_per_img"):  # 0: a crash in eval, or no detection
            if getattr(self, name) <= 0:
                raise ConfigError(name, f"must be > 0, got {getattr(self, name)}")
        if self.min_size_test > self.max_size_test:
            raise ConfigError("min_size_test", f"the short side ({self.min_size_test}) must not exceed the long-side "
                                               f"cap max_size_test ({self.max_size_test})")
        if not self.aspect_ratios:
            raise ConfigError("aspect_ratios", "needs at least one anchor aspect ratio (height / width), e.g. "
                                               "[0.5, 1.0, 2.0]")
        if min(self.aspect_ratios) <= 0:
            raise ConfigError("aspect_ratios", f"anchor aspect ratios (height / width) must be > 0, got "
                                               f"{[float(r) for r in self.aspect_ratios]}")
        if min(self.pixel_std) <= 0:
            raise ConfigError("pixel_std", f"every channel's std must be > 0 (pages are divided by it), got "
                                           f"{[float(v) for v in self.pixel_std]}")
        check_model_overrides(self.backbone_overrides, key="backbone_overrides")  # fields and their types
        for k, instead in (("drop_path_rate", "model.drop_path_rate"), ("head", "nothing: the detector has none")):
            if k in self.backbone_overrides:  # build_detector sets these itself: the user's value would be dropped
                raise ConfigError(f"backbone_overrides.{k}", f"set by the layout config itself; use {instead}")


@dataclass
class LayoutDataConfig:
    train_ann: str = ""  # COCO JSON
    train_images: str = ""  # "" = the 'images' folder next to train_ann
    val_ann: str = ""  # "" = hold out `holdout` pages of train_ann (deterministic split)
    val_images: str = ""
    holdout: int = 0
    split_seed: int = 0
    min_sizes: list[int] = field(default_factory=lambda: list(DIT_MIN_SIZES))  # multi-scale short sides
    max_size: int = 1333
    flip_prob: float = 0.5
    crop_prob: float = 0.5  # DETR-style crop as in DiT; 0 = off
    crop_size: tuple[int, int] = (384, 600)
    # skip (count, warn) | error: bad annotations (counted as bad_bbox, box_off_page, bad_iscrowd, bad_segmentation,
    # bad_area, ...) and missing or unreadable images
    on_bad: str = "skip"
    check_images: bool = True  # open every image header when the dataset is built
    repeat: int = 1  # passes over the training pages per engine epoch (small sets: fewer epoch-end saves)
    max_image_pixels: int | None = PIL_MAX_IMAGE_PIXELS  # PIL's decompression-bomb limit (its default): larger
    # pages warn, above twice it they are skipped as unreadable; raise it for large scans; null = no limit

    def validate(self) -> None:
        if self.on_bad not in ("skip", "error"):
            raise ConfigError("on_bad", f"must be skip | error, got {self.on_bad!r}")
        if not self.min_sizes or min(self.min_sizes) <= 0 or self.max_size < max(self.min_sizes):
            raise ConfigError("min_sizes", f"need positive sizes <= max_size {self.max_size}, got {self.min_sizes}")
        if not 0 <= self.flip_prob <= 1 or not 0 <= self.crop_prob <= 1:
            raise ConfigError("crop_prob", "flip_prob and crop_prob must be in [0, 1]")
        if self.holdout < 0:
            raise ConfigError("holdout", f"must be >= 0, got {self.holdout}")
        if self.repeat < 1:
            raise ConfigError("repeat", f"must be >= 1, got {self.repeat}")
        if self.crop_size[0] > self.crop_size[1]:
            raise ConfigError("crop_size", f"is the (min, max) side of the random crop, the smaller first; got "
                                           f"{list(self.crop_size)}")


def _default_train() -> TrainConfig:
    # DiT's PubLayNet recipe (AdamW lr 4e-4, wd 0.05, clip 1.0, cosine, 16 pages per step as 2 x 8 GPUs,
    # 60k iterations, 1k warmup), plus BEiT's layer-wise lr decay over the backbone.
    return TrainConfig(output_dir="runs/layout", max_steps=60000, batch_size=2, num_workers=4, lr=4e-4,
                       min_lr=0.0, warmup_steps=1000, weight_decay=0.05, clip_grad=1.0, layer_decay=0.75,
                       ckpt_every=2000, log_every=20)


@dataclass
class LayoutConfig:
    model: DetectorConfig = field(default_factory=DetectorConfig)
    # BeitConfig fields of the backbone (as every task's model_overrides), e.g. {attn_impl: eager};
    # model.backbone_overrides is the older spelling of the same thing
    model_overrides: dict[str, Any] = field(default_factory=dict)
    data: LayoutDataConfig = field(default_factory=LayoutDataConfig)
    train: TrainConfig = field(default_factory=_default_train)
    eval_batch_size: int = 2
    eval_workers: int = 2
    reference: str = ""  # "publaynet": print the seed's BEiT-B numbers next to the AP table
    vis_score_thresh: float = 0.5  # boxes drawn on the pages written every train.image_every steps

    def validate(self) -> None:
        if not 0.0 <= self.vis_score_thresh <= 1.0:
            raise ConfigError("vis_score_thresh", f"must be in [0, 1] (a detection score), got {self.vis_score_thresh}")
        check_model_overrides(self.model_overrides, {"head": "nothing: the detector has none",
                                                     "drop_path_rate": "model.drop_path_rate"})
        for k, v in self.model_overrides.items():
            old = self.model.backbone_overrides.get(k, v)
            if old != v:
                raise ConfigError(f"model_overrides.{k}", f"{v!r} but model.backbone_overrides.{k}={old!r}: "
                                                          "set one of them")



def config_from_dict(saved: dict[str, Any], overrides: list[str] | None = None) -> LayoutConfig:
    """A validated :class:`LayoutConfig` from a checkpoint's ``config`` dict plus ``key=value`` overrides."""
    return stored_config(LayoutConfig, saved, None, overrides)

