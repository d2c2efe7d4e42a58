"""Trainer: bit-exact resume, NaN stop, best tracking, logs and curves (CPU, tiny)."""

from __future__ import annotations

import pytest
import torch

from _engine_fixtures import NoisyDataset, TinyNet, step_fn
from beit.engine import TrainConfig, Trainer, TrainingDivergedError, load_checkpoint
from beit.engine.logging import read_metrics


def make_cfg(out, **kw) -> TrainConfig:
    base = dict(output_dir=str(out), epochs=3, batch_size=4, num_workers=0, lr=1e-2, min_lr=1e-4,
                warmup_steps=3, weight_decay=0.05, clip_grad=1.0, log_every=1, ckpt_every=4, keep_last=10)
    base.update(kw)
    return TrainConfig(**base)


def make_trainer(cfg: TrainConfig, **kw) -> Trainer:
    torch.manual_seed(0)  # same init for every run (a resumed run overwrites it anyway)

    def noisy_eval(model):  # draws random numbers: must not shift the training RNG
        x = torch.randn(8, 4)
        return {"score": float(model(x).sum()) + torch.rand(()).item()}

    def noisy_visualize(model, step, out_dir):
        torch.randn(100)

    kw.setdefault("eval_fn", noisy_eval)
    return Trainer(TinyNet(), NoisyDataset(40), step_fn, cfg, visualize_fn=noisy_visualize, **kw)


def train_rows(out):
    return [(r["step"], r["epoch"], r["loss"], r["acc"], r["grad_norm"], r["lr"])
            for r in read_metrics(out / "metrics.jsonl")]


