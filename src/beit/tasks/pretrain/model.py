"""The pre-training models built from the config: the MIM ViT (:func:`build_model`, through
``beit.build_backbone``) and the frozen tokenizer that gives its targets (:func:`build_tokenizer`, through the
one registry ``beit.tokenizers.load_tokenizer``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...engine.config import ConfigError
from ...interop.backbone import build_backbone
from ...models import BeitConfig
from ...models.config import preset_config
from ...tokenizers import AUTO, detect_tokenizer_kind, load_tokenizer, resolve_precision
from .config import SHAPE_KEYS, PretrainConfig, PretrainTokenizerConfig

__all__ = ["build_model", "build_tokenizer", "model_config", "model_overrides"]


def model_overrides(cfg: PretrainConfig, vocab_size: int) -> dict[str, Any]:
    """The ``BeitConfig`` fields pre-training sets: the MIM head, the image / patch size of the masks, the
    recipe's drop path / layer scale / attention, the shape shortcuts ``model.depth`` ..., then ``model_overrides``
    (which win over ``model.drop_path_rate`` / ``model.init_values`` / ``model.attn_impl``)."""
    m = cfg.model
    over: dict[str, Any] = dict(
        head="mim", vocab_size=vocab_size, img_size=m.img_size, patch_size=m.patch_size,
        drop_path_rate=m.drop_path_rate, init_values=m.init_values, attn_impl=m.attn_impl,
    )
    over.update({k: getattr(m, k) for k in SHAPE_KEYS if getattr(m, k)})
    over.update(cfg.model_overrides)
    return over


def model_config(cfg: PretrainConfig, vocab_size: int) -> BeitConfig:
    """The from-scratch architecture: preset ``model.name`` with :func:`model_overrides`."""
    try:
        return preset_config(cfg.model.name, **model_overrides(cfg, vocab_size))
    except ValueError as e:
        raise ConfigError("model", str(e)) from None


def build_model(cfg: PretrainConfig, vocab_size: int) -> nn.Module:
    """The MIM model through ``beit.build_backbone``: preset ``model.name`` (random init), or ``model.init``
    (a checkpoint, any format ``beit.load_model`` reads: its shape comes from its tensors, ``model.depth`` /
    ``model_overrides.depth`` ... that disagree are an error; its relative-position scheme is kept)."""
    over = model_overrides(cfg, vocab_size)
    if not cfg.model.init:
        model_config(cfg, vocab_size)  # config errors name the key
        return build_backbone(cfg.model.name, **over)
    over.setdefault("use_mean_pooling", False)  # the final norm feeds the lm head, as a pre-training model
    return build_backbone(cfg.model.init, key="model", **over)



def build_tokenizer(t: PretrainTokenizerConfig, device: torch.device | str = "cpu") -> nn.Module:
    """The frozen tokenizer ``t`` names, through the one registry (:func:`beit.tokenizers.load_tokenizer`),
    on ``device`` in eval mode without gradients. Raises ``ValueError`` for a kind or option the
    registry does not know, a file whose kind ``auto`` cannot tell, or a file that is not of the kind."""
    kind = detect_tokenizer_kind(t.path) if t.kind == AUTO else t.kind  # validate() has resolved it already
    precision = resolve_precision(kind, t.precision, device)  # auto: the kind's own on CUDA, fp32 elsewhere
    tok = load_tokenizer(kind, t.path, decoder=t.decoder or None, precision=precision, device=device)
    return tok.to(device).eval().requires_grad_(False)

