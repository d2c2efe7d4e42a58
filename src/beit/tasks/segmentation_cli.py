"""``beit segment train|eval|predict``: semantic segmentation with BEiT + UperNet.

    beit segment train --config configs/segment_camvid.yaml data.root=data/CamVid model.init=pt.pth
    beit segment eval --ckpt runs/segment_camvid/best.pt            # prints the per-class table
    beit segment predict --ckpt runs/segment_camvid/best.pt --input photos/ --output overlays/

Options go before the ``KEY=VALUE`` overrides.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from beit.cli import command


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config (configs/segment_*.yaml); for eval/predict it is "
                                                  "merged over the config stored in the checkpoint")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides after the options, e.g. train.lr=3e-4 data.root=/data/ade")


def _args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="{train,eval,predict}", required=True)
    t = sub.add_parser("train", help="fine-tune BEiT + UperNet with the shared trainer")
    _common(t)
    for name, what in (("eval", "mIoU / aAcc on the val split, per-class table"),
                       ("predict", "coloured overlays and label maps for images")):
        q = sub.add_parser(name, help=what, description=what)
        q.add_argument("--ckpt", required=True, help="a training checkpoint (last.pt / best.pt)")
        q.add_argument("--ema", action="store_true", help="use the EMA weights of the checkpoint")
        if name == "eval":
            q.add_argument("--output", default=None, help="folder for overlays and metrics.json")
        else:
            q.add_argument("--input", nargs="+", required=True, help="image files or folders")
            q.add_argument("--output", default="segment_predictions", help="folder for the PNGs")
            q.add_argument("--alpha", type=float, default=0.5, help="weight of the colours in the overlay")
        _common(q)


@command("segment", "semantic segmentation (BEiT + UperNet): train, eval (mIoU table) or predict (overlays)")(_args)
def run(args: argparse.Namespace) -> int:
    from beit.data.datasets import IMG_EXTENSIONS, list_images
    from beit.engine import load_config

    from .segmentation import SegmentConfig, evaluate, load_segmenter, predict, train

    overrides = list(args.overrides or [])
    if args.action == "train":
        cfg = load_config(SegmentConfig, args.config, overrides)
        result = train(cfg)
        shown = {k: v for k, v in result.items() if k not in ("table", "per_class")}
        print(json.dumps(shown, indent=1, default=str))
        return 0

    model, cfg = load_segmenter(args.ckpt, args.config, overrides, use_ema=args.ema)
    if args.action == "eval":
        res = evaluate(model, cfg, args.output)
        print(res["table"])
        if args.output:
            out = Path(args.output)
            out.mkdir(parents=True, exist_ok=True)
            (out / "metrics.json").write_text(json.dumps({k: v for k, v in res.items() if k != "table"}, indent=1))
            print(f"wrote {out / 'metrics.json'}")
        return 0

    files: list[str] = []
    for item in args.input:
        path = Path(item)
        if path.is_dir():
            files += list_images(path)
        elif path.is_file() and path.suffix.lower() in IMG_EXTENSIONS:
            files.append(str(path))
        else:
            raise FileNotFoundError(f"not an image or a folder: {item}")
    if not files:
        raise FileNotFoundError(f"no images in {args.input}")
    written = predict(model, cfg, files, args.output, alpha=args.alpha)
    print(f"wrote {len(written)} overlays (+ label maps) to {Path(written[0]).parent}")
    return 0
