"""Tiny model / dataset / step function shared by the engine tests (and the torchrun script)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

try:
    from beit.data.seeding import seeded
except ImportError:  # same contract, inlined
    import contextlib
    import random

    import numpy as np

    @contextlib.contextmanager
    def seeded(seed: int, epoch: int, index: int):
        s = int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0] >> 1)
        py, npy = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(s)
            random.seed(s)
            np.random.seed(s % 2**32)
            try:
                yield
            finally:
                random.setstate(py)
                np.random.set_state(npy)


class TinyBlock(nn.Module):
    def __init__(self, dim: int, p: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim)
        self.drop = nn.Dropout(p)

    def forward(self, x):
        return x + self.drop(torch.tanh(self.fc(self.norm(x))))


class TinyNet(nn.Module):
    """BEiT-shaped toy: embeddings (layer 0), ``blocks.i`` (layer i+1), norm/head (layer depth+1)."""

    def __init__(self, in_dim: int = 4, dim: int = 8, depth: int = 3, num_classes: int = 3, drop: float = 0.2):
        super().__init__()
        self.patch_embed = nn.Linear(in_dim, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, dim) * 0.02)
        self.blocks = nn.ModuleList(TinyBlock(dim, drop) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.num_layers = depth

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_embed"}

    def layer_id(self, name: str) -> int:
        if name.startswith(("patch_embed", "cls_token", "pos_embed")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.num_layers + 1

    def forward(self, x):
        h = self.patch_embed(x) + self.pos_embed + self.cls_token
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.norm(h))


class NoisyDataset(Dataset):
    """Fixed points plus per-sample noise drawn under ``seeded(seed, epoch, index)``."""

    def __init__(self, n: int = 40, in_dim: int = 4, num_classes: int = 3, seed: int = 0):
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(n, in_dim, generator=g)
        self.y = torch.randint(0, num_classes, (n,), generator=g)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        with seeded(self.seed, self.epoch, i):
            x = self.x[i] + 0.3 * torch.randn(self.x.shape[1])
        return x, self.y[i]


def step_fn(model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
    x, y = batch
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    return loss, {"acc": (logits.argmax(-1) == y).float().mean()}
