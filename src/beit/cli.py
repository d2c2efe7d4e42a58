"""The ``beit`` command: one static table of sub-commands, every one of the same shape, one error boundary.

    beit <task> <action> [-c PRESET_OR_PATH] [key=value ...] [--resume CKPT|auto] [--out DIR] [--overwrite] [--debug]

Tasks and actions (:data:`TASKS`): ``pretrain train|visualize``, ``classify train|linprobe|eval|predict``,
``segment train|eval|predict``, ``layout train|eval|predict``, ``tokenizer train|eval|encode|convert``; the
short forms users type (``beit pretrain``, ``beit finetune``, ``beit linprobe``, ``beit evaluate``,
``beit predict``, ``beit visualize``) are the same commands (:data:`SHORT`). Tools: ``convert``, ``demo``,
``configs``.

Shapes (:class:`Command.kind`):

- ``train``: ``-c/--config`` (a preset name from ``beit configs`` or a YAML path), ``key=value`` overrides,
  ``--resume`` (``train.resume``), ``--out`` (``train.output_dir``), ``--overwrite`` (``train.overwrite``).
- ``checkpoint`` (eval / predict / visualize): the checkpoint as ``--ckpt PATH`` or the first argument, the
  inputs as the following arguments, ``--out``; ``-c`` and ``key=value`` where the command has a config.
- ``tool``: its own arguments.

Every command takes ``--debug`` (or ``BEIT_DEBUG=1``). Usage errors (an unknown option, an empty ``--out``) end
in one line ``beit CMD: error: ...`` and exit 2. Anticipated errors (bad config, missing or damaged file,
unwritable folder, refused pickle, divergence) end in one line ``beit CMD: error: ...`` and a non-zero exit; with
``--debug`` the traceback is shown. Heavy imports stay inside each command's ``run``.
A training run stopped by SIGINT (Ctrl-C) or SIGTERM saves the checkpoint of its last step and ends in one line
``beit CMD: interrupted by SIGTERM after step N; checkpoint of that step: PATH; resume with: beit ... --resume
auto`` and the exit code ``128 + signal`` (130, 143); a second Ctrl-C during training stops at once (``...
stopped at once by a second SIGINT after step N, not saved; the last checkpoint is ...``), Ctrl-C outside
training ends in ``beit CMD: interrupted`` (130), SIGTERM outside a training command's loop (while it sets up) in
``beit CMD: interrupted by SIGTERM outside the training loop ...`` (143), the new run folder removed as for Ctrl-C.
Under torchrun an error that every rank meets alike (a bad config value, a usage error, argparse's included, no
image that decodes) is printed once, by the first rank of each host (:func:`_report`); every rank still ends
non-zero. The help (``beit CMD --help``: :meth:`_Parser.print_help`) is printed once per host too, every rank
ending 0, and no rank imports torch for it. A rank whose collective failed because another rank's process is gone
says so in one line (:func:`_peer_gone`), the other rank's error above it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, NoReturn

from .tasks.classify import cli as cli_classify
from .tasks.layout import cli as cli_layout
from .tasks.pretrain import cli as cli_pretrain
from .tasks.segmentation import cli as cli_segment
from .tasks.tokenizer import cli as cli_tokenizer

__all__ = ["COMMANDS", "SHORT", "TASKS", "TOOLS", "Command", "build_parser", "main"]

# ``key=value`` (dotted key) vs a path or a name: paths with '=' in them are not supported as inputs.
_OVERRIDE = re.compile(r"^-{0,2}[A-Za-z_][\w.\-\[\]]*=")


@dataclass(frozen=True)
class Command:
    """One sub-command: ``run(args) -> exit code``; ``add_args`` adds its own options to the shared shape.

    ``kind`` is ``train`` | ``checkpoint`` | ``tool`` (see the module docstring); for a ``checkpoint`` command
    ``config`` says whether it takes ``-c`` and ``overrides`` whether it takes ``key=value`` overrides (options a
    command cannot honour are not offered); ``out_help`` documents ``--out``.
    """

    help: str
    kind: str
    run: Callable[[argparse.Namespace], int]
    add_args: Callable[[argparse.ArgumentParser], None] | None = None
    config: bool = True
    overrides: bool = True
    out_help: str = "output folder"
    inputs: bool = True  # a "checkpoint" command that takes files after the checkpoint (predict), or not (eval)


def _configs_run(args: argparse.Namespace) -> int:
    from .configs import describe, list_presets

    names = list_presets()
    width = max(map(len, names))
    for name in names:
        print(f"{name:<{width}}  {describe(name)}")
    print(f"\nuse: beit <command> -c NAME [key=value ...]   (files in {Path(__file__).parent / 'configs'})")
    return 0


def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="checkpoint: file, directory, Hugging Face Hub id or URL")
    p.add_argument("dst", help="output: a directory (beit, hf) or a .pth file (timm)")
    p.add_argument("--to", choices=["beit", "timm", "hf"], default="beit", help="output format (default: ours)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="weights dtype of the output")


def _convert_run(args: argparse.Namespace) -> int:
    import torch

    from .data.datasets import names_folder
    from .interop import export_hf, export_timm, load_model, save_model
    from .interop.load import DTYPES

    model = load_model(args.src)
    src = Path(args.src)
    if getattr(model.cfg, "head", None) == "cls" and src.is_file() and src.suffix in (".pt", ".pth"):
        # a fine-tuning run's last.pt / best.pt: keep its class names and eval preprocessing, as its model/ does
        from .tasks.classify.evaluate import with_run_metadata

        try:
            state = torch.load(src, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # mmap reads only the zip format; a legacy-format file is no run's checkpoint
            state = None
        model = with_run_metadata(model, state)
    if args.to != "beit":  # save_model casts on its own; --dtype bf16 --to hf / timm wrote fp32 weights, silently
        model = model.to(DTYPES[args.dtype])
    if args.to == "beit":
        out = save_model(model, args.dst, dtype=args.dtype)
    elif args.to == "hf":
        out = export_hf(model, args.dst)
    else:
        out = Path(args.dst)
        if names_folder(args.dst):  # torch.save: "Is a directory", in a traceback; out/ became a file "out"
            raise ValueError(f"{out} is a folder: --to timm writes one state-dict file; give a file path (e.g. "
                             f"{out / 'model.pth'})")
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(export_timm(model), out)
    cfg = model.cfg
    print(f"{args.src} -> {out} ({args.to}): depth {cfg.depth}, width {cfg.embed_dim}, heads {cfg.num_heads}, "
          f"{cfg.img_size}px/{cfg.patch_size}, head {cfg.head}")
    return 0


# ----------------------------------------------------------------------------------------- the table
TASKS: dict[str, dict[str, Command]] = {
    "pretrain": {
        "train": Command("BEiT masked-image-modeling pre-training on a folder of unlabeled images", "train",
                         cli_pretrain.train),
        "visualize": Command("PNG panel: input, mask, and the model's predicted tokens decoded to pixels",
                             "checkpoint", cli_pretrain.visualize, cli_pretrain.visualize_args,
                             out_help="the PNG to write (default mim_panel.png)", inputs=False),
    },
    "classify": {
        "train": Command("fine-tune a (pre-trained) BEiT classifier on class folders, the paper's recipe", "train",
                         cli_classify.finetune),
        "linprobe": Command("linear probing of a frozen encoder, one head per block (layers=all sweeps them)",
                            "train", cli_classify.linprobe),
        "eval": Command("top-1/top-5, per-class accuracy and a confusion-matrix PNG of a classifier", "checkpoint",
                        cli_classify.evaluate, cli_classify.evaluate_args, config=False, overrides=False, inputs=False,
                        out_help="report folder (default: eval-[<ckpt file>-]<data folder>/ beside the checkpoint or "
                                 "inside a model folder; never overwrites another report)"),
        "predict": Command("top-k labels and probabilities for a folder of images, as a CSV", "checkpoint",
                           cli_classify.predict, cli_classify.predict_args, config=False, overrides=False,
                           out_help="the CSV to write (default predictions.csv; a folder, or a path ending in /: "
                                    "predictions.csv in it)"),
    },
    "segment": {
        "train": Command("fine-tune BEiT + UperNet with the shared trainer", "train", cli_segment.train),
        "eval": Command("mIoU / aAcc on the val split, per-class table", "checkpoint", cli_segment.evaluate,
                        cli_segment.eval_args, out_help="folder for overlays and metrics.json", inputs=False),
        "predict": Command("coloured overlays and label maps for images", "checkpoint", cli_segment.predict,
                           cli_segment.predict_args, out_help="folder for the PNGs (default "
                                                                   "segment_predictions)"),
    },
    "layout": {
        "train": Command("train a document layout detector (PubLayNet, DocLayNet, DocBank)", "train",
                         cli_layout.train),
        "eval": Command("COCO AP of a checkpoint on data.val_ann (or the data.holdout split)", "checkpoint",
                        cli_layout.evaluate, cli_layout.eval_args, out_help="folder for metrics.json", inputs=False),
        "predict": Command("draw predicted boxes on pages and write COCO results JSON", "checkpoint",
                           cli_layout.predict, cli_layout.predict_args,
                           out_help="folder for PNGs + results.json (default predictions)"),
    },
    "tokenizer": {
        "train": Command("train a dVAE tokenizer on a folder of images", "train", cli_tokenizer.train),
        "eval": Command("reconstruction error and codebook usage of a tokenizer on images", "tool",
                        cli_tokenizer.evaluate, cli_tokenizer.eval_args),
        "encode": Command("precompute the token ids of every image of a folder", "tool", cli_tokenizer.encode,
                          cli_tokenizer.encode_args),
        "convert": Command("official DALL-E pickles -> one safetensors file (no pickle later)", "tool",
                           cli_tokenizer.convert, cli_tokenizer.convert_args),
    },
}

TASK_HELP = {
    "pretrain": "masked-image-modeling pre-training (train) and its MIM panel (visualize)",
    "classify": "image classification: fine-tune (train), linear probe, eval, predict",
    "segment": "semantic segmentation (BEiT + UperNet): train, eval (mIoU table) or predict (overlays)",
    "layout": "document layout detection (PubLayNet, DocLayNet, DocBank): train | eval | predict",
    "tokenizer": "visual tokenizers: train a dVAE, evaluate or encode with one, convert DALL-E pickles",
}

# Short forms: ``beit finetune ...`` is ``beit classify train ...``. ``beit pretrain -c ...`` (no action) is
# ``beit pretrain train -c ...`` (DEFAULT_ACTION).
SHORT: dict[str, tuple[str, str]] = {
    "finetune": ("classify", "train"),
    "linprobe": ("classify", "linprobe"),
    "evaluate": ("classify", "eval"),
    "predict": ("classify", "predict"),
    "visualize": ("pretrain", "visualize"),
}
DEFAULT_ACTION = {"pretrain": "train"}

# The shipped presets a training command takes: their names start with the task's prefix.
PRESET_PREFIX = {"pretrain train": "pretrain_", "classify train": "finetune_", "classify linprobe": "linprobe_",
                 "segment train": "segment_", "layout train": "layout_", "tokenizer train": "tokenizer_"}

TOOLS: dict[str, Command] = {
    "convert": Command("convert any BEiT checkpoint to ours, or export ours to timm / Hugging Face", "tool",
                       _convert_run, _convert_args),
    "demo": Command("offline demo: tokenizer -> BEiT pre-training -> fine-tune vs from scratch, on real digits",
                    "tool", cli_pretrain.demo, cli_pretrain.demo_args),
    "configs": Command("list the presets that -c NAME accepts, one line each", "tool", _configs_run),
}

# Every command by its full name ("segment eval") and its short name ("evaluate").
COMMANDS: dict[str, Command] = {
    **{f"{t} {a}": c for t, actions in TASKS.items() for a, c in actions.items()},
    **{s: TASKS[t][a] for s, (t, a) in SHORT.items()},
    **TOOLS,
}


# ---------------------------------------------------------------------------------------- the parser
def _add_shape(p: argparse.ArgumentParser, cmd: Command) -> None:
    """The options every command of ``cmd.kind`` shares, then the command's own."""
    if cmd.kind == "train":
        p.add_argument("-c", "--config", default=None, metavar="PRESET_OR_PATH",
                       help="a preset name (see `beit configs`) or a YAML file")
        p.add_argument("--resume", default=None, metavar="CKPT|auto",
                       help="checkpoint to resume from, or 'auto' (output_dir/last.pt, else its newest step_*.pt) = "
                            "train.resume")
        p.add_argument("--out", default=None, metavar="DIR", help="output folder = train.output_dir")
        p.add_argument("--overwrite", action="store_true",
                       help="start afresh in a folder that holds a finished run = train.overwrite=true")
        p.add_argument("rest", nargs="*", metavar="key=value",
                       help="dotted overrides, e.g. train.lr=1e-3 train.epochs=100 (see `beit configs`)")
    elif cmd.kind == "checkpoint":
        p.add_argument("--ckpt", default=None, metavar="CKPT",
                       help="the checkpoint (or give it as the first argument)")
        p.add_argument("--out", "--output", dest="out", default=None, metavar="PATH", help=cmd.out_help)
        if cmd.config:
            p.add_argument("-c", "--config", default=None, metavar="PRESET_OR_PATH",
                           help="a preset name or a YAML file, merged over the config stored in the checkpoint")
        shape = ["CKPT"] + ["INPUT"] * cmd.inputs + ["key=value"] * cmd.overrides
        p.add_argument("rest", nargs="*", metavar="|".join(shape),
                       help="the checkpoint (unless --ckpt)" + (", inputs" if cmd.inputs else "")
                       + (", dotted overrides" if cmd.overrides else ""))
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error (or BEIT_DEBUG=1)")
    if cmd.add_args:
        cmd.add_args(p)


