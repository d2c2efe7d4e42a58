"""Trainer: bit-exact resume, NaN stop, best tracking, logs and curves (CPU, tiny)."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pytest
import torch
from torch import nn

from _engine_fixtures import NoisyDataset, TinyNet, step_fn
from beit.engine import TrainConfig, Trainer, TrainingDivergedError, load_checkpoint, save_checkpoint
from beit.engine.logging import read_metrics
from beit.engine.rundir import TaskMismatchError
from beit.engine.trainer import TASK_NAMES, TrainingInterrupted


def make_cfg(out, **kw) -> TrainConfig:
    base = dict(output_dir=str(out), epochs=3, batch_size=4, num_workers=0, lr=1e-2, min_lr=1e-4,
                warmup_steps=3, weight_decay=0.05, clip_grad=1.0, log_every=1, ckpt_every=4, keep_last=10)
    base.update(kw)
    return TrainConfig(**base)


def make_trainer(cfg: TrainConfig, step=step_fn, **kw) -> Trainer:
    torch.manual_seed(0)  # same init for every run (a resumed run overwrites it anyway)

    def noisy_eval(model):  # draws random numbers: must not shift the training RNG
        x = torch.randn(8, 4)
        return {"score": float(model(x).sum()) + torch.rand(()).item()}

    def noisy_visualize(model, step, out_dir):
        torch.randn(100)

    kw.setdefault("eval_fn", noisy_eval)
    return Trainer(TinyNet(), NoisyDataset(40), step, cfg, visualize_fn=noisy_visualize, **kw)


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


# --- stopping on SIGINT / SIGTERM -----------------------------------------------------------------------------

def _send(sig: int, pids: list[int] | None = None) -> None:
    """Signal this process (and ``pids``). A Python function: its next call lets Python run the handler."""
    for pid in pids or [os.getpid()]:
        os.kill(pid, sig)


@pytest.fixture
def sigint_handled():
    """Python's own SIGINT handler while the test runs: a runner started in the background (``pytest &`` in a
    script) inherits SIGINT ignored, and the trainer rightly leaves an ignored SIGINT alone."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def _signals_at(call: int, *signals: int):
    """``step_fn`` that sends ``signals`` to this process, in order, at its ``call``-th call (1-based)."""
    calls = {"n": 0}

    def step(model, batch):
        calls["n"] += 1
        if calls["n"] == call:
            for sig in signals:
                _send(sig)
        return step_fn(model, batch)

    return step


@pytest.mark.parametrize("num_workers", [0, 2])
def test_sigterm_saves_the_finished_step_frees_the_folder_and_resumes_exactly(tmp_path, num_workers):
    """SIGTERM during step 6 (of 15; no periodic checkpoint there): the step is finished, step_0000006.pt
    written like a periodic one, the lock released, the handler in place before restored, and TrainingInterrupted
    carries 143. The signal comes twice (as timeout(1) sends it) and also reaches the loader workers (as timeout
    and scancel signal the whole process group): neither stops the clean stop. Resuming repeats the
    uninterrupted run's losses, evals and weights exactly."""
    kw = dict(num_workers=num_workers, accum_steps=2, ckpt_every=4, eval_every=1, image_every=3)
    full = make_trainer(make_cfg(tmp_path / "full", **kw))
    full.fit()
    assert full.step == 15

    calls, holder = {"n": 0}, []

    def step_then_sigterm(model, batch):
        calls["n"] += 1
        if calls["n"] == 2 * 6 - 1:  # the first micro-batch of step 6
            loader = holder[0]._loader
            workers = [w.pid for w in loader._iterator._workers] if num_workers else []
            _send(signal.SIGTERM, [*workers, os.getpid()])
            _send(signal.SIGTERM)
        return step_fn(model, batch)

    part = tmp_path / "part"
    before = signal.getsignal(signal.SIGTERM)
    trainer = make_trainer(make_cfg(part, **kw), step=step_then_sigterm)
    holder.append(trainer)
    with pytest.raises(TrainingInterrupted) as info:
        trainer.fit()
    e = info.value
    assert (e.signum, e.exit_code, e.step, e.saved) == (signal.SIGTERM, 143, 6, True)
    assert e.checkpoint == part / "step_0000006.pt"
    assert str(e) == (f"interrupted by SIGTERM after step 6; checkpoint of that step: {part / 'step_0000006.pt'}; "
                      "resume with train.resume=auto (--resume auto)")
    assert isinstance(e, KeyboardInterrupt)
    assert load_checkpoint(part / "last.pt")["step"] == 6 and load_checkpoint(e.checkpoint)["batch_in_epoch"] == 2
    assert not (part / ".lock").exists()
    assert signal.getsignal(signal.SIGTERM) is before
    assert mp.active_children() == []
    assert str(e) in (part / "log.txt").read_text()
    assert [r[0] for r in train_rows(part)] == [1, 2, 3, 4, 5, 6]  # metrics.jsonl complete up to the stop

    resumed = make_trainer(make_cfg(part, resume="auto", **kw))
    resumed.fit()
    assert train_rows(tmp_path / "full") == train_rows(part)
    assert read_metrics(tmp_path / "full" / "metrics.jsonl", "eval") == read_metrics(part / "metrics.jsonl", "eval")
    for (k, p), (_, q) in zip(full.raw_model.state_dict().items(), resumed.raw_model.state_dict().items()):
        assert torch.equal(p, q), k


