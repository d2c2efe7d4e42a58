"""Layout detection: BEiT backbone + FPN + R-CNN fine-tuned from a pre-trained checkpoint vs from scratch.

DocBank: trains on 80 pages of the shared 100-page subset and scores COCO box AP on the other 20 (a fixed,
seeded split), 13 classes, Faster R-CNN (the subset's regions are rectangles). PubLayNet: a SMOKE TEST on
the 20 official sample pages (16 train / 4 val, Mask R-CNN, the issue's seed numbers printed alongside but
not comparable: they are on the 11k-page val set after 60k steps). Each dataset is trained twice with the
same architecture, recipe and number of steps: from ``--init`` (layer decay on) and from random weights
(layer decay off: it only makes sense for pre-trained layers). Writes ``results.json``, the per-category AP
tables (``*_ap.txt``) and one page per run with its predicted boxes next to the ground truth (``*_page_*.png``)
into ``--out``. ``--profile FILE`` first profiles a few training steps (torch.profiler: the step's wall and
device time, the forward's parts, the top ops) and appends the tables to FILE.

The recipe is each dataset's preset (``layout_docbank``: pages at short sides 512-640, anchors for wide thin
text regions, Faster R-CNN; ``layout_publaynet_base``: DiT's) with 8 pages a step at DiT's lr 4e-4 (DiT:
16 pages) for both. The budget is time, and on 80 training pages the detector needs many passes: 3.5 minutes of
an H100 a DocBank run is ~150-250 passes if a step of 8 pages takes 0.1-0.15 s. (The first H100 run took 0.6 s
a step of 4 pages: every block rebuilt its relative-position index on the host; ``beit.models.relpos`` now reads
the bias for a new page size out of the table on the device, so a step is bound by the detector's own work.)

    # GPU (one H100, ~8.5 min with the defaults): --minutes is the training time of EACH DocBank run,
    # --publaynet-minutes of each PubLayNet run; steps are calibrated once per dataset
    python benchmarks/layout_docbank.py --data data/layout --init pretrained.pth --out $OUT
    python benchmarks/layout_docbank.py --data data/layout --init pretrained.pth --out $OUT --only docbank \
        --profile $OUT/profile.txt
    # CPU smoke test (tiny model written on the fly, 2 steps, small pages)
    python benchmarks/layout_docbank.py --smoke --data /work/shared/data --out /tmp/layout_smoke

``--data`` holds ``docbank_subset/`` (annotations.json + docbank_subset.tar.gz or an extracted images/) and
``publaynet_subset/`` (annotations.json + publaynet_subset_images.tar or images/); tars are extracted into
a temporary folder, never into the repository.
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
from PIL import Image

from beit.configs import preset_path

DATASETS = {
    # name: (config, subset folder, image tar, held-out pages, smoke-test note)
    "docbank": (preset_path("layout_docbank"), "docbank_subset", "docbank_subset.tar.gz", 20,
                "80 train / 20 val pages of the shared DocBank subset; its region boxes were derived from token "
                "labels (not the official DocBank regions): not comparable with published DocBank numbers"),
    "publaynet": (preset_path("layout_publaynet_base"), "publaynet_subset", "publaynet_subset_images.tar",
                  4, "SMOKE TEST: 16 train / 4 val of PubLayNet's 20 sample pages; the seed (BEiT-B 0.931 AP) is "
                     "PubLayNet val (11k pages) after 60k steps of 16 pages: NOT comparable"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="folder holding docbank_subset/ and publaynet_subset/")
    p.add_argument("--init", default="", help="pre-trained BEiT checkpoint (any format beit.load_model reads)")
    p.add_argument("--out", required=True, help="folder for results.json, the AP tables and the page PNGs")
    p.add_argument("--only", default="docbank,publaynet", help="comma list: docbank, publaynet")
    p.add_argument("--runs", default="pretrained,scratch", help="comma list: pretrained, scratch")
    p.add_argument("--minutes", type=float, default=3.5, help="training time of each DocBank run (steps calibrated)")
    p.add_argument("--publaynet-minutes", type=float, default=0.5, help="training time of each PubLayNet run")
    p.add_argument("--steps", type=int, default=0, help="fixed optimizer steps per run (skips calibration)")
    p.add_argument("--batch-size", type=int, default=8, help="pages a step (DiT: 16)")
    p.add_argument("--lr", type=float, default=4e-4, help="peak lr, cosine to 0 (DiT's)")
    p.add_argument("--layer-decay", type=float, default=0.75, help="layer decay of the pre-trained run")
    p.add_argument("--scratch-layer-decay", type=float, default=1.0, help="layer decay of the from-scratch run")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--evals", type=int, default=1,
                   help="COCO evaluations over each run, evenly spaced (the AP curve: DATASET_ap_curve.png, "
                        "ap_curve in results.json)")
    p.add_argument("--keep-runs", action="store_true", help="keep checkpoints/logs under --out/runs (large)")
    p.add_argument("--profile", default="", metavar="FILE",
                   help="first profile a few training steps of the first dataset (random weights, the runs' model "
                        "and pages) with torch.profiler and append the tables to FILE; --runs '' = profile only")
    p.add_argument("--profile-steps", type=int, default=5, help="steps profiled (after as many warm-up steps)")
    p.add_argument("--smoke", action="store_true", help="CPU smoke test: tiny model, 2 steps, small pages")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="extra config overrides for every run")
    return p.parse_args(argv)


def find_subset(data: Path, folder: str, tar_name: str, work: Path) -> Path:
    """``annotations.json`` with ``images/`` next to it: the subset as given, or its tar extracted into ``work``."""
    src = data / folder
    ann = src / "annotations.json"
    if not ann.is_file():
        raise FileNotFoundError(f"{ann} not found (expected --data to hold {folder}/annotations.json)")
    if (src / "images").is_dir():
        return ann
    tar = src / tar_name
    if not tar.is_file():
        raise FileNotFoundError(f"{src}: neither images/ nor {tar_name}")
    dst = work / folder
    dst.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar) as t:
        members = [m for m in t.getmembers() if m.name.startswith("images/")]  # DocBank's tokens/ are not needed
        try:
            t.extractall(dst, members=members, filter="data")
        except TypeError:  # Python without extraction filters
            t.extractall(dst, members=members)
    shutil.copy(ann, dst / "annotations.json")
    return dst / "annotations.json"


def write_smoke_init(path: Path) -> Path:
    """A tiny MIM-pre-training-shaped checkpoint (shared rel-pos table), to exercise the real loading path."""
    import beit

    model = beit.create_model("beit_tiny_patch16_224", head="mim", img_size=64, embed_dim=32, depth=4, num_heads=2)
    return beit.save_model(model, path)


def base_overrides(args: argparse.Namespace, ann: Path, holdout: int, out_dir: Path) -> list[str]:
    ov = [f"data.train_ann={ann}", "data.train_images=''", "data.val_ann=''", "data.val_images=''",
          f"data.holdout={holdout}", f"train.batch_size={args.batch_size}",
          f"train.lr={args.lr}", f"train.num_workers={args.workers}", f"eval_workers={min(args.workers, 4)}",
          "train.eval_every=0", "train.keep_last=0", "train.ckpt_every=1000000", "train.log_every=10",
          f"train.output_dir={out_dir}", "eval_batch_size=4"]
    if args.smoke:
        ov += ["train.num_workers=0", "eval_workers=0", "train.batch_size=2", "train.log_every=1",
               "data.min_sizes=[128]", "data.max_size=192", "model.min_size_test=128", "model.max_size_test=192",
               "model.fpn_channels=32", "model.box_head_dim=64", "model.mask_head_dim=16"]
    return ov + list(args.overrides)


def calibrate_steps(cfg: Any, seconds: float) -> tuple[int, float]:
    """Steps that fit in ``seconds``: 60 steps of the same model through the engine, the img/s of the last 20
    (steps of ~0.1 s: a window of 10 steps was at the mercy of one slow batch, and the first H100 run's
    calibration read 5.6 img/s where its runs went at 6.5: each arm used 153 s of its 198)."""
    import copy

    from beit.tasks.layout import train

    c = copy.deepcopy(cfg)
    c.model.init = ""  # random weights: same speed, no need to load the file twice
    c.data.holdout, c.data.repeat = 0, 100  # no evaluation; one epoch covers the calibration
    c.train.max_steps, c.train.warmup_steps, c.train.log_every = 60, 5, 20
    c.train.output_dir = str(Path(cfg.train.output_dir) / "_calibrate")
    res = train(c)
    ips = float(res["train/img_per_s"])
    return max(10, int(0.9 * seconds * ips / c.train.batch_size)), ips


PROFILED_PARTS = {  # forward parts annotated in the profile (module path in LayoutDetector -> row name)
    "detector.transform": "fwd: transform (normalise, pad)", "detector.backbone": "fwd: backbone (ViT+pyramid+FPN)",
    "detector.backbone.fpn": "fwd: FPN", "detector.rpn": "fwd: RPN (anchors, losses)",
    "detector.roi_heads": "fwd: RoI heads (sampling, box head, losses)",
}


def profile_steps(cfg: Any, steps: int, out_file: Path) -> str:
    """torch.profiler over ``steps`` training steps of the engine (after ``steps`` warm-up steps), random weights.

    The engine's own loop runs (loader workers, bf16, layer-decay AdamW, clipping, its one sync a step); a
    profiler step boundary is put at the start of each ``step_fn`` call, so a profiled step is everything from one
    forward to the next: the forward parts (annotated ``fwd: ...`` rows, by module), the backward, the optimizer,
    the wait for the next batch. Appends to ``out_file`` and returns: the wall time a step (median of the profiled
    steps), the device-busy time a step (sum of kernel times: wall >> busy means the host is the bottleneck),
    the annotated parts (host time, and on CUDA the time of their kernels), the ops by device time (CUDA) or by
    self CPU time, and the host syncs counted.
    """
    import copy
    import statistics

    from torch.autograd import DeviceType
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile, schedule

    from beit.data.datasets import RepeatedDataset
    from beit.engine import Trainer
    from beit.engine.trainer import seed_everything
    from beit.tasks.layout import build_datasets, build_detector, collate
    from beit.tasks.layout import step_fn as layout_step

    c = copy.deepcopy(cfg)
    c.model.init, c.data.holdout, c.data.repeat = "", 0, 100
    c.train.max_steps, c.train.warmup_steps, c.train.log_every = 2 * steps + 2, 1, 10**6
    c.train.eval_every, c.train.image_every = 0, 0
    c.train.output_dir = str(Path(cfg.train.output_dir) / "_profile")
    train_ds, _ = build_datasets(c, with_val=False)
    seed_everything(c.train.seed)
    model = build_detector(c.model, train_ds.class_names, train_ds.cat_ids, c.model_overrides)
    cuda = torch.cuda.is_available()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prof = profile(activities=acts, schedule=schedule(skip_first=steps, wait=0, warmup=1, active=steps, repeat=1))
    ranges: dict[int, Any] = {}

    def enter(name: str) -> Any:
        def hook(module: Any, args: Any) -> None:
            ranges[id(module)] = record_function(name).__enter__()
        return hook

    def leave(module: Any, args: Any, output: Any) -> None:
        ranges.pop(id(module)).__exit__(None, None, None)

    modules = dict(model.named_modules())
    handles = [h for path, name in PROFILED_PARTS.items() if path in modules for h in
               (modules[path].register_forward_pre_hook(enter(name)), modules[path].register_forward_hook(leave))]
    starts: list[float] = []

    def step(m: Any, batch: Any) -> Any:
        starts.append(time.perf_counter())  # training step i runs in the profiler's step i + 1
        prof.step()
        return layout_step(m, batch)

    data = RepeatedDataset(train_ds, c.data.repeat)
    trainer = Trainer(model, data, step, c.train, collate_fn=collate, run_config=c)
    with prof:
        trainer.fit()
    for h in handles:
        h.remove()
    walls = [starts[i + 1] - starts[i] for i in range(steps, 2 * steps)]  # the profiled steps, forward to forward
    ka = prof.key_averages()
    kernels = [e for e in ka if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
    busy = sum(e.self_device_time_total for e in kernels) / 1e3 / steps
    lines = [f"==== layout training step profile: {c.train.batch_size} pages a step, short sides "
             f"{list(c.data.min_sizes)} (max {c.data.max_size}), {model.body.num_layers} blocks x "
             f"{model.body.embed_dim}, "
             f"{torch.cuda.get_device_name() if cuda else 'cpu'}, {c.train.num_workers} loader workers",
             f"wall {1e3 * statistics.median(walls):.1f} ms a step (median of {len(walls)}; "
             f"{c.train.batch_size / statistics.median(walls):.1f} img/s)"
             + (f", device busy {busy:.1f} ms a step, peak memory "
                f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if cuda else "")]
    if steps > 3:  # the profiler's own cost: the warm-up steps after the first two ran without it
        quiet = statistics.median(starts[i + 1] - starts[i] for i in range(2, steps))
        lines.append(f"unprofiled warm-up steps 3-{steps}: {1e3 * quiet:.1f} ms a step (median)")
    # the host-side range of each part (its GPU-side twin, a gpu_user_annotation, spans idle gaps too): its host
    # time, and the time of the kernels its ops launched
    parts = {e.key: e for e in ka if e.key in PROFILED_PARTS.values() and e.device_type == DeviceType.CPU}
    for name in PROFILED_PARTS.values():
        if name in parts:
            e = parts[name]
            dev = f", its kernels {e.device_time_total / 1e3 / steps:.1f} ms" if cuda else ""
            lines.append(f"  {name:<44} host {e.cpu_time_total / 1e3 / steps:8.1f} ms a step{dev}")
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    lines.append(f"ops by {sort} over {steps} steps:")
    lines.append(ka.table(sort_by=sort, row_limit=30))
    if cuda:
        lines.append("ops by self_cpu_time_total:")
        lines.append(ka.table(sort_by="self_cpu_time_total", row_limit=20))
        lines.append("host syncs over the profiled steps: " + ", ".join(
            f"{e.key} x{e.count}" for e in ka if "ynchronize" in e.key or
            e.key in ("cudaMemcpy", "cudaStreamWaitEvent", "aten::item", "aten::_local_scalar_dense", "aten::nonzero")))
    text = "\n".join(lines)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with out_file.open("a") as f:
        f.write(text + "\n")
    return text


def _nan_to_none(v: Any) -> Any:
    return None if isinstance(v, float) and math.isnan(v) else v


def eval_schedule(steps: int, batch: int, n_train: int, evals: int) -> tuple[int, int]:
    """``(data.repeat, train.eval_every)`` for ``evals`` evaluations spread over a run of ``steps`` steps: an engine
    epoch of ``repeat`` passes over the ``n_train`` pages covers ~steps / evals steps and each epoch's end evaluates
    (and saves); one evaluation means one epoch for the whole run and the engine's final evaluation only."""
    evals = max(1, min(evals, steps))
    repeat = max(1, math.ceil(steps * batch / n_train / evals))
    return repeat, 1 if evals > 1 else 0


