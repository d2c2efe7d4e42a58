"""The output folder of a training run: one run at a time, never a silent overwrite, safe resumes.

- **Lock** (:class:`RunLock`): ``output_dir/.lock`` holds ``{"pid", "host", "started"}`` of the run using the
  folder and is ``flock``-ed while it runs. A second run on the folder is refused naming the holder. A lock
  whose process is gone (the kernel drops a ``flock`` when its process dies, even on ``kill -9``; where
  ``flock`` is unavailable, the pid is checked on this host) is stale: it is taken over with a warning.
  Forked children (DataLoader workers) close their copy of the lock's fd, so the orphaned workers of a killed
  run do not keep its folder locked.
- **Fresh, overwrite or resume** (:func:`prepare_output_dir`): a fresh run into a folder that holds an
  earlier run's checkpoints or metrics is refused unless ``train.resume`` (``--resume``) continues it or
  ``train.overwrite=true`` (``--overwrite``) replaces it; overwriting deletes only what the engine and the task
  wrote (:data:`RUN_FILES`, :data:`RUN_DIRS`, ``step_*`` checkpoints, and the task's own outputs, e.g.
  pre-training's ``final/``: each task declares them once, its ``OUTPUTS``, passed as ``Trainer(outputs=...)``),
  other files in the folder are kept; ``images/`` only when the engine made it (:data:`IMAGES_MARK`). An
  overwrite never deletes the run's inputs: the paths its config names (:func:`config_inputs`) and those a task
  derives from it (``Trainer(inputs=...)``, e.g. layout's ``images/`` next to ``data.train_ann``).
  ``log.txt`` is appended to, each run's lines after a separator line (:func:`beit.engine.logging.setup_logging`).
- **Resume with a changed config** (:func:`check_resume_config`): the checkpoint's ``config`` is compared
  with the current one; keys that change what is trained (model, data, masking, batch size, seed, optimizer,
  schedule, ...) must be equal, else :class:`ConfigChangedError` names each differing key;
  ``train.allow_config_change=true`` accepts them with a warning. Bookkeeping, duration and runtime keys
  (:data:`RESUME_SAFE_KEYS`) may change freely. Another number of classes (:data:`CLASSES_KEY`, e.g. an edited
  ``data.classes_file``) is refused even with ``allow_config_change``: the heads cannot take the checkpoint's weights.
- **Atomic small files** (:func:`atomic_write`): plots and ``config.yaml`` are written to a temporary file and
  renamed, so a crash or a full disk never leaves a truncated one.

Nothing here is distributed-aware: the trainer calls these on rank 0 and broadcasts the outcome.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import logging
import os
import re
import shutil
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .._text import ALIKE_ON_EVERY_RANK, first_few

__all__ = [
    "CLASSES_KEY", "CLASS_SOURCES", "IMAGES_MARK", "LOCK_NAME", "RESUME_SAFE_KEYS", "RESUME_SAME_TASK", "RUN_DIRS",
    "RUN_FILES",
    "ConfigChangedError", "RunDirError", "RunExistsError", "RunLock", "RunLockedError", "TaskMismatchError",
    "atomic_write", "check_checkpoint_task", "check_overwrite_same_task", "check_overwrite_spares_inputs",
    "check_resume_config",
    "class_count_refusal", "class_list_key", "class_list_source", "clear_previous_run", "config_inputs", "diff_configs",
    "mark_run_images",
    "prepare_output_dir", "previous_run_files", "previous_run_paths", "remove_stale_tmp", "task_outputs_present",
]

LOCK_NAME = ".lock"
#: files the engine writes into ``output_dir`` (deleted by an overwrite; ``log.txt`` is appended to, kept)
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "curves.png", "config.yaml")
#: folders the engine writes into ``output_dir`` (deleted by an overwrite); ``abandoned`` holds the step checkpoints
#: a resume from an older checkpoint set aside (``CheckpointManager.set_aside_after``)
RUN_DIRS = ("tb", "images", "abandoned")
#: the file the engine leaves in ``output_dir/images`` when it makes that folder for a run's pictures
#: (``train.image_every``): an overwrite deletes an ``images/`` only when it holds this mark, never a folder of
#: that name the engine did not make (a data set's page images kept next to its annotations, say)
IMAGES_MARK = ".beit_run_images"
# step checkpoints: step_0000042.pt files, or folders (sharded checkpoints), and last/best folders
_CKPT_RE = re.compile(r"^(step_\d+(\.pt)?|last|best|last\.pt|best\.pt)$")

#: config keys (last component of the dotted path) that may differ on resume: where the run writes, how
#: long it runs, how often it logs/evaluates/saves, and how it computes (workers, compile, precision, DDP/FSDP,
#: evaluation-only batch sizes). Everything else defines the run and must match.
RESUME_SAFE_KEYS = frozenset({
    "output_dir", "resume", "overwrite", "allow_config_change",  # where / how the run is started
    "epochs", "max_steps",  # extend or shorten (the lr schedule follows the new length)
    "log_every", "ckpt_every", "keep_last", "eval_every", "image_every",  # bookkeeping
    "num_workers", "compile", "compile_scope", "precision", "distributed",  # runtime: same data, same model
    "eval_batch_size", "extract_batch_size", "extract_num_workers", "vis_samples", "grid_images",
})


class RunDirError(ValueError):
    """The output folder cannot be used as asked (held by another run, holds a run, or a changed config)."""


class RunLockedError(RunDirError):
    """Another live run holds ``output_dir/.lock``."""


class RunExistsError(RunDirError):
    """A fresh run was started into a folder that holds an earlier run (no resume, no overwrite)."""


class ConfigChangedError(RunDirError):
    """Resume with a config that differs from the checkpoint's in keys that define the run."""


