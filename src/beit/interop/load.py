"""``load_model`` / ``save_model``: every public BEiT checkpoint in, our format out.

Loading never runs code from a file: safetensors, or ``torch.load(weights_only=True)``.
Errors name the file and the first tensor that does not fit, instead of a stack trace from deep
inside ``load_state_dict``.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._text import ALIKE_ON_EVERY_RANK, first_few
from ..data.transforms import eval_resize_size
from ..models.beit import Beit
from ..models.config import BeitConfig, Preprocess
from ..models.relpos import resize_table
from . import formats
from .infer import (
    config_from_hf,
    config_to_hf,
    crop_offsets_differ,
    infer_config,
    preprocess_from_hf,
    preprocess_to_hf,
)

OUR_FORMAT = "beit"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pth", "model.pt")
SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")  # Hugging Face's sharded weights


log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as BEiT, or does not fit the requested model."""


# ---------------------------------------------------------------------------- reading files
def read_torch_file(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``: never runs code from the file.

    A damaged, truncated or code-carrying file is one ``ValueError`` naming the file and the cause in words
    (torch's own messages name neither, and advise ``weights_only=False``, which would run the file's code:
    that advice is never passed on). Missing files and permission errors propagate as they are.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as e:  # noqa: BLE001 - RuntimeError (bad zip), UnpicklingError (code / garbage), EOFError
        if isinstance(e, pickle.UnpicklingError):
            found = re.search(r"GLOBAL ([\w.]+)", str(e))
            detail = ("not a file of tensors, or one that needs code to load"
                      + (f" ({found.group(1)})" if found else "") + ": refused, beit never runs code from a file")
        else:
            first = (str(e).strip().splitlines() or [""])[0]
            first = re.split(r"(?<=\.)\s|\s(?=Re-running|You can|Please)", first)[0][:160]
            detail = first or "unreadable"
        raise ValueError(f"{path}: not a readable checkpoint, damaged or truncated? ({type(e).__name__}: "
                         f"{detail})") from None


def _read_tensors(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix != ".safetensors":
        try:
            return read_torch_file(path)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    try:
        from safetensors.torch import load_file

        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file
        raise CheckpointError(f"{path}: not a readable safetensors file, damaged or truncated? "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})") from None


def _read_shards(index: Path) -> dict[str, Any]:
    """The tensors of a Hugging Face sharded checkpoint (``save_pretrained`` with ``max_shard_size``): its
    ``*.index.json`` maps each tensor to a shard file beside it.

    Raises CheckpointError: an unreadable index, or a shard it names that is missing or outside the folder.
    """
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index}: not a readable shard index ({type(e).__name__}: {e})") from None
    out: dict[str, Any] = {}
    for shard in shards:
        if not isinstance(shard, str) or Path(shard).name != shard:
            raise CheckpointError(f"{index}: names a shard that is not a file beside it: {shard!r}")
        if not (index.parent / shard).is_file():  # a folder of that name: IsADirectoryError, in a traceback
            raise CheckpointError(f"{index}: its shard {shard} is missing from {index.parent}")
        out.update(_read_tensors(index.parent / shard))
    return out


_URL = re.compile(r"^(https?|file)://")  # what load_model downloads with torch.hub (else: a Hub id)


def is_remote_source(text: str) -> bool:
    """Whether ``text`` names what :func:`load_model` fetches when no local file or folder has that name: a URL
    (``http(s)://``, ``file://``) or a Hugging Face Hub id (``owner/name``)."""
    return bool(_URL.match(text) or re.match(r"^[\w.-]+/[\w.-]+$", text))


def _resolve_remote(source: str) -> Path:
    """A Hugging Face Hub id or an http(s)/file URL -> a local path (downloaded once into the cache)."""
    if _URL.match(source):
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        cache.mkdir(parents=True, exist_ok=True)
        dst = cache / os.path.basename(source.split("?")[0])
        if not dst.exists():
            torch.hub.download_url_to_file(source, str(dst), progress=True)
        return dst
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(
            f"{source!r} is not a local path; to fetch it from the Hugging Face Hub install huggingface_hub "
            "(pip install 'beit[hub]')"
        ) from None
    try:
        return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.bin"]))
    except Exception as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]  # huggingface_hub's messages run over lines
        owner = source.split("/")[0]
        local = f" ({owner}/ is a folder here: a misspelt path?)" if Path(owner).is_dir() else ""
        raise CheckpointError(f"{source!r}: no such local file or folder{local}, and it could not be fetched as a "
                              f"Hugging Face Hub id ({why})") from None