def test_a_signal_during_the_last_step_lets_the_run_finish(tmp_path, beit_warnings):
    """SIGTERM during the run's last step: nothing is left to resume, so fit() finishes normally (the final
    checkpoint written, final metrics returned) instead of raising with a resume hint that has nothing to do."""
    # 40 samples / batch 4 = 10 steps an epoch, 3 epochs: call 30 is the last step
    trainer = make_trainer(make_cfg(tmp_path), step=_signals_at(30, signal.SIGTERM))
    trainer.fit()
    assert trainer.step == 30 and load_checkpoint(tmp_path / "last.pt")["step"] == 30
    assert not (tmp_path / ".lock").exists()
    assert any("SIGTERM came with the run's last step (30)" in r.getMessage() for r in beit_warnings)


def test_a_second_ctrl_c_stops_at_once_without_saving(tmp_path, monkeypatch, sigint_handled):
    """Ctrl-C asks for a stop after the step; Ctrl-C again (a second or more later) stops at once: nothing
    written for the steps since the last checkpoint, the folder released, exit code 130, the handler restored."""
    monkeypatch.setattr(Trainer, "ABORT_AFTER_S", 0.0)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as info:
        make_trainer(make_cfg(tmp_path, ckpt_every=3), step=_signals_at(5, signal.SIGINT, signal.SIGINT)).fit()
    e = info.value
    assert (e.exit_code, e.step, e.saved, e.checkpoint_step) == (130, 4, False, 3)  # step 5 never finished
    assert str(e) == (f"stopped at once by a second SIGINT after step 4, not saved; the last checkpoint is "
                      f"{tmp_path / 'step_0000003.pt'} (step 3); resume with train.resume=auto (--resume auto)")
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_0000003.pt"]
    assert not (tmp_path / ".lock").exists() and signal.getsignal(signal.SIGINT) is before


def test_a_second_ctrl_c_before_any_checkpoint_says_so(tmp_path, monkeypatch, sigint_handled):
    monkeypatch.setattr(Trainer, "ABORT_AFTER_S", 0.0)
    with pytest.raises(TrainingInterrupted) as info:
        make_trainer(make_cfg(tmp_path, ckpt_every=100), step=_signals_at(3, signal.SIGINT, signal.SIGINT)).fit()
    assert str(info.value) == "stopped at once by a second SIGINT after step 2, not saved; no checkpoint written yet"
    assert not list(tmp_path.glob("*.pt")) and not (tmp_path / ".lock").exists()


