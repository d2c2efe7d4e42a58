"""Read the architecture off a state dict in our layout, so any checkpoint loads without a config."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch

from ..models.config import BeitConfig
from ..models.relpos import window_from_table


def infer_config(sd: Mapping[str, torch.Tensor], hints: Mapping[str, Any] | None = None) -> BeitConfig:
    """Depth, width, heads, patch and image size, pooling, layer scale and head from the tensors.

    ``hints`` (a config file's values or the caller's overrides) win where the tensors are silent:
    heads when there is no relative-position table (else 64-dim heads), eps, image size without tables.
    """
    hints = dict(hints or {})
    if "patch_embed.proj.weight" not in sd:
        raise ValueError("not a BEiT checkpoint: no patch embedding ('patch_embed.proj.weight')")
    w = sd["patch_embed.proj.weight"]
    embed_dim, in_chans, patch_size = w.shape[0], w.shape[1], w.shape[-1]
    depth = 1 + max((int(m[1]) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    if depth == 0:
        raise ValueError("not a BEiT checkpoint: no transformer blocks ('blocks.N.*')")

    shared = "rel_pos_bias.relative_position_bias_table" in sd
    per_layer = "blocks.0.attn.relative_position_bias_table" in sd
    table = sd.get("rel_pos_bias.relative_position_bias_table", sd.get("blocks.0.attn.relative_position_bias_table"))
    all_head_dim = sd["blocks.0.attn.qkv.weight"].shape[0] // 3
    if table is not None:
        num_heads = table.shape[1]
        window = window_from_table(table.shape[0])
    else:
        num_heads = hints.get("num_heads") or max(1, all_head_dim // 64)
        window = None
    if "pos_embed" in sd:
        n = sd["pos_embed"].shape[1] - 1
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"pos_embed has {n} patch positions: not a square grid")
        window = window or (side, side)
    if window is None:
        img = hints.get("img_size", 224)
        img_hw = (img, img) if isinstance(img, int) else tuple(img)
    else:
        img_hw = (window[0] * patch_size, window[1] * patch_size)

    mlp_hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
    cfg: dict[str, Any] = dict(
        img_size=img_hw[0] if img_hw[0] == img_hw[1] else img_hw,
        patch_size=patch_size,
        in_chans=in_chans,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        attn_head_dim=None if all_head_dim == embed_dim else all_head_dim // num_heads,
        mlp_ratio=mlp_hidden / embed_dim,
        qkv_bias="blocks.0.attn.q_bias" in sd,
        init_values=float(sd["blocks.0.gamma_1"].float().mean()) if "blocks.0.gamma_1" in sd else None,
        use_abs_pos_emb="pos_embed" in sd,
        use_rel_pos_bias=per_layer,
        use_shared_rel_pos_bias=shared,
        use_mean_pooling="fc_norm.weight" in sd,
    )
    if "lm_head.weight" in sd:
        cfg.update(head="mim", vocab_size=sd["lm_head.weight"].shape[0], mim_head_norm="head_norm.weight" in sd)
    elif "head.weight" in sd:
        cfg.update(head="cls", num_classes=sd["head.weight"].shape[0])
    else:
        cfg.update(head="none" if "fc_norm.weight" not in sd and "norm.weight" not in sd else "cls", num_classes=0)
    for k in ("layer_norm_eps", "extra"):
        if k in hints:
            cfg[k] = hints[k]
    return BeitConfig(**cfg)


def config_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    """Hugging Face ``config.json`` -> BeitConfig fields (only what the tensors cannot tell)."""
    out: dict[str, Any] = {}
    if "layer_norm_eps" in hf:
        out["layer_norm_eps"] = float(hf["layer_norm_eps"])
    if "num_attention_heads" in hf:
        out["num_heads"] = int(hf["num_attention_heads"])
    if "image_size" in hf:
        out["img_size"] = hf["image_size"] if isinstance(hf["image_size"], int) else tuple(hf["image_size"])
    if hf.get("id2label"):
        labels = [hf["id2label"][str(i)] if str(i) in hf["id2label"] else hf["id2label"].get(i)
                  for i in range(len(hf["id2label"]))]
        out["extra"] = {"class_names": labels}
    return out


def config_to_hf(cfg: BeitConfig) -> dict[str, Any]:
    """BeitConfig -> a Hugging Face ``config.json`` that transformers' Beit classes load."""
    head_dim = cfg.attn_head_dim or cfg.embed_dim // cfg.num_heads
    if head_dim * cfg.num_heads != cfg.embed_dim:
        raise ValueError("Hugging Face BEiT needs num_heads * head_dim == embed_dim")
    arch = {"cls": "BeitForImageClassification", "mim": "BeitForMaskedImageModeling", "none": "BeitModel"}[cfg.head]
    names = cfg.extra.get("class_names") or [f"LABEL_{i}" for i in range(cfg.num_classes)]
    hf: dict[str, Any] = {
        "architectures": [arch],
        "model_type": "beit",
        "hidden_size": cfg.embed_dim,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": int(cfg.embed_dim * cfg.mlp_ratio),
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "drop_path_rate": cfg.drop_path_rate,
        "initializer_range": cfg.init_std,
        "layer_norm_eps": cfg.layer_norm_eps,
        "image_size": cfg.img_size if isinstance(cfg.img_size, int) else list(cfg.img_size),
        "patch_size": cfg.patch_size,
        "num_channels": cfg.in_chans,
        "use_mask_token": cfg.head == "mim",
        "use_absolute_position_embeddings": cfg.use_abs_pos_emb,
        "use_relative_position_bias": cfg.use_rel_pos_bias,
        "use_shared_relative_position_bias": cfg.use_shared_rel_pos_bias,
        "layer_scale_init_value": cfg.init_values or 0.0,
        "use_mean_pooling": cfg.use_mean_pooling if cfg.head != "mim" else not cfg.mim_head_norm,
        "vocab_size": cfg.vocab_size,
    }
    if cfg.head == "cls":
        hf["id2label"] = {str(i): n for i, n in enumerate(names)}
        hf["label2id"] = {n: i for i, n in enumerate(names)}
    return hf
