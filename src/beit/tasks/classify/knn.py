"""Weighted k-nearest-neighbour accuracy of frozen features: the second standard probe of a self-supervised
encoder, beside the linear probe (Wu et al. 2018, "Unsupervised feature learning via non-parametric instance
discrimination", section 3.4; the form DINO's ``eval_knn.py`` made common: cosine similarity of
L2-normalised features, the ``k`` nearest training samples vote for their class with weight
``exp(similarity / T)``, k = 20, T = 0.07).

It needs no training and no hyper-parameter search, so it shows what the features hold before a head is
fitted; ``beit linprobe`` reports it per probed block from the same feature cache (``knn=0`` turns it off).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["knn_top1"]


@torch.no_grad()
def knn_top1(train_f: torch.Tensor, train_y: torch.Tensor, val_f: torch.Tensor, val_y: torch.Tensor, *,
             num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 1024,
             device: torch.device | str | None = None) -> torch.Tensor:
    """Top-1 accuracy (%) of the weighted k-NN classifier, per feature set.

    Args:
        train_f: ``[N, L, D]`` (``L`` feature sets, e.g. one per probed block) or ``[N, D]``, any float dtype.
        train_y: int64 ``[N]`` labels in ``[0, num_classes)``.
        val_f, val_y: the same for the evaluated samples (``[M, L, D]`` / ``[M]``).
        num_classes: number of classes.
        k: neighbours (capped at ``N``); temperature: of the vote weights ``exp(cos / T)``.
        chunk: val samples per similarity block (memory: ``chunk x N`` floats on ``device``).
        device: where the similarities are computed (default: that of ``train_f``).

    Returns:
        float ``[L]`` (a 0-d tensor for ``[N, D]`` inputs) on CPU.

    Raises:
        ValueError: mismatched shapes, ``k < 1``, ``temperature <= 0`` or labels outside ``[0, num_classes)``.
    """
    squeeze = train_f.ndim == 2
    if squeeze:
        train_f, val_f = train_f.unsqueeze(1), val_f.unsqueeze(1)
    if train_f.ndim != 3 or val_f.ndim != 3 or train_f.shape[1:] != val_f.shape[1:]:
        raise ValueError(f"features must be [N, L, D] and [M, L, D] alike, got {tuple(train_f.shape)} and "
                         f"{tuple(val_f.shape)}")
    if len(train_y) != len(train_f) or len(val_y) != len(val_f):
        raise ValueError(f"{len(train_f)}/{len(val_f)} feature rows but {len(train_y)}/{len(val_y)} labels")
    if k < 1 or temperature <= 0:
        raise ValueError(f"k must be >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    if len(train_y) and (int(train_y.min()) < 0 or int(train_y.max()) >= num_classes):
        raise ValueError(f"training labels outside 0..{num_classes - 1}")
    device = torch.device(device) if device is not None else train_f.device
    k = min(k, len(train_f))
    train_y = train_y.to(device)
    val_y = val_y.to(device)
    acc = []
    for level in range(train_f.shape[1]):
        bank = F.normalize(train_f[:, level].to(device, torch.float32), dim=-1)  # [N, D]
        correct = 0
        for s in range(0, len(val_f), chunk):
            q = F.normalize(val_f[s : s + chunk, level].to(device, torch.float32), dim=-1)
            sim, idx = (q @ bank.T).topk(k, dim=1)  # [c, k]
            votes = torch.zeros(len(q), num_classes, device=device)
            # exp((s - s_max) / T): the same vote ranking as exp(s / T) (a common factor per query), and no
            # overflow to inf at small T (float32 exp overflows past 88, i.e. s / T > 88)
            votes.scatter_add_(1, train_y[idx], ((sim - sim[:, :1]) / temperature).exp())
            correct += int((votes.argmax(1) == val_y[s : s + chunk]).sum())
        acc.append(100.0 * correct / max(len(val_f), 1))
    out = torch.tensor(acc)
    return out[0] if squeeze else out
