"""``beit layout train|eval|predict``: document layout detection from the command line.

    beit layout train --config configs/layout_publaynet_base.yaml model.init=beit_base_pt22k.pth
    beit layout eval --ckpt runs/layout_publaynet/best.pt [data.val_ann=... data.val_images=...]
    beit layout predict --ckpt runs/layout_publaynet/best.pt pages/ --out predictions/
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..cli import command


def _args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    t = sub.add_parser("train", help="train a detector (YAML config + key=value overrides)")
    t.add_argument("--config", "-c", default=None, help="YAML config; see configs/layout_*.yaml")
    t.add_argument("rest", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=2e-4 data.holdout=20")
    for name, text in (("eval", "COCO AP of a checkpoint on data.val_ann (or the data.holdout split)"),
                       ("predict", "draw predicted boxes on pages and write COCO results JSON")):
        a = sub.add_parser(name, help=text)
        a.add_argument("--ckpt", required=True, help="training checkpoint, e.g. runs/x/best.pt")
        a.add_argument("--out", default=None, help="predict: PNGs + results.json (default predictions/); "
                                                   "eval: metrics.json")
        a.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")
        if name == "predict":
            a.add_argument("--score-thresh", type=float, default=0.5, help="draw boxes scoring at least this")
            a.add_argument("rest", nargs="*", metavar="PAGE|key=value", help="page images or folders, and overrides")
        else:
            a.add_argument("rest", nargs="*", metavar="key=value", help="config overrides, e.g. data.val_ann=...")


@command("layout", "document layout detection (PubLayNet, DocLayNet, DocBank): train | eval | predict")(_args)
def run(args: argparse.Namespace) -> int:
    overrides = [a for a in args.rest if "=" in a]
    others = [a for a in args.rest if "=" not in a]
    if others and args.action != "predict":
        raise ValueError(f"unexpected arguments {others}: overrides are key=value")
    if args.action == "train":
        from ..engine.config import load_config
        from .layout.train import LayoutConfig, train

        cfg = load_config(LayoutConfig, args.config, overrides)
        result = train(cfg)  # logs the AP table itself
        if "table" not in result:
            print("no validation set: set data.val_ann=... or data.holdout=N to get COCO AP")
        return 0

    from .layout.train import load_detector

    model, cfg = load_detector(args.ckpt, overrides, use_ema=args.ema)
    device = _device()
    model.to(device)
    if args.action == "eval":
        from .layout.evaluate import evaluate_model, format_table
        from .layout.train import build_val_dataset

        val_ds = build_val_dataset(cfg)
        if val_ds is None:
            raise ValueError("no evaluation set: set data.val_ann=... (and data.val_images=...) or data.holdout=N")
        metrics = evaluate_model(model, val_ds, cfg.eval_batch_size, cfg.eval_workers)
        print(format_table(metrics, val_ds.class_names, cfg.reference,
                           title=f"{args.ckpt} on {val_ds.ann_file} ({len(val_ds)} pages; {val_ds.summary()})"))
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        return 0

    from .layout.predict import find_pages, predict_pages

    if not others:
        raise ValueError("layout predict needs page images or folders")
    pages = find_pages(others)
    out = predict_pages(model, pages, args.out or "predictions", class_names=cfg.model.class_names,
                        category_ids=cfg.model.category_ids, score_thresh=args.score_thresh)
    for png, n in zip(out["pngs"], out["drawn"]):
        print(f"{png}: {n} boxes >= {args.score_thresh}")
    print(f"detections: {out['results']} (COCO results; image ids and files in {out['pages']})")
    return 0


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
