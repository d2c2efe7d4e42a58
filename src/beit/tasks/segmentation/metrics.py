"""Segmentation metrics from one accumulated confusion matrix: mIoU, per-class IoU / accuracy, aAcc.

Accumulating a ``[C, C]`` matrix (rows = ground truth, columns = prediction) over the whole set and
computing the ratios once at the end gives the dataset-level IoU that mmseg and the ADE20K benchmark
report (not a mean of per-image IoUs). Pixels whose label is the ignore index are left out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed

from ...engine import distributed as D

__all__ = ["ConfusionMatrix", "format_table", "metrics_from_confusion"]


class ConfusionMatrix:
    """Accumulates ``counts[gt, pred]`` over batches; ``all_reduce`` sums it over ranks."""

    def __init__(self, num_classes: int, ignore_index: int = 255, device: torch.device | str = "cpu") -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.counts = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``pred`` and ``target`` are integer maps of the same shape (any leading dims)."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(target.shape)} differ in shape")
        pred, target = pred.reshape(-1).to(self.counts.device), target.reshape(-1).to(self.counts.device)
        keep = target != self.ignore_index
        pred, target = pred[keep].long(), target[keep].long()
        if target.numel() and (int(target.min()) < 0 or int(target.max()) >= self.num_classes):
            bad = target[(target < 0) | (target >= self.num_classes)][0].item()
            raise ValueError(f"label value {bad} is outside [0, {self.num_classes}) and is not the ignore "
                             f"index {self.ignore_index}")
        C = self.num_classes
        self.counts += torch.bincount(target * C + pred.clamp(0, C - 1), minlength=C * C).reshape(C, C)

    def all_reduce(self) -> None:
        """Sum the counts of every rank (no-op outside torch.distributed)."""
        if D.is_dist():
            torch.distributed.all_reduce(self.counts)

    def compute(self) -> dict[str, float | list[float]]:
        return metrics_from_confusion(self.counts)


def metrics_from_confusion(counts: torch.Tensor) -> dict[str, float | list[float]]:
    """``aAcc``, ``mIoU``, ``mAcc`` (fractions) and per-class ``IoU`` / ``Acc`` lists from ``counts[gt, pred]``.

    A class absent from both the labels and the predictions has IoU NaN and is left out of the mean
    (mmseg's ``nanmean``); a class absent from the labels has Acc NaN.
    """
    c = counts.double().cpu()
    inter = c.diag()
    area_label, area_pred = c.sum(1), c.sum(0)
    union = area_label + area_pred - inter
    iou = inter / union  # 0/0 -> nan
    acc = inter / area_label
    total = area_label.sum()
    return {
        "aAcc": (inter.sum() / total).item() if total > 0 else math.nan,
        "mIoU": _nanmean(iou),
        "mAcc": _nanmean(acc),
        "IoU": iou.tolist(),
        "Acc": acc.tolist(),
    }


def _nanmean(x: torch.Tensor) -> float:
    x = x[~torch.isnan(x)]
    return x.mean().item() if x.numel() else math.nan


def format_table(metrics: dict, class_names: Sequence[str] | None = None) -> str:
    """mmseg-style text: a per-class IoU / Acc table, then the aAcc / mIoU / mAcc summary (percent)."""
    iou, acc = metrics["IoU"], metrics["Acc"]
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(iou))]
    if len(names) != len(iou):
        raise ValueError(f"{len(names)} class names for {len(iou)} classes")

    def pct(v: float) -> str:
        return "nan" if v != v else f"{100 * v:.2f}"

    w = max([5] + [len(n) for n in names])
    rule = f"+{'-' * (w + 2)}+--------+--------+"
    lines = ["per class results:", rule, f"| {'Class':<{w}} |   IoU  |   Acc  |", rule]
    lines += [f"| {n:<{w}} | {pct(i):>6} | {pct(a):>6} |" for n, i, a in zip(names, iou, acc)]
    sep = "+--------+--------+--------+"
    lines += [rule, "Summary:", sep, "|   aAcc |   mIoU |   mAcc |", sep,
              f"| {pct(metrics['aAcc']):>6} | {pct(metrics['mIoU']):>6} | {pct(metrics['mAcc']):>6} |", sep]
    return "\n".join(lines)
