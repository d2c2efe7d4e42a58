"""``create_model``: a preset name plus field overrides -> a ready model."""

from __future__ import annotations

from typing import Any

from torch import nn

from .beit import Beit
from .config import PRESETS, BeitConfig, preset_config


def list_models() -> list[str]:
    return sorted(PRESETS)


def create_model(name: str | BeitConfig, **overrides: Any) -> nn.Module:
    """``create_model("beit_base_patch16_224", num_classes=10)``; ``head="mim"`` gives the pre-training model.

    Any ``BeitConfig`` field can be overridden, e.g. a test-sized model:
    ``create_model("beit_tiny_patch16_224", img_size=32, patch_size=4, depth=2)``.
    """
    cfg = name.replace(**overrides) if isinstance(name, BeitConfig) else preset_config(name, **overrides)
    return Beit(cfg)
