"""What every task config shares: the backbone part, ``model_overrides`` (a dict of ``BeitConfig`` fields), and
telling which task a training checkpoint belongs to.

The backbone's source is the task's model key (``model`` for ``finetune`` / ``linprobe``, ``model.init``
(checkpoint) or ``model.arch`` / ``model.name`` (preset) for ``segment`` / ``layout`` / ``pretrain``);
``model_overrides`` change the built model the same way everywhere (``beit.build_backbone``), e.g.
``model_overrides.attn_impl=eager``. Keys a task sets itself are refused with the key to use instead.

A training checkpoint (``last.pt`` / ``best.pt``) stores its run's whole config, and newer ones the name of their
task (``"task"``); :func:`checkpoint_task` reads the task from the config's shape, for checkpoints without the
name, so that ``beit segment eval`` given a fine-tuning checkpoint says so in one line, naming the commands that
take it (:data:`TASK_COMMANDS`; :func:`task_config_from_checkpoint`, and ``beit evaluate`` / ``beit predict``)
instead of failing to merge one schema into another.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..engine.config import ConfigError
from ..engine.rundir import check_checkpoint_task
from ..engine.trainer import TASK_NAMES
from ..interop.backbone import check_override_keys, is_preset
from ..interop.load import is_remote_source
from ..models.config import PRESETS

__all__ = ["TASK_COMMANDS", "TASK_KINDS", "check_model_overrides", "check_model_source", "check_task_of",
           "checkpoint_task", "stored_task", "task_config_from_checkpoint"]

# what checkpoint_task answers: the names the trainer records in a checkpoint's "task"
TASK_KINDS = tuple(TASK_NAMES.values())

#: what takes a checkpoint of each task: the end of the line that refuses it anywhere else ("<ckpt> is a
#: segmentation checkpoint, not a classification one: beit segment eval and beit segment predict take it")
TASK_COMMANDS = {
    "pre-training": "beit finetune takes it as model=..., beit visualize shows its predictions",
    "classification": "beit evaluate and beit predict take it",
    "linear probing": "it holds the probe's linear heads, no model of their own; beit linprobe --resume continues it",
    "segmentation": "beit segment eval and beit segment predict take it",
    "layout detection": "beit layout eval and beit layout predict take it",
    "dVAE tokenizer": "beit tokenizer eval and beit tokenizer encode take the dvae.safetensors its training wrote",
}


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


def check_model_source(source: Any, key: str = "model") -> None:
    """A backbone source that is no preset, no existing file or folder, no URL and no Hugging Face Hub id
    (``owner/name``) is a ConfigError naming ``key`` and the presets, before any data is read (a misspelt preset
    or path failed as ``checkpoint not found: ...`` once the training set had been listed and decoded)."""
    if not isinstance(source, str) or not source or is_preset(source) or Path(source).expanduser().exists():
        return
    if is_remote_source(source):
        return  # fetched (or refused) by beit.load_model
    raise ConfigError(key, f"no preset and no checkpoint file or folder named {source!r}: presets are "
                           f"{', '.join(sorted(PRESETS))} (from scratch); else a checkpoint file or folder, a Hugging "
                           "Face Hub id (owner/name) or a URL")


def checkpoint_task(config: Any) -> str | None:
    """The task (one of :data:`TASK_KINDS`) whose run config ``config`` is (the ``"config"`` dict of a training
    checkpoint), read from the keys only that task's config has; None when it cannot tell (no config, or one
    of none of them)."""
    if not isinstance(config, Mapping) or not config:
        return None
    model = config.get("model")
    if isinstance(model, str):  # finetune / linprobe: `model` is the checkpoint or preset name
        return "linear probing" if "layers" in config and "pool" in config else "classification"
    model = model if isinstance(model, Mapping) else {}
    if isinstance(config.get("tokenizer"), Mapping):
        return "pre-training"
    if isinstance(config.get("test"), Mapping) or "aux_channels" in model:
        return "segmentation"
    if "fpn_channels" in model or "box_head_dim" in model or "eval_batch_size" in config:
        return "layout detection"
    if "data_dir" in config and "codebook_dim" in model:
        return "dVAE tokenizer"
    return None


def stored_task(state: Mapping[str, Any]) -> str | None:
    """The task (one of :data:`TASK_KINDS`) of the training checkpoint whose dict is ``state``: the one it records
    (``state["task"]``) when that is one of :data:`TASK_KINDS`, else the one its stored config shows
    (:func:`checkpoint_task`); None when neither tells. What ``beit.engine.rundir.check_checkpoint_task`` is given
    as the checkpoint's task by the commands that read one."""
    found = state.get("task")
    return found if found in TASK_KINDS else checkpoint_task(state.get("config"))


def check_task_of(state: Mapping[str, Any], task: str, path: str | Path) -> None:
    """Refuse the training checkpoint ``path`` (``state``: its dict) when its :func:`stored_task` is another than
    ``task``, in one line ending with the commands that take it (:data:`TASK_COMMANDS`).

    Raises:
        TaskMismatchError (a ValueError): ``"<path> is a <its task> checkpoint, not a <task> one: <commands>"``.
    """
    found = stored_task(state)
    check_checkpoint_task(found, task, source=path, fix=TASK_COMMANDS.get(found or "", ""))


def task_config_from_checkpoint(schema: Any, task: str, path: str | Path, config_file: str | Path | None = None,
                                overrides: list[str] | None = None) -> tuple[Any, dict[str, Any]]:
    """The run config stored in the training checkpoint ``path`` of ``task`` (a YAML file and ``key=value``
    overrides on top, read into ``schema``, validated) and the checkpoint's full state dict.

    As ``beit.engine.checkpoint.config_from_checkpoint``, after checking that the checkpoint is one of
    ``task``'s (``beit.engine.rundir.check_checkpoint_task`` of its :func:`stored_task`).

    Raises:
        FileNotFoundError: no such file or folder.
        ValueError: not a beit training checkpoint.
        TaskMismatchError (a ValueError): a checkpoint of another task (naming both tasks and, from
            :data:`TASK_COMMANDS`, the commands that take it).
        ConfigError: the stored config does not fit ``schema``, or an override is wrong (naming the key).
    """
    from ..engine.checkpoint import load_checkpoint
    from ..engine.config import stored_config

    state = load_checkpoint(path)
    check_task_of(state, task, path)
    return stored_config(schema, state.get("config") or {}, config_file, overrides, source=str(path)), state
