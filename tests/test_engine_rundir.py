"""The output folder (issue 14, items 13-18): divergence in the optimizer step, resume config check, incomplete
files, one run per folder (lock), no silent overwrite of a finished run, full disk during a checkpoint."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from _engine_fixtures import NoisyDataset, TinyNet, step_fn
from beit.engine import TrainConfig, Trainer, TrainingDivergedError, load_checkpoint
from beit.engine import checkpoint as C
from beit.engine import rundir as R
from beit.engine.logging import plot_curves, read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")
SRC = str(Path(__file__).resolve().parents[1] / "src")


def cfg_of(out, **kw) -> TrainConfig:
    base = dict(output_dir=str(out), max_steps=6, batch_size=4, num_workers=0, lr=1e-2, min_lr=1e-4,
                warmup_steps=0, schedule="constant", clip_grad=1.0, log_every=1, ckpt_every=3, keep_last=10)
    base.update(kw)
    return TrainConfig(**base)


def trainer_of(cfg: TrainConfig, **kw) -> Trainer:
    torch.manual_seed(0)
    return Trainer(TinyNet(), NoisyDataset(40), step_fn, cfg, **kw)


def losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(out / "metrics.jsonl")]


# --- 13: divergence anywhere, including inside the optimizer step ---------------------------------------

def test_overflow_in_optimizer_step_stops_before_any_bad_checkpoint(tmp_path):
    """lr 1e38 overflows inside AdamW (the loss and grads of that step are finite): the save right after it is
    refused, the error names that step, and last.pt keeps the previous step's finite weights."""
    # warmup: step 1 runs at lr 0 (saved, finite), step 2 at lr 5e37
    cfg = cfg_of(tmp_path, lr=1e38, min_lr=0.0, warmup_steps=2, ckpt_every=1)
    with pytest.raises(TrainingDivergedError, match=r"step 2: its optimizer update made the weights non-finite "
                                                     r"\(lr=5e\+37\)\. last good checkpoint: .*last\.pt") as info:
        trainer_of(cfg).fit()
    assert info.value.step == 2
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["step"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_0000001.pt"]
    assert not (tmp_path / ".lock").exists()  # released on the error


def test_overflow_between_saves_is_named_at_its_own_step(tmp_path):
    """No save right after the bad update: the next step's single check reports the step that overflowed."""
    cfg = cfg_of(tmp_path, lr=1e38, min_lr=0.0, warmup_steps=2, ckpt_every=100)
    with pytest.raises(TrainingDivergedError, match=r"step 2: its optimizer update made the weights") as info:
        trainer_of(cfg).fit()
    assert info.value.step == 2 and info.value.last_checkpoint is None
    assert "no checkpoint saved yet" in str(info.value)
    assert not list(tmp_path.glob("*.pt"))


def test_finite_run_keeps_exactly_one_check_per_step(tmp_path, monkeypatch):
    """The weights check (and the stop-signal agreement) ride in the step's existing sync: one
    ``all_finite_and_flag`` (one host sync) per step."""
    from beit.engine import distributed as D

    calls = {"n": 0}
    real = D.all_finite_and_flag

    def counting_all_finite(values, flag=0):
        calls["n"] += 1
        return real(values, flag)

    trainer = trainer_of(cfg_of(tmp_path, ckpt_every=100, max_steps=5))
    monkeypatch.setattr(D, "all_finite_and_flag", counting_all_finite)
    trainer.fit()
    monkeypatch.undo()
    assert trainer.step == 5 and calls["n"] == 5


# --- 14: resume with a changed config ----------------------------------------------------------------------

@dataclass
class TaskCfg:  # a task's config: sections around the TrainConfig
    model: dict = field(default_factory=lambda: {"depth": 3, "dim": 8})
    data: dict = field(default_factory=lambda: {"path": "/data/a", "num_workers": 2, "mask": [0.3, 0.5]})
    train: TrainConfig = field(default_factory=TrainConfig)


def test_resume_with_changed_config_is_refused_naming_keys(tmp_path):
    trainer_of(cfg_of(tmp_path, max_steps=3)).fit()
    changed = cfg_of(tmp_path, max_steps=6, resume="auto", batch_size=8, seed=1, lr=2e-2)
    with pytest.raises(R.ConfigChangedError) as info:
        trainer_of(changed).fit()
    msg = str(info.value)
    assert msg.startswith(f"{tmp_path / 'last.pt'}: the config differs from the checkpoint's in 3 key(s)")
    assert "batch_size: 4 -> 8; lr: 0.01 -> 0.02; seed: 0 -> 1." in msg
    assert "max_steps" not in msg and "train.allow_config_change=true" in msg
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 3  # nothing was touched
    assert [s for s, _ in losses(tmp_path)] == [1, 2, 3]
    # the explicit flag allows it
    trainer = trainer_of(cfg_of(tmp_path, max_steps=6, resume="auto", seed=1, allow_config_change=True))
    trainer.fit()
    assert trainer.step == 6 and [s for s, _ in losses(tmp_path)] == list(range(1, 7))


def test_resume_with_harmless_changes_is_exact(tmp_path):
    """Run length, logging, checkpoint cadence and workers may change: the run continues exactly."""
    trainer_of(cfg_of(tmp_path / "full", max_steps=8)).fit()
    trainer_of(cfg_of(tmp_path / "part", max_steps=4, log_every=2, keep_last=1)).fit()
    trainer_of(cfg_of(tmp_path / "part", max_steps=8, resume="auto", ckpt_every=5, image_every=7)).fit()
    assert losses(tmp_path / "part")[-4:] == losses(tmp_path / "full")[-4:]


def test_resume_past_the_last_step_says_there_is_nothing_to_train(tmp_path, capsys):
    trainer_of(cfg_of(tmp_path, max_steps=4)).fit()
    capsys.readouterr()
    trainer = trainer_of(cfg_of(tmp_path, max_steps=2, resume="auto"))
    trainer.fit()
    assert trainer.step == 4 and [s for s, _ in losses(tmp_path)] == [1, 2, 3, 4]  # nothing trained, nothing lost
    out = "".join(capsys.readouterr())
    assert f"the checkpoint {tmp_path / 'last.pt'} is at step 4, at or past this run's last step 2: nothing left" \
        in out.replace("\n", " ")


def test_check_resume_config_nested_sections(tmp_path):
    from beit.engine.config import to_dict

    stored = to_dict(TaskCfg())
    same = TaskCfg()
    same.data = {**same.data, "num_workers": 8, "mask": (0.3, 0.5)}  # harmless key; tuple == list
    same.train = TrainConfig(output_dir="elsewhere", epochs=5, log_every=1, resume="auto")
    assert sorted(R.check_resume_config(stored, to_dict(same), source="ck.pt")) == [
        "data.num_workers", "train.epochs", "train.log_every", "train.output_dir", "train.resume"]
    other = TaskCfg(model={"depth": 4, "dim": 8}, data={**TaskCfg().data, "path": "/data/b"})
    other.train = TrainConfig(batch_size=32)
    with pytest.raises(R.ConfigChangedError, match=r"^ck\.pt: .* in 3 key\(s\) that define the run: data\.path: "
                                                   r"'/data/a' -> '/data/b'; model\.depth: 3 -> 4; "
                                                   r"train\.batch_size: 64 -> 32\. "):
        R.check_resume_config(stored, to_dict(other), source="ck.pt")
    gone = to_dict(TaskCfg())
    del gone["model"]["dim"]
    with pytest.raises(R.ConfigChangedError, match=r"model\.dim: 8 -> '<absent>'"):
        R.check_resume_config(stored, gone, source="ck.pt")
    assert R.check_resume_config(stored, to_dict(other), source="ck.pt", allow=True) == [
        "data.path", "model.depth", "train.batch_size"]
    assert R.check_resume_config(None, stored, source="old.pt") == []  # no stored config: warned, accepted
    older = {**to_dict(TaskCfg()), "model": {"depth": 3}}  # written before model.classes existed (NEWER_KEYS)
    now = {**to_dict(TaskCfg()), "model": {"depth": 3, "classes": ["a", "b"]}}
    assert R.check_resume_config(older, now, source="ck.pt") == ["model.classes"]
    del now["model"]["classes"]
    now["model"]["dim"] = 8  # a key the stored config lacks that is not a newer beit's: a change
    with pytest.raises(R.ConfigChangedError, match=r"model\.dim: '<absent>' -> 8"):
        R.check_resume_config(older, now, source="ck.pt")
    empty, entry = {**older, "extra": {}}, {**older, "extra": {"eps": 0.5}}  # a free-form dict: one line, its entry
    with pytest.raises(R.ConfigChangedError, match=r"in 1 key\(s\) that define the run: extra\.eps: '<absent>' -> "
                                                   r"0\.5\. "):
        R.check_resume_config(empty, entry, source="ck.pt")


def test_another_number_of_classes_is_refused_even_with_allow_config_change():
    """A class list of another length (an edited data.classes_file) cannot be resumed: the heads have the
    checkpoint's size. It was refused as a config change that allow_config_change accepted, and then failed in the
    weights' load; now one line naming both lists and what to do, whatever allow says. Renaming is a change."""
    stored = {"model": {"classes": ["a", "b", "c"]}, "data": {"classes": [], "classes_file": "/d/cls.txt"},
              "train": {"lr": 0.1}}
    now = {"model": {"classes": ["a", "c", "d", "e"]}, "data": {"classes": [], "classes_file": "/d/cls.txt"},
           "train": {"lr": 0.2}}
    for allow in (False, True):
        with pytest.raises(R.ConfigChangedError) as info:
            R.check_resume_config(stored, now, source="ck.pt", allow=allow)
        assert str(info.value).startswith(
            "ck.pt was trained for 3 classes (a, b, c), but data.classes_file '/d/cls.txt' now gives 4 (a, c, d, e; "
            "added: d, e; removed: b): a resumed run keeps the classes ")
        assert str(info.value).endswith("or over this one with --overwrite (the config also differs in train.lr)")
    listed = {"model": {"classes": ["a", "b"]}, "data": {"classes": ["a", "b"], "classes_file": ""},
              "train": {"lr": 0.1}}  # the file replaced by a list: named as the source, not as another change
    with pytest.raises(R.ConfigChangedError, match=r"^ck\.pt was trained for 3 classes \(a, b, c\), but data\.classes "
                                                   r"now gives 2 \(a, b; removed: c\): .*with --overwrite$"):
        R.check_resume_config(stored, listed, source="ck.pt", allow=True)
    renamed = {**stored, "model": {"classes": ["a", "b", "x"]}}
    with pytest.raises(R.ConfigChangedError, match=r"in 1 key\(s\) .*model\.classes: \['a', 'b', 'c'\] -> "):
        R.check_resume_config(stored, renamed, source="ck.pt")
    assert R.check_resume_config(stored, renamed, source="ck.pt", allow=True) == ["model.classes"]


def test_the_resume_check_flattens_each_config_once(monkeypatch):
    """check_resume_config flattens the two configs once and hands the flat form on: the class-count check and its
    refusal no longer flatten them again (same lines as before: the test above)."""
    real, calls = R._flatten, []

    def counting(node, prefix=""):
        if not prefix:  # a whole config, not the recursion into its sections
            calls.append(node)
        return real(node, prefix)

    monkeypatch.setattr(R, "_flatten", counting)
    stored = {"model": {"classes": ["a", "b", "c"]}, "data": {"classes": ["a", "b", "c"]}, "train": {"lr": 0.1}}
    lr = {**stored, "train": {"lr": 0.2}}
    assert R.check_resume_config(stored, lr, source="ck.pt", allow=True) == ["train.lr"]
    assert calls == [stored, lr]
    calls.clear()
    fewer = {**stored, "model": {"classes": ["a", "b"]}, "data": {"classes": ["a", "b"]}}
    with pytest.raises(R.ConfigChangedError, match=r"^ck\.pt was trained for 3 classes \(a, b, c\), but data\.classes "
                                                   r"now gives 2 \(a, b; removed: c\)"):
        R.check_resume_config(stored, fewer, source="ck.pt", allow=True)
    assert calls == [stored, fewer]
    calls.clear()  # the task's own refusal (segmentation's older checkpoints) takes the nested config: one flatten
    assert R.class_count_refusal("ck.pt", stored, 2, counted_by="its head").startswith(
        "ck.pt was trained for 2 classes (its head), but data.classes now gives 3")
    assert calls == [stored]


# --- 15: files a crash left incomplete never block a resume -------------------------------------------------

def test_one_task_check_for_resumes_and_commands():
    """``check_checkpoint_task`` is the one check of "a checkpoint of another task" (the trainer's resume and the
    commands that read a task's checkpoint call it): one line naming both tasks and what to do; an unknown task
    on either side is not checked. The task packages keep no copy of it."""
    import beit.tasks.backbone_config as B

    R.check_checkpoint_task("segmentation", "segmentation", source="ck.pt")
    R.check_checkpoint_task(None, "segmentation", source="ck.pt")  # a checkpoint from before the field
    R.check_checkpoint_task("segmentation", None, source="ck.pt")  # a bare TrainConfig run
    with pytest.raises(R.TaskMismatchError) as err:
        R.check_checkpoint_task("classification", "pre-training", source="ck.pt")
    assert str(err.value) == ("ck.pt is a classification checkpoint, not a pre-training one: --resume (train.resume) "
                              "continues a run of the same task")
    with pytest.raises(R.TaskMismatchError) as err:
        R.check_checkpoint_task("classification", "segmentation", source="ck.pt", fix="beit evaluate takes it")
    assert str(err.value) == "ck.pt is a classification checkpoint, not a segmentation one: beit evaluate takes it"
    assert not hasattr(R, "check_resume_task")
    assert getattr(B, "check_checkpoint_task", R.check_checkpoint_task) is R.check_checkpoint_task


def test_resume_after_crash_left_damaged_files(tmp_path, capsys):
    full, part = tmp_path / "full", tmp_path / "part"
    trainer_of(cfg_of(full, max_steps=9)).fit()
    trainer_of(cfg_of(part, max_steps=9)).fit(stop_after_step=6)
    # the crash: killed while writing step 7's metrics line, the plot, the config, a checkpoint, TensorBoard
    with open(part / "metrics.jsonl", "a") as f:
        f.write('{"split": "train", "step": 7, "epoch": 0, "lo')
    (part / "curves.png").write_bytes(b"")
    (part / "config.yaml").write_text("output_dir: /x\nbatch_si")
    (part / "step_0000009.pt.tmp").write_bytes(b"\x80\x02partial")
    for ev in (part / "tb").iterdir():
        ev.write_bytes(ev.read_bytes()[: ev.stat().st_size // 2])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (part / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "x"}))
    capsys.readouterr()

    trainer_of(cfg_of(part, max_steps=9, resume="auto")).fit()
    assert losses(part) == losses(full)  # the damaged line dropped, the resumed steps appended
    out = capsys.readouterr().out
    assert "metrics.jsonl: skipped 1 incomplete or damaged line(s) (line 7)" in out
    assert f"taking over a stale lock of pid {dead.pid} on host {socket.gethostname()}" in out
    assert not list(part.glob("*.tmp")) and not (part / ".lock").exists()
    assert (part / "curves.png").stat().st_size > 1000
    assert "batch_size: 4" in (part / "config.yaml").read_text()


def test_read_metrics_skips_damaged_lines(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"split": "train", "step": 1, "loss": 2.0}\n[1, 2]\n{"split": "train", "st\n'
                 '{"split": "eval", "step": 1, "acc": 0.5}\n{"split": "train", "step": 2, "loss"')
    assert read_metrics(p, split=None) == [{"split": "train", "step": 1, "loss": 2.0},
                                           {"split": "eval", "step": 1, "acc": 0.5}]


# --- 16: one run per output folder -----------------------------------------------------------------------------

HOLD = """
import importlib.util, sys, time
# the module alone (no torch import), in its package so that its `from .._text import ...` finds beit._text
spec = importlib.util.spec_from_file_location("beit.engine.rundir", {path!r})
rundir = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rundir)
rundir.RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_second_run_refused_then_stale_lock_taken_over(tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", HOLD.format(path=R.__file__), str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(R.RunLockedError) as info:
            trainer_of(cfg_of(tmp_path)).fit()
        assert str(info.value).startswith(
            f"output_dir {tmp_path} is in use by another run (pid {holder.pid} on host {socket.gethostname()}, "
            "started 20")
        assert not (tmp_path / "metrics.jsonl").exists() and not list(tmp_path.glob("*.pt"))
    finally:
        holder.kill()  # kill -9: the lock file stays, its flock goes with the process
        holder.wait()
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == holder.pid
    capsys.readouterr()
    trainer = trainer_of(cfg_of(tmp_path))
    trainer.fit()
    assert trainer.step == 6
    assert f"taking over a stale lock of pid {holder.pid}" in capsys.readouterr().out
    assert not (tmp_path / ".lock").exists()


def test_lock_in_one_process_and_its_file(tmp_path):
    with R.RunLock(tmp_path) as lock:
        info = json.loads((tmp_path / ".lock").read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        assert abs(time.time() - __import__("datetime").datetime.fromisoformat(info["started"]).timestamp()) < 60
        assert lock.held
        with pytest.raises(R.RunLockedError, match=f"pid {os.getpid()} on host"):
            R.RunLock(tmp_path).acquire()  # another run in this process: a separate flock, refused
    assert not (tmp_path / ".lock").exists()
    # a lock of a live process recorded without flock (e.g. a filesystem that ignores it) is not taken over
    (tmp_path / ".lock").write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "started": "t"}))
    with pytest.raises(R.RunLockedError, match=rf"pid {os.getppid()} .*\(if that run is gone, delete"):
        R.RunLock(tmp_path).acquire()


KILLED_WITH_WORKERS = """
import multiprocessing as mp, os, sys, time
from beit.engine import rundir as R
R.RunLock(sys.argv[1]).acquire()
child = mp.get_context("fork").Process(target=time.sleep, args=(30,), daemon=False)  # a DataLoader worker
child.start()
open(sys.argv[2], "w").write(str(child.pid))
os._exit(1)  # killed: no release, the forked child lives on
"""


def test_orphaned_forked_children_do_not_keep_a_killed_run_locked(tmp_path):
    """A killed run's DataLoader workers (forked, still alive for a while) must not hold its folder's flock."""
    pid_file = tmp_path / "child.pid"
    subprocess.run([sys.executable, "-c", KILLED_WITH_WORKERS, str(tmp_path / "run"), str(pid_file)],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)  # the child keeps no pipe open
    child = int(pid_file.read_text())
    try:
        assert R._pid_alive(child)  # the orphan still runs ...
        lock = R.RunLock(tmp_path / "run").acquire()  # ... and the lock is free: taken over as stale, not refused
        assert lock.held
        lock.release()
    finally:
        os.kill(child, 9)


DIST = """
import sys
sys.path.insert(0, {tests!r})
from _engine_fixtures import NoisyDataset, TinyNet, step_fn
from beit.engine import TrainConfig, Trainer, TrainingDivergedError
from beit.engine import distributed as D
from beit.engine.optim import param_groups

# 1. FSDP2, lr 1e38 from step 2: the update of step 2 overflows; the save after it is refused on every rank
cfg = TrainConfig(output_dir=sys.argv[1] + "/diverge", max_steps=4, batch_size=4, num_workers=0, lr=1e38,
                  min_lr=0.0, warmup_steps=2, ckpt_every=1, log_every=1, distributed="fsdp")
try:
    Trainer(TinyNet(), NoisyDataset(40), step_fn, cfg,
            param_groups=lambda m: param_groups(m, 0.05, 1.0, 1e38)).fit()
except TrainingDivergedError as e:
    print(f"rank {{D.rank()}} diverged at step {{e.step}}: {{e.reason}}", flush=True)
# 2. a fresh run into a finished run's folder: rank 0 refuses, every rank raises
cfg = TrainConfig(output_dir=sys.argv[1] + "/run", max_steps=2, batch_size=4, num_workers=0, log_every=1)
try:
    Trainer(TinyNet(), NoisyDataset(40), step_fn, cfg).fit()
except ValueError as e:
    print(f"rank {{D.rank()}} refused: {{type(e).__name__}}: {{e}}", flush=True)
    sys.exit(3)
"""


@pytest.mark.slow
def test_divergence_and_refusal_reach_every_rank(tmp_path):
    """Under torchrun (2 gloo processes): FSDP2's pre-save weights check agrees over ranks; only rank 0 looks
    at the folder and its refusal is raised on every rank (no rank hangs in a collective)."""
    out = tmp_path / "run"
    trainer_of(cfg_of(out, max_steps=2)).fit()  # a finished run
    script = tmp_path / "dist.py"
    script.write_text(DIST.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": SRC}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode != 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for rank in (0, 1):
        assert f"rank {rank} diverged at step 2: its optimizer update made the weights non-finite" in proc.stdout
        assert f"rank {rank} refused: RunExistsError: output_dir {out} holds an earlier run" in proc.stdout
    # step 1's checkpoint (a file, or a sharded folder) and none of step 2
    assert [p.name.split(".")[0] for p in (tmp_path / "diverge").glob("step_*")] == ["step_0000001"]


# --- 17: a fresh run into a finished run's folder --------------------------------------------------------------

def test_fresh_run_into_finished_folder_refused_unless_overwrite(tmp_path):
    trainer_of(cfg_of(tmp_path, max_steps=9)).fit()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and p.name != "log.txt"}
    with pytest.raises(R.RunExistsError) as info:
        trainer_of(cfg_of(tmp_path, max_steps=4)).fit()
    assert str(info.value) == (
        f"output_dir {tmp_path} holds an earlier run (last.pt, metrics.jsonl, step_0000003.pt, step_0000006.pt "
        "and 1 more): a fresh run would delete its metrics and replace its checkpoints. to continue it pass --resume "
        "auto (train.resume=auto), or pass --overwrite (train.overwrite=true) to replace it, or choose another "
        "output_dir")
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and p.name != "log.txt"}
    assert after == before  # untouched
    trainer_of(cfg_of(tmp_path, max_steps=4, overwrite=True)).fit()
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_0000003.pt", "step_0000004.pt"]
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 4
    assert [s for s, _ in losses(tmp_path)] == [1, 2, 3, 4]


def test_a_folder_holding_only_set_aside_checkpoints(tmp_path, caplog):
    """abandoned/ alone (an earlier run's set-aside checkpoints, nothing resumable): a fresh run keeps it with a
    warning, --overwrite deletes it (it was kept silently in both cases)."""
    aside = tmp_path / "abandoned"
    aside.mkdir()
    C.save_checkpoint({"format": C.FORMAT}, aside / "step_0000008.pt")
    with caplog.at_level("WARNING", logger="beit"):
        assert R.prepare_output_dir(tmp_path, resume_path=None) == "fresh"
    assert (aside / "step_0000008.pt").is_file()
    assert any(f"{tmp_path} holds what an earlier run left (abandoned): kept" in r.getMessage()
               for r in caplog.records)
    assert R.prepare_output_dir(tmp_path, resume_path=None, overwrite=True) == "overwrite"
    assert not aside.exists()


def test_the_early_check_changes_nothing_and_says_nothing(tmp_path):
    """check_run_can_start (beit linprobe's check before its feature extraction) went through prepare_output_dir
    in full, without the run's lock: it deleted the folder's *.tmp files (possibly another process's checkpoint
    being written) and warned about abandoned/ once, then the run warned again. Now it decides and refuses the
    same, but removes nothing and logs nothing; the run itself says it once."""
    from beit.engine.trainer import check_run_can_start

    aside = tmp_path / "abandoned"
    aside.mkdir()
    C.save_checkpoint({"format": C.FORMAT}, aside / "step_0000008.pt")
    (tmp_path / "last.pt.tmp").write_bytes(b"being written")
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    logging.getLogger("beit").addHandler(handler)
    try:
        check_run_can_start(cfg_of(tmp_path))
        assert R.prepare_output_dir(tmp_path, resume_path=None, check_only=True) == "fresh"
        assert R.prepare_output_dir(tmp_path, resume_path=None, overwrite=True, check_only=True) == "overwrite"
        assert R.prepare_output_dir(tmp_path, resume_path=None) == "fresh"  # the run: says it (and cleans up)
    finally:
        logging.getLogger("beit").removeHandler(handler)
    assert [r.getMessage() for r in records] == [f"{tmp_path} holds what an earlier run left (abandoned): kept beside "
                                                 "this new run (--overwrite deletes them)"]
    assert not (tmp_path / "last.pt.tmp").exists()
    (tmp_path / "last.pt.tmp").write_bytes(b"being written")
    check_run_can_start(cfg_of(tmp_path))
    assert (tmp_path / "last.pt.tmp").is_file() and (aside / "step_0000008.pt").is_file()
    (tmp_path / "metrics.jsonl").write_text('{"split": "train", "step": 1, "loss": 1.0}\n')
    with pytest.raises(R.RunExistsError, match="holds an earlier run"):
        check_run_can_start(cfg_of(tmp_path))
    assert R.prepare_output_dir(tmp_path, resume_path=None, overwrite=True, check_only=True) == "overwrite"
    assert (tmp_path / "metrics.jsonl").is_file()


_TASK_TRAIN_MODULES = {  # every task's module that declares what it writes into output_dir (OUTPUTS)
    "pre-training": "beit.tasks.pretrain.train", "classification": "beit.tasks.classify.train",
    "linear probing": "beit.tasks.classify.linprobe", "segmentation": "beit.tasks.segmentation.train",
    "layout detection": "beit.tasks.layout.train", "dVAE tokenizer": "beit.tasks.tokenizer.train",
}


@pytest.mark.parametrize("task", sorted(_TASK_TRAIN_MODULES))
def test_overwrite_deletes_every_task_output(task, tmp_path):
    """--overwrite deleted only the engine's files: an earlier run's final/model.safetensors (pre-training),
    model/ and eval/ (fine-tuning), linprobe.json, ap_table.txt, dvae.safetensors ... stayed beside the new run
    (a stale model to ship). Each task declares its outputs once (OUTPUTS) and gives them to its Trainer."""
    import importlib
    import inspect

    module = importlib.import_module(_TASK_TRAIN_MODULES[task])
    outputs = module.OUTPUTS
    assert "outputs=OUTPUTS" in inspect.getsource(module)  # given to the Trainer that runs the task
    C.save_checkpoint({"format": C.FORMAT}, tmp_path / "last.pt")
    for name in outputs:
        if "." in name:
            (tmp_path / name).write_text("stale")
        else:
            (tmp_path / name).mkdir()
            (tmp_path / name / "model.safetensors").write_text("stale")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "log.txt").write_text("earlier run\n")
    assert R.prepare_output_dir(tmp_path, resume_path=None, overwrite=True, outputs=outputs) == "overwrite"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.txt", "notes.txt"]
    # only the outputs left (checkpoints deleted by hand): --overwrite still deletes them, a fresh run warns
    for name in outputs:
        (tmp_path / name).write_text("stale")
    assert R.prepare_output_dir(tmp_path, resume_path=None, outputs=outputs) == "fresh"
    assert all((tmp_path / n).exists() for n in outputs)
    assert R.prepare_output_dir(tmp_path, resume_path=None, overwrite=True, outputs=outputs) == (
        "overwrite" if outputs else "fresh")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.txt", "notes.txt"]


def test_trainer_overwrite_deletes_its_task_outputs_and_marks_the_log(tmp_path):
    """The Trainer passes its outputs to the overwrite; log.txt keeps the earlier run's lines (appended to, as
    documented) but the new run's part starts after a separator line."""
    from beit.engine.logging import RUN_SEPARATOR

    trainer_of(cfg_of(tmp_path, max_steps=3), outputs=("final", "panel.png")).fit()
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "model.safetensors").write_text("the earlier run's model")
    (tmp_path / "panel.png").write_text("stale")
    logging.getLogger("beit").handlers[:] = [h for h in logging.getLogger("beit").handlers
                                             if not isinstance(h, logging.FileHandler)]  # as a new process
    trainer_of(cfg_of(tmp_path, max_steps=3, overwrite=True), outputs=("final", "panel.png")).fit()
    assert not (tmp_path / "final").exists() and not (tmp_path / "panel.png").exists()
    log = (tmp_path / "log.txt").read_text()
    head = RUN_SEPARATOR.split("(")[0]
    assert log.count(head) == 1
    assert "overwrite: deleted the earlier run" in log.split(head)[1]
    with pytest.raises(ValueError, match="names of files or folders directly in output_dir"):
        R.prepare_output_dir(tmp_path, resume_path=None, overwrite=True, outputs=("../elsewhere",))


def test_resume_auto_decisions(tmp_path):
    # crashed before its first checkpoint: nothing to resume, auto starts over
    (tmp_path / "metrics.jsonl").write_text('{"split": "train", "step": 1, "loss": 1.0}\n')
    assert R.prepare_output_dir(tmp_path, resume_path=None, resume="auto") == "fresh"
    with pytest.raises(R.RunExistsError, match=r"\(metrics\.jsonl\)"):
        R.prepare_output_dir(tmp_path, resume_path=None, resume="")
    # checkpoint names auto found nothing to resume in (the trainer resumes a step checkpoint without last.pt,
    # see test_engine_trainer; an unfinished sharded folder is none): never deleted
    C.save_checkpoint({"format": C.FORMAT}, tmp_path / "step_0000004.pt")
    with pytest.raises(R.RunExistsError, match=r"none of them is a checkpoint --resume auto can continue .*: resume a "
                                               r"checkpoint explicitly"):
        R.prepare_output_dir(tmp_path, resume_path=None, resume="auto")
    assert R.prepare_output_dir(tmp_path, resume_path=tmp_path / "step_0000004.pt",
                                resume=str(tmp_path / "step_0000004.pt")) == "resume"
    # resuming another folder's checkpoint into this one would mix two runs
    with pytest.raises(R.RunExistsError, match=r"resuming from /elsewhere/last\.pt \(another folder\)"):
        R.prepare_output_dir(tmp_path, resume_path=Path("/elsewhere/last.pt"), resume="/elsewhere/last.pt")
    # overwrite deletes only what the engine wrote
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "tb").mkdir()
    (tmp_path / "step_0000008").mkdir()  # a sharded checkpoint folder
    assert R.prepare_output_dir(tmp_path, resume_path=None, overwrite=True) == "overwrite"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_same_trainer_may_fit_again(tmp_path):
    trainer = trainer_of(cfg_of(tmp_path))
    trainer.fit(stop_after_step=3)
    trainer.fit()  # continues its own run in its own folder, its metrics too
    assert trainer.step == 6 and [s for s, _ in losses(tmp_path)] == list(range(1, 7))


# --- 18: disk full during a checkpoint ---------------------------------------------------------------------------

def test_disk_full_during_checkpoint(tmp_path, monkeypatch, capsys):
    trainer_of(cfg_of(tmp_path, max_steps=3)).fit()
    png = (tmp_path / "curves.png").read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *a, **kw):
        f.write(b"\x80\x02partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def full_disk_savefig(self, fname, *a, **kw):
        Path(fname).write_bytes(b"")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    from matplotlib.figure import Figure

    monkeypatch.setattr(C.torch, "save", full_disk)
    monkeypatch.setattr(Figure, "savefig", full_disk_savefig)
    with pytest.raises(OSError) as info:
        trainer_of(cfg_of(tmp_path, max_steps=9, resume="auto")).fit()
    monkeypatch.setattr(C.torch, "save", real_save)
    assert info.value.errno == errno.ENOSPC
    assert str(info.value) == (f"could not write checkpoint {tmp_path / 'step_0000006.pt'}: "
                               "[Errno 28] No space left on device")
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 3
    assert (tmp_path / "curves.png").read_bytes() == png  # the old plot, not a 0-byte one
    assert "could not write curves.png" in capsys.readouterr().out
    assert not (tmp_path / ".lock").exists()


def test_link_and_plot_failures_leave_no_partial_files(tmp_path, monkeypatch):
    C.save_checkpoint({"format": C.FORMAT, "step": 1}, tmp_path / "step_0000001.pt")
    C.save_checkpoint({"format": C.FORMAT, "step": 0}, tmp_path / "last.pt")

    def no_space(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(C.os, "link", no_space)
    import shutil

    monkeypatch.setattr(shutil, "copyfile", no_space)
    with pytest.raises(OSError, match=r"could not write checkpoint .*last\.pt: \[Errno 28\]"):
        C._link_atomic(tmp_path / "step_0000001.pt", tmp_path / "last.pt")
    assert C.load_checkpoint(tmp_path / "last.pt")["step"] == 0 and not list(tmp_path.glob("*.tmp"))
    monkeypatch.undo()
    (tmp_path / "metrics.jsonl").write_text('{"split": "train", "step": 1, "loss": 1.0}\n')
    from matplotlib.figure import Figure

    def half_written(self, fname, *a, **kw):
        Path(fname).write_bytes(b"\x89PNG")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", half_written)
    with pytest.raises(OSError, match="No space left"):
        plot_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    assert not (tmp_path / "curves.png").exists() and not list(tmp_path.glob("*.tmp"))


def test_rank0_errors_are_rebuilt_by_name():
    from beit.engine.trainer import _error_named

    e = _error_named("RunExistsError", "output_dir x holds an earlier run")
    assert type(e) is R.RunExistsError and str(e) == "output_dir x holds an earlier run"
    assert type(_error_named("PermissionError", "p")) is PermissionError
    e = _error_named("SomeLibraryError", "boom")
    assert type(e) is RuntimeError and str(e) == "SomeLibraryError: boom"


def test_resume_on_another_number_of_ranks_may_regroup_the_same_global_batch(tmp_path):
    from beit.engine.rundir import ConfigChangedError, check_resume_config

    stored = {"train": {"batch_size": 4, "accum_steps": 1, "lr": 1e-3}}
    same_global = {"train": {"batch_size": 8, "accum_steps": 1, "lr": 1e-3}}
    assert check_resume_config(stored, same_global, source="ck", stored_world_size=2, world_size=1) == []
    accum = {"train": {"batch_size": 2, "accum_steps": 4, "lr": 1e-3}}  # 4 x 1 x 2 ranks = 2 x 4 x 1 rank
    assert check_resume_config(stored, accum, source="ck", stored_world_size=2, world_size=1) == []
    with pytest.raises(ConfigChangedError, match=r"train.batch_size: 4 -> 8"):  # same ranks: a real change
        check_resume_config(stored, same_global, source="ck", stored_world_size=2, world_size=2)
    with pytest.raises(ConfigChangedError, match=r"train.batch_size: 4 -> 5"):
        check_resume_config(stored, {"train": {"batch_size": 5, "accum_steps": 1, "lr": 1e-3}}, source="ck",
                            stored_world_size=2, world_size=1)  # global 8 -> 5


def test_a_checkpoint_from_before_compile_scope_resumes_with_any_scope():
    """``train.compile_scope`` is how the run computes, not what it computes: a checkpoint written before the
    key existed (absent) or with the other scope resumes."""
    from beit.engine.rundir import check_resume_config

    stored = {"train": {"lr": 1e-3, "compile": True}}
    for scope in ("blocks", "model"):
        now = {"train": {"lr": 1e-3, "compile": True, "compile_scope": scope}}
        assert check_resume_config(stored, now, source="ck") == ["train.compile_scope"]


def test_curves_leave_out_skip_counters_that_stayed_zero_and_nothing_else():
    from beit.engine.logging import _panel_names

    series = {("loss", "train"): ([1, 2], [2.0, 1.0]), ("skipped_files", "train"): ([1, 2], [0, 0]),
              ("skipped_files", "val"): ([2], [0]), ("skipped_files_total", "train"): ([2], [0]),
              ("top1", "val"): ([2], [0.0]), ("lr", "train"): ([1, 2], [0.0, 0.0])}
    assert _panel_names(series) == ["loss", "lr", "top1"]  # a top-1 / lr stuck at 0 is drawn
    series[("skipped_files", "val")] = ([2], [3])
    assert _panel_names(series) == ["loss", "lr", "skipped_files", "top1"]


def test_resume_info_lines_cut_long_values(caplog):
    import logging

    names = [f"class_{i}" for i in range(150)]
    stored = {"model": {"depth": 3}, "train": {"epochs": 1}}
    with caplog.at_level(logging.INFO):
        R.check_resume_config(stored, {"model": {"depth": 3, "classes": names}, "train": {"epochs": 2}},
                              source="ck.pt")
    line = next(r.getMessage() for r in caplog.records if "model.classes=" in r.getMessage())
    assert len(line) < 200 and line.endswith("...]") and "'class_0'" in line


def test_overwrite_never_deletes_the_runs_own_inputs(tmp_path):
    # a training set kept in the output folder's images/ (an engine folder an overwrite clears)
    out = tmp_path / "proj"
    (out / "images" / "train" / "cat").mkdir(parents=True)
    (out / "images" / "train" / "cat" / "a.jpg").write_bytes(b"x")
    (out / "images" / R.IMAGES_MARK).write_text("")  # the engine made images/ (unmarked, it is never deleted)
    (out / "last.pt").write_bytes(b"x")
    inputs = R.config_inputs({"data": {"train_dir": str(out / "images" / "train")},
                              "train": {"output_dir": str(out)}, "model": "", "precision": "fp32"})
    assert inputs == {"data.train_dir": str(out / "images" / "train")}  # output_dir and non-paths left out
    for check_only in (True, False):
        with pytest.raises(R.RunDirError, match=r"would delete .*images, which overlaps this run's input "
                                                r"data\.train_dir=.*nothing was deleted"):
            R.prepare_output_dir(out, resume_path=None, overwrite=True, check_only=check_only, inputs=inputs)
    assert (out / "images" / "train" / "cat" / "a.jpg").exists() and (out / "last.pt").exists()
    # the weights a run fine-tunes from, in the output folder's model/ (a task output), no checkpoint left
    run = tmp_path / "r1"
    (run / "model").mkdir(parents=True)
    (run / "model" / "model.safetensors").write_bytes(b"w")
    with pytest.raises(R.RunDirError, match=r"model=.*r1/model"):
        R.prepare_output_dir(run, resume_path=None, overwrite=True, outputs=("model",),
                             inputs=R.config_inputs({"model": str(run / "model")}))
    assert (run / "model" / "model.safetensors").exists()
    # the output folder is the data folder (class folders named like outputs)
    data = tmp_path / "dd"
    for c in ("model", "tb"):
        (data / c).mkdir(parents=True)
        (data / c / "x.jpg").write_bytes(b"x")
    (data / "last.pt").write_bytes(b"x")
    with pytest.raises(R.RunDirError, match="data.train_dir"):
        R.prepare_output_dir(data, resume_path=None, overwrite=True, outputs=("model",),
                             inputs=R.config_inputs({"data": {"train_dir": str(data)}}))
    assert (data / "model" / "x.jpg").exists() and (data / "tb" / "x.jpg").exists()


def _pictures(model, step, out_dir):
    (out_dir / f"picture_{step}.png").write_bytes(b"png")


def test_overwrite_deletes_an_images_folder_only_when_the_engine_made_it(tmp_path, beit_warnings):
    """``--overwrite`` deleted any ``images/`` of the output folder, also one no run made (a data set's page images
    unpacked there): now only the one the engine made for ``train.image_every``'s pictures, which it marks."""
    out = tmp_path / "run"
    trainer_of(cfg_of(out, max_steps=3, image_every=2), visualize_fn=_pictures).fit()
    assert (out / "images" / R.IMAGES_MARK).is_file() and (out / "images" / "picture_2.png").is_file()
    trainer_of(cfg_of(out, max_steps=3, overwrite=True)).fit()  # no pictures this time
    assert not (out / "images").exists()
    # a folder of the user's: kept by an overwrite (said in a warning), pictures written beside its files, unmarked
    shutil.rmtree(out)
    (out / "images").mkdir(parents=True)
    (out / "images" / "page.png").write_bytes(b"data")
    trainer_of(cfg_of(out, max_steps=3, image_every=2), visualize_fn=_pictures).fit()
    assert (out / "images" / "picture_2.png").is_file() and not (out / "images" / R.IMAGES_MARK).exists()
    beit_warnings.clear()
    trainer_of(cfg_of(out, max_steps=3, overwrite=True)).fit()
    assert (out / "images" / "page.png").read_bytes() == b"data"
    assert any(f"kept {out / 'images'}: it has no {R.IMAGES_MARK} file" in r.getMessage() for r in beit_warnings)
    assert R.previous_run_paths(out) == [out / p for p in ("config.yaml", "curves.png", "last.pt", "metrics.jsonl",
                                                          "step_0000003.pt", "tb")]


def test_inputs_a_task_derives_from_its_config_are_never_overwritten(tmp_path):
    """The paths a run reads that its config does not name (layout's page images in ``images/`` next to
    ``data.train_ann`` when ``data.train_images`` is unset) are given as ``Trainer(inputs=...)`` /
    ``check_run_can_start(inputs=...)``: an overwrite that would delete one is refused as for a config's paths."""
    from beit.engine.trainer import check_run_can_start

    out = tmp_path / "run"
    trainer_of(cfg_of(out, max_steps=3, image_every=2), visualize_fn=_pictures).fit()  # images/ is the engine's
    (out / "images" / "pages").mkdir()
    (out / "images" / "pages" / "page.png").write_bytes(b"data")
    inputs = {"data.train_images": str(out / "images" / "pages")}
    with pytest.raises(R.RunDirError, match=r"would delete .*images, which overlaps this run's input "
                                            r"data\.train_images=.*pages: nothing was deleted"):
        check_run_can_start(cfg_of(out, max_steps=3, overwrite=True), inputs=inputs)
    with pytest.raises(R.RunDirError, match=r"data\.train_images=.*pages: nothing was deleted"):
        trainer_of(cfg_of(out, max_steps=3, overwrite=True), inputs=inputs).fit()
    assert (out / "images" / "pages" / "page.png").is_file() and (out / "last.pt").is_file()


def test_overwrite_without_a_checkpoint_deletes_only_the_task_outputs(tmp_path):
    out = tmp_path / "o"
    (out / "final").mkdir(parents=True)
    (out / "images").mkdir()
    (out / "images" / "mine.png").write_bytes(b"x")
    (out / "config.yaml").write_text("a: 1\n")
    assert R.prepare_output_dir(out, resume_path=None, overwrite=True, outputs=("final",)) == "overwrite"
    assert not (out / "final").exists()
    assert (out / "images" / "mine.png").exists() and (out / "config.yaml").exists()


def test_overwrite_refuses_a_folder_another_task_wrote(tmp_path):
    """``beit finetune --overwrite`` pointed at a folder ``beit pretrain`` wrote deleted the pre-training run
    without a word. The task its checkpoints record is checked first: the early check and the run both refuse,
    naming the folder and the task that wrote it, and nothing is deleted; the same task may still overwrite."""
    from beit.engine.trainer import check_run_can_start

    trainer_of(cfg_of(tmp_path, max_steps=3), task="pre-training", outputs=("final",)).fit()
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "model.safetensors").write_text("the pre-trained model")
    before = sorted(p.name for p in tmp_path.iterdir())
    expected = (f"output_dir {tmp_path} holds a pre-training run ({tmp_path / 'last.pt'} is a pre-training "
                "checkpoint): --overwrite by this classification run would delete another task's run, so nothing "
                "was deleted")
    with pytest.raises(R.TaskMismatchError) as early:
        check_run_can_start(cfg_of(tmp_path, max_steps=3, overwrite=True), task="classification")
    assert str(early.value).startswith(expected)
    with pytest.raises(R.TaskMismatchError) as info:
        trainer_of(cfg_of(tmp_path, max_steps=3, overwrite=True), task="classification", outputs=("model",)).fit()
    assert str(info.value).startswith(expected) and "choose another output_dir" in str(info.value).lower()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing deleted
    assert load_checkpoint(tmp_path / "last.pt")["task"] == "pre-training"
    assert (tmp_path / "final" / "model.safetensors").read_text() == "the pre-trained model"
    assert C.recorded_task(tmp_path) == ("pre-training", tmp_path / "last.pt")
    # a damaged last.pt: the task is read from the next checkpoint that can be read
    (tmp_path / "last.pt").unlink()
    (tmp_path / "last.pt").write_bytes(b"cut")
    assert C.recorded_task(tmp_path) == ("pre-training", tmp_path / "step_0000003.pt")
    # the same task overwrites as before
    trainer_of(cfg_of(tmp_path, max_steps=2, overwrite=True), task="pre-training", outputs=("final",)).fit()
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 2 and not (tmp_path / "final").exists()


def test_curves_keep_long_tick_labels_inside_the_figure_and_their_panel(tmp_path, monkeypatch):
    """Fixed margins must still fit a wide y tick label (an lr tail like 0.000150, a negative -0.00010): none cut
    at the figure's left edge (where ``0.000150`` would read ``.000150``, ``-0.00010`` lose its sign) or running
    into the panel on its left."""
    from matplotlib.figure import Figure

    rows = [{"split": "train", "step": s, "loss": -1e-4 - 2e-5 * math.sin(s), "acc": 0.1, "grad_norm": -0.374975 * s,
             "lr": 1.2e-4 + 3e-5 * math.cos(s / 40), "top1": -123456.0 + s, "zz": 1.25e-4 + 1e-6 * s}
            for s in range(0, 60, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    figs = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **kw: (figs.append(self), save(self, *a, **kw))[1])
    plot_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    fig = figs[0]
    renderer = fig.canvas.get_renderer()
    axes = sorted(fig.axes, key=lambda ax: (round(ax.get_position().y0, 3), ax.get_position().x0))
    for ax in axes:
        labels = ax.yaxis.get_tightbbox(renderer)
        assert labels.x0 >= 0, (ax.get_title(), [t.get_text() for t in ax.get_yticklabels()])
        left = [b for b in axes if abs(b.get_position().y0 - ax.get_position().y0) < 1e-3
                and b.get_position().x1 < ax.get_position().x0]
        for b in left:
            assert labels.x0 > b.get_window_extent(renderer).x1, (ax.get_title(), b.get_title())


def test_curves_step_labels_stay_apart_on_long_runs(tmp_path, monkeypatch):
    """A long run's step axis (400,000 and 2.5M steps) gets a few short labels (80k, 1.2M), none overlapping the
    next; a short run's stay plain numbers."""
    from matplotlib.figure import Figure

    from beit.engine.logging import _step_tick

    assert [_step_tick(x) for x in (0, 150, 9000, 80000, 1.2e6, -20000)] == ["0", "150", "9000", "80k", "1.2M", "-20k"]
    figs = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **kw: (figs.append(self), save(self, *a, **kw))[1])
    for last in (400_000, 2_500_000, 60):
        rows = [{"split": "train", "step": s, "loss": 1.0 / (1 + s), "lr": 1e-3, "acc": 0.5}
                for s in range(0, last + 1, max(1, last // 50))]
        path = tmp_path / f"m{last}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        plot_curves(path, tmp_path / f"c{last}.png")
        renderer = figs[-1].canvas.get_renderer()
        for ax in figs[-1].axes:
            lo, hi = ax.get_xlim()
            texts = [t for t in ax.get_xticklabels() if t.get_text() and lo <= t.get_position()[0] <= hi]  # drawn
            boxes = sorted((t.get_window_extent(renderer) for t in texts), key=lambda b: b.x0)
            assert len(boxes) >= 3, [t.get_text() for t in texts]
            for a, b in zip(boxes, boxes[1:]):
                assert a.x1 < b.x0, (last, [t.get_text() for t in texts])
            if last == 60:
                assert all(t.get_text().isdigit() for t in texts), [t.get_text() for t in texts]
