"""``beit pretrain``, ``beit visualize`` and ``beit demo``."""

from __future__ import annotations

import argparse

from ..cli import command


def add_config_args(p: argparse.ArgumentParser, default_config: str | None = None) -> None:
    """The convention of every training command: a YAML file, then ``key=value`` overrides."""
    p.add_argument("--config", "-c", default=default_config, help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. data.path=images/ train.lr=1e-3 train.epochs=100")


def _pretrain_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument("--resume", default=None, help="checkpoint to resume from, or 'auto' (output_dir/last.pt)")


@command("pretrain", "BEiT masked-image-modeling pre-training on a folder of unlabeled images")(_pretrain_args)
def _pretrain(args: argparse.Namespace) -> int:
    from ..engine.config import load_config
    from .pretrain import PretrainConfig, pretrain

    overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])
    cfg = load_config(PretrainConfig, args.config, overrides)
    result = pretrain(cfg)
    for k, v in result.items():
        print(f"{k}: {v}")
    return 0


def _visualize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a pre-training checkpoint (last.pt, step_*.pt) or a saved MIM model dir")
    p.add_argument("--config", "-c", default=None, help="the run's config.yaml (default: next to the checkpoint)")
    p.add_argument("--out", default="mim_panel.png")
    p.add_argument("--num", type=int, default=8, help="how many images")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data.path=other_images/")


@command("visualize", "PNG panel: input, mask, and the model's predicted tokens decoded to pixels")(_visualize_args)
def _visualize(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from ..engine.config import load_config
    from ..interop import load_model
    from .pretrain import PretrainConfig, _fixed_batch, build_dataset, build_tokenizer, mim_panel

    ckpt = Path(args.checkpoint)
    cfg_path = args.config or next((p for p in (ckpt.parent / "config.yaml", ckpt / "config.yaml") if p.exists()),
                                   None)
    cfg = load_config(PretrainConfig, cfg_path, args.overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = build_tokenizer(cfg.tokenizer, device)
    model = load_model(ckpt if ckpt.is_dir() else _model_state(ckpt)).to(device)
    dataset = build_dataset(cfg, tokenizer.downsample)
    batch = _fixed_batch(dataset, args.num, device)
    out = mim_panel(model, tokenizer, batch, tuple(cfg.data.mean), tuple(cfg.data.std), args.out)
    print(f"wrote {out}")
    return 0


def _model_state(path):  # noqa: ANN001, ANN202
    from ..engine.checkpoint import load_checkpoint

    state = load_checkpoint(path)
    return state["model"] if "model" in state else state


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="where the demo writes its runs and PNGs")
    p.add_argument("--quick", action="store_true", help="a few steps of each stage (for tests)")


@command("demo", "offline demo: tokenizer -> BEiT pre-training -> fine-tune vs from scratch, on real digits")(
    _demo_args)
def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, quick=args.quick)
    return 0
