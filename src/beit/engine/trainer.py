"""The one training loop of the toolkit (pre-training, fine-tuning, tokenizers, segmentation, layout).

A task supplies a model, a dataset and a ``step_fn``; the trainer does everything else::

    def step_fn(model, batch):                      # runs under the engine's autocast
        images, targets = batch
        loss = F.cross_entropy(model(images), targets)
        return loss, {"acc": (logits.argmax(-1) == targets).float().mean()}

    Trainer(model, dataset, step_fn, cfg.train, eval_fn=evaluate, metric_to_track="acc1").fit()

Resume is exact: model, optimizer, step, epoch, the batch offset inside the epoch, the best metric and
every rank's RNG state are restored, and datasets draw their randomness from (seed, epoch, index)
(see ``docs/CONTRACTS.md``), so on CPU a resumed run repeats the uninterrupted run's losses bit for bit.

Stopping: SIGINT (Ctrl-C) or SIGTERM (``kill``, SLURM / Kubernetes preemption, torchrun passing either on)
during ``fit()`` finishes the optimizer step in progress on every rank, writes a checkpoint of it (resumable
like any other: ``resume="auto"``), releases the folder and raises :class:`TrainingInterrupted`; a second
Ctrl-C stops at once, without saving. ``resume="auto"`` skips a damaged ``last.pt`` for the newest readable
checkpoint of the folder, and a resume from an older checkpoint moves the later ones into ``abandoned/``.
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import dataclasses
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm import tqdm

from .._text import ALIKE_ON_EVERY_RANK
from ..data.datasets import NoReadableImagesError
from . import distributed as D
from . import optim as O
from . import rundir
from .checkpoint import (
    FORMAT,
    VERSION,
    CheckpointManager,
    CheckpointMismatchError,
    _identity,
    find_resume_path,
    get_rng_state,
    load_checkpoint,
    load_model_state,
    load_optimizer_state,
    load_sharded_state,
    model_state_dict,
    optimizer_state_dict,
    recorded_task,
    resume_candidates,
    set_rng_state,
)
from .config import ConfigError, PicklableError, TrainConfig, save_config, to_dict, validate_config
from .distributed import EpochIndexed, ResumableDistributedSampler, _mix_seed
from .logging import MetricLogger, console_through_tqdm, log_to_file, plot_curves, setup_logging
from .optim import build_optimizer, lr_at, summarize_param_groups
from .precision import autocast_for, use_bf16
from .prefetch import DevicePrefetcher
from .rundir import (
    RunLock,
    TaskMismatchError,
    atomic_write,
    check_checkpoint_task,
    check_resume_config,
    config_inputs,
    mark_run_images,
    prepare_output_dir,
)
from .threads import cap_intra_op_threads, loader_workers

__all__ = ["STOP_SIGNALS", "TASK_NAMES", "ModelEMA", "check_schedule", "full_steps", "StepFn", "Trainer",
           "TrainingDivergedError",
           "TrainingInterrupted", "check_run_can_start", "preserved_rng", "seed_everything", "task_of",
           "worker_init"]

StepFn = Callable[[nn.Module, Any], tuple[torch.Tensor, dict[str, Any]]]

#: the signals that ``fit()`` turns into a clean stop (see :class:`TrainingInterrupted`)
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)

#: the ``task`` a checkpoint records, by the class of the run config that wrote it (``Trainer(run_config=...)``);
#: another dataclass records its class name, a bare ``TrainConfig`` (or no dataclass) nothing
TASK_NAMES = {"PretrainConfig": "pre-training", "FinetuneConfig": "classification",
              "LinprobeConfig": "linear probing", "SegmentConfig": "segmentation",
              "LayoutConfig": "layout detection", "TokenizerTrainConfig": "dVAE tokenizer"}


def task_of(run_config: Any) -> str | None:
    """The task name a checkpoint of a run with this config records (:data:`TASK_NAMES`), or None."""
    if not dataclasses.is_dataclass(run_config) or isinstance(run_config, TrainConfig):
        return None
    name = type(run_config).__name__
    return TASK_NAMES.get(name, name)


def full_steps(num_samples: int, per_rank: int, cfg: TrainConfig, world_size: int = 1) -> int:
    """Optimizer steps in one epoch: ``per_rank`` samples (this rank's share of ``num_samples``) in full batches of
    ``cfg.batch_size`` x ``cfg.accum_steps``. Callers that know the dataset's size before building it (linprobe,
    before extracting features) check it here too, with the same message.

    Raises:
        ConfigError: ``train.batch_size``: not one full step ("N samples over R ranks give no full step ...").
    """
    steps = per_rank // cfg.batch_size // cfg.accum_steps
    if steps == 0:
        fits = max(1, per_rank // cfg.accum_steps)
        raise ConfigError("train.batch_size", f"{num_samples} samples over {world_size} ranks give no full step of "
                                              f"batch_size {cfg.batch_size} x accum_steps {cfg.accum_steps}: use "
                                              f"train.batch_size={fits} or less (or more data)")
    return steps


def check_schedule(num_samples: int, cfg: TrainConfig, world_size: int | None = None, *,
                   streaming: bool = False) -> tuple[int, int, int]:
    """``(steps_per_epoch, total_steps, warmup_steps)`` of a run of ``cfg`` over a training set of ``num_samples``
    on ``world_size`` ranks (default: this job's), as :class:`Trainer` computes them: a rank's share is its sampler's
    (``ceil(num_samples / world_size)``; a ``streaming`` dataset's ``num_samples // world_size``) in full steps
    (:func:`full_steps`). Tasks call it as soon as the training set's size is known, before long work that does not
    change it (decoding a validation set, extracting features), so that a run whose warmup is not shorter than the
    run (``train.warmup_epochs`` against ``train.max_steps``: only the data says how many steps an epoch is) is
    refused before that work, not after it.

    Raises:
        ConfigError: ``train.batch_size`` (no full step, :func:`full_steps`); ``train.warmup_steps`` /
            ``train.warmup_epochs``: the warmup is not shorter than the run.
    """
    world_size = D.world_size() if world_size is None else world_size
    per_rank = num_samples // world_size if streaming else math.ceil(num_samples / world_size)  # the sampler's
    steps_per_epoch = full_steps(num_samples, per_rank, cfg, world_size)
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    warmup = cfg.warmup_steps or round(cfg.warmup_epochs * steps_per_epoch)
    if warmup >= total:
        key = "train.warmup_steps" if cfg.warmup_steps else "train.warmup_epochs"
        raise ConfigError(key, f"warmup ({warmup} steps) must be shorter than training ({total} steps)")
    return steps_per_epoch, total, warmup


class TrainingInterrupted(PicklableError, KeyboardInterrupt):
    """``fit()`` was stopped by SIGINT or SIGTERM after ``step`` optimizer steps.

    On the first signal every rank finishes the step in progress (they agree on which step in the step's
    sync), the checkpoint of that step is written as a periodic one would be (``checkpoint``; ``saved`` True),
    the output folder's lock is released and this is raised. A second SIGINT (Ctrl-C again, a second or more
    later) raises it at once without saving (``saved`` False unless the step was just saved; ``checkpoint`` is
    then the last one written, ``checkpoint_step`` its step, or None). ``resume="auto"`` continues from it.

    A ``KeyboardInterrupt``, so code that stops on Ctrl-C stops on it too; ``exit_code`` is the shell's
    ``128 + signal`` (130 for SIGINT, 143 for SIGTERM), which ``beit`` exits with. ``summary`` is the message
    without the resume hint.
    """

    def __init__(self, signum: int, step: int, checkpoint: Path | None, checkpoint_step: int | None = None, *,
                 at_once: bool = False):
        self.signum, self.step, self.checkpoint = int(signum), step, checkpoint
        self.checkpoint_step = step if checkpoint_step is None and checkpoint is not None else checkpoint_step
        self.saved = checkpoint is not None and self.checkpoint_step == step
        self.exit_code = 128 + self.signum
        self.signal_name = signal.Signals(self.signum).name
        if not at_once:
            head = f"interrupted by {self.signal_name} after step {step}"
        else:
            head = f"stopped at once by a second {self.signal_name} after step {step}"
        if self.saved:
            self.summary = f"{head}; checkpoint of that step: {checkpoint}"
        elif checkpoint is not None:
            self.summary = f"{head}, not saved; the last checkpoint is {checkpoint} (step {self.checkpoint_step})"
        else:
            self.summary = f"{head}, not saved; no checkpoint written yet"
        hint = "; resume with train.resume=auto (--resume auto)" if checkpoint is not None else ""
        super().__init__(self.summary + hint)


class TrainingDivergedError(PicklableError, RuntimeError):
    """Training diverged at optimizer step ``step`` (1-based): its loss or gradient norm was NaN/inf (then
    that step's optimizer update was not made), or its optimizer update made the weights non-finite
    (``reason`` says so). Either way no checkpoint of that step or later was written: ``last_checkpoint``
    (if any) holds finite weights."""

    def __init__(self, step: int, metrics: dict[str, float], last_checkpoint: Path | None,
                 reason: str | None = None):
        self.step, self.metrics, self.last_checkpoint, self.reason = step, metrics, last_checkpoint, reason
        shown = ", ".join(f"{k}={v:.6g}" for k, v in metrics.items())
        where = f"last good checkpoint: {last_checkpoint}" if last_checkpoint else "no checkpoint saved yet"
        what = f"{reason} ({shown})" if reason else shown
        super().__init__(f"training diverged at step {step}: {what}. {where}. Lower the lr, raise warmup, "
                         "set clip_grad, or check the batch (e.g. a mask with no masked patch).")


def _error_named(name: str, message: str) -> Exception:
    """Rebuild on this rank an error that rank 0 raised: a ``beit.engine.rundir`` error or a builtin one
    (``PermissionError``, ...) of that name, else a ``RuntimeError``."""

    for where in (rundir, builtins):
        cls = getattr(where, name, None)
        if isinstance(cls, type) and issubclass(cls, Exception):
            try:
                return cls(message)
            except TypeError:
                break
    return RuntimeError(f"{name}: {message}")


def _weights_probe(params: list[torch.Tensor]) -> torch.Tensor | None:
    """A 0-d tensor on the params' device: 0 when every weight is finite, NaN otherwise; no host sync.

    One fused norm per parameter (a read of the weights, small next to the optimizer step). Under FSDP each
    rank looks at its own shard (no collective).
    """
    local = [p.to_local() if hasattr(p, "to_local") else p for p in params]
    local = [p.detach() for p in local if p.numel() > 0]
    if not local:
        return None
    # fp16/bf16 norms accumulate in float32: the L2 norm of finite fp16 weights can pass fp16's 65504 (a false
    # alarm); other dtypes keep their own (float64 cannot be narrowed by the norm)
    half = [p for p in local if p.dtype in (torch.float16, torch.bfloat16)]
    rest = [p for p in local if p.dtype not in (torch.float16, torch.bfloat16)]
    norms = list(torch._foreach_norm(half, dtype=torch.float32)) if half else []
    if rest:
        norms += list(torch._foreach_norm(rest))
    if len({n.dtype for n in norms}) > 1:  # mixed dtypes (rare): stack needs one
        norms = [n.float() for n in norms]
    return torch.stack(norms).amax().float() * 0.0  # inf * 0 and NaN * 0 are NaN


def step_checks(loss: torch.Tensor, grad_norm: torch.Tensor, weights_probe: torch.Tensor | None) -> torch.Tensor:
    """What the engine checks for finiteness every step, stacked on the loss's device (read with one host
    sync): the step's loss and grad norm, and the probe of the weights the previous update left
    (:func:`_weights_probe`; None when not probed)."""
    checks = [loss.detach().float(), grad_norm.to(loss.device)]
    if weights_probe is not None:
        checks.append(weights_probe.to(loss.device))
    return torch.stack(checks)


def grad_norm_(params: list[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """The total L2 norm of ``params``' gradients (float32, 0-d, on their device, a CPU zero when none has a
    gradient; no host sync), clipping them to ``max_norm`` when it is set. Without clipping no pass scales the
    gradients by 1 (as ``clip_grad_norm_(..., inf)`` would): the norm alone, for the log and the finiteness
    check. A DTensor norm (FSDP2) is gathered to a full tensor."""
    if max_norm:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
        norm = norm.full_tensor()
    return norm.detach().float()


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a side job (eval, visualization) without moving the training RNG streams, so that where
    checkpoints, evals and images happen never changes the training losses."""
    state = get_rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


