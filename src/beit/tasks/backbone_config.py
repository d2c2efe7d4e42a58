"""The backbone part every task config shares: ``model_overrides``, a dict of ``BeitConfig`` fields.

The backbone's source is the task's model key (``model`` for ``finetune`` / ``linprobe``, ``model.init``
(checkpoint) or ``model.arch`` / ``model.name`` (preset) for ``segment`` / ``layout`` / ``pretrain``);
``model_overrides`` change the built model the same way everywhere (``beit.build_backbone``), e.g.
``model_overrides.attn_impl=eager``. Keys a task sets itself are refused with the key to use instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..engine.config import ConfigError
from ..interop.backbone import check_override_keys

__all__ = ["check_model_overrides"]


def check_model_overrides(overrides: Mapping[str, Any], reserved: Mapping[str, str] | None = None,
                          key: str = "model_overrides") -> None:
    """Unknown ``BeitConfig`` fields, and fields the task sets itself (``reserved``: field -> the key to
    set instead), raise ConfigError naming ``<key>.<field>``."""
    try:
        check_override_keys(overrides, key)
    except ValueError as e:
        k, _, msg = str(e).partition(": ")
        raise ConfigError(k, msg) from None
    for k, instead in (reserved or {}).items():
        if k in overrides:
            raise ConfigError(f"{key}.{k}", f"set by the task's config itself; use {instead}")
