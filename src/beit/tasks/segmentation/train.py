"""Train, evaluate and run BEiT + UperNet segmentation through the shared engine.

Recipe defaults are the paper's ADE20K setup for a BEiT checkpoint that was only pre-trained (unilm
``upernet_beit_base_12_512_slide_160k_ade20k_pt.py``): 512 crops, AdamW lr 7e-4, betas (0.9, 0.999),
weight decay 0.05, layer decay 0.65, poly schedule (power 1, min lr 0) after 1500 linear warmup steps,
160k steps of 16 images (8 GPUs x 2), drop path 0.1, slide test with 512 windows, stride 341::

    cfg = load_config(SegmentConfig, beit.configs.preset_path("segment_ade20k_base"),
                      ["data.root=/data/ADEChallengeData2016"])
    train(cfg)

The config is ``config.py``, the network built from it ``model.py``, the datasets ``data.py``; here are the
step / eval functions the engine calls and the entries :func:`train` and :func:`evaluate`. The loop,
optimizer, schedule, checkpoints and logging are :class:`beit.engine.Trainer`'s.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from beit._text import first_few
from beit.data.datasets import set_max_image_pixels
from beit.engine import Trainer, seed_everything
from beit.engine import distributed as D
from beit.engine.config import ConfigError, to_dict, validate_config
from beit.engine.logging import setup_logging
from beit.engine.precision import autocast_for
from beit.engine.rundir import ConfigChangedError, class_count_refusal
from beit.engine.threads import loader_workers
from beit.engine.trainer import check_run_can_start, check_schedule, worker_init

from .config import SegmentConfig
from .data import SegmentationDataset, build_datasets, check_data_root, class_names, collate_eval
from .infer import inference, write_overlays
from .metrics import ConfusionMatrix, format_table
from .model import build_model, segmentation_loss

__all__ = ["OUTPUTS", "check_batchnorm_batch", "evaluate", "make_eval_fn", "make_step_fn", "train"]

#: what a segmentation training writes into ``train.output_dir`` besides the engine's files: nothing (its overlays
#: go to the engine's ``images/``; ``beit segment eval`` / ``predict`` write where ``--out`` says)
OUTPUTS: tuple[str, ...] = ()

logger = logging.getLogger(__name__)


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
    crop, stride = t.window(cfg.data.crop_size)

    @torch.no_grad()
    def eval_fn(model: nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        cm = ConfusionMatrix(num_classes, ignore, device)
        loader = DataLoader(_eval_subset(val_ds, t.max_images), batch_size=1, num_workers=num_workers,
                            collate_fn=collate_eval, worker_init_fn=worker_init)
        for batch in loader:
            for img, mask in zip(batch["image"], batch["mask"]):
                probs = inference(model, img[None].to(device, non_blocking=True), num_classes, mode=t.mode,
                                  crop=crop, stride=stride, flip=t.flip, scales=t.scales, out_size=tuple(mask.shape))
                cm.update(probs.argmax(1)[0], mask.to(device))
        cm.all_reduce()
        res = cm.compute()
        eval_fn.last = res
        return {"mIoU": 100 * res["mIoU"], "aAcc": 100 * res["aAcc"], "mAcc": 100 * res["mAcc"]}

    eval_fn.last = None
    return eval_fn


def _decode_head_fits(names: list[str], cfg: SegmentConfig) -> Callable[[dict[str, Any], Path], None]:
    """The resume check of a checkpoint written before the class names were stored in it (``model.classes``,
    which the engine compares): its decode head's number of classes against the class list now.

    Raises (from the returned check):
        ConfigChangedError: another number of classes, naming both counts and the list's source.
    """

    def check(state: dict[str, Any], path: Path) -> None:
        weight = (state.get("model") or {}).get("decode_head.conv_seg.weight")
        if weight is None or int(weight.shape[0]) == len(names):
            return
        raise ConfigChangedError(class_count_refusal(
            path, to_dict(cfg), int(weight.shape[0]),
            counted_by="the size of its decode head; it predates stored class names"))

    return check


def check_batchnorm_batch(cfg: SegmentConfig) -> None:
    """The decoder's BatchNorms see one value per channel and image where a map is 1x1: the pyramid pooling's 1x1
    level (``1`` in ``model.pool_scales``, the recipe's) and, for a ``data.crop_size`` under 64, the stride-32 level.
    A step of one image per BatchNorm there (``train.batch_size=1`` in one process, or on each CPU rank, where there
    is no SyncBN) failed at the first step with torch's "Expected more than 1 value per channel when training",
    after the run folder was made. Checked before anything is written.

    Raises:
        ConfigError: ``train.batch_size``, naming the 1x1 map and the fixes.
    """
    synced = D.world_size() > 1 and torch.cuda.is_available()  # train() converts to SyncBatchNorm then
    if cfg.train.batch_size * (D.world_size() if synced else 1) >= 2:
        return
    if 1 in cfg.model.pool_scales:
        why, fix = "the pyramid pooling's 1x1 level (1 in model.pool_scales)", "leave 1 out of model.pool_scales"
    elif cfg.data.crop_size < 64:
        why = f"the stride-32 level of a data.crop_size={cfg.data.crop_size} crop (1x1)"
        fix = "data.crop_size=64 or more"
    else:
        return
    where = "on each process (no SyncBN without CUDA)" if D.world_size() > 1 else "in one process"
    raise ConfigError("train.batch_size", f"{cfg.train.batch_size} image a step {where} cannot train the segmenter: "
                                          f"{why} is normalised by BatchNorm over one value per channel; use "
                                          f"train.batch_size=2 or more, or {fix}")


def train(cfg: SegmentConfig) -> dict[str, Any]:
    """Fine-tune BEiT + UperNet with the shared trainer; returns its final metrics (+ ``"table"``).

    Fills in ``cfg.model.classes`` (the class names, so the checkpoints hold them) and ``cfg.model.backbone``.
    """
    validate_config(cfg)
    check_batchnorm_batch(cfg)
    check_data_root(cfg.data)  # before the model is built (a checkpoint read) and the run folder made
    set_max_image_pixels(cfg.data.max_image_pixels)
    D.init_distributed()
    # the run's log from here (as finetune's): what model.init loaded is said in it (the engine sets it up later)
    setup_logging(cfg.train.output_dir, D.is_main())
    names = class_names(cfg.data)
    # the checkpoints keep the names themselves (data.classes_file stays, for reference): eval and predict then
    # need no class list file, which may have moved since
    if cfg.model.classes and list(cfg.model.classes) != names:  # was: replaced without a word
        raise ConfigError("model.classes", f"filled in by training from the data's class list "
                                           f"({len(names)} names: {first_few(names, 4)}), not an input: set "
                                           "data.classes=[...] or data.classes_file=FILE instead")
    cfg.model.classes = names
    seed_everything(cfg.train.seed)  # the heads' random init is part of the run: runs repeat exactly
    model = build_model(cfg, len(names))  # fills in model.backbone, which the checkpoint's config has too
    # the output folder and --resume as fit() will judge them (a class list edited since the checkpoint: another
    # number of classes; another config), before the datasets are listed (and checked: data.verify)
    check_run_can_start(cfg.train, cfg, check_state=_decode_head_fits(names, cfg))
    train_set = build_datasets(cfg, ("train",))["train"]
    check_schedule(len(train_set), cfg.train)  # warmup vs the run's steps, before the val pairs are read (verify)
    val = build_datasets(cfg, ("val",))["val"]
    if D.world_size() > 1 and torch.cuda.is_available():  # the paper's SyncBN: 2 images per GPU are too few
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    eval_fn = make_eval_fn(val, cfg, loader_workers(cfg.train.num_workers, say=False))  # the trainer says a cap

    def visualize(m: nn.Module, step: int, out_dir: Path) -> None:
        if D.is_main():
            write_overlays(m, val, cfg, out_dir, 1, prefix=f"step_{step:07d}")

    trainer = Trainer(model, train_set, make_step_fn(cfg.data.ignore_index, cfg.model.aux_weight), cfg.train,
                      eval_fn=eval_fn, visualize_fn=visualize, metric_to_track="mIoU", mode="max", run_config=cfg,
                      outputs=OUTPUTS)
    result = trainer.fit()
    if eval_fn.last is not None:
        result["table"] = format_table(eval_fn.last, val.class_names)
        result["per_class"] = eval_fn.last
        if D.is_main():
            print(result["table"])
    return result


def evaluate(model: nn.Module, cfg: SegmentConfig, out_dir: str | Path | None = None) -> dict[str, Any]:
    """mIoU / aAcc / mAcc (percent), per-class results and the printable table on the val split."""
    val = build_datasets(cfg, ("val",))["val"]
    device = D.device()
    model.to(device).eval()
    eval_fn = make_eval_fn(val, cfg, loader_workers(cfg.train.num_workers))
    with autocast_for(device, cfg.train.precision):
        summary = eval_fn(model)
        if out_dir is not None and cfg.test.overlays > 0 and D.is_main():
            write_overlays(model, val, cfg, out_dir, cfg.test.overlays)
    return {**summary, "per_class": eval_fn.last, "table": format_table(eval_fn.last, val.class_names)}

