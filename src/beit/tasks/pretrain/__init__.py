"""Masked-image-modeling pre-training (BEiT's MIM objective) on the shared engine.

The files every task package has: ``config`` (:class:`PretrainConfig`, :func:`validate`), ``model`` (the MIM
ViT and the frozen tokenizer built from the config), ``data`` (the views and masks, on the CPU or the device),
``train`` (the MIM step and :func:`pretrain`), ``cli`` (the run functions of ``beit pretrain train |
visualize`` and ``beit demo``). Task extra: ``panel`` (the MIM panel: input | mask | reconstructions).

Imports are lazy (``beit.tasks._lazy``) so that ``beit --help`` (which reads ``cli``) does not load the data
pipeline.
"""

from __future__ import annotations

from .._lazy import lazy_names

_WHERE = {
    "IMAGENET_MEAN": "config", "IMAGENET_STD": "config", "SHAPE_KEYS": "config", "PretrainConfig": "config",
    "PretrainDataConfig": "config", "PretrainModelConfig": "config", "PretrainTokenizerConfig": "config",
    "shard_urls": "config", "validate": "config",
    "build_model": "model", "build_tokenizer": "model", "model_config": "model", "model_overrides": "model",
    "build_dataset": "data", "build_device_data": "data", "build_transform": "data",
    "make_step_fn": "train", "pretrain": "train",
    "fixed_batch": "panel", "mim_panel": "panel",
}

__all__ = sorted(_WHERE)

__getattr__ = lazy_names(__name__, _WHERE)
