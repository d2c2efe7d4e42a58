"""The tokenizer-training data built from the config: random crops + flips of a folder of images for
training, center crops of a held-out folder (or a held-out fraction of the same folder) for evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision import transforms as T

from ...data import ImageFolderDataset
from .config import TokenizerTrainConfig

__all__ = ["build_datasets"]


class _Subset(Dataset):
    """``Subset`` that forwards ``set_epoch`` (the engine's per-epoch augmentation stream)."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[self.indices[i]]


def build_datasets(cfg: TokenizerTrainConfig) -> tuple[Dataset, Dataset]:
    """Train set (random crop + flip) and held-out set (center crop), images as float [3, S, S] in [0, 1]."""
    s = cfg.img_size
    train_tf = T.Compose([T.Resize(s), T.RandomCrop(s), T.RandomHorizontalFlip(), T.ToTensor()])
    eval_tf = T.Compose([T.Resize(s), T.CenterCrop(s), T.ToTensor()])
    seed = cfg.train.seed
    train_ds = ImageFolderDataset(cfg.data_dir, train_tf, seed=seed)
    if cfg.val_dir:
        eval_ds: Dataset = ImageFolderDataset(cfg.val_dir, eval_tf, seed=seed)
        return train_ds, _Subset(eval_ds, range(min(len(eval_ds), cfg.max_val_images)))
    n = len(train_ds)
    n_val = max(1, round(n * cfg.val_fraction))
    if n - n_val < 1:
        raise ValueError(f"{cfg.data_dir}: {n} image(s) is too few to hold out a validation split")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    val_idx, train_idx = sorted(perm[:n_val][: cfg.max_val_images]), sorted(perm[n_val:])
    eval_ds = ImageFolderDataset(cfg.data_dir, eval_tf, seed=seed)
    return _Subset(train_ds, train_idx), _Subset(eval_ds, val_idx)
