"""CamVid segmentation: BEiT + UperNet fine-tuned from a pre-trained checkpoint vs from scratch, same budget.

Trains on the 240 train images of the CamVid subset (11 classes, void = 11) and scores mIoU on the 101 val
images, twice with the same architecture, recipe and number of steps: once initialised from ``--init``
(layer decay 0.65, the paper's recipe for pre-trained checkpoints) and once from random weights (layer decay
off: it only makes sense for pre-trained layers). Writes ``results.json``, one overlay PNG per run
(prediction | ground truth) and prints the per-class tables.

    # GPU (one H100, ~8 min): --minutes is the training time of EACH run; steps are calibrated once
    python benchmarks/segment_camvid.py --data camvid_subset.tar --init pretrained.pth --out $OUT --minutes 3
    # CPU smoke test (tiny model written on the fly, 2 steps, 4 val images)
    python benchmarks/segment_camvid.py --smoke --data camvid_subset.tar --out /tmp/seg_smoke
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from beit.configs import preset_path

CONFIG = preset_path("segment_camvid")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="camvid_subset.tar, or a folder holding CamVid/ (or CamVid itself)")
    p.add_argument("--init", default="", help="pre-trained BEiT checkpoint (any format beit.load_model reads)")
    p.add_argument("--out", required=True, help="folder for results.json and the overlay PNGs")
    p.add_argument("--minutes", type=float, default=3.0, help="training time budget of each run (steps calibrated)")
    p.add_argument("--steps", type=int, default=0, help="fixed optimizer steps per run (skips calibration)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--crop", type=int, default=384, help="training crop = slide window at scale 1")
    p.add_argument("--scale", default="auto", help="image scale: 'auto' = patch/16 (1 for patch 16), or a number")
    p.add_argument("--lr", type=float, default=7e-4)
    p.add_argument("--layer-decay", type=float, default=0.65, help="layer decay of the pre-trained run")
    p.add_argument("--scratch-layer-decay", type=float, default=1.0, help="layer decay of the from-scratch run")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--runs", default="pretrained,scratch", help="comma list: pretrained, scratch")
    p.add_argument("--keep-runs", action="store_true", help="keep checkpoints/logs under --out/runs (large)")
    p.add_argument("--smoke", action="store_true", help="CPU smoke test: tiny model, 2 steps, 4 val images")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="extra config overrides for both runs")
    return p.parse_args(argv)


def find_camvid(data: Path, work: Path) -> Path:
    """The CamVid root (with train.txt): extract a tar into ``work`` first."""
    if data.is_file():
        with tarfile.open(data) as tar:
            try:
                tar.extractall(work, filter="data")
            except TypeError:  # Python without extraction filters
                tar.extractall(work)
        data = work
    for cand in (data, data / "CamVid"):
        if (cand / "train.txt").is_file() and (cand / "val.txt").is_file():
            return cand
    raise FileNotFoundError(f"{data}: no CamVid/train.txt + val.txt (expected the camvid_subset layout)")


def write_smoke_init(path: Path) -> Path:
    """A tiny MIM-pre-training-shaped checkpoint (shared rel-pos table), to exercise the real loading path."""
    import beit

    model = beit.create_model("beit_tiny_patch16_224", head="mim", img_size=32, embed_dim=32, depth=4, num_heads=2)
    return beit.save_model(model, path)


def geometry(args: argparse.Namespace, patch: int) -> dict[str, Any]:
    """Crop, base scale and test scale. ``--scale auto`` shrinks the images by patch/16 for patch < 16, so a
    small-patch checkpoint (e.g. patch 4 from 32 px pre-training) sees as many tokens as a patch-16 one."""
    if args.smoke:
        return {"crop": 64, "img_scale": [80, 60], "test_scale": [80, 60], "stride": 48, "scale": 1 / 6}
    s = min(1.0, patch / 16) if args.scale == "auto" else float(args.scale)
    m = 2 * patch  # the model pads to this multiple anyway
    crop = max(m, round(args.crop * s / m) * m)
    img_scale = [round(480 * s), round(360 * s)]
    return {"crop": crop, "img_scale": img_scale, "test_scale": None if s == 1 else img_scale,
            "stride": max(patch, (crop * 2 // 3) // patch * patch), "scale": s}


def base_overrides(args: argparse.Namespace, root: Path, out_dir: Path, geo: dict[str, Any]) -> list[str]:
    test_scale = "null" if geo["test_scale"] is None else f"[{geo['test_scale'][0]},{geo['test_scale'][1]}]"
    ov = [f"data.root={root}", f"train.batch_size={args.batch_size}", f"train.lr={args.lr}",
          f"train.num_workers={args.workers}", f"data.crop_size={geo['crop']}", f"test.crop={geo['crop']}",
          f"test.stride={geo['stride']}", f"data.img_scale=[{geo['img_scale'][0]},{geo['img_scale'][1]}]",
          f"data.test_scale={test_scale}", f"train.output_dir={out_dir}"]
    if args.smoke:
        ov += ["train.num_workers=0", "train.batch_size=2", "test.max_images=4", "model.channels=16",
               "model.aux_channels=8", "data.repeat=1", "train.log_every=1"]
    return ov + list(args.overrides)


def calibrate_steps(cfg: Any, seconds: float) -> tuple[int, float]:
    """Steps that fit in ``seconds``: 30 steps of the same model through the engine, last window's img/s."""
    import copy

    from beit.engine import Trainer
    from beit.engine.logging import read_metrics
    from beit.tasks.segmentation import build_datasets, build_model, make_step_fn

    c = copy.deepcopy(cfg)
    c.model.init = ""  # random weights: same speed, no need to load the file twice
    c.train.max_steps, c.train.warmup_steps, c.train.log_every, c.train.ckpt_every = 30, 5, 10, 10**9
    c.train.output_dir = str(Path(cfg.train.output_dir) / "_calibrate")
    sets = build_datasets(c, ("train",))
    model = build_model(c)
    Trainer(model, sets["train"], make_step_fn(c.data.ignore_index, c.model.aux_weight), c.train, run_config=c).fit()
    rows = read_metrics(Path(c.train.output_dir) / "metrics.jsonl")[1:]  # the first window holds the start-up
    ips = len(rows) / sum(1.0 / r["img_per_s"] for r in rows)  # harmonic mean = total images / total time
    return max(10, int(0.9 * seconds * ips / c.train.batch_size)), ips


