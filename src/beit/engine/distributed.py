"""Process-group setup, rank helpers, DDP/FSDP2 wrapping and a resumable distributed sampler.

Launch with torchrun (no home-made launcher)::

    torchrun --nproc_per_node 8 -m beit pretrain ...

Without torchrun's env vars (RANK, WORLD_SIZE, LOCAL_RANK) everything runs as a single process and
every helper here degrades to a no-op.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

__all__ = [
    "EpochIndexed", "ResumableDistributedSampler", "all_finite", "all_finite_and_flag", "all_gather_object",
    "all_reduce_mean", "barrier", "broadcast_object", "cleanup", "compile_blocks", "device", "grad_sync",
    "init_distributed", "is_dist", "max_over_ranks", "resolve_device",
    "is_main", "local_rank", "rank", "repeated_blocks", "unwrap_model", "world_size", "wrap_model",
]


# The one source of rank / world size for the package: the process group once it exists, before that
# the launcher's environment (torchrun's RANK / WORLD_SIZE / LOCAL_RANK, which the group is built from),
# else a single process. Nothing else asks torch.distributed directly; two places read the variables themselves,
# where this module cannot be imported: beit.data.datasets._first_rank (a lower room) and beit.cli._torchrun_value
# (the CLI's checks before a command runs, which import no torch).


def is_dist() -> bool:
    """Whether a torch.distributed process group is initialized in this process."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank: the group's, else torchrun's ``RANK``, else 0."""
    return dist.get_rank() if is_dist() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    """Processes in the job: the group's size, else torchrun's ``WORLD_SIZE`` (before the group exists), else 1."""
    return dist.get_world_size() if is_dist() else int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    """This process's rank on its host (torchrun's ``LOCAL_RANK``, else 0): picks ``cuda:LOCAL_RANK``."""
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    """Whether this is rank 0 (the one that writes files and logs)."""
    return rank() == 0


