"""Fine-tune a BEiT layout detector on a COCO-format dataset with the shared engine.

The task supplies the detector, the datasets, a ``step_fn`` that sums torchvision's loss dict, and an
``eval_fn`` that runs COCOeval; the engine does the optimizer (AdamW with layer-wise lr decay over the
backbone's blocks; pyramid, FPN and heads at the top rate), schedule, bf16, DDP, checkpoints and resume.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...engine import Trainer, is_main
from ...engine.checkpoint import config_from_checkpoint, load_model_state
from ...engine.config import ConfigError, TrainConfig, stored_config, validate_config
from ...engine.trainer import seed_everything
from ..backbone_config import check_model_overrides
from .data import DIT_MIN_SIZES, CocoLayoutDataset, RepeatedDataset, collate, split_image_ids
from .evaluate import evaluate_model, format_table
from .model import DetectorConfig, LayoutDetector, build_detector
from .predict import draw_detections

__all__ = ["LayoutConfig", "LayoutDataConfig", "build_datasets", "build_val_dataset", "config_from_dict",
           "load_detector", "step_fn", "train"]


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
    on_bad: str = "skip"  # skip (count, warn) | error: bad annotations / missing images
    check_images: bool = True  # open every image header when the dataset is built
    repeat: int = 1  # passes over the training pages per engine epoch (small sets: fewer epoch-end saves)

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
        check_model_overrides(self.model_overrides, {"head": "nothing: the detector has none",
                                                     "drop_path_rate": "model.drop_path_rate"})
        for k, v in self.model_overrides.items():
            old = self.model.backbone_overrides.get(k, v)
            if old != v:
                raise ConfigError(f"model_overrides.{k}", f"{v!r} but model.backbone_overrides.{k}={old!r}: "
                                                          "set one of them")


def _images_of(ann: str, images: str) -> Path:
    return Path(images) if images else Path(ann).parent / "images"


def build_val_dataset(cfg: LayoutConfig) -> CocoLayoutDataset | None:
    """Validation pages as they are (the model resizes them): ``data.val_ann``, or the ``data.holdout`` pages
    split off ``data.train_ann``; None when neither is set."""
    d = cfg.data
    if d.val_ann:
        return CocoLayoutDataset(d.val_ann, _images_of(d.val_ann, d.val_images), on_bad=d.on_bad,
                                 check_images=d.check_images)
    if d.holdout:
        if not d.train_ann:
            raise ConfigError("data.train_ann", "required with data.holdout: the file the pages are held out of")
        _, val_ids = split_image_ids(d.train_ann, d.holdout, d.split_seed)
        return CocoLayoutDataset(d.train_ann, _images_of(d.train_ann, d.train_images), image_ids=val_ids,
                                 on_bad=d.on_bad, check_images=d.check_images)
    return None


def build_datasets(cfg: LayoutConfig, with_val: bool = True) -> tuple[CocoLayoutDataset, CocoLayoutDataset | None]:
    """Training set (augmented, masks if the model has a mask head) and validation set (plain pages)."""
    d = cfg.data
    if not d.train_ann:
        raise ConfigError("data.train_ann", "required: the COCO annotation file to train on")
    train_ids = None
    if d.holdout and not d.val_ann:
        train_ids, _ = split_image_ids(d.train_ann, d.holdout, d.split_seed)
    train_ds = CocoLayoutDataset(d.train_ann, _images_of(d.train_ann, d.train_images), train=True,
                                 image_ids=train_ids, with_masks=cfg.model.mask_head, min_sizes=d.min_sizes,
                                 max_size=d.max_size, flip_prob=d.flip_prob, crop_prob=d.crop_prob,
                                 crop_size=d.crop_size, seed=cfg.train.seed, on_bad=d.on_bad,
                                 check_images=d.check_images)
    val_ds = build_val_dataset(cfg) if with_val else None
    if val_ds is not None and val_ds.cat_ids != train_ds.cat_ids:
        raise ConfigError("data.val_ann", f"categories {val_ds.cat_ids} differ from training's {train_ds.cat_ids}")
    return train_ds, val_ds


def step_fn(model: nn.Module, batch: tuple[list[torch.Tensor], list[dict]]) -> tuple[torch.Tensor, dict[str, Any]]:
    """torchvision's detectors return their losses in train mode: the loss is their sum, each part a metric."""
    images, targets = batch
    losses = model([im.float().div_(255) for im in images], targets)
    loss = sum(losses.values())
    return loss, {k.removeprefix("loss_"): v.detach() for k, v in losses.items()}


