"""Parameter groups (weight-decay rules, layer-wise lr decay), AdamW, and lr schedules as pure functions.

The trainer sets ``group["lr"] = lr_at(step, ...) * group["lr_scale"]`` before every step (MAE's
``util/lr_sched.py``), so a schedule is one function of the step and resume needs no scheduler state.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .._text import ALIKE_ON_EVERY_RANK

__all__ = ["build_optimizer", "lr_at", "param_groups", "summarize_param_groups"]


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0,
                 lr: float | None = None) -> list[dict[str, Any]]:
    """AdamW param groups keyed by (lr_scale, weight_decay), as in BEiT's ``optim_factory.py``.

    - No weight decay for 1-D params (norms, layer scale), names ending in ``.bias`` and names (or name
      suffixes) in ``model.no_weight_decay()`` such as ``cls_token``, ``pos_embed``,
      ``relative_position_bias_table``.
    - Layer decay: ``lr_scale = layer_decay ** (model.num_layers + 1 - model.layer_id(name))`` when
      ``layer_decay < 1`` and the model has ``layer_id``; otherwise 1.

    Each group carries ``lr_scale``, ``weight_decay``, ``name`` and ``num_params`` (for printing), and
    ``lr = lr * lr_scale`` when ``lr`` is given. Frozen params (``requires_grad=False``) are left out. A
    ``layer_decay < 1`` for a model without ``layer_id`` is logged as a warning (logger ``beit``) and ignored.

    Raises:
        AttributeError: the model has ``layer_id`` but no ``num_layers``.
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    use_layers = layer_decay < 1.0 and hasattr(model, "layer_id")
    if layer_decay < 1.0 and not use_layers:
        # a log record, not warnings.warn: it reaches the run's log file, and the first rank alone prints it
        logging.getLogger("beit").warning("layer_decay=%s ignored: %s has no layer_id()", layer_decay,
                                          type(model).__name__, extra=ALIKE_ON_EVERY_RANK)
    num_layers = getattr(model, "num_layers", None) if use_layers else None
    if use_layers and num_layers is None:
        raise AttributeError(f"{type(model).__name__} has layer_id() but no num_layers")

    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith(".bias") or _matches(name, skip)
        wd = 0.0 if no_decay else weight_decay
        layer = model.layer_id(name) if use_layers else None
        scale = layer_decay ** (num_layers + 1 - layer) if use_layers else 1.0
        key = (scale, wd)
        if key not in groups:
            tag = f"layer_{layer:02d}_" if use_layers else ""
            groups[key] = {"name": f"{tag}{'no_decay' if no_decay else 'decay'}", "params": [],
                           "lr_scale": scale, "weight_decay": wd, "num_params": 0}
        groups[key]["params"].append(p)
        groups[key]["num_params"] += p.numel()
    out = sorted(groups.values(), key=lambda g: (g["lr_scale"], g["weight_decay"]))
    if lr is not None:
        for g in out:
            g["lr"] = lr * g["lr_scale"]
    return out


def summarize_param_groups(groups: list[dict[str, Any]]) -> str:
    """One line per group: name, tensors, parameters, lr scale, weight decay (nanoGPT prints this too)."""
    lines = [f"{'group':<20}{'tensors':>8}{'params':>14}{'lr_scale':>11}{'wd':>8}"]
    for g in groups:
        n = g.get("num_params", sum(p.numel() for p in g["params"]))
        lines.append(f"{g.get('name', '?'):<20}{len(g['params']):>8}{n:>14,}"
                     f"{g.get('lr_scale', 1.0):>11.4g}{g.get('weight_decay', 0.0):>8.3g}")
    total = sum(sum(p.numel() for p in g["params"]) for g in groups)
    decayed = sum(sum(p.numel() for p in g["params"]) for g in groups if g.get("weight_decay", 0) > 0)
    lines.append(f"total {total:,} trainable params, {decayed:,} with weight decay")
    return "\n".join(lines)


def build_optimizer(groups: list[dict[str, Any]], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                    eps: float = 1e-8, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW, fused when every param is on CUDA (one kernel for all params), else foreach."""
    for g in groups:
        g.setdefault("lr_scale", 1.0)
    params = [p for g in groups for p in g["params"]]
    on_cuda = bool(params) and all(p.is_cuda for p in params)
    kind = {"fused": True} if on_cuda else {"foreach": True}
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, **kind)


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int,
          schedule: str = "cosine", power: float = 1.0) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup from 0, then the schedule.

    - cosine: ``min_lr + (lr - min_lr) * (1 + cos(pi * t)) / 2``
    - poly: ``min_lr + (lr - min_lr) * (1 - t) ** power``
    - constant: ``lr``

    ``t`` goes 0 -> 1 over the steps after warmup.
    """
    if step < warmup_steps:
        return lr * step / warmup_steps
    if schedule == "constant":
        return lr
    t = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    if schedule == "cosine":
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "poly":
        return min_lr + (lr - min_lr) * (1.0 - t) ** power
    raise ValueError(f"unknown schedule '{schedule}' (cosine | poly | constant)")