class ModelEMA:
    """Exponential moving average of the weights: ``ema = decay * ema + (1 - decay) * w`` after every step.

    ``ema.module`` is a frozen copy of the (unwrapped) model, usable for evaluation.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_params = list(self.module.parameters())
        torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1.0 - self.decay)
        for ema_b, b in zip(self.module.buffers(), model.buffers()):
            ema_b.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state_dict)


def _ignore_stop_signal(signum: int, frame: Any) -> None:
    """A DataLoader worker's handler of SIGINT / SIGTERM: nothing (see :func:`worker_init`)."""


def worker_init(worker_id: int) -> None:
    """``worker_init_fn`` of every DataLoader that runs inside :meth:`Trainer.fit` (the training loader, and the
    tasks' evaluation loaders called from it): seeds ``random`` and numpy from the worker's torch seed, and
    makes the worker ignore SIGINT / SIGTERM, so a stop signal sent to the whole job stops the run cleanly
    (the training process decides) instead of killing the workers under it mid-step or mid-evaluation."""
    # torch seeds each worker with base_seed + worker_id (base_seed comes from the loader's own generator);
    # give python and numpy the same, so nothing depends on the parent's RNG.
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
    # Ctrl-C reaches the terminal's whole process group, and timeout(1), scancel, ... signal every process of the
    # job: a worker killed by it makes torch raise "DataLoader worker ... killed" in the training process at any
    # point, mid optimizer step included. The training process decides how to stop (Trainer.fit) and ends its
    # workers itself; a worker whose training process is gone exits on its own (torch's watchdog). A Python
    # handler (not SIG_IGN): programs the worker runs get the default handlers back.
    for sig in STOP_SIGNALS:
        signal.signal(sig, _ignore_stop_signal)


def _check_resumable(state: dict[str, Any], path: Path, task: str | None, run_config: Any, cfg: Any, *,
                     report: bool = True) -> None:
    """The checkpoint ``state`` (read from ``path``) is of ``task`` and its config fits ``run_config``.
    ``report=False``: the lines of an accepted resume are left to the real resume (see :func:`check_resume_config`)."""
    check_checkpoint_task(state.get("task"), task, source=path)
    check_resume_config(state.get("config"), to_dict(run_config), source=path,
                        allow=getattr(cfg, "allow_config_change", False),
                        stored_world_size=state.get("world_size"), world_size=D.world_size(), report=report)


def _run_inputs(run_config: Any, inputs: Mapping[str, str | Path] | None = None) -> dict[str, str | Path]:
    """The paths a run reads, dotted key -> path: those its config names (:func:`~beit.engine.rundir.config_inputs`)
    and ``inputs``, those a task derives from it (an ``--overwrite`` deletes none of them)."""
    return {**config_inputs(to_dict(run_config)), **(inputs or {})}


def check_run_can_start(cfg: TrainConfig, run_config: Any = None, task: str | None = None,
                        check_state: Callable[[dict[str, Any], Path], None] | None = None,
                        inputs: Mapping[str, str | Path] | None = None) -> None:
    """The refusals :meth:`Trainer.fit` makes when it opens ``cfg.output_dir``, made early and changing nothing
    (no ``*.tmp`` file removed: the run's lock is not held; see ``prepare_output_dir(check_only=True)``),
    for tasks that do long work before ``fit()`` (``beit linprobe`` extracts every image's features first): an
    explicit ``resume`` that does not exist, cannot be read, is another task's or was trained with another config;
    ``resume=auto``'s ``last.pt`` of another task or config; a folder holding an earlier run without ``resume`` or
    ``overwrite``. (What ``fit()`` decides from more than that, e.g. auto's fallback past a damaged ``last.pt``,
    it still decides there.)

    An accepted resume is said once, by ``fit()`` when it resumes (the changed settings, a config allowed to
    change): this check logs nothing then. When it refuses, ``fit()`` never runs, so it says what ``fit()``
    would have said before raising.

    Rank 0 checks (as ``fit()`` decides there) and every rank raises its refusal (so none waits in a collective).
    ``check_state(state, path)``: the task's own check of the checkpoint to resume, once the engine's passed
    (segmentation: the decode head's number of classes); it raises to refuse. ``inputs``: as the trainer's
    (:class:`Trainer`), the paths the run reads besides those its config names.

    Raises:
        FileNotFoundError, ValueError, TaskMismatchError, ConfigChangedError, RunExistsError: as ``fit()`` would.
    """
    error = None
    if D.is_main():
        try:
            _check_run_can_start(cfg, run_config, task, check_state, inputs)
        except Exception as e:  # noqa: BLE001 - every error reaches the other ranks, then is raised
            error = e
    outcome = D.broadcast_object(None if error is None else (type(error).__name__, str(error)))
    if error is not None:
        raise error
    if outcome is not None:  # rank 0 refused: the same error here
        raise _error_named(*outcome)