@pytest.mark.parametrize("num_workers,accum_steps,ema", [(0, 1, 0.0), (2, 2, 0.9)])
def test_resume_is_bit_exact(tmp_path, num_workers, accum_steps, ema):
    kw = dict(num_workers=num_workers, accum_steps=accum_steps, ema=ema, image_every=3, eval_every=1)
    full = make_trainer(make_cfg(tmp_path / "full", **kw))
    full.fit()
    n = full.step
    assert n == 3 * (10 // accum_steps)

    part = make_trainer(make_cfg(tmp_path / "part", **kw))
    part.fit(stop_after_step=n // 2 + 1)  # stop mid-epoch, schedule unchanged
    assert part.step == n // 2 + 1
    resumed = make_trainer(make_cfg(tmp_path / "part", resume="auto", **kw))
    resumed.fit()

    a, b = train_rows(tmp_path / "full"), train_rows(tmp_path / "part")
    assert [r[0] for r in b] == list(range(1, n + 1))
    assert a == b  # exact equality of every logged float, not allclose
    for (k, p), (_, q) in zip(full.raw_model.state_dict().items(), resumed.raw_model.state_dict().items()):
        assert torch.equal(p, q), k
    if ema:
        for p, q in zip(full.ema.module.parameters(), resumed.ema.module.parameters()):
            assert torch.equal(p, q)
    assert read_metrics(tmp_path / "full" / "metrics.jsonl", "eval") == \
        read_metrics(tmp_path / "part" / "metrics.jsonl", "eval")


def test_resume_after_max_steps_and_from_older_checkpoint(tmp_path):
    """Stop with max_steps=k, resume with max_steps=N (constant lr), here from an older step file than
    last.pt, so metrics.jsonl lines after that step must be dropped. With log_every=4 and a resume at
    step 6, the first log after the resume still averages steps 5-8, as without the interruption."""
    kw = dict(schedule="constant", warmup_steps=0, ckpt_every=3, log_every=4)
    make_trainer(make_cfg(tmp_path / "full", max_steps=17, **kw)).fit()
    make_trainer(make_cfg(tmp_path / "part", max_steps=8, **kw)).fit()
    older = tmp_path / "part" / "step_0000006.pt"
    assert load_checkpoint(older)["step"] == 6
    make_trainer(make_cfg(tmp_path / "part", max_steps=17, resume=str(older), **kw)).fit()
    rows = train_rows(tmp_path / "full")
    assert [r[0] for r in rows] == [4, 8, 12, 16, 17]
    assert rows == train_rows(tmp_path / "part")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    calls = {"n": 0}

    def nan_at_third_step(model, batch):
        calls["n"] += 1
        loss, metrics = step_fn(model, batch)
        return (loss * float("nan") if calls["n"] == 3 else loss), metrics

    cfg = make_cfg(tmp_path, ckpt_every=1)
    torch.manual_seed(0)
    trainer = Trainer(TinyNet(), NoisyDataset(40), nan_at_third_step, cfg)
    with pytest.raises(TrainingDivergedError, match=r"step 3\b") as info:
        trainer.fit()
    assert info.value.step == 3
    assert "loss=nan" in str(info.value) and "acc=" in str(info.value)
    assert "last.pt" in str(info.value)
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["step"] == 2
    assert not (tmp_path / "step_0000003.pt").exists()
    # the weights in last.pt are finite, i.e. the NaN never reached the optimizer
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_best_checkpoint_logs_and_curves(tmp_path):
    scores = iter([0.3, 0.9, 0.5])
    cfg = make_cfg(tmp_path, ckpt_every=100, keep_last=1)
    trainer = make_trainer(cfg, eval_fn=lambda model: {"acc1": next(scores)}, metric_to_track="acc1")
    final = trainer.fit()
    assert final["best/acc1"] == 0.9 and final["best/step"] == 20
    assert final["eval/acc1"] == 0.5 and final["step"] == 30 and "train/loss" in final
    assert load_checkpoint(tmp_path / "best.pt")["step"] == 20
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 30
    assert load_checkpoint(tmp_path / "last.pt")["best"] == {"metric": "acc1", "value": 0.9, "step": 20}
    assert [p.name for p in sorted(tmp_path.glob("step_*.pt"))] == ["step_0000030.pt"]
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "log.txt").is_file()
    assert any((tmp_path / "tb").iterdir())
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert {"loss", "acc", "lr", "grad_norm", "img_per_s"} <= set(rows[0])
    assert rows[0]["lr"] == 0.0 and rows[3]["lr"] == pytest.approx(1e-2)  # linear warmup of 3 steps
    assert len(read_metrics(tmp_path / "metrics.jsonl", "eval")) == 3


def test_resume_rejects_other_architecture(tmp_path):
    make_trainer(make_cfg(tmp_path, max_steps=2, warmup_steps=0)).fit()
    torch.manual_seed(0)
    cfg = make_cfg(tmp_path, max_steps=4, warmup_steps=0, resume="auto")
    other = Trainer(TinyNet(dim=16), NoisyDataset(40), step_fn, cfg)
    with pytest.raises(ValueError, match=r"last\.pt: shape mismatch for 'cls_token'.*\(1, 16\)"):
        other.fit()


def test_fit_stops_its_loader_workers_and_a_second_fit_continues(tmp_path):
    """The persistent DataLoader workers end with fit(), not at interpreter exit (where torch's exit hook
    waits 5 s a worker: pytorch issue 81794); a second fit() of the same trainer starts new ones at its
    position and trains exactly as one uninterrupted fit."""
    import multiprocessing as mp

    kw = dict(num_workers=2, eval_every=1)
    full = make_trainer(make_cfg(tmp_path / "full", **kw))
    full.fit()
    assert mp.active_children() == []
    two = make_trainer(make_cfg(tmp_path / "two", **kw))
    two.fit(stop_after_step=13)
    assert mp.active_children() == []
    two.fit()
    assert two.step == full.step == 30 and mp.active_children() == []
    assert train_rows(tmp_path / "full") == train_rows(tmp_path / "two")


class _Stream(torch.utils.data.IterableDataset):
    """A stream of NoisyDataset's samples (each worker yields them all: enough for the loader's lifetime)."""

    def __init__(self, n: int = 40):
        self.items = NoisyDataset(n)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return (self.items[i] for i in range(len(self.items)))


def test_a_streaming_run_that_raises_leaves_no_loader_workers_behind(tmp_path):
    """A step that raises ends the stream's workers with fit(), even while the exception (and its traceback,
    which holds the training frames) is still alive, as in a notebook cell that caught it."""
    import multiprocessing as mp

    calls = {"n": 0}

    def failing_step(model, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom in step 3")
        return step_fn(model, batch)

    torch.manual_seed(0)
    trainer = Trainer(TinyNet(), _Stream(), failing_step, make_cfg(tmp_path, num_workers=2))
    try:
        trainer.fit()
    except RuntimeError as e:
        caught = e  # keep the traceback alive, as a caller that stores the error does
    assert "boom" in str(caught) and mp.active_children() == []
    # and a stream that ends its epochs normally leaves none either
    torch.manual_seed(0)
    Trainer(TinyNet(), _Stream(), step_fn, make_cfg(tmp_path / "ok", num_workers=2, epochs=2)).fit()
    assert mp.active_children() == []