def _sub(sub: argparse._SubParsersAction, name: str, cmd: Command) -> None:
    p = sub.add_parser(name, help=cmd.help, description=cmd.help)
    _add_shape(p, cmd)
    out = [a for a in p._actions if a.dest == "out" and a.option_strings]  # the shape's --out or the command's own
    p.set_defaults(_cmd=cmd, _name=name, _out_flag=out[0].option_strings[0] if out else None)


def _empty_output(args: argparse.Namespace) -> str | None:
    """The one check of an empty output path, for every command: ``"--out is empty: ..."`` when the command's
    ``--out`` option was given as ``''`` or blanks only (``''`` used to mean the default folder to some commands,
    the current folder to others, a config error to the training commands), else None. A usage error:
    :func:`main` exits 2."""
    flag = getattr(args, "_out_flag", None)
    out = getattr(args, "out", None)
    if flag is None or not isinstance(out, str) or out.strip():
        return None
    blanks = " (blanks only)" if out else ""
    return f"{flag} is empty{blanks}: give the path to write to, or omit {flag} for its default"


class _Parser(argparse.ArgumentParser):
    """argparse's parser, its own usage errors (a missing option argument, an unknown command or choice) said
    through :func:`_report`: under torchrun once per host, as the CLI's other usage errors (each rank printed the
    usage and ``beit finetune: error: argument -c/--config: expected one argument``). The text (usage, then the
    error line) and the exit (``SystemExit(2)``) are argparse's. Sub-parsers are of this class too (argparse makes
    them of their parent's). Its help is printed once per host too (:meth:`print_help`)."""

    def error(self, message: str) -> NoReturn:
        _report(f"{self.format_usage()}{self.prog}: error: {message}")
        self.exit(2)

    def print_help(self, file: IO[str] | None = None) -> None:
        """argparse's help (``-h`` / ``--help``; ``beit`` without a command), under torchrun printed by the host's
        first rank alone (:func:`_another_rank_of_the_host_speaks`, which imports no torch: an import of it on each
        rank tripled the time of ``torchrun --nproc_per_node 2 -m beit finetune --help`` on a 2-core machine):
        every rank has the same command line, and each printed the same help. The other ranks print nothing and
        end as that rank does (0 after ``--help``)."""
        if not _another_rank_of_the_host_speaks():
            super().print_help(file)


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of :data:`TASKS`, :data:`SHORT` and :data:`TOOLS`."""
    parser = _Parser(prog="beit", description="BEiT: pre-train and fine-tune image transformers",
                     epilog="short forms: " + ", ".join(f"{s} = {t} {a}" for s, (t, a) in SHORT.items()))
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error (or BEIT_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for task, actions in TASKS.items():
        tp = sub.add_parser(task, help=TASK_HELP[task], description=TASK_HELP[task])
        tsub = tp.add_subparsers(dest="action", metavar="{" + ",".join(actions) + "}", required=True)
        for action, cmd in actions.items():
            _sub(tsub, action, cmd)
            tsub.choices[action].prog = f"beit {task} {action}"
    for short, (task, action) in SHORT.items():
        _sub(sub, short, TASKS[task][action])
    for name, cmd in TOOLS.items():
        _sub(sub, name, cmd)
    return parser


def _expand(argv: list[str]) -> list[str]:
    """``beit pretrain -c x`` -> ``beit pretrain train -c x`` (a task given without an action)."""
    i = next((i for i, a in enumerate(argv) if not a.startswith("-")), len(argv))  # after `beit --debug`
    if i < len(argv) and argv[i] in DEFAULT_ACTION:
        nxt = argv[i + 1] if len(argv) > i + 1 else ""
        if nxt not in TASKS[argv[i]] and nxt not in ("-h", "--help"):
            return [*argv[:i + 1], DEFAULT_ACTION[argv[i]], *argv[i + 1:]]
    return argv


def _normalize(args: argparse.Namespace, name: str) -> None:
    """Fill ``args.config`` (a file), ``args.overrides``, ``args.ckpt`` and ``args.inputs`` from the shape."""
    from .configs import resolve_config

    cmd: Command = args._cmd
    rest = list(getattr(args, "rest", None) or [])
    overrides = [a for a in rest if _OVERRIDE.match(a)]
    positional = [a for a in rest if not _OVERRIDE.match(a)]
    if cmd.kind == "train":
        if positional:
            raise ValueError(f"unexpected argument(s) {positional}: overrides are key=value, options go as --name")
        given = {a.lstrip("-").partition("=")[0] for a in overrides}
        for flag, key, value in (("--resume", "train.resume", args.resume), ("--out", "train.output_dir", args.out),
                                 ("--overwrite", "train.overwrite", "true" if args.overwrite else None)):
            if value is None:
                continue
            if key in given:
                raise ValueError(f"{flag} and {key}=... both given: keep one")
            overrides.append(f"{key}={value}")
    elif cmd.kind == "checkpoint":
        if args.ckpt is None:
            if not positional:
                raise ValueError(f"beit {name} needs a checkpoint: --ckpt PATH (or the first argument)")
            args.ckpt = positional.pop(0)
        if overrides and not cmd.overrides:
            raise ValueError(f"beit {name} takes no key=value overrides, got {overrides}")
    args.overrides, args.inputs = overrides, positional
    if getattr(args, "config", None) is not None:
        args.config = resolve_config(args.config, PRESET_PREFIX.get(_full_name(name), ""))
        _check_preset_fits(args.config, name)
    elif cmd.kind != "tool":
        args.config = None


def _full_name(name: str) -> str:
    """A command's full name ("classify train") from the name it was called by ("finetune")."""
    return " ".join(SHORT[name]) if name in SHORT else name