def run_one(name: str, cfg: Any, out: Path) -> dict[str, Any]:
    from beit.tasks.segmentation import build_datasets, load_segmenter, train, write_overlays

    t0 = time.perf_counter()
    res = train(cfg)
    wall = time.perf_counter() - t0
    per = res.get("per_class") or {}
    model, rcfg = load_segmenter(Path(cfg.train.output_dir) / "last.pt")
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    val = build_datasets(rcfg, ("val",))["val"]
    overlay = write_overlays(model, val, rcfg, out, 1, prefix=f"overlay_{name}")[0]
    names = val.class_names
    return {
        "init": cfg.model.init or None, "layer_decay": cfg.train.layer_decay, "steps": int(res["step"]),
        "mIoU": res.get("eval/mIoU"), "aAcc": res.get("eval/aAcc"), "mAcc": res.get("eval/mAcc"),
        "per_class_IoU": {n: (None if math.isnan(v) else 100 * v) for n, v in zip(names, per.get("IoU", []))},
        "final_train_loss": res.get("train/loss"), "img_per_s": res.get("train/img_per_s"),
        "wall_s": round(wall, 1), "overlay": overlay.name, "table": res.get("table"),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="segment_camvid_"))
    try:
        return _main(args, work)
    finally:  # extracted data, calibration and (without --keep-runs) the checkpoints
        shutil.rmtree(work, ignore_errors=True)