def test_an_evaluation_cut_short_by_the_signal_still_saves_the_step(tmp_path, beit_warnings):
    """The signal reached the evaluation's own DataLoader workers too (a process-group signal), which makes the
    evaluation fail: in a single process that is a warning, and the step's checkpoint is still written."""
    def eval_fn(model):
        _send(signal.SIGTERM)
        _send(signal.SIGTERM)
        raise RuntimeError("DataLoader worker (pid 123) is killed by signal: Terminated.")

    with pytest.raises(TrainingInterrupted) as info:
        make_trainer(make_cfg(tmp_path, ckpt_every=100), eval_fn=eval_fn, metric_to_track="score").fit()
    assert (info.value.step, info.value.exit_code, info.value.saved) == (10, 143, True)
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 10
    assert any("the evaluation of step 10 was cut short while stopping on SIGTERM (RuntimeError: DataLoader "
               "worker" in r.getMessage() for r in beit_warnings)


def _fails_after_signal_at(call: int):
    """``step_fn`` that, at its ``call``-th call, gets SIGTERM and then fails as a step does whose compile workers
    the process-group signal killed (inductor raises from the dead pool)."""
    calls = {"n": 0}

    def step(model, batch):
        calls["n"] += 1
        if calls["n"] == call:
            _send(signal.SIGTERM)
            _send(signal.SIGTERM)
            raise RuntimeError("InductorError: SubprocException: the compile worker pool was terminated\nmore")
        return step_fn(model, batch)

    return step


@pytest.mark.parametrize("accum_steps, call", [(1, 7), (2, 14)])  # (2, 14): step 7's second micro-batch
def test_a_step_that_fails_because_of_the_stop_signal_stops_cleanly_naming_the_last_checkpoint(
        tmp_path, beit_warnings, accum_steps, call):
    """SIGTERM to the process group while a step compiles kills inductor's workers and the step raises: that is
    the stop's doing, so no traceback of the compile error but the clean stop (exit 143) naming the last checkpoint
    written, and a warning naming the error. The failed step is not saved (it already drew random numbers and set
    its lr: a resume from it would not repeat the run); resuming from the last checkpoint does, exactly."""
    kw = dict(ckpt_every=5, accum_steps=accum_steps)
    full = make_trainer(make_cfg(tmp_path / "full", **kw))
    full.fit()
    part = tmp_path / "part"
    with pytest.raises(TrainingInterrupted) as info:
        make_trainer(make_cfg(part, **kw), step=_fails_after_signal_at(call)).fit()
    e = info.value
    assert (e.exit_code, e.step, e.saved, e.checkpoint, e.checkpoint_step) == (143, 6, False,
                                                                              part / "step_0000005.pt", 5)
    assert str(e) == (f"interrupted by SIGTERM after step 6, not saved; the last checkpoint is "
                      f"{part / 'step_0000005.pt'} (step 5); resume with train.resume=auto (--resume auto)")
    assert isinstance(e.__cause__, RuntimeError) and "compile worker pool" in str(e.__cause__)
    assert any("step 7 failed while stopping on SIGTERM (RuntimeError: InductorError: SubprocException: the "
               "compile worker pool was terminated): stopped after step 6, that step not saved" in r.getMessage()
               for r in beit_warnings)
    assert not (part / ".lock").exists() and not (part / "step_0000006.pt").exists()
    resumed = make_trainer(make_cfg(part, resume="auto", **kw))
    resumed.fit()
    assert train_rows(tmp_path / "full") == train_rows(part)
    for (k, p), (_, q) in zip(full.raw_model.state_dict().items(), resumed.raw_model.state_dict().items()):
        assert torch.equal(p, q), k


def test_a_real_error_in_a_step_after_a_stop_signal_is_still_an_error(tmp_path):
    """Ctrl-C and then a genuine fault in the same step (out of memory, a shape bug): reported as the error it is,
    not turned into a clean stop."""
    def step(model, batch):
        _send(signal.SIGTERM)
        raise ValueError("shapes (4,3) and (5,3) do not match")

    with pytest.raises(ValueError, match="shapes"):
        make_trainer(make_cfg(tmp_path), step=step).fit()


