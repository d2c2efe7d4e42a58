"""The classifier built from its config: a preset from scratch or a checkpoint through ``beit.build_backbone``
with the fine-tuning overrides (per-layer rel-pos, resampled tables, mean pooling, drop path, a new head).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from timm.layers import trunc_normal_
from torch import nn

from ..._text import first_few
from ...engine.config import ConfigError
from ...interop.backbone import (  # noqa: F401 - source_config / check_overrides_fit / SHAPE_FIELDS: old home
    SHAPE_FIELDS,
    build_backbone,
    check_overrides_fit,
    is_preset,
    source_config,
)
from ...models.config import preset_config
from .config import FinetuneConfig

__all__ = ["build_model", "check_img_size"]

_NOT_DIVISIBLE = re.compile(r"img_size (\d+) is not divisible by patch_size (\d+)")

logger = logging.getLogger(__name__)


def _reset_head(model: nn.Module) -> None:
    trunc_normal_(model.head.weight, std=model.cfg.init_std)
    nn.init.zeros_(model.head.bias)
    model.head.weight.data.mul_(model.cfg.init_scale)


def _img_size_error(img_size: int, patch: int) -> ConfigError:
    near = sorted({max(patch, img_size // patch * patch), -(-img_size // patch) * patch})
    return ConfigError("img_size", f"{img_size} is not divisible by the model's patch size {patch}: use a multiple "
                                   f"of {patch} (e.g. {' or '.join(map(str, near))})")


def check_img_size(cfg: FinetuneConfig) -> None:
    """``img_size`` against the patch size, before any data is read, where it is known without reading a
    checkpoint: a preset's (or ``model_overrides.patch_size``). A checkpoint's is checked by :func:`build_model`.

    Raises:
        ConfigError: ``config key 'img_size': 30 is not divisible by the model's patch size 4: ...``.
    """
    patch = cfg.model_overrides.get("patch_size")
    if patch is not None and not (isinstance(patch, int) and not isinstance(patch, bool) and patch > 0):
        raise ConfigError("model_overrides.patch_size", f"must be a positive whole number of pixels, got {patch!r}")
    if patch is None and is_preset(cfg.model):
        patch = preset_config(cfg.model).patch_size
    if isinstance(patch, int) and patch > 0 and cfg.img_size % patch:
        raise _img_size_error(cfg.img_size, patch)


def build_model(cfg: FinetuneConfig, num_classes: int, class_names: list[str] | None = None) -> nn.Module:
    """Classifier for ``cfg``: a preset from scratch, or a checkpoint through ``beit.load_model`` with the
    fine-tuning overrides (per-layer rel-pos, resampled tables, mean pooling, drop path, new head).

    A classifier checkpoint whose stored class names differ from ``class_names`` gets a fresh head even when
    the class count matches (its old head would map the new labels to the wrong outputs).

    Raises:
        ConfigError: ``img_size`` not a multiple of the model's patch size.
        ValueError / CheckpointError / FileNotFoundError: as :func:`beit.build_backbone`.
    """
    over: dict[str, Any] = dict(num_classes=num_classes, img_size=cfg.img_size, drop_path_rate=cfg.drop_path,
                                use_mean_pooling=cfg.use_mean_pooling, head="cls")
    over.update(cfg.model_overrides)
    try:
        model = build_backbone(cfg.model, rel_pos=cfg.rel_pos, **over)
    except ValueError as e:
        m = _NOT_DIVISIBLE.search(str(e))
        if m is None or int(m.group(1)) != cfg.img_size:
            raise
        raise _img_size_error(cfg.img_size, int(m.group(2))) from None
    # a classifier checkpoint of the same class count keeps its head; its stored names tell whether they match
    old_names = list((model.cfg.extra or {}).get("class_names") or [])
    if (not is_preset(cfg.model) and class_names and len(old_names) == num_classes
            and old_names != list(class_names)):
        logger.info("checkpoint classes %s differ from the data's: new head", first_few(old_names, 3))
        _reset_head(model)
    return model.train()

