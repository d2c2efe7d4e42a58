"""The tokenizer-training data built from the config: random crops + flips of a folder of images for
training, center crops of a held-out folder (or a held-out fraction of the same folder) for evaluation; read and
decoded every epoch, or decoded once into memory (``in_memory``: :class:`CropFlipInMemory`, the same samples).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from ...data import ImageFolderDataset
from ...data.datasets import MemoryBudgetError, TensorImageDataset, _unpack_index, decode_image_folder
from ...data.seeding import deterministic, generator_for
from ...engine.config import ConfigError
from .config import TokenizerTrainConfig

__all__ = ["CropFlipInMemory", "build_datasets", "eval_transform"]


def eval_transform(size: int) -> T.Compose:
    """The held-out images' transform, in training and in ``beit tokenizer eval``: shorter side to ``size``, center
    crop, float ``[3, size, size]`` in [0, 1]. It draws nothing: marked so the datasets do not seed it."""
    return deterministic(T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor()]))


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


class CropFlipInMemory(TensorImageDataset):
    """Images decoded once into memory, served as the per-sample path serves them: ``T.Resize(size)`` (done once,
    at construction, on each PIL image), then ``T.RandomCrop(size)`` and ``T.RandomHorizontalFlip()`` (``train``)
    or ``T.CenterCrop(size)``, then ``T.ToTensor()``: float ``[3, size, size]`` in [0, 1].

    The random crop offsets and the flip are drawn as those transforms draw them (the same calls, in the same
    order) from a generator seeded like ``seeded(seed, epoch, index)`` seeds torch's, so a sample equals what
    :class:`beit.data.ImageFolderDataset` with those transforms gives for the same image, without its per-sample
    decoding, PIL work and seeding of three generators (~0.7 ms a sample on the 2-core machine of RESULTS.md 5).

    The images, their epoch and the files left out at decoding are :class:`beit.data.datasets.TensorImageDataset`'s.

    Args:
        images: uint8 ``[N, H, W, 3]`` (:func:`beit.data.datasets.decode_image_folder`).
        size: the crop side in pixels.
        train: random crop + flip; else center crop.
        seed: base seed of the augmentation streams.
        dropped: the files left out when the images were decoded (counted as skipped samples of the first epoch).

    Raises:
        TypeError / ValueError: as ``TensorImageDataset`` (``images`` not uint8 ``[N, H, W, 3]``).
    """

    def __init__(self, images: torch.Tensor, size: int, *, train: bool, seed: int = 0,
                 dropped: Sequence[str] = ()) -> None:
        super().__init__(images, seed=seed, dropped=dropped)
        self.size, self.train = int(size), bool(train)
        if min(self.images.shape[1:3]) != self.size:  # T.Resize(size): the shorter side to size, as PIL resizes it
            resize = T.Resize(self.size)
            self.images = torch.stack([torch.from_numpy(np.array(resize(Image.fromarray(x.numpy(), mode="RGB"))))
                                       for x in self.images])

    def __getitem__(self, index: int | tuple[int, int]) -> torch.Tensor:
        epoch, index = _unpack_index(index, self.epoch, len(self))
        x = self.images[index]
        h, w, s = x.shape[0], x.shape[1], self.size
        if self.train:
            g = generator_for(self.seed, epoch, index)  # the stream seeded() gives torch's default generator
            i = j = 0
            if (h, w) != (s, s):  # T.RandomCrop.get_params draws nothing when the image is the crop's size
                i = int(torch.randint(0, h - s + 1, size=(1,), generator=g).item())
                j = int(torch.randint(0, w - s + 1, size=(1,), generator=g).item())
            x = x[i:i + s, j:j + s]
            if torch.rand(1, generator=g) < 0.5:  # T.RandomHorizontalFlip(p=0.5)
                x = x.flip(1)
        else:  # T.CenterCrop's offsets
            i, j = int(round((h - s) / 2.0)), int(round((w - s) / 2.0))
            x = x[i:i + s, j:j + s]
        return x.permute(2, 0, 1).contiguous().float().div(255)


def _decode(root: str, cfg: TokenizerTrainConfig, *, train: bool, max_images: int = 0) -> CropFlipInMemory:
    """``in_memory``: the images under ``root`` decoded (:func:`decode_image_folder`, unlabeled, at any depth).

    Raises:
        ConfigError: ``in_memory`` where the decoded images would not fit in memory (estimated before decoding).
        ValueError: as ``decode_image_folder`` (no images, none decodes).
    """
    try:
        images, _, _, dropped = decode_image_folder(root, labeled=False, every_class=False, max_images=max_images)
    except MemoryBudgetError as e:
        raise ConfigError("in_memory", f"{e}: set in_memory=false to read them from disk") from None
    return CropFlipInMemory(images, cfg.img_size, train=train, seed=cfg.train.seed, dropped=dropped)


def build_datasets(cfg: TokenizerTrainConfig) -> tuple[Dataset, Dataset]:
    """Train set (random crop + flip) and held-out set (center crop), images as float [3, S, S] in [0, 1].

    With ``in_memory`` both are decoded once (:class:`CropFlipInMemory`: the same samples for a folder whose images
    all decode and share one size; ``decode_image_folder`` resizes the odd sizes to the most common one, with a
    warning).
    """
    s = cfg.img_size
    train_tf = T.Compose([T.Resize(s), T.RandomCrop(s), T.RandomHorizontalFlip(), T.ToTensor()])
    eval_tf = eval_transform(s)
    seed = cfg.train.seed
    if cfg.in_memory:
        train_ds: Dataset = _decode(cfg.data_dir, cfg, train=True)
    else:
        train_ds = ImageFolderDataset(cfg.data_dir, train_tf, seed=seed)
    if cfg.val_dir:
        if cfg.in_memory:
            return train_ds, _decode(cfg.val_dir, cfg, train=False, max_images=cfg.max_val_images)
        eval_ds: Dataset = ImageFolderDataset(cfg.val_dir, eval_tf, seed=seed)
        return train_ds, _Subset(eval_ds, range(min(len(eval_ds), cfg.max_val_images)))
    n = len(train_ds)
    n_val = max(1, round(n * cfg.val_fraction))
    if n - n_val < 1:
        raise ValueError(f"{cfg.data_dir}: {n} image(s) is too few to hold out a validation split")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    val_idx, train_idx = sorted(perm[:n_val][: cfg.max_val_images]), sorted(perm[n_val:])
    if cfg.in_memory:  # the same decoded images, center-cropped
        eval_ds = CropFlipInMemory(train_ds.images, s, train=False, seed=seed)  # type: ignore[attr-defined]
    else:
        eval_ds = ImageFolderDataset(cfg.data_dir, eval_tf, seed=seed)
    return _Subset(train_ds, train_idx), _Subset(eval_ds, val_idx)
