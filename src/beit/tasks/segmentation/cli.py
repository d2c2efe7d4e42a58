"""``beit segment train|eval|predict``: semantic segmentation with BEiT + UperNet (run functions of the
command table in :mod:`beit.cli`).

    beit segment train -c segment_camvid data.root=data/CamVid model.init=pt.pth
    beit segment eval runs/segment_camvid/best.pt           # prints the per-class table (or --ckpt PATH)
    beit segment predict runs/segment_camvid/best.pt photos/ --out overlays/
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def train(args: argparse.Namespace) -> int:
    """``beit segment train``: fine-tune BEiT + UperNet with the shared trainer."""
    from ...engine import distributed as D
    from ...engine.config import load_run_config
    from .config import SegmentConfig
    from .train import train as run_train

    cfg = load_run_config(SegmentConfig, args.config, args.overrides)
    result = run_train(cfg)
    if D.is_main():  # under torchrun: one summary (each rank's, with its own img/s, was printed)
        shown = {k: v for k, v in result.items() if k not in ("table", "per_class")}
        print(json.dumps(shown, indent=1, default=str))
    return 0


def eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ema", action="store_true", help="use the EMA weights of the checkpoint")


def predict_args(p: argparse.ArgumentParser) -> None:
    eval_args(p)
    p.add_argument("--input", nargs="+", default=[], help="image files or folders (or give them after the ckpt)")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the colours in the overlay")


def evaluate(args: argparse.Namespace) -> int:
    """``beit segment eval CKPT``: mIoU / aAcc and the per-class table; metrics.json in ``--out``."""
    from .model import load_segmenter
    from .train import evaluate as run_eval

    if args.inputs:
        raise ValueError(f"unexpected argument(s) {args.inputs}: overrides are key=value (e.g. data.root=DIR)")
    model, cfg = load_segmenter(args.ckpt, args.config, args.overrides, use_ema=args.ema)
    res = run_eval(model, cfg, args.out)
    print(res["table"])
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        from ..._text import strict_json

        (out / "metrics.json").write_text(strict_json({k: v for k, v in res.items() if k != "table"}))
        print(f"wrote {out / 'metrics.json'}")
    return 0


def predict(args: argparse.Namespace) -> int:
    """``beit segment predict CKPT IMAGES...``: ``<stem>_overlay.png`` (coloured overlay) and ``<stem>_labels.png``
    (label map) per image in ``--out``, ``<stem>`` the file name without its extension (``<dir>__<stem>`` where it
    repeats in other folders); two inputs of one name (``a.jpg`` and ``a.png`` in one folder) are refused."""
    from ...data.datasets import IMG_EXTENSIONS, list_images, not_below, output_stems
    from .infer import predict as run_predict
    from .model import load_segmenter

    inputs = list(args.input) + list(args.inputs)
    if not inputs:
        raise ValueError("beit segment predict needs image files or folders (after the checkpoint, or --input)")
    if not 0.0 <= args.alpha <= 1.0:
        raise ValueError(f"--alpha is the colours' weight in the overlay, in [0, 1]; got {args.alpha}")
    files: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():  # not the images of an output folder below it (an earlier run's overlays)
            files += not_below(list_images(path), path, args.out or "segment_predictions")
        elif path.is_file() and path.suffix.lower() in IMG_EXTENSIONS:
            files.append(str(path))
        else:
            raise FileNotFoundError(f"not an image or a folder: {item}")
    if not files:
        raise FileNotFoundError(f"no images in {inputs}")
    output_stems(files, ("_overlay.png", "_labels.png"), out_dir=args.out or "segment_predictions",
                 manifest="index.json")  # refusals before the checkpoint is loaded
    model, cfg = load_segmenter(args.ckpt, args.config, args.overrides, use_ema=args.ema)
    written = run_predict(model, cfg, files, args.out or "segment_predictions", alpha=args.alpha)
    print(f"wrote {len(written)} overlays (+ label maps) to {Path(written[0]).parent}")
    return 0
