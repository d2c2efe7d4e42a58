"""Semantic segmentation with BEiT + UperNet (the paper's ADE20K setup), on the shared engine.

``model``: backbone pyramid, UperNet and auxiliary FCN heads. ``data``: ADE20K / folder / list datasets
and mmseg's augmentation. ``metrics``: confusion matrix -> mIoU / aAcc tables. ``infer``: whole-image and
sliding-window inference, flip / multi-scale, overlays. ``train``: config, train / evaluate / predict.
"""

from .data import (
    ADE20K_CLASSES,
    CAMVID_CLASSES,
    BadSampleError,
    SegEvalTransform,
    SegmentationDataset,
    SegTrainTransform,
    folder_pairs,
    list_pairs,
    load_class_names,
)
from .infer import colorize, inference, make_palette, overlay, save_overlay, slide_logits, whole_logits
from .metrics import ConfusionMatrix, format_table, metrics_from_confusion
from .model import BeitSegmenter, FCNHead, FeaturePyramid, UperHead, default_out_indices, segmentation_loss
from .train import (
    SegDataConfig,
    SegmentConfig,
    SegModelConfig,
    SegTestConfig,
    build_datasets,
    build_model,
    evaluate,
    load_segmenter,
    make_eval_fn,
    make_step_fn,
    predict,
    train,
)

__all__ = [
    "ADE20K_CLASSES", "CAMVID_CLASSES", "BadSampleError", "BeitSegmenter", "ConfusionMatrix", "FCNHead",
    "FeaturePyramid", "SegDataConfig", "SegEvalTransform", "SegModelConfig", "SegTestConfig", "SegTrainTransform",
    "SegmentConfig", "SegmentationDataset", "UperHead", "build_datasets", "build_model", "colorize",
    "default_out_indices", "evaluate", "folder_pairs", "format_table", "inference", "list_pairs",
    "load_class_names", "load_segmenter", "make_eval_fn", "make_palette", "make_step_fn", "metrics_from_confusion",
    "overlay", "predict", "save_overlay", "segmentation_loss", "slide_logits", "train", "whole_logits",
]