def _check_preset_fits(config: str | None, name: str) -> None:
    """A shipped preset of another command (``beit finetune -c pretrain_cifar10_small``) is refused by name, with
    the presets this command takes, before its keys fail to fit the config one by one."""
    from .configs import list_presets, preset_dir

    full = _full_name(name)
    prefix = PRESET_PREFIX.get(full)
    if not config or prefix is None or Path(config).resolve().parent != preset_dir().resolve():
        return
    stem = Path(config).stem
    if not stem.startswith(prefix):
        fits = ", ".join(p for p in list_presets() if p.startswith(prefix))
        raise ValueError(f"-c {stem} is a preset of another command; beit {_typed_name(full)} takes: {fits}")


def _train_schema(full: str) -> type:
    """The config dataclass of a training command (imported here, on the error path only)."""
    if full == "pretrain train":
        from .tasks.pretrain.config import PretrainConfig as schema
    elif full == "classify train":
        from .tasks.classify.config import FinetuneConfig as schema
    elif full == "classify linprobe":
        from .tasks.classify.config import LinprobeConfig as schema
    elif full == "segment train":
        from .tasks.segmentation.config import SegmentConfig as schema
    elif full == "layout train":
        from .tasks.layout.config import LayoutConfig as schema
    else:
        from .tasks.tokenizer.config import TokenizerTrainConfig as schema
    return schema


