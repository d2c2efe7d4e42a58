"""Masked-image-modeling pre-training (BEiT's MIM objective) on the shared engine.

``train``: :class:`PretrainConfig` and :func:`pretrain` (data, tokenizer, model, step). ``cli``: the run
functions of ``beit pretrain train | visualize`` and ``beit demo``.

Imports are lazy so that ``beit --help`` (which reads ``cli``) does not load the data pipeline.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "SHAPE_KEYS", "PretrainConfig", "PretrainDataConfig", "PretrainModelConfig",
    "PretrainTokenizerConfig", "build_dataset", "build_device_data", "build_model", "build_tokenizer",
    "make_step_fn", "mim_panel", "model_config", "model_overrides", "pretrain", "shard_urls", "validate",
]

_WHERE = {name: "train" for name in __all__}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
