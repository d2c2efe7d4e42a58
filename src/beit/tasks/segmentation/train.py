"""Train, evaluate and run BEiT + UperNet segmentation through the shared engine.

Recipe defaults are the paper's ADE20K setup for a BEiT checkpoint that was only pre-trained (unilm
``upernet_beit_base_12_512_slide_160k_ade20k_pt.py``): 512 crops, AdamW lr 7e-4, betas (0.9, 0.999),
weight decay 0.05, layer decay 0.65, poly schedule (power 1, min lr 0) after 1500 linear warmup steps,
160k steps of 16 images (8 GPUs x 2), drop path 0.1, slide test with 512 windows, stride 341::

    cfg = load_config(SegmentConfig, beit.configs.preset_path("segment_ade20k_base"),
                      ["data.root=/data/ADEChallengeData2016"])
    train(cfg)

The model, the datasets and the step / eval functions are built here; the loop, optimizer, schedule,
checkpoints and logging are :class:`beit.engine.Trainer`'s.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from beit.data.datasets import RepeatedDataset, decode_image, decode_image_matching, output_stems
from beit.engine import ConfigError, TrainConfig, Trainer
from beit.engine import distributed as D
from beit.engine.checkpoint import config_from_checkpoint as _config_from_checkpoint
from beit.engine.checkpoint import load_model_state
from beit.engine.config import validate_config
from beit.engine.precision import autocast_for
from beit.interop.backbone import build_backbone as _build_backbone
from beit.interop.backbone import check_overrides_fit
from beit.models import Beit, BeitConfig
from beit.tasks.backbone_config import check_model_overrides

from .data import (
    ADE20K_CLASSES,
    SegEvalTransform,
    SegmentationDataset,
    SegTrainTransform,
    collate_eval,
    folder_pairs,
    list_pairs,
    load_class_names,
)
from .infer import inference, make_palette, save_overlay
from .metrics import ConfusionMatrix, format_table
from .model import BeitSegmenter, segmentation_loss

__all__ = [
    "SegDataConfig",
    "SegModelConfig",
    "SegTestConfig",
    "SegmentConfig",
    "build_datasets",
    "build_model",
    "config_from_checkpoint",
    "evaluate",
    "load_segmenter",
    "make_eval_fn",
    "make_step_fn",
    "predict",
    "train",
]

logger = logging.getLogger(__name__)

IMAGENET_MEAN_255 = [123.675, 116.28, 103.53]
IMAGENET_STD_255 = [58.395, 57.12, 57.375]


@dataclass
class SegModelConfig:
    """The network. ``init`` = a pre-trained BEiT checkpoint; empty = random init of ``arch``."""

    init: str = ""  # any file/dir/Hub id beit.load_model reads; "" = from scratch
    arch: str = "beit_base_patch16_224"  # preset used from scratch
    embed_dim: int | None = None  # from-scratch overrides of the preset (None = preset value)
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
        # the architecture of a checkpoint (init) or of a stored run (backbone) comes from it: a shape the user
        # gave would be dropped silently, so it is an error
        for name in ("embed_dim", "depth", "num_heads", "patch_size"):
            value = getattr(self, name)
            if value is None:
                continue
            source = f"model.init={self.init!r}" if self.init else ""
            if not source and self.backbone and self.backbone.get(name, value) != value:
                source = f"the checkpoint's stored backbone ({name}={self.backbone[name]})"
            if source:
                tail = " (or model.init to train from scratch)" if self.init else ""
                raise ConfigError(name, f"{name}={value} cannot apply with {source}: the architecture comes from its "
                                        f"weights. Remove model.{name}{tail}")


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
    classes: list[str] = field(default_factory=list)  # names; or classes_file; ade20k: its 150 names
    classes_file: str = ""
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

    def validate(self) -> None:
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
        if self.num_classes < 0:
            raise ConfigError("num_classes", f"must be >= 0, got {self.num_classes}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError("mean", "mean and std need 3 values each, std > 0")


@dataclass
class SegTestConfig:
    """Inference used by eval: whole image or sliding windows, optional flip / multi-scale."""

    mode: str = "slide"  # slide | whole
    crop: int = 0  # window size; 0 = data.crop_size
    stride: int = 341
    flip: bool = False
    scales: list[float] = field(default_factory=lambda: [1.0])
    max_images: int = 0  # evaluate on the first N val images only; 0 = all
    overlays: int = 2  # coloured overlays written by `segment eval` / visualize (0 = none)

    def validate(self) -> None:
        if self.mode not in ("slide", "whole"):
            raise ConfigError("mode", f"must be 'slide' or 'whole', got '{self.mode}'")
        if self.stride <= 0 or self.crop < 0:
            raise ConfigError("stride", "stride must be > 0 and crop >= 0")
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


# --------------------------------------------------------------------------------------- building
def class_names(dcfg: SegDataConfig) -> list[str]:
    """The class list: ``classes`` / ``classes_file`` / ADE20K's 150 names / ``class_<i>``."""
    if dcfg.classes or dcfg.classes_file:
        if dcfg.classes and dcfg.classes_file:
            raise ConfigError("data.classes", "give classes or classes_file, not both")
        return load_class_names(list(dcfg.classes) or dcfg.classes_file, dcfg.num_classes)
    if dcfg.format == "ade20k" and dcfg.num_classes in (0, len(ADE20K_CLASSES)):
        return list(ADE20K_CLASSES)
    if dcfg.num_classes <= 0:
        raise ConfigError("data.num_classes", "set num_classes or give the class names (data.classes)")
    return load_class_names(None, dcfg.num_classes)