def _main(args: argparse.Namespace, work: Path) -> int:
    from beit.engine import load_config
    from beit.tasks.segmentation import SegmentConfig

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs_dir = out / "runs" if args.keep_runs else work / "runs"
    root = find_camvid(Path(args.data), work / "data")
    init = args.init
    if args.smoke and not init:
        init = str(write_smoke_init(work / "smoke_init"))
    wanted = [r.strip() for r in args.runs.split(",") if r.strip()]
    if "pretrained" in wanted and not init:
        raise SystemExit("--init is required for the pretrained run (or use --runs scratch)")

    # the architecture comes from the checkpoint; the scratch twin reuses it with random weights
    arch, patch = None, 16
    if init:
        from beit.tasks.segmentation import build_backbone

        geo0 = {"crop": args.crop, "img_scale": [480, 360], "test_scale": None, "stride": 256}
        arch_cfg = load_config(SegmentConfig, CONFIG, base_overrides(args, root, work / "arch", geo0)
                               + [f"model.init={init}"])
        bb = build_backbone(arch_cfg)
        arch, patch = bb.cfg.to_dict(), bb.patch_size
        print(f"backbone from {init}: depth {bb.num_layers}, width {bb.embed_dim}, heads {bb.cfg.num_heads}, "
              f"patch {patch}, layer scale {bb.cfg.init_values}", flush=True)
        del bb
    geo = geometry(args, patch)
    if arch is not None:
        arch["img_size"] = geo["crop"]
    tokens = (geo["crop"] // patch) ** 2
    print(f"images x{geo['scale']:.3g} (base scale {geo['img_scale']}), crop {geo['crop']} = {tokens} tokens, "
          f"slide stride {geo['stride']}", flush=True)

    steps, ips = args.steps, None
    if args.smoke:
        steps = steps or 2
    if not steps:
        c = load_config(SegmentConfig, CONFIG, base_overrides(args, root, work / "calib", geo))
        c.model.init, c.model.backbone = "", arch
        steps, ips = calibrate_steps(c, args.minutes * 60)
        print(f"calibration: {ips:.1f} img/s -> {steps} steps of {args.batch_size} per run", flush=True)
    batch = 2 if args.smoke else args.batch_size
    repeat = max(1, math.ceil(steps * batch / 240))  # one epoch ~ the whole run: no per-epoch checkpoints

    results: dict[str, Any] = {}
    path = out / "results.json"
    if path.is_file():  # runs done by an earlier command (e.g. --runs scratch later) are kept
        results = json.loads(path.read_text())
    results.update({"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                    "torch": torch.__version__, "steps": steps, "batch_size": batch,
                    "geometry": geo, "init": init or None,
                    "calibrated_img_per_s": ips, "smoke": args.smoke})
    results.setdefault("runs", {})
    for name in wanted:
        extra = [f"train.max_steps={steps}", f"train.warmup_steps={max(1, min(steps // 10, 300)) if steps > 1 else 0}",
                 f"data.repeat={1 if args.smoke else repeat}", f"train.output_dir={runs_dir / name}"]
        if name == "pretrained":
            extra += [f"model.init={init}", f"train.layer_decay={args.layer_decay}"]
        elif name == "scratch":
            extra += [f"train.layer_decay={args.scratch_layer_decay}"]
        else:
            raise SystemExit(f"unknown run {name!r} (pretrained | scratch)")
        rc = load_config(SegmentConfig, CONFIG, base_overrides(args, root, runs_dir / name, geo) + extra)
        if name == "scratch":
            # same architecture as the pre-trained one (None: the config's preset)
            rc.model.init, rc.model.backbone = "", arch
        print(f"=== {name}: {steps} steps, layer decay {rc.train.layer_decay}, init {rc.model.init or 'random'}",
              flush=True)
        r = run_one(name, rc, out)
        r.pop("table", None)  # train() printed it
        print(f"{name}: mIoU {r['mIoU']:.2f}  aAcc {r['aAcc']:.2f}  ({r['steps']} steps, {r['wall_s']} s)", flush=True)
        results["runs"][name] = r
        path.write_text(json.dumps(results, indent=1))
    runs = results["runs"]
    if "pretrained" in runs and "scratch" in runs:
        d = runs["pretrained"]["mIoU"] - runs["scratch"]["mIoU"]
        print(f"pre-trained - scratch: {d:+.2f} mIoU", flush=True)
    print(f"wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