def _fits_another_command(e: BaseException, args: argparse.Namespace, name: str) -> str:
    """For a config error of a training command whose -c file does not fit the command's schema but does fit
    another command's (a copied finetune preset given to ``beit pretrain``): ``"; FILE is a config of `beit
    X`"``, else ``""``."""
    from omegaconf import OmegaConf

    from .engine.config import ConfigError

    path = getattr(args, "config", None)
    full = _full_name(name)
    if not isinstance(e, ConfigError) or not path or full not in PRESET_PREFIX:
        return ""

    def fits(command: str) -> bool:  # the file's keys and types merge into the schema (values are not validated)
        try:
            OmegaConf.merge(OmegaConf.structured(_train_schema(command)), OmegaConf.load(path))
        except Exception:  # noqa: BLE001 - any failure means: does not fit
            return False
        return True

    if fits(full):  # the file fits this command: the error is elsewhere (an override, a value)
        return ""
    other = [_typed_name(c) for c in PRESET_PREFIX if c != full and fits(c)]
    return f"; {path} is a config of `beit {other[0]}`, not of `beit {_typed_name(full)}`" if other else ""


def _typed_name(full: str) -> str:
    """The name a user types for a command's full name: ``classify train`` -> ``finetune``, ``pretrain train`` ->
    ``pretrain`` (its default action), else the full name."""
    short = {" ".join(v): k for k, v in SHORT.items()} | {f"{t} {a}": t for t, a in DEFAULT_ACTION.items()}
    return short.get(full, full)


