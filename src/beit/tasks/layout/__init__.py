"""Document layout analysis: a BEiT-backbone Mask/Faster R-CNN, COCO-format data, COCOeval, predictions.

Imports are lazy so that ``beit --help`` does not load torchvision's detection models.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CocoLayoutDataset", "DetectorConfig", "LayoutConfig", "LayoutDataConfig", "LayoutDataError", "LayoutDetector",
    "PUBLAYNET_REFERENCE", "RepeatedDataset", "build_datasets", "build_detector", "build_val_dataset", "collate",
    "evaluate_coco", "evaluate_model", "format_table", "load_detector", "predict_pages", "run_inference",
    "split_image_ids", "train", "write_synthetic_pages",
]

_WHERE = {
    "CocoLayoutDataset": "data", "LayoutDataError": "data", "collate": "data", "split_image_ids": "data",
    "write_synthetic_pages": "data", "RepeatedDataset": "data",
    "DetectorConfig": "model", "LayoutDetector": "model", "build_detector": "model",
    "PUBLAYNET_REFERENCE": "evaluate", "evaluate_coco": "evaluate", "evaluate_model": "evaluate",
    "format_table": "evaluate", "run_inference": "evaluate",
    "predict_pages": "predict",
    "LayoutConfig": "train", "LayoutDataConfig": "train", "build_datasets": "train", "build_val_dataset": "train",
    "load_detector": "train",
    "train": "train",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
