"""Classification evaluation: top-1/top-5, per-class accuracy, confusion matrix, and prediction CSVs.

Used three ways: inside training (``make_eval_fn``: sharded over ranks, floats only), after training
(``write_report``: per-class numbers and a confusion-matrix PNG), and on a saved model
(``evaluate_checkpoint`` / ``predict_folder``, behind ``beit evaluate`` / ``beit predict``).

A fine-tuned model carries what evaluation needs: ``class_names`` in ``model.cfg.extra`` and its eval
preprocessing (:class:`beit.models.Preprocess`, the ``"preprocess"`` entry of its ``config.json``, kept in
``model.cfg.extra`` once loaded), so ``beit predict out/model images/`` needs no flags.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..._text import first_few
from ...data.datasets import (
    IMG_EXTENSIONS,
    FileImages,
    LabeledImageFolder,
    collate_files,
    find_classes,
    names_folder,
    scan_images,
)
from ...engine import distributed as D
from ...engine.checkpoint import model_weights, read_torch_file
from ...engine.precision import autocast_for
from ...engine.rundir import check_checkpoint_task
from ...engine.trainer import worker_init
from ...interop import load_model
from ...models.config import Preprocess
from ..backbone_config import TASK_COMMANDS, check_task_of, stored_task
from .data import build_preprocess, readable_subset, warn_left_out

__all__ = [
    "ClassificationMeter",
    "Preprocess",
    "build_preprocess",
    "evaluate_checkpoint",
    "evaluate_model",
    "load_classifier",
    "make_eval_fn",
    "predict_folder",
    "save_confusion_png",
    "write_report",
]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------- metrics
class ClassificationMeter:
    """Streaming top-k counts, loss and confusion matrix; ``all_reduce`` sums them over ranks."""

    def __init__(self, num_classes: int, topk: Sequence[int] = (1, 5)):
        self.num_classes = num_classes
        self.topk = tuple(sorted({min(k, num_classes) for k in topk}))
        self.requested = tuple(topk)
        self.correct = torch.zeros(len(self.topk), dtype=torch.float64)
        self.loss_sum = torch.zeros((), dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.float64)
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)  # [true, predicted]

    @torch.no_grad()
    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        logits, targets = logits.float(), targets.long()
        if logits.shape[-1] != self.num_classes:
            raise ValueError(f"model outputs {logits.shape[-1]} classes, the data has {self.num_classes}")
        self.loss_sum += F.cross_entropy(logits, targets, reduction="sum").double().cpu()
        self.count += targets.numel()
        top = logits.topk(max(self.topk), dim=-1).indices
        hits = top == targets[:, None]
        for i, k in enumerate(self.topk):
            self.correct[i] += hits[:, :k].any(dim=1).sum().double().cpu()
        idx = targets * self.num_classes + top[:, 0]
        self.confusion += torch.bincount(idx.cpu(), minlength=self.num_classes**2).view_as(self.confusion)

    def all_reduce(self) -> None:
        """Sum over ranks (no-op in a single process)."""
        if not D.is_dist() or D.world_size() == 1:
            return
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        flat = torch.cat([self.correct, self.loss_sum.view(1), self.count.view(1)]).to(device)
        dist.all_reduce(flat)
        conf = self.confusion.to(device)
        dist.all_reduce(conf)
        flat = flat.cpu()
        n = len(self.topk)
        self.correct, self.loss_sum, self.count = flat[:n], flat[n], flat[n + 1]
        self.confusion = conf.cpu()

    def summary(self) -> dict[str, float]:
        """``top1``, ``top5`` (percent; k is capped at the class count) and mean ``loss``."""
        n = max(float(self.count), 1.0)
        out = {"loss": float(self.loss_sum) / n}
        for k in self.requested:
            out[f"top{k}"] = 100.0 * float(self.correct[self.topk.index(min(k, self.num_classes))]) / n
        return out

    def per_class(self, class_names: Sequence[str]) -> dict[str, dict[str, float | None]]:
        """Per class: accuracy (recall, percent), precision (percent) and support. An accuracy without images of the
        class, or a precision without predictions of it, is None (no value; JSON ``null``, never ``NaN``, which
        strict JSON readers refuse)."""
        cm = self.confusion.double()
        support, predicted, right = cm.sum(1), cm.sum(0), cm.diag()
        return {
            name: {"acc": 100.0 * float(right[i] / support[i]) if support[i] else None,
                   "precision": 100.0 * float(right[i] / predicted[i]) if predicted[i] else None,
                   "n": int(support[i])}
            for i, name in enumerate(class_names)
        }


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def evaluate_model(model: nn.Module, loader: Any, num_classes: int, topk: Sequence[int] = (1, 5)
                   ) -> ClassificationMeter:
    """Run ``model`` over ``(images, targets)`` batches; the caller sets eval mode / autocast."""
    device = _device_of(model)
    meter = ClassificationMeter(num_classes, topk)
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        meter.update(model(images), targets.to(device, non_blocking=True))
    return meter


def _rank_world() -> tuple[int, int]:
    return D.rank(), D.world_size()


def make_eval_fn(dataset: Dataset, num_classes: int, batch_size: int, num_workers: int = 0,
                 topk: Sequence[int] = (1, 5)) -> Callable[[nn.Module], dict[str, float]]:
    """An engine ``eval_fn``: each rank evaluates its shard ``rank::world``, counts are summed."""

    def eval_fn(model: nn.Module) -> dict[str, float]:
        rank, world = _rank_world()
        shard = Subset(dataset, range(rank, len(dataset), world)) if world > 1 else dataset
        loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                            pin_memory=_device_of(model).type == "cuda", worker_init_fn=worker_init)
        meter = evaluate_model(model, loader, num_classes, topk)
        meter.all_reduce()
        return meter.summary()

    return eval_fn


# ---------------------------------------------------------------------------------------- reports
def save_confusion_png(confusion: torch.Tensor, class_names: Sequence[str], path: str | os.PathLike,
                       title: str = "") -> Path:
    """Row-normalised confusion matrix (true class per row) as a PNG; Agg canvas, no display needed.

    Above 40 classes the tick labels are dropped (they would be unreadable), the colours stay.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # optional, and slow to import: only reports draw
    from matplotlib.figure import Figure

    cm = confusion.double()
    norm = cm / cm.sum(1, keepdim=True).clamp(min=1)
    n = len(class_names)
    side = min(max(4.0, 0.45 * n + 2.0), 24.0)
    fig = Figure(figsize=(side + 1.5, side))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(norm.numpy(), cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if n <= 40:
        ax.set_xticks(range(n))
        ax.set_yticks(range(n))
        ax.set_xticklabels(class_names, rotation=90, fontsize=8)
        ax.set_yticklabels(class_names, fontsize=8)
        if n <= 20:  # counts in the cells
            for i in range(n):
                for j in range(n):
                    if cm[i, j] > 0:
                        ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=7,
                                color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or f"confusion ({int(cm.sum())} images)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def write_report(meter: ClassificationMeter, class_names: Sequence[str], out_dir: str | os.PathLike,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``metrics.json`` (overall + per class), ``per_class.csv`` and ``confusion.png``; return the dict."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    per_class = meter.per_class(class_names)
    result: dict[str, Any] = {**meter.summary(), "num_images": int(meter.count), **(extra or {})}
    result["per_class"] = per_class
    result["confusion"] = meter.confusion.tolist()
    absent = [name for name, v in per_class.items() if v["acc"] is None]
    if absent:
        logger.warning("%d class%s without evaluated images (%s): per-class accuracy null in metrics.json, empty in "
                       "per_class.csv", len(absent), "" if len(absent) == 1 else "es", first_few(absent, 8))
    (out / "metrics.json").write_text(json.dumps(result, indent=2, allow_nan=False))
    with open(out / "per_class.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "accuracy", "precision", "n"])
        for name, v in per_class.items():
            w.writerow([name, *("" if v[k] is None else f"{v[k]:.2f}" for k in ("acc", "precision")), v["n"]])
    png = save_confusion_png(meter.confusion, class_names, out / "confusion.png",
                             title=f"top-1 {result['top1']:.2f}% on {int(meter.count)} images")
    result["confusion_png"] = str(png)
    return result


# ---------------------------------------------------------------------------------------- saved models
TRAIN_CKPT_FORMAT = "beit-train-ckpt"


def load_classifier(source: str | os.PathLike, *, ema: bool = False, **overrides: Any
                    ) -> tuple[nn.Module, list[str], Preprocess]:
    """A classifier, its class names and its eval preprocessing, from any checkpoint.

    ``source``: a ``save_model`` directory (written at the end of ``beit finetune``), an engine training
    checkpoint (``last.pt`` / ``best.pt``; ``ema=True`` takes its EMA weights; class names and
    preprocessing come from the run config inside it), or anything ``beit.load_model`` reads.
    Models without stored class names get ``class_0 ...``.

    Raises:
        TaskMismatchError (a ValueError): a checkpoint of another task: a training checkpoint of another task (the
            task it records, else the one its stored config shows), a pre-training (MIM) model, a dVAE written by
            ``beit tokenizer train``; one line naming the checkpoint, its task and the commands that take it
            (``"<source> is a segmentation checkpoint, not a classification one: beit segment eval and ..."``).
        ValueError: not a classifier (a backbone without a head), no EMA weights, a class-name count that does
            not fit the head, or a file that is no readable checkpoint.
    """
    path = Path(source)
    run_cfg: dict[str, Any] = {}
    src: Any = source
    if path.is_file() and path.suffix == ".safetensors" and _is_dvae_file(path):
        check_checkpoint_task("dVAE tokenizer", "classification", source=path, fix=TASK_COMMANDS["dVAE tokenizer"])
    if path.is_file() and path.suffix in (".pt", ".pth"):
        state = read_torch_file(path)
        if isinstance(state, dict) and state.get("format") == TRAIN_CKPT_FORMAT:
            check_task_of(state, "classification", path)
            run_cfg = state.get("config") or {}
            src = model_weights(state, path, ema)
        elif ema:
            raise ValueError(f"{path}: --ema (ema=True) needs an engine training checkpoint (last.pt / best.pt)")
    elif ema:  # a model folder holds one set of weights: the EMA ones are their own folder (model_ema/)
        raise ValueError(f"{source}: --ema (ema=True) needs an engine training checkpoint (last.pt / best.pt); the EMA "
                         "weights of a finished run are their own folder, model_ema/ (give it without ema)")
    model = load_model(src, **overrides)
    if getattr(model.cfg, "head", "cls") == "mim":  # beit pretrain's final/ model, or such a file
        check_checkpoint_task("pre-training", "classification", source=source, fix=TASK_COMMANDS["pre-training"])
    if getattr(model.cfg, "head", "cls") != "cls" or model.cfg.num_classes <= 0:
        raise ValueError(f"{source}: not a classifier (head={model.cfg.head!r}, num_classes={model.cfg.num_classes});"
                         " fine-tune it first (beit finetune)")
    extra = dict(model.cfg.extra or {})
    names = list(extra.get("class_names") or run_cfg.get("class_names") or [])
    if not names:
        names = [f"class_{i}" for i in range(model.cfg.num_classes)]
    if len(names) != model.cfg.num_classes:
        raise ValueError(f"{source}: {len(names)} class names stored but the head has {model.cfg.num_classes} outputs")
    if "preprocess" in extra:  # config.json's "preprocess" entry (beit.save_model), kept in cfg.extra
        pre = model.cfg.eval_preprocess()
    elif run_cfg:
        pre = run_preprocess(run_cfg)
    else:  # a foreign classifier: its own resolution, ImageNet-style crop
        pre = Preprocess(img_size=model.cfg.img_hw[0])
    if "img_size" in overrides:
        pre.img_size = int(overrides["img_size"])
    return model, names, pre


def run_preprocess(run_cfg: dict[str, Any]) -> Preprocess:
    """The eval preprocessing a fine-tuning run config implies (what its ``model/`` folder stores)."""
    return Preprocess.from_dict({**(run_cfg.get("data") or {}), "img_size": run_cfg.get("img_size", 224)})


def with_run_metadata(model: nn.Module, state: Any) -> nn.Module:
    """``model`` (read from the training checkpoint whose dict is ``state``) with what ``beit finetune``'s
    ``model/`` folder stores beside the weights: the class names and eval preprocessing of a fine-tuning run,
    where the model does not carry them yet. Without them an exported classifier would be read with
    ``class_0 ...`` or another folder order and an ImageNet crop (``beit convert runs/ft/last.pt``)."""
    if not (isinstance(state, dict) and state.get("format") == TRAIN_CKPT_FORMAT):
        return model
    run_cfg = state.get("config") or {}
    if stored_task(state) != "classification" or getattr(model.cfg, "head", None) != "cls":
        return model
    extra = dict(model.cfg.extra or {})
    names = list(run_cfg.get("class_names") or [])
    if "class_names" not in extra and len(names) == model.cfg.num_classes:
        extra["class_names"] = names
    cfg = model.cfg.replace(extra=extra)
    if "preprocess" not in extra:
        cfg = cfg.with_preprocess(run_preprocess(run_cfg))
    model.cfg = cfg
    return model


def _is_dvae_file(path: Path) -> bool:
    """Whether ``path`` is a dVAE written by ``beit tokenizer train`` (its safetensors metadata says so)."""
    from safetensors import safe_open

    from ...tokenizers.dvae import FORMAT as DVAE_FORMAT

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == DVAE_FORMAT
    except Exception:  # noqa: BLE001 - not a readable safetensors file: load_model names the problem
        return False


def _pick_device(device: str | torch.device | None) -> torch.device:
    return D.resolve_device(device)


def evaluate_checkpoint(checkpoint: str | os.PathLike, data_dir: str | os.PathLike, out_dir: str | os.PathLike,
                        *, batch_size: int = 64, num_workers: int = 4, ema: bool = False,
                        device: str | torch.device | None = None, img_size: int | None = None) -> dict[str, Any]:
    """Evaluate a saved classifier on ``data_dir/<class>/<image>``; write the report into ``out_dir``.

    The class folders must be exactly the model's classes (by name when the model stores them, else
    by count): a mismatch is an error, not a silently shifted label map. A class whose folder holds no image, or
    none that decodes, is evaluated without: named in a warning, its per-class accuracy null (as a training run's
    validation set); a missing folder is refused, the error saying to create it empty for that.
    """
    overrides = {"img_size": img_size} if img_size else {}
    model, names, pre = load_classifier(checkpoint, ema=ema, **overrides)
    folders = find_classes(data_dir)
    if not folders:
        raise ValueError(f"{data_dir}: no class sub-folders; beit evaluate reads {data_dir}/<class>/<image> with "
                         f"the model's {len(names)} classes ({first_few(names, 5)}); for unlabeled images use "
                         "beit predict")
    named = not all(n == f"class_{i}" for i, n in enumerate(names))
    if named and set(folders) != set(names):
        missing, extra = sorted(set(names) - set(folders)), sorted(set(folders) - set(names))
        differ = "; ".join(([f"no folder for {first_few(missing, 10)}"] if missing else [])
                           + ([f"folders the model does not know: {first_few(extra, 10)}"] if extra else []))
        hint = (f". To evaluate without a class that has no images, give it an empty folder ({data_dir}/{missing[0]}/"
                f"{' and the others' if len(missing) > 1 else ''}): its per-class accuracy is then null"
                if missing else "")
        raise ValueError(f"{data_dir}: class folders do not match the model's {len(names)} classes ({differ}){hint}")
    if not named:
        if len(folders) != len(names):
            raise ValueError(f"{data_dir}: {len(folders)} class folders but the model has {len(names)} classes")
        names = folders
        logger.warning("%s stores no class names: its outputs 0..%d are taken as the class folders in sorted order "
                       "(%s); the scores are wrong if it was trained with another order", checkpoint,
                       len(names) - 1, first_few(names, 5))
    # a class folder without images (or none that decodes) is evaluated without that class, as a training run's
    # validation set is: named in a warning, its per-class accuracy null
    ds = LabeledImageFolder(data_dir, build_preprocess(pre), class_names=names, allow_empty=True)
    subset, _, bad = readable_subset(ds, num_threads=max(num_workers, 1), training=False)
    dev = _pick_device(device)
    model.to(dev).eval()
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=dev.type == "cuda")
    with autocast_for(dev, "auto"):
        meter = evaluate_model(model, loader, len(names))
    result = write_report(meter, names, out_dir, extra={"checkpoint": str(checkpoint), "data": str(data_dir),
                                                        "ema": ema, "skipped": bad, "num_skipped": len(bad),
                                                        "preprocess": pre.to_dict()})
    return result


@torch.no_grad()
def predict_folder(checkpoint: str | os.PathLike, images_dir: str | os.PathLike, out_csv: str | os.PathLike,
                   *, topk: int = 5, batch_size: int = 64, num_workers: int = 4, ema: bool = False,
                   device: str | torch.device | None = None) -> dict[str, Any]:
    """Top-k labels for every image under ``images_dir`` (any depth), or for the one image file it names, into
    a CSV.

    Columns: ``path`` (relative to ``images_dir``; for a single file, its name), then ``label_1, prob_1, ...
    label_k, prob_k``, one row per readable image in path order. Each file is decoded once; the row of each
    result is the index carried with its image through the DataLoader, so rows stay aligned with the files
    whatever fails in any worker. Files that cannot be listed (dangling links, link loops), decoded or
    transformed are left out of the CSV, named in the returned ``skipped`` (each with its reason in a
    warning) and counted in ``num_skipped``.

    Raises:
        FileNotFoundError: ``images_dir`` does not exist.
        ValueError: ``out_csv`` has an image file's extension (it would replace an image; ``out_csv`` an existing
            folder, or a path ending in ``/``, writes ``predictions.csv`` inside it); no images under ``images_dir``,
            or none of them (or the single file) could be read;
            ``checkpoint`` is not a classifier, or a checkpoint of another task (as :func:`load_classifier`).
    """
    source = Path(images_dir).expanduser()
    if not source.exists():
        raise FileNotFoundError(f"no such image file or folder: {str(images_dir)!r}")
    out_csv = Path(out_csv) / "predictions.csv" if names_folder(out_csv) else Path(out_csv)  # as visualize's PNG
    if out_csv.suffix.lower() in IMG_EXTENSIONS:  # checked before any work: the CSV would replace that image
        raise ValueError(f"--out {str(out_csv)!r} names an image file; beit predict writes a CSV: give a .csv path "
                         "(default predictions.csv) or a folder")
    model, names, pre = load_classifier(checkpoint, ema=ema)
    skipped: dict[str, str] = {}
    if source.is_dir():
        scan = scan_images(source)
        exts = tuple(IMG_EXTENSIONS)
        skipped = {p: why for p, why in scan.skipped if p.lower().endswith(exts)}
        for p, why in scan.skipped:
            if p not in skipped:
                logger.warning("not listed: %s (%s)", p, why)
        paths, root = scan.paths, source
        if not paths:
            raise ValueError(f"no images found under {str(images_dir)!r}")
    else:  # one image file: its row is named by its file name
        paths, root = [str(source)], source.parent
    dev = _pick_device(device)
    model.to(dev).eval()
    k = min(topk, len(names))
    loader = DataLoader(FileImages(paths, build_preprocess(pre)), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=collate_files, pin_memory=dev.type == "cuda")
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    rows = 0
    tmp = out_csv.with_name(f".{out_csv.name}.tmp")  # an existing CSV is replaced only by a complete one
    with contextlib.ExitStack() as stack:
        stack.callback(lambda: tmp.unlink(missing_ok=True))
        f = stack.enter_context(open(tmp, "w", newline=""))
        w = csv.writer(f)
        header = ["path"]
        for j in range(1, k + 1):
            header += [f"label_{j}", f"prob_{j}"]
        w.writerow(header)
        for batch in loader:
            for i, err in batch["failed"]:
                if not source.is_file():  # a single file's failure is the error raised below
                    logger.warning("skipping %s (%s)", paths[i], err)
                skipped[paths[i]] = err
            if batch["image"] is None:
                continue
            with autocast_for(dev, "auto"):
                logits = model(batch["image"].to(dev, non_blocking=True))
            probs, idx = logits.float().softmax(-1).topk(k, dim=-1)
            for i, pr, ix in zip(batch["index"].tolist(), probs.cpu().tolist(), idx.cpu().tolist()):
                row: list[Any] = [Path(paths[i]).relative_to(root).as_posix()]
                for p, c in zip(pr, ix):
                    row += [names[c], f"{p:.6f}"]
                w.writerow(row)
                rows += 1
        f.close()
        if rows:
            os.replace(tmp, out_csv)
    if not rows:
        if source.is_file():
            raise ValueError(f"{str(images_dir)!r} could not be read as an image: {skipped.get(paths[0], '')}")
        raise ValueError(f"none of the {len(paths)} images under {str(images_dir)!r} could be read")
    bad = sorted(skipped)
    warn_left_out(bad)
    return {"csv": str(out_csv), "num_images": rows, "num_skipped": len(bad), "skipped": bad, "topk": k}