def make_eval_fn(dataset: CocoLayoutDataset, batch_size: int, num_workers: int
                 ) -> Callable[[nn.Module], dict[str, float]]:
    """COCOeval on rank 0 (the engine broadcasts its result to the other ranks)."""
    def eval_fn(model: nn.Module) -> dict[str, float]:
        if not is_main():
            return {}
        return evaluate_model(model, dataset, batch_size, num_workers)

    return eval_fn


def make_visualize_fn(dataset: CocoLayoutDataset, class_names: list[str], score_thresh: float
                      ) -> Callable[[nn.Module, int, Path], None]:
    """Every ``image_every`` steps: the first page with the current predictions, to watch training."""

    def visualize(model: nn.Module, step: int, out_dir: Path) -> None:
        if not is_main():
            return
        image, _ = dataset[0]
        device = next(model.parameters()).device
        det = model([image.to(device).float().div_(255)])[0]
        det = {k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in det.items()}
        draw_detections(image, det, class_names, score_thresh).save(out_dir / f"layout_{step:07d}.png")

    return visualize


def train(cfg: LayoutConfig) -> dict[str, Any]:
    """Build datasets and detector, train with the engine, print the final per-category AP table.

    Returns the engine's final metrics plus ``table`` (the text of the AP table, also written to
    ``output_dir/ap_table.txt``), ``data`` (what the datasets skipped or repaired) and ``checkpoint``.
    """
    validate_config(cfg)
    train_ds, val_ds = build_datasets(cfg)
    seed_everything(cfg.train.seed)  # the detector's random init is part of the run
    # fills cfg.model.backbone etc.
    model = build_detector(cfg.model, train_ds.class_names, train_ds.cat_ids, cfg.model_overrides)
    eval_fn = make_eval_fn(val_ds, cfg.eval_batch_size, cfg.eval_workers) if val_ds is not None else None
    vis = make_visualize_fn(val_ds or CocoLayoutDataset(train_ds.ann_file, train_ds.root, image_ids=[
        train_ds.images[0]["id"]]), train_ds.class_names, cfg.vis_score_thresh)
    data = RepeatedDataset(train_ds, cfg.data.repeat) if cfg.data.repeat > 1 else train_ds
    trainer = Trainer(model, data, step_fn, cfg.train, collate_fn=collate, eval_fn=eval_fn, visualize_fn=vis,
                      metric_to_track="bbox/AP" if eval_fn is not None else None, run_config=cfg)
    trainer.log.info(f"layout data: train {train_ds.summary()}"
                     + (f" | val {val_ds.summary()}" if val_ds is not None else " | no validation set"))
    result = dict(trainer.fit())
    result["checkpoint"] = str(Path(cfg.train.output_dir) / "last.pt")
    result["data"] = {"train": dict(train_ds.report), "val": dict(val_ds.report) if val_ds is not None else {}}
    if trainer.last_eval:
        table = format_table(trainer.last_eval, train_ds.class_names, cfg.reference,
                             title=f"COCO AP at step {trainer.step} ({len(val_ds)} pages)")
        trainer.log.info("\n" + table)
        if trainer.main:
            (Path(cfg.train.output_dir) / "ap_table.txt").write_text(table + "\n")
        result["table"] = table
    return result


def config_from_dict(saved: dict[str, Any], overrides: list[str] | None = None) -> LayoutConfig:
    """A validated :class:`LayoutConfig` from a checkpoint's ``config`` dict plus ``key=value`` overrides."""
    return stored_config(LayoutConfig, saved, None, overrides)


def load_detector(ckpt: str | Path, overrides: list[str] | None = None, use_ema: bool = False
                  ) -> tuple[LayoutDetector, LayoutConfig]:
    """The detector of a training checkpoint (``last.pt`` / ``best.pt``) and its config, in eval mode.

    The architecture comes from the config stored in the checkpoint, so the initial BEiT file and the
    annotation file are not needed.
    """
    cfg, state = config_from_checkpoint(LayoutConfig, ckpt, None, overrides)
    if not cfg.model.backbone or not cfg.model.class_names:
        raise ValueError(f"{ckpt}: the stored config has no resolved backbone / classes: not a layout checkpoint?")
    model = build_detector(cfg.model, model_overrides=cfg.model_overrides)
    weights = state.get("ema") if use_ema and state.get("ema") else state["model"]
    load_model_state(model, weights, source=str(ckpt))
    return model.eval(), cfg