def ap_curve(metrics_jsonl: Path) -> list[dict[str, Any]]:
    """The run's evaluations from its ``metrics.jsonl``: step, box AP, AP50 and the training loss last logged
    at or before that step (a held-out AP that stalls while this falls is the small training set showing)."""
    from beit.engine.logging import read_metrics

    train_rows = [r for r in read_metrics(metrics_jsonl, split="train") if "loss" in r]
    curve = []
    for r in read_metrics(metrics_jsonl, split="eval"):
        before = [t["loss"] for t in train_rows if t["step"] <= r["step"]]
        curve.append({"step": int(r["step"]), "bbox_AP": _nan_to_none(r.get("bbox/AP")),
                      "bbox_AP50": _nan_to_none(r.get("bbox/AP50")), "train_loss": before[-1] if before else None})
    return curve


def run_one(dataset: str, name: str, cfg: Any, out: Path) -> dict[str, Any]:
    from beit.tasks.layout import build_val_dataset, draw_detections, load_detector, train

    t0 = time.perf_counter()
    res = train(cfg)
    wall = time.perf_counter() - t0
    table = res.get("table", "")
    (out / f"{dataset}_{name}_ap.txt").write_text(f"{DATASETS[dataset][4]}\n{name}: {res['step']} steps\n{table}\n")
    model, rcfg = load_detector(res["checkpoint"])
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    val = build_val_dataset(rcfg)
    image, target = val[0]
    with torch.no_grad():
        det = model([image.to(next(model.parameters()).device).float().div_(255)])[0]
    det = {k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in det.items()}
    png = out / f"{dataset}_page_{name}.png"
    # predicted boxes (score >= 0.5) on the left, the ground truth of the same page on the right
    truth = {"boxes": target["boxes"], "labels": target["labels"], "scores": torch.ones(len(target["labels"]))}
    left = draw_detections(image, det, val.class_names, score_thresh=0.5)
    right = draw_detections(image, truth, val.class_names, score_thresh=0.5)
    side = Image.new("RGB", (left.width + right.width + 8, max(left.height, right.height)), "white")
    side.paste(left, (0, 0))
    side.paste(right, (left.width + 8, 0))
    side.save(png)
    ev = {k[len("eval/"):]: _nan_to_none(v) for k, v in res.items() if k.startswith("eval/")}
    curve = ap_curve(Path(cfg.train.output_dir) / "metrics.jsonl")
    return {
        "init": cfg.model.init or None, "layer_decay": cfg.train.layer_decay, "steps": int(res["step"]),
        "bbox_AP": ev.get("bbox/AP"), "bbox_AP50": ev.get("bbox/AP50"), "bbox_AP75": ev.get("bbox/AP75"),
        "segm_AP": ev.get("segm/AP"),
        "per_class_bbox_AP": {n: ev.get(f"bbox/AP/{n}") for n in val.class_names},
        "final_train_loss": res.get("train/loss"), "img_per_s": res.get("train/img_per_s"),
        "wall_s": round(wall, 1), "page_png": png.name, "val_pages": len(val), "data_report": res.get("data"),
        "boxes_on_page": int((det["scores"] >= 0.5).sum()), "metrics": ev, "ap_curve": curve,
    }


