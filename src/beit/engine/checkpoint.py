"""Training checkpoints: atomic files, ``last.pt`` / ``best.pt`` / the last N ``step_XXXXXXX.pt``.

A checkpoint is one ``torch.save`` dict that loads with ``torch.load(weights_only=True)``::

    {"format": "beit-train-ckpt", "version": 1, "model": state_dict, "optimizer": state_dict,
     "step": int, "epoch": int, "batch_in_epoch": int, "best": {"metric", "value", "step"} | None,
     "rng": [state of rank 0, state of rank 1, ...], "ema": state_dict | None, "config": dict,
     "task": str | None}

Under FSDP2 a checkpoint is a folder instead (no full gather at every save): ``step_XXXXXXX/`` holds each
rank's shards of the model and optimizer written by ``torch.distributed.checkpoint`` (DCP) plus ``meta.pt``
(the dict above without ``model``/``optimizer``, ``"sharded": True``); ``last`` / ``best`` are symlinks to
such folders. ``load_checkpoint(folder)`` returns the same full dict as for a file (read without a process
group), and a sharded resume reshards onto any number of ranks.

``step``/``epoch``/``batch_in_epoch`` say where training continues: the next optimizer step, and the
epoch and the loader batch it starts at. ``task`` names the task that wrote it (``"pre-training"``,
``"classification"``, ...; absent in checkpoints written before it existed, ``None`` for a bare ``TrainConfig``
run): a resume refuses another task's checkpoint by name. ``model`` is the plain module's state dict (no ``module.`` /
``_orig_mod.`` prefixes), so ``torch.load(path)["model"]`` loads into ``beit.create_model(...)`` directly.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from ..interop.load import read_torch_file
from . import distributed as D
from .config import stored_config

__all__ = [
    "ABANDONED", "FORMAT", "CheckpointManager", "CheckpointMismatchError", "check_state_dict",
    "config_from_checkpoint", "find_resume_path", "recorded_task", "resume_candidates", "step_of",
    "get_rng_state", "load_checkpoint", "load_model_state", "load_optimizer_state", "load_sharded_state",
    "model_state_dict", "optimizer_state_dict", "read_torch_file", "save_checkpoint", "save_sharded_checkpoint",
    "set_rng_state",
]

FORMAT = "beit-train-ckpt"
VERSION = 1
_STEP_RE = re.compile(r"^step_(\d+)\.pt$")
_STEP_DIR_RE = re.compile(r"^step_(\d+)$")
META = "meta.pt"  # inside a sharded checkpoint folder
#: sub-folder of ``output_dir`` where a resume from an older checkpoint moves the later step checkpoints
ABANDONED = "abandoned"


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


def _write_error(e: OSError, path: Path) -> OSError:
    """The same kind of ``OSError`` (same errno), saying which checkpoint could not be written."""
    err = OSError(f"could not write checkpoint {path}: {e}")
    err.errno = e.errno
    return err


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` atomically: ``name.tmp`` in the same dir, fsync, ``os.replace``.

    A crash mid-write leaves the previous file intact (at worst a stray ``.tmp``, which the next run in the
    folder removes). On an error (e.g. a full disk) the ``.tmp`` is deleted and an ``OSError`` with the
    original errno is raised, its message naming ``path`` and the cause.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _remove_quietly(tmp)
        raise _write_error(e, path) from e
    except BaseException:  # e.g. KeyboardInterrupt, or a pickling error: no partial file left behind
        _remove_quietly(tmp)
        raise
    _fsync_dir(path.parent)


def _link_atomic(src: Path, dst: Path) -> None:
    """``dst`` becomes the same file as ``src`` (hard link: no copy, no extra disk), atomically.

    On an error ``dst`` is unchanged, the ``.tmp`` is deleted and an ``OSError`` naming ``dst`` is raised.
    """
    tmp = dst.with_name(dst.name + ".tmp")
    try:
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:  # filesystem without hard links: copy

            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except OSError as e:
        _remove_quietly(tmp)
        raise _write_error(e, dst) from e
    except BaseException:
        _remove_quietly(tmp)
        raise


def _symlink_atomic(target: str, link: Path) -> None:
    """``link`` -> ``target`` (a name in the same folder), replacing any previous link atomically."""
    tmp = link.with_name(link.name + ".tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def config_from_checkpoint(schema: Any, path: str | Path, config_file: str | Path | None = None,
                           overrides: list[str] | None = None) -> tuple[Any, dict[str, Any]]:
    """The run config stored in a training checkpoint (``last.pt`` / ``best.pt`` / an FSDP2 folder) read into
    ``schema`` (+ a YAML file + ``key=value`` overrides), and the checkpoint's full state dict.

    The one loader for "the config stored in a checkpoint" (segmentation and layout eval / predict, ...).
    Raises FileNotFoundError / ValueError (not a checkpoint) as :func:`load_checkpoint`, and ConfigError
    naming the file when its config does not fit ``schema``.
    """
    state = load_checkpoint(path)
    return stored_config(schema, state.get("config") or {}, config_file, overrides, source=str(path)), state


def _not_a_checkpoint_folder(path: Path) -> str:
    """What a folder given as a training checkpoint is instead, and what to pass (it said "checkpoint not found:
    <folder>/meta.pt", the sharded format's file)."""
    found = [n for n in ("last.pt", "best.pt", "last") if (path / n).exists()]
    if found:
        return f"{path} is a run folder, not a checkpoint: pass {' or '.join(str(path / n) for n in found)}"
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return (f"{path} is an exported model folder (config.json + safetensors), not a training checkpoint: "
                "commands that start from a model take it as model=... / model.init=...")
    return f"{path} is a folder without a checkpoint (no {META} of a sharded checkpoint, no last.pt)"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", *,
                    full: bool = True) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` and check the format marker.

    A sharded (FSDP2) checkpoint folder gives the same dict: ``meta.pt`` plus, with ``full=True``, the full
    ``model`` / ``optimizer`` state dicts assembled from all ranks' shards on CPU, without a process group
    (the optimizer state is keyed by parameter name). With ``full=False`` only the metadata is read.
    Raises ``FileNotFoundError`` (missing file or folder) or ``ValueError`` (not a beit checkpoint).
    """
    path = Path(path)
    if path.is_dir():
        if not (path / META).is_file():
            raise FileNotFoundError(_not_a_checkpoint_folder(path))
        meta = load_checkpoint(path / META, map_location)
        if full:
            meta["model"], meta["optimizer"] = _read_full_sharded(path)
        return meta
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state = read_torch_file(path, map_location)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a beit training checkpoint (no 'format': '{FORMAT}'); "
                         "to initialise a model from plain weights use the model's loading helpers")
    return state


def model_weights(state: dict[str, Any], path: str | Path, ema: bool = False) -> dict[str, torch.Tensor]:
    """The weights to evaluate from a training checkpoint's state: its EMA copy (``ema=True``, ``--ema``) or the
    trained model.

    Raises ValueError naming ``path`` when ``ema`` is asked of a run trained without EMA (``train.ema=0``):
    giving the raw weights instead would report the wrong model's numbers under the EMA's name.
    """
    if not ema:
        return state["model"]
    if not state.get("ema"):
        raise ValueError(f"{path}: --ema, but it has no EMA weights (trained with train.ema=0)")
    return state["ema"]


def find_resume_path(resume: str, output_dir: str | Path) -> Path | None:
    """``""`` -> None; ``"auto"`` -> the newer of ``output_dir/last.pt`` and ``output_dir/last`` (a sharded
    FSDP2 folder) if any exists; else the given path (a file or a sharded folder; must exist)."""
    if not resume:
        return None
    if resume == "auto":
        found = [p for p in (Path(output_dir) / "last.pt", Path(output_dir) / "last")
                 if p.is_file() or (p / META).is_file()]
        return max(found, key=lambda p: (p / META if p.is_dir() else p).stat().st_mtime) if found else None
    path = Path(resume)
    if not (path.is_file() or (path / META).is_file()):
        raise FileNotFoundError(f"resume={resume!r}: no such checkpoint")
    return path


def step_of(path: str | Path) -> int | None:
    """The step in a step checkpoint's name (``step_0000042.pt`` or the folder ``step_0000042``), else None."""
    m = _STEP_RE.match(Path(path).name) or _STEP_DIR_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def _is_checkpoint(path: Path) -> bool:
    """A checkpoint file, or a sharded folder (or a link to one) holding ``meta.pt``."""
    return path.is_file() or (path / META).is_file()


def _identity(path: Path) -> tuple[Any, ...]:
    """The same value for two names of one checkpoint: a hard link (``last.pt`` and its step file) or a symlink
    (``last`` and its folder)."""
    try:
        st = path.stat()  # follows symlinks
    except OSError:
        return ("missing", str(path))
    return (st.st_dev, st.st_ino)


def resume_candidates(output_dir: str | Path) -> list[Path]:
    """What ``resume="auto"`` may continue from, in the order to try them: :func:`find_resume_path`'s pick
    (``last.pt`` / ``last``), then the step checkpoints of the folder (files and sharded folders), the newest
    step first, then the other of ``last.pt`` / ``last`` and ``best.pt`` / ``best``; each checkpoint once
    (``last.pt`` and ``best.pt`` are hard links to step files). Without ``last.pt`` / ``last`` (deleted, or the
    run was killed between writing a step checkpoint and linking it) the list starts at the newest step. Empty
    when the folder holds no checkpoint (auto then starts afresh, see ``beit.engine.rundir.prepare_output_dir``)."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    first = find_resume_path("auto", out)
    manager = CheckpointManager(out)
    steps = sorted([p for p in [*manager.step_files(), *manager.step_dirs()] if _is_checkpoint(p)],
                   key=lambda p: step_of(p) or 0, reverse=True)  # a sharded folder without meta.pt is unfinished
    rest = [p for p in (out / "last.pt", out / "last", out / "best.pt", out / "best") if _is_checkpoint(p)]
    seen: set[tuple[Any, ...]] = set()
    found = []
    for p in [*([first] if first is not None else []), *steps, *rest]:
        key = _identity(p)
        if key not in seen:
            seen.add(key)
            found.append(p)
    return found


def recorded_task(output_dir: str | Path) -> tuple[str | None, Path | None]:
    """The task that wrote the run in ``output_dir``, as its checkpoints record it (``"pre-training"``, ...), and
    the checkpoint it was read from: the first of :func:`resume_candidates` that can be read and records one (only
    its metadata is read: a file is memory-mapped, a sharded folder's ``meta.pt``). ``(None, None)`` when no
    checkpoint of the folder records a task (none, unreadable ones, or written before checkpoints recorded it)."""
    for path in resume_candidates(output_dir):
        try:
            state = torch.load(path / META if path.is_dir() else path, map_location="cpu", weights_only=True,
                               mmap=True)
        except Exception:  # noqa: BLE001 - damaged, truncated, not a zip checkpoint: the next one may tell
            continue
        task = state.get("task") if isinstance(state, dict) and state.get("format") == FORMAT else None
        if isinstance(task, str) and task:
            return task, path
    return None, None


def _free_name(folder: Path, name: str, taken: set[str]) -> Path:
    """``folder/name``, or ``folder/<stem>~N<suffix>`` when that exists or is in ``taken`` (never replaces a
    file); the name returned is added to ``taken``."""
    path = folder / name
    stem, suffix = (name[:-3], ".pt") if name.endswith(".pt") else (name, "")
    n = 1
    while path.exists() or path.is_symlink() or path.name in taken:
        n += 1
        path = folder / f"{stem}~{n}{suffix}"
    taken.add(path.name)
    return path


class CheckpointManager:
    """Saves ``step_XXXXXXX.pt``, links ``last.pt`` (and ``best.pt``) to it, keeps the last N step files."""

    def __init__(self, output_dir: str | Path, keep_last: int = 3):
        self.dir = Path(output_dir)
        self.keep_last = keep_last

    def save(self, state: dict[str, Any], step: int, *, is_best: bool = False) -> Path:
        """Write the checkpoint (call on the main rank only) and return the path of ``last.pt``.

        On a write error (e.g. a full disk) the ``OSError`` of the file that failed is raised, naming it;
        ``last.pt`` / ``best.pt`` still point to the previous complete checkpoint and no ``.tmp`` remains.
        """
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

    def save_sharded(self, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict[str, Any], step: int,
                     *, is_best: bool = False) -> Path:
        """FSDP2: write ``step_XXXXXXX/`` through DCP (a collective: call on every rank; each rank writes its
        own shards, nothing is gathered), point ``last`` (and ``best``) at it, keep the last N folders."""
        folder = self.dir / f"step_{step:07d}"
        save_sharded_checkpoint(model, optimizer, meta, folder)
        if D.is_main():
            _symlink_atomic(folder.name, self.dir / "last")
            if is_best:
                _symlink_atomic(folder.name, self.dir / "best")
            self.prune()
        D.barrier()
        return self.dir / "last"

    def path_of(self, step: int, *, sharded: bool = False) -> Path:
        """Where :meth:`save` (or :meth:`save_sharded`) writes the checkpoint of ``step``: ``step_XXXXXXX.pt``
        (``last.pt`` when ``keep_last`` is 0), or the folder ``step_XXXXXXX``."""
        if sharded:
            return self.dir / f"step_{step:07d}"
        return self.dir / (f"step_{step:07d}.pt" if self.keep_last > 0 else "last.pt")

    def set_aside_after(self, step: int, resumed: str | Path | None = None) -> list[Path]:
        """Move the step checkpoints of steps after ``step`` (files and sharded folders) into ``abandoned/``.

        A run resumed from an older checkpoint than the folder's newest leaves those behind as a branch it
        abandoned: they would count toward ``keep_last`` and could be resumed by mistake. Nothing is deleted:
        each moves under its own name (``name~2`` when taken). ``best.pt`` / ``best`` when they are one of them
        move along; ``last.pt`` / ``last`` when they are one of them are pointed at ``resumed`` (a checkpoint
        of this folder), so that an auto resume before the next save continues this run, not the abandoned one
        (else they are removed: a link, the checkpoint itself is kept). Call on the main rank only, before the
        next save. Returns the checkpoints moved, at their new paths.

        Raises:
            OSError: a file could not be moved (e.g. no permission), naming it.
        """
        later = [p for p in [*self.step_files(), *self.step_dirs()] if (step_of(p) or 0) > step]
        if not later:
            return []
        dest = self.dir / ABANDONED
        dest.mkdir(exist_ok=True)
        taken: set[str] = set()  # names first: a symlink that follows its folder must point at the new name
        new_names = {_identity(p): _free_name(dest, p.name, taken) for p in later}
        resumed = Path(resumed) if resumed is not None else None
        here = resumed is not None and _is_checkpoint(resumed) and resumed.resolve().parent == self.dir.resolve()
        moved: list[Path] = []
        for name in ("best.pt", "best", "last.pt", "last"):
            link = self.dir / name
            target = new_names.get(_identity(link)) if _is_checkpoint(link) else None
            if target is None:
                continue
            if name.startswith("best"):
                new = _free_name(dest, name, taken)
                if link.is_symlink():
                    os.symlink(target.name, new)
                    link.unlink()
                else:
                    os.replace(link, new)
                moved.append(new)
            elif here and name == "last.pt" and resumed.is_file():
                _link_atomic(resumed, link)
            elif here and name == "last" and resumed.is_dir():
                _symlink_atomic(resumed.resolve().name, link)
            else:
                link.unlink()
        for p in later:
            new = new_names[_identity(p)]
            os.replace(p, new)
            moved.append(new)
        _fsync_dir(self.dir)
        return sorted(moved, key=lambda p: p.name)

    def set_aside_damaged_last(self, resumed: str | Path) -> Path | None:
        """``last.pt`` could not be read and the run resumed from ``resumed`` instead (``resume="auto"``): move
        ``last.pt`` into ``abandoned/`` (never deleted) and make it a link to ``resumed``, so that the folder's
        ``last.pt`` is readable again before the next save (readers of a finished run take it). Call on the
        main rank only. Returns the damaged file's new path (None: no ``last.pt`` file, or it is ``resumed``).

        Raises:
            OSError: a file could not be moved or linked, naming it.
        """
        last, resumed = self.dir / "last.pt", Path(resumed)
        if not last.is_file() or last.is_symlink() or _identity(last) == _identity(resumed):
            return None
        dest = self.dir / ABANDONED
        dest.mkdir(exist_ok=True)
        new = _free_name(dest, "last.pt", set())
        os.replace(last, new)
        if resumed.is_file():
            self.link_last(resumed)  # a file of another folder: not linked
        else:
            _fsync_dir(self.dir)
        return new

    def link_last(self, resumed: str | Path) -> Path | None:
        """Make ``last.pt`` a link to ``resumed`` (a checkpoint file of this folder), or ``last`` to a sharded
        folder, as :meth:`save` does: after ``resume="auto"`` found it missing and resumed from ``resumed``, so
        that the folder's ``last.pt`` is readable again before the next save (readers of a finished run take it).
        Call on the main rank only. Returns the link (None: ``resumed`` is not a checkpoint of this folder).

        Raises:
            OSError: the link could not be made, naming it.
        """
        resumed = Path(resumed)
        if not _is_checkpoint(resumed) or resumed.resolve().parent != self.dir.resolve():
            return None
        if resumed.is_dir():
            link = self.dir / "last"
            _symlink_atomic(resumed.resolve().name, link)
        else:
            link = self.dir / "last.pt"
            _link_atomic(resumed, link)
        _fsync_dir(self.dir)
        return link

    def step_files(self) -> list[Path]:
        files = [p for p in self.dir.glob("step_*.pt") if _STEP_RE.match(p.name)]
        return sorted(files, key=lambda p: int(_STEP_RE.match(p.name).group(1)))

    def step_dirs(self) -> list[Path]:
        dirs = [p for p in self.dir.glob("step_*") if _STEP_DIR_RE.match(p.name) and p.is_dir()]
        return sorted(dirs, key=lambda p: int(_STEP_DIR_RE.match(p.name).group(1)))

    def prune(self) -> None:
        files = self.step_files()
        for p in files[:max(len(files) - self.keep_last, 0)]:
            p.unlink(missing_ok=True)  # last.pt / best.pt are separate links and stay
        dirs = self.step_dirs()  # folders cannot be hard-linked: never drop what last / best point to
        pinned = {(self.dir / n).resolve() for n in ("last", "best") if (self.dir / n).is_symlink()}
        for p in dirs[:max(len(dirs) - max(self.keep_last, 1), 0)]:
            if p.resolve() not in pinned:
                shutil.rmtree(p, ignore_errors=True)


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
    """Inverse of :func:`optimizer_state_dict`; every rank passes the full dict (indexed by parameter
    position, or by parameter name as in a sharded checkpoint read in full)."""
    model = D.unwrap_model(model)
    by_name = any(isinstance(k, str) for k in state.get("state", {}))
    if D.is_fsdp(model) and not by_name:  # a single-process / DDP checkpoint resumed under FSDP2
        state, by_name = _optimizer_state_by_name(model, optimizer, state), True
    if D.is_fsdp(model) or by_name:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


def _optimizer_state_by_name(model: nn.Module, optimizer: torch.optim.Optimizer,
                             state: dict[str, Any]) -> dict[str, Any]:
    """``optimizer.state_dict()`` (parameters numbered in param-group order) keyed by parameter name, as
    ``set_optimizer_state_dict`` wants; the numbering is this optimizer's (the same groups as the saved one)."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    saved = [i for g in state["param_groups"] for i in g["params"]]
    if len(saved) != len(order):
        raise ValueError(f"the checkpoint's optimizer has {len(saved)} parameters, this model {len(order)}")
    fqn = dict(zip(saved, order))
    return {"state": {fqn[i]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [fqn[i] for i in g["params"]]} for g in state["param_groups"]]}


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


# --- sharded (FSDP2) checkpoints through torch.distributed.checkpoint ------------------------------------

def save_sharded_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict[str, Any],
                            path: str | Path) -> None:
    """Collective: every rank writes its shards of ``{"model", "optimizer"}`` (DCP, no gather) into
    ``path.tmp/``; rank 0 adds ``meta.pt`` and renames the folder to ``path`` (atomic: a crash leaves the
    previous checkpoint intact and at worst a stray ``.tmp`` folder)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if D.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    D.barrier()
    msd, osd = get_state_dict(D.unwrap_model(model), optimizer)
    dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(tmp))
    D.barrier()
    if D.is_main():
        save_checkpoint({**meta, "sharded": True}, tmp / META)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    D.barrier()


def load_sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer, path: str | Path) -> None:
    """Collective: load a sharded checkpoint folder into an FSDP2 (or plain) model and its optimizer; DCP
    reshards, so the folder may come from any number of ranks. Raises :class:`CheckpointMismatchError`
    naming the folder and the first missing / unexpected / mis-shaped parameter."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    model = D.unwrap_model(model)
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    saved_model = {k[len("model."):]: tuple(getattr(v, "size", ())) for k, v in saved.items()
                   if k.startswith("model.")}
    check_state_dict(model.state_dict(), {k: SimpleNamespace(shape=s) for k, s in saved_model.items()}, str(path))
    msd, osd = get_state_dict(model, optimizer)
    dcp.load({"model": msd, "optimizer": osd}, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd)


def _read_full_sharded(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The full model / optimizer state dicts of a sharded folder, on CPU, in this process alone."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    sd: dict[str, Any] = {}
    _load_state_dict(sd, storage_reader=FileSystemReader(str(path)), planner=_EmptyStateDictLoadPlanner(),
                     no_dist=True)
    return sd["model"], sd["optimizer"]