# ------------------------------------------------------------------------------------ error boundary
def _file_in_the_way(e: BaseException) -> str | None:
    """For "File exists" / "Not a directory" while making folders: the file standing where a folder is needed
    (the first existing part of the path), or None."""
    if not isinstance(e, FileExistsError | NotADirectoryError) or not e.filename:
        return None
    from .engine.config import file_in_the_way

    blocker = file_in_the_way(e.filename)
    return None if blocker is None else str(blocker)


def _error_line(e: BaseException) -> str | None:
    """One line for an anticipated error (the file or key is in it), or None for a bug (traceback)."""
    import pickle

    try:
        import yaml

        yaml_errors: tuple[type[BaseException], ...] = (yaml.YAMLError,)
    except ImportError:  # pragma: no cover - pyyaml is a dependency
        yaml_errors = ()
    lines = str(e).strip().splitlines() or [""]
    first = lines[0]
    name = type(e).__name__
    if first.startswith("Caught ") and "Original Traceback" in str(e):  # re-raised from a DataLoader worker:
        # the worker's own error line ("pkg.module.Name: message") says what happened, not "Caught ..."
        import re

        own = [m.group(2) for m in (re.match(rf"^((?:\w+\.)*){name}: (.*)$", ln.strip()) for ln in lines) if m]
        first = own[-1] if own else lines[-1].strip()
    if isinstance(e, yaml_errors):
        where = getattr(e, "problem_mark", None)
        src = f"{where.name}, line {where.line + 1}: " if where is not None else ""
        return f"YAML syntax error: {src}{getattr(e, 'problem', None) or first}"
    if isinstance(e, pickle.UnpicklingError | EOFError):
        return f"{first or name}"
    blocker = _file_in_the_way(e)
    if blocker is not None:
        return f"{blocker} is a file, not a folder: give an output path whose folders are folders ({name})"
    if isinstance(e, OSError) and not isinstance(e, FileNotFoundError | ValueError):
        # PermissionError, disk full, read-only file system: errno text + the file
        text = f"{e.strerror or name}: {e.filename}" if e.filename else (first or name)
        return f"{text} ({name})"
    if isinstance(e, ValueError | FileNotFoundError | NotADirectoryError):
        return first or name
    if name == "TrainingDivergedError":
        return first
    if name == "OutOfMemoryError":
        return f"out of GPU memory: lower train.batch_size (raise train.accum_steps to keep the total) ({first})"
    if isinstance(e, ModuleNotFoundError) and e.name:
        return f"needs the optional package '{e.name}': pip install 'beit[data]' (or '{e.name}')"
    return None


