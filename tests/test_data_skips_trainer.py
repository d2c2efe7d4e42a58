"""Issue 14.10: the engine logs one total of skipped files per epoch and at the end (metrics.jsonl),
summed over DataLoader workers (and ranks: an all-reduce, a no-op in one process)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision import transforms as T

from beit.data.datasets import LabeledImageFolder
from beit.engine import TrainConfig, Trainer
from beit.engine.logging import read_metrics


def _step_fn(model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
    x, y = batch
    return F.cross_entropy(model(x), y), {}


def test_trainer_logs_skipped_files_per_epoch_over_two_workers(tmp_path: Path, one_thread) -> None:
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (data / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(data / c / f"{i}.png")
    (data / "a" / "9_bad.jpg").write_bytes(b"\xff\xd8 truncated")
    (data / "b" / "9_bad.png").write_bytes(b"not a png")
    ds = LabeledImageFolder(data, T.Compose([T.ToTensor(), T.Lambda(lambda x: x.flatten())]))
    assert len(ds) == 10
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), epochs=2, batch_size=5, num_workers=2, lr=1e-3,
                      min_lr=1e-4, warmup_steps=1, log_every=1, ckpt_every=100)
    torch.manual_seed(0)
    final = Trainer(nn.Linear(48, 2), ds, _step_fn, cfg).fit()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl", split="data")
    assert [(r["epoch"], r["skipped_files"], r["skipped_files_total"]) for r in rows] == [(0, 2, 2), (1, 2, 4)]
    train = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert train[-1]["skipped_files_total"] == 4
    assert final["skipped_files"] == 4


def test_linprobe_reports_skipped_files(tmp_path: Path, one_thread) -> None:
    import json

    from _finetune_data import colored_squares, tiny_pretrain_checkpoint
    from beit.engine import load_config
    from beit.tasks.classify import LinprobeConfig, linprobe

    data = colored_squares(tmp_path / "data", {"train": 8, "val": 4})
    Image.new("RGB", (9, 9), (255, 0, 0)).save(data / "train" / "c0" / "tiny_9x9.png")
    Image.new("RGB", (2000, 10), (0, 255, 0)).save(data / "train" / "c1" / "thin.png")
    (data / "train" / "c1" / "zz_broken.png").write_bytes(b"broken")
    (data / "val" / "c0" / "zz_broken.jpg").write_bytes(b"\xff\xd8 broken")
    cfg = load_config(LinprobeConfig, None, [
        f"model={tiny_pretrain_checkpoint(tmp_path / 'pt', depth=2)}", "img_size=32",
        f"data.train_dir={data / 'train'}", f"data.val_dir={data / 'val'}", f"train.output_dir={tmp_path / 'out'}",
        "train.epochs=2", "train.batch_size=8", "train.log_every=100", "extract_batch_size=8",
        "extract_num_workers=2"])
    res = linprobe(cfg)
    assert res["skipped_files"] == {"train": 1, "val": 1}
    assert json.loads((tmp_path / "out" / "linprobe.json").read_text())["skipped_files"] == {"train": 1, "val": 1}


def test_skip_counter_is_exact_per_epoch_past_its_64_epoch_cells() -> None:
    """Cells are reused round-robin (epoch % 64): a later epoch must not inherit an older epoch's count."""
    from beit.data.datasets import SkipCounter

    c = SkipCounter()
    for epoch in range(70):
        c.add(1 + (epoch == 3), epoch=epoch)  # epoch 3 skips 2
    assert [c.total(e) for e in (3, 6, 64, 67, 69)] == [0, 1, 1, 1, 1]  # 3 and 67 share a cell: 67's count only
    assert c.total(5) == 0 and c.total(70) == 0  # forgotten (reused by 69) / not counted yet
    assert c.total() == 71  # all epochs


def test_the_epochs_skip_warning_is_rank_0s(tmp_path: Path, one_thread, monkeypatch, beit_warnings) -> None:
    """The per-epoch count of skipped files is summed over ranks, the same on each: under torchrun every rank
    printed ``epoch 0: 1 unreadable or untransformable files skipped ...`` (the lines of two ranks even ran into
    one). Rank 0 says it; another rank (here: torchrun's ``RANK`` of a one-process run) keeps quiet."""
    data = tmp_path / "data"
    for c in ("a", "b"):
        (data / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (4, 4), (40 * i, 0, 0)).save(data / c / f"{i}.png")
    (data / "b" / "9_bad.png").write_bytes(b"not a png")
    said = {}
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        beit_warnings.clear()
        ds = LabeledImageFolder(data, T.Compose([T.ToTensor(), T.Lambda(lambda x: x.flatten())]))
        cfg = TrainConfig(output_dir=str(tmp_path / f"run{rank}"), epochs=1, batch_size=1, num_workers=0, lr=1e-3,
                          min_lr=1e-4, warmup_steps=1, log_every=1, ckpt_every=100)
        assert Trainer(nn.Linear(48, 2), ds, _step_fn, cfg).fit()["skipped_files"] == 1
        said[rank] = [r.getMessage() for r in beit_warnings if "files skipped" in r.getMessage()]
    assert said["0"] == ["epoch 0: 1 unreadable or untransformable files skipped (1 in this run); their names are in "
                         "the warnings above"]
    assert said["1"] == []
