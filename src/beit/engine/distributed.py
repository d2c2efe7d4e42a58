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
    "ResumableDistributedSampler", "all_gather_object", "all_reduce_mean", "barrier", "broadcast_object",
    "cleanup", "device", "grad_sync", "init_distributed", "is_dist", "is_main", "local_rank", "rank",
    "unwrap_model", "world_size", "wrap_model",
]


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` when CUDA is available, else CPU."""
    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")


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


def wrap_model(model: nn.Module, cfg: Any) -> nn.Module:
    """DDP or FSDP2 (``cfg.distributed``), or the model itself in a single process.

    FSDP2 shards each of ``model.blocks`` and then the root (torchtitan's order: compile the blocks
    first, then shard). The module stays the same object, so ``unwrap_model`` returns it.
    """
    if world_size() == 1:
        return model
    if cfg.distributed == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in getattr(model, "blocks", []):
            fully_shard(block)
        fully_shard(model)
        return model
    device_ids = [local_rank()] if torch.cuda.is_available() else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=False)


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


class ResumableDistributedSampler(Sampler[int]):
    """Like ``DistributedSampler`` (same padding and ``rank::world_size`` sharding) plus a batch offset.

    The permutation is a pure function of (seed, epoch), so any rank can recompute it, and
    ``set_epoch(epoch, start_batch=k)`` makes a resumed run skip the first ``k`` batches of this rank's
    shard without loading them.
    """

    def __init__(self, dataset_len: int, batch_size: int, *, num_replicas: int | None = None,
                 rank: int | None = None, shuffle: bool = True, seed: int = 0):
        self.dataset_len = dataset_len
        self.batch_size = batch_size
        self.num_replicas = world_size() if num_replicas is None else num_replicas
        self.rank = (dist.get_rank() if is_dist() else 0) if rank is None else rank
        self.shuffle = shuffle
        self.seed = seed
        self.num_samples = math.ceil(dataset_len / self.num_replicas)  # per rank, after padding
        self.total_size = self.num_samples * self.num_replicas
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def shard(self) -> list[int]:
        """This rank's indices for the current epoch, before the batch offset."""
        if self.shuffle:
            g = torch.Generator().manual_seed(_mix_seed(self.seed, self.epoch))
            indices = torch.randperm(self.dataset_len, generator=g).tolist()
        else:
            indices = list(range(self.dataset_len))
        pad = self.total_size - len(indices)  # repeat the head, as DistributedSampler does
        indices += (indices * math.ceil(pad / max(len(indices), 1)))[:pad]
        return indices[self.rank:self.total_size:self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.shard()[self.start_batch * self.batch_size:])

    def __len__(self) -> int:
        return max(self.num_samples - self.start_batch * self.batch_size, 0)


def _mix_seed(*ints: int) -> int:
    """A 63-bit seed from a tuple of ints (well mixed, unlike ``seed + epoch``)."""
    return int(np.random.SeedSequence([abs(int(i)) for i in ints]).generate_state(2, np.uint64)[0] >> 1)
