"""``beit pretrain [train]``, ``beit visualize`` and ``beit demo``: the run functions of the command table.

Arguments arrive normalised by :mod:`beit.cli` (``args.config`` a file or None, ``args.overrides``,
``args.ckpt``, ``args.out``); heavy imports stay inside each function.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def train(args: argparse.Namespace) -> int:
    """``beit pretrain``: masked-image-modeling pre-training (:func:`beit.tasks.pretrain.train.pretrain`)."""
    from ...engine import distributed as D
    from ...engine.config import load_run_config
    from ...engine.logging import print_summary
    from .config import PretrainConfig
    from .train import METRIC_UNITS, pretrain

    cfg = load_run_config(PretrainConfig, args.config, args.overrides, ("data.path",))
    result = pretrain(cfg)
    if D.is_main():  # under torchrun: one summary (each rank's, with its own img/s, was printed)
        print_summary(result, METRIC_UNITS)  # mim_acc a fraction, fine-tuning's top1 a percent
    return 0


def visualize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num", type=int, default=8, help="how many images")


def visualize(args: argparse.Namespace) -> int:
    """``beit visualize CKPT``: input | mask | predicted tokens decoded, as one PNG (``--out``)."""
    import torch

    from ...data.datasets import lies_within, names_folder
    from ...engine.checkpoint import load_checkpoint
    from ...engine.config import load_config, stored_config
    from ...interop import load_model
    from ..backbone_config import check_task_of
    from .config import PretrainConfig
    from .data import build_dataset
    from .model import build_tokenizer
    from .panel import fixed_batch, mim_panel

    if args.inputs:
        raise ValueError(f"unexpected argument(s) {args.inputs}: beit visualize takes one checkpoint")
    if not 1 <= args.num <= 64:
        raise ValueError(f"--num must be in 1..64 (one row of the panel each), got {args.num}")
    out_path = Path(args.out or "mim_panel.png")
    if names_folder(args.out or out_path):
        out_path = out_path / "mim_panel.png"  # a folder: the panel goes inside it
    if out_path.suffix.lower() not in (".png", ".jpg", ".jpeg", ".pdf", ".svg"):
        raise ValueError(f"--out {args.out}: give a .png (or .jpg, .pdf, .svg) file, or a folder")
    ckpt = Path(args.ckpt)
    if not ckpt.exists():
        raise FileNotFoundError(f"checkpoint not found: {ckpt}")
    state = None if ckpt.is_dir() else load_checkpoint(ckpt)  # the input first: a damaged file is named as such
    if state is not None:
        check_task_of(state, "pre-training", ckpt)
    weights = ckpt if state is None else state["model"]
    cfg_path = args.config or next((p for p in (ckpt.parent / "config.yaml", ckpt / "config.yaml") if p.exists()),
                                   None)
    if cfg_path is not None and not args.config:
        import yaml

        stored = yaml.safe_load(Path(cfg_path).read_text()) or {}
        if not isinstance(stored, dict) or "tokenizer" not in stored:
            raise ValueError(f"{ckpt}: not a pre-training run ({cfg_path} has no tokenizer section): beit visualize "
                             "draws the masked-token predictions of a `beit pretrain` checkpoint")
    if cfg_path is None and state is not None and state.get("config"):  # a checkpoint copied alone: its own config
        cfg = stored_config(PretrainConfig, state["config"], None, args.overrides, source=str(ckpt))
    else:
        cfg = load_config(PretrainConfig, cfg_path, args.overrides)
    data = cfg.data.path
    if data and Path(data).is_dir() and lies_within(out_path, data):
        raise ValueError(f"--out {args.out}: the panel ({out_path}) would be written inside the run's data.path "
                         f"{data}, among its images (the next pre-training would train on it): give --out a place "
                         "outside it")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = build_tokenizer(cfg.tokenizer, device)
    model = load_model(weights).to(device)
    if model.cfg.head != "mim":
        raise ValueError(f"{ckpt}: a model with head={model.cfg.head!r}, not a pre-training (MIM) model: beit "
                         "visualize draws the masked-token predictions of a `beit pretrain` checkpoint")
    dataset = build_dataset(cfg, tokenizer.downsample)
    batch = fixed_batch(dataset, args.num, device)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out = mim_panel(model, tokenizer, batch, tuple(cfg.data.mean), tuple(cfg.data.std), out_path)
    print(f"wrote {out}")
    return 0



def demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="where the demo writes its runs and PNGs (a second run "
                   "replaces the first one's data/, tokenizer/, pretrain/ and finetune_*/ there)")
    p.add_argument("--quick", action="store_true", help="a few steps of each stage (for tests)")


def demo(args: argparse.Namespace) -> int:
    """``beit demo``: the offline tokenizer -> pre-training -> fine-tuning demo on scikit-learn's digits."""
    from ..demo import run_demo

    run_demo(args.out, quick=args.quick)
    return 0