def test_a_first_step_that_fails_because_of_the_stop_signal_says_nothing_was_saved(tmp_path):
    with pytest.raises(TrainingInterrupted) as info:
        make_trainer(make_cfg(tmp_path, ckpt_every=100), step=_fails_after_signal_at(1)).fit()
    assert str(info.value) == "interrupted by SIGTERM after step 0, not saved; no checkpoint written yet"
    assert info.value.exit_code == 143 and not list(tmp_path.glob("*.pt")) and not (tmp_path / ".lock").exists()


def test_a_step_that_fails_without_a_signal_still_raises_its_error(tmp_path):
    def failing(model, batch):
        raise RuntimeError("a real fault")

    with pytest.raises(RuntimeError, match="a real fault"):
        make_trainer(make_cfg(tmp_path), step=failing).fit()


def test_a_forked_worker_that_gets_the_signal_before_its_init_does_nothing(tmp_path, capfd):
    """A DataLoader worker forked while fit() runs inherits the trainer's handler until its worker_init replaces
    it; a process-group signal in that moment made the worker print the stop message a second time. In any other
    process than the one fit() runs in, the handler does nothing."""
    trainer = make_trainer(make_cfg(tmp_path))
    with trainer._stop_on_signals():
        trainer._signal_pid = os.getpid() + 1  # as seen from a forked child
        trainer._on_signal(signal.SIGTERM, None)
        assert trainer._signal == 0 and "stopping after this step" not in capfd.readouterr().err
        trainer._signal_pid = os.getpid()
        trainer._on_signal(signal.SIGTERM, None)
        assert trainer._signal == signal.SIGTERM and "stopping after this step" in capfd.readouterr().err


def test_an_evaluation_that_fails_writes_the_steps_checkpoint_first(tmp_path, beit_warnings):
    """A bad validation file found by the final evaluation ended the run before the final checkpoint: the steps
    since the last one were lost. The finished step is saved, the error still ends the run, and auto resumes
    from that step."""
    calls = {"n": 0}

    def eval_fn(model):
        calls["n"] += 1
        raise ValueError("val/0016.png: label values [200] are outside the 11 classes")

    kw = dict(max_steps=10, ckpt_every=100, warmup_steps=0)
    with pytest.raises(ValueError, match="outside the 11 classes"):
        make_trainer(make_cfg(tmp_path, **kw), eval_fn=eval_fn, metric_to_track="score").fit()
    assert calls["n"] == 1 and load_checkpoint(tmp_path / "last.pt")["step"] == 10
    assert any("the evaluation of step 10 failed (ValueError: val/0016.png" in r.getMessage()
               and "the checkpoint of that step was written first" in r.getMessage() for r in beit_warnings)


class _SignalsItsWorker(torch.utils.data.Dataset):
    """(image, label) items; a DataLoader worker that reads item 0 gets SIGTERM, as every process of a job does
    from scancel, timeout(1) or Ctrl-C in a terminal."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        if i == 0 and torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # a killed worker dies here
        return torch.zeros(3, 4, 4), i % 2


def test_the_tasks_evaluation_loaders_survive_a_stop_signal():
    """An evaluation that fit() runs (the tasks' eval_fn) keeps its workers through a process-group stop signal,
    so the stopping run still evaluates its last step (the workers were killed: "DataLoader worker is killed by
    signal: Terminated")."""
    from beit.tasks.classify.evaluate import make_eval_fn

    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 2))
    result = make_eval_fn(_SignalsItsWorker(), 2, batch_size=4, num_workers=1, topk=(1,))(model)
    assert result["top1"] == 50.0


# --- resume=auto past a damaged last.pt, and a resume from an older checkpoint ---------------------------------

