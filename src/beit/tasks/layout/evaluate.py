"""COCO evaluation of layout detectors with pycocotools, the way PubLayNet / DiT report it.

``evaluate_model`` runs the detector over a :class:`CocoLayoutDataset`, turns its outputs into COCO results
(original category ids, xywh boxes, RLE masks) and scores them with the official ``COCOeval``: AP
(IoU .50:.95), AP50, AP75 and AP per category, for boxes and, when the model predicts masks, for masks.
Every number is a fraction in [0, 1]; a category without ground truth in the split is NaN, and the overall
AP averages only categories with ground truth (COCO's rule).

The model's classes meet the file's categories by name (:func:`category_map`): a checkpoint evaluated on another
file of the same classes under other ids, in another order or with fewer or more of them is scored on the classes
both know, and each class or category left out is named in a warning.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..._text import first_few
from ...engine.trainer import worker_init
from .data import CocoLayoutDataset, LayoutDataError, collate

__all__ = ["PUBLAYNET_REFERENCE", "category_map", "evaluate_coco", "evaluate_model", "format_table",
           "predictions_to_coco", "run_inference"]

log = logging.getLogger("beit")

# The seed: BEiT-B on PubLayNet val (bbox AP), what a full-scale run is compared with.
PUBLAYNET_REFERENCE = {"text": 0.934, "title": 0.866, "list": 0.924, "table": 0.973, "figure": 0.957,
                       "overall": 0.931}
REFERENCES = {"publaynet": ("BEiT-B, PubLayNet val (seed)", PUBLAYNET_REFERENCE)}


def predictions_to_coco(outputs: Sequence[dict[str, torch.Tensor]], image_ids: Sequence[int],
                        label_to_cat: Sequence[int | None], mask_thresh: float = 0.5) -> list[dict[str, Any]]:
    """torchvision detections -> COCO results (``image_id, category_id, bbox xywh, score[, segmentation]``).

    ``label_to_cat[label - 1]`` is the category id of a label; a label mapped to None (a class of the model that the
    ground truth does not have, :func:`category_map`) is left out."""
    results = []
    for out, img_id in zip(outputs, image_ids):
        known = torch.tensor([c is not None for c in label_to_cat], dtype=torch.bool)[out["labels"].cpu() - 1]
        if not known.all():  # detections of classes that are not scored
            out = {k: v[known.to(v.device)] for k, v in out.items()}
        boxes = out["boxes"].float().cpu()
        if len(boxes) == 0:
            continue
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        scores, labels = out["scores"].float().cpu().tolist(), out["labels"].cpu().tolist()
        rles = None
        if "masks" in out:
            from pycocotools import mask as mask_util  # optional (the layout extra): imported where COCO files are read

            binary = (out["masks"][:, 0].float() > mask_thresh).cpu().numpy().astype(np.uint8)
            rles = mask_util.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
            for r in rles:
                r["counts"] = r["counts"].decode("ascii")  # JSON-serialisable
        for k in range(len(xywh)):
            r = {"image_id": int(img_id), "category_id": int(label_to_cat[labels[k] - 1]),
                 "bbox": [round(v, 2) for v in xywh[k]], "score": round(scores[k], 5)}
            if rles is not None:
                r["segmentation"] = rles[k]
            results.append(r)
    return results


def category_map(class_names: Sequence[str] | None, dataset: CocoLayoutDataset) -> list[int | None]:
    """``label_to_cat`` of a model whose label ``k`` is ``class_names[k - 1]`` (a checkpoint's stored classes) on
    ``dataset``'s file: each class goes to the file's category of its name, whatever the ids and their order. A
    class that the file has not is mapped to None (its detections are not scored) and a category of the file that
    the model has not is not scored either (it would count as AP 0): each is named in a warning. Without
    ``class_names`` (a model that does not say), the file's categories in id order, as the model was trained on.

    Raises:
        LayoutDataError: no class of the model is a category of the file (nothing to score), or a class the file
            names twice under different ids.
    """
    if not class_names or list(class_names) == dataset.class_names:
        return list(dataset.cat_ids)
    ids: dict[str, list[int]] = {}
    for c in dataset.categories:
        ids.setdefault(c["name"], []).append(c["id"])
    names = [str(n) for n in class_names]
    where = dataset.ann_file
    if not any(n in ids for n in names):
        raise LayoutDataError(f"{where}: none of its categories ({first_few(list(ids), 15)}) is a class of the model "
                              f"({first_few(names, 15)}): nothing to score; evaluate on a file of the model's classes")
    twice = [n for n in names if len(ids.get(n, ())) > 1]
    if twice:
        raise LayoutDataError(f"{where}: the model's class {twice[0]!r} is the name of {len(ids[twice[0]])} categories "
                              f"(ids {ids[twice[0]]}): cannot tell which one its detections are")
    missing = [repr(n) for n in names if n not in ids]
    if missing:
        log.warning(f"{where}: the model's class{'es' if len(missing) > 1 else ''} {first_few(missing, 15)} "
                    f"{'are not categories' if len(missing) > 1 else 'is not a category'} of this file: "
                    f"{'their' if len(missing) > 1 else 'its'} detections are left out of the scores")
    unknown = [f"{c['name']!r} (id {c['id']})" for c in dataset.categories if c["name"] not in names]
    if unknown:
        log.warning(f"{where}: categor{'ies' if len(unknown) > 1 else 'y'} {first_few(unknown, 15)} of this file "
                    f"{'are not classes' if len(unknown) > 1 else 'is not a class'} of the model "
                    f"({first_few(names, 15)}): not scored")
    return [ids[n][0] if n in ids else None for n in names]


def _class_names(model: nn.Module) -> list[str] | None:
    """The classes a layout detector was trained on (``LayoutDetector.class_names``; under DDP its ``module``'s)."""
    names = getattr(model, "class_names", None) or getattr(getattr(model, "module", None), "class_names", None)
    return list(names) if names else None


@torch.no_grad()
def run_inference(model: nn.Module, dataset: CocoLayoutDataset, batch_size: int = 2, num_workers: int = 0,
                  device: torch.device | str | None = None, label_to_cat: Sequence[int | None] | None = None
                  ) -> list[dict[str, Any]]:
    """COCO results of ``model`` on every page of ``dataset`` (the model resizes pages and maps boxes back).

    ``label_to_cat`` (default :func:`category_map` of the model's classes): the category id of each label, None for
    a class that is not scored."""
    if label_to_cat is None:
        label_to_cat = category_map(_class_names(model), dataset)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate,
                        worker_init_fn=worker_init)
    results: list[dict[str, Any]] = []
    try:
        for images, targets in loader:
            outs = model([im.to(device, non_blocking=True).float().div_(255) for im in images])
            ids = [int(t["image_id"]) for t in targets]
            results += predictions_to_coco(outs, ids, label_to_cat)
    finally:
        model.train(was_training)
    return results


def _nan(v: float) -> float:
    return float("nan") if v is None or v < 0 else float(v)


def evaluate_coco(coco_gt: Any, results: list[dict[str, Any]], iou_types: Sequence[str] = ("bbox",),
                  cat_ids: Sequence[int] | None = None) -> dict[str, float]:
    """Score COCO results against a pycocotools ``COCO``: ``{type}/AP``, ``/AP50``, ``/AP75`` and
    ``{type}/AP/{category name}`` (plus ``AP50``/``AP75`` per category) for each IoU type. ``cat_ids``: score only
    these categories (the others' numbers are NaN and the overall AP leaves them out); default all."""
    from pycocotools.cocoeval import COCOeval  # optional (the layout extra): imported where COCO files are read

    cats = {c["id"]: c["name"] for c in coco_gt.dataset["categories"]}
    scored = list(cats) if cat_ids is None else [c for c in cats if c in set(cat_ids)]
    with_gt = {cid for cid in scored if coco_gt.getAnnIds(catIds=[cid], iscrowd=False)}
    metrics: dict[str, float] = {}
    for iou_type in iou_types:
        res = [r for r in results if iou_type == "bbox" or "segmentation" in r]
        if not res:  # nothing detected: loadRes cannot take an empty list; COCO's answer is 0 where GT exists
            for key in ("AP", "AP50", "AP75"):
                metrics[f"{iou_type}/{key}"] = 0.0 if with_gt else float("nan")
                for cid, name in cats.items():
                    metrics[f"{iou_type}/{key}/{name}"] = 0.0 if cid in with_gt else float("nan")
            continue
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and the 12-line summary
            dt = coco_gt.loadRes(copy.deepcopy(res))
            ev = COCOeval(coco_gt, dt, iou_type)
            ev.params.catIds = sorted(scored)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        metrics[f"{iou_type}/AP"], metrics[f"{iou_type}/AP50"], metrics[f"{iou_type}/AP75"] = (
            _nan(ev.stats[0]), _nan(ev.stats[1]), _nan(ev.stats[2]))
        precision = ev.eval["precision"]  # [IoU thresholds, recall, category, area range, max dets]
        iou_thrs = list(ev.params.iouThrs)
        for cid in cats.keys() - set(scored):
            for key in ("AP", "AP50", "AP75"):
                metrics[f"{iou_type}/{key}/{cats[cid]}"] = float("nan")
        for k, cid in enumerate(ev.params.catIds):
            for key, t in (("AP", None), ("AP50", iou_thrs.index(0.5)), ("AP75", iou_thrs.index(0.75))):
                p = precision[:, :, k, 0, -1] if t is None else precision[t, :, k, 0, -1]
                p = p[p > -1]
                metrics[f"{iou_type}/{key}/{cats[cid]}"] = float(p.mean()) if p.size else float("nan")
    return metrics


def evaluate_model(model: nn.Module, dataset: CocoLayoutDataset, batch_size: int = 2, num_workers: int = 0,
                   iou_types: Sequence[str] | None = None) -> dict[str, float]:
    """Inference + COCOeval on ``dataset``; boxes always, masks too when the model has a mask head. The model's
    classes are matched to the file's categories by name (:func:`category_map`, which warns about those left out
    and raises when none match, before any page is run)."""
    if iou_types is None:
        iou_types = ("bbox", "segm") if getattr(model, "has_masks", False) else ("bbox",)
    label_to_cat = category_map(_class_names(model), dataset)
    results = run_inference(model, dataset, batch_size, num_workers, label_to_cat=label_to_cat)
    return evaluate_coco(dataset.coco_gt(), results, iou_types, cat_ids=[c for c in label_to_cat if c is not None])


def _fmt(v: float | None) -> str:
    return "    -" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:5.3f}"


def format_table(metrics: dict[str, float], class_names: Sequence[str], reference: str | None = None,
                 title: str = "") -> str:
    """Per-category AP table (rows: categories then ``overall``), with the reference column when the
    reference (e.g. ``"publaynet"``) names these categories."""
    types = [t for t in ("bbox", "segm") if f"{t}/AP" in metrics]
    cols = [(t, k) for t in types for k in ("AP", "AP50", "AP75")]
    ref_name, ref = REFERENCES.get(reference or "", (None, None))
    header = f"{'category':<14}" + "".join(f"{t + ' ' + k:>11}" for t, k in cols)
    if ref:
        header += f"   {ref_name}"
    lines = [title] if title else []
    lines += [header, "-" * len(header)]
    for name in [*class_names, "overall"]:
        row = f"{name:<14}"
        for t, k in cols:
            key = f"{t}/{k}" if name == "overall" else f"{t}/{k}/{name}"
            row += f"{_fmt(metrics.get(key)):>11}"
        if ref:
            row += f"   {_fmt(ref.get(name))}"
        lines.append(row)
    return "\n".join(lines)
