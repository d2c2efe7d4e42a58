"""``beit pretrain [train]``, ``beit visualize`` and ``beit demo``: the run functions of the command table.

Arguments arrive normalised by :mod:`beit.cli` (``args.config`` a file or None, ``args.overrides``,
``args.ckpt``, ``args.out``); heavy imports stay inside each function.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def train(args: argparse.Namespace) -> int:
    """``beit pretrain``: masked-image-modeling pre-training (:func:`beit.tasks.pretrain.train.pretrain`)."""
    from ...engine.config import load_run_config
    from .config import PretrainConfig
    from .train import pretrain

    cfg = load_run_config(PretrainConfig, args.config, args.overrides)
    result = pretrain(cfg)
    for k, v in result.items():
        print(f"{k}: {v}")
    return 0


def visualize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num", type=int, default=8, help="how many images")


def visualize(args: argparse.Namespace) -> int:
    """``beit visualize CKPT``: input | mask | predicted tokens decoded, as one PNG (``--out``)."""
    import torch

    from ...engine.config import load_config
    from ...interop import load_model
    from .config import PretrainConfig
    from .data import build_dataset
    from .model import build_tokenizer
    from .panel import fixed_batch, mim_panel

    if args.inputs:
        raise ValueError(f"unexpected argument(s) {args.inputs}: beit visualize takes one checkpoint")
    if args.num < 1:
        raise ValueError(f"--num must be >= 1, got {args.num}")
    ckpt = Path(args.ckpt)
    if not ckpt.exists():
        raise FileNotFoundError(f"checkpoint not found: {ckpt}")
    weights = ckpt if ckpt.is_dir() else _model_state(ckpt)  # the input first: a damaged file is named as such
    cfg_path = args.config or next((p for p in (ckpt.parent / "config.yaml", ckpt / "config.yaml") if p.exists()),
                                   None)
    if cfg_path is not None and not args.config:
        import yaml

        stored = yaml.safe_load(Path(cfg_path).read_text()) or {}
        if not isinstance(stored, dict) or "tokenizer" not in stored:
            raise ValueError(f"{ckpt}: not a pre-training run ({cfg_path} has no tokenizer section): beit visualize "
                             "draws the masked-token predictions of a `beit pretrain` checkpoint")
    cfg = load_config(PretrainConfig, cfg_path, args.overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = build_tokenizer(cfg.tokenizer, device)
    model = load_model(weights).to(device)
    if model.cfg.head != "mim":
        raise ValueError(f"{ckpt}: a model with head={model.cfg.head!r}, not a pre-training (MIM) model: beit "
                         "visualize draws the masked-token predictions of a `beit pretrain` checkpoint")
    dataset = build_dataset(cfg, tokenizer.downsample)
    batch = fixed_batch(dataset, args.num, device)
    out = mim_panel(model, tokenizer, batch, tuple(cfg.data.mean), tuple(cfg.data.std), args.out or "mim_panel.png")
    print(f"wrote {out}")
    return 0


def _model_state(path):  # noqa: ANN001, ANN202
    from ...engine.checkpoint import load_checkpoint

    state = load_checkpoint(path)
    return state["model"] if "model" in state else state


def demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="where the demo writes its runs and PNGs (a second run "
                   "replaces the first one's data/, tokenizer/, pretrain/ and finetune_*/ there)")
    p.add_argument("--quick", action="store_true", help="a few steps of each stage (for tests)")


def demo(args: argparse.Namespace) -> int:
    """``beit demo``: the offline tokenizer -> pre-training -> fine-tuning demo on scikit-learn's digits."""
    from ..demo import run_demo

    run_demo(args.out, quick=args.quick)
    return 0
