"""Linear probing of a frozen BEiT: which block's features are linearly separable, and how well.

The paper probes intermediate blocks because a masked-image-modeling encoder's last blocks specialise
in predicting visual tokens; the best block is usually in the upper middle. Here the encoder runs ONCE
per dataset (train and val), the pooled features of every probed block are kept in memory as fp16, and
one linear head per block is trained simultaneously on them by the shared trainer (as unilm
``run_linear_eval.py`` trains its per-layer heads together; the feature cache replaces its per-epoch
forward passes, so there is no crop/flip augmentation).

Per block: pooled tokens (``cat``: cls token + mean of patch tokens, unilm's default; ``avg``: mean of
patch tokens; ``cls``) -> ``BatchNorm1d(affine=False)`` (MAE's linear probe; off with ``batchnorm=false``)
-> ``Linear`` (init normal std 0.01, as unilm). AdamW, cosine, base lr 1e-3 per 256 images (unilm).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ...engine import ConfigError, Trainer
from ...engine import distributed as D
from ...engine.precision import autocast_for
from ...engine.threads import loader_workers
from ...engine.trainer import check_run_can_start, check_schedule
from ...interop.backbone import load_backbone
from ...models.config import BeitConfig
from .config import LinprobeConfig, parse_blocks
from .data import build_datasets, build_preprocess, check_num_classes
from .knn import knn_top1
from .train import begin_run, scaled_train_config

__all__ = ["OUTPUTS", "LinprobeConfig", "ProbeHeads", "build_encoder", "extract_features", "linprobe", "parse_blocks"]

#: what a linear probe writes into ``train.output_dir`` besides the engine's files (``--overwrite`` deletes it with
#: the earlier run, see ``beit.engine.rundir``)
RESULT_FILE = "linprobe.json"
OUTPUTS = (RESULT_FILE,)

logger = logging.getLogger(__name__)


def build_encoder(cfg: LinprobeConfig) -> nn.Module:
    """The frozen encoder (no head) in eval mode: a checkpoint or a preset (random), via ``beit.build_backbone``.

    Raises:
        FileNotFoundError / CheckpointError: ``cfg.model`` cannot be read (as ``beit.load_model``).
        ValueError: a bad ``model_overrides`` key (as ``beit.build_backbone``).
    """
    return _load_encoder(cfg)[0]


def _load_encoder(cfg: LinprobeConfig) -> tuple[nn.Module, BeitConfig | None]:
    """:func:`build_encoder` and the checkpoint's own architecture (None for a preset), from one read of the
    checkpoint: its loading report is logged once. Raises as :func:`build_encoder`."""
    over = {"img_size": cfg.img_size, "head": "none", "drop_path_rate": 0.0, **cfg.model_overrides}
    encoder, src = load_backbone(cfg.model, **over)
    return encoder.eval().requires_grad_(False), src


def _log_image_size(cfg: LinprobeConfig, src: BeitConfig | None) -> int | None:
    """Say (one log line) when ``cfg.img_size`` differs from the image size the checkpoint (of architecture
    ``src``) was trained at: the features are extracted at ``cfg.img_size`` (the config's, e.g.
    ``linprobe_base``'s 224), with the position tables resampled. Returns the checkpoint's size (None for a
    preset, ``src=None``, whose size is the config's)."""
    if src is None:
        return None
    h, w = src.img_hw
    size = f"{h}" if h == w else f"{h}x{w}"
    if (h, w) != (cfg.img_size, cfg.img_size):
        logger.info("img_size %d (from the config) differs from the %s px the checkpoint was trained at: images are "
                    "resized to %d and its position tables resampled; set img_size=%s to probe at its own size",
                    cfg.img_size, size, cfg.img_size, size)
    return h


def _pool(tokens: torch.Tensor, pool: str) -> torch.Tensor:
    if pool == "avg":
        return tokens[:, 1:].mean(dim=1)
    if pool == "cls":
        return tokens[:, 0]
    return torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=-1)


@torch.no_grad()
def extract_features(model: nn.Module, dataset: Dataset, blocks: list[int], *, pool: str = "cat",
                     batch_size: int = 256, num_workers: int = 4, device: torch.device | str | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass of the frozen encoder: fp16 features ``[N, len(blocks), D']`` and labels ``[N]`` on CPU.

    ``get_intermediate_layers`` gives every block's tokens in one forward; bf16 autocast on CUDA.
    """
    device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    feats: torch.Tensor | None = None
    labels = torch.empty(len(dataset), dtype=torch.long)
    idx = [b - 1 for b in blocks]
    i = 0
    for images, targets in tqdm(loader, desc="features", disable=len(loader) < 20):
        images = images.to(device, non_blocking=True)
        with autocast_for(device, "auto"):
            outs = model.get_intermediate_layers(images)
        f = torch.stack([_pool(outs[j].float(), pool) for j in idx], dim=1).half().cpu()  # [B, L, D']
        if feats is None:
            feats = torch.empty((len(dataset), *f.shape[1:]), dtype=torch.float16)
        feats[i:i + len(f)] = f
        labels[i:i + len(f)] = torch.as_tensor(targets)
        i += len(f)
    if feats is None:
        raise ValueError("empty dataset: no features")
    return feats[:i], labels[:i]


class ProbeHeads(nn.Module):
    """One ``[BatchNorm1d(affine=False)] -> Linear`` per probed block, batched: ``[B, L, D] -> [B, L, C]``.

    One BatchNorm over the ``L*D`` features is the same as a separate one per block; the linear heads are one
    ``[L, D, C]`` weight (a batched matmul instead of L small ones).
    """

    def __init__(self, num_blocks: int, dim: int, num_classes: int, batchnorm: bool = True):
        super().__init__()
        self.num_blocks, self.dim = num_blocks, dim
        self.norm = nn.BatchNorm1d(num_blocks * dim, affine=False, eps=1e-6) if batchnorm else nn.Identity()
        self.weight = nn.Parameter(torch.randn(num_blocks, dim, num_classes) * 0.01)
        self.bias = nn.Parameter(torch.zeros(num_blocks, num_classes))

    def no_weight_decay(self) -> set[str]:
        return {"bias"}

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        B = feats.shape[0]
        x = self.norm(feats.float().reshape(B, -1)).view(B, self.num_blocks, self.dim)
        return torch.einsum("bld,ldc->blc", x, self.weight) + self.bias


class _Features(Dataset):
    def __init__(self, feats: torch.Tensor, labels: torch.Tensor):
        self.feats, self.labels = feats, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.feats[i], self.labels[i]


@torch.no_grad()
def _per_block_top1(heads: nn.Module, feats: torch.Tensor, labels: torch.Tensor, batch: int = 4096) -> torch.Tensor:
    device = next(heads.parameters()).device
    was_training = heads.training
    heads.eval()
    correct = torch.zeros(heads.num_blocks, dtype=torch.float64)
    for s in range(0, len(labels), batch):
        logits = heads(feats[s:s + batch].to(device))
        y = labels[s:s + batch].to(device)
        correct += (logits.argmax(-1) == y[:, None]).sum(0).double().cpu()
    heads.train(was_training)
    return 100.0 * correct / max(len(labels), 1)


def _skipped_count(ds: Any) -> int:
    """Distinct unreadable files the dataset found (``num_skipped``: shared with its DataLoader workers, and
    including those a readable subset left out up front), through ``Subset``-like wrappers; 0 if it does not
    count. Features are extracted in one pass, so this is also the number of samples skipped."""
    while not hasattr(ds, "num_skipped") and hasattr(ds, "dataset"):
        ds = ds.dataset
    return int(getattr(ds, "num_skipped", 0))


def linprobe(cfg: LinprobeConfig, *, train_dataset: Dataset | None = None, val_dataset: Dataset | None = None,
             class_names: list[str] | None = None) -> dict[str, Any]:
    """Probe the blocks in ``cfg.layers``; return ``top1`` per block, ``best_block`` and ``best_top1`` (and,
    with ``cfg.knn > 0``, the weighted k-NN accuracy of the same features: ``knn_top1`` per block,
    ``knn_best_block``, ``knn_best_top1``).

    Writes ``linprobe.json`` into ``train.output_dir``. The best block is chosen on the val set (as the
    paper and unilm report it), so ``best_top1`` is slightly optimistic. Runs in one process. Before any
    feature is extracted: the folders are checked and listed, the training set's size checked against
    ``train.batch_size``, and a checkpoint trained at another size than ``img_size`` named in the log.

    Raises:
        ConfigError: a bad config key; no val set; folders not in the class layout; a training set smaller
            than one step of ``train.batch_size`` (the trainer's message, before extraction).
        ValueError: launched on several processes; ``num_classes`` does not match the data; no readable image.
    """
    begin_run(cfg, "the checkpoint to probe")
    if train_dataset is None and val_dataset is None and not cfg.data.val_dir:  # before the encoder is read
        raise ConfigError("data.val_dir", "linear probing needs a val set to pick and report the best block")
    if D.world_size() > 1:
        raise ValueError("linprobe runs in one process (features are cached in its memory); launch it without torchrun")
    t0 = time.perf_counter()
    torch.manual_seed(cfg.train.seed)  # a preset's random encoder (the baseline) is part of the run, as finetune's
    encoder, src = _load_encoder(cfg)  # read once, at the start: a bad checkpoint fails before any folder is listed
    _log_image_size(cfg, src)
    tf = build_preprocess(cfg.data.preprocess(cfg.img_size))  # features are cached: no augmentation
    if train_dataset is None:
        train_dataset, val_dataset, names = build_datasets(cfg.data, tf, tf, seed=cfg.train.seed,
                                                           class_names=cfg.class_names or None)
    else:
        names = list(class_names or cfg.class_names)
        if not names:
            raise ValueError("linprobe(train_dataset=...) needs class_names (or cfg.class_names)")
    if val_dataset is None:
        raise ConfigError("data.val_dir", "linear probing needs a val set to pick and report the best block")
    num_classes = check_num_classes(cfg.num_classes, names, cfg.data.train_dir or "the training set")
    cfg = dataclasses.replace(cfg, class_names=list(names), num_classes=num_classes)
    # one feature per image: the run's steps (a batch larger than the set, a warmup as long as the run) are checked
    # before extracting, in the one process linprobe runs in
    check_schedule(len(train_dataset), cfg.train, 1)
    train_cfg = scaled_train_config(cfg.train, cfg.ref_batch)  # once: it says its "lr x batch/ref" line
    # the output folder and --resume, as fit() will judge them, before the long extraction
    check_run_can_start(train_cfg, cfg)

    blocks = parse_blocks(cfg.layers, encoder.num_layers)
    workers = loader_workers(cfg.extract_num_workers, "extract_num_workers")
    kw = dict(pool=cfg.pool, batch_size=cfg.extract_batch_size, num_workers=workers)
    train_f, train_y = extract_features(encoder, train_dataset, blocks, **kw)
    val_f, val_y = extract_features(encoder, val_dataset, blocks, **kw)
    if int(train_y.max()) >= num_classes or int(train_y.min()) < 0:
        raise ValueError(f"labels outside 0..{num_classes - 1} in the training set")
    encoder.cpu()
    skipped = {"train": _skipped_count(train_dataset), "val": _skipped_count(val_dataset)}
    if skipped["train"] or skipped["val"]:
        logger.warning("features: %d train and %d val samples replaced or dropped (unreadable files; named above)",
                       skipped["train"], skipped["val"])
    t_feat = time.perf_counter() - t0
    logger.info("features: train %s, val %s (fp16, %.0f MB) in %.1fs", tuple(train_f.shape), tuple(val_f.shape),
                (train_f.numel() + val_f.numel()) * 2 / 2**20, t_feat)

    knn: dict[int, float] = {}
    if cfg.knn > 0:
        t_knn = time.perf_counter()
        acc_knn = knn_top1(train_f, train_y, val_f, val_y, num_classes=num_classes, k=cfg.knn,
                           temperature=cfg.knn_temperature, device=D.device())
        knn = {int(b): float(a) for b, a in zip(blocks, acc_knn)}
        logger.info("k-NN (k=%d, T=%g): %s in %.1fs", min(cfg.knn, len(train_y)), cfg.knn_temperature,
                    ", ".join(f"{b}: {a:.1f}" for b, a in knn.items()), time.perf_counter() - t_knn)

    torch.manual_seed(cfg.train.seed)
    heads = ProbeHeads(len(blocks), train_f.shape[-1], num_classes, cfg.batchnorm)

    def step_fn(model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        x, y = batch
        logits = model(x).float()  # [B, L, C]
        L = logits.shape[1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.repeat_interleave(L)) * L  # sum over heads
        return loss, {}

    def eval_fn(model: nn.Module) -> dict[str, float]:
        acc = _per_block_top1(model, val_f, val_y)
        out = {f"top1_block{b:02d}": float(a) for b, a in zip(blocks, acc)}
        out["top1"] = float(acc.max())
        out["best_block"] = float(blocks[int(acc.argmax())])
        return out

    trainer = Trainer(heads, _Features(train_f, train_y), step_fn, train_cfg, eval_fn=eval_fn,
                      metric_to_track="top1", run_config=cfg, outputs=OUTPUTS)
    fit = trainer.fit()
    acc = _per_block_top1(trainer.raw_model, val_f, val_y)
    per_block = {int(b): float(a) for b, a in zip(blocks, acc)}
    best = max(per_block, key=per_block.get)
    result = {
        "model": cfg.model, "pool": cfg.pool, "blocks": blocks, "depth": encoder.num_layers,
        "top1": per_block, "best_block": best, "best_top1": per_block[best],
        "train_top1_best_block": float(_per_block_top1(trainer.raw_model, train_f, train_y)[blocks.index(best)]),
        "num_train": len(train_y), "num_val": len(val_y), "feature_dim": int(train_f.shape[-1]),
        "feature_seconds": t_feat, "total_seconds": time.perf_counter() - t0, "steps": int(fit["step"]),
        "skipped_files": skipped,
    }
    if knn:
        best_knn = max(knn, key=knn.get)
        result.update(knn_top1=knn, knn_best_block=best_knn, knn_best_top1=knn[best_knn],
                      knn_k=min(cfg.knn, len(train_y)),  # the k used: at most the training set
                      knn_temperature=cfg.knn_temperature)
    out = Path(trainer.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULT_FILE).write_text(json.dumps(result, indent=2))
    logger.info("linear probe: best block %d/%d top-1 %.2f%% (%s)", best, encoder.num_layers, per_block[best],
                ", ".join(f"{b}: {a:.1f}" for b, a in per_block.items()))
    return result
