"""Training checkpoints: atomic files, ``last.pt`` / ``best.pt`` / the last N ``step_XXXXXXX.pt``.

A checkpoint is one ``torch.save`` dict that loads with ``torch.load(weights_only=True)``::

    {"format": "beit-train-ckpt", "version": 1, "model": state_dict, "optimizer": state_dict,
     "step": int, "epoch": int, "batch_in_epoch": int, "best": {"metric", "value", "step"} | None,
     "rng": [state of rank 0, state of rank 1, ...], "ema": state_dict | None, "config": dict}

``step``/``epoch``/``batch_in_epoch`` say where training continues: the next optimizer step, and the
epoch and the loader batch it starts at. ``model`` is the plain module's state dict (no ``module.`` /
``_orig_mod.`` prefixes), so ``torch.load(path)["model"]`` loads into ``beit.create_model(...)`` directly.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import distributed as D

__all__ = [
    "FORMAT", "CheckpointManager", "CheckpointMismatchError", "check_state_dict", "find_resume_path",
    "get_rng_state", "load_checkpoint", "load_model_state", "load_optimizer_state", "model_state_dict",
    "optimizer_state_dict", "read_torch_file", "save_checkpoint", "set_rng_state",
]

FORMAT = "beit-train-ckpt"
VERSION = 1
_STEP_RE = re.compile(r"^step_(\d+)\.pt$")


class CheckpointMismatchError(ValueError):
    """The checkpoint was made for a different architecture."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported on some platforms / filesystems
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` atomically: ``name.tmp`` in the same dir, fsync, ``os.replace``.

    A crash mid-write leaves the previous file intact (at worst a stray ``.tmp``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _link_atomic(src: Path, dst: Path) -> None:
    """``dst`` becomes the same file as ``src`` (hard link: no copy, no extra disk), atomically."""
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # filesystem without hard links: copy
        import shutil

        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def read_torch_file(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; a damaged, truncated or code-carrying file is one ``ValueError``
    naming the file (torch's own errors name neither the file nor the cause in words)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as e:  # noqa: BLE001 - RuntimeError (bad zip), UnpicklingError (code / garbage), EOFError
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(f"{path}: not a readable checkpoint, damaged or truncated? ({type(e).__name__}: {first})"
                         ) from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """``torch.load(weights_only=True)`` and check the format marker."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state = read_torch_file(path, map_location)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a beit training checkpoint (no 'format': '{FORMAT}'); "
                         "to initialise a model from plain weights use the model's loading helpers")
    return state


def find_resume_path(resume: str, output_dir: str | Path) -> Path | None:
    """``""`` -> None; ``"auto"`` -> ``output_dir/last.pt`` if it exists; else the given path (must exist)."""
    if not resume:
        return None
    if resume == "auto":
        last = Path(output_dir) / "last.pt"
        return last if last.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"resume={resume!r}: no such checkpoint")
    return path


class CheckpointManager:
    """Saves ``step_XXXXXXX.pt``, links ``last.pt`` (and ``best.pt``) to it, keeps the last N step files."""

    def __init__(self, output_dir: str | Path, keep_last: int = 3):
        self.dir = Path(output_dir)
        self.keep_last = keep_last

    def save(self, state: dict[str, Any], step: int, *, is_best: bool = False) -> Path:
        """Write the checkpoint (call on the main rank only) and return the path of ``last.pt``."""
        self.dir.mkdir(parents=True, exist_ok=True)
        last = self.dir / "last.pt"
        if self.keep_last > 0:
            step_file = self.dir / f"step_{step:07d}.pt"
            save_checkpoint(state, step_file)
            _link_atomic(step_file, last)
        else:
            save_checkpoint(state, last)
        if is_best:
            _link_atomic(last, self.dir / "best.pt")
        self.prune()
        return last

    def step_files(self) -> list[Path]:
        files = [p for p in self.dir.glob("step_*.pt") if _STEP_RE.match(p.name)]
        return sorted(files, key=lambda p: int(_STEP_RE.match(p.name).group(1)))

    def prune(self) -> None:
        files = self.step_files()
        for p in files[:max(len(files) - self.keep_last, 0)]:
            p.unlink(missing_ok=True)  # last.pt / best.pt are separate links and stay


# --- model / optimizer state (plain, DDP, compiled or FSDP2) ---------------------------------------------

def _sd_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full, unprefixed state dict. Under FSDP2 a collective (call on every rank); only rank 0 gets values."""
    model = D.unwrap_model(model)
    if D.is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=_sd_options())
    return model.state_dict()


def optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Optimizer state; under FSDP2 a full dict on CPU on rank 0 (a collective: call on every rank)."""
    model = D.unwrap_model(model)
    if D.is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=_sd_options())
    return optimizer.state_dict()


def check_state_dict(model_sd: dict[str, torch.Tensor], ckpt_sd: dict[str, torch.Tensor],
                     source: str = "checkpoint") -> None:
    """Raise :class:`CheckpointMismatchError` naming ``source`` and the first bad (missing/unexpected/
    mis-shaped) key."""
    for k, v in model_sd.items():
        if k not in ckpt_sd:
            raise CheckpointMismatchError(f"{source}: key '{k}' of the model is missing from the checkpoint "
                                          "(different architecture?)")
        if tuple(ckpt_sd[k].shape) != tuple(v.shape):
            raise CheckpointMismatchError(f"{source}: shape mismatch for '{k}': checkpoint "
                                          f"{tuple(ckpt_sd[k].shape)} vs model {tuple(v.shape)}")
    for k in ckpt_sd:
        if k not in model_sd:
            raise CheckpointMismatchError(f"{source}: unexpected key '{k}' in the checkpoint "
                                          "(different architecture?)")


def load_model_state(model: nn.Module, state_dict: dict[str, torch.Tensor],
                     source: str = "checkpoint") -> None:
    """Load a full state dict into a plain, DDP, compiled or FSDP2 model, after a clear shape check.

    Every rank passes the full dict (each rank reads the file). FSDP2 params are DTensors whose
    ``.shape`` is the global shape, so the check needs no collective.
    """
    model = D.unwrap_model(model)
    check_state_dict(model.state_dict(), state_dict, source)
    if D.is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state_dict, options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(state_dict)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Inverse of :func:`optimizer_state_dict`; every rank passes the full dict."""
    model = D.unwrap_model(model)
    if D.is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


# --- RNG ------------------------------------------------------------------------------------------------

def get_rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain containers (``weights_only``-loadable)."""
    version, mt, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [version, list(mt), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