def _pairs(dcfg: SegDataConfig, split: str) -> tuple[list[tuple[str, str]], list[str]]:
    if not dcfg.root:
        raise ConfigError("data.root", "set the dataset root (data.root=/path/to/data)")
    root = Path(dcfg.root).expanduser()
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
                                 class_names=names, seed=cfg.train.seed, problems=problems)
        if d.verify:
            ds.verify()
        if ds.num_skipped:
            logger.warning("%s: %d bad samples skipped, %d used", split, ds.num_skipped, len(ds))
        out[split] = RepeatedDataset(ds, d.repeat) if split == "train" and d.repeat > 1 else ds
    return out


def build_backbone(cfg: SegmentConfig) -> Beit:
    """The BEiT backbone at the crop size through ``beit.build_backbone``: from ``model.init`` (rel-pos tables
    made per-layer and resampled to the crop's grid), from the config stored by training
    (``model.backbone``), or from the preset ``model.arch``; ``model_overrides`` apply to all three."""
    m, crop = cfg.model, cfg.data.crop_size
    user = dict(cfg.model_overrides)
    user.update({k: getattr(m, k) for k in SHAPE_KEYS if getattr(m, k) is not None})
    fixed = {"head": "none", "drop_path_rate": m.drop_path_rate}  # SegmentConfig.validate refuses them in user
    if m.init:
        return _build_backbone(m.init, rel_pos="per_layer", **{**user, **fixed, "img_size": crop})
    if m.backbone:
        stored = BeitConfig.from_dict(dict(m.backbone))
        check_overrides_fit("the checkpoint's stored backbone", stored, user)
        return _build_backbone(stored, **{**user, **fixed})
    return _build_backbone(m.arch, **{"use_rel_pos_bias": True, "use_shared_rel_pos_bias": False, **user, **fixed,
                                      "img_size": crop})


def build_model(cfg: SegmentConfig, num_classes: int | None = None) -> BeitSegmenter:
    """Backbone + pyramid + UperNet (+ aux head); records the backbone config in ``cfg.model.backbone``."""
    num_classes = num_classes or len(class_names(cfg.data))
    backbone = build_backbone(cfg)
    m = cfg.model
    model = BeitSegmenter(backbone, num_classes, out_indices=m.out_indices, channels=m.channels,
                          aux_channels=m.aux_channels, pool_scales=tuple(m.pool_scales), dropout=m.dropout,
                          use_aux=m.aux_weight > 0)
    m.backbone = backbone.cfg.to_dict()
    return model.train()  # load_model hands the backbone back in eval mode


