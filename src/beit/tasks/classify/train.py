"""Fine-tuning a BEiT classifier, the paper's recipe, on the shared trainer.

Recipe (unilm ``run_class_finetuning.py``; BEiT-B from a self-supervised checkpoint): AdamW, lr 4e-3 at
batch 1024, cosine with 20 warmup epochs over 100, layer-wise lr decay 0.65 (0.75 large), drop path 0.1,
wd 0.05, RandAugment ``rand-m9-mstd0.5-inc1``, random erasing 0.25, mixup 0.8 / cutmix 1.0 with label
smoothing 0.1 folded into the soft targets, mean pooling + ``fc_norm``. A pre-training checkpoint is
turned into the fine-tuning model by ``beit.load_model``: shared relative-position table -> one copy per
block, tables resampled when the resolution changes, a fresh ``fc_norm`` (the checkpoint's final norm is not
copied into it, as in the official code), a fresh head (``init_scale`` 0.001).

Everything that trains goes through ``beit.engine.Trainer`` (optimizer, layer decay from
``model.layer_id``, schedule, EMA, checkpoints, exact resume); the config is ``config.py``, the model
``model.py``, the data ``data.py``; here are the mixup step, the final save and evaluation, and
:func:`finetune`. The presets are ``beit/configs/finetune_*.yaml`` (``beit configs``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import MISSING
from timm.data import Mixup
from torch import nn
from torch.utils.data import Dataset, IterableDataset

from ...data.datasets import set_max_image_pixels
from ...engine import ConfigError, TrainConfig, Trainer, load_checkpoint
from ...engine import distributed as D
from ...engine.checkpoint import find_resume_path
from ...engine.config import validate_config
from ...engine.logging import setup_logging
from ...engine.precision import autocast_for
from ...engine.threads import loader_workers
from ...engine.trainer import check_run_can_start, check_schedule
from ...interop import save_model
from ...interop.backbone import is_preset
from ...models import Beit
from ..backbone_config import check_model_source
from ..device_data import decode_summary
from .config import FinetuneConfig, LinprobeConfig
from .data import (
    build_datasets,
    build_device_train,
    build_preprocess,
    build_train_transform,
    build_val,
    check_num_classes,
)
from .evaluate import evaluate_model, make_eval_fn, write_report
from .model import build_model, check_img_size

__all__ = ["OUTPUTS", "begin_run", "finetune", "make_step_fn", "scaled_train_config"]

#: what a fine-tuning writes into ``train.output_dir`` besides the engine's files, by the checkpoint's weights it
#: exports (``model``, ``ema``): the model's folder and its eval report's (``--overwrite`` deletes them with the
#: earlier run, see ``beit.engine.rundir``)
FINAL_DIRS = {"model": ("model", "eval"), "ema": ("model_ema", "eval_ema")}
OUTPUTS = tuple(name for pair in FINAL_DIRS.values() for name in pair)
#: the units of the step's and the eval's metrics, as ``beit finetune`` prints them (``metrics.jsonl`` has the bare
#: values): the step's ``acc`` a fraction (as pre-training's ``mim_acc``), the eval's top-k percents
METRIC_UNITS = {"acc": "fraction, 0-1", "top1": "percent", "top5": "percent"}

logger = logging.getLogger(__name__)


def begin_run(cfg: FinetuneConfig | LinprobeConfig, what_model: str) -> None:
    """The start of ``beit finetune`` / ``beit linprobe``: validate ``cfg``, log to its output folder (main rank).

    Raises:
        ConfigError: a bad key, or ``model`` not set (``config key 'model': is not set: <what_model>``).
    """
    validate_config(cfg)
    setup_logging(cfg.train.output_dir, D.is_main())
    if cfg.model in ("", MISSING):
        raise ConfigError("model", f"is not set: {what_model}")
    check_model_source(cfg.model, "model")
    set_max_image_pixels(cfg.data.max_image_pixels)


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
    state = load_checkpoint(find_resume_path("auto", out) or out / "last.pt")  # last.pt, or FSDP2's last/
    result: dict[str, Any] = {}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    arch = arch.replace(extra={**arch.extra, "class_names": names}).with_preprocess(cfg.data.preprocess(cfg.img_size))
    for key, (sub, tag) in FINAL_DIRS.items():
        sd = state.get(key)
        if sd is None:
            continue
        model = Beit(arch)
        model.load_state_dict(sd)
        result[f"{sub}_dir"] = str(save_model(model, out / sub))
        if val is None:
            continue
        model.to(device).eval()
        loader = torch.utils.data.DataLoader(val, batch_size=eval_bs,
                                             num_workers=loader_workers(cfg.train.num_workers, say=False))
        with torch.no_grad(), autocast_for(device, "auto"):
            meter = evaluate_model(model, loader, len(names))
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
    begin_run(cfg, "a preset name (from scratch) or a checkpoint to fine-tune")
    # before the data is read: img_size against a preset's patch size, and an output folder holding an earlier
    # run (a resume is judged by fit(), against the config the data completes: class_names, num_classes)
    check_img_size(cfg)
    if not cfg.train.resume:
        check_run_can_start(cfg.train, cfg)
    preprocess = cfg.data.preprocess(cfg.img_size)

    def check_train(train: Dataset, names: list[str]) -> None:  # what the training set tells, before the val set
        # is decoded (data.verify_val, data.in_memory): the class count, and the run's steps (warmup vs max_steps)
        check_num_classes(cfg.num_classes, names, cfg.data.train_dir or "the training set")
        check_schedule(len(train), cfg.train, streaming=isinstance(train, IterableDataset))

    device_data = None
    if train_dataset is None:
        device_data = build_device_train(cfg, D.device(), cfg.class_names or None)
    if device_data is not None:
        train_dataset, collate, pipeline, names = device_data
        check_train(train_dataset, names)
        val_dataset = build_val(cfg.data, build_preprocess(preprocess), names, cfg.train.seed)
    elif train_dataset is None:
        train_dataset, val_dataset, names = build_datasets(
            cfg.data, build_train_transform(cfg.data, cfg.img_size), build_preprocess(preprocess),
            seed=cfg.train.seed, class_names=cfg.class_names or None, check_train=check_train)
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
    eval_fn = (make_eval_fn(val_dataset, num_classes, eval_bs, loader_workers(train_cfg.num_workers, say=False))
               if val_dataset is not None else None)
    step_fn = make_step_fn(cfg, num_classes)
    trainer = Trainer(model, train_dataset, step_fn, train_cfg, eval_fn=eval_fn,
                      collate_fn=collate if device_data is not None else None,
                      device_transform=pipeline if device_data is not None else None,
                      metric_to_track="top1" if eval_fn is not None else None, run_config=cfg, outputs=OUTPUTS)
    if is_preset(cfg.model) and train_cfg.layer_decay < 1.0:  # the CIFAR preset's 0.85 applies from scratch too
        logger.info("layer_decay %g with model=%s, a preset trained from scratch (every block starts random): the "
                    "lower blocks learn at a fraction of the lr, a recipe for pre-trained encoders "
                    "(train.layer_decay=1.0 turns it off)", train_cfg.layer_decay, cfg.model)
    result: dict[str, Any] = dict(trainer.fit(stop_after_step))
    result["class_names"] = names
    result["output_dir"] = str(trainer.out)
    if device_data is not None:
        result["data_decode"] = decode_summary(pipeline.decoder, logger.info)
    if trainer.step >= trainer.total_steps and D.is_main():
        result.update(_save_final(cfg, arch, trainer.out, names, val_dataset, eval_bs))
    return result
