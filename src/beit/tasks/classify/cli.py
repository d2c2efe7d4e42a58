"""``beit finetune``, ``beit linprobe``, ``beit evaluate`` and ``beit predict`` (= ``beit classify
train|linprobe|eval|predict``): the run functions of the command table in :mod:`beit.cli`."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def finetune(args: argparse.Namespace) -> int:
    """``beit finetune``: :func:`beit.tasks.classify.train.finetune` with the paper's recipe."""
    from ..._text import first_few
    from ...engine import distributed as D
    from ...engine.config import load_run_config
    from ...engine.logging import print_summary
    from .config import FinetuneConfig
    from .train import METRIC_UNITS, finetune

    cfg = load_run_config(FinetuneConfig, args.config, args.overrides, ("data.train_dir", "data.val_dir"))
    result = finetune(cfg)
    if D.is_main():  # under torchrun: one summary (each rank's, with its own img/s, was printed)
        names = result.get("class_names", [])
        print_summary(result, METRIC_UNITS, skip=("class_names",))  # the step's acc a fraction, top1 / top5 percents
        print(f"classes ({len(names)}): {first_few(names, 20)}")
    return 0


def linprobe(args: argparse.Namespace) -> int:
    """``beit linprobe``: one linear head per block on frozen features
    (:func:`beit.tasks.classify.linprobe.linprobe`)."""
    from ...engine.config import load_run_config
    from .config import LinprobeConfig
    from .linprobe import linprobe

    cfg = load_run_config(LinprobeConfig, args.config, args.overrides, ("data.train_dir", "data.val_dir"))
    result = linprobe(cfg)
    knn = result.get("knn_top1", {})
    for b, acc in result["top1"].items():
        mark = "  <- best" if b == result["best_block"] else ""
        k = f"   {result['knn_k']}-NN {knn[b]:6.2f}%" if b in knn else ""
        print(f"block {b:>3}/{result['depth']}: top-1 {acc:6.2f}%{k}{mark}")
    print(f"best block {result['best_block']} top-1 {result['best_top1']:.2f}% "
          f"(features {result['feature_seconds']:.1f}s, total {result['total_seconds']:.1f}s)")
    if knn:
        print(f"best k-NN block {result['knn_best_block']} top-1 {result['knn_best_top1']:.2f}% "
              f"(k={result['knn_k']}, T={result['knn_temperature']:g})")
    return 0


def evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="folder with one sub-folder per class")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="data loader processes (default: 4, or the CPU count if smaller)")
    p.add_argument("--img-size", type=int, default=None, help="evaluate at another resolution (tables resampled)")
    p.add_argument("--ema", action="store_true", help="the EMA weights of a training checkpoint")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")


def default_report_dir(ckpt: Path, data: Path, ema: bool = False) -> Path:
    """Where ``beit evaluate`` writes without ``--out``: beside the checkpoint (inside a model folder),
    ``eval-<checkpoint file stem>-<data folder name>[-ema]``. It never overwrites another report: a folder of
    that name holding a report of another checkpoint or data (or the training's own ``eval`` / ``eval_ema``,
    which have no such hyphenated names) gets a ``-2``, ``-3`` ... suffix; re-evaluating the same pair
    rewrites its own report."""
    import json

    parts = ["eval"] + ([ckpt.stem] if ckpt.is_file() else []) + [Path(os.path.abspath(data)).name or "data"]
    base = (ckpt.parent if ckpt.is_file() else ckpt) / ("-".join(parts) + ("-ema" if ema else ""))
    for n in range(1, 1000):
        cand = base if n == 1 else base.with_name(f"{base.name}-{n}")
        if not cand.exists():
            return cand
        try:
            got = json.loads((cand / "metrics.json").read_text())
            same = (Path(got["checkpoint"]).resolve() == ckpt.resolve() and Path(got["data"]).resolve() ==
                    data.resolve() and got.get("ema", False) == ema)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a folder of that name that is not such a report: leave it alone
        if same:
            return cand
    raise ValueError(f"no free report folder beside {ckpt}: give --out")


def evaluate(args: argparse.Namespace) -> int:
    """``beit evaluate CKPT --data DIR``: top-1/top-5, per-class accuracy, confusion PNG."""
    from .evaluate import evaluate_checkpoint

    if args.inputs:
        raise ValueError(f"unexpected argument(s) {args.inputs}: the images are --data DIR")
    ckpt = Path(args.ckpt)
    out = args.out or str(default_report_dir(ckpt, Path(args.data), args.ema))
    r = evaluate_checkpoint(ckpt, args.data, out, batch_size=args.batch_size, num_workers=args.num_workers,
                            ema=args.ema, device=args.device, img_size=args.img_size)
    worst = sorted(((k, v) for k, v in r["per_class"].items() if v["acc"] is not None),  # None: no images
                   key=lambda kv: kv[1]["acc"])[:5]
    print(f"top-1 {r['top1']:.2f}%  top-5 {r['top5']:.2f}%  loss {r['loss']:.4f}  on {r['num_images']} images"
          + (f" ({len(r['skipped'])} unreadable left out)" if r["skipped"] else ""))
    print("lowest classes: " + ", ".join(f"{k} {v['acc']:.1f}%" for k, v in worst))
    print(f"report: {Path(out) / 'metrics.json'}, {Path(out) / 'per_class.csv'}, {r['confusion_png']}")
    return 0


def predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="data loader processes (default: 4, or the CPU count if smaller)")
    p.add_argument("--ema", action="store_true", help="the EMA weights of a training checkpoint")
    p.add_argument("--device", default=None)


def predict(args: argparse.Namespace) -> int:
    """``beit predict CKPT IMAGES_DIR|IMAGE``: top-k labels and probabilities per image (of a folder, at any
    depth, or one image file), as a CSV.

    Raises:
        ValueError: not exactly one folder or image file after the checkpoint, or ``--topk`` < 1 (and as
            :func:`beit.tasks.classify.evaluate.predict_folder`).
    """
    from .evaluate import predict_folder

    if len(args.inputs) != 1:
        raise ValueError(f"beit predict needs one folder of images, or one image file, after the checkpoint, "
                         f"got {args.inputs}")
    if args.topk < 1:
        raise ValueError(f"--topk must be >= 1, got {args.topk}")
    r = predict_folder(args.ckpt, args.inputs[0], args.out or "predictions.csv", topk=args.topk,
                       batch_size=args.batch_size, num_workers=args.num_workers, ema=args.ema, device=args.device)
    print(json.dumps({k: v for k, v in r.items() if k != "skipped"}))  # the files left out: logged, by name
    return 0