# --------------------------------------------------------------------------------------- step / eval
def make_step_fn(ignore_index: int, aux_weight: float = 0.4) -> Callable:
    """``step_fn(model, (images, masks)) -> (loss, metrics)`` for the engine: CE + aux_weight x aux CE."""

    def step_fn(model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images, masks = batch
        if aux_weight > 0:
            logits, aux = model(images, with_aux=True)
        else:
            logits, aux = model(images), None
        loss, parts = segmentation_loss(logits, masks, ignore_index, aux, aux_weight)
        valid = masks != ignore_index
        parts["pix_acc"] = ((logits.argmax(1) == masks) & valid).sum() / valid.sum().clamp(min=1)
        return loss, parts

    return step_fn


def _eval_subset(ds: Dataset, max_images: int) -> Dataset:
    n = len(ds) if max_images <= 0 else min(max_images, len(ds))
    idx = list(range(D.rank(), n, D.world_size()))  # each rank its share; counts are summed after
    return Subset(ds, idx)


def make_eval_fn(val_ds: SegmentationDataset, cfg: SegmentConfig, num_workers: int = 2) -> Callable:
    """``eval_fn(model) -> {"mIoU", "aAcc", "mAcc"}`` (percent) on the val set, sharded over ranks.

    The full result (per-class IoU / Acc) of the last call is kept in ``eval_fn.last`` for tables.
    """
    t, num_classes, ignore = cfg.test, val_ds.num_classes, val_ds.ignore_index
    crop = t.crop or cfg.data.crop_size

    @torch.no_grad()
    def eval_fn(model: nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        cm = ConfusionMatrix(num_classes, ignore, device)
        loader = DataLoader(_eval_subset(val_ds, t.max_images), batch_size=1, num_workers=num_workers,
                            collate_fn=collate_eval)
        for batch in loader:
            for img, mask in zip(batch["image"], batch["mask"]):
                probs = inference(model, img[None].to(device, non_blocking=True), num_classes, mode=t.mode,
                                  crop=crop, stride=t.stride, flip=t.flip, scales=t.scales, out_size=tuple(mask.shape))
                cm.update(probs.argmax(1)[0], mask.to(device))
        cm.all_reduce()
        res = cm.compute()
        eval_fn.last = res
        return {"mIoU": 100 * res["mIoU"], "aAcc": 100 * res["aAcc"], "mAcc": 100 * res["mAcc"]}

    eval_fn.last = None
    return eval_fn


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
        probs = inference(model, item["image"][None].to(device), val_ds.num_classes, mode=t.mode,
                          crop=t.crop or cfg.data.crop_size, stride=t.stride, out_size=tuple(item["mask"].shape))
        pred = probs.argmax(1)[0].cpu()
        img = decode_image_matching(item["path"], (item["mask"].shape[-1], item["mask"].shape[-2]))
        paths.append(save_overlay(Path(out_dir) / f"{prefix}_{i:03d}.png", img, pred, palette, gt=item["mask"],
                                  ignore_index=val_ds.ignore_index))
    model.train(was_training)
    return paths


# --------------------------------------------------------------------------------------- entry points
def train(cfg: SegmentConfig) -> dict[str, Any]:
    """Fine-tune BEiT + UperNet with the shared trainer; returns its final metrics (+ ``"table"``)."""
    validate_config(cfg)
    D.init_distributed()
    sets = build_datasets(cfg)
    val = sets["val"]
    model = build_model(cfg, val.num_classes)
    if D.world_size() > 1 and torch.cuda.is_available():  # the paper's SyncBN: 2 images per GPU are too few
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    eval_fn = make_eval_fn(val, cfg, cfg.train.num_workers)

    def visualize(m: nn.Module, step: int, out_dir: Path) -> None:
        if D.is_main():
            write_overlays(m, val, cfg, out_dir, 1, prefix=f"step_{step:07d}")

    trainer = Trainer(model, sets["train"], make_step_fn(cfg.data.ignore_index, cfg.model.aux_weight), cfg.train,
                      eval_fn=eval_fn, visualize_fn=visualize, metric_to_track="mIoU", mode="max", run_config=cfg)
    result = trainer.fit()
    if eval_fn.last is not None:
        result["table"] = format_table(eval_fn.last, val.class_names)
        result["per_class"] = eval_fn.last
        if D.is_main():
            print(result["table"])
    return result


def config_from_checkpoint(path: str | Path, config_file: str | None = None,
                           overrides: list[str] | None = None) -> tuple[SegmentConfig, dict[str, Any]]:
    """The run config stored in a training checkpoint (+ a YAML file + ``key=value`` overrides), and the state
    (``beit.engine.checkpoint.config_from_checkpoint`` with the segmentation schema)."""
    return _config_from_checkpoint(SegmentConfig, path, config_file, overrides)


def load_segmenter(path: str | Path, config_file: str | None = None, overrides: list[str] | None = None,
                   use_ema: bool = False) -> tuple[BeitSegmenter, SegmentConfig]:
    """A trained segmenter (eval mode) and its config from a training checkpoint (``last.pt`` / ``best.pt``)."""
    cfg, state = config_from_checkpoint(path, config_file, overrides)
    if not cfg.model.backbone:
        raise ValueError(f"{path}: the config has no model.backbone; was it written by `beit segment train`?")
    init, cfg.model.init = cfg.model.init, ""  # rebuild from the stored architecture, not the pre-trained file
    num_classes = len(class_names(cfg.data))
    model = build_model(cfg, num_classes)
    cfg.model.init = init
    sd = state["ema"] if use_ema and state.get("ema") is not None else state["model"]

    load_model_state(model, sd, source=str(path))
    return model.eval(), cfg


def evaluate(model: nn.Module, cfg: SegmentConfig, out_dir: str | Path | None = None) -> dict[str, Any]:
    """mIoU / aAcc / mAcc (percent), per-class results and the printable table on the val split."""
    val = build_datasets(cfg, ("val",))["val"]
    device = D.device()
    model.to(device).eval()
    eval_fn = make_eval_fn(val, cfg, cfg.train.num_workers)
    with autocast_for(device, cfg.train.precision):
        summary = eval_fn(model)
        if out_dir is not None and cfg.test.overlays > 0 and D.is_main():
            write_overlays(model, val, cfg, out_dir, cfg.test.overlays)
    return {**summary, "per_class": eval_fn.last, "table": format_table(eval_fn.last, val.class_names)}


@torch.no_grad()
def predict(model: BeitSegmenter, cfg: SegmentConfig, inputs: list[str | Path], out_dir: str | Path,
            alpha: float = 0.5) -> list[Path]:
    """For each image: ``<stem>_overlay.png`` (colours over the image) and ``<stem>_labels.png`` (class ids).

    Stems that repeat across folders become ``<dir>__<file>`` (``beit.data.datasets.output_stems``), so
    no result overwrites another. A file that cannot be read is skipped with a warning; ``index.json``
    in ``out_dir`` has one entry per input, in input order: its outputs, or its ``error``, and
    ``num_skipped``. Returns the overlays written.
    """


    device = D.device()
    model.to(device).eval()
    tf = SegEvalTransform(cfg.data.test_scale, cfg.data.mean, cfg.data.std)
    palette, t, out = make_palette(model.num_classes), cfg.test, Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written, index = [], []
    for path, stem in zip(inputs, output_stems(inputs)):
        try:
            img = decode_image(path)
        except Exception as err:  # noqa: BLE001 - any decoder error means unreadable
            logger.warning("skipping unreadable image %s (%s: %s)", path, type(err).__name__, err)
            index.append({"input": str(path), "error": f"unreadable: {type(err).__name__}: {err}"})
            continue
        x = tf.image(img)[None].to(device)
        with autocast_for(device, cfg.train.precision):
            probs = inference(model, x, model.num_classes, mode=t.mode, crop=t.crop or cfg.data.crop_size,
                              stride=t.stride, flip=t.flip, scales=t.scales, out_size=(img.height, img.width))
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
