"""``beit layout train|eval|predict``: document layout detection (run functions of the command table in
:mod:`beit.cli`).

    beit layout train -c layout_publaynet_base model.init=beit_base_pt22k.pth
    beit layout eval runs/layout_publaynet/best.pt [-c val.yaml] [data.val_ann=... data.val_images=...]
    beit layout predict runs/layout_publaynet/best.pt pages/ --out predictions/
"""

from __future__ import annotations

import argparse
from pathlib import Path


def train(args: argparse.Namespace) -> int:
    """``beit layout train``: train a detector (logs the COCO AP table itself)."""
    from ...engine import distributed as D
    from ...engine.config import load_run_config
    from .config import LayoutConfig
    from .train import train as run_train

    cfg = load_run_config(LayoutConfig, args.config, args.overrides)
    result = run_train(cfg)
    if "table" not in result and D.is_main():  # under torchrun: said once
        print("no validation set: set data.val_ann=... or data.holdout=N to get COCO AP")
    return 0


def eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")


def predict_args(p: argparse.ArgumentParser) -> None:
    eval_args(p)
    p.add_argument("--score-thresh", type=float, default=0.5, help="draw boxes scoring at least this")


def _load(args: argparse.Namespace):  # noqa: ANN202
    from .model import load_detector

    model, cfg = load_detector(args.ckpt, list(args.overrides), use_ema=args.ema, config_file=args.config)
    return model.to(_device()), cfg


def evaluate(args: argparse.Namespace) -> int:
    """``beit layout eval CKPT``: COCO AP per category on data.val_ann or the holdout split."""
    from ...data.datasets import check_writable_folder, set_max_image_pixels
    from ...engine.threads import loader_workers
    from .data import build_val_dataset
    from .evaluate import evaluate_model, format_table

    if args.inputs:
        raise ValueError(f"unexpected argument(s) {args.inputs}: overrides are key=value")
    if args.out:  # a file there, or a folder not writable: said now, not after the evaluation
        check_writable_folder(args.out, f"--out {args.out}")
    model, cfg = _load(args)
    set_max_image_pixels(cfg.data.max_image_pixels)  # the run's own limit on page size
    val_ds = build_val_dataset(cfg)
    if val_ds is None:
        raise ValueError("no evaluation set: set data.val_ann=... (and data.val_images=...) or data.holdout=N")
    metrics = evaluate_model(model, val_ds, cfg.eval_batch_size, loader_workers(cfg.eval_workers, "eval_workers"))
    print(format_table(metrics, val_ds.class_names, cfg.reference,
                       title=f"{args.ckpt} on {val_ds.ann_file} ({len(val_ds)} pages; {val_ds.summary()})"))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        from ..._text import strict_json

        (out / "metrics.json").write_text(strict_json(metrics))
    return 0


def predict(args: argparse.Namespace) -> int:
    """``beit layout predict CKPT PAGES...``: boxes drawn on the pages + COCO results JSON in ``--out``."""
    from ...data.datasets import output_stems
    from .predict import find_pages, predict_pages

    if not args.inputs:
        raise ValueError("layout predict needs page images or folders")
    if not 0.0 <= args.score_thresh <= 1.0:
        raise ValueError(f"--score-thresh is a detection score, in [0, 1]; got {args.score_thresh}")
    pages = find_pages(args.inputs, skip=args.out or "predictions", note=print)
    # two pages of one name, a drawing over a page or over someone else's file: refused
    output_stems(pages, out_dir=args.out or "predictions", manifest="pages.json")
    model, cfg = _load(args)  # before the checkpoint is loaded
    with _SigtermInterrupts():  # the pages done so far are written (predict_pages), as on Ctrl-C
        out = predict_pages(model, pages, args.out or "predictions", class_names=cfg.model.class_names,
                            category_ids=cfg.model.category_ids, score_thresh=args.score_thresh)
    for png, n in zip(out["pngs"], out["drawn"]):
        print(f"{png}: {n} boxes >= {args.score_thresh}")
    print(f"detections: {out['results']} (COCO results; image ids and files in {out['pages']})")
    if not out["num_detections"]:
        print(f"no detections: {out['results']} is an empty list (pycocotools' COCO.loadRes cannot load one; a lower "
              "model.score_thresh keeps more)")
    return 0


class _Terminated(KeyboardInterrupt):
    """SIGTERM during ``layout predict``: a ``KeyboardInterrupt`` (what was done is written), exit code 143."""

    exit_code, signal_name = 143, "SIGTERM"
    summary = "interrupted by SIGTERM"


class _SigtermInterrupts:
    """Inside ``with`` SIGTERM raises :class:`_Terminated` (the default would end the process at once, before the
    pages done are written); the handler before it is put back after. Only the main thread can set handlers."""

    def __enter__(self) -> None:
        import signal
        import threading

        self.set = threading.current_thread() is threading.main_thread()
        if self.set:
            self.before = signal.signal(signal.SIGTERM, self._stop)

    @staticmethod
    def _stop(signum: int, frame: object) -> None:
        raise _Terminated()

    def __exit__(self, *exc: object) -> None:
        import signal

        if self.set:  # None: a handler set outside Python, whose stand-in is the default
            signal.signal(signal.SIGTERM, signal.SIG_DFL if self.before is None else self.before)


def _device():  # noqa: ANN202
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
