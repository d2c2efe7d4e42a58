"""``beit finetune``, ``beit linprobe``, ``beit evaluate`` and ``beit predict``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..cli import command


def _config_path(name: str | None) -> str | None:
    """A YAML path as given, or a preset name looked up in ./configs and the repository's configs/."""
    if not name or Path(name).is_file():
        return name
    stem = name[:-5] if name.endswith(".yaml") else name
    for base in (Path.cwd() / "configs", Path(__file__).resolve().parents[3] / "configs"):
        if (base / f"{stem}.yaml").is_file():
            return str(base / f"{stem}.yaml")
    raise FileNotFoundError(f"config not found: {name} (also looked for configs/{stem}.yaml)")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None,
                   help="YAML config: a path or a preset name in configs/ (e.g. finetune_base)")
    p.add_argument("--resume", default=None, help="checkpoint to resume from, or 'auto' (output_dir/last.pt)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. model=pt.pth data.train_dir=train/ data.val_dir=val/ train.lr=1e-3")


def _overrides(args: argparse.Namespace) -> list[str]:
    return list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])


def _print_result(result: dict, skip: tuple[str, ...] = ()) -> None:
    for k, v in result.items():
        if k not in skip:
            print(f"{k}: {v}")


@command("finetune", "fine-tune a (pre-trained) BEiT classifier on class folders, the paper's recipe")(_config_args)
def _finetune(args: argparse.Namespace) -> int:
    from ..engine.config import load_config
    from .finetune import FinetuneConfig, finetune

    cfg = load_config(FinetuneConfig, _config_path(args.config), _overrides(args))
    result = finetune(cfg)
    names = result.get("class_names", [])
    _print_result(result, skip=("class_names",))
    print(f"classes ({len(names)}): {', '.join(names[:20])}{' ...' if len(names) > 20 else ''}")
    return 0


@command("linprobe", "linear probing of a frozen encoder, one head per block (layers=all sweeps them)")(
    _config_args)
def _linprobe(args: argparse.Namespace) -> int:
    from ..engine.config import load_config
    from .linprobe import LinprobeConfig, linprobe

    cfg = load_config(LinprobeConfig, _config_path(args.config), _overrides(args))
    result = linprobe(cfg)
    for b, acc in result["top1"].items():
        mark = "  <- best" if b == result["best_block"] else ""
        print(f"block {b:>3}/{result['depth']}: top-1 {acc:6.2f}%{mark}")
    print(f"best block {result['best_block']} top-1 {result['best_top1']:.2f}% "
          f"(features {result['feature_seconds']:.1f}s, total {result['total_seconds']:.1f}s)")
    return 0


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a fine-tuned model: output_dir/model, last.pt / best.pt, or any BEiT classifier")
    p.add_argument("--data", required=True, help="folder with one sub-folder per class")
    p.add_argument("--out", default=None, help="report folder (default: eval/ next to the checkpoint)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--img-size", type=int, default=None, help="evaluate at another resolution (tables resampled)")
    p.add_argument("--ema", action="store_true", help="the EMA weights of a training checkpoint")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")


@command("evaluate", "top-1/top-5, per-class accuracy and a confusion-matrix PNG of a classifier")(_evaluate_args)
def _evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_checkpoint

    ckpt = Path(args.checkpoint)
    out = args.out or str((ckpt if ckpt.is_dir() else ckpt.parent) / ("eval_ema" if args.ema else "eval"))
    r = evaluate_checkpoint(ckpt, args.data, out, batch_size=args.batch_size, num_workers=args.num_workers,
                            ema=args.ema, device=args.device, img_size=args.img_size)
    worst = sorted(r["per_class"].items(), key=lambda kv: kv[1]["acc"])[:5]
    print(f"top-1 {r['top1']:.2f}%  top-5 {r['top5']:.2f}%  loss {r['loss']:.4f}  on {r['num_images']} images"
          + (f" ({len(r['skipped'])} unreadable left out)" if r["skipped"] else ""))
    print("lowest classes: " + ", ".join(f"{k} {v['acc']:.1f}%" for k, v in worst))
    print(f"report: {Path(out) / 'metrics.json'}, {Path(out) / 'per_class.csv'}, {r['confusion_png']}")
    return 0


def _predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a fine-tuned model: output_dir/model, last.pt / best.pt, or any BEiT classifier")
    p.add_argument("images", help="folder of images (searched recursively)")
    p.add_argument("--out", default="predictions.csv", help="CSV to write")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--ema", action="store_true", help="the EMA weights of a training checkpoint")
    p.add_argument("--device", default=None)


@command("predict", "top-k labels and probabilities for a folder of images, as a CSV")(_predict_args)
def _predict(args: argparse.Namespace) -> int:
    from .evaluate import predict_folder

    if args.topk < 1:
        raise ValueError(f"--topk must be >= 1, got {args.topk}")
    r = predict_folder(args.checkpoint, args.images, args.out, topk=args.topk, batch_size=args.batch_size,
                       num_workers=args.num_workers, ema=args.ema, device=args.device)
    print(json.dumps({k: v for k, v in r.items() if k != "skipped"}))
    if r["skipped"]:
        print(f"{len(r['skipped'])} unreadable images left out: {', '.join(r['skipped'][:5])}")
    return 0