def _resume_command(argv: Sequence[str]) -> str:
    """The command line that continues an interrupted training run: ``argv`` with its resume option (``--resume
    X``, ``--resume=X``, ``train.resume=X``) replaced by ``--resume auto``; under torchrun, says so."""
    import shlex

    kept: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--resume":
            skip = True
            continue
        if a.startswith("--resume=") or re.match(r"^-{0,2}train\.resume=", a):
            continue
        kept.append(a)
    line = "beit " + shlex.join([*kept, "--resume", "auto"])
    return f"torchrun ... -m {line}" if _distributed() else line


class _Terminated(KeyboardInterrupt):
    """SIGTERM outside the training loop (:func:`_sigterm_interrupts`): handled as a Ctrl-C there is, with
    ``exit_code`` ``128 + signal`` (143) and ``signal_name``, as :class:`beit.engine.trainer.TrainingInterrupted`
    has."""

    def __init__(self, signum: int):
        self.signum, self.exit_code = int(signum), 128 + int(signum)
        self.signal_name = signal.Signals(self.signum).name
        super().__init__(self.signal_name)


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """While the block runs, SIGTERM raises :class:`_Terminated` (a ``KeyboardInterrupt``), as SIGINT raises its
    own: a training command stopped by ``timeout`` or ``scancel`` while it sets up (before the trainer's own
    handler, :data:`beit.engine.trainer.STOP_SIGNALS`) or writes its results (after) died silently, leaving an empty
    run folder; now it says so, ``interrupted by SIGTERM outside the training loop``, removes the folder it made
    (:func:`beit.engine.config.output_dir_removed_on_failure`) and exits 143. The trainer replaces this handler
    during training and restores it after. Only in the main thread, and only over the default action (a handler
    someone else set, or ``SIG_IGN``, is kept); the default is back after the block, so that torchrun stops a rank
    waiting in :func:`_report` at once. A forked process that the signal reaches before it set its own handler
    dies of it, as it would have."""
    if (threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL
            or _torchrun_rank()):
        # under torchrun SIGTERM is how it stops a rank once another failed: a Python handler runs only when C++
        # code returns (a rank blocked in init_process_group ignored it until torchrun's SIGKILL, 30 s later)
        yield
        return
    pid = os.getpid()

    def on_sigterm(signum: int, frame: object) -> None:
        if os.getpid() != pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise _Terminated(signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _torchrun_value(name: str, default: int) -> int:
    """torchrun's variable ``name`` (``WORLD_SIZE``, ``LOCAL_RANK``) as a number; ``default`` without torchrun or
    for a value that is no number (this process then acts as one alone). Read from the environment, as
    :mod:`beit.engine.distributed` reads it before the process group exists (the group is built from it), so that
    the CLI's own checks import no torch: ``beit --help`` loads none, under torchrun either."""
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def _torchrun_rank() -> bool:
    """Whether this process is one of several ranks torchrun started (``WORLD_SIZE`` > 1), group made or not."""
    return _torchrun_value("WORLD_SIZE", 1) > 1


def _another_rank_of_the_host_speaks() -> bool:
    """Under torchrun: whether this rank is not its host's first (``LOCAL_RANK`` not 0), which says what every rank
    of the host meets alike (the help, a usage error: :func:`_said_by_another_rank`)."""
    return _torchrun_rank() and _torchrun_value("LOCAL_RANK", 0) != 0


def _interrupted_line(e: KeyboardInterrupt, label: str, argv: Sequence[str], trains: bool = False) -> str:
    """The last line of an interrupted command: the trainer's account (step, checkpoint) and the command that
    resumes it, or ``interrupted`` for a Ctrl-C outside training (for a training command, ``trains``: with the
    command that continues it, or writes what a finished run had left to write, e.g. its evaluation report). A
    command without ``--resume`` (not ``trains``) is not told to resume."""
    summary = getattr(e, "summary", None)
    if not summary:
        by = f" by {e.signal_name}" if getattr(e, "signal_name", None) else ""  # SIGTERM (a Ctrl-C: none named)
        if trains:
            return (f"{label}: interrupted{by} outside the training loop (while setting up, or after training while "
                    f"writing its results); if checkpoints were written, {_resume_command(argv)} continues the run, "
                    "or only writes what is missing when training had finished")
        return f"{label}: interrupted{by}"
    # only a command with --resume is told to resume (``beit demo``, say, has none: run again, it starts over)
    resume = f"; resume with: {_resume_command(argv)}" if trains and getattr(e, "checkpoint", None) is not None else ""
    return f"{label}: {summary}{resume}"


def _distributed() -> bool:
    """True inside a torchrun process group of more than one rank."""
    try:
        from .engine import distributed as D

        return D.is_dist() and D.world_size() > 1
    except Exception:  # noqa: BLE001 - no torch / a broken group: act as one process
        return False


def _rank() -> int:
    from .engine import distributed as D

    return D.rank()


def _said_by_another_rank(e: BaseException | None = None) -> bool:
    """Under torchrun: whether the error ``e`` (None: a usage error, from the command line alone) is one every
    rank of this host meets alike, which the host's first rank (``LOCAL_RANK`` 0; rank 0 on the first host)
    prints, so this rank stays silent (:func:`_report`; it ends non-zero all the same). Each rank used to print
    ``beit finetune: error: config key ...`` of a bad value, the same line once per rank.

    Alike: a usage error (argparse's own included, :class:`_Parser`), a :class:`~beit.engine.config.ConfigError`
    (a bad key or value, a missing or unwritable path of the config: every rank has the same command line and, on
    one host, the same files), a :class:`~beit.data.datasets.NoReadableImagesError` (none of the images decodes:
    every rank reads the same folder, after the group was made by ``beit pretrain``), or any error met before the
    ranks joined their process group (every rank makes the same checks of the same inputs then), except running
    out of GPU memory (each rank its own GPU). An error of one rank alone (its data shard, its GPU, a collective)
    is printed by that rank; so is one taken for alike that the first rank did not meet (it is printed after the
    wait). The first rank of each host speaks, not rank 0 alone: another host's files may differ, and its
    launcher's console is its own."""
    if not _another_rank_of_the_host_speaks():
        return False
    try:
        from .engine import distributed as D
        from .engine.config import ConfigError

        before_group = not D.is_dist()
        if e is None or isinstance(e, ConfigError):
            return True
        from .data.datasets import NoReadableImagesError
    except Exception:  # noqa: BLE001 - no torch / a broken group: this rank says it
        return False
    return isinstance(e, NoReadableImagesError) or (before_group and type(e).__name__ != "OutOfMemoryError")


#: a collective's own error text: gloo's C++ source place, NCCL's and the process groups' words (not a path that
#: happens to hold "nccl", as /data/nccl_runs/x.pt: a checkpoint's write error is the rank's own)
_COLLECTIVE = re.compile(r"third_party/gloo/|gloo/transport/|\bNCCL (?:error|communicator)|ProcessGroup(?:NCCL|Gloo)")
#: what gloo, NCCL and torch's rendezvous store say when another rank's process is gone (see :func:`_peer_gone`)
_PEER_GONE = re.compile(r"connection (?:was )?(?:reset|closed) by peer|broken pipe|remote process exited", re.I)


def _peer_gone(e: BaseException) -> str | None:
    """Under torchrun: the first line of ``e`` (its ``[file.cc:N]`` prefix and gloo's advice left out) when ``e``
    is a collective's failure because another rank's process is gone (it failed, and printed its error, or was
    stopped), else None. Such a rank printed a ~15-line gloo traceback (``RuntimeError: [.../pair.cc:545] Read
    error ...: Connection reset by peer``) below the other rank's one-line error. Only a distributed error
    (``torch.distributed.DistError``, or a ``RuntimeError`` naming gloo / NCCL) that says so: any other error of
    the rank is its own, and is reported as one."""
    if not isinstance(e, RuntimeError) or not _distributed():
        return None
    text = str(e)
    try:
        import torch.distributed as dist

        dist_error = isinstance(e, getattr(dist, "DistError", ()))
    except ImportError:  # pragma: no cover - _distributed() needs torch
        dist_error = False
    if not (dist_error or _COLLECTIVE.search(text)) or not _PEER_GONE.search(text):
        return None
    first = (text.strip().splitlines() or [""])[0]
    first = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", first)  # the C++ source's place
    return first.split(" This is typically caused by", 1)[0].strip()


#: seconds a rank whose error its host's first rank prints waits, silent, for torchrun to stop it (:func:`_report`)
FIRST_RANK_WAIT_S = 15.0


def _report(line: str, e: BaseException | None = None) -> None:
    """Print the error ``line`` on stderr, once under torchrun. A rank whose error the host's first rank prints
    (:func:`_said_by_another_rank`) first waits :data:`FIRST_RANK_WAIT_S` seconds, silent: the first rank, failing
    alike, prints and exits, and torchrun stops this rank in its wait (had it exited at once, torchrun could have
    stopped the first rank before that printed: no line at all). A rank still running after the wait prints its
    line: the first rank did not fail alike."""
    if _said_by_another_rank(e):
        _wait_for_the_first_rank()
    print(line, file=sys.stderr)


def _wait_for_the_first_rank() -> None:
    """Sleep :data:`FIRST_RANK_WAIT_S` seconds (a Ctrl-C ends the wait, not the error's report)."""
    import time

    try:
        time.sleep(FIRST_RANK_WAIT_S)
    except KeyboardInterrupt:
        pass


def _exit_now_if_distributed(code: int) -> None:
    """Under torchrun a rank that failed must not wait in a collective or in the process-group teardown:
    exit at once (torchrun then stops the other ranks, so every rank ends non-zero)."""
    if _distributed():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _close_distributed() -> None:
    """After a successful command: leave the process group explicitly. Without it gloo's worker threads are torn
    down during interpreter exit and a finished rank can die with SIGABRT ("terminate called without an active
    exception", pytorch issue 190489), turning a good run into a failed torchrun. Only on success: a rank that failed
    exits at once instead (a collective teardown could wait forever on ranks that are still running)."""
    try:
        from .engine import distributed as D
    except ImportError:  # no torch: nothing to close
        return
    D.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``beit ARGV``; returns the exit code (0 ok, 1 error, 2 usage, 130 interrupted by SIGINT, 143 by
    SIGTERM: ``128 + signal``, see :class:`beit.engine.trainer.TrainingInterrupted`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("BEIT_DEBUG", "").lower() in ("1", "true", "yes")
    typed = argv
    argv = _expand(argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if not getattr(args, "_cmd", None):  # the help, and the exit of a usage error
        if _another_rank_of_the_host_speaks():  # as _report: an exit at once could get the first rank stopped unprinted
            _wait_for_the_first_rank()
        parser.print_help()
        return 2
    label = f"beit {args._name if args.command in COMMANDS else args.command + ' ' + args._name}"
    # messages name the command as typed: `beit pretrain -c x` runs `beit pretrain train` (DEFAULT_ACTION)
    shown = label.rsplit(" ", 1)[0] if len(argv) != len(typed) else label
    if extra:  # options and arguments after the key=value overrides: argparse leaves them over
        unknown = [a for a in extra if a.startswith("-") and not _OVERRIDE.match(a)]
        if unknown or not hasattr(args, "rest"):
            _report(f"{shown}: error: unrecognized arguments: {' '.join(unknown or extra)} (see {shown} --help)")
            return 2
        args.rest = list(args.rest) + extra
    empty = _empty_output(args)
    if empty:
        _report(f"{shown}: error: {empty} (see {shown} --help)")
        return 2
    try:
        _normalize(args, label[5:])
        if args._cmd.kind == "train":  # a check after the config's leaves no empty run folder behind
            from .engine.config import output_dir_removed_on_failure

            with output_dir_removed_on_failure(), _sigterm_interrupts():
                code = int(args._cmd.run(args) or 0)
        else:
            code = int(args._cmd.run(args) or 0)
        _close_distributed()
        return code
    except KeyboardInterrupt as e:
        if debug:
            raise
        code = int(getattr(e, "exit_code", 130))
        if not _distributed() or _rank() == 0:  # every rank stopped at the same step: one line
            print(_interrupted_line(e, shown, typed, trains=hasattr(args, "resume")), file=sys.stderr)
        _exit_now_if_distributed(code)
        return code
    except BrokenPipeError:  # output piped into `head` and the like: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit
        return 0
    except Exception as e:
        gone = None if debug else _peer_gone(e)
        if gone is not None:  # the error is another rank's, printed by it: one line here, no traceback
            print(f"{shown}: error: another rank stopped (its error, if it printed one, is above): {gone}",
                  file=sys.stderr)
            _exit_now_if_distributed(1)
            return 1
        line = _error_line(e)
        if debug or line is None:  # --debug, or a bug: the traceback
            if _distributed():
                import traceback

                traceback.print_exc()
                _exit_now_if_distributed(1)
            raise
        _report(f"{shown}: error: {line}{_fits_another_command(e, args, label[5:])}", e)
        _exit_now_if_distributed(1)
        return 1


if __name__ == "__main__":
    sys.exit(main())