class TaskMismatchError(RunDirError):
    """A checkpoint another task wrote, given to a run or command of this one (a fine-tuning checkpoint resumed
    by pre-training, a classification checkpoint given to ``beit segment eval``, ...): :func:`check_checkpoint_task`."""


def _log() -> logging.Logger:
    return logging.getLogger("beit")


# --- lock ------------------------------------------------------------------------------------------------

def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a pid we may not signal exists too)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _read_lock(path: Path) -> dict[str, Any] | None:
    """The holder written in a lock file, or None if the file is missing, empty or damaged."""
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _describe(info: dict[str, Any] | None) -> str:
    if not info:
        return "an unknown process (the lock file is empty or damaged)"
    return f"pid {info.get('pid')} on host {info.get('host')}, started {info.get('started')}"


_HELD_LOCK_FDS: set[int] = set()  # the lock fds this process holds


def _close_held_locks_in_child() -> None:
    """In a forked child (a DataLoader worker): close the inherited lock fds. A ``flock`` lives as long as ANY
    process holds the open file: a child's copy would keep a killed run's folder locked until its workers
    exit too. The parent's own fd keeps the lock held while it lives."""
    for fd in list(_HELD_LOCK_FDS):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCK_FDS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_locks_in_child)


class RunLock:
    """``output_dir/.lock``: at most one run per output folder (see the module docstring).

    Use as ``lock = RunLock(dir).acquire()`` ... ``lock.release()`` (or as a context manager).
    ``acquire`` raises :class:`RunLockedError` naming the holder (pid, host, start time) when a live run
    holds it, and takes over a stale lock (its process is gone) with a warning.
    """

    def __init__(self, output_dir: str | Path):
        self.dir = Path(output_dir)
        self.path = self.dir / LOCK_NAME
        self.info: dict[str, Any] = {}
        self._fd: int | None = None
        self._flock = True  # flock honoured by this filesystem (else: pid check on this host)

    def acquire(self) -> RunLock:
        """Take the lock; see the class docstring. Raises :class:`RunLockedError`; ``OSError`` if the folder
        cannot be written."""
        if self._fd is not None:
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        for _ in range(10):  # retry if the holder removed the file between our open and our flock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                self._try_flock(fd)
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    continue
                self._take(fd)
                return self
            except BaseException:
                if self._fd is None:
                    os.close(fd)
                raise
        raise RunLockedError(f"{self.path}: could not take the lock (it keeps being replaced by another run)")

    def _try_flock(self, fd: int) -> None:
        try:
            import fcntl
        except ImportError:  # not a POSIX system: pid check only
            self._flock = False
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLockedError(self._held_message(_read_lock(self.path))) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            self._flock = False  # filesystem without flock: fall back to the pid check

    def _held_message(self, info: dict[str, Any] | None) -> str:
        return (f"output_dir {self.dir} is in use by another run ({_describe(info)}; lock file {self.path}). "
                "Wait for it to end, stop it, or choose another output_dir")

    def _take(self, fd: int) -> None:
        old = _read_lock(self.path)
        host = socket.gethostname()
        if old:
            pid = old.get("pid") if isinstance(old.get("pid"), int) else -1
            here = old.get("host") == host
            live = here and pid != os.getpid() and _pid_alive(pid)
            # flock free but the recorded process lives: a filesystem that does not share flocks between
            # processes, or a recycled pid; without flock a lock of another host cannot be checked: refuse both
            if live or (not self._flock and not here):
                raise RunLockedError(self._held_message(old) + f" (if that run is gone, delete {self.path})")
            if pid != os.getpid():
                _log().warning(f"{self.path}: taking over a stale lock of {_describe(old)}: that run ended "
                               "without releasing it (killed or crashed)")
        elif self.path.stat().st_size > 0:
            _log().warning(f"{self.path}: taking over a damaged stale lock")
        self.info = {"pid": os.getpid(), "host": host, "started": _now()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(self.info) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        _HELD_LOCK_FDS.add(fd)

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self._fd is None:
            return
        try:
            if _read_lock(self.path) == self.info:  # still ours
                self.path.unlink(missing_ok=True)
        except OSError:
            pass
        finally:
            _HELD_LOCK_FDS.discard(self._fd)
            if self._fd is not None and os.getpid() == self.info.get("pid"):  # a forked child closed its copy
                os.close(self._fd)  # drops the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# --- fresh / overwrite / resume ----------------------------------------------------------------------------

def previous_run_files(output_dir: str | Path) -> list[Path]:
    """What an earlier run left in ``output_dir``: checkpoints (``last.pt``, ``best.pt``, ``step_*``, files or
    sharded folders) and a non-empty ``metrics.jsonl``; sorted by name. Empty for a new or missing folder."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if _CKPT_RE.match(p.name)]
    metrics = out / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append(metrics)
    return sorted(found, key=lambda p: p.name)


def _is_checkpoint(p: Path) -> bool:
    return p.name != "metrics.jsonl"


def remove_stale_tmp(output_dir: str | Path) -> list[Path]:
    """Delete ``*.tmp`` files/folders a crash left in ``output_dir`` (call only while holding the lock)."""
    out = Path(output_dir)
    removed = []
    for p in out.glob("*.tmp") if out.is_dir() else []:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _check_outputs(outputs: Sequence[str]) -> None:
    """A task's ``outputs`` are plain names inside the output folder (no path, no ``..``, not the lock or log).

    Raises:
        ValueError: a name with a path separator, ``.``/``..``, an empty one, or ``.lock`` / ``log.txt``.
    """
    bad = [n for n in outputs if not n or n in (".", "..", LOCK_NAME, "log.txt") or "/" in n or os.sep in n]
    if bad:
        raise ValueError(f"a task's outputs must be names of files or folders directly in output_dir, got "
                         f"{first_few(bad, 4)}")


def task_outputs_present(output_dir: str | Path, outputs: Sequence[str] = ()) -> list[Path]:
    """The task outputs (``outputs``: names, as a task's ``OUTPUTS`` declares them) that exist in ``output_dir``,
    sorted by name.

    Raises:
        ValueError: ``outputs`` holds a name that is not a plain name in the folder (:func:`_check_outputs`).
    """
    _check_outputs(outputs)
    out = Path(output_dir)
    if not out.is_dir():
        return []
    return sorted((out / n for n in set(outputs) if (out / n).exists() or (out / n).is_symlink()),
                  key=lambda p: p.name)


def clear_previous_run(output_dir: str | Path, outputs: Sequence[str] = ()) -> list[Path]:
    """Delete what the engine wrote in ``output_dir`` (checkpoints, metrics, curves, config.yaml, tb/, images/,
    abandoned/, temporary files) and the task's ``outputs`` (names of files or folders in it, e.g. pre-training's
    ``final``, ``mim_panel.png``); other files are left alone, ``log.txt`` too. Returns what was deleted.

    Raises:
        ValueError: ``outputs`` holds a name that is not a plain name in the folder (:func:`_check_outputs`).
    """
    return _remove(previous_run_paths(output_dir, outputs))


def previous_run_paths(output_dir: str | Path, outputs: Sequence[str] = ()) -> list[Path]:
    """What :func:`clear_previous_run` would delete in ``output_dir``, sorted by name (nothing is removed).

    Raises:
        ValueError: ``outputs`` holds a name that is not a plain name in the folder (:func:`_check_outputs`).
    """
    _check_outputs(outputs)
    out = Path(output_dir)
    if not out.is_dir():
        return []
    return sorted((p for p in out.iterdir()
                   if _CKPT_RE.match(p.name) or p.name in RUN_FILES or p.name.endswith(".tmp") or p.name in outputs
                   or (p.name in RUN_DIRS and (p.name != "images" or _engine_images(p)))), key=lambda p: p.name)


def _engine_images(folder: Path) -> bool:
    """Whether ``folder`` (an ``output_dir/images``) is the engine's: it holds :data:`IMAGES_MARK`."""
    return folder.is_dir() and not folder.is_symlink() and (folder / IMAGES_MARK).is_file()


def mark_run_images(folder: str | Path) -> Path:
    """Make ``folder`` (a run's ``output_dir/images``) for the run's pictures and return it: a folder made here gets
    :data:`IMAGES_MARK` (an overwrite deletes it with the run); one that was there without it is not the engine's
    and stays unmarked (written into, never deleted by an overwrite)."""
    folder = Path(folder)
    if not folder.exists():
        folder.mkdir(parents=True)
        (folder / IMAGES_MARK).write_text("pictures of a beit training run (train.image_every): --overwrite deletes "
                                          "this folder with the run\n")
    folder.mkdir(parents=True, exist_ok=True)  # e.g. a dangling link: the error names it
    return folder


def _remove(doomed: Sequence[Path]) -> list[Path]:
    """Delete ``doomed`` (a link itself, never what it points to); returns it."""
    for p in doomed:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
    return list(doomed)


def _overlaps(a: Path, b: Path) -> bool:
    """Whether ``a`` is ``b``, inside it, or holds it (links resolved)."""
    try:
        ra, rb = a.resolve(), b.resolve()
    except OSError:
        return False
    return ra == rb or ra.is_relative_to(rb) or rb.is_relative_to(ra)


def config_inputs(config: Mapping[str, Any]) -> dict[str, str]:
    """The paths a run reads, from its (nested) config: every string value that names an existing file or folder
    (data folders, the weights fine-tuned from, the tokenizer), dotted key -> path; ``output_dir`` (any key ending
    so) is where the run writes, not an input."""
    return {k: v for k, v in _flatten(dict(config)).items()
            if k.rsplit(".", 1)[-1] != "output_dir" and isinstance(v, str) and v and os.path.exists(v)}


def check_overwrite_spares_inputs(doomed: Sequence[Path], inputs: Mapping[str, str | Path]) -> None:
    """Refuse an ``--overwrite`` that would delete a run's own input: a path to delete that is, holds or lies in
    one of ``inputs`` (config key -> path: the data folders, the weights fine-tuned from, the tokenizer), e.g. a
    training set kept in the output folder's ``images/``, or ``model=RUN/model`` overwritten by the run that
    loads it.

    Raises:
        RunDirError: naming the path, the input and its key; nothing is deleted.
    """
    for p in doomed:
        for key, src in inputs.items():
            if _overlaps(p, Path(src)):
                raise RunDirError(f"--overwrite would delete {p}, which overlaps this run's input {key}={src}: "
                                  "nothing was deleted; choose another output_dir (train.output_dir / --out), or "
                                  "move the input out of it")


def _inside(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().parent == folder.resolve()
    except OSError:
        return False


def check_overwrite_same_task(output_dir: str | Path, task: str | None, stored: str | None,
                              source: str | Path | None) -> None:
    """Refuse an ``--overwrite`` of the run in ``output_dir`` that another task wrote: ``stored`` is the task its
    checkpoint ``source`` records, ``task`` the task of the run that would replace it (None on either side: not
    checked, as :func:`check_checkpoint_task`).

    Raises:
        TaskMismatchError: naming the folder, the task that wrote it, its checkpoint and this run's task; nothing
            is deleted.
    """
    if stored and task and stored != task:
        raise TaskMismatchError(
            f"output_dir {output_dir} holds a {stored} run ({source} is a {stored} checkpoint): --overwrite by this "
            f"{task} run would delete another task's run, so nothing was deleted. Choose another output_dir "
            "(train.output_dir / --out), or delete that run's files yourself if it is no longer needed")


def prepare_output_dir(output_dir: str | Path, *, resume_path: Path | None, resume: str = "",
                       overwrite: bool = False, check_only: bool = False, outputs: Sequence[str] = (),
                       inputs: Mapping[str, str | Path] | None = None, task: str | None = None,
                       folder_task: Callable[[], tuple[str | None, Path | None]] | None = None) -> str:
    """Decide how a run starts in ``output_dir`` and get the folder ready; returns ``"resume"``, ``"fresh"`` or
    ``"overwrite"``. Call on rank 0 while holding the :class:`RunLock`.

    ``resume_path`` is the checkpoint the run resumes from (None: fresh start). Resuming from a checkpoint of
    this folder continues its run. A fresh start (or a resume from another folder's checkpoint) into a folder
    that holds an earlier run (:func:`previous_run_files`) raises :class:`RunExistsError` naming ``--resume``
    and ``--overwrite``, unless ``overwrite`` (then the earlier run's files are deleted, see
    :func:`clear_previous_run`, with the task's ``outputs``: names of the files and folders the task writes
    there besides the engine's, e.g. pre-training's ``final``; an overwrite deletes them even when no checkpoint
    is left (then only they and ``abandoned/`` go), and a fresh run without ``overwrite`` keeps them with a
    warning). ``inputs`` (config key -> path): the run's inputs, which an overwrite never deletes
    (:func:`check_overwrite_spares_inputs`). ``task``: this run's task; ``folder_task()``: the task that wrote the
    folder's run and the checkpoint that says so (``beit.engine.checkpoint.recorded_task``), asked only when an
    overwrite would delete checkpoints: another task's run is never overwritten (:func:`check_overwrite_same_task`).
    With ``resume="auto"`` and no
    checkpoint, metrics of a run that crashed before its first checkpoint are replaced (nothing resumable is
    lost). Stray ``*.tmp`` files are removed.

    ``check_only`` (a check ahead of the run, without the lock, e.g.
    :func:`beit.engine.trainer.check_run_can_start`): the same decision and refusals, but nothing is removed
    (another process may be writing its ``*.tmp`` files there) and nothing logged (the run says it when it starts).

    Raises:
        RunExistsError: the folder holds an earlier run and neither this folder's checkpoint is resumed nor
            ``overwrite`` is given.
        RunDirError: ``overwrite`` would delete one of ``inputs`` (or a folder holding one, or one inside one).
        TaskMismatchError: ``overwrite`` of a folder whose checkpoints another task wrote.
        ValueError: ``outputs`` holds a name that is not a plain name in the folder.
    """
    inputs = inputs or {}
    _check_outputs(outputs)
    out = Path(output_dir)
    if not check_only:
        remove_stale_tmp(out)
    if resume_path is not None and _inside(resume_path, out):
        return "resume"
    found = previous_run_files(out)
    if resume_path is None and resume == "auto":
        found = [p for p in found if _is_checkpoint(p)]
    if not found:
        aside = out / "abandoned"  # checkpoints an earlier run set aside; nothing there is resumed
        stale = task_outputs_present(out, outputs)  # e.g. final/ of a run whose checkpoints were deleted
        if aside.is_dir() and any(aside.iterdir()):
            stale = sorted([*stale, aside], key=lambda p: p.name)
        if stale:
            if overwrite:
                check_overwrite_spares_inputs(stale, inputs)
            if check_only:
                return "overwrite" if overwrite else "fresh"
            names = ", ".join(p.name for p in stale)
            if overwrite:
                removed = _remove(stale)  # no checkpoint: only the task's outputs and abandoned/
                _log().warning(f"overwrite: deleted what an earlier run left in {out} "
                               f"({', '.join(p.name for p in removed)})")
                return "overwrite"
            _log().warning(f"{out} holds what an earlier run left ({names}): kept beside this new run "
                           "(--overwrite deletes them)")
        return "fresh"
    names = first_few([p.name for p in found], 4)
    if not overwrite:
        start = (f"resuming from {resume_path} (another folder) would mix two runs" if resume_path is not None
                 else "a fresh run would delete its metrics and replace its checkpoints")
        hint = ("none of them is a checkpoint --resume auto can continue (an unfinished sharded folder, a dangling "
                "link): resume a checkpoint explicitly (--resume PATH / train.resume=PATH)"
                if resume == "auto" else "to continue it pass --resume auto (train.resume=auto)")
        raise RunExistsError(f"output_dir {out} holds an earlier run ({names}): {start}. {hint}, or pass "
                             "--overwrite (train.overwrite=true) to replace it, or choose another output_dir")
    if task and folder_task is not None and any(_is_checkpoint(p) for p in found):
        check_overwrite_same_task(out, task, *folder_task())
    doomed = previous_run_paths(out, outputs)
    check_overwrite_spares_inputs(doomed, inputs)
    if check_only:
        return "overwrite"
    removed = _remove(doomed)
    _log().warning(f"overwrite: deleted the earlier run in {out} ({', '.join(p.name for p in removed)})")
    images = out / "images"
    if images.is_dir() and not _engine_images(images) and not any(_overlaps(images, Path(p)) for p in inputs.values()):
        _log().warning(f"overwrite: kept {images}: it has no {IMAGES_MARK} file, so no beit run made it (a "
                       "folder of yours, or pictures of a run older than the mark): delete it yourself if it holds "
                       "only an earlier run's pictures")
    return "overwrite"


# --- config comparison ---------------------------------------------------------------------------------------

_MISSING = object()


# config keys added after checkpoints without them were written (dotted, whole): a stored config that lacks one
# resumes, taking the current value (segmentation's model.classes, filled in by training since 2026-12-06)
NEWER_KEYS = frozenset({"model.classes"})

#: the config key of the class names a run's heads are trained for (segmentation's model.classes, filled in by
#: training from data.classes / data.classes_file): another number of them cannot be resumed at all, with
#: ``train.allow_config_change`` or not (the heads' weights have the checkpoint's size), see :func:`_classes_changed`
CLASSES_KEY = "model.classes"
#: the data keys that give that list, in the order they are looked at: the first one set is where the list comes
#: from (:func:`class_list_source`)
CLASS_SOURCES = ("data.classes_file", "data.classes", "data.num_classes")


def class_list_key(flat: Mapping[str, Any]) -> str:
    """The key of :data:`CLASS_SOURCES` a class list comes from in the flattened config ``flat`` (dotted keys, as
    :func:`_flatten` gives): the first one set; ``""`` when none is."""
    return next((k for k in CLASS_SOURCES if flat.get(k)), "")


def class_list_source(flat: Mapping[str, Any], default: str = "the data config") -> str:
    """Where a class list comes from, for messages: the one wording of every task's and the engine's, e.g.
    ``data.classes_file '/d/classes.txt'`` (the file's path with its key), ``data.classes``, ``data.num_classes``
    (:func:`class_list_key` of the flattened config ``flat``); ``default`` when no key is set (a task may name its
    own default list, e.g. segmentation's ADE20K classes). Messages say the count themselves (``... now gives 4``)."""
    key = class_list_key(flat)
    if not key:
        return default
    return f"{key} {str(flat[key])!r}" if key == "data.classes_file" else key


def _brief(value: Any, width: int = 80) -> str:
    """``repr(value)``, cut to ``width`` characters (a list of 150 class names is one line, not 1,700 characters)."""
    text = repr(value)
    return text if len(text) <= width else f"{text[:width - 5]} ...{text[-1] if text[-1] in ']})' else ''}"


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config dict -> ``{dotted key: leaf}`` (an empty dict is a leaf)."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict) and v:
                out.update(_flatten(v, key + "."))
            else:
                out[key] = v
        return out
    return {prefix.rstrip("."): node}


def _norm(v: Any) -> Any:
    """Tuples and lists compare equal (YAML and torch.load give lists); ints equal to floats stay equal."""
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()}
    return v


def diff_configs(stored: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(dotted key, stored value, current value)`` for every leaf that differs (a missing side is
    ``"<absent>"``), sorted by key."""
    return _diff_flat(_flatten(stored), _flatten(current))


def _diff_flat(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """:func:`diff_configs` of two configs already flattened (:func:`_flatten`)."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, _MISSING), b.get(key, _MISSING)
        if (va == {} and vb is _MISSING and any(k.startswith(key + ".") for k in b)) or (
                vb == {} and va is _MISSING and any(k.startswith(key + ".") for k in a)):
            continue  # an empty dict on one side, its entries on the other: the entries' lines say it
        if va is _MISSING or vb is _MISSING or _norm(va) != _norm(vb):
            out.append((key, "<absent>" if va is _MISSING else va, "<absent>" if vb is _MISSING else vb))
    return out


def _global_batch(config: dict[str, Any], world_size: int) -> int | None:
    """``batch_size x accum_steps x world_size`` of a config dict (its ``train`` section, or itself)."""
    train = config.get("train") if isinstance(config.get("train"), dict) else config
    try:
        return int(train["batch_size"]) * int(train.get("accum_steps", 1)) * int(world_size)
    except (KeyError, TypeError, ValueError):
        return None


#: the end of the line that refuses a resume of another task's checkpoint (:func:`check_checkpoint_task`)
RESUME_SAME_TASK = "--resume (train.resume) continues a run of the same task"


def _classes_changed(flat_stored: dict[str, Any], flat_current: dict[str, Any], source: str | Path,
                     others: list[str]) -> str | None:
    """The refusal of a resume whose class list (:data:`CLASSES_KEY`) has another number of names than the
    checkpoint's (the user edited ``data.classes_file`` or ``data.classes`` between the runs), or None: see
    :func:`class_count_refusal`. The two configs come flattened (:func:`_flatten`), as the caller compared them;
    ``others``: the other keys that changed, besides the class list's."""
    was = flat_stored.get(CLASSES_KEY)
    now = flat_current.get(CLASSES_KEY)
    if not (isinstance(was, (list, tuple)) and was and isinstance(now, (list, tuple)) and now
            and len(was) != len(now)):
        return None
    return _class_count_refusal(source, flat_current, list(was), others=others)


def class_count_refusal(source: str | Path, current: dict[str, Any], trained: list[Any] | int, *,
                        counted_by: str = "", others: Sequence[str] = ()) -> str:
    """The one-line refusal of a resume whose class list now (``current``'s :data:`CLASSES_KEY`) has another length
    than the checkpoint ``source`` was trained for: ``trained`` is the checkpoint's class names, or, for a
    checkpoint that predates stored names, their number as ``counted_by`` says it was read (a task's check, e.g.
    segmentation's "the size of its decode head"). It names both, where the list comes from now
    (:func:`class_list_source`), what was added / removed (names only), the two ways on, and ``others`` (other keys
    that changed). No ``train.allow_config_change`` makes the heads' weights fit."""
    return _class_count_refusal(source, _flatten(current), trained, counted_by=counted_by, others=others)


def _class_count_refusal(source: str | Path, b: dict[str, Any], trained: list[Any] | int, *, counted_by: str = "",
                         others: Sequence[str] = ()) -> str:
    """:func:`class_count_refusal` of a current config already flattened (``b``, :func:`_flatten`)."""
    now = list(b.get(CLASSES_KEY) or [])
    where = class_list_source(b)
    if isinstance(trained, int):
        was, now_shown, listed = f"{trained} classes ({counted_by})", "", ""
    else:
        added = [x for x in now if x not in trained]
        removed = [x for x in trained if x not in now]
        delta = "; ".join(f"{what}: {first_few(xs, 4)}" for what, xs in (("added", added), ("removed", removed))
                          if xs)
        was = f"{len(trained)} classes ({first_few(trained, 4)})"
        now_shown = f" ({first_few(now, 4)}{'; ' + delta if delta else ''})"
        listed = f" (its config.yaml lists them under {CLASSES_KEY})"
    also = f" (the config also differs in {', '.join(others)})" if others else ""
    return (f"{source} was trained for {was}, but {where} now gives {len(now)}{now_shown}: a resumed run keeps the "
            "classes its heads were trained for, even with train.allow_config_change. Restore the class list the run "
            f"was trained with{listed}, or train the new list as a new run, without --resume: in another output_dir "
            f"(train.output_dir=DIR), or over this one with --overwrite{also}")


def check_checkpoint_task(stored: str | None, current: str | None, *, source: str | Path,
                          fix: str = RESUME_SAME_TASK) -> None:
    """Refuse the checkpoint ``source`` of another task, in one line, before anything else is read from it (a
    resume's config comparison, whose every key would differ; a command's model). The one task check: the
    trainer's resume and the commands that read a task's checkpoint (``beit.tasks.backbone_config``) call it.

    ``stored`` is the checkpoint's task (None: unknown, e.g. a checkpoint from before the trainer recorded
    ``task``, or of a bare ``TrainConfig`` run: not checked), ``current`` the task of the run or command (None: not
    checked). ``fix`` ends the line, after a colon: what takes such a checkpoint (empty: nothing added).

    Raises:
        TaskMismatchError: ``"<source> is a <stored> checkpoint, not a <current> one: <fix>"``.
    """
    if stored and current and stored != current:
        raise TaskMismatchError(f"{source} is a {stored} checkpoint, not a {current} one"
                                + (f": {fix}" if fix else ""))


def check_resume_config(stored: dict[str, Any] | None, current: dict[str, Any], *, source: str | Path,
                        allow: bool = False, stored_world_size: int | None = None,
                        world_size: int = 1, report: bool = True) -> list[str]:
    """Compare a checkpoint's ``config`` with the current run's; return the dotted keys that differ.

    Keys whose last component is in :data:`RESUME_SAFE_KEYS` may differ (listed in an info line), and a key of
    :data:`NEWER_KEYS` may be missing from the stored config (added to beit after the checkpoint was written;
    listed too). Any other
    difference raises :class:`ConfigChangedError` naming ``source`` and every such key with both values,
    unless ``allow`` (``train.allow_config_change``), which logs them as a warning instead. A checkpoint
    without a stored config (``stored`` None) is accepted with a warning. A class list (:data:`CLASSES_KEY`)
    of another length than the stored one is refused even with ``allow``, in one line of its own naming both
    lists and what to do (:func:`_classes_changed`); a list of the same length renamed is a change like any other.

    On another number of ranks (``stored_world_size`` != ``world_size``) the per-rank ``batch_size`` and
    ``accum_steps`` may change when the global batch (their product with the number of ranks) stays the same:
    the run then sees the same samples in the same steps.

    ``report=False`` is for a check made ahead of the real resume (:func:`beit.engine.trainer.check_run_can_start`),
    which says the same lines again: nothing is logged when the resume is accepted, and when it is refused (the
    real resume then never comes) the lines are logged as usual before the error, so each is said exactly once.

    Raises:
        ConfigChangedError: a key that defines the run differs, without ``allow``; the number of classes
            differs, with or without it.
    """
    log = _log()
    said: list[tuple[int, str]] = []  # (level, line): logged at the end, or kept back when not reporting
    if not isinstance(stored, dict):
        if report:
            log.warning(f"{source} stores no config: cannot check that the resumed run uses the same settings",
                        extra=ALIKE_ON_EVERY_RANK)
        return []
    flat_stored, flat_current = _flatten(stored), _flatten(current)  # once, for every comparison below
    diffs = _diff_flat(flat_stored, flat_current)
    per_rank = ("batch_size", "accum_steps")
    if (stored_world_size and stored_world_size != world_size
            and _global_batch(stored, stored_world_size) == _global_batch(current, world_size) is not None):
        regrouped = [d for d in diffs if d[0].rsplit(".", 1)[-1] in per_rank]
        if regrouped:
            said.append((logging.INFO, f"resume on {world_size} rank(s) from {stored_world_size}: same global batch "
                                       f"{_global_batch(current, world_size)}, "
                                       + ", ".join(f"{k}: {_brief(a)} -> {_brief(b)}" for k, a, b in regrouped)))
        diffs = [d for d in diffs if d not in regrouped]
    # a key the checkpoint's config lacks that came with a newer beit (NEWER_KEYS): the run was made without it, so
    # it is taken as it is now, said, and not held against the resume (a user's new entry of a free-form dict,
    # e.g. model_overrides, is a change like any other)
    added = [d for d in diffs if d[1] == "<absent>" and d[0] in NEWER_KEYS]
    harmless = [d for d in diffs if d[0].rsplit(".", 1)[-1] in RESUME_SAFE_KEYS and d not in added]
    changed = [d for d in diffs if d not in harmless and d not in added]
    shown = [d for d in harmless if d[0].rsplit(".", 1)[-1] not in ("resume", "output_dir")]
    if shown:
        said.append((logging.INFO, "resume: settings changed since the checkpoint (allowed): "
                                   + ", ".join(f"{k}: {_brief(a)} -> {_brief(b)}" for k, a, b in shown)))
    if added:
        said.append((logging.INFO, "resume: settings the checkpoint's config does not have (newer than it), taken "
                                   "as now: " + ", ".join(f"{k}={_brief(b)}" for k, _, b in added)))
    classes = _classes_changed(flat_stored, flat_current, source,
                               [d[0] for d in changed if d[0] not in (CLASSES_KEY, *CLASS_SOURCES)])
    if classes is not None:  # no allow_config_change makes these weights fit: said first, whatever else changed
        raise ConfigChangedError(classes)
    listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changed)
    if changed and not allow:
        for level, line in said:  # refused: no later resume will say them
            log.log(level, line, extra=ALIKE_ON_EVERY_RANK)
        raise ConfigChangedError(
            f"{source}: the config differs from the checkpoint's in {len(changed)} key(s) that define the "
            f"run: {listed}. Resume with the checkpoint's settings (its config.yaml), or set "
            "train.allow_config_change=true to continue with the new ones anyway")
    if changed:
        said.append((logging.WARNING, f"resume with a changed config (allow_config_change): {listed}"))
    if report:
        for level, line in said:
            log.log(level, line, extra=ALIKE_ON_EVERY_RANK)  # every rank resumes the same checkpoint
    return [d[0] for d in diffs]


# --- atomic writes -------------------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block ends without error it replaces ``path``
    (``os.replace``), else it is deleted and the error propagates. The temporary file is ``path`` + ``.tmp``
    (give writers that infer the format from the name the format explicitly)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
