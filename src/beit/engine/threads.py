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

import logging
import math
import os
from pathlib import Path

import torch

from ..data.datasets import local_world_size

__all__ = ["cap_intra_op_threads", "loader_workers", "usable_cores"]

logger = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _quota_at(folder: Path, v1: bool) -> int | None:
    """Whole cores (rounded up) of one cgroup folder's CPU quota; None when unlimited, absent or unreadable."""
    try:
        if v1:
            q = int((folder / "cpu.cfs_quota_us").read_text())
            p = int((folder / "cpu.cfs_period_us").read_text())
        else:
            quota, period = (folder / "cpu.max").read_text().split()[:2]
            if quota == "max":
                return None
            q, p = int(quota), int(period)
    except (OSError, ValueError):
        return None
    return max(1, math.ceil(q / p)) if q > 0 and p > 0 else None


def _own_cgroups(proc_cgroup: str) -> tuple[str | None, str | None]:
    """This process's cgroup paths from ``/proc/self/cgroup`` text: (v2 unified path, v1 ``cpu`` path)."""
    v2 = v1 = None
    for line in proc_cgroup.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2 = parts[2]
        elif "cpu" in parts[1].split(","):
            v1 = parts[2]
    return v2, v1


def _cgroup_cpus(root: Path | None = None, proc_cgroup: str | None = None) -> int | None:
    """The CPU quota of this process's cgroup in whole cores (rounded up), None when unlimited or unknown.

    A container started with ``--cpus=4`` on a 64-core host sees 64 cores in its affinity mask but gets 4
    cores' time: cgroup v2 ``cpu.max`` ("400000 100000"), v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``.
    The process's own cgroup (``/proc/self/cgroup``; the root inside a container's cgroup namespace) and every
    ancestor up to ``root`` are read, and the smallest quota wins, as the kernel enforces it.
    """
    root = CGROUP_ROOT if root is None else root
    if proc_cgroup is None:
        try:
            proc_cgroup = Path("/proc/self/cgroup").read_text()
        except OSError:
            proc_cgroup = ""
    v2, v1 = _own_cgroups(proc_cgroup)
    if (root / "cpu.max").is_file() or v2 is not None and not (root / "cpu").is_dir():
        base, rel, is_v1 = root, v2 or "/", False
    elif (root / "cpu").is_dir():
        base, rel, is_v1 = root / "cpu", v1 or "/", True
    else:
        return None
    folder = base.joinpath(*[p for p in rel.split("/") if p and p != ".."])
    quotas = []
    while True:
        quotas.append(_quota_at(folder, is_v1))
        if folder == base or base not in folder.parents:
            break
        folder = folder.parent
    found = [q for q in quotas if q is not None]
    return min(found) if found else None


def usable_cores() -> int:
    """Cores this process may use: its affinity mask, capped by its cgroup's CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    quota = _cgroup_cpus()
    return min(n, quota) if quota else n


def loader_workers(requested: int, key: str = "train.num_workers", *, say: bool = True) -> int:
    """DataLoader workers for ``requested`` (the value of config key ``key``), capped at the CPUs this process
    may use: more loader processes than cores only compete for them (the presets ask for 8 to 14, sized for a
    GPU host; a 2-core laptop gets 2, and never torch's "suggested max number of worker" warning).

    The CPUs are :func:`usable_cores` (affinity mask, cgroup quota). Under torchrun every process of a host
    usually sees the whole host, so they are shared evenly among its ``LOCAL_WORLD_SIZE`` ranks (at least one
    each); a launcher that pins each rank to its own cores gets a lower cap than it could have. 0 (load in the
    main process) stays 0.

    Args:
        requested: the configured worker count (>= 0).
        key: the config key it came from, named in the log line.
        say: log one line when capped (``key=12 but this process may use 2 CPUs: 2 workers``); callers that
            reuse a count the trainer already reported pass False.

    Returns:
        the worker count to use.
    """
    cores = usable_cores()
    local = local_world_size()
    per_rank = max(1, cores // local)
    if requested <= per_rank:
        return requested
    if say:
        shared = f" ({cores} on this host over {local} local ranks)" if local > 1 else ""
        cpus, workers = ("CPU", "worker") if per_rank == 1 else ("CPUs", "workers")
        logger.info("%s=%d but this process may use %d %s%s: %d %s", key, requested, per_rank, cpus, shared, per_rank,
                    workers)
    return per_rank


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
    n = max(1, usable_cores() - num_workers - 1)  # one core for this process's own thread and the pin thread
    if n >= torch.get_num_threads():
        return None
    torch.set_num_threads(n)
    return n