def _check_run_can_start(cfg: TrainConfig, run_config: Any, task: str | None,
                         check_state: Callable[[dict[str, Any], Path], None] | None = None,
                         inputs: Mapping[str, str | Path] | None = None) -> None:
    out = Path(cfg.output_dir)
    path = find_resume_path(cfg.resume, out)
    if cfg.resume == "auto" and path is None:
        return  # fit() resumes the newest readable step checkpoint, or starts from step 0
    task = task if task is not None else task_of(run_config)
    prepare_output_dir(out, resume_path=path, resume=cfg.resume, overwrite=cfg.overwrite, check_only=True,
                       inputs=_run_inputs(run_config if run_config is not None else cfg, inputs),
                       task=task, folder_task=lambda: recorded_task(out))  # or refuses
    if path is None:
        return
    try:
        state = load_checkpoint(path, full=not path.is_dir())
    except (ValueError, OSError):
        if cfg.resume == "auto":
            return  # fit() falls back to the newest readable checkpoint
        raise
    _check_resumable(state, path, task, run_config or cfg, cfg, report=False)
    if check_state is not None:
        check_state(state, path)


def _eager() -> contextlib.AbstractContextManager:
    """Evaluation and pictures run the compiled blocks eagerly: their inputs (sliding windows, multi-scale
    inference, other batch sizes, no_grad) would otherwise trigger recompiles with dynamic shapes at the
    first eval, where dynamo bugs can lose the run; training keeps its compiled graphs."""
    return torch.compiler.set_stance("force_eager")


#: said once when train.compile is on without CUDA (a preset's compile on a laptop): what it costs, how to skip it
COMPILE_ON_CPU = ("train.compile=true without CUDA: the first steps compile C++ kernels for the CPU (minutes on a "
                  "laptop, for little gain in a smoke test); train.compile=false skips it")


