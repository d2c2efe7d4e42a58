"""Train a dVAE tokenizer on a folder of images with the shared engine.

    python -m beit.tasks.tokenizer.train data_dir=/data/docs train.output_dir=runs/dvae train.max_steps=20000

Writes, under ``train.output_dir``: the engine's checkpoints / logs / curves, ``dvae.safetensors``
(load it with ``load_tokenizer("dvae", path)``), ``recon_grid.png`` (held-out originals above their
token round trips) and ``tokenizer_metrics.json`` (held-out MSE / PSNR, codebook perplexity, dead codes).

The config is ``config.py``, the datasets ``data.py``; the model is ``DiscreteVAE(cfg.model)`` (no ``model.py``:
the dVAE lives with the other tokenizers in :mod:`beit.tokenizers`). Here: the held-out evaluation and
reconstruction grid (also behind ``beit tokenizer eval``), the step and :func:`train_tokenizer`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ...data.datasets import set_max_image_pixels, spread_indices
from ...engine import Trainer, is_main, load_config, seed_everything
from ...engine import distributed as D
from ...engine.config import ConfigError
from ...engine.threads import loader_workers
from ...engine.trainer import check_run_can_start, worker_init
from ...tokenizers.dvae import DiscreteVAE
from ...tokenizers.metrics import codebook_usage, psnr, save_recon_grid, token_histogram
from .config import TokenizerTrainConfig
from .data import build_datasets

__all__ = ["OUTPUTS", "evaluate_tokenizer", "main", "round_trip_metrics", "train_tokenizer", "write_recon_grid"]

#: what a tokenizer training writes into ``train.output_dir`` besides the engine's files (``--overwrite`` deletes
#: them with the earlier run, see ``beit.engine.rundir``)
WEIGHTS_FILE, GRID_FILE, METRICS_FILE = "dvae.safetensors", "recon_grid.png", "tokenizer_metrics.json"
OUTPUTS = (WEIGHTS_FILE, GRID_FILE, METRICS_FILE)


@torch.no_grad()
def evaluate_tokenizer(
    model: nn.Module, dataset: Dataset, batch_size: int = 64, num_workers: int = 0
) -> dict[str, float]:
    """Held-out token round trip (encode -> argmax ids -> decode): MSE, PSNR and codebook usage.

    A tokenizer without a decoder (DALL-E loaded from ``encoder.pkl`` alone) gets codebook usage only.
    """
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        worker_init_fn=worker_init)
    return round_trip_metrics(model, loader)


@torch.no_grad()
def round_trip_metrics(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, float]:
    """:func:`evaluate_tokenizer`'s metrics over the image batches ``batches`` (``[B, 3, H, W]`` in [0, 1]), each
    image weighted once: for callers that choose the images themselves (``beit tokenizer eval`` leaves the
    unreadable files out instead of letting the dataset substitute a neighbour)."""
    device = next(model.parameters()).device
    can_decode = getattr(model, "decoder", None) is not None
    hist = torch.zeros(model.vocab_size, dtype=torch.long)
    sq_err, psnr_sum, n = 0.0, 0.0, 0
    for images in batches:
        images = images.to(device).float()
        ids = model.encode(images)
        b = images.shape[0]
        if can_decode:
            recon = model.decode(ids).float()
            sq_err += float(((recon - images) ** 2).mean()) * b
            psnr_sum += psnr(recon, images) * b
        hist += token_histogram(ids, model.vocab_size)
        n += b
    usage = codebook_usage(hist)
    recon_metrics = {"mse": sq_err / max(n, 1), "psnr": psnr_sum / max(n, 1)} if can_decode else {}
    return {
        **recon_metrics,
        "perplexity": usage["perplexity"],
        "used_codes": usage["used_codes"],
        "dead_codes": usage["dead_codes"],
        "dead_fraction": usage["dead_fraction"],
    }


@torch.no_grad()
def write_recon_grid(model: nn.Module, dataset: Dataset, path: str | Path, n: int = 8) -> str:
    """Originals (top) and their token round trips (bottom) for ``n`` held-out images spread over the set."""
    device = next(model.parameters()).device
    images = torch.stack([dataset[i] for i in spread_indices(len(dataset), n)]).to(device).float()
    recon = model.decode(model.encode(images))
    return save_recon_grid(images, recon, path, max_images=n)


def train_tokenizer(cfg: TokenizerTrainConfig) -> dict[str, Any]:
    """Train a :class:`DiscreteVAE` with :class:`beit.engine.Trainer`; return the held-out metrics.

    The Gumbel temperature follows the engine's optimizer step (restored on resume), not a private
    counter, so a resumed run anneals exactly like an uninterrupted one. The output folder (an earlier run there
    without ``--resume`` / ``--overwrite``, another task's run) and ``--resume`` are checked before the images
    are listed (:func:`beit.engine.trainer.check_run_can_start`).

    Raises:
        ConfigError: a bad config value, or ``data_dir`` no folder (checked before the ranks join their process
            group: under torchrun the CLI prints it once).
    """
    cfg.validate()
    set_max_image_pixels(cfg.max_image_pixels)
    root = Path(cfg.data_dir).expanduser()
    if not root.is_dir():  # before the ranks join: every rank's alike, said once under torchrun (beit.cli._report)
        raise ConfigError("data_dir", f"{str(root)!r}: " + ("a file, not a folder of images" if root.exists()
                                                             else "no such folder"))
    D.init_distributed()
    # the output folder and --resume as fit() will judge them, before the image folders are listed
    check_run_can_start(cfg.train, cfg)
    train_ds, eval_ds = build_datasets(cfg)
    seed_everything(cfg.train.seed)  # the initial weights are a function of the seed alone: runs repeat exactly
    model = DiscreteVAE(cfg.model)
    bs, workers = cfg.train.batch_size, loader_workers(cfg.train.num_workers, say=False)  # the trainer says a cap
    trainer: Trainer | None = None

    def step_fn(m: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return m(batch, step=trainer.step)  # through __call__, so DDP sees a forward

    def eval_fn(m: nn.Module) -> dict[str, float]:
        return evaluate_tokenizer(m, eval_ds, bs, workers)

    def visualize_fn(m: nn.Module, step: int, out_dir: Path) -> None:
        if is_main():
            write_recon_grid(m, eval_ds, Path(out_dir) / f"recon_{step:07d}.png", cfg.grid_images)

    trainer = Trainer(
        model,
        train_ds,
        step_fn,
        cfg.train,
        eval_fn=eval_fn,
        visualize_fn=visualize_fn,
        metric_to_track="psnr",
        mode="max",
        run_config=cfg,
        outputs=OUTPUTS,
    )
    results = trainer.fit()
    final = trainer.raw_model.eval()
    out = Path(cfg.train.output_dir)
    heldout = {k[len("eval/") :]: v for k, v in results.items() if k.startswith("eval/")}
    if not heldout:  # fit() evaluates at the end; only a run resumed at its end skips it
        with torch.compiler.set_stance("force_eager"):  # a compiled model: no recompile for eval shapes
            heldout = eval_fn(final)
    report: dict[str, Any] = {**results, **{f"heldout_{k}": v for k, v in heldout.items()}}
    final = trainer.export_model()  # collective: under FSDP2 the full weights, gathered to rank 0
    if is_main():
        final.eval()
        final.save(out / WEIGHTS_FILE)
        report["tokenizer_path"] = str(out / WEIGHTS_FILE)
        with torch.compiler.set_stance("force_eager"):
            report["recon_grid"] = write_recon_grid(final, eval_ds, out / GRID_FILE, cfg.grid_images)
        (out / METRICS_FILE).write_text(json.dumps(report, indent=2, default=str))
    return report


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``[config.yaml] key=value ...`` -> train; the YAML and overrides follow ``beit.engine.load_config``."""
    args = list(sys.argv[1:] if argv is None else argv)
    path = args.pop(0) if args and "=" not in args[0] else None
    cfg = load_config(TokenizerTrainConfig, path, args)
    return train_tokenizer(cfg)


if __name__ == "__main__":
    main()