def _valid_hints(raw: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Keep the config-file values the loader uses only when they have a usable type; warn about the rest."""
    checks = {
        "img_size": lambda v: (isinstance(v, int) and v > 0) or (
            isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(i, int) and i > 0 for i in v)),
        "num_heads": lambda v: isinstance(v, int) and v > 0,
        "layer_norm_eps": lambda v: isinstance(v, (int, float)) and 0 < v < 1,
        "mlp_ratio": lambda v: isinstance(v, (int, float)) and v > 0,
        "extra": lambda v: isinstance(v, dict),
    }
    out: dict[str, Any] = {}
    for k, v in raw.items():
        if k in checks and not checks[k](v):
            log.warning("%s: ignoring %s=%r (not a valid value)", where, k, v, extra=ALIKE_ON_EVERY_RANK)
            continue
        out[k] = tuple(v) if k == "img_size" and isinstance(v, list) else v
    return out


def _read_config_json(cfg_file: Path) -> dict[str, Any]:
    """Hints from a ``config.json`` next to the weights; a damaged one is reported and ignored, never fatal.

    Our format's full config is kept only when it builds a valid ``BeitConfig``; otherwise its usable
    values become hints and the architecture is read from the tensors.
    """
    try:
        meta = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        log.warning("%s: unreadable (%s); the architecture is read from the tensors", cfg_file, e,
                    extra=ALIKE_ON_EVERY_RANK)
        return {}
    if not isinstance(meta, dict):
        log.warning("%s: holds a %s, not an object; ignored", cfg_file, type(meta).__name__, extra=ALIKE_ON_EVERY_RANK)
        return {}
    if meta.get("format") == OUR_FORMAT:
        cfg = meta.get("config")
        try:
            if not isinstance(cfg, dict):
                raise ValueError(f"'config' is {type(cfg).__name__}, not an object")
            BeitConfig.from_dict(cfg)
            return meta
        except (TypeError, ValueError) as e:
            log.warning("%s: damaged BEiT config (%s); the architecture is read from the tensors", cfg_file, e,
                        extra=ALIKE_ON_EVERY_RANK)
            return _valid_hints(cfg if isinstance(cfg, dict) else {}, str(cfg_file))
    try:
        hints = config_from_hf(meta)
    except (TypeError, ValueError, AttributeError, KeyError) as e:
        log.warning("%s: damaged Hugging Face config (%s); the architecture is read from the tensors", cfg_file, e,
                    extra=ALIKE_ON_EVERY_RANK)
        return {}
    return _valid_hints(hints, str(cfg_file))


def _read_hf_preprocessor(pp_file: Path) -> dict[str, Any] | None:
    """The eval preprocessing of a Hugging Face ``preprocessor_config.json`` (as :func:`preprocess_from_hf`);
    None, with a warning, when it is unreadable or describes an input our eval transforms do not make. A file
    without ``size`` gives no ``img_size`` (the model's is taken), with a warning.

    Raises CheckpointError naming the file and the field for a ``size`` / ``crop_size`` of no shape an image
    processor takes (transformers refuses such a file too).
    """
    try:
        meta = json.loads(pp_file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        log.warning("%s: unreadable (%s); ignored", pp_file, e, extra=ALIKE_ON_EVERY_RANK)
        return None
    try:
        pre = preprocess_from_hf(meta) if isinstance(meta, dict) else None
    except ValueError as e:
        raise CheckpointError(f"{pp_file}: {e}") from None
    except TypeError as e:  # e.g. an unhashable resample
        log.warning("%s: unreadable (%s); ignored", pp_file, e, extra=ALIKE_ON_EVERY_RANK)
        return None
    if pre is None:
        log.warning("%s: not a preprocessing beit reproduces; ignored (an ImageNet-style crop is used)", pp_file,
                    extra=ALIKE_ON_EVERY_RANK)
    elif "img_size" not in pre:
        how = ("the whole image (do_center_crop false)" if pre["resize"] == "full" else
               f"a center crop ({'its crop_pct ' + str(pre['crop_pct']) if pre['crop_pct'] else 'beit default'})")
        log.warning("%s: no 'size': the model's image size is taken, %s; its mean, std and resample are used",
                    pp_file, how, extra=ALIKE_ON_EVERY_RANK)
    elif pre["resize"] == "crop" and crop_offsets_differ(eval_resize_size(pre["img_size"], pre["crop_pct"]),
                                                         pre["img_size"]):
        log.warning("%s: its center crop starts a pixel before ours (transformers rounds the margin down): beit's "
                    "pixels, and logits, differ from transformers' by that shift", pp_file, extra=ALIKE_ON_EVERY_RANK)
    return pre


# transformers classes of the BEiT family: same tensors as Beit* under another top-level name
_HF_FAMILY_PREFIXES = {"data2vec_vision.": "beit."}
# extra modules of BEiT relatives that a BEiT encoder does not use: dropped with a note
_EXTRA_MODULES = {
    "cls_pt_layers.": "BEiT v2 patch-aggregation layers (a pre-training-only head on the cls token)",
    "cls_pt_norm.": "BEiT v2 patch-aggregation norm (pre-training only)",
    "cls_pt_lm_head.": "BEiT v2 patch-aggregation lm head (pre-training only)",
}


def _read(source: str | os.PathLike | Mapping) -> tuple[dict[str, torch.Tensor], dict[str, Any], str, list[str]]:
    """``read_checkpoint`` plus the names of the tensors that were left out (not part of a BEiT encoder)."""
    hints: dict[str, Any] = {}
    if isinstance(source, Mapping):
        raw, name = dict(source), "<state dict>"
    else:
        path = Path(source).expanduser()
        text = str(source)
        if not path.exists():
            if not is_remote_source(text):
                raise FileNotFoundError(f"checkpoint not found: {text}")
            path = _resolve_remote(text)
        name = str(path)
        if path.is_dir():
            cfg_file = path / "config.json"
            if cfg_file.exists():
                hints = _read_config_json(cfg_file)
            pp_file = path / "preprocessor_config.json"  # a Hugging Face model's eval preprocessing
            if pp_file.exists() and "preprocess" not in hints:
                pre = _read_hf_preprocessor(pp_file)
                if pre is not None:
                    hints["preprocess"] = pre
            weights = next((path / f for f in WEIGHT_FILES if (path / f).exists()), None)
            index = next((path / f for f in SHARD_INDEXES if (path / f).exists()), None)
            if weights is None and index is None:
                raise CheckpointError(f"{path}: no weights file (looked for {', '.join(WEIGHT_FILES + SHARD_INDEXES)})")
            path, name = (weights, str(weights)) if weights is not None else (index, str(index))
        raw = _read_shards(path) if path.name in SHARD_INDEXES else _read_tensors(path)
        if not isinstance(raw, Mapping):
            raise CheckpointError(f"{name}: holds a {type(raw).__name__}, not a state dict")
    sd, prefix, left_out = formats.locate(raw)
    if prefix:
        log.info("%s: BEiT encoder found under %r", name, prefix)
    for old, new in _HF_FAMILY_PREFIXES.items():
        if any(k.startswith(old) for k in sd):
            sd = {(new + k[len(old):] if k.startswith(old) else k): v for k, v in sd.items()}
    for extra, what in _EXTRA_MODULES.items():
        dropped = [k for k in sd if k.startswith(extra)]
        if dropped:
            log.info("%s: dropped %d tensors of the %s (%s*)", name, len(dropped), what, extra)
            sd = {k: v for k, v in sd.items() if not k.startswith(extra)}
    kind = formats.detect(sd)
    if kind == "hf":
        try:
            sd = formats.from_hf(sd)
        except ValueError as e:
            raise CheckpointError(f"{name}: {e}") from None
        hints.setdefault("layer_norm_eps", 1e-12)  # transformers' BeitConfig default, when no config.json
    elif kind == "unknown":
        if any(re.match(r"blocks\.\d+\.attn\.", k) for k in sd):
            raise CheckpointError(f"{name}: lacks 'patch_embed.proj.weight', which tells the width, input channels "
                                  "and patch size; a BEiT encoder cannot be built without it")
        raise CheckpointError(f"{name}: not a BEiT checkpoint (keys: {first_few(list(sd), 5) or 'no tensors'})")
    unmapped = [k for k in sd if k.startswith("__unmapped__.")]
    if unmapped:
        left_out += [k[len("__unmapped__."):] for k in unmapped]
        sd = {k: v for k, v in sd.items() if not k.startswith("__unmapped__.")}
    if left_out:
        log.info("%s: left out %d tensors that are not part of the BEiT encoder: %s", name, len(left_out),
                 first_few(left_out, 6))
    return formats.drop_derived(sd), hints, name, left_out


def read_checkpoint(source: str | os.PathLike | Mapping) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """Any supported source -> (state dict in our layout, config hints, a name for messages).

    The encoder is found wherever it sits in the file (wrappers, ``backbone.``-style prefixes, DDP /
    compile segments); a damaged ``config.json`` is reported in the log and ignored. Raises
    FileNotFoundError for a missing path and CheckpointError (naming the file) for anything unreadable.
    """
    sd, hints, name, _ = _read(source)
    return sd, hints, name


# ---------------------------------------------------------------------------- adapting
# the fields a checkpoint's tensors fix; an override of one of them cannot apply to its weights (the others are
# adapted: img_size resamples the position tables, heads are replaced or left out)
SHAPE_FIELDS = ("patch_size", "embed_dim", "depth", "num_heads", "attn_head_dim", "mlp_ratio", "in_chans", "qkv_bias")

MIM_HEAD = ("mask_token", "lm_head.weight", "lm_head.bias", "head_norm.weight", "head_norm.bias")
CLS_HEAD = ("head.weight", "head.bias")
POOL_NORM = ("fc_norm.weight", "fc_norm.bias")


def adapt_state_dict(sd: dict[str, torch.Tensor], src: BeitConfig, dst: BeitConfig) -> dict[str, torch.Tensor]:
    """Make a checkpoint fit a (possibly different) target config: rel-pos layout and size, pos-embed, heads.

    ``sd``: a state dict in our layout of a model of ``src``; returns a new dict for a model of ``dst`` (``sd`` is
    not changed). Raises ValueError (from :func:`resize_table`) when a relative position table cannot be resampled.
    The tensors it leaves out or loads from another key, and why: :func:`_adapt_and_explain`.
    """
    return _adapt_and_explain(sd, src, dst)[0]


# why a mean-pooling model's fc_norm starts fresh when the checkpoint has a final norm but no fc_norm
FRESH_FC_NORM = ("a fresh fc_norm: the checkpoint has none, and its final norm (trained on unpooled tokens) is not "
                 "copied into it, as in unilm's run_class_finetuning.py and timm")


def _adapt_and_explain(sd: Mapping[str, torch.Tensor], src: BeitConfig, dst: BeitConfig
                       ) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, str]]:
    """:func:`adapt_state_dict`, plus what the loading report says of it: (adapted, dropped, moved).

    ``dropped``: the tensors of ``sd`` it left out on purpose -> why (in ``sd``'s order); ``moved``: the tensors of
    the result loaded from another key of ``sd`` -> from which and why (a shared rel-pos table copied into every
    block). The one place of the adaptation rules: the loading report names what was not loaded, as expected, and
    what was loaded from another key, from this function's account, never from a second copy of its rules.

    A checkpoint with a final ``norm`` but no ``fc_norm`` (a MIM pre-training model, a cls-token classifier) loaded
    into a mean-pooling model (whose ``norm`` is an Identity) keeps no final norm: its ``norm`` is dropped and the
    model's ``fc_norm`` starts fresh (LayerNorm 1, 0). This is what the official fine-tuning does (microsoft/unilm
    ``beit/run_class_finetuning.py`` loads the checkpoint as it is: ``fc_norm`` is not initialised from it and
    ``norm`` is not used), and timm's ``checkpoint_filter_fn`` (``timm/models/beit.py``) maps neither.
    Raises ValueError (from :func:`resize_table`) when a relative position table cannot be resampled.
    """
    sd = dict(sd)
    order = list(sd)
    dropped: dict[str, str] = {}
    moved: dict[str, str] = {}

    def drop(keys: tuple[str, ...], why: str) -> None:
        for k in keys:
            if k in sd:
                del sd[k]
                dropped[k] = why

    shared = "rel_pos_bias.relative_position_bias_table"
    if dst.use_rel_pos_bias and not dst.use_shared_rel_pos_bias and src.use_shared_rel_pos_bias and shared in sd:
        per_layer = formats.shared_to_per_layer(sd, src.depth)
        moved.update(dict.fromkeys(
            [k for k in per_layer if k not in sd],
            f"copies of the shared pre-training table {shared}, one per block, as in unilm's run_class_finetuning.py"))
        sd = per_layer
    for k in [k for k in sd if k.endswith("relative_position_bias_table")]:
        if src.grid != dst.grid:
            sd[k] = resize_table(sd[k], src.grid, dst.grid)
    if "pos_embed" in sd and src.grid != dst.grid:
        pos = sd["pos_embed"]
        grid = pos[:, 1:].reshape(1, *src.grid, -1).permute(0, 3, 1, 2).float()
        grid = torch.nn.functional.interpolate(grid, size=dst.grid, mode="bicubic", align_corners=False)
        sd["pos_embed"] = torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2).to(pos.dtype)], dim=1)
    if dst.head != "mim":
        drop(MIM_HEAD, f"the MIM pre-training head: a model with head={dst.head!r} has none")
    if dst.head != "cls":
        drop(CLS_HEAD, f"the classification head: a model with head={dst.head!r} has none")
    elif src.head == "cls" and src.num_classes != dst.num_classes:  # a new head, as when fine-tuning on new labels
        drop(CLS_HEAD, f"the checkpoint's {src.num_classes}-class head: a new {dst.num_classes}-class head replaces it")
    if _fresh_fc_norm(sd, dst):
        drop(("norm.weight", "norm.bias"), "the final norm: a mean-pooling model has none (its fc_norm starts "
                                           "fresh, as in unilm's run_class_finetuning.py and timm)")
    return sd, {k: dropped[k] for k in order if k in dropped}, moved


def _fresh_fc_norm(sd: Mapping[str, torch.Tensor], dst: BeitConfig) -> bool:
    """Whether a model of ``dst`` pools with an ``fc_norm`` that ``sd`` lacks while ``sd`` has a final ``norm``."""
    return (dst.use_mean_pooling and dst.head != "mim" and "fc_norm.weight" not in sd
            and ("norm.weight" in sd or "norm.bias" in sd))


def _by_reason(why: Mapping[str, str], names: list[str]) -> dict[str, list[str]]:
    """``names`` grouped by their reason in ``why`` (in order of first appearance)."""
    groups: dict[str, list[str]] = {}
    for k in names:
        groups.setdefault(why[k], []).append(k)
    return groups


def _fill_model(model: Beit, sd: dict[str, torch.Tensor], name: str, allow_missing: Mapping[str, str], strict: bool,
                dropped: Mapping[str, str] | None = None, shape_hint: str = "",
                moved: Mapping[str, str] | None = None) -> None:
    """Copy what fits; report (or, ``strict``, refuse) tensors without a place and tensors not in the file.

    ``allow_missing``: model tensors the file is expected to lack (a new head, ...) -> why, said at INFO;
    ``dropped``: checkpoint tensors left out on purpose before (the MIM head of a probe, ...) -> why, said at INFO;
    ``moved``: tensors of ``sd`` taken from another key of the file (a shared table copied into every block)
    -> from which and why, said at INFO.
    Every tensor not loaded is named (a few, then ``and N more``), once. A tensor of the wrong shape is always an
    error (CheckpointError): it means the architecture was read wrongly; so are, ``strict``, a tensor without a
    place and a lacking tensor that is not in ``allow_missing``.
    """
    own = model.state_dict()
    for k, v in sd.items():
        if k in own and own[k].shape != v.shape:
            raise CheckpointError(
                f"{name}: tensor {k!r} has shape {tuple(v.shape)} but the requested model needs "
                f"{tuple(own[k].shape)} ({shape_hint or 'check the overrides you passed'})"
            )
    dropped = dropped or {}
    unused = [k for k in sd if k not in own]
    missing = [k for k in own if k not in sd and k not in allow_missing]
    new = [k for k in own if k not in sd and k in allow_missing]
    if strict and unused:
        raise CheckpointError(f"{name}: tensor {unused[0]!r} {tuple(sd[unused[0]].shape)} has no place in the "
                              f"requested model ({len(unused)} such tensors; strict=False drops them)")
    if strict and missing:
        raise CheckpointError(f"{name}: checkpoint lacks {len(missing)} tensors the model needs: "
                              f"{first_few(missing, 6)} (strict=False leaves them at their initial values)")
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    not_loaded = len(dropped) + len(unused)
    log.info("%s: loaded %d of the model's %d tensors%s", name, sum(k in own for k in sd), len(own),
             f"; {not_loaded} of the checkpoint's tensors not loaded (named below)" if not_loaded else "")
    for why, names in _by_reason(moved or {}, [k for k in moved or {} if k in own]).items():
        log.info("%s: %d tensors loaded from another key (%s): %s", name, len(names), why, first_few(names, 6))
    for why, names in _by_reason(dropped, list(dropped)).items():
        log.info("%s: %d tensors not loaded, as expected (%s): %s", name, len(names), why, first_few(names, 6))
    for why, names in _by_reason(allow_missing, new).items():
        log.info("%s: %d tensors left at their initial values, as expected (%s): %s", name, len(names), why,
                 first_few(names, 6))
    if unused:
        log.warning("%s: dropped %d tensors that have no place in the model: %s (not expected)", name, len(unused),
                    first_few(unused, 6), extra=ALIKE_ON_EVERY_RANK)
    if missing:
        log.warning("%s: the checkpoint lacks %d tensors; left at their initial values: %s (not expected)",
                    name, len(missing), first_few(missing, 6), extra=ALIKE_ON_EVERY_RANK)


def load_model(source: str | os.PathLike | Mapping, strict: bool = False, **overrides: Any) -> nn.Module:
    """Load any BEiT checkpoint (official, timm, Hugging Face, ours; file, directory, Hub id, URL or dict).

    The architecture is read from the tensors (and a config.json if present); ``overrides`` change it:
    ``img_size=384`` resamples position tables, ``num_classes=10`` puts on a new head,
    ``use_rel_pos_bias=True, use_shared_rel_pos_bias=False`` turns a pre-training checkpoint into a
    fine-tuning model, ``head="cls"`` makes a classifier from a MIM checkpoint. Returns the model in eval mode.

    Checkpoints as users bring them load: the encoder is found inside larger models' files
    (``backbone.``, ``encoder.``, ``model.``, ``module.``, ``state_dict``, ...) and the rest is left out;
    a partial state dict loads what it has and leaves the rest at initialisation. Both are logged
    (logger ``beit.interop.load``: INFO what was taken, what was loaded from another key (a shared table copied
    into every block), and what was not as expected, e.g. the MIM head of a pre-training checkpoint loaded with
    ``head="none"``, or its final norm loaded into a mean-pooling classifier, whose ``fc_norm`` starts fresh as in
    the official fine-tuning; WARNING what was dropped or lacking unexpectedly), each tensor not loaded named
    (the first few, then ``and N more``).
    ``strict=True`` turns a lacking tensor, or one with no place in the model, into a CheckpointError.
    The family loads too: transformers ``Beit*`` and ``Data2VecVision*``, DiT (``microsoft/dit-*``), BEiT v2
    (its pre-training-only ``cls_pt_layers`` are dropped with a note). Raises CheckpointError (one line
    naming the file) when the file cannot be read or the architecture cannot be told, or a Hugging Face
    ``preprocessor_config.json`` has a ``size`` / ``crop_size`` of no shape an image processor takes (one without
    ``size`` is read at the model's image size, with a warning); FileNotFoundError.
    """
    sd, hints, name, _ = _read(source)
    src = source_config_of(sd, hints, name, overrides)
    return build_from(sd, name, src, strict, overrides)


def source_config_of(sd: Mapping[str, torch.Tensor], hints: Mapping[str, Any], name: str,
                     overrides: Mapping[str, Any] | None = None) -> BeitConfig:
    """The architecture a checkpoint holds (what ``load_model`` builds without overrides).

    Our format's stored config when present; otherwise read from the tensors, the config file's hints
    filling in what tensors cannot tell (then ``num_heads`` / ``img_size`` from ``overrides``).
    Raises CheckpointError naming ``name`` when it cannot be told.
    """
    overrides = overrides or {}
    try:
        if hints.get("format") == OUR_FORMAT:
            src = BeitConfig.from_dict(hints["config"])
        else:  # tensors first; the config file, then the caller, fill in what tensors cannot tell
            src = infer_config(sd, {**{k: overrides[k] for k in ("num_heads", "img_size") if k in overrides}, **hints})
    except ValueError as e:
        raise CheckpointError(f"{name}: {e}") from None
    if isinstance(hints.get("preprocess"), dict) and "preprocess" not in src.extra:
        # img_size left out: a preprocessor_config.json without a size, at the model's (an img_size override's, as
        # load_model(..., img_size=64) builds it, not the checkpoint's)
        try:
            size = (src.replace(img_size=overrides["img_size"]) if "img_size" in overrides else src).img_hw[0]
        except ValueError:  # a bad img_size: build_from says so
            size = src.img_hw[0]
        src = src.replace(extra={**src.extra, "preprocess": {"img_size": size, **hints["preprocess"]}})
    return src


def build_from(sd: dict[str, torch.Tensor], name: str, src: BeitConfig, strict: bool,
               overrides: Mapping[str, Any]) -> Beit:
    """A model of ``src`` changed by ``overrides``, filled with the (adapted) tensors ``sd`` of checkpoint ``name``."""
    try:
        dst = src.replace(**overrides)
    except ValueError as e:
        raise CheckpointError(f"{name}: {e}") from None
    if "class_names" in dst.extra and "extra" not in overrides and (
            dst.head != "cls" or src.head != "cls" or dst.num_classes != src.num_classes):
        # the names label the checkpoint's head; a model without that head must not carry them (export_hf would
        # write 5 labels for a 3-class head, beit predict would refuse the model)
        log.info("%s: its %d class names are left out: they belong to the checkpoint's head, which the model does "
                 "not keep", name, len(dst.extra["class_names"]))
        dst = dst.replace(extra={k: v for k, v in dst.extra.items() if k != "class_names"})
    model = Beit(dst)
    try:
        adapted, dropped, moved = _adapt_and_explain(sd, src, dst)
    except ValueError as e:
        raise CheckpointError(f"{name}: {e}") from None
    allow_missing: dict[str, str] = {}  # model tensors the file is expected to lack -> why
    if dst.use_mean_pooling and dst.head != "mim" and "fc_norm.weight" not in adapted:
        allow_missing.update(dict.fromkeys(POOL_NORM, FRESH_FC_NORM if _fresh_fc_norm(sd, dst) else
                                           "the checkpoint has no pooling norm: a new fc_norm"))
    if dst.head == "cls" and (src.head != "cls" or src.num_classes != dst.num_classes):
        allow_missing.update(dict.fromkeys(CLS_HEAD, f"a new {dst.num_classes}-class head"))
    if dst.head == "mim" and src.head != "mim":
        allow_missing.update(dict.fromkeys(MIM_HEAD, "a new MIM head"))
    if dst.use_abs_pos_emb and not src.use_abs_pos_emb:
        allow_missing["pos_embed"] = "the checkpoint has no absolute position embedding: a new one"
    changed = {k: v for k, v in overrides.items() if k in SHAPE_FIELDS and getattr(src, k, v) != v}
    hint = (f"check the overrides that change the checkpoint's architecture: "
            f"{', '.join(f'{k}={v!r}' for k, v in changed.items())}" if changed else
            "no override changes the checkpoint's architecture: its tensors disagree with the one read from "
            "them (a damaged or hand-edited file, or one of another model)")
    _fill_model(model, adapted, name, allow_missing, strict, dropped, hint, moved)
    return model.eval()



DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _output_folder(directory: str | os.PathLike, what: str) -> Path:
    """``directory`` made (with its parents) for ``what`` to write into; an existing file there is refused in words
    (``mkdir`` said only ``[Errno 17] File exists``)."""
    out = Path(directory).expanduser()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file: {what} writes a folder (model.safetensors + config.json); give the "
                              "path of a folder (it is made if missing)")
    out.mkdir(parents=True, exist_ok=True)
    return out


def save_model(model: nn.Module, directory: str | os.PathLike, dtype: str = "fp32") -> Path:
    """Write ``model.safetensors`` + ``config.json`` (our format; ``load_model`` reads it back).

    ``config.json`` holds ``{"format": "beit", "config": <BeitConfig>, "preprocess": <Preprocess>}``; the
    ``preprocess`` entry (the eval resize / crop / mean / std / interpolation, see
    :class:`beit.models.Preprocess`) is written when the model has one (``model.cfg.extra["preprocess"]``,
    set by ``beit finetune``); ``load_model`` puts it back there.

    ``dtype="bf16"`` halves the file (e.g. to ship an encoder); loading casts back to the model's dtype.

    Raises:
        ValueError: an unknown ``dtype``. TypeError: ``model`` is no :class:`~beit.models.Beit`.
        FileExistsError: ``directory`` is an existing file.
    """
    from safetensors.torch import save

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")

    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    if not isinstance(model, Beit):
        raise TypeError(f"save_model expects a beit.models.Beit, got {type(model).__name__}")
    out = _output_folder(directory, "save_model")
    sd = {k: v.detach().cpu().to(DTYPES[dtype] if v.is_floating_point() else v.dtype).contiguous()
          for k, v in model.state_dict().items()}
    tmp = out / "model.safetensors.tmp"
    tmp.write_bytes(save(sd, metadata={"format": OUR_FORMAT}))  # umask mode (save_file: 0600)
    os.replace(tmp, out / "model.safetensors")
    cfg = model.cfg.to_dict()
    meta: dict[str, Any] = {"format": OUR_FORMAT, "config": cfg}
    if "preprocess" in cfg["extra"]:  # the eval preprocessing sits beside the architecture (timm's pretrained_cfg)
        meta["preprocess"] = Preprocess.from_dict(cfg["extra"].pop("preprocess")).to_dict()
    (out / "config.json").write_text(json.dumps(meta, indent=2))
    return out


def export_timm(model: Beit) -> dict[str, torch.Tensor]:
    """A state dict that timm's ``Beit`` loads strictly (timm keeps our names).

    timm's ``Beit`` has no masked-image-modeling head: a pre-training model's ``mask_token``, ``lm_head`` and
    ``head_norm`` are left out (said in the log), the encoder is kept.
    """
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    left_out = [k for k in sd if k in MIM_HEAD]
    if left_out:
        log.warning("export_timm: left out the MIM pre-training head, which timm's Beit has no place for: %s",
                    first_few(left_out, 6))
    return {k: v for k, v in sd.items() if k not in MIM_HEAD}


def export_hf(model: Beit, directory: str | os.PathLike) -> Path:
    """A Hugging Face model directory (config.json + model.safetensors) that transformers loads, with the model's eval
    preprocessing as ``preprocessor_config.json`` (``AutoImageProcessor.from_pretrained`` and ``pipeline`` read it;
    :func:`beit.interop.infer.preprocess_to_hf`; left out, with a warning, for a grayscale preprocessing).

    Raises ValueError, before anything is written, for a model transformers cannot represent (head dims that do not
    make up the width, a non-square patch grid).
    """
    from safetensors.torch import save

    hf_config = config_to_hf(model.cfg)  # refuses what transformers cannot hold before a file is written
    out = _output_folder(directory, "export_hf")
    sd = formats.to_hf({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
    (out / "model.safetensors").write_bytes(save(sd, metadata={"format": "pt"}))  # umask mode (save_file: 0600)
    (out / "config.json").write_text(json.dumps(hf_config, indent=2))
    processor = preprocess_to_hf(model.cfg.eval_preprocess())
    if processor is None:
        log.warning("export_hf: no preprocessor_config.json: the model's grayscale preprocessing has no Hugging Face "
                    "BeitImageProcessor equivalent (convert images to gray and back to RGB before the processor)")
    else:
        (out / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
        if processor["do_center_crop"] and crop_offsets_differ(processor["size"]["height"],
                                                               processor["crop_size"]["height"]):
            log.warning("export_hf: transformers' center crop of %s from %s px starts a pixel before ours (it rounds "
                        "the margin down): its pixels, and logits, differ from beit predict's; a crop_pct whose "
                        "margin is even matches", processor["crop_size"]["height"], processor["size"]["height"])
    return out
