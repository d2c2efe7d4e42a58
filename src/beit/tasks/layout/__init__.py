"""Document layout analysis: a BEiT-backbone Mask/Faster R-CNN, COCO-format data, COCOeval, predictions.

The files every task package has: ``config`` (:class:`LayoutConfig`, :class:`DetectorConfig`), ``model`` (the
detector, :func:`build_detector` from the config, :func:`load_detector` from a training checkpoint), ``data``
(COCO-format pages, :func:`build_datasets`), ``train`` (step / eval / picture functions for the engine and
:func:`train`), ``cli`` (the run functions of ``beit layout train | eval | predict``). Task extras:
``evaluate`` (COCOeval, the AP table) and ``predict`` (boxes drawn on pages, COCO results JSON).

Imports are lazy (``beit.tasks._lazy``) so that ``beit --help`` does not load torchvision's detection models.
``beit.tasks.layout.train`` is the function; its module is ``from beit.tasks.layout.train import ...``.
"""

from __future__ import annotations

from .._lazy import lazy_names

_WHERE = {
    "CROP_RESIZE": "config", "DIT_MIN_SIZES": "config", "DetectorConfig": "config", "LayoutConfig": "config",
    "LayoutDataConfig": "config", "config_from_dict": "config",
    "BeitPyramidBackbone": "model", "LayoutDetector": "model", "build_detector": "model",
    "default_out_indices": "model", "load_detector": "model",
    "CocoLayoutDataset": "data", "LayoutDataError": "data", "RepeatedDataset": "data", "build_datasets": "data",
    "build_val_dataset": "data", "collate": "data", "image_folders": "data", "split_image_ids": "data",
    "write_synthetic_pages": "data",
    "make_eval_fn": "train", "make_visualize_fn": "train", "step_fn": "train", "train": "train",
    "PUBLAYNET_REFERENCE": "evaluate", "REFERENCES": "evaluate", "evaluate_coco": "evaluate",
    "evaluate_model": "evaluate", "format_table": "evaluate", "predictions_to_coco": "evaluate",
    "run_inference": "evaluate",
    "IMAGE_SUFFIXES": "predict", "draw_detections": "predict", "find_pages": "predict", "predict_pages": "predict",
}

__all__ = sorted(_WHERE)

__getattr__ = lazy_names(__name__, _WHERE)
