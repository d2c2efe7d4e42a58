"""Fine-tune a BEiT layout detector on a COCO-format dataset with the shared engine.

The task supplies the detector, the datasets, a ``step_fn`` that sums torchvision's loss dict, and an
``eval_fn`` that runs COCOeval; the engine does the optimizer (AdamW with layer-wise lr decay over the
backbone's blocks; pyramid, FPN and heads at the top rate), schedule, bf16, DDP, checkpoints and resume.
The config is ``config.py``, the detector built from it ``model.py``, the datasets ``data.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...data.datasets import RepeatedDataset, set_max_image_pixels
from ...engine import Trainer, is_main
from ...engine.config import validate_config
from ...engine.distributed import init_distributed
from ...engine.logging import setup_logging
from ...engine.threads import loader_workers
from ...engine.trainer import check_run_can_start, check_schedule, seed_everything
from .config import LayoutConfig
from .data import CocoLayoutDataset, build_datasets, check_paths, collate, image_folders
from .evaluate import evaluate_model, format_table
from .model import build_detector
from .predict import draw_detections

__all__ = ["OUTPUTS", "make_eval_fn", "make_visualize_fn", "step_fn", "train"]

#: what a layout training writes into ``train.output_dir`` besides the engine's files: the last evaluation's AP
#: table (``--overwrite`` deletes it with the earlier run, see ``beit.engine.rundir``)
AP_TABLE = "ap_table.txt"
OUTPUTS = (AP_TABLE,)


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


def _preview_page(train_ds: CocoLayoutDataset) -> CocoLayoutDataset:
    """The page drawn every ``train.image_every`` steps without a validation set: the first training page with a
    box (a page without one, kept as a negative, is no dataset of its own), as it is (not augmented)."""
    page = next(im["id"] for im in train_ds.images if any(not a["iscrowd"] for a in train_ds.anns[im["id"]]))
    return CocoLayoutDataset(train_ds.ann_file, train_ds.root, image_ids=[page], on_bad=train_ds.on_bad,
                             check_images=train_ds.check_images)


def train(cfg: LayoutConfig) -> dict[str, Any]:
    """Build datasets and detector, train with the engine, print the final per-category AP table.

    Returns the engine's final metrics plus ``table`` (the text of the AP table, also written to
    ``output_dir/ap_table.txt``), ``data`` (what the datasets skipped or repaired) and ``checkpoint``.
    """
    validate_config(cfg)
    set_max_image_pixels(cfg.data.max_image_pixels)
    # the page folders the config implies (images/ next to data.train_ann) are inputs too: never overwritten
    inputs = image_folders(cfg)
    check_paths(cfg)  # before the ranks join: a missing file is every rank's, said once under torchrun
    init_distributed()
    # the run's log from here (as finetune's): what model.init loaded is said in it (the engine sets it up later)
    setup_logging(cfg.train.output_dir, is_main())
    if not cfg.train.resume:  # the output folder, before every page is read (a resume is judged by fit(), against
        check_run_can_start(cfg.train, cfg, inputs=inputs)  # the config build_detector completes: model.backbone)

    def check_steps(train: CocoLayoutDataset) -> None:  # warmup vs the run's steps, before the val pages are read
        check_schedule(len(train) * cfg.data.repeat, cfg.train)

    train_ds, val_ds = build_datasets(cfg, check_train=check_steps)
    seed_everything(cfg.train.seed)  # the detector's random init is part of the run
    # fills cfg.model.backbone etc.
    model = build_detector(cfg.model, train_ds.class_names, train_ds.cat_ids, cfg.model_overrides)
    eval_fn = (make_eval_fn(val_ds, cfg.eval_batch_size, loader_workers(cfg.eval_workers, "eval_workers"))
               if val_ds is not None else None)
    vis = (make_visualize_fn(val_ds or _preview_page(train_ds), train_ds.class_names, cfg.vis_score_thresh)
           if cfg.train.image_every > 0 else None)
    data = RepeatedDataset(train_ds, cfg.data.repeat) if cfg.data.repeat > 1 else train_ds
    trainer = Trainer(model, data, step_fn, cfg.train, collate_fn=collate, eval_fn=eval_fn, visualize_fn=vis,
                      metric_to_track="bbox/AP" if eval_fn is not None else None, run_config=cfg, outputs=OUTPUTS,
                      inputs=inputs)
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
            (Path(cfg.train.output_dir) / AP_TABLE).write_text(table + "\n")
        result["table"] = table
    return result