def test_auto_resume_skips_a_damaged_last_pt_for_the_newest_readable_checkpoint(tmp_path, beit_warnings):
    kw = dict(max_steps=9, ckpt_every=3, warmup_steps=0, schedule="constant")
    make_trainer(make_cfg(tmp_path / "full", **kw)).fit()
    part = tmp_path / "part"
    make_trainer(make_cfg(part, **kw)).fit(stop_after_step=8)  # step_3, step_6, step_8 = last.pt
    # last.pt alone damaged (a copy on a filesystem without hard links, or rewritten): step_8 is intact
    (part / "last.pt").unlink()
    (part / "last.pt").write_bytes(b"PK\x03\x04 truncated")
    trainer = make_trainer(make_cfg(part, resume="auto", **kw))
    trainer.fit(stop_after_step=8)
    assert trainer.step == 8
    shown = [r.getMessage() for r in beit_warnings if "resume=auto" in r.getMessage()]
    assert len(shown) == 1 and f"{part / 'last.pt'}: not a readable checkpoint, damaged or truncated?" in shown[0]
    assert shown[0].endswith(f"Resuming from the newest readable checkpoint instead: {part / 'step_0000008.pt'} "
                             "(step 8)")
    # last.pt (a hard link to step_8, as the engine makes it) damaged in place: step_8 too; step_6 is the newest
    # readable one. The explicit name of a damaged checkpoint is still an error naming it.
    (part / "last.pt").unlink()
    os.link(part / "step_0000008.pt", part / "last.pt")
    with open(part / "last.pt", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match=r"step_0000008\.pt: not a readable checkpoint"):
        make_trainer(make_cfg(part, resume=str(part / "step_0000008.pt"), **kw)).fit()
    beit_warnings.clear()
    make_trainer(make_cfg(part, resume="auto", **kw)).fit()
    assert any(f"instead: {part / 'step_0000006.pt'} (step 6)" in r.getMessage() for r in beit_warnings)
    assert train_rows(tmp_path / "full") == train_rows(part)
    assert (part / "abandoned" / "step_0000008.pt").is_file()  # the damaged later one, set aside, not deleted
    assert sorted(p.name for p in part.glob("step_*")) == ["step_0000003.pt", "step_0000006.pt", "step_0000009.pt"]


def test_a_damaged_last_pt_skipped_by_auto_is_set_aside_and_last_pt_readable_again(tmp_path):
    """Resumed at its end (nothing left to train, so no save follows): last.pt must still be readable after,
    for what reads a finished run (a task's final export reads last.pt)."""
    kw = dict(max_steps=4, ckpt_every=2, warmup_steps=0)
    make_trainer(make_cfg(tmp_path, **kw)).fit()
    (tmp_path / "last.pt").unlink()
    (tmp_path / "last.pt").write_bytes(b"PK\x03\x04 truncated")
    make_trainer(make_cfg(tmp_path, resume="auto", **kw)).fit()
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 4
    assert (tmp_path / "last.pt").samefile(tmp_path / "step_0000004.pt")
    assert (tmp_path / "abandoned" / "last.pt").read_bytes() == b"PK\x03\x04 truncated"


