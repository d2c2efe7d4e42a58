"""Read the architecture off a state dict in our layout, so any checkpoint loads without a config."""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from typing import Any

import torch

from .._text import ALIKE_ON_EVERY_RANK, first_few
from ..data.transforms import eval_resize_size
from ..models.config import BeitConfig, Preprocess
from ..models.relpos import table_size

log = logging.getLogger(__name__)


def _hint_grid(hints: Mapping[str, Any], patch_size: int) -> tuple[int, int] | None:
    img = hints.get("img_size")
    if img is None:
        return None
    h, w = (img, img) if isinstance(img, int) else (int(img[0]), int(img[1]))
    return h // patch_size, w // patch_size


def source_grid(table_rows: int | None, num_pos: int | None, hint: tuple[int, int] | None) -> tuple[int, int] | None:
    """The patch grid a checkpoint was made for, from its rel-pos table rows and/or abs-pos positions.

    Every grid (h, w) that fits both is a candidate; the caller's ``hint`` wins when it fits, then the
    square one, then the only one; several non-square candidates are told apart by the hint's aspect
    ratio. None when the checkpoint has neither tensor. Raises ValueError when no grid fits or the
    choice is ambiguous.
    """
    if table_rows is None and num_pos is None:
        return None
    if table_rows is not None:
        cand = [(h, ((table_rows - 3) // (2 * h - 1) + 1) // 2) for h in range(1, table_rows)
                if table_rows > 3 and (table_rows - 3) % (2 * h - 1) == 0 and ((table_rows - 3) // (2 * h - 1)) % 2]
        cand = [g for g in cand if table_size(g) == table_rows]
        if num_pos is not None:
            cand = [g for g in cand if g[0] * g[1] == num_pos]
    else:
        cand = [(h, num_pos // h) for h in range(1, num_pos + 1) if num_pos % h == 0]
    what = " and ".join(
        ([f"a relative position table of {table_rows} rows"] if table_rows is not None else [])
        + ([f"pos_embed with {num_pos} patch positions"] if num_pos is not None else [])
    )
    if not cand:
        raise ValueError(f"{what}: no patch grid fits")
    if hint is not None and tuple(hint) in cand:
        return tuple(hint)  # type: ignore[return-value]
    square = [g for g in cand if g[0] == g[1]]
    if square:
        return square[0]
    if len(cand) == 1:
        return cand[0]
    if hint is not None:
        ratio = math.log(hint[0] / hint[1])
        return min(cand, key=lambda g: abs(math.log(g[0] / g[1]) - ratio))
    raise ValueError(f"{what}: the patch grid is not square and ambiguous (grids {first_few(cand, 4)}); "
                     "pass img_size=(H, W)")


def _first(sd: Mapping[str, torch.Tensor], pattern: str) -> torch.Tensor | None:
    """The tensor of the lowest block matching ``blocks.N.<pattern>`` (partial checkpoints may lack block 0)."""
    best = None
    for k, v in sd.items():
        m = re.match(r"blocks\.(\d+)\." + re.escape(pattern) + "$", k)
        if m and (best is None or int(m[1]) < best[0]):
            best = (int(m[1]), v)
    return None if best is None else best[1]


def infer_config(sd: Mapping[str, torch.Tensor], hints: Mapping[str, Any] | None = None) -> BeitConfig:
    """Depth, width, heads, patch and image size, pooling, layer scale and head from the tensors.

    ``hints`` (a config file's values or the caller's overrides) win where the tensors are silent:
    heads when there is no relative-position table (else 64-dim heads), eps, MLP width, image size without
    tables, and which grid a non-square table belongs to. Works on partial state dicts (any block may be
    missing its tensors). Raises ValueError naming the missing tensor when the architecture cannot be told.
    """
    hints = dict(hints or {})
    if "patch_embed.proj.weight" not in sd:
        raise ValueError("not a BEiT checkpoint: no patch embedding ('patch_embed.proj.weight')")
    w = sd["patch_embed.proj.weight"]
    if w.ndim != 4:
        raise ValueError(f"'patch_embed.proj.weight' has shape {tuple(w.shape)}, expected [D, C, p, p]")
    embed_dim, in_chans, patch_size = w.shape[0], w.shape[1], w.shape[-1]
    depth = 1 + max((int(m[1]) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    if depth == 0:
        raise ValueError("not a BEiT checkpoint: no transformer blocks ('blocks.N.*')")

    shared = "rel_pos_bias.relative_position_bias_table" in sd
    per_layer_table = _first(sd, "attn.relative_position_bias_table")
    table = sd.get("rel_pos_bias.relative_position_bias_table", per_layer_table)
    qkv = _first(sd, "attn.qkv.weight")
    q_bias = _first(sd, "attn.q_bias")
    if qkv is not None:
        all_head_dim = qkv.shape[0] // 3
    elif q_bias is not None:
        all_head_dim = q_bias.shape[0]
    else:
        all_head_dim = embed_dim
    for key, ndim in (("pos_embed", 3), ("rel_pos_bias.relative_position_bias_table", 2), ("cls_token", 3)):
        if key in sd and sd[key].ndim != ndim:
            raise ValueError(f"{key!r} has shape {tuple(sd[key].shape)}, expected {ndim} dimensions")
    if table is not None and table.ndim != 2:
        raise ValueError(f"relative position table has shape {tuple(table.shape)}, expected [rows, heads]")
    if table is not None:
        num_heads = table.shape[1]
    elif hints.get("num_heads"):
        num_heads = int(hints["num_heads"])
    else:
        num_heads = max(1, all_head_dim // 64)
        log.warning("the checkpoint does not tell the number of attention heads (no relative position table, "
                    "no config): assuming %d (64-dim heads); pass num_heads=... if that is wrong", num_heads,
                    extra=ALIKE_ON_EVERY_RANK)
    num_pos = sd["pos_embed"].shape[1] - 1 if "pos_embed" in sd else None
    window = source_grid(None if table is None else table.shape[0], num_pos, _hint_grid(hints, patch_size))
    if window is None:
        img = hints.get("img_size", 224)
        img_hw = (img, img) if isinstance(img, int) else tuple(img)
    else:
        img_hw = (window[0] * patch_size, window[1] * patch_size)

    fc1, fc2 = _first(sd, "mlp.fc1.weight"), _first(sd, "mlp.fc2.weight")
    if fc1 is not None or fc2 is not None:
        hidden = fc1.shape[0] if fc1 is not None else fc2.shape[1]
        mlp_ratio = hidden / embed_dim
        if int(embed_dim * mlp_ratio) != hidden:  # the model's int(dim * ratio) rounds down (56 * (115 / 56) -> 114)
            mlp_ratio = (hidden + 0.5) / embed_dim
    else:
        mlp_ratio = float(hints.get("mlp_ratio", 4.0))
    gamma = _first(sd, "gamma_1")
    if gamma is None:
        gamma = _first(sd, "gamma_2")
    cfg: dict[str, Any] = dict(
        img_size=img_hw[0] if img_hw[0] == img_hw[1] else img_hw,
        patch_size=patch_size,
        in_chans=in_chans,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        attn_head_dim=None if all_head_dim == embed_dim else all_head_dim // num_heads,
        mlp_ratio=mlp_ratio,
        qkv_bias=q_bias is not None or _first(sd, "attn.v_bias") is not None,
        init_values=float(gamma.float().mean()) if gamma is not None else None,
        use_abs_pos_emb="pos_embed" in sd,
        use_rel_pos_bias=per_layer_table is not None,
        use_shared_rel_pos_bias=shared,
        # neither norm in the file: the source's final norm was an Identity (mean pooling, pooler not saved)
        use_mean_pooling="fc_norm.weight" in sd or ("norm.weight" not in sd and "lm_head.weight" not in sd),
    )
    if "lm_head.weight" in sd:
        cfg.update(head="mim", vocab_size=sd["lm_head.weight"].shape[0], mim_head_norm="head_norm.weight" in sd)
    elif "head.weight" in sd:
        cfg.update(head="cls", num_classes=sd["head.weight"].shape[0])
    else:
        cfg.update(head="none" if "fc_norm.weight" not in sd and "norm.weight" not in sd else "cls", num_classes=0)
    if cfg["head"] == "none":
        cfg["use_mean_pooling"] = "norm.weight" not in sd  # keeps the final norm exactly when the file has it
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
        out["img_size"] = tuple(hf["image_size"]) if isinstance(hf["image_size"], list) else hf["image_size"]
    if hf.get("id2label"):
        labels = [hf["id2label"][str(i)] if str(i) in hf["id2label"] else hf["id2label"].get(i)
                  for i in range(len(hf["id2label"]))]
        out["extra"] = {"class_names": labels}
    return out


_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


# the key sets of a size dict transformers' image processors take (image_processing_utils.VALID_SIZE_DICT_KEYS)
_HF_SIZE_KEYS = ({"height", "width"}, {"shortest_edge"}, {"shortest_edge", "longest_edge"}, {"longest_edge"},
                 {"max_height", "max_width"})


def _hf_side(pp: Mapping[str, Any], field: str) -> int | None:
    """The square side in pixels of ``pp[field]`` (``size`` / ``crop_size``: an int, ``[height, width]``, or a
    ``{"height", "width"}`` / ``{"shortest_edge"}`` dict); None for one our eval transforms do not make (not
    square, longest edge, below 1 px). Raises ValueError naming ``field`` for a value of no shape a processor takes.
    """
    v = pp[field]
    d = {"height": v[0], "width": v[1]} if isinstance(v, list) and len(v) == 2 else v  # a pair: (height, width)
    if not (isinstance(d, Mapping) and set(d) in _HF_SIZE_KEYS and all(map(_is_int, d.values())) or _is_int(d)):
        raise ValueError(f"{field!r} is {json.dumps(v, default=str)}: not a size an image processor takes (whole "
                         'pixels: {"height": H, "width": W}, {"shortest_edge": S}, [H, W] or one int)')
    if isinstance(d, Mapping):
        if "height" in d:
            d = d["height"] if d["height"] == d["width"] else None
        else:
            d = d["shortest_edge"] if set(d) == {"shortest_edge"} else None
    return d if d is not None and d > 0 else None  # not -32 px


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def preprocess_from_hf(pp: Mapping[str, Any]) -> dict[str, Any] | None:
    """Hugging Face ``preprocessor_config.json`` (``BeitImageProcessor``) -> a :class:`Preprocess` dict, or None
    when it describes no square input our eval transforms make (no resize, no rescale to [0, 1] by 1 / 255, a
    crop-less short-side resize) or holds a value no processor takes (a size below 1 px, a std of 0, an unknown
    resample filter).

    A file without ``size`` (or ``size: null``) still gives its mean, std and resample: the dict then has no
    ``img_size`` (the caller puts in the model's) and resizes as beit does without a file (the whole image when
    ``do_center_crop`` is false, else the center crop of the file's ``crop_pct``, or of beit's default).
    Raises ValueError naming the field for a ``size`` or ``crop_size`` of no shape an image processor takes
    (``"224"``, ``224.0``, ``{"w": 224}``).

    ``microsoft/beit-base-patch16-224``'s: the whole image to 224x224, bilinear, mean = std = 0.5.
    """
    size = None if pp.get("size") is None else _hf_side(pp, "size")
    crop = None if pp.get("crop_size") is None else _hf_side(pp, "crop_size")
    if not pp.get("do_resize", True) or not pp.get("do_rescale", True):
        return None
    scale = pp.get("rescale_factor", 1 / 255)  # ours scales pixels to [0, 1]; 1 / 127.5 is another input
    if not isinstance(scale, (int, float)) or not math.isclose(scale, 1 / 255, rel_tol=1e-4):
        return None
    if pp.get("resample", 3) not in _PIL_RESAMPLE:  # the processor's default is bicubic; 9 is no filter
        return None
    out: dict[str, Any] = {"interpolation": _PIL_RESAMPLE[pp.get("resample", 3)]}
    if pp.get("size") is None:  # the side is the model's; the resize beit's own for it
        if not pp.get("do_center_crop", True):
            out.update(resize="full")
        else:
            pct = pp.get("crop_pct")
            ok = isinstance(pct, (int, float)) and not isinstance(pct, bool) and 0 < pct <= 1
            out.update(resize="crop", crop_pct=float(pct) if ok else None)
    elif pp.get("do_center_crop", True):
        if not size or not crop or crop > size:
            return None
        crop_pct = crop / size
        if eval_resize_size(crop, crop_pct) != size:  # int(crop / crop_pct): 192 / (192 / 225) -> 224
            crop_pct = crop / (size + 0.5)
        out.update(img_size=crop, resize="crop", crop_pct=crop_pct)
    elif size and not (isinstance(pp["size"], Mapping) and "shortest_edge" in pp["size"]):
        out.update(img_size=size, resize="full")
    else:
        return None
    if pp.get("do_normalize", True):
        mean, std = pp.get("image_mean", [0.5] * 3), pp.get("image_std", [0.5] * 3)  # the processor's defaults
        if not all(isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v)
                   for v in (mean, std)):
            return None
        out.update(mean=[float(x) for x in mean], std=[float(x) for x in std])
        if min(out["std"]) <= 0:
            return None
    else:
        out.update(mean=[0.0] * 3, std=[1.0] * 3)
    return out


def crop_offsets_differ(size: int, crop: int) -> bool:
    """Whether a center ``crop`` of a ``size`` image starts a pixel apart in ours and in transformers': torchvision
    rounds (size - crop) / 2 half to even, transformers' processors round it down (size 35, crop 32: 2 and 1)."""
    return round((size - crop) / 2) != (size - crop) // 2


def preprocess_to_hf(pre: Preprocess) -> dict[str, Any] | None:
    """A :class:`Preprocess` -> a Hugging Face ``preprocessor_config.json`` (``BeitImageProcessor``), the inverse of
    :func:`preprocess_from_hf`; None for ``grayscale`` (the BEiT processor has no gray conversion).

    ``resize="full"``: the whole image to ``img_size`` squared, as ours. ``resize="crop"``: both sides to
    ``img_size / crop_pct`` then the center ``img_size`` crop (BEiT's processor resizes to a height and width in
    every transformers version, not by the short side): ours for square images, but where
    :func:`crop_offsets_differ` (its crop starts a pixel before ours); for others the processor squashes the image
    before its crop where ours keeps the aspect ratio.
    """
    if pre.grayscale:
        return None
    out: dict[str, Any] = {
        "image_processor_type": "BeitImageProcessor", "do_resize": True,
        "resample": {v: k for k, v in _PIL_RESAMPLE.items()}.get(pre.interpolation, 3),
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [float(x) for x in pre.mean], "image_std": [float(x) for x in pre.std],
        "do_reduce_labels": False,
    }
    side = int(pre.img_size)
    if pre.resize == "full":
        out.update(size={"height": side, "width": side}, do_center_crop=False)
    else:
        resized = eval_resize_size(side, pre.crop_pct)
        out.update(size={"height": resized, "width": resized}, do_center_crop=True,
                   crop_size={"height": side, "width": side})
    return out


def config_to_hf(cfg: BeitConfig) -> dict[str, Any]:
    """BeitConfig -> a Hugging Face ``config.json`` that transformers' Beit classes load."""
    head_dim = cfg.attn_head_dim or cfg.embed_dim // cfg.num_heads
    if head_dim * cfg.num_heads != cfg.embed_dim:
        raise ValueError("Hugging Face BEiT needs num_heads * head_dim == embed_dim")
    if cfg.grid[0] != cfg.grid[1]:  # transformers reshapes the position tables as a square grid
        raise ValueError(f"Hugging Face BEiT needs a square patch grid, this model's is {cfg.grid[0]}x{cfg.grid[1]} "
                         f"(img_size {cfg.img_size}): transformers would compute other outputs (relative position "
                         "table) or fail (position embedding); export to timm or our format instead")
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