class Trainer:
    """Trains ``model`` on ``train_dataset`` with ``step_fn``; see the module docstring.

    Args:
        model: the plain module (not yet on device, compiled or wrapped; the trainer does all three).
        train_dataset: map-style dataset; ``set_epoch(epoch)`` is called each epoch when it exists.
        step_fn: ``(model, batch) -> (loss, metrics)``; ``batch`` is already on the device. ``metrics`` are
            scalars (floats or 0-d tensors, kept on device until a log step); with several ranks every rank
            must return the same keys (they are averaged over ranks in one collective).
        cfg: the :class:`TrainConfig`.
        collate_fn: for the DataLoader.
        device_transform: ``batch -> batch`` applied on the device after the move and before ``step_fn``
            (a task's nvJPEG decode + augmentation pipeline). On CUDA it runs one batch ahead on a side
            stream, overlapping the previous step (:class:`~beit.engine.prefetch.DevicePrefetcher`); it must
            not draw from the global RNG (the order of its calls and the steps' is not fixed).
        eval_fn: ``(model) -> dict[str, float]``, called on every rank every ``eval_every`` epochs and at the
            end, in eval mode under ``no_grad`` and autocast; it decides whether to shard or run on rank 0
            only. Rank 0's result is logged and used for ``metric_to_track``. With ``ema`` it is also called
            on the EMA model and those metrics are prefixed ``ema_``.
        visualize_fn: ``(model, step, out_dir)`` every ``image_every`` steps, on rank 0 (on every rank
            under FSDP, where a forward needs all ranks; write files on rank 0 only).
        metric_to_track / mode: the eval metric whose best value (``"max"`` or ``"min"``) makes ``best.pt``.
        param_groups: custom optimizer groups, or a callable ``(model) -> groups`` (required under FSDP,
            which replaces the parameters). Groups may carry ``lr_scale``. Default: :func:`param_groups`
            with the config's weight decay and layer decay.
        run_config: the task's whole config (stored in checkpoints and ``config.yaml``); default ``cfg``.
        task: the task name checkpoints record (``"pre-training"``, ...): a resume refuses a checkpoint that
            records another. Default: :func:`task_of` ``(run_config)``.
        outputs: the names of the files and folders the task writes into ``output_dir`` besides the engine's
            (its ``OUTPUTS``, e.g. pre-training's ``("final", "mim_panel.png")``): ``--overwrite`` deletes them
            with the earlier run's checkpoints (:func:`~beit.engine.rundir.prepare_output_dir`).
        inputs: the paths the run reads that its config does not name, dotted key -> path (a folder the task
            derives from its config, e.g. layout's page images in ``images/`` next to ``data.train_ann`` when
            ``data.train_images`` is unset); with the paths the config names (:func:`~beit.engine.rundir.config_inputs`)
            they are what ``--overwrite`` never deletes.
    """

    #: a second SIGINT this many seconds or more after the first stops at once (sooner: the same Ctrl-C, sent
    #: twice by a launcher, e.g. timeout(1) signals its child and then the child's process group)
    ABORT_AFTER_S = 1.0

    def __init__(self, model: nn.Module, train_dataset: Dataset, step_fn: StepFn, cfg: TrainConfig, *,
                 collate_fn: Callable | None = None, device_transform: Callable[[Any], Any] | None = None,
                 eval_fn: Callable[[nn.Module], dict] | None = None,
                 visualize_fn: Callable[[nn.Module, int, Path], None] | None = None,
                 metric_to_track: str | None = None, mode: str = "max",
                 param_groups: list[dict] | Callable[[nn.Module], list[dict]] | None = None,
                 run_config: Any = None, task: str | None = None, outputs: Sequence[str] = (),
                 inputs: Mapping[str, str | Path] | None = None):
        validate_config(cfg)
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        D.init_distributed()
        self.cfg, self.dataset, self.step_fn = cfg, train_dataset, step_fn
        self.collate_fn, self.eval_fn, self.visualize_fn = collate_fn, eval_fn, visualize_fn
        self.device_transform = device_transform
        self.metric_to_track, self.mode = metric_to_track, mode
        self.run_config = run_config if run_config is not None else cfg
        self.task = task if task is not None else task_of(self.run_config)
        self.outputs = tuple(outputs)
        self.inputs = dict(inputs or {})
        self.device = D.device()
        self.main = D.is_main()
        self.out = Path(cfg.output_dir)
        self.log = setup_logging(self.out, self.main)
        #: the loader workers used: train.num_workers capped at the CPUs this process may use (one line if so)
        self.num_workers = loader_workers(cfg.num_workers, say=self.main)
        fsdp = cfg.distributed == "fsdp" and D.world_size() > 1
        if fsdp and cfg.ema > 0:
            raise ConfigError("train.ema", "model EMA is not supported with distributed=fsdp yet")
        if fsdp and cfg.compile and cfg.compile_scope == "model":
            raise ConfigError("train.compile_scope", "'model' (one graph for the whole model) does not work "
                                                     "with distributed=fsdp, which shards per block: use 'blocks'")
        if fsdp and param_groups is not None and not callable(param_groups):
            raise ValueError("under FSDP pass param_groups as a callable (model) -> groups: sharding "
                             "replaces the parameters")

        # Steps, checked before any work: an epoch is this rank's shard in full batches, by accum_steps.
        # A streaming (iterable) dataset, e.g. webdataset shards, splits itself across ranks and workers;
        # its len() is the nominal number of samples of one epoch over all ranks.
        self.streaming = isinstance(train_dataset, IterableDataset)
        self.sampler = None if self.streaming else ResumableDistributedSampler(
            len(train_dataset), cfg.batch_size, seed=cfg.seed)
        self.steps_per_epoch, self.total_steps, self.warmup_steps = check_schedule(
            len(train_dataset), cfg, D.world_size(), streaming=self.streaming)
        if self.sampler is not None:  # one pass through every epoch, each cut to its full steps (distributed.py)
            self.sampler.epoch_batches = self.steps_per_epoch * cfg.accum_steps

        # Model: device -> EMA copy -> regional compile -> DDP/FSDP2 (torchtitan's order) -> optimizer.
        # Compile only the repeated blocks (D.repeated_blocks: the model protocol of docs/CONTRACTS.md), then
        # FSDP2 shards those blocks and the root; DDP wraps the whole. See D.compile_blocks / D.wrap_model.
        seed_everything(cfg.seed + D.rank())  # the training RNG stream (dropout, drop-path), per rank
        self.num_params = sum(p.numel() for p in model.parameters())
        self.use_bf16 = use_bf16(self.device, cfg.precision)
        # Under FSDP2 rank 0 keeps a plain CPU copy to export the final weights into (export_model): a
        # sharded module cannot run a forward or be written on one rank alone.
        self._export_copy = copy.deepcopy(model).cpu() if fsdp and self.main else None
        model.to(self.device)
        self.ema = ModelEMA(model, cfg.ema) if cfg.ema > 0 else None
        if cfg.compile:
            if self.device.type != "cuda" and self.main:
                self.log.info(COMPILE_ON_CPU)
            D.compile_blocks(model, cfg.distributed if D.world_size() > 1 else "none", scope=cfg.compile_scope)
        self.model = D.wrap_model(model, cfg, bf16=self.use_bf16)
        self.raw_model = D.unwrap_model(self.model)
        if callable(param_groups):
            groups = param_groups(self.raw_model)
        elif param_groups is not None:
            groups = param_groups
        else:
            groups = O.param_groups(self.raw_model, cfg.weight_decay, cfg.layer_decay, cfg.lr)
        self.optimizer = build_optimizer(groups, cfg.lr, cfg.betas, cfg.eps, cfg.weight_decay)
        self.host_threads: int | None = None  # intra-op threads while fit() runs beside workers (engine/threads.py)
        self._weights_check: torch.Tensor | None = None  # the last update's weights probe (step_checks)
        self._loader: DataLoader | None = None  # map-style: one loader, persistent workers across epochs
        self._prefetcher: DevicePrefetcher | None = None  # map-style: its batches, one iterator through the epochs
        # skipped files: (total of the epochs recorded whole, the last of them), and epochs recorded in part
        self._skips_done: tuple[int, int] = (0, -1)
        self._skips_partial: dict[int, int] = {}

        # Position: the next optimizer step, and the epoch / loader batch it starts at.
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.best: dict[str, Any] | None = None  # {"metric", "value", "step"}
        self.ckpt = CheckpointManager(self.out, cfg.keep_last)
        self.metric_logger: MetricLogger | None = None
        self.last_train: dict[str, float] = {}
        self.last_eval: dict[str, float] = {}
        self._new_best = False
        self.bar: tqdm | None = None
        self._restored_window: dict | None = None
        # stopping on a signal: the one received (0: none) and when; the checkpoint (step, path) that holds the
        # current state, for the message
        self._signal, self._signal_time, self._signal_pid = 0, 0.0, os.getpid()
        self._checkpoint: tuple[int, Path] | None = None
        # the checkpoint this fit() resumes from, picked by rank 0 (and on rank 0 its state, already read)
        self._resume_path: Path | None = None
        self._resume_state: dict[str, Any] | None = None
        self._damaged_last: tuple[Any, ...] | None = None  # identity of the last.pt that auto had to skip
        self._missing_last: Path | None = None  # the last.pt (last) that auto found missing
        self._reset_window()

    # --- the loop --------------------------------------------------------------------------------------

    def fit(self, stop_after_step: int | None = None) -> dict[str, float]:
        """Train to the end (or until ``stop_after_step``, without changing the lr schedule); return the
        last train window's metrics (``train/...``), the last eval (``eval/...``) and the best value.

        The output folder is locked for the duration (one run per folder) and a fresh run into a folder
        holding an earlier run is refused unless ``resume`` or ``overwrite`` (see ``beit.engine.rundir``).

        SIGINT / SIGTERM stop the run cleanly (see :class:`TrainingInterrupted`); the signal handlers in place
        before are restored when ``fit()`` returns or raises.

        Raises:
            RunLockedError / RunExistsError / ConfigChangedError / TaskMismatchError (``RunDirError``, a
                ``ValueError``): the folder is in use, holds an earlier run, or the resumed checkpoint's config
                differs or is another task's.
            ValueError: the checkpoint to resume is damaged (named); with ``resume="auto"`` only when no
                checkpoint of the folder is readable.
            TrainingDivergedError: a non-finite loss, gradient norm or weights (the last good checkpoint kept).
            TrainingInterrupted: SIGINT or SIGTERM (a ``KeyboardInterrupt``; the checkpoint written is named).
            OSError: a checkpoint could not be written (e.g. a full disk), naming the file.
        """
        with self._stop_on_signals():
            lock = self._open_output_dir()
            try:
                return self._fit(stop_after_step)
            finally:
                if lock is not None:
                    lock.release()

    # --- stopping on a signal --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """While the block runs, :data:`STOP_SIGNALS` ask for a clean stop (:meth:`_on_signal`) instead of
        killing the process; the previous handlers are restored after. Only in the main thread (Python runs
        handlers there), and never over a signal that is ignored (``SIG_IGN``: SIGINT of a background job) or
        handled outside Python."""
        self._signal, self._signal_time = 0, 0.0
        self._signal_pid = os.getpid()
        previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                handler = signal.getsignal(sig)
                if handler is None or handler == signal.SIG_IGN:
                    continue
                previous[sig] = handler
                signal.signal(sig, self._on_signal)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        """The first signal asks for a stop after the step in progress (the ranks agree on the step in its
        sync, see :meth:`_train_steps`); a second SIGINT (``ABORT_AFTER_S`` or more later) raises
        :class:`TrainingInterrupted` here and now, unsaved. A repeated SIGTERM changes nothing (timeout(1) and
        torchrun may send more than one; whoever wants it over sooner sends SIGKILL). In a forked DataLoader
        worker that the signal reaches before its ``worker_init`` replaced this handler: nothing."""
        if os.getpid() != self._signal_pid:
            return
        if self._signal:
            if signum == signal.SIGINT and time.monotonic() - self._signal_time >= self.ABORT_AFTER_S:
                raise self._interrupted(signum, at_once=True)
            return
        self._signal, self._signal_time = signum, time.monotonic()
        if self.main:  # os.write: safe whatever the interrupted code was writing
            os.write(2, f"\n{signal.Signals(signum).name}: stopping after this step to save a checkpoint "
                        "(Ctrl-C again: stop at once, without saving)\n".encode())

    def _interrupted(self, signum: int, *, at_once: bool = False) -> TrainingInterrupted:
        """The exception for a stop at the current step, naming the checkpoint that holds it (or the last one)."""
        step, path = self._checkpoint if self._checkpoint is not None else (None, None)
        return TrainingInterrupted(signum, self.step, path, step, at_once=at_once)

    def _stop(self, signum: int) -> None:
        """The stop that every rank agreed on, after a finished step: its checkpoint (unless the step's own
        bookkeeping just wrote it; a collective), a line in ``log.txt``, then :class:`TrainingInterrupted`."""
        if self._checkpoint is None or self._checkpoint[0] != self.step:
            self._check_weights_before_save()
            self.save()
        error = self._interrupted(signum)
        log_to_file(self.log, logging.WARNING, str(error))  # the console gets it from the caller (beit's last line)
        raise error

    #: words in an error (or its causes) that a stop signal reaching the step's helper processes produces: inductor's
    #: compile workers killed mid-compile, a DataLoader worker killed
    STOP_DAMAGE = ("InductorError", "SubprocException", "BrokenProcessPool", "killed by signal",
                   "terminated abruptly")

    def _stop_if_signalled(self, error: Exception) -> None:
        """A step that raised while a stop signal was pending, in a single process, with an error of the kind the
        signal itself causes (:data:`STOP_DAMAGE`: timeout(1), scancel and Ctrl-C in a terminal signal the whole
        process group, so inductor's compile workers or the loader's workers die mid-step): the stop the user
        asked for, not a fault to report with a traceback. Raises :class:`TrainingInterrupted` (chained from
        ``error``) naming the last checkpoint written: the failed step is not saved, since it already drew random
        numbers and set its learning rate (a resume from it would not repeat the run). Returns, and the caller
        re-raises ``error``, for any other error (a real fault stays one, Ctrl-C or not), without a signal, or
        under several ranks (the other ranks may wait in the step's collectives)."""
        if not self._signal or D.is_dist():
            return
        chain, e = [], error
        while e is not None and len(chain) < 8:
            chain.append(e)
            e = e.__cause__ or e.__context__
        if not any(w in f"{type(x).__name__}: {x}" for x in chain for w in self.STOP_DAMAGE):
            return
        first = (str(error).strip().splitlines() or [""])[0][:200]
        self.log.warning(f"step {self.step + 1} failed while stopping on {signal.Signals(self._signal).name} "
                         f"({type(error).__name__}: {first}): stopped after step {self.step}, that step not saved")
        raise self._interrupted(self._signal) from error

    def _unless_stopping(self, job: Callable[[], Any], what: str) -> None:
        """Run ``job`` (evaluation, pictures). While a stop is pending in a single process, an error of it is a
        warning, so that the step's checkpoint is still written: the signal may have reached the job's own
        DataLoader workers too (timeout(1), scancel and Ctrl-C in a terminal signal the whole process group).
        Otherwise (and under several ranks, where the job may be a collective) its errors propagate; in a single
        process the finished step's checkpoint is written first (a bad validation file found by the final
        evaluation lost the steps since the last checkpoint)."""
        try:
            job()
        except Exception as e:
            if D.is_dist():
                raise
            if not self._signal:
                self._save_before_raising(e, what)
                raise
            self.raw_model.train()
            first = (str(e).strip().splitlines() or [""])[0][:200]
            self.log.warning(f"{what} of step {self.step} was cut short while stopping on "
                             f"{signal.Signals(self._signal).name} ({type(e).__name__}: {first}): not recorded")

    def _save_before_raising(self, error: Exception, what: str) -> None:
        """Write the finished step's checkpoint (unless written) before ``error`` of ``what`` ends the run, and
        say so; a failure to save is logged and the original error still raised."""
        self.raw_model.train()
        if self._checkpoint is not None and self._checkpoint[0] == self.step:
            return
        try:
            self._check_weights_before_save()
            self.save()
        except Exception as save_error:  # noqa: BLE001 - the job's error is the one to report
            self.log.warning(f"{what} of step {self.step} failed and its checkpoint could not be written either "
                             f"({type(save_error).__name__}: {save_error})")
            return
        first = (str(error).strip().splitlines() or [""])[0][:200]
        self.log.warning(f"{what} of step {self.step} failed ({type(error).__name__}: {first}); the checkpoint of "
                         f"that step was written first, {self._checkpoint[1] if self._checkpoint else self.out}: "
                         "fix the cause and resume it (--resume auto / train.resume=auto)")

    def _open_output_dir(self) -> RunLock | None:
        """Rank 0 takes the folder's lock, picks the checkpoint to resume (:meth:`_pick_resume`) and decides
        fresh / overwrite / resume; every rank gets the outcome (so on a refusal all ranks raise the same error
        and none waits in a collective) and the checkpoint's path (``self._resume_path``)."""
        lock, error, resume_path = None, None, None
        self._resume_path, self._resume_state = None, None
        if self.main:
            try:
                lock = RunLock(self.out).acquire()
                resume_path, self._resume_state = self._pick_resume()
                if not getattr(self, "_fit_started", False):  # a second fit() of this trainer continues it
                    prepare_output_dir(self.out, resume_path=resume_path, resume=self.cfg.resume,
                                       overwrite=getattr(self.cfg, "overwrite", False), outputs=self.outputs,
                                       inputs=_run_inputs(self.run_config, self.inputs), task=self.task,
                                       folder_task=lambda: recorded_task(self.out))
            except Exception as e:  # noqa: BLE001 - every error reaches the other ranks, then is raised
                if lock is not None:
                    lock.release()
                self._resume_state = None
                error = e
            except BaseException:  # Ctrl-C twice while reading the checkpoint: the folder is not left locked
                if lock is not None:
                    lock.release()
                raise
        outcome = D.broadcast_object(("ok", None if resume_path is None else str(resume_path)) if error is None
                                     else (type(error).__name__, str(error)))
        if error is not None:
            raise error
        if outcome[0] != "ok":  # rank 0 refused: the same error here
            raise _error_named(*outcome)
        self._resume_path = None if outcome[1] is None else Path(outcome[1])
        self._fit_started = True
        return lock

    def _pick_resume(self) -> tuple[Path | None, dict[str, Any] | None]:
        """The checkpoint this fit() resumes from (None: none) and, for ``resume="auto"``, its state (read here
        to know it is readable). Auto takes ``last.pt`` (``last``), or when that is missing or cannot be read the
        newest readable checkpoint of the folder (:func:`~beit.engine.checkpoint.resume_candidates`), with a
        warning naming both; a folder without checkpoints starts from step 0. A path given explicitly is read
        later (:meth:`load`), its errors naming it.

        Raises:
            FileNotFoundError: an explicit path that does not exist.
            ValueError / OSError: auto, and no checkpoint of the folder is readable (the first error, naming
                ``last.pt`` or, without one, the newest step checkpoint, plus the others tried).
        """
        self._damaged_last, self._missing_last = None, None
        path = find_resume_path(self.cfg.resume, self.out)
        if self.cfg.resume != "auto":
            return path, None
        failed: list[tuple[Path, Exception]] = []
        for candidate in resume_candidates(self.out):
            sharded = candidate.is_dir() and D.is_fsdp(self.raw_model)
            try:
                state = load_checkpoint(candidate, full=not sharded)
                # another task's checkpoint (copied in by mistake) is passed over like an unreadable one
                check_checkpoint_task(state.get("task"), self.task, source=candidate)
            except (ValueError, OSError) as e:  # damaged, truncated, not a checkpoint, unreadable, another task's
                failed.append((candidate, e))
                continue
            if path is None:  # last.pt deleted, or never linked (killed between its first step checkpoint and it)
                self._missing_last = self.out / ("last" if candidate.is_dir() else "last.pt")
            if failed or path is None:
                shown = "; ".join([*([f"{self._missing_last} is missing"] if path is None else []),
                                   *(str(e).splitlines()[0] if str(candidate) in str(e) else f"{candidate}: {e}"
                                     for candidate, e in failed)])
                if failed and failed[0][0].name == "last.pt" and not isinstance(failed[0][1], TaskMismatchError):
                    self._damaged_last = _identity(failed[0][0])
                self.log.warning(f"resume=auto: {shown}. Resuming from the newest readable checkpoint instead: "
                                 f"{candidate} (step {state.get('step')})")
            return candidate, state
        if not failed:  # no checkpoint in the folder: a fresh start
            return None, None
        first, error = failed[0]
        if len(failed) > 1:
            others = ", ".join(p.name for p, _ in failed[1:])
            raise type(error)(f"{str(error).splitlines()[0]}; no other checkpoint of {self.out} is readable either "
                              f"({others})") from error
        raise error

    def _fit(self, stop_after_step: int | None) -> dict[str, float]:
        resume_path, state = self._resume_path, self._resume_state
        self._resume_state = None
        if resume_path is not None:
            self.load(resume_path, state=state)
            del state
            if self.main:
                self._set_aside_later_checkpoints(resume_path)
        elif self.cfg.resume == "auto" and self.step == 0:
            self.log.info(f"resume=auto: no checkpoint in {self.out} yet, starting from step 0")
        self._weights_check = None
        self._prefetcher = None  # batches from the (possibly restored) position
        threads_before = torch.get_num_threads()
        self.host_threads = cap_intra_op_threads(self.device, self.num_workers)
        continuing = resume_path is not None or self.step > 0  # resumed, or this trainer's second fit()
        self.metric_logger = MetricLogger(self.out, enabled=self.main,
                                          resume_step=self.step if continuing else None)
        if self.main:
            with atomic_write(self.out / "config.yaml") as tmp:
                save_config(self.run_config, tmp)
        self._print_setup()
        self._reset_window()
        if self._restored_window is not None:
            self._win.update(self._restored_window)
            self._restored_window = None
        end = self.total_steps if stop_after_step is None else min(stop_after_step, self.total_steps)
        if resume_path is not None and self.step >= self.total_steps:
            self.log.warning(f"the checkpoint {resume_path} is at step {self.step}, at or past this run's last step "
                             f"{self.total_steps}: nothing left to train (raise train.max_steps or train.epochs "
                             "to continue it)", extra=ALIKE_ON_EVERY_RANK)
        self.bar = tqdm(total=self.total_steps, initial=self.step, dynamic_ncols=True,
                        disable=not (self.main and sys.stderr.isatty()))
        try:
            with console_through_tqdm(self.log):
                while self.step < end:
                    self.train_one_epoch(end)
        finally:
            # Clean-up must not replace the error that stopped training (e.g. a checkpoint on a full disk):
            # a failure here is logged as a warning (metrics.jsonl stays the source of truth).
            self.bar.close()
            self.bar = None
            if self.host_threads:
                torch.set_num_threads(threads_before)
            for what, job in (("stop the DataLoader workers", self._stop_loader_workers),
                              ("write the TensorBoard logs", self.metric_logger.close),
                              ("write curves.png", lambda: self.main and plot_curves(self.out / "metrics.jsonl",
                                                                                     self.out / "curves.png"))):
                try:
                    job()
                except Exception as e:  # noqa: BLE001 - reported, never masks the training error
                    self.log.warning(f"could not {what} ({self.out}): {e}")
        # a signal after the last step's sync (or during the clean-up): the ranks agree here (also the barrier)
        stop = D.max_over_ranks(self._signal)
        if stop and self.step < self.total_steps:
            error = self._interrupted(stop)
            log_to_file(self.log, logging.WARNING, str(error))
            raise error
        if stop:
            self.log.warning(f"{signal.Signals(stop).name} came with the run's last step ({self.step}): the run "
                             "is complete and finishes normally")
        return self._final_metrics()

    def _set_aside_later_checkpoints(self, resume_path: Path) -> None:
        """After a resume from step S (rank 0): the folder's step checkpoints of steps after S belong to a
        branch this run abandons; they move into ``abandoned/`` (one line), so that they neither count toward
        ``keep_last`` nor get resumed by mistake (``CheckpointManager.set_aside_after``). A damaged ``last.pt``
        that ``resume="auto"`` skipped moves there too, ``last.pt`` then naming the resumed checkpoint; a missing
        one is made to name it again.

        Raises:
            OSError: a checkpoint could not be moved, naming it.
        """
        moved = self.ckpt.set_aside_after(self.step, resume_path)
        if self._damaged_last is not None and _identity(self.out / "last.pt") == self._damaged_last:
            moved += [p for p in [self.ckpt.set_aside_damaged_last(resume_path)] if p is not None]
        if self._missing_last is not None and not self._missing_last.exists():
            self.ckpt.link_last(resume_path)  # readable again before the next save (readers of a finished run)
        self._damaged_last, self._missing_last = None, None
        if moved:
            self.log.warning(f"resumed at step {self.step} from {resume_path}: moved {len(moved)} checkpoint(s) "
                             f"of later steps (an abandoned branch) or damaged into {self.out / 'abandoned'}/ "
                             f"({', '.join(p.name for p in moved)}), not deleted")

    def train_one_epoch(self, end_step: int) -> None:
        """Optimizer steps from the current position to the end of the epoch (or ``end_step``)."""
        self.model.train()
        if not self.streaming:
            # one iterator through the epochs: the loader's workers never drain at an epoch boundary
            if self._prefetcher is None:
                self._prefetcher = DevicePrefetcher(self._batches(), self.device, self.device_transform)
            self._train_steps(self._prefetcher, end_step)
            return
        stream = self._batches()  # a stream restarts its pass per epoch
        try:
            self._train_steps(DevicePrefetcher(stream, self.device, self.device_transform), end_step)
        finally:  # end this pass's (non-persistent) workers now, also when a step raised: a caller that keeps
            stream.close()  # the exception keeps its traceback's frames, and with them the loader's iterator

    def _train_steps(self, batches: DevicePrefetcher, end_step: int) -> None:
        """The optimizer steps of :meth:`train_one_epoch`, batches from ``batches``."""
        cfg, model, opt = self.cfg, self.model, self.optimizer
        params = [p for g in opt.param_groups for p in g["params"]]
        epoch = self.epoch
        while self.epoch == epoch and self.step < end_step:  # _after_step advances the epoch
            lr = lr_at(self.step, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=self.warmup_steps,
                       total_steps=self.total_steps, schedule=cfg.schedule, power=cfg.poly_power)
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_scale"]

            loss_sum, metric_sums = 0.0, {}
            for micro in range(cfg.accum_steps):
                try:
                    batch = next(batches)
                    with D.grad_sync(model, enabled=micro == cfg.accum_steps - 1):
                        with self._autocast():
                            loss, metrics = self.step_fn(model, batch)
                        (loss / cfg.accum_steps).backward()
                except Exception as e:
                    self._stop_if_signalled(e)  # the stop's own doing (its helper processes killed): a clean stop
                    raise
                # the GPU has this backward queued: prepare the next batch beside it (engine/prefetch.py),
                # also the next epoch's first one (not a stream's: its next pass starts at the next epoch)
                steps_left = end_step - self.step
                if self.streaming:
                    steps_left = min(steps_left, self.steps_per_epoch - self.batch_in_epoch // cfg.accum_steps)
                if steps_left * cfg.accum_steps > micro + 1:
                    batches.prefetch()
                loss_sum = loss_sum + loss.detach().float()
                for k, v in metrics.items():
                    v = v.detach().float() if torch.is_tensor(v) else v
                    metric_sums[k] = metric_sums.get(k, 0.0) + v
            loss = loss_sum / cfg.accum_steps
            metrics = {k: v / cfg.accum_steps for k, v in metric_sums.items()}

            grad_norm = self._clip_grad(params)
            # one sync a step, all ranks agree: this step's loss and grad norm, the weights left by the previous
            # update, and whether any rank got a stop signal (then every rank stops after this step)
            finite, stop = D.all_finite_and_flag(step_checks(loss, grad_norm, self._weights_check), self._signal)
            if not finite:
                self._diverged(loss, grad_norm, metrics)
            opt.step()
            self._weights_check = self._probe_weights(params)
            opt.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.update(self.raw_model)

            self.step += 1
            self.batch_in_epoch += cfg.accum_steps
            self._accumulate(loss, grad_norm, metrics, lr)
            self._after_step(end_step)
            if not D.is_dist():  # one process: also a signal that came after the sync
                stop = stop or self._signal
            if stop and self.step < self.total_steps:  # on the run's last step: it finishes (saved, exported)
                self._stop(stop)

    def _after_step(self, end_step: int) -> None:
        """Logging, eval, images and checkpoints, in an order that keeps ``best.pt`` consistent."""
        cfg = self.cfg
        epoch_done = self.batch_in_epoch >= self.steps_per_epoch * cfg.accum_steps
        if epoch_done:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        finished = self.step >= self.total_steps
        if self.bar is not None:
            self.bar.update(1)
        if self.step % cfg.log_every == 0 or finished:
            self._log_train()
        if epoch_done or finished:
            self._log_skipped(self.epoch - 1 if epoch_done else self.epoch, complete=epoch_done)
        paused = time.perf_counter()  # time spent below is not training time: keep it out of img/s
        if self.eval_fn is not None and (finished or (epoch_done and cfg.eval_every > 0
                                                      and self.epoch % cfg.eval_every == 0)):
            self._unless_stopping(self.evaluate, "the evaluation")
        if self.visualize_fn is not None and cfg.image_every > 0 and self.step % cfg.image_every == 0:
            self._unless_stopping(self._visualize, "the pictures")
        if self.step % cfg.ckpt_every == 0 or epoch_done or finished or self.step == end_step:
            self._check_weights_before_save()
            self.save()
        self._win["t0"] += time.perf_counter() - paused

    # --- pieces of a step ------------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager:
        return autocast_for(self.device, self.cfg.precision)

    def _clip_grad(self, params: list[torch.Tensor]) -> torch.Tensor:
        """Clip to ``clip_grad`` if set; return the total grad norm either way (it is logged)."""
        return grad_norm_(params, self.cfg.clip_grad)

    def _probe_weights(self, params: list[torch.Tensor]) -> torch.Tensor | None:
        """After ``opt.step()``: a device flag of the updated weights' finiteness (checked in the next step's
        sync and before a save). Under FSDP a rank sees only its shard, so the per-step flag is skipped there
        (the next loss, computed from the gathered weights, is non-finite on every rank alike) and the
        pre-save check reduces over ranks."""
        if D.is_fsdp(self.raw_model):
            return None
        return _weights_probe(params)

    def _check_weights_before_save(self) -> None:
        """Never write a checkpoint with non-finite weights: check the last update's weights (a host sync, at
        save steps only; a collective under FSDP, where every rank saves together)."""
        if D.is_fsdp(self.raw_model):
            probe = _weights_probe([p for g in self.optimizer.param_groups for p in g["params"]])
            bad = D.all_reduce_mean({"bad": torch.isnan(probe).float() if probe is not None else 0.0})["bad"]
        else:
            probe = self._weights_check
            bad = float(probe is not None and not bool(torch.isfinite(probe)))
        if bad:
            self._weights_diverged(self.step)

    def _weights_diverged(self, step: int) -> None:
        lr = lr_at(step - 1, lr=self.cfg.lr, min_lr=self.cfg.min_lr, warmup_steps=self.warmup_steps,
                   total_steps=self.total_steps, schedule=self.cfg.schedule, power=self.cfg.poly_power)
        last = find_resume_path("auto", self.out)
        reason = "its optimizer update made the weights non-finite"
        self.log.error(f"non-finite weights after the optimizer update of step {step} (lr {lr:.3g})")
        raise TrainingDivergedError(step, {"lr": lr}, last, reason=reason)

    def _diverged(self, loss: torch.Tensor, grad_norm: torch.Tensor, metrics: dict) -> None:
        """Raise :class:`TrainingDivergedError` for the step in progress (``self.step + 1``), or for the
        previous step when it was that step's update that left non-finite weights."""
        if self._weights_check is not None and not bool(torch.isfinite(self._weights_check)):
            self._weights_diverged(self.step)
        shown = {"loss": loss.item(), "grad_norm": grad_norm.item()}
        shown.update({k: float(v) for k, v in metrics.items()})
        last = find_resume_path("auto", self.out)
        self.log.error(f"non-finite loss/grad at step {self.step + 1}: {shown}")
        raise TrainingDivergedError(self.step + 1, shown, last)

    def _batches(self) -> Iterator[Any]:
        """Batches from the current position: of a map-style dataset, those of this epoch and then of the next
        ones, without end (the sampler's ``epoch_batches``); of a stream, this epoch's: read from the start of
        the epoch, the batches already trained on skipped (its order is a function of seed and epoch, so resume
        stays exact, at the cost of decoding them again); a stream that runs dry starts another pass.

        Raises:
            NoReadableImagesError (a ValueError, one line in the CLI): a pass over the stream gives no full batch
                (the dataset's ``no_batch_message`` says why where it has one: the shards it read).
        """
        if not self.streaming:
            yield from self._make_loader()
            return
        skip = self.batch_in_epoch
        passes = 0
        while True:
            got = False
            for batch in self._make_loader():
                got = True
                if skip:
                    skip -= 1
                    continue
                yield batch
            passes += 1
            if not got or passes > 1000:
                explain = getattr(self.dataset, "no_batch_message", None)  # WebDatasetShards names its shards
                raise NoReadableImagesError(
                    explain(self.cfg.batch_size) if callable(explain)
                    else f"the streaming dataset yields no full batch of {self.cfg.batch_size}: check the shards "
                         "and train.batch_size")

    def _stop_loader_workers(self) -> None:
        """Stop the persistent DataLoader workers when training ends, not at interpreter exit.

        With ``persistent_workers`` and ``pin_memory`` (every CUDA run), torch's exit hook joins each worker
        with a 5-s timeout that it always runs out (nothing told the workers to stop: pytorch issue 81794):
        the process lingers 5 s per worker after its last line (``beit tokenizer train`` with 8 workers on an
        H200 was still alive 30 s after it, stacks in that join: benchmarks/RESULTS.md section 9). A later
        ``fit()`` starts new workers at its position."""
        self._prefetcher = None
        it = getattr(self._loader, "_iterator", None)
        self._loader = None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def _make_loader(self) -> DataLoader:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)
        g = torch.Generator().manual_seed(_mix_seed(self.cfg.seed, self.epoch, D.rank()))
        if self.streaming:
            return DataLoader(self.dataset, batch_size=self.cfg.batch_size, num_workers=self.num_workers,
                              collate_fn=self.collate_fn, pin_memory=self.device.type == "cuda", drop_last=True,
                              worker_init_fn=worker_init, generator=g)
        self.sampler.set_epoch(self.epoch, start_batch=self.batch_in_epoch)
        if self._loader is None:
            # One loader for the whole run, its workers persistent across epochs (no process start-up and
            # dataset pickling at every epoch boundary). Workers hold their own dataset copies, which a
            # set_epoch() here never reaches: the sampler then yields (epoch, index) and EpochIndexed sets
            # the epoch inside each worker, so every sample stays a function of (seed, epoch, index).
            # The workers' base seed comes from this generator, not from the global RNG, so creating the
            # loader (fresh or resumed) never shifts the training RNG stream.
            g = torch.Generator().manual_seed(_mix_seed(self.cfg.seed, D.rank()))
            workers = self.num_workers
            self._loader = DataLoader(EpochIndexed(self.dataset),
                                      batch_size=self.cfg.batch_size, sampler=self.sampler, num_workers=workers,
                                      collate_fn=self.collate_fn, pin_memory=self.device.type == "cuda",
                                      drop_last=True, persistent_workers=workers > 0,
                                      worker_init_fn=worker_init, generator=g)
        return self._loader

    # --- metrics ---------------------------------------------------------------------------------------

    def _reset_window(self) -> None:
        self._win: dict[str, Any] = {"n": 0, "sums": {}, "counts": {}, "t0": time.perf_counter()}

    def _accumulate(self, loss: torch.Tensor, grad_norm: torch.Tensor, metrics: dict, lr: float) -> None:
        w = self._win
        w["n"] += 1
        w["lr"] = lr
        for k, v in {"loss": loss, "grad_norm": grad_norm, **metrics}.items():
            w["sums"][k] = w["sums"].get(k, 0.0) + v
            w["counts"][k] = w["counts"].get(k, 0) + 1

    def _log_train(self) -> None:
        w = self._win
        if w["n"] == 0:
            return
        values = D.all_reduce_mean({k: s / w["counts"][k] for k, s in w["sums"].items()})
        dt = max(time.perf_counter() - w["t0"], 1e-9)
        values["lr"] = w["lr"]
        skipped = self._skipped_files()
        if skipped is not None:
            values["skipped_files_total"] = skipped
        values["img_per_s"] = w["n"] * self.cfg.batch_size * self.cfg.accum_steps * D.world_size() / dt
        if self.device.type == "cuda":
            values["max_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.last_train = values
        self.metric_logger.log(self.step, values, split="train", epoch=self.epoch)
        shown = " | ".join(f"{k} {v:.4g}" for k, v in values.items()
                           if k not in ("lr", "img_per_s", "skipped_files_total"))
        self.log.info(f"step {self.step}/{self.total_steps} ep {self.epoch} | {shown} "
                      f"| lr {values['lr']:.3e} | {values['img_per_s']:.1f} img/s")
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in values.items()}, refresh=False)
        self._reset_window()

    def _skip_counts(self, epochs: list[int]) -> dict[int, int] | None:
        """Samples of each of ``epochs`` the training data skipped (unreadable or untransformable files),
        summed over DataLoader workers (the dataset's ``skipped_count(epoch)``, through ``Subset``-like
        wrappers) and over ranks; None when the dataset does not count. Collective: call on every rank.
        Per epoch, because the loader's workers run ahead into the next epoch (one iterator for the run)."""
        ds = self.dataset
        while not hasattr(ds, "skipped_count") and hasattr(ds, "dataset"):
            ds = ds.dataset
        if not hasattr(ds, "skipped_count"):
            return None
        if not epochs:  # the same on every rank: no collective needed
            return {}
        sums = D.all_reduce_mean({str(e): float(ds.skipped_count(e)) for e in epochs})
        return {e: int(round(sums[str(e)] * D.world_size())) for e in epochs}

    def _skipped_files(self) -> int | None:
        """Samples skipped so far in this run: the epochs already recorded whole, plus the epochs trained on
        since (so far). Collective."""
        last = self.epoch if self.batch_in_epoch > 0 else self.epoch - 1  # the epoch of the last trained batch
        done, through = self._skips_done
        counts = self._skip_counts(list(range(through + 1, last + 1)))
        if counts is None:
            return None
        self._skipped_total = done + sum(counts.values())
        return self._skipped_total

    def _log_skipped(self, epoch: int, complete: bool = True) -> None:
        """One ``split="data"`` record at the end of each epoch (and of training, ``complete=False`` when that
        ends inside an epoch): ``skipped_files`` in that epoch and ``skipped_files_total`` in this run, over
        all workers and ranks. An epoch cut short counts the files the loader had already read for it, trained
        on or not (its workers run ahead of the step). Its warning is rank 0's: the counts are every rank's alike."""
        counts = self._skip_counts([epoch])
        if counts is None:
            return
        done, _ = self._skips_done
        in_epoch = counts[epoch] - self._skips_partial.get(epoch, 0)  # a part of it may have been recorded already
        total = done + counts[epoch]
        if complete:
            self._skips_done = (total, epoch)
        else:
            self._skips_partial[epoch] = counts[epoch]
        self._skipped_total = total
        self.metric_logger.log(self.step, {"skipped_files": in_epoch, "skipped_files_total": total},
                               split="data", epoch=epoch)
        if in_epoch and self.main:  # summed over ranks, the same on each: said once, by rank 0 (each said it)
            self.log.warning(f"epoch {epoch}: {in_epoch} unreadable or untransformable files skipped "
                             f"({total} in this run); their names are in the warnings above")

    def evaluate(self) -> dict[str, float]:
        """Run ``eval_fn`` (and on the EMA model), log it, and update the best metric."""
        with preserved_rng(), torch.no_grad(), self._autocast(), _eager():
            self.raw_model.eval()
            results = dict(self.eval_fn(self.raw_model) or {})
            if self.ema is not None:
                results.update({f"ema_{k}": v for k, v in (self.eval_fn(self.ema.module) or {}).items()})
            self.raw_model.train()
        results = D.broadcast_object({k: float(v) for k, v in results.items()})  # every rank: rank 0's view
        self.last_eval = results
        self.metric_logger.log(self.step, results, split="eval", epoch=self.epoch)
        self.log.info(f"eval step {self.step} ep {self.epoch}: "
                      + ", ".join(f"{k} {v:.4g}" for k, v in results.items()))
        name = self.metric_to_track
        if name is not None:
            if name not in results:
                raise KeyError(f"metric_to_track={name!r} not among eval metrics {sorted(results)}")
            value = results[name]
            better = self.best is None or (value > self.best["value"] if self.mode == "max"
                                           else value < self.best["value"])
            if better and math.isfinite(value):
                self.best = {"metric": name, "value": value, "step": self.step}
                self._new_best = True
                self.log.info(f"new best {name} = {value:.4g}")
        return results

    def _visualize(self) -> None:
        if not (self.main or D.is_fsdp(self.raw_model)):
            return
        out_dir = mark_run_images(self.out / "images") if self.main else self.out / "images"
        with preserved_rng(), torch.no_grad(), self._autocast(), _eager():
            self.raw_model.eval()
            self.visualize_fn(self.raw_model, self.step, out_dir)
            self.raw_model.train()

    def _final_metrics(self) -> dict[str, float]:
        out: dict[str, float] = {"step": self.step, "epoch": self.epoch}
        if getattr(self, "_skipped_total", None) is not None:
            out["skipped_files"] = self._skipped_total
        out.update({f"train/{k}": v for k, v in self.last_train.items()})
        out.update({f"eval/{k}": v for k, v in self.last_eval.items()})
        if self.best is not None:
            out[f"best/{self.best['metric']}"] = self.best["value"]
            out["best/step"] = self.best["step"]
        return out

    def _print_setup(self) -> None:
        cfg, ws = self.cfg, D.world_size()
        eff = cfg.batch_size * cfg.accum_steps * ws
        trainable = sum(p.numel() for g in self.optimizer.param_groups for p in g["params"])
        precision = "bf16 autocast" if self.use_bf16 else "fp32"
        self.log.info(
            f"{ws} rank(s) on {self.device.type}, batch {cfg.batch_size}/rank x {cfg.accum_steps} accum "
            f"x {ws} = {eff} per step; {self.steps_per_epoch} steps/epoch, {self.total_steps} steps "
            f"(~{self.total_steps / self.steps_per_epoch:.3g} epochs), warmup {self.warmup_steps} steps\n"
            f"lr {cfg.lr:.3g} -> {cfg.min_lr:.3g} ({cfg.schedule}), AdamW betas {tuple(cfg.betas)} "
            f"eps {cfg.eps:g} wd {cfg.weight_decay:g}, layer_decay {cfg.layer_decay:g}, "
            f"clip_grad {cfg.clip_grad}, {precision}, compile {cfg.compile_scope if cfg.compile else 'off'}, "
            f"ema {cfg.ema:g}"
            + (f", {self.host_threads} intra-op thread(s) beside {self.num_workers} loader workers"
               if self.host_threads else "")
            + f"\nmodel {self.num_params:,} params, {trainable:,} trainable\n"
            + summarize_param_groups(self.optimizer.param_groups))

    # --- checkpoints -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint payload (see ``beit.engine.checkpoint``). Collective: call on every rank."""
        return {**self._meta_state(), "model": model_state_dict(self.model),
                "optimizer": optimizer_state_dict(self.model, self.optimizer)}

    def _meta_state(self) -> dict[str, Any]:
        """Everything of a checkpoint but the model and optimizer. Collective (gathers per-rank RNG)."""
        # per rank: RNG streams, and the open logging window (so the first log after a resume averages the
        # same steps as an uninterrupted run would)
        w = self._win
        window = {"n": w["n"], "lr": w.get("lr", 0.0), "counts": dict(w["counts"]),
                  "sums": {k: float(v) for k, v in w["sums"].items()}}
        per_rank = D.all_gather_object({"rng": get_rng_state(), "log_window": window})
        return {
            "format": FORMAT, "version": VERSION,
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "best": self.best, "world_size": D.world_size(), "batch_size": self.cfg.batch_size,
            "rng": [r["rng"] for r in per_rank], "log_window": [r["log_window"] for r in per_rank],
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "config": to_dict(self.run_config), "task": self.task,
        }

    def save(self) -> None:
        """A checkpoint (collective). Single process / DDP: one full ``step_XXXXXXX.pt`` written by rank 0.
        FSDP2: a sharded ``step_XXXXXXX/`` folder that every rank writes its shards into (no full gather)."""
        sharded = D.is_fsdp(self.raw_model)
        if sharded:
            self.ckpt.save_sharded(self.model, self.optimizer, self._meta_state(), self.step,
                                   is_best=self._new_best)
        else:
            state = self.state_dict()
            if self.main:
                self.ckpt.save(state, self.step, is_best=self._new_best)
        self._new_best = False
        self._checkpoint = (self.step, self.ckpt.path_of(self.step, sharded=sharded))

    def export_model(self) -> nn.Module | None:
        """The trained model as a plain, unsharded module on rank 0 (``None`` on other ranks), for the final
        export (``save_model``) and pictures. Collective: call on every rank.

        Plain / DDP / compiled: the trained module itself. FSDP2: the full state dict is gathered to rank 0
        (on CPU) and loaded into a plain copy of the model kept since ``__init__``, on this rank's device.
        """
        if not D.is_fsdp(self.raw_model):
            return self.raw_model if self.main else None
        state = model_state_dict(self.model)  # collective; values on rank 0 only
        if not self.main:
            return None
        model = self._export_copy
        model.load_state_dict(state)
        return model.to(self.device).train(self.raw_model.training)

    def load(self, path: str | Path, *, state: dict[str, Any] | None = None) -> None:
        """Restore everything ``state_dict`` saved; the current config's lr scales / weight decays win.
        ``state``: the checkpoint already read from ``path`` (else it is read here).

        Raises:
            FileNotFoundError / ValueError: ``path`` is missing, damaged or not a training checkpoint.
            TaskMismatchError: the checkpoint records another task (``task``), before any config comparison.
            ConfigChangedError: its config differs in keys that define the run.
            CheckpointMismatchError / ValueError: its model or optimizer does not fit this one.
        """
        path = Path(path)
        sharded = path.is_dir() and D.is_fsdp(self.raw_model)  # else a folder is read in full on each rank
        if state is None:
            state = load_checkpoint(path, full=not sharded)
        _check_resumable(state, path, self.task, self.run_config, self.cfg)
        keep = [(g["lr_scale"], g["weight_decay"]) for g in self.optimizer.param_groups]
        if not sharded:
            load_model_state(self.model, state["model"], source=str(path))
        try:
            if sharded:
                load_sharded_state(self.model, self.optimizer, path)  # DCP reshards onto this many ranks
            else:
                load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        except CheckpointMismatchError:
            raise
        except ValueError as e:
            raise ValueError(f"{path}: optimizer state does not fit this model's param groups ({e}); "
                             "did layer_decay or the frozen parameters change?") from e
        for g, (scale, wd) in zip(self.optimizer.param_groups, keep):
            g["lr_scale"], g["weight_decay"] = scale, wd
        if self.ema is not None:
            if state.get("ema") is not None:
                self.ema.load_state_dict(state["ema"])
            else:
                self.log.warning(f"{path} has no EMA weights: EMA restarts from the loaded model",
                                 extra=ALIKE_ON_EVERY_RANK)
                self.ema = ModelEMA(self.raw_model, self.cfg.ema)
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.best = state.get("best")
        saved_ws, saved_bs = state.get("world_size", D.world_size()), state.get("batch_size", self.cfg.batch_size)
        if (saved_ws, saved_bs) != (D.world_size(), self.cfg.batch_size) and not self.streaming:
            # Another number of ranks (or per-rank batch): continue at the same sample of the epoch's global
            # order (the permutation is a function of (seed, epoch) alone), i.e. the same data order when
            # batch_size x ranks is unchanged; the lr schedule is a function of the step.
            samples = self.batch_in_epoch * saved_bs * saved_ws
            try:
                self.batch_in_epoch = self.sampler.start_batch_for(samples)
            except ValueError as e:
                raise ValueError(f"{path}: saved by {saved_ws} rank(s) x batch_size {saved_bs}: {e}") from None
            if saved_bs * saved_ws != self.cfg.batch_size * D.world_size():
                self.log.warning(f"{path}: global batch {saved_bs * saved_ws} -> "
                                 f"{self.cfg.batch_size * D.world_size()} (per step, before accumulation): "
                                 "steps per epoch and the lr schedule change", extra=ALIKE_ON_EVERY_RANK)
        if self.batch_in_epoch >= self.steps_per_epoch * self.cfg.accum_steps:  # batch size / data changed
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        rng = state.get("rng") or []
        if len(rng) == D.world_size():
            set_rng_state(rng[D.rank()])
            windows = state.get("log_window") or []
            if len(windows) == D.world_size():
                self._restored_window = windows[D.rank()]
        else:
            self.log.warning(f"{path} was saved by {len(rng)} rank(s), this run has {D.world_size()}: "
                             "RNG streams are re-seeded, so the run is not an exact continuation",
                             extra=ALIKE_ON_EVERY_RANK)
            seed_everything(self.cfg.seed + D.rank() + 1000003 * self.step)
        self._checkpoint = (self.step, path)
        self.log.info(f"resumed from {path} at step {self.step} "
                      f"(epoch {self.epoch}, batch {self.batch_in_epoch})")
