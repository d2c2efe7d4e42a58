"""The ``beit`` command: one sub-command per job, each a thin layer over the library."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help: str):
    """Register ``fn(args) -> exit code`` with an ``add_args(parser)`` companion."""

    def wrap(add_args: Callable[[argparse.ArgumentParser], None]):
        def register(run: Callable[[argparse.Namespace], int]):
            COMMANDS[name] = (help, add_args, run)
            return run

        return register

    return wrap


def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="checkpoint: file, directory, Hugging Face Hub id or URL")
    p.add_argument("dst", help="output: a directory (beit, hf) or a .pth file (timm)")
    p.add_argument("--to", choices=["beit", "timm", "hf"], default="beit", help="output format (default: ours)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="weights dtype (ours only)")


@command("convert", "convert any BEiT checkpoint to ours, or export ours to timm / Hugging Face")(_convert_args)
def _convert(args: argparse.Namespace) -> int:
    import torch

    from .interop import export_hf, export_timm, load_model, save_model

    model = load_model(args.src)
    if args.to == "beit":
        out = save_model(model, args.dst, dtype=args.dtype)
    elif args.to == "hf":
        out = export_hf(model, args.dst)
    else:
        out = Path(args.dst)
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(export_timm(model), out)
    cfg = model.cfg
    print(f"{args.src} -> {out} ({args.to}): depth {cfg.depth}, width {cfg.embed_dim}, heads {cfg.num_heads}, "
          f"{cfg.img_size}px/{cfg.patch_size}, head {cfg.head}")
    return 0


# Each task registers its sub-commands with ``@command`` in its own module (heavy imports inside ``run``).
TASK_CLI_MODULES = (
    "beit.tasks.pretrain_cli",
    "beit.tasks.finetune_cli",
    "beit.tasks.segmentation_cli",
    "beit.tasks.layout_cli",
    "beit.tokenizers.cli",
)


def _load_task_commands() -> None:
    import importlib

    for mod in TASK_CLI_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:  # the module exists but a dependency of it is missing: say so
                raise


def build_parser() -> argparse.ArgumentParser:
    _load_task_commands()
    parser = argparse.ArgumentParser(prog="beit", description="BEiT: pre-train and fine-tune image transformers")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_args, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except (FileNotFoundError, ValueError) as e:  # user errors: one clear line, no stack trace
        print(f"beit {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
