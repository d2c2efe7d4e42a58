"""Image classification on a pre-trained backbone: fine-tuning, linear probing, evaluation, prediction.

The files every task package has: ``config`` (:class:`FinetuneConfig`, :class:`LinprobeConfig`, the shared
:class:`DataConfig`), ``model`` (the classifier built from the config), ``data`` (image folders, training
augmentation, eval preprocessing, the on-device path), ``train`` (the mixup step and :func:`finetune`, the
paper's recipe), ``cli`` (the run functions of ``beit classify train | linprobe | eval | predict``). Task
extras: ``linprobe`` (one linear head per block on frozen features, :func:`linprobe`) and ``evaluate``
(checkpoint evaluation, reports, folder prediction).

Imports are lazy (``beit.tasks._lazy``) so that ``beit --help`` (which reads ``cli``) does not load the
engine. ``beit.tasks.classify.finetune`` and ``beit.tasks.classify.linprobe`` are the functions; the probe's
module is ``from beit.tasks.classify.linprobe import ...``.
"""

from __future__ import annotations

from .._lazy import lazy_names

_WHERE = {
    "DataConfig": "config", "FinetuneConfig": "config", "LinprobeConfig": "config", "parse_blocks": "config",
    "SHAPE_FIELDS": "model", "build_model": "model", "check_overrides_fit": "model", "is_preset": "model",
    "source_config": "model",
    "build_datasets": "data", "build_device_train": "data", "build_preprocess": "data",
    "build_train_transform": "data", "build_val": "data", "check_num_classes": "data", "readable_subset": "data",
    "begin_run": "train", "finetune": "train", "make_step_fn": "train", "scaled_train_config": "train",
    "ProbeHeads": "linprobe", "build_encoder": "linprobe", "extract_features": "linprobe", "linprobe": "linprobe",
    "ClassificationMeter": "evaluate", "Preprocess": "evaluate", "TRAIN_CKPT_FORMAT": "evaluate",
    "evaluate_checkpoint": "evaluate", "evaluate_model": "evaluate", "load_classifier": "evaluate",
    "make_eval_fn": "evaluate", "predict_folder": "evaluate", "save_confusion_png": "evaluate",
    "write_report": "evaluate",
}

__all__ = sorted(_WHERE)

__getattr__ = lazy_names(__name__, _WHERE)
