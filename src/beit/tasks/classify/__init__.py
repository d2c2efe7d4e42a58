"""Image classification on a pre-trained backbone: fine-tuning, linear probing, evaluation, prediction.

``finetune``: :class:`FinetuneConfig` and :func:`~beit.tasks.classify.finetune.finetune` (the paper's recipe).
``linprobe``: :class:`LinprobeConfig` and :func:`~beit.tasks.classify.linprobe.linprobe` (one linear head
per block on frozen features). ``evaluate``: checkpoint evaluation, reports, folder prediction. ``cli``: the
run functions of ``beit classify train | linprobe | eval | predict``.

Imports are lazy so that ``beit --help`` (which reads ``cli``) does not load the engine. The names
``finetune`` and ``linprobe`` here are the submodules; the functions are
``beit.tasks.classify.finetune.finetune`` and ``beit.tasks.classify.linprobe.linprobe``.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ClassificationMeter", "DataConfig", "FinetuneConfig", "LinprobeConfig", "Preprocess", "ProbeHeads",
    "build_datasets", "build_encoder", "build_model", "build_preprocess", "build_train_transform",
    "evaluate_checkpoint", "evaluate_model", "extract_features", "load_classifier", "make_eval_fn",
    "make_step_fn", "parse_blocks", "predict_folder", "save_confusion_png", "scaled_train_config", "write_report",
]

_WHERE = {
    "DataConfig": "finetune", "FinetuneConfig": "finetune", "build_datasets": "finetune", "build_model": "finetune",
    "build_train_transform": "finetune", "make_step_fn": "finetune", "scaled_train_config": "finetune",
    "LinprobeConfig": "linprobe", "ProbeHeads": "linprobe", "build_encoder": "linprobe",
    "extract_features": "linprobe", "parse_blocks": "linprobe",
    "ClassificationMeter": "evaluate", "Preprocess": "evaluate", "build_preprocess": "evaluate",
    "evaluate_checkpoint": "evaluate", "evaluate_model": "evaluate", "load_classifier": "evaluate",
    "make_eval_fn": "evaluate", "predict_folder": "evaluate", "save_confusion_png": "evaluate",
    "write_report": "evaluate",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
