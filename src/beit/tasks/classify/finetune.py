"""Fine-tuning a BEiT classifier, the paper's recipe, on the shared trainer.

Recipe (unilm ``run_class_finetuning.py``; BEiT-B from a self-supervised checkpoint): AdamW, lr 4e-3 at
batch 1024, cosine with 20 warmup epochs over 100, layer-wise lr decay 0.65 (0.75 large), drop path 0.1,
wd 0.05, RandAugment ``rand-m9-mstd0.5-inc1``, random erasing 0.25, mixup 0.8 / cutmix 1.0 with label
smoothing 0.1 folded into the soft targets, mean pooling + ``fc_norm``. A pre-training checkpoint is
turned into the fine-tuning model by ``beit.load_model``: shared relative-position table -> one copy per
block, tables resampled when the resolution changes, a fresh head (``init_scale`` 0.001).

Everything that trains goes through ``beit.engine.Trainer`` (optimizer, layer decay from
``model.layer_id``, schedule, EMA, checkpoints, exact resume); this module builds the model, the data,
the mixup step and the evaluation around it. The presets are ``beit/configs/finetune_*.yaml`` (``beit configs``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import MISSING
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torch.utils.data import Dataset

from ...engine import ConfigError, TrainConfig
from ...engine import distributed as D
from ...engine.config import validate_config
from ...engine.precision import autocast_for
from ...interop.backbone import (  # noqa: F401 - source_config / check_overrides_fit / SHAPE_FIELDS: old home
    SHAPE_FIELDS,
    build_backbone,
    check_overrides_fit,
    is_preset,
    source_config,
)
from ...models.config import Preprocess
from ..backbone_config import check_model_overrides
from .evaluate import build_preprocess

__all__ = ["DataConfig", "FinetuneConfig", "build_datasets", "build_model", "build_train_transform",
           "finetune", "make_step_fn", "scaled_train_config"]

logger = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """Image folders (``root/<class>/<image>``) and their preprocessing; shared by fine-tuning and linprobe."""

    train_dir: str = ""
    val_dir: str = ""  # "" = no evaluation during training
    in_memory: bool = False  # decode every image once into a uint8 tensor (small images: CIFAR)
    memory_size: int | None = None  # with in_memory: resize short side + center crop to this when decoding
    verify_val: bool = True  # decode the val set once up front and leave unreadable files out
    resize: str = "crop"  # crop: random-resized crop / center crop; full: whole image to img_size^2 (documents)
    grayscale: bool = False  # gray -> 3 channels (scans); keeps color out of the decision
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"  # RandAugment (timm string), null = off
    color_jitter: float = 0.4  # used by timm only when auto_augment is off
    reprob: float = 0.25  # random erasing probability
    scale: tuple[float, float] = (0.08, 1.0)  # random-resized-crop area range
    hflip: float = 0.5
    crop_pct: float | None = None  # eval center-crop fraction; null = 224/256 (1.0 at <=32 and >=384 px)
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_MEAN)  # type: ignore[assignment]
    std: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_STD)  # type: ignore[assignment]
    eval_batch_size: int = 0  # 0 = train.batch_size
    device: str = "auto"  # where training images are decoded and augmented: auto (gpu on CUDA when the recipe
    # allows) | cpu (PIL in the workers) | gpu (batched nvJPEG decode + per-sample augmentation on the device)

    def validate(self) -> None:
        if self.resize not in ("crop", "full"):
            raise ConfigError("resize", f"must be 'crop' or 'full', got '{self.resize}'")
        if self.resize == "full" and self.auto_augment:
            raise ConfigError("auto_augment", "resize=full (documents) takes no RandAugment; set it to null")
        if not 0.0 <= self.reprob <= 1.0:
            raise ConfigError("reprob", f"must be in [0, 1], got {self.reprob}")
        if not 0.0 <= self.hflip <= 1.0:
            raise ConfigError("hflip", f"must be in [0, 1], got {self.hflip}")
        if self.crop_pct is not None and not 0.0 < self.crop_pct <= 1.0:
            raise ConfigError("crop_pct", f"must be in (0, 1] or null, got {self.crop_pct}")
        if self.eval_batch_size < 0:
            raise ConfigError("eval_batch_size", f"must be >= 0, got {self.eval_batch_size}")

    def preprocess(self, img_size: int) -> Preprocess:
        """The eval preprocessing, as stored in the fine-tuned model."""
        return Preprocess(img_size=img_size, resize=self.resize, crop_pct=self.crop_pct,
                          interpolation=self.interpolation, grayscale=self.grayscale,
                          mean=tuple(self.mean), std=tuple(self.std))


def _finetune_train_defaults() -> TrainConfig:
    return TrainConfig(output_dir="runs/finetune", epochs=100, warmup_epochs=20, lr=4e-3, min_lr=1e-6,
                       weight_decay=0.05, layer_decay=0.65, batch_size=128)


@dataclass
class FinetuneConfig:
    """``beit finetune``: model + data + recipe knobs + the engine's ``train`` section."""

    model: str = MISSING  # preset name (from scratch) or checkpoint: file, directory, Hub id, URL, last.pt
    model_overrides: dict[str, Any] = field(default_factory=dict)  # BeitConfig fields, e.g. {depth: 6}
    num_classes: int = 0  # 0 = the number of class folders; else must equal it
    class_names: list[str] = field(default_factory=list)  # label order; [] = sorted folders (filled in)
    img_size: int = 224
    drop_path: float = 0.1
    use_mean_pooling: bool = True  # fc_norm(mean of patch tokens), as the paper's fine-tuning
    rel_pos: str = "per_layer"  # per_layer: shared table copied to every block | keep: as in the checkpoint
    ref_batch: int = 0  # > 0: train.lr/min_lr are for this total batch and scale linearly to the real one
    # mixup / cutmix (timm Mixup); label smoothing is folded into its soft targets
    mixup: float = 0.8
    cutmix: float = 1.0
    cutmix_minmax: tuple[float, float] | None = None
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"  # batch | pair | elem
    smoothing: float = 0.1
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=_finetune_train_defaults)

    @property
    def mixup_active(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0 or self.cutmix_minmax is not None

    def validate(self) -> None:
        if self.num_classes < 0:
            raise ConfigError("num_classes", f"must be >= 0 (0 = from the data), got {self.num_classes}")
        if self.img_size <= 0:
            raise ConfigError("img_size", f"must be > 0, got {self.img_size}")
        if not 0.0 <= self.drop_path < 1.0:
            raise ConfigError("drop_path", f"must be in [0, 1), got {self.drop_path}")
        if self.rel_pos not in ("per_layer", "keep"):
            raise ConfigError("rel_pos", f"must be 'per_layer' or 'keep', got '{self.rel_pos}'")
        _check_model_overrides(self.model_overrides)
        for k in ("img_size", "num_classes", "drop_path_rate", "head"):
            if k in self.model_overrides:
                raise ConfigError(f"model_overrides.{k}", "set by the fine-tuning config itself "
                                                          "(img_size, num_classes, drop_path); set those keys")
        if not 0.0 <= self.smoothing < 1.0:
            raise ConfigError("smoothing", f"must be in [0, 1), got {self.smoothing}")
        if self.mixup < 0 or self.cutmix < 0:
            raise ConfigError("mixup", f"mixup and cutmix alphas must be >= 0, got {self.mixup}, {self.cutmix}")
        if not 0.0 <= self.mixup_prob <= 1.0 or not 0.0 <= self.mixup_switch_prob <= 1.0:
            raise ConfigError("mixup_prob", "mixup_prob and mixup_switch_prob must be in [0, 1]")
        if self.mixup_mode not in ("batch", "pair", "elem"):
            raise ConfigError("mixup_mode", f"must be batch | pair | elem, got '{self.mixup_mode}'")
        if self.mixup_active and self.train.batch_size % 2:
            raise ConfigError("train.batch_size", f"mixup/cutmix need an even batch, got {self.train.batch_size}")
        if self.ref_batch < 0:
            raise ConfigError("ref_batch", f"must be >= 0, got {self.ref_batch}")
        if self.class_names and len(set(self.class_names)) != len(self.class_names):
            raise ConfigError("class_names", "has duplicates")


# ---------------------------------------------------------------------------------------- model
def _check_model_overrides(overrides: dict[str, Any], key: str = "model_overrides") -> None:
    """Unknown BeitConfig fields fail at config time, naming the key (ConfigError)."""
    check_model_overrides(overrides, key=key)


def _reset_head(model: nn.Module) -> None:
    from timm.layers import trunc_normal_

    trunc_normal_(model.head.weight, std=model.cfg.init_std)
    nn.init.zeros_(model.head.bias)
    model.head.weight.data.mul_(model.cfg.init_scale)


def build_model(cfg: FinetuneConfig, num_classes: int, class_names: list[str] | None = None) -> nn.Module:
    """Classifier for ``cfg``: a preset from scratch, or a checkpoint through ``beit.load_model`` with the
    fine-tuning overrides (per-layer rel-pos, resampled tables, mean pooling, drop path, new head).

    A classifier checkpoint whose stored class names differ from ``class_names`` gets a fresh head even when
    the class count matches (its old head would map the new labels to the wrong outputs).
    """
    over: dict[str, Any] = dict(num_classes=num_classes, img_size=cfg.img_size, drop_path_rate=cfg.drop_path,
                                use_mean_pooling=cfg.use_mean_pooling, head="cls")
    over.update(cfg.model_overrides)
    model = build_backbone(cfg.model, rel_pos=cfg.rel_pos, **over)
    # a classifier checkpoint of the same class count keeps its head; its stored names tell whether they match
    old_names = list((model.cfg.extra or {}).get("class_names") or [])
    if (not is_preset(cfg.model) and class_names and len(old_names) == num_classes
            and old_names != list(class_names)):
        logger.info("checkpoint classes %s... differ from the data's: new head", old_names[:3])
        _reset_head(model)
    return model.train()


# ---------------------------------------------------------------------------------------- data
def build_train_transform(data: DataConfig, img_size: int) -> Any:
    """Training augmentation: the paper's recipe via the data helper, or the document recipe (``resize=full``:
    whole page to ``img_size^2``, no crop, no color augmentation, optional random erasing)."""
    from torchvision import transforms as T

    from ...data.transforms import build_finetune_transform, build_full_image_transform

    if data.resize == "crop":
        tf = build_finetune_transform(True, img_size, auto_augment=data.auto_augment or None,
                                      color_jitter=data.color_jitter, re_prob=data.reprob, scale=tuple(data.scale),
                                      hflip=data.hflip, interpolation=data.interpolation,
                                      mean=tuple(data.mean), std=tuple(data.std))
    else:
        tf = build_full_image_transform(True, img_size, hflip=data.hflip, re_prob=data.reprob,
                                        interpolation=data.interpolation, mean=tuple(data.mean), std=tuple(data.std))
    steps = list(tf.transforms)
    if data.grayscale:
        steps.insert(0, T.Grayscale(num_output_channels=3))
    return T.Compose(steps)


def build_datasets(data: DataConfig, train_transform: Any, eval_transform: Any, *, seed: int = 0,
                   class_names: list[str] | None = None) -> tuple[Dataset, Dataset | None, list[str]]:
    """Train / val datasets from folders (or decoded into memory) and the class names in label order.

    The val folders must hold exactly the training classes; with ``verify_val`` unreadable val images are
    left out (counted and logged) instead of being replaced by a neighbour.
    """
    from ...data.datasets import LabeledImageFolder, TensorImageDataset, load_image_folder_to_memory

    if not data.train_dir:
        raise ConfigError("data.train_dir", "is empty: point it to a folder of class sub-folders")
    names = list(class_names) if class_names else None
    if data.in_memory:
        images, labels, names = load_image_folder_to_memory(data.train_dir, size=data.memory_size, class_names=names)
        train: Dataset = TensorImageDataset(images, labels, train_transform, seed=seed)
    else:
        folder = LabeledImageFolder(data.train_dir, train_transform, class_names=names, seed=seed)
        train, names = folder, list(folder.classes)
    return train, _build_val(data, eval_transform, names, seed), list(names)


def _build_val(data: DataConfig, eval_transform: Any, names: list[str], seed: int) -> Dataset | None:
    """The val dataset of ``data`` for the training classes ``names`` (None without ``val_dir``)."""
    from ...data.datasets import LabeledImageFolder, TensorImageDataset, load_image_folder_to_memory
    from .evaluate import _readable_subset

    val: Dataset | None = None
    if data.val_dir:
        try:
            if data.in_memory:
                images, labels, _ = load_image_folder_to_memory(data.val_dir, size=data.memory_size, class_names=names)
                val = TensorImageDataset(images, labels, eval_transform, seed=seed)
            else:
                vf = LabeledImageFolder(data.val_dir, eval_transform, class_names=names, seed=seed)
                val = _readable_subset(vf, num_threads=8)[0] if data.verify_val else vf
        except ValueError as e:
            raise ValueError(f"validation set {data.val_dir!r} does not fit the {len(names)} training classes: "
                             f"{e}") from None
    return val


def _device_path_blocker(data: DataConfig) -> str | None:
    """Why the training recipe of ``data`` cannot run on the batched device path (None = it can)."""
    if data.resize != "crop":
        return f"data.resize={data.resize!r} (only 'crop')"
    if data.grayscale:
        return "data.grayscale=true"
    if data.interpolation != "bicubic":
        return f"data.interpolation={data.interpolation!r} (only 'bicubic')"
    if data.auto_augment and not str(data.auto_augment).startswith("rand"):
        return f"data.auto_augment={data.auto_augment!r} (only RandAugment 'rand-...')"
    if not data.auto_augment and data.color_jitter:
        return "data.color_jitter without auto_augment (no colour jitter on the device path)"
    return None


def build_device_train(cfg: FinetuneConfig, device: torch.device | str, class_names: list[str] | None = None
                       ) -> tuple[Dataset, Any, Any, list[str]] | None:
    """The batched on-device training data (``data.device``), or None for the CPU path.

    Returns ``(dataset, collate_fn, pipeline, class_names)``; ``pipeline(batch)`` gives ``(images, labels)``
    on ``device`` with the paper's recipe applied per sample (``beit.data.gpu_augment.FinetuneAugment``).

    Raises:
        ConfigError: ``data.device`` is not auto | cpu | gpu, or ``gpu`` with a recipe the device path lacks.
    """
    from ...data.gpu_augment import FinetuneAugment
    from ...data.gpu_decode import (
        EncodedImageFiles,
        FinetunePipeline,
        InMemoryIndices,
        collate_encoded,
        use_device_path,
    )

    data = cfg.data
    try:
        wanted = use_device_path(data.device, device)
    except ValueError as e:
        raise ConfigError("data.device", str(e)) from None
    if not wanted:
        return None
    blocker = _device_path_blocker(data)
    if blocker is not None:
        if data.device == "gpu":
            raise ConfigError("data.device", f"gpu cannot run this recipe: {blocker}; use auto or cpu")
        logger.info("data.device=auto: CPU data path, because of %s", blocker)
        return None
    if not data.train_dir:
        raise ConfigError("data.train_dir", "is empty: point it to a folder of class sub-folders")
    try:
        augment = FinetuneAugment(cfg.img_size, scale=tuple(data.scale), hflip=data.hflip,
                                  auto_augment=data.auto_augment or None, re_prob=data.reprob,
                                  mean=tuple(data.mean), std=tuple(data.std), seed=cfg.train.seed)
    except ValueError as e:
        raise ConfigError("data.auto_augment", str(e)) from None
    if data.in_memory:
        from ...data.datasets import load_image_folder_to_memory

        images, labels, names = load_image_folder_to_memory(data.train_dir, size=data.memory_size,
                                                            class_names=class_names or None)
        return (InMemoryIndices(len(images), seed=cfg.train.seed), InMemoryIndices.collate,
                FinetunePipeline(augment, device, images, labels), list(names))
    ds = EncodedImageFiles.from_folder(data.train_dir, labeled=True, class_names=class_names or None,
                                       seed=cfg.train.seed)
    return ds, collate_encoded, FinetunePipeline(augment, device), list(ds.classes)  # type: ignore[attr-defined]


def check_num_classes(requested: int, names: list[str], where: str) -> int:
    """The class count, or a clear error when the config asks for another one than the data holds."""
    if requested and requested != len(names):
        shown = ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
        raise ValueError(f"num_classes={requested} but {where} has {len(names)} classes ({shown}); "
                         "set num_classes=0 to take them from the data")
    return len(names)


# ---------------------------------------------------------------------------------------- training
def scaled_train_config(train: TrainConfig, ref_batch: int) -> TrainConfig:
    """``train`` with lr / min_lr scaled by ``total batch / ref_batch`` (unchanged when ``ref_batch`` is 0).

    The total batch counts every rank (``WORLD_SIZE``) and gradient accumulation, as the official scripts.
    """
    if ref_batch <= 0:
        return train
    world = D.world_size()
    total = train.batch_size * train.accum_steps * world
    s = total / ref_batch
    logger.info("lr %.3g x %d/%d = %.3g (total batch %d)", train.lr, total, ref_batch, train.lr * s, total)
    return dataclasses.replace(train, lr=train.lr * s, min_lr=train.min_lr * s)


def make_step_fn(cfg: FinetuneConfig, num_classes: int) -> Callable[[nn.Module, Any], tuple[torch.Tensor, dict]]:
    """``(model, batch) -> (loss, metrics)``: mixup/cutmix + soft-target CE, or (smoothed) CE without mixup.

    Mixup draws from NumPy's global RNG in the training process, which the engine checkpoints, so a
    resumed run mixes exactly as the uninterrupted one.
    """
    mixup_fn = None
    if cfg.mixup_active:
        from timm.data import Mixup

        mixup_fn = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix,
                         cutmix_minmax=tuple(cfg.cutmix_minmax) if cfg.cutmix_minmax else None,
                         prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode,
                         label_smoothing=cfg.smoothing, num_classes=num_classes)
    smoothing = cfg.smoothing

    def step_fn(model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        images, targets = batch
        if mixup_fn is not None:
            images, soft = mixup_fn(images, targets)
            logits = model(images).float()
            loss = torch.sum(-soft * F.log_softmax(logits, dim=-1), dim=-1).mean()
            return loss, {}
        logits = model(images).float()
        loss = F.cross_entropy(logits, targets, label_smoothing=smoothing)
        return loss, {"acc": (logits.argmax(-1) == targets).float().mean()}

    return step_fn


def _save_final(cfg: FinetuneConfig, arch: Any, out: Path, names: list[str], val: Dataset | None,
                eval_bs: int) -> dict[str, Any]:
    """Main rank, after training: ``model/`` (+ ``model_ema/``) in our format and the eval report.

    Weights come from the last checkpoint (``last.pt``, or FSDP2's sharded ``last/`` read in full), into a
    model of ``arch``.
    """
    from ...engine import load_checkpoint
    from ...engine.checkpoint import find_resume_path
    from ...interop import save_model
    from ...models import Beit
    from .evaluate import evaluate_model, write_report

    state = load_checkpoint(find_resume_path("auto", out) or out / "last.pt")  # last.pt, or FSDP2's last/
    result: dict[str, Any] = {}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    arch = arch.replace(extra={**arch.extra, "class_names": names}).with_preprocess(cfg.data.preprocess(cfg.img_size))
    for key, sub in (("model", "model"), ("ema", "model_ema")):
        sd = state.get(key)
        if sd is None:
            continue
        model = Beit(arch)
        model.load_state_dict(sd)
        result[f"{sub}_dir"] = str(save_model(model, out / sub))
        if val is None:
            continue
        model.to(device).eval()
        loader = torch.utils.data.DataLoader(val, batch_size=eval_bs, num_workers=cfg.train.num_workers)
        with torch.no_grad(), autocast_for(device, "auto"):
            meter = evaluate_model(model, loader, len(names))
        tag = "eval" if key == "model" else "eval_ema"
        rep = write_report(meter, names, out / tag, extra={"checkpoint": str(out / sub)})
        prefix = "" if key == "model" else "ema_"
        result.update({f"{prefix}top1": rep["top1"], f"{prefix}top5": rep["top5"],
                       f"{prefix}report": str(out / tag / "metrics.json"),
                       f"{prefix}confusion_png": rep["confusion_png"]})
    return result


def finetune(cfg: FinetuneConfig, *, train_dataset: Dataset | None = None, val_dataset: Dataset | None = None,
             class_names: list[str] | None = None, stop_after_step: int | None = None) -> dict[str, Any]:
    """Fine-tune ``cfg.model`` on the data in ``cfg.data`` (or the datasets given) with the shared trainer.

    Datasets passed in must yield ``(image tensor, label)``; ``class_names`` then names their labels.
    ``stop_after_step`` stops early without changing the schedule (resume later with ``train.resume=auto``).
    Returns the trainer's final metrics plus, when training finished, ``top1`` / ``top5`` of the final
    model on the val set, the report and confusion PNG paths and ``model_dir`` (a ``save_model``
    directory that ``beit evaluate`` / ``beit predict`` / ``beit.load_model`` read).
    """
    from ...engine import Trainer
    from ...engine import distributed as D
    from ...engine.logging import setup_logging
    from .evaluate import make_eval_fn

    validate_config(cfg)
    setup_logging(cfg.train.output_dir, D.is_main())
    if cfg.model in ("", MISSING):
        raise ConfigError("model", "is not set: a preset name (from scratch) or a checkpoint to fine-tune")
    preprocess = cfg.data.preprocess(cfg.img_size)
    device_data = None
    if train_dataset is None:
        device_data = build_device_train(cfg, D.device(), cfg.class_names or None)
    if device_data is not None:
        train_dataset, collate, pipeline, names = device_data
        val_dataset = _build_val(cfg.data, build_preprocess(preprocess), names, cfg.train.seed)
    elif train_dataset is None:
        train_dataset, val_dataset, names = build_datasets(
            cfg.data, build_train_transform(cfg.data, cfg.img_size), build_preprocess(preprocess),
            seed=cfg.train.seed, class_names=cfg.class_names or None)
    else:
        names = list(class_names or cfg.class_names)
        if not names:
            raise ValueError("finetune(train_dataset=...) needs class_names (or cfg.class_names)")
    num_classes = check_num_classes(cfg.num_classes, names, cfg.data.train_dir or "the training set")
    cfg = dataclasses.replace(cfg, class_names=list(names), num_classes=num_classes)

    torch.manual_seed(cfg.train.seed)  # the new head's init is part of the run
    model = build_model(cfg, num_classes, names)
    arch = model.cfg
    train_cfg = scaled_train_config(cfg.train, cfg.ref_batch)
    eval_bs = cfg.data.eval_batch_size or train_cfg.batch_size
    eval_fn = (make_eval_fn(val_dataset, num_classes, eval_bs, train_cfg.num_workers)
               if val_dataset is not None else None)
    step_fn = make_step_fn(cfg, num_classes)
    if device_data is not None:
        from ...data.gpu_decode import with_pipeline

        step_fn = with_pipeline(step_fn, pipeline)
    trainer = Trainer(model, train_dataset, step_fn, train_cfg, eval_fn=eval_fn,
                      collate_fn=collate if device_data is not None else None,
                      metric_to_track="top1" if eval_fn is not None else None, run_config=cfg)
    result: dict[str, Any] = dict(trainer.fit(stop_after_step))
    result["class_names"] = names
    result["output_dir"] = str(trainer.out)
    if device_data is not None:  # what the batched decoder did: GPU decodes, CPU fallbacks, skipped files
        result["data_decode"] = pipeline.decoder.summary()
        logger.info("data: %s", result["data_decode"])
    if trainer.step >= trainer.total_steps and D.is_main():
        result.update(_save_final(cfg, arch, trainer.out, names, val_dataset, eval_bs))
    return result
