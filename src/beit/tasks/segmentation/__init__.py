"""Semantic segmentation with BEiT + UperNet (the paper's ADE20K setup), on the shared engine.

The files every task package has: ``config`` (:class:`SegmentConfig` and its parts), ``model`` (backbone
pyramid, UperNet and auxiliary FCN heads; :func:`build_model` from the config, :func:`load_segmenter` from a
training checkpoint), ``data`` (ADE20K / folder / list datasets, mmseg's augmentation, :func:`build_datasets`),
``train`` (step / eval functions for the engine, :func:`train`, :func:`evaluate`), ``cli`` (the run functions
of ``beit segment train | eval | predict``). Task extras: ``metrics`` (confusion matrix -> mIoU / aAcc
tables) and ``infer`` (whole-image and sliding-window inference, flip / multi-scale, overlays, :func:`predict`).

Imports are lazy (``beit.tasks._lazy``: a name is imported from the module :data:`_WHERE` names on first
use) so that ``beit --help``, which reads ``cli``, loads neither the engine nor the data pipeline.
``beit.tasks.segmentation.train`` is the function; its module is ``from beit.tasks.segmentation.train import ...``.
"""

from __future__ import annotations

from .._lazy import lazy_names

_WHERE = {
    "IMAGENET_MEAN_255": "config", "IMAGENET_STD_255": "config", "SHAPE_KEYS": "config", "SegDataConfig": "config",
    "SegModelConfig": "config", "SegTestConfig": "config", "SegmentConfig": "config",
    "BeitSegmenter": "model", "ConvBNReLU": "model", "FCNHead": "model", "FeaturePyramid": "model", "PPM": "model",
    "UperHead": "model", "build_backbone": "model", "build_model": "model", "config_from_checkpoint": "model",
    "default_out_indices": "model", "load_segmenter": "model", "segmentation_loss": "model",
    "ADE20K_CLASSES": "data", "BadSampleError": "data", "CAMVID_CLASSES": "data", "SegEvalTransform": "data",
    "SegTrainTransform": "data", "SegmentationDataset": "data", "build_datasets": "data", "class_names": "data",
    "collate_eval": "data", "folder_pairs": "data", "list_pairs": "data", "load_class_names": "data",
    "photometric_distortion": "data", "read_mask": "data",
    "evaluate": "train", "make_eval_fn": "train", "make_step_fn": "train", "train": "train",
    "ConfusionMatrix": "metrics", "format_table": "metrics", "metrics_from_confusion": "metrics",
    "colorize": "infer", "inference": "infer", "make_palette": "infer", "overlay": "infer", "predict": "infer",
    "save_overlay": "infer", "slide_logits": "infer", "whole_logits": "infer",
    "write_overlays": "infer",
}

__all__ = sorted(_WHERE)

__getattr__ = lazy_names(__name__, _WHERE)
