"""BEiT masked-image-modeling pre-training on the shared engine.

Per step: the frozen tokenizer turns the tokenizer view into visual tokens (no grad), the masked
patches are replaced by the mask token, and cross-entropy is taken on the masked positions only.
Everything else (optimizer, schedule, bf16, DDP/FSDP, checkpoints, resume, logging) is the engine's.
The config is ``config.py``, the model and tokenizer ``model.py``, the data ``data.py``, the pictures ``panel.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...data.datasets import set_max_image_pixels
from ...data.transforms import collate_pretrain
from ...engine import Trainer
from ...engine import distributed as D
from ...engine.logging import setup_logging
from ...engine.trainer import check_run_can_start, seed_everything
from ...interop import save_model
from ...models.beit import masked_positions
from ..device_data import decode_summary
from .config import PretrainConfig, validate
from .data import build_dataset, build_device_data
from .model import build_model, build_tokenizer
from .panel import fixed_batch, mim_panel

__all__ = ["OUTPUTS", "make_step_fn", "pretrain"]

#: what a pre-training writes into ``train.output_dir`` besides the engine's files: the final model's folder and the
#: MIM panel of its weights (``--overwrite`` deletes them with the earlier run, see ``beit.engine.rundir``)
FINAL_DIR, PANEL_FILE = "final", "mim_panel.png"
OUTPUTS = (FINAL_DIR, PANEL_FILE)
#: the units of the step's metrics, as ``beit pretrain`` prints them (``metrics.jsonl`` has the bare values):
#: fractions, where fine-tuning's eval ``top1`` is a percent
METRIC_UNITS = {"mim_acc": "fraction, 0-1", "masked_frac": "fraction, 0-1"}


def make_step_fn(tokenizer: nn.Module, mask_budget: int | None = None):
    """``(model, batch) -> (loss, metrics)``: tokens of the masked patches are the targets; the loss is the mean
    cross-entropy over every masked patch of the batch (BEiT eq. 1), ``mim_acc`` the fraction predicted right.

    ``mask_budget`` (the mask generator's ``num_masking_patches``, which no mask exceeds): the head runs on
    that many positions per image (:func:`beit.models.beit.masked_positions`), the padding weighted out, so
    the step never waits for the GPU (no data-dependent shapes) and compiles as one graph. ``None``: boolean
    indexing as the official code (one host sync a step for the targets, one in the model).
    """

    def step_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        images, mask = batch["image"], batch["mask"].flatten(1).bool()
        with torch.no_grad():
            tokens = tokenizer.encode(batch["tok_image"], validate=False).flatten(1)  # [B, N]
        if mask_budget is None:
            labels = tokens[mask]
            logits = model(images, mask)  # [num_masked, vocab]: the head runs on masked tokens only
            loss = F.cross_entropy(logits.float(), labels)
            acc = (logits.argmax(-1) == labels).float().mean()
        else:
            positions, valid = masked_positions(mask, mask_budget)
            # a mask over the budget would lose patches from the loss: stop (checked on the device, no sync)
            torch._assert_async(valid.sum() == mask.sum(), f"a mask has more masked patches than mask_budget "
                                                           f"{mask_budget} (data.num_mask_patches)")
            labels = tokens.gather(1, positions)
            logits = model(images, mask, positions=positions)  # [B, budget, vocab]
            weight = valid.float()
            count = weight.sum()  # 0 for an all-empty mask: NaN, as the boolean path (the engine stops)
            ce = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")
            loss = (ce * weight.flatten()).sum() / count
            acc = ((logits.argmax(-1) == labels).float() * weight).sum() / count
        return loss, {"mim_acc": acc, "masked_frac": mask.float().mean()}

    return step_fn


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Run (or resume) a pre-training; returns the final metrics (``train/mim_acc`` a fraction, 0-1: see
    :data:`METRIC_UNITS`) and where things were written."""
    validate(cfg)
    set_max_image_pixels(cfg.data.max_image_pixels)
    D.init_distributed()
    # the output folder and --resume as fit() will judge them, before the tokenizer, model and data are built
    check_run_can_start(cfg.train, cfg)
    # the run's log from here: what the tokenizer and model.init loaded is said in it (the engine set it up later)
    setup_logging(cfg.train.output_dir, D.is_main())
    seed_everything(cfg.train.seed)  # the model's initial weights are a function of the seed alone
    device = D.device()
    tokenizer = build_tokenizer(cfg.tokenizer, device)
    model = build_model(cfg, tokenizer.vocab_size)

    device_data = build_device_data(cfg, tokenizer.downsample, device)
    if device_data is None:
        dataset, collate, pipeline = build_dataset(cfg, tokenizer.downsample), collate_pretrain, None
    else:
        dataset, collate, pipeline = device_data
    panel_batch: dict[str, torch.Tensor] = {}
    d = cfg.data

    def visualize(model: nn.Module, step: int, out_dir: Path) -> None:
        if not panel_batch:
            panel_batch.update(fixed_batch(dataset, cfg.vis_samples, device, device_data))
        mim_panel(model, tokenizer, panel_batch, tuple(d.mean), tuple(d.std), Path(out_dir) / f"mim_step{step:07d}.png")

    step_fn = make_step_fn(tokenizer, mask_budget=cfg.data.num_mask_patches)  # the generator's: no mask exceeds it
    trainer = Trainer(model, dataset, step_fn, cfg.train, collate_fn=collate,
                      device_transform=pipeline, visualize_fn=visualize, run_config=cfg, outputs=OUTPUTS)
    metrics = trainer.fit()
    out = Path(cfg.train.output_dir)
    result: dict[str, Any] = dict(metrics)
    final_model = trainer.export_model()  # collective: under FSDP2 gathers the full weights to rank 0
    if D.is_main():
        final = save_model(final_model, out / FINAL_DIR)
        with torch.compiler.set_stance("force_eager"):  # compiled blocks: no recompile for the panel's shapes
            panel = mim_panel(final_model, tokenizer, fixed_batch(dataset, cfg.vis_samples, device, device_data),
                              tuple(d.mean), tuple(d.std), out / PANEL_FILE)
        result.update(model_dir=str(final), panel=str(panel), curves=str(out / "curves.png"))
    if device_data is not None:
        result["data_decode"] = decode_summary(device_data[2].decoder, trainer.log.info)
    return result
