"""Per-sample seeding: every augmented sample is a pure function of ``(seed, epoch, index)``.

Augmentations draw from three global generators (torch, Python ``random`` used by timm, NumPy used by
some timm ops). Seeding them per sample from a stable hash of the triple makes a sample independent
of the number of DataLoader workers, of the rank and of what was drawn before, so a resumed or
re-sharded run sees exactly the same data. The caller's generator states are restored on exit.
"""

from __future__ import annotations

import hashlib
import random
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TypeVar

import numpy as np
import torch
from torch.utils.data import get_worker_info

__all__ = ["derive_seed", "deterministic", "generator_for", "is_deterministic", "seeded", "seeded_for", "stable_index"]

F = TypeVar("F", bound=Callable)

#: the attribute :func:`deterministic` sets on a transform
_DETERMINISTIC = "_beit_draws_no_random"

_MASK64 = (1 << 64) - 1


def _check(name: str, value: int) -> int:
    value = int(value)
    if value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value}")
    return value


def derive_seed(seed: int, epoch: int, index: int) -> int:
    """A 64-bit seed from the triple, via NumPy's SeedSequence (stable across platforms and versions).

    SeedSequence mixes its entropy well, so neighbouring triples (index 7 and 8, epoch 0 and 1)
    give unrelated streams, unlike ``seed + epoch * N + index``.
    """
    ss = np.random.SeedSequence([_check("seed", seed), _check("epoch", epoch), _check("index", index)])
    return int(ss.generate_state(1, dtype=np.uint64)[0]) & _MASK64


def stable_index(key: str) -> int:
    """A stable non-negative 63-bit integer for a string key (e.g. a webdataset ``__key__``).

    Python's ``hash`` is salted per process, so it cannot be used to seed samples across workers.
    """
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def generator_for(seed: int, epoch: int, index: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from the triple, for code that takes an explicit generator."""
    g = torch.Generator()
    g.manual_seed(derive_seed(seed, epoch, index))
    return g


_open = threading.local()  # how many seeded() blocks are open in this thread (``depth``)


def _seed_all(s: int) -> torch.Generator:
    # Not torch.manual_seed: it also (lazily) reseeds every CUDA generator, which fork_rng
    # would not restore, and would clobber the caller's GPU dropout stream.
    torch.random.default_generator.manual_seed(s)
    random.seed(s)
    # NumPy's legacy global RNG only takes 32-bit words: feed all 64 bits as two words.
    np.random.seed([s & 0xFFFFFFFF, s >> 32])
    g = torch.Generator()
    g.manual_seed(s ^ 0x9E3779B97F4A7C15)  # a different stream from the global one
    return g


@contextmanager
def seeded(seed: int, epoch: int, index: int) -> Iterator[torch.Generator]:
    """Seed torch (CPU), Python ``random`` and NumPy's global RNG from the triple for the block.

    Everything drawn inside is a pure function of ``(seed, epoch, index)``; the caller's RNG streams
    are restored on exit (``torch.random.fork_rng`` for torch, get/set state for the others).
    Yields a fresh generator seeded from the same triple for code that prefers an explicit one.
    CUDA generators are not touched: data augmentation runs on CPU in DataLoader workers.

    In a DataLoader worker, an outermost block skips the save and restore (0.27 -> 0.06 ms a block on the
    2-core machine, ``benchmarks/seeding_cost.py``): every sample seeds all three streams first, and the
    worker draws nothing from them between samples that the restore would keep apart. Nested blocks, and
    every block in the main process (``num_workers=0``, where the training loop's streams continue after),
    restore as above; the draws inside are the same either way.
    """
    s = derive_seed(seed, epoch, index)
    depth = getattr(_open, "depth", 0)
    _open.depth = depth + 1
    try:
        if depth == 0 and get_worker_info() is not None:
            yield _seed_all(s)
            return
        py_state = random.getstate()
        np_state = np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            try:
                yield _seed_all(s)
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)
    finally:
        _open.depth = depth


def deterministic(transform: F) -> F:
    """Mark ``transform`` as drawing no random numbers (an eval transform: resize, crop, normalise), and return it.

    The datasets call a marked transform without :func:`seeded`, whose save, seed and restore of three generators
    costs ~0.25 ms a sample (2-core machine, 2026-12-06): as much as a small image's whole eval transform. Only the
    mark is trusted: a transform that does draw must not be marked (its samples would then depend on the workers),
    and a new ``Compose`` built from a marked one's steps is unmarked again (mark it if it stays deterministic).
    """
    setattr(transform, _DETERMINISTIC, True)
    return transform


def is_deterministic(transform: object) -> bool:
    """Whether ``transform`` was marked by :func:`deterministic`."""
    return bool(getattr(transform, _DETERMINISTIC, False))


def seeded_for(transform: object, seed: int, epoch: int, index: int) -> AbstractContextManager:
    """``seeded(seed, epoch, index)`` for a transform that may draw random numbers; a no-op context for one marked
    by :func:`deterministic`."""
    return nullcontext() if is_deterministic(transform) else seeded(seed, epoch, index)
