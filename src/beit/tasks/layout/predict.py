"""Run a layout detector on page images: labelled boxes drawn on PNGs, and the detections as COCO results."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.utils import draw_bounding_boxes

from beit.data.datasets import decode_image, not_below, output_stems

from .evaluate import predictions_to_coco

logger = logging.getLogger(__name__)

__all__ = ["IMAGE_SUFFIXES", "RUN_FILES", "draw_detections", "find_pages", "predict_pages"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
_PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324",
            "#469990", "#800000", "#808000", "#000075", "#a9a9a9"]


#: what a run of :func:`predict_pages` writes besides its drawings: a folder holding both is an earlier run's output
RUN_FILES = ("pages.json", "results.json")


def find_pages(paths: Sequence[str | Path], skip: str | Path | None = None,
               note: Callable[[str], None] | None = None) -> list[Path]:
    """Files as given; folders expand to their images at any depth, as ``beit segment predict`` reads a folder
    (sorted, so ids are stable), leaving out those under ``skip`` (the output folder, when it is below one of
    them: an earlier run's drawings are not pages) and those of any folder below them that holds an earlier run's
    :data:`RUN_FILES` (another ``--out``), each such folder said in one line to ``note`` (default: logged at INFO).
    """
    pages: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files = sorted(q for q in p.rglob("*") if q.is_file())
            found = [q for q in files if q.suffix.lower() in IMAGE_SUFFIXES]
            if skip is not None:
                found = not_below(found, p, skip)
            current = Path(skip).resolve() if skip is not None else None
            runs = [q.parent for q in files if q.name == RUN_FILES[0] and q.parent != p
                    and all((q.parent / name).is_file() for name in RUN_FILES) and q.parent.resolve() != current]
            for run in runs:
                kept = [q for q in found if not q.is_relative_to(run)]
                if len(kept) < len(found):
                    (note or logger.info)(f"{run}: left out, it holds an earlier layout predict's outputs "
                                          f"({', '.join(RUN_FILES)})")
                found = kept
            pages += found
        elif p.is_file():
            pages.append(p)
        else:
            raise FileNotFoundError(f"page image not found: {p}")
    if not pages:
        raise FileNotFoundError(f"no page images in {[str(p) for p in paths]}")
    return pages


def draw_detections(image: torch.Tensor, det: dict[str, torch.Tensor], class_names: Sequence[str],
                    score_thresh: float = 0.5, width: int = 2) -> Image.Image:
    """``image`` uint8 [3, H, W] with the detections scoring at least ``score_thresh`` as labelled boxes."""
    keep = det["scores"].float().cpu() >= score_thresh
    boxes, labels, scores = det["boxes"].float().cpu()[keep], det["labels"].cpu()[keep], det["scores"].cpu()[keep]
    text = [f"{class_names[int(lab) - 1]} {float(s):.2f}" for lab, s in zip(labels, scores)]
    colors = [_PALETTE[(int(lab) - 1) % len(_PALETTE)] for lab in labels]
    if len(boxes):
        image = draw_bounding_boxes(image, boxes, labels=text, colors=colors, width=width)
    return Image.fromarray(image.permute(1, 2, 0).numpy())


def _why(stopped: BaseException) -> str:
    """What stopped a run: the signal of an interrupt that names one (``signal_name``: SIGTERM), else the type."""
    return getattr(stopped, "signal_name", None) or type(stopped).__name__


def _test_size(model: nn.Module) -> tuple[int, int] | None:
    """(short side, longest side) a torchvision R-CNN resizes pages to at inference (``model.min_size_test`` /
    ``max_size_test`` of a layout detector); None for a model that does not say."""
    transform = getattr(getattr(model, "detector", model), "transform", None)
    if not isinstance(transform, GeneralizedRCNNTransform):
        return None
    return int(transform.min_size[-1]), int(transform.max_size)


def _downsized(image: torch.Tensor, size: tuple[int, int] | None) -> tuple[torch.Tensor, float, float]:
    """A uint8 ``[3, H, W]`` page larger than the detector's test ``size`` brought down to it (short side ``size[0]``,
    long side at most ``size[1]``, bilinear as the detector resizes) before it becomes float; the detector's own
    resize is then none. Returns the page and the factors (x, y) from its pixels to the original's: 1 where the
    page is not larger (the detector resizes it)."""
    if size is None:
        return image, 1.0, 1.0
    H, W = image.shape[1:]
    scale = min(size[0] / min(H, W), size[1] / max(H, W))
    if scale >= 1.0:
        return image, 1.0, 1.0
    h, w = max(1, round(H * scale)), max(1, round(W * scale))
    small = F.interpolate(image[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    return small, W / w, H / h


@torch.no_grad()
def predict_pages(model: nn.Module, pages: Sequence[str | Path], out_dir: str | Path, *,
                  class_names: Sequence[str], category_ids: Sequence[int] | None = None,
                  score_thresh: float = 0.5, image_ids: Sequence[int] | None = None,
                  device: torch.device | str | None = None) -> dict[str, Any]:
    """Detect on each page; write ``<stem>.png`` with the boxes over ``score_thresh``, ``results.json`` (every
    detection the model returns, COCO results format) and ``pages.json`` (the ids, files and categories the
    results refer to). Returns the written paths, the number of detections drawn per page and the number written
    (``num_detections``; with none, ``results.json`` is ``[]``, which pycocotools' ``COCO.loadRes`` cannot load).

    Pages are decoded upright (EXIF orientation) and one larger than the detector's test size is brought down to it
    while still uint8 (as float a 99 MP page alone is 1.2 GB); boxes and masks are in the page's own pixels either
    way. A page that cannot be read is skipped with a warning and
    listed in ``pages.json`` ``skipped`` (``id``, ``file_name``, ``error``); the other pages keep their ids,
    so results stay aligned with the files. Stems that repeat across folders are written as
    ``<dir>__<stem>.png`` so that no drawing overwrites another.

    Stopped part-way (Ctrl-C, SIGTERM where the caller turns it into a ``KeyboardInterrupt``, an error such as
    out of memory), the JSON files are written for the pages done so far, ``pages.json`` says ``"partial": true``
    with a ``note`` of how many pages were done, a warning says the same, and the exception goes on.

    Raises:
        ValueError: two pages of one name (``a.jpg`` and ``a.png`` in one folder, or a file given twice), before
            anything is written, or a drawing that would overwrite one of the pages (``out_dir`` is their folder)
            (:func:`beit.data.datasets.output_stems`)."""
    stems = output_stems(pages, out_dir=out_dir, manifest="pages.json")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    category_ids = list(category_ids) if category_ids else list(range(1, len(class_names) + 1))
    ids = list(image_ids) if image_ids is not None else list(range(1, len(pages) + 1))
    test_size = _test_size(model)
    was_training = model.training
    model.eval()
    results: list[dict[str, Any]] = []
    images: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    pngs: list[str] = []
    drawn: list[int] = []
    cats = [{"id": int(c), "name": n} for c, n in zip(category_ids, class_names)]

    def write(stopped: BaseException | None = None) -> None:
        manifest: dict[str, Any] = {"images": images, "categories": cats, "skipped": skipped,
                                    "num_skipped": len(skipped), "partial": stopped is not None}
        if stopped is not None:
            manifest["note"] = (f"stopped by {_why(stopped)} after {len(images) + len(skipped)} of {len(pages)} pages: "
                                "the others were not predicted")
        (out / "results.json").write_text(json.dumps(results))
        (out / "pages.json").write_text(json.dumps(manifest, indent=1))

    try:
        for img_id, page, stem in zip(ids, map(Path, pages), stems):
            try:
                rgb = decode_image(page)
            except Exception as err:  # noqa: BLE001 - any decoder error means unreadable
                logger.warning("skipping unreadable page %s (%s: %s)", page, type(err).__name__, err)
                skipped.append({"id": img_id, "file_name": str(page), "error": f"{type(err).__name__}: {err}"})
                continue
            image = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1)
            del rgb
            small, sx, sy = _downsized(image, test_size)  # in uint8: a 99 MP page is 1.2 GB as float
            det = model([small.to(device).float().div_(255)])[0]
            del small
            det = {k: v.float().cpu() if k in ("boxes", "scores", "masks") else v.cpu() for k, v in det.items()}
            if (sx, sy) != (1.0, 1.0):  # back to the page's pixels
                det["boxes"] = det["boxes"] * torch.tensor([sx, sy, sx, sy])
                if "masks" in det:
                    det["masks"] = F.interpolate(det["masks"], size=tuple(image.shape[1:]), mode="bilinear",
                                                 align_corners=False)
            found = predictions_to_coco([det], [img_id], category_ids)
            png = out / f"{stem}.png"
            draw_detections(image, det, class_names, score_thresh).save(png)
            pngs.append(str(png))
            drawn.append(int((det["scores"] >= score_thresh).sum()))
            results += found  # the page is done: its results and its entry together
            images.append({"id": img_id, "file_name": str(page), "width": image.shape[2], "height": image.shape[1]})
    except BaseException as stopped:  # Ctrl-C, SIGTERM, out of memory...: what was done is kept
        model.train(was_training)
        write(stopped)
        logger.warning("%s: stopped by %s after %d of %d pages: %s and %s hold those pages (\"partial\": true)",
                       out, _why(stopped), len(images) + len(skipped), len(pages), out / "results.json",
                       out / "pages.json")
        raise
    model.train(was_training)
    write()
    if not images and skipped:
        raise ValueError(f"none of the {len(skipped)} pages could be read (see {out / 'pages.json'})")
    return {"results": str(out / "results.json"), "pages": str(out / "pages.json"), "pngs": pngs, "drawn": drawn,
            "skipped": [s["file_name"] for s in skipped], "num_skipped": len(skipped), "num_detections": len(results)}