def plot_ap_curves(dataset: str, runs: dict[str, Any], png: Path) -> Path | None:
    """Box AP (and AP50) vs training step of each run, from the evaluations ``--evals`` spread over it."""
    curves = {n: [p for p in r.get("ap_curve", []) if p["bbox_AP"] is not None] for n, r in runs.items()}
    if sum(len(c) for c in curves.values()) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, pts in curves.items():
        steps = [p["step"] for p in pts]
        axes[0].plot(steps, [p["bbox_AP"] for p in pts], "o-", label=name)
        axes[1].plot(steps, [p["bbox_AP50"] for p in pts], "o-", label=name)
    for ax, title in zip(axes, ("box AP .50:.95", "box AP50")):
        ax.set_xlabel("training step")
        ax.set_title(f"{dataset}: {title} (held-out pages)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def comparison(dataset: str, runs: dict[str, Any], class_names: list[str]) -> str:
    """Per-category bbox AP of the runs side by side (plus the seed for PubLayNet)."""
    from beit.tasks.layout import PUBLAYNET_REFERENCE

    names = list(runs)
    ref = PUBLAYNET_REFERENCE if dataset == "publaynet" else None
    head = f"{'category':<14}" + "".join(f"{n:>12}" for n in names) + (f"{'seed (B)':>12}" if ref else "")
    lines = [DATASETS[dataset][4], "bbox AP (COCO .50:.95); '-' = no ground truth in the val pages",
             head, "-" * len(head)]
    for c in [*class_names, "overall"]:
        vals = [runs[n]["bbox_AP"] if c == "overall" else runs[n]["per_class_bbox_AP"].get(c) for n in names]
        row = f"{c:<14}" + "".join(f"{'-' if v is None else f'{v:.3f}':>12}" for v in vals)
        if ref:
            row += f"{ref.get(c, float('nan')):>12.3f}" if c in ref else f"{'-':>12}"
        lines.append(row)
    lines.append("steps " + ", ".join(f"{n} {runs[n]['steps']}" for n in names))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from beit.engine import load_config
    from beit.tasks.layout import LayoutConfig

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="layout_bench_"))
    runs_dir = out / "runs" if args.keep_runs else work / "runs"
    init = args.init
    if args.smoke and not init:
        init = str(write_smoke_init(work / "smoke_init"))
    wanted = [r.strip() for r in args.runs.split(",") if r.strip()]
    datasets = [d.strip() for d in args.only.split(",") if d.strip()]
    for d in datasets:
        if d not in DATASETS:
            raise SystemExit(f"unknown dataset {d!r} (docbank | publaynet)")
    if "pretrained" in wanted and not init:
        raise SystemExit("--init is required for the pretrained run (or use --runs scratch)")

    arch = None  # the architecture comes from the checkpoint; the scratch twin reuses it with random weights
    if init:
        import beit

        body = beit.load_model(init, head="none", use_rel_pos_bias=True, use_shared_rel_pos_bias=False)
        arch = body.cfg.to_dict()
        short = max(load_config(LayoutConfig, DATASETS["docbank"][0], []).data.min_sizes)
        long = round(short * 1000 / 700)  # a 700 x 1000 DocBank page at the largest training scale
        tokens = (short // body.patch_size) * (long // body.patch_size)
        print(f"backbone from {init}: depth {body.num_layers}, width {body.embed_dim}, patch {body.patch_size}, "
              f"{tokens} tokens per {short}x{long} page", flush=True)
        if tokens > 4096 and not args.smoke:
            print(f"warning: {tokens} tokens per page is slow for global attention; lower data.min_sizes / "
                  "data.max_size and model.min_size_test (KEY=VALUE overrides)", flush=True)
        del body

    results: dict[str, Any] = {}
    path = out / "results.json"
    if path.is_file():  # runs done by an earlier command (e.g. --only publaynet later) are kept
        results = json.loads(path.read_text())
    results.update({"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                    "torch": torch.__version__, "init": init or None, "smoke": args.smoke,
                    "batch_size": 2 if args.smoke else args.batch_size, "lr": args.lr})
    results.setdefault("datasets", {})
    t_start = time.perf_counter()
    for k, dataset in enumerate(datasets):
        config, folder, tar_name, holdout, note = DATASETS[dataset]
        ann = find_subset(Path(args.data), folder, tar_name, work / "data")
        if args.profile and k == 0:
            c = load_config(LayoutConfig, config, base_overrides(args, ann, holdout, work / "profile" / dataset))
            c.model.backbone = dict(arch) if arch else {}
            t0 = time.perf_counter()
            print(profile_steps(c, args.profile_steps, Path(args.profile)), flush=True)
            results["profile"] = {"file": str(args.profile), "wall_s": round(time.perf_counter() - t0, 1)}
        if not wanted:
            continue
        minutes = args.minutes if dataset == "docbank" else args.publaynet_minutes
        print(f"##### {dataset}: {note}", flush=True)
        steps, ips = args.steps, None
        if args.smoke:
            steps = steps or 2
        if not steps:
            c = load_config(LayoutConfig, config, base_overrides(args, ann, holdout, work / "calib" / dataset))
            c.model.init, c.model.backbone = "", dict(arch) if arch else {}
            steps, ips = calibrate_steps(c, minutes * 60)
            print(f"calibration: {ips:.1f} img/s -> {steps} steps of {args.batch_size} pages per run", flush=True)
        batch = 2 if args.smoke else args.batch_size
        n_train = 100 - holdout if dataset == "docbank" else 20 - holdout
        repeat, eval_every = eval_schedule(steps, batch, n_train, args.evals)
        entry = results["datasets"].setdefault(dataset, {})
        entry.update({"note": note, "steps": steps, "calibrated_img_per_s": ips, "budget_minutes": minutes})
        entry.setdefault("runs", {})
        class_names: list[str] = []
        for name in wanted:
            run_dir = runs_dir / dataset / name
            extra = [f"train.max_steps={steps}",
                     f"train.warmup_steps={max(1, min(steps // 10, 100)) if steps > 1 else 0}",
                     f"data.repeat={repeat}", f"train.eval_every={eval_every}"]
            if name == "pretrained":
                extra += [f"model.init={init}", f"train.layer_decay={args.layer_decay}"]
            elif name == "scratch":
                extra += [f"train.layer_decay={args.scratch_layer_decay}"]
            else:
                raise SystemExit(f"unknown run {name!r} (pretrained | scratch)")
            rc = load_config(LayoutConfig, config, base_overrides(args, ann, holdout, run_dir) + extra)
            if name == "scratch":
                rc.model.init, rc.model.backbone = "", dict(arch) if arch else {}
            print(f"=== {dataset} {name}: {steps} steps, layer decay {rc.train.layer_decay}, "
                  f"init {rc.model.init or 'random'}", flush=True)
            try:
                r = run_one(dataset, name, rc, out)
            except Exception as e:  # e.g. a diverged scratch run: keep the other runs' results
                import traceback

                traceback.print_exc()
                entry["runs"][name] = {"error": f"{type(e).__name__}: {e}", "steps": steps}
                path.write_text(json.dumps(results, indent=1))
                continue
            class_names = list(r["per_class_bbox_AP"])
            print(f"{dataset} {name}: bbox AP {r['bbox_AP']}  AP50 {r['bbox_AP50']}  ({r['steps']} steps, "
                  f"{r['wall_s']} s)", flush=True)
            entry["runs"][name] = r
            path.write_text(json.dumps(results, indent=1))
        done = {n: r for n, r in entry["runs"].items() if "error" not in r}
        if done and class_names:
            table = comparison(dataset, done, class_names)
            (out / f"{dataset}_ap.txt").write_text(table + "\n")
            print(table, flush=True)
            png = plot_ap_curves(dataset, done, out / f"{dataset}_ap_curve.png")
            if png is not None:
                entry["ap_curve_png"] = png.name
                path.write_text(json.dumps(results, indent=1))
                print(f"AP curves: {png}", flush=True)
    results["wall_s"] = round(time.perf_counter() - t_start, 1)
    path.write_text(json.dumps(results, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {path} and the tables / PNGs in {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