def device() -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` when CUDA is available, else CPU."""
    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def resolve_device(name: str | torch.device | None) -> torch.device:
    """A user's ``--device`` value as a usable device: ``None``/``""`` -> this rank's :func:`device`.

    Raises ValueError (one line, naming the value) for a string torch does not parse (``gpu0``) or a CUDA
    device on a machine without one / with fewer GPUs.
    """
    if not name:
        return device()
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"--device {name!r}: not a device name (use cpu, cuda or cuda:N) ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name!r}: no CUDA GPU is available here (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return dev


def init_distributed(timeout_min: int = 30) -> None:
    """Join the process group torchrun describes (nccl on CUDA, gloo on CPU); no-op otherwise.

    Idempotent, so tasks and the Trainer may both call it.
    """
    if is_dist() or "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl", timeout=timedelta(minutes=timeout_min), device_id=device())
    else:
        dist.init_process_group("gloo", timeout=timedelta(minutes=timeout_min))


def cleanup() -> None:
    """Leave the process group (``destroy_process_group``); no-op outside one. Call once per process after its
    last collective, on success only (see ``beit.cli``)."""
    if is_dist():
        dist.destroy_process_group()


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_mean(metrics: Mapping[str, float | torch.Tensor]) -> dict[str, float]:
    """Mean of each scalar over ranks, in one collective. Every rank must pass the same keys."""
    keys = sorted(metrics)
    if not keys:
        return {}
    dev = device() if is_dist() and dist.get_backend() == "nccl" else torch.device("cpu")
    values = torch.stack([torch.as_tensor(metrics[k], dtype=torch.float64).detach().to(dev).reshape(())
                          for k in keys])
    if is_dist():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= world_size()
    return dict(zip(keys, values.tolist()))


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (pickled; for small things like RNG states)."""
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (so that all ranks take the same decision)."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated transformer blocks: the unit of regional compile and of FSDP sharding.

    The protocol (``docs/CONTRACTS.md``): ``model.repeated_blocks()`` when the model defines it (task
    models whose blocks sit deeper, e.g. the segmenter's ``backbone.blocks``), else ``model.blocks`` when
    it is a non-empty ``ModuleList``/``Sequential``, else ``[]`` (no repeated blocks).
    """
    fn = getattr(model, "repeated_blocks", None)
    if callable(fn):
        return list(fn())
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        return list(blocks)
    return []


def compile_blocks(model: nn.Module, distributed: str = "ddp", scope: str = "blocks") -> str:
    """Regional compile (torchtitan): ``torch.compile`` each of :func:`repeated_blocks` in place.

    With ``scope="blocks"`` (the default) never the whole task model when it has blocks: heads, padding and
    sliding-window / multi-scale inference then stay eager and new input shapes never reach a whole-model
    graph. A model without repeated blocks (e.g. the dVAE tokenizer) is compiled whole. ``scope="model"``
    compiles the whole model in one graph: fewer compiled regions to enter and leave a step (their host-side
    wrappers dominate a small model's step: RESULTS.md section 9, ``benchmarks/step_overhead.py``), at a longer
    compile; for a single process or DDP (FSDP2 shards per block: the trainer refuses the pair).
    ``dynamic=None`` (PyTorch's default): a block recompiles once with dynamic shapes when the token count
    changes instead of erroring. A BEiT on a run-time patch grid (dense tasks: multi-scale pages, sliding
    windows) marks its token count dynamic itself (``Beit._blocks_input``), so its blocks trace one graph each
    for every page size from the first step on. ``nn.Module.compile`` keeps parameter names, so checkpoints
    and layer ids are unaffected.

    Returns ``"blocks"`` or ``"whole"`` (what was compiled). Raises ``ValueError`` for another ``scope``.
    """
    import torch._dynamo

    if scope not in ("blocks", "model"):
        raise ValueError(f"compile scope must be 'blocks' or 'model', got {scope!r}")
    blocks = repeated_blocks(model) if scope == "blocks" else []
    if distributed == "ddp":
        # DDP + compile: dynamo's DDPOptimizer splits every compiled graph at DDP bucket boundaries. With
        # regional compile each block's graph is small and already a natural bucket boundary (DDP's reducer
        # overlaps the all-reduce of one block's gradients with the backward of the next), so the split buys
        # nothing, and on CUDA it crashes when a float module attribute (the drop-path rate) becomes a
        # split-graph output ("AttributeError: 'float' object has no attribute 'meta'"). Switch it off (for a
        # whole-model graph too: its gradients are then all-reduced after its backward, without overlap).
        torch._dynamo.config.optimize_ddp = False
    if not blocks:
        model.compile()
        return "whole"
    # blocks differ in Python constants (each its own drop-path rate) and dynamo specialises on them:
    # allow a graph per block (x2 for a dynamic-shape recompile), or blocks past the default limit of 8
    # would silently run eager
    needed = 2 * len(blocks) + 8
    for name in ("recompile_limit", "cache_size_limit"):
        if getattr(torch._dynamo.config, name, needed) < needed:
            setattr(torch._dynamo.config, name, needed)
    for block in blocks:
        block.compile()
    return "blocks"


def wrap_model(model: nn.Module, cfg: Any, *, bf16: bool = False) -> nn.Module:
    """DDP or FSDP2 (``cfg.distributed``), or the model itself in a single process.

    FSDP2 (torchtitan's order: compile the blocks first, then shard): ``fully_shard`` each of
    :func:`repeated_blocks`, then the root. With ``bf16`` on CUDA a ``MixedPrecisionPolicy`` keeps the
    sharded fp32 master weights, all-gathers and computes in bf16 and reduce-scatters gradients in fp32.
    The module stays the same object, so ``unwrap_model`` returns it.
    """
    if world_size() == 1:
        return model
    if cfg.distributed == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        kw: dict[str, Any] = {}
        if bf16 and torch.cuda.is_available():
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in repeated_blocks(model):
            fully_shard(block, **kw)
        fully_shard(model, **kw)
        return model
    device_ids = [local_rank()] if torch.cuda.is_available() else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=False)


def all_finite(values: torch.Tensor) -> bool:
    """``True`` when every element is finite on every rank (one host sync; one tiny all-reduce when
    distributed), so that all ranks take the same decision on a NaN and none is left waiting."""
    return all_finite_and_flag(values)[0]


def all_finite_and_flag(values: torch.Tensor, flag: int = 0) -> tuple[bool, int]:
    """``(every element finite on every rank, the largest flag of any rank)`` in one host sync and, when
    distributed, one tiny all-reduce: :func:`all_finite` plus a small non-negative integer every rank must agree
    on at the same step (the trainer's pending stop signal, ``beit.engine.trainer``), at no extra collective."""
    bad = (~torch.isfinite(values)).any().to(torch.int32).reshape(1)
    if not is_dist():
        return not bool(bad.item()), int(flag)
    # the flag joins on the device with a fill (no host-to-device copy of a Python number)
    packed = torch.cat([bad, torch.full((1,), int(flag), dtype=torch.int32, device=bad.device)])
    if dist.get_backend() != "nccl":
        packed = packed.cpu()
    dist.all_reduce(packed, op=dist.ReduceOp.MAX)
    any_bad, top = packed.tolist()
    return not any_bad, int(top)


def max_over_ranks(value: int) -> int:
    """The largest ``value`` of any rank (an all-reduce: every rank must call it; it is a barrier too);
    ``value`` itself in a single process."""
    if not is_dist():
        return int(value)
    dev = device() if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.full((1,), int(value), dtype=torch.int64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / ``torch.compile`` wrappers (parameter names without prefixes)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile(model) wrapper
            model = model._orig_mod
        else:
            return model


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def grad_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on accumulation micro-steps (``enabled=False``)."""
    if enabled or world_size() == 1:
        yield
    elif isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif is_fsdp(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


class ResumableDistributedSampler(Sampler):
    """Like ``DistributedSampler`` (same padding and ``rank::world_size`` sharding) plus a batch offset.

    The permutation is a pure function of (seed, epoch), so any rank can recompute it, and
    ``set_epoch(epoch, start_batch=k)`` makes a resumed run skip the first ``k`` batches of this rank's
    shard without loading them. Batch ``b`` of every rank together covers ``perm[b*B*W:(b+1)*B*W]``
    (``B`` = batch size, ``W`` = ranks): a step's global batch depends on ``B*W`` only, so a run resumed
    on another number of ranks with the same global batch sees the same samples per step
    (see :meth:`start_batch_for`).

    With ``yield_epoch=True`` it yields ``(epoch, index)`` pairs instead of indices, for
    :class:`EpochIndexed`: persistent DataLoader workers then learn the epoch from each index, since a
    ``dataset.set_epoch()`` in the main process never reaches them.

    With ``epoch_batches=N`` it never ends: the first ``N`` batches of this epoch (from ``start_batch``), then
    those of the next epoch, and so on, as ``(epoch, index)`` pairs. One DataLoader iterator then runs through
    every epoch, so its workers keep preparing batches across an epoch boundary instead of draining and
    starting again (the stall at every epoch start); a batch never mixes two epochs.
    """

    def __init__(self, dataset_len: int, batch_size: int, *, num_replicas: int | None = None,
                 rank: int | None = None, shuffle: bool = True, seed: int = 0, yield_epoch: bool = False,
                 epoch_batches: int | None = None):
        self.dataset_len = dataset_len
        self.batch_size = batch_size
        self.num_replicas = world_size() if num_replicas is None else num_replicas
        self.rank = (dist.get_rank() if is_dist() else 0) if rank is None else rank
        self.shuffle = shuffle
        self.seed = seed
        self.yield_epoch = yield_epoch or epoch_batches is not None
        if epoch_batches is not None and epoch_batches < 1:
            raise ValueError(f"epoch_batches must be >= 1, got {epoch_batches}")
        self.epoch_batches = epoch_batches
        self.num_samples = math.ceil(dataset_len / self.num_replicas)  # per rank, after padding
        self.total_size = self.num_samples * self.num_replicas
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def start_batch_for(self, samples_done: int) -> int:
        """This sampler's batch offset after ``samples_done`` samples of the epoch (over all ranks).

        Raises ``ValueError`` when ``samples_done`` is not a whole number of global batches
        (``batch_size * num_replicas``), i.e. the run cannot continue at the same sample.
        """
        per_step = self.batch_size * self.num_replicas
        if samples_done % per_step:
            raise ValueError(f"{samples_done} samples of the epoch were trained on, not a multiple of this run's "
                             f"global batch {self.batch_size} x {self.num_replicas} ranks = {per_step}: keep "
                             "batch_size x ranks the same as the checkpoint's run to resume at the same sample")
        return samples_done // per_step

    def shard(self, epoch: int | None = None) -> list[int]:
        """This rank's indices for ``epoch`` (default: the current one), before the batch offset."""
        epoch = self.epoch if epoch is None else epoch
        if self.shuffle:
            g = torch.Generator().manual_seed(_mix_seed(self.seed, epoch))
            indices = torch.randperm(self.dataset_len, generator=g).tolist()
        else:
            indices = list(range(self.dataset_len))
        pad = self.total_size - len(indices)  # repeat the head, as DistributedSampler does
        indices += (indices * math.ceil(pad / max(len(indices), 1)))[:pad]
        return indices[self.rank:self.total_size:self.num_replicas]

    def __iter__(self) -> Iterator[int] | Iterator[tuple[int, int]]:
        if self.epoch_batches is not None:
            return self._epochs()
        indices = self.shard()[self.start_batch * self.batch_size:]
        if self.yield_epoch:
            return iter([(self.epoch, i) for i in indices])
        return iter(indices)

    def _epochs(self) -> Iterator[tuple[int, int]]:
        epoch, start, end = self.epoch, self.start_batch, self.epoch_batches * self.batch_size  # type: ignore[operator]
        while True:
            for i in self.shard(epoch)[start * self.batch_size : end]:
                yield epoch, i
            epoch, start = epoch + 1, 0

    def __len__(self) -> int:
        """Samples left in this epoch (with ``epoch_batches``: in its first ``epoch_batches`` batches; the
        iteration itself goes on into the next epochs)."""
        n = self.num_samples if self.epoch_batches is None else self.epoch_batches * self.batch_size
        return max(n - self.start_batch * self.batch_size, 0)


class EpochIndexed(torch.utils.data.Dataset):
    """``dataset[(epoch, index)]`` = ``dataset.set_epoch(epoch)`` (when it changed) then ``dataset[index]``.

    Lets persistent DataLoader workers follow the epoch (each worker holds its own copy of the dataset),
    with :class:`ResumableDistributedSampler` ``(yield_epoch=True)``.
    """

    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset = dataset
        self._epoch: int | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        if epoch != self._epoch:
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)
            self._epoch = epoch
        return self.dataset[index]


def _mix_seed(*ints: int) -> int:
    """A 63-bit seed from a tuple of ints (well mixed, unlike ``seed + epoch``)."""
    return int(np.random.SeedSequence([abs(int(i)) for i in ints]).generate_state(2, np.uint64)[0] >> 1)