def test_auto_resume_without_last_pt_continues_from_the_newest_readable_step_checkpoint(tmp_path, beit_warnings):
    """last.pt deleted (or never linked: a run killed between its first step checkpoint and the link): auto resumed
    nothing and refused the folder ("no last.pt to resume"). It continues from the newest readable step checkpoint,
    with a warning naming both, exactly as the uninterrupted run, and last.pt names that checkpoint again."""
    kw = dict(max_steps=9, ckpt_every=3, warmup_steps=0, schedule="constant")
    make_trainer(make_cfg(tmp_path / "full", **kw)).fit()
    part = tmp_path / "part"
    make_trainer(make_cfg(part, **kw)).fit(stop_after_step=8)  # step_3, step_6, step_8 = last.pt
    (part / "last.pt").unlink()
    trainer = make_trainer(make_cfg(part, resume="auto", **kw))
    trainer.fit(stop_after_step=8)  # nothing to train: last.pt must name step_8 all the same
    assert trainer.step == 8 and (part / "last.pt").samefile(part / "step_0000008.pt")
    shown = [r.getMessage() for r in beit_warnings if "resume=auto" in r.getMessage()]
    assert shown == [f"resume=auto: {part / 'last.pt'} is missing. Resuming from the newest readable checkpoint "
                     f"instead: {part / 'step_0000008.pt'} (step 8)"]
    # and the newest step checkpoint damaged too: the next one, both named; the damaged one set aside
    (part / "last.pt").unlink()
    with open(part / "step_0000008.pt", "r+b") as f:
        f.truncate(100)
    beit_warnings.clear()
    make_trainer(make_cfg(part, resume="auto", **kw)).fit()
    shown = [r.getMessage() for r in beit_warnings if "resume=auto" in r.getMessage()]
    assert len(shown) == 1 and shown[0].startswith(f"resume=auto: {part / 'last.pt'} is missing; "
                                                   f"{part / 'step_0000008.pt'}: not a readable checkpoint")
    assert shown[0].endswith(f"instead: {part / 'step_0000006.pt'} (step 6)")
    assert train_rows(tmp_path / "full") == train_rows(part)
    assert (part / "abandoned" / "step_0000008.pt").is_file()
    assert load_checkpoint(part / "last.pt")["step"] == 9
    # a folder without any checkpoint still starts from step 0
    fresh = make_trainer(make_cfg(tmp_path / "fresh", resume="auto", **kw))
    fresh.fit(stop_after_step=2)
    assert [r[0] for r in train_rows(tmp_path / "fresh")] == [1, 2]


def test_auto_resume_passes_over_another_tasks_step_checkpoint(tmp_path, beit_warnings):
    """A newer step file of another task copied into the folder (last.pt missing): auto warned "Resuming from" it,
    then refused it. It is passed over like an unreadable one, named, and this task's newest checkpoint resumed;
    when last.pt itself is another task's, the error names it and nothing is set aside as damaged."""
    kw = dict(max_steps=9, ckpt_every=3, warmup_steps=0, schedule="constant")
    make_trainer(make_cfg(tmp_path, **kw), task="pre-training").fit(stop_after_step=6)  # step_3, step_6 = last.pt
    (tmp_path / "last.pt").unlink()
    other = load_checkpoint(tmp_path / "step_0000006.pt")
    save_checkpoint({**other, "task": "classification", "step": 10}, tmp_path / "step_0000010.pt")
    trainer = make_trainer(make_cfg(tmp_path, resume="auto", **kw), task="pre-training")
    trainer.fit(stop_after_step=7)
    shown = [r.getMessage() for r in beit_warnings if "resume=auto" in r.getMessage()]
    assert len(shown) == 1 and f"{tmp_path / 'step_0000010.pt'} is a classification checkpoint, not a pre-training " \
        "one" in shown[0] and shown[0].endswith(f"instead: {tmp_path / 'step_0000006.pt'} (step 6)")
    assert trainer.step == 7
    save_checkpoint({**other, "task": "classification"}, tmp_path / "elsewhere.pt")
    (tmp_path / "last.pt").unlink()
    (tmp_path / "elsewhere.pt").rename(tmp_path / "last.pt")
    for p in tmp_path.glob("step_*.pt"):
        p.unlink()
    with pytest.raises(TaskMismatchError, match=r"last\.pt is a classification checkpoint, not a pre-training one"):
        make_trainer(make_cfg(tmp_path, resume="auto", **kw), task="pre-training").fit()
    assert (tmp_path / "last.pt").is_file() and not (tmp_path / "abandoned" / "last.pt").exists()


def test_auto_resume_with_nothing_readable_names_last_pt_and_the_others(tmp_path):
    make_trainer(make_cfg(tmp_path, max_steps=4, ckpt_every=2, warmup_steps=0)).fit()
    for p in tmp_path.glob("step_*.pt"):
        p.write_bytes(b"\x80\x02garbage")  # last.pt is step_4's hard link
    with pytest.raises(ValueError, match=r"last\.pt: not a readable checkpoint, damaged or truncated\? .*; no other "
                                         r"checkpoint of .* is readable either \(step_0000002\.pt\)"):
        make_trainer(make_cfg(tmp_path, max_steps=4, ckpt_every=2, warmup_steps=0, resume="auto")).fit()
    assert not (tmp_path / ".lock").exists()


