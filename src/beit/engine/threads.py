"""The training process's CPU threads beside its DataLoader workers.

PyTorch sizes a process's intra-op thread pool to every core. In a CUDA training process that pool only runs
small CPU tensor ops (the per-sample augmentation parameters of ``beit.data.gpu_augment``, masks, metrics),
but some of them still fork it: ATen's vectorised unary math (``sqrt``, ``exp``, ...) splits anything over
2,048 elements across the pool. With the DataLoader workers busy on the other cores, such a fork waits for
threads the OS has descheduled: in the profile of ``benchmarks/data_pipeline.py`` on a 16-core H200 host, a
``sqrt`` of 5,120 numbers took 0.37 ms beside 2 workers and 8.9 ms beside 14 (~7 us alone), ~47 ms of host
time a CIFAR-size pre-training step; with the pool capped these ops left the profile's top 30
(benchmarks/RESULTS.md section 9, third session). torchrun sets ``OMP_NUM_THREADS=1`` for the same reason
when it starts several processes a host.
"""

from __future__ import annotations

import os

import torch

__all__ = ["cap_intra_op_threads"]


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cap_intra_op_threads(device: torch.device | str, num_workers: int) -> int | None:
    """Shrink this process's intra-op thread pool to the cores its DataLoader workers leave free.

    Only for a CUDA training process with workers (a CPU run computes its model on that pool), and never
    over the user's own ``OMP_NUM_THREADS`` or a pool already smaller. The pool is process-wide: the trainer
    sets it for the duration of ``fit()`` and puts the old size back after.

    Args:
        device: the training device.
        num_workers: DataLoader worker processes of this process.

    Returns:
        the pool size set, or None when left as it was.
    """
    if torch.device(device).type != "cuda" or num_workers <= 0 or os.environ.get("OMP_NUM_THREADS", "").strip():
        return None
    n = max(1, _cores() - num_workers - 1)  # one core for this process's own thread and the pin thread
    if n >= torch.get_num_threads():
        return None
    torch.set_num_threads(n)
    return n
