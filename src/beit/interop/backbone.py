"""``build_backbone``: the one way every task gets its BEiT.

``source`` is a preset name (random init), a ``BeitConfig`` (random init), or a checkpoint that
``beit.load_model`` reads (file, directory, Hugging Face Hub id, URL, or an in-memory state dict).
``overrides`` are ``BeitConfig`` fields. For a checkpoint the shape-defining fields
(:data:`SHAPE_FIELDS`) come from its tensors: an override that disagrees is one clear error, never a
silently re-initialised layer; the other fields (``img_size``, ``drop_path_rate``, ``head``,
``attn_impl``, ...) apply as ``load_model`` applies them (position tables resampled, a new head, ...).

Layering: ``interop`` sits above ``models`` (it reads checkpoints into ``models.Beit``); tasks sit
above both and import this module; ``models`` never imports ``interop``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

from ..models.beit import Beit
from ..models.config import PRESETS, BeitConfig, preset_config
from .load import SHAPE_FIELDS, CheckpointError, _read, build_from, source_config_of

__all__ = ["SHAPE_FIELDS", "build_backbone", "check_overrides_fit", "check_override_keys", "is_preset",
           "load_backbone", "source_config"]

REL_POS_MODES = ("keep", "per_layer")


def is_preset(source: Any) -> bool:
    """True when ``source`` names a preset (``beit.list_models()``), i.e. a from-scratch model."""
    return isinstance(source, str) and source in PRESETS


def check_override_keys(overrides: Mapping[str, Any], key: str = "model_overrides") -> None:
    """Unknown ``BeitConfig`` fields fail early, naming ``<key>.<field>`` and the valid fields.

    Raises ValueError.
    """
    fields = {f.name: f for f in dataclasses.fields(BeitConfig)}
    for k, v in overrides.items():
        if k not in fields:
            raise ValueError(f"{key}.{k}: not a BeitConfig field; valid: {sorted(fields)}")
        kind = str(fields[k].type)
        if not _fits(v, kind):
            raise ValueError(f"{key}.{k}: must be {kind.replace(' | ', ' or ')}, got {v!r}")


def _fits(value: Any, annotation: str) -> bool:
    """``value`` (from YAML or the command line) is of the ``BeitConfig`` field type ``annotation`` (its string:
    ``"int"``, ``"float | None"``, ``"int | tuple[int, int]"``, ...); ints pass as floats, bools only as bools."""
    kinds = {t.strip().split("[")[0] for t in annotation.split("|")}
    if value is None:
        return "None" in kinds
    if isinstance(value, bool):
        return "bool" in kinds
    if isinstance(value, int):
        return bool(kinds & {"int", "float"})
    if isinstance(value, float):
        return "float" in kinds
    if isinstance(value, str):
        return "str" in kinds
    if isinstance(value, Mapping):
        return "dict" in kinds
    if isinstance(value, Sequence):  # a list from YAML (OmegaConf's ListConfig is one too)
        return "tuple" in kinds and all(isinstance(x, int) and not isinstance(x, bool) for x in value)
    return True  # another object set from Python: BeitConfig's own checks judge it


def check_overrides_fit(source: Any, src: BeitConfig, overrides: Mapping[str, Any],
                        key: str = "model_overrides") -> None:
    """Overrides that would change the shape of a checkpoint's tensors are an error that says so.

    ``src`` is the checkpoint's architecture (:func:`source_config`). The architecture of a checkpoint
    comes from its tensors; such keys only describe a from-scratch model. Raises ValueError naming
    ``<key>.<field>``, both values and ``source``.
    """
    for k in SHAPE_FIELDS:
        if k in overrides and overrides[k] != getattr(src, k):
            raise ValueError(
                f"{key}.{k}={overrides[k]!r} but {source} has {k}={getattr(src, k)!r}: a checkpoint's "
                f"architecture comes from its tensors. Remove the key (on the command line {key}={{}} "
                "does not clear keys a YAML file sets: use a config without them, or set them to the "
                "checkpoint's values)")


def source_config(source: str | os.PathLike | Mapping) -> BeitConfig:
    """The architecture of a checkpoint (what ``load_model`` would build without overrides).

    Raises FileNotFoundError / CheckpointError as ``beit.load_model``.
    """
    sd, hints, name, _ = _read(source)
    return source_config_of(sd, hints, name)


def build_backbone(source: str | os.PathLike | Mapping | BeitConfig, *, rel_pos: str = "keep", strict: bool = False,
                   key: str = "model_overrides", **overrides: Any) -> Beit:
    """The BEiT of ``source`` with ``overrides`` (``BeitConfig`` fields), in train mode.

    Args:
        source: a preset name (``beit_base_patch16_224``; random init), a ``BeitConfig`` (random init),
            or a checkpoint ``beit.load_model`` reads: a file, a ``save_model`` directory, a Hub id, a URL,
            or a state dict (any supported layout: ours, official, timm, Hugging Face).
        rel_pos: ``"keep"`` the checkpoint's relative-position scheme, or ``"per_layer"``: a checkpoint
            with any relative-position table gets one table per block (a shared pre-training table is
            copied to every block, as the paper's fine-tuning does); explicit ``use_rel_pos_bias`` /
            ``use_shared_rel_pos_bias`` overrides win. Presets are not affected (their default is per-layer).
        strict: as ``load_model``: a lacking tensor, or one without a place in the model, is an error.
        key: the config key the overrides come from, used in error messages.
        **overrides: ``BeitConfig`` fields, e.g. ``img_size=384, num_classes=10, attn_impl="eager"``.

    Raises:
        ValueError: an unknown field, or (for a checkpoint) a :data:`SHAPE_FIELDS` override that differs
            from the checkpoint's value (``"<key>.embed_dim=64 but <source> has embed_dim=32: ..."``).
        CheckpointError / FileNotFoundError: the checkpoint cannot be read (as ``beit.load_model``).
    """
    return load_backbone(source, rel_pos=rel_pos, strict=strict, key=key, **overrides)[0]


def load_backbone(source: str | os.PathLike | Mapping | BeitConfig, *, rel_pos: str = "keep", strict: bool = False,
                  key: str = "model_overrides", **overrides: Any) -> tuple[Beit, BeitConfig | None]:
    """:func:`build_backbone` plus the checkpoint's own architecture (:func:`source_config`; None for a preset or
    a ``BeitConfig``), from one read of the checkpoint: its loading report (what was found, loaded, left out) is
    logged once, where ``source_config`` then ``build_backbone`` read the file, and said it, twice.

    Raises:
        ValueError / CheckpointError / FileNotFoundError: as :func:`build_backbone`.
    """
    if rel_pos not in REL_POS_MODES:
        raise ValueError(f"rel_pos must be one of {REL_POS_MODES}, got {rel_pos!r}")
    check_override_keys(overrides, key)
    if isinstance(source, BeitConfig):
        return Beit(source.replace(**overrides)).train(), None
    if is_preset(source):
        return Beit(preset_config(str(source), **overrides)).train(), None
    if isinstance(source, str) and not source:
        raise ValueError(f"no backbone source: give a preset name ({', '.join(sorted(PRESETS))}) or a checkpoint")
    sd, hints, name, _ = _read(source)
    src = source_config_of(sd, hints, name, overrides)
    check_overrides_fit(source if not isinstance(source, Mapping) else "the state dict", src, overrides, key)
    over = dict(overrides)
    if rel_pos == "per_layer" and (src.use_shared_rel_pos_bias or src.use_rel_pos_bias):
        over.setdefault("use_rel_pos_bias", True)
        over.setdefault("use_shared_rel_pos_bias", False)
    try:
        return build_from(sd, name, src, strict, over).train(), src
    except CheckpointError:
        raise
    except ValueError as e:
        raise CheckpointError(f"{name}: {e}") from None