def test_resume_from_an_older_checkpoint_sets_the_later_ones_aside(tmp_path, beit_warnings):
    """A run that reached step 10 (checkpoints 6, 9, 10 kept), resumed from step_6 to step 8: 9 and 10 belong
    to the abandoned branch; they move to abandoned/ (one line), do not count toward keep_last, last.pt is the
    new branch's."""
    kw = dict(ckpt_every=3, keep_last=3, warmup_steps=0, schedule="constant", eval_every=0)
    make_trainer(make_cfg(tmp_path, max_steps=10, **kw)).fit()
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_0000006.pt", "step_0000009.pt",
                                                               "step_0000010.pt"]
    make_trainer(make_cfg(tmp_path, max_steps=8, resume=str(tmp_path / "step_0000006.pt"), **kw)).fit()
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_0000006.pt", "step_0000008.pt"]
    assert sorted(p.name for p in (tmp_path / "abandoned").iterdir()) == ["step_0000009.pt", "step_0000010.pt"]
    assert load_checkpoint(tmp_path / "abandoned" / "step_0000010.pt")["step"] == 10
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 8
    lines = [r.getMessage() for r in beit_warnings if "abandoned" in r.getMessage()]
    assert len(lines) == 1 and "resumed at step 6" in lines[0] and "step_0000009.pt, step_0000010.pt" in lines[0]


# --- the task a checkpoint belongs to ------------------------------------------------------------------------------

def test_resume_refuses_another_tasks_checkpoint_before_the_config_diff(tmp_path):
    kw = dict(max_steps=2, warmup_steps=0)
    make_trainer(make_cfg(tmp_path, **kw), task="classification").fit()
    assert load_checkpoint(tmp_path / "last.pt")["task"] == "classification"
    other = make_trainer(make_cfg(tmp_path, resume="auto", **{**kw, "max_steps": 4, "lr": 0.5}), task="pre-training")
    with pytest.raises(TaskMismatchError) as info:
        other.fit()
    assert str(info.value) == (f"{tmp_path / 'last.pt'} is a classification checkpoint, not a pre-training one: "
                               "--resume (train.resume) continues a run of the same task")
    # a checkpoint from before the field resumes as before
    state = load_checkpoint(tmp_path / "last.pt")
    del state["task"]
    save_checkpoint(state, tmp_path / "last.pt")
    resumed = make_trainer(make_cfg(tmp_path, resume="auto", **{**kw, "max_steps": 4}), task="pre-training")
    resumed.fit()
    assert resumed.step == 4 and load_checkpoint(tmp_path / "last.pt")["task"] == "pre-training"


def test_every_task_config_has_its_task_name():
    from beit.engine.trainer import task_of
    from beit.tasks.classify.config import FinetuneConfig, LinprobeConfig
    from beit.tasks.layout.config import LayoutConfig
    from beit.tasks.pretrain.config import PretrainConfig
    from beit.tasks.segmentation.config import SegmentConfig
    from beit.tasks.tokenizer.config import TokenizerTrainConfig

    classes = [PretrainConfig, FinetuneConfig, LinprobeConfig, SegmentConfig, LayoutConfig, TokenizerTrainConfig]
    assert sorted(c.__name__ for c in classes) == sorted(TASK_NAMES)
    assert task_of(make_cfg("x")) is None and task_of({"train": {}}) is None


def test_compile_without_cuda_says_what_it_costs_and_how_to_skip_it(tmp_path):
    from beit.engine.trainer import COMPILE_ON_CPU

    if torch.cuda.is_available():
        pytest.skip("the line is for machines without CUDA")
    make_trainer(make_cfg(tmp_path / "c", compile=True))  # compiling is lazy: nothing runs until a step
    assert COMPILE_ON_CPU in (tmp_path / "c" / "log.txt").read_text()
    make_trainer(make_cfg(tmp_path / "n"))
    assert "train.compile=true without CUDA" not in (tmp_path / "n" / "log.txt").read_text()
