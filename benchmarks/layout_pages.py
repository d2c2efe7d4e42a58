"""Issue [layout]: BEiT pre-trained on document pages (as DiT does), then the layout detector fine-tuned from it and
from scratch at the same budget, scored per category on the DocBank held-out pages.

Stages (``--stages``, in this order; each reads what the earlier ones wrote into ``--work``):

  pages      the training pages of the shared DocBank (80 of 100; the 20 held out by the detector's
             ``data.holdout`` split are never seen) and PubLayNet (16 of 20) subsets, cut into ``--crops``
             random crops a page (area ``--crop-scale`` of the page, aspect 3/4..4/3, saved at ``--crop-px``):
             the unlabeled page images of pre-training, "pages made by crops and scales" (``work/page_crops``)
  tokenizer  ``beit tokenizer train -c tokenizer_cifar10`` on the crops at 112 px with ``model.downsample=8``
             (one token per 16-px patch of a 224 view: the 14x14 grid of pre-training)
  pretrain   ``beit pretrain -c pretrain_base`` with that tokenizer on the crops, the ``--arch`` backbone, pixels
             normalised as the detector's (0.5 / 0.5, DiT's), ``--pretrain-steps`` steps
  detect     ``benchmarks/layout_docbank.py --init work/pretrain/final`` (DocBank; the pre-trained and the
             from-scratch arm, steps calibrated to ``--detect-minutes`` each, its recipe: see that file):
             COCO box AP per category, a page of predicted boxes next to the ground truth; with
             ``--detect-profile`` a profile of a few steps first (``detect/profile.txt``)

Everything goes through the package's own commands. ``--out`` gets ``layout_pages.json`` (stage timings, the
tokenizer's held-out PSNR / codebook use, the pre-training's last metrics) and the detector's tables and PNGs
(``detect/``). On one GPU the first three stages fit one 10-minute call and ``detect`` another: the work folder
must survive between them (the same warm machine, or ``--work`` carried).

    python3 benchmarks/layout_pages.py --data DATA --work /tmp/lp --out $OUT --stages pages,tokenizer,pretrain
    python3 benchmarks/layout_pages.py --data DATA --work /tmp/lp --out $OUT --stages detect --detect-profile
    python3 benchmarks/layout_pages.py --data ../shared/data --work /tmp/lp --out /tmp/lp_out --smoke   # CPU, tiny

``DATA`` holds ``docbank_subset/`` and ``publaynet_subset/`` as in ``../shared/data`` (see layout_docbank.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from layout_docbank import DATASETS, find_subset  # noqa: E402  (the detector benchmark's own data handling)

STAGES = ("pages", "tokenizer", "pretrain", "detect")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="folder holding docbank_subset/ and publaynet_subset/")
    p.add_argument("--work", required=True, help="working folder (pages, tokenizer, pre-training); kept")
    p.add_argument("--out", required=True, help="folder for layout_pages.json and the detector's results")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {', '.join(STAGES)}")
    p.add_argument("--arch", default="beit_small_patch16_224", help="backbone preset (16-px patches)")
    p.add_argument("--crops", type=int, default=64, help="random crops a training page")
    p.add_argument("--crop-scale", type=float, nargs=2, default=(0.05, 0.6), help="crop area / page area")
    p.add_argument("--crop-px", type=int, default=256, help="crops are saved with this short side")
    p.add_argument("--tok-steps", type=int, default=2000)
    p.add_argument("--pretrain-steps", type=int, default=3000)
    p.add_argument("--pretrain-batch", type=int, default=128)
    p.add_argument("--detect-minutes", type=float, default=3.5, help="training time of EACH detector arm")
    p.add_argument("--detect-profile", action="store_true", help="profile a few detector steps first")
    p.add_argument("--detect-evals", type=int, default=5, help="COCO evaluations over each detector arm (AP curve)")
    p.add_argument("--detect-args", default="", help="more layout_docbank.py arguments, e.g. '--lr 3e-4 KEY=VALUE'")
    p.add_argument("--workers", type=int, default=min(14, max(1, (os.cpu_count() or 2) - 2)))
    p.add_argument("--detect-workers", type=int, default=0,
                   help="loader workers of the detector (0: --workers, at most 8: 80 pages of ~15 ms each to decode "
                        "and resize; the cores left run the training process's host work)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--smoke", action="store_true", help="CPU smoke test: tiny tokenizer and model, a few steps")
    a = p.parse_args(argv)
    a.stages = [s.strip() for s in a.stages.split(",") if s.strip()]
    bad = [s for s in a.stages if s not in STAGES]
    if bad:
        p.error(f"unknown stage(s) {bad}: choose from {', '.join(STAGES)}")
    if not 0 < a.crop_scale[0] <= a.crop_scale[1] <= 1:
        p.error(f"--crop-scale must satisfy 0 < min <= max <= 1, got {list(a.crop_scale)}")
    if a.smoke:
        a.crops, a.crop_px, a.tok_steps, a.pretrain_steps, a.pretrain_batch = 4, 96, 3, 3, 8
        a.workers, a.compile = 0, False
    return a


def _run(cmd: list[str], log: Path) -> float:
    """Run one command, its output into ``log`` (and the last lines on failure); returns its wall seconds."""
    t0 = time.perf_counter()
    print("$ " + " ".join(cmd), flush=True)
    with log.open("w") as f:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        tail = log.read_text(errors="replace").splitlines()[-25:]
        raise SystemExit(f"command failed (exit {rc}), log {log}:\n" + "\n".join(tail))
    return round(time.perf_counter() - t0, 1)


def training_pages(data: Path, work: Path) -> list[Path]:
    """The pages the detector trains on: each subset's pages minus the ones its ``data.holdout`` split keeps for
    evaluation (the same ``split_image_ids`` call as ``beit layout train``, seed 0)."""
    from beit.tasks.layout.data import split_image_ids

    pages = []
    for name, (_, folder, tar_name, holdout, _) in DATASETS.items():
        ann = find_subset(data, folder, tar_name, work / "data")
        train_ids, _ = split_image_ids(ann, holdout, 0)
        images = {im["id"]: im["file_name"] for im in json.loads(ann.read_text())["images"]}
        pages += [ann.parent / "images" / images[i] for i in train_ids]
        print(f"{name}: {len(train_ids)} training pages (held out: {holdout})", flush=True)
    return pages


def write_crops(pages: list[Path], out: Path, a: argparse.Namespace) -> int:
    """``a.crops`` random crops of each page (torchvision's ``RandomResizedCrop`` draw: area ``a.crop_scale`` of
    the page, aspect 3/4..4/3; seeded), resized (bicubic) to a short side of ``a.crop_px``, RGB JPEG q90."""
    import torch
    from PIL import Image
    from torchvision.transforms import RandomResizedCrop

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)  # get_params draws from torch's global stream
    n = 0
    for k, page in enumerate(pages):
        with Image.open(page) as im:
            img = im.convert("RGB")
        for c in range(a.crops):
            y, x, h, w = RandomResizedCrop.get_params(img, scale=list(a.crop_scale), ratio=[3 / 4, 4 / 3])
            s = a.crop_px / min(w, h)
            crop = img.crop((x, y, x + w, y + h)).resize((max(1, round(w * s)), max(1, round(h * s))),
                                                          Image.Resampling.BICUBIC)
            crop.save(out / f"p{k:03d}_c{c:03d}.jpg", quality=90)
            n += 1
    return n


def last_train_metrics(metrics_jsonl: Path) -> dict[str, Any]:
    rows = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("split") == "train"]
    return train[-1] if train else {}


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    data, work, out = Path(a.data).resolve(), Path(a.work).resolve(), Path(a.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    report_path = out / "layout_pages.json"
    report: dict[str, Any] = json.loads(report_path.read_text()) if report_path.is_file() else {}
    report.update({"arch": a.arch, "smoke": a.smoke, "args": {k: v for k, v in vars(a).items() if k != "stages"}})
    py = [sys.executable, "-m", "beit"]
    crops, tok_dir, pre_dir = work / "page_crops", work / "tokenizer", work / "pretrain"
    common = [f"train.num_workers={a.workers}", f"train.compile={str(a.compile).lower()}", "train.overwrite=true"]

    def save() -> None:
        report_path.write_text(json.dumps(report, indent=1, default=str))

    if "pages" in a.stages:
        t0 = time.perf_counter()
        pages = training_pages(data, work)
        n = write_crops(pages, crops, a)
        report["pages"] = {"training_pages": len(pages), "crops": n, "wall_s": round(time.perf_counter() - t0, 1)}
        print(f"{n} crops of {len(pages)} pages in {crops}", flush=True)
        save()
    if "tokenizer" in a.stages:
        tiny = (["model.vocab_size=64", "model.hidden=16", "model.num_res_blocks=0", "model.codebook_dim=16",
                 "img_size=32", "train.batch_size=8"] if a.smoke else ["img_size=112"])
        secs = _run(py + ["tokenizer", "train", "-c", "tokenizer_cifar10", f"data_dir={crops}", "model.downsample=8",
                          f"train.output_dir={tok_dir}", f"train.max_steps={a.tok_steps}",
                          f"train.warmup_steps={a.tok_steps // 20 + 1}",
                          f"model.temperature_anneal_steps={a.tok_steps}",
                          "train.image_every=0", "train.log_every=50", *common, *tiny], out / "tokenizer.log")
        m = json.loads((tok_dir / "tokenizer_metrics.json").read_text())
        report["tokenizer"] = {"wall_s": secs, **{k: m[k] for k in m if k.startswith("heldout_")}}
        save()
    if "pretrain" in a.stages:
        tiny = (["model.embed_dim=32", "model.depth=4", "model.num_heads=2", "model.img_size=64",
                 "data.num_mask_patches=6", "data.min_mask_patches_per_block=2"] if a.smoke else [])
        steps = a.pretrain_steps
        secs = _run(py + ["pretrain", "-c", "pretrain_base", f"model.name={a.arch}", f"data.path={crops}",
                          "data.scale=[0.5,1.0]", "data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]",
                          "tokenizer.kind=dvae", "tokenizer.precision=fp32",
                          f"tokenizer.path={tok_dir / 'dvae.safetensors'}",
                          f"train.output_dir={pre_dir}", f"train.max_steps={steps}",
                          f"train.warmup_steps={max(1, steps // 10)}", f"train.batch_size={a.pretrain_batch}",
                          "train.log_every=50", f"train.image_every={max(steps // 2, 1)}", "train.ckpt_every=100000",
                          *common, *tiny], out / "pretrain.log")
        report["pretrain"] = {"wall_s": secs, "steps": steps, "last": last_train_metrics(pre_dir / "metrics.jsonl")}
        for png in ("mim_panel.png", "curves.png"):
            if (pre_dir / png).is_file():
                (out / f"pretrain_{png}").write_bytes((pre_dir / png).read_bytes())
        save()
    if "detect" in a.stages:
        init = pre_dir / "final"
        if not init.is_dir():
            raise SystemExit(f"{init} not found: run the pretrain stage first (same --work)")
        cmd = [sys.executable, str(HERE / "layout_docbank.py"), "--data", str(data), "--init", str(init),
               "--out", str(out / "detect"), "--only", "docbank", "--minutes", str(a.detect_minutes),
               "--workers", str(a.detect_workers or min(a.workers, 8)), "--evals", str(a.detect_evals)]
        if a.detect_profile:
            cmd += ["--profile", str(out / "detect" / "profile.txt")] + (["--profile-steps", "2"] if a.smoke else [])
        secs = _run(cmd + (["--smoke"] if a.smoke else []) + shlex.split(a.detect_args), out / "detect.log")
        res = json.loads((out / "detect" / "results.json").read_text())
        runs = res.get("datasets", {}).get("docbank", {}).get("runs", {})
        report["detect"] = {"wall_s": secs, **{n: {k: r.get(k) for k in ("bbox_AP", "bbox_AP50", "steps", "error")}
                                               for n, r in runs.items()}}
        save()
    print(json.dumps({k: v for k, v in report.items() if k != "args"}, indent=1, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
