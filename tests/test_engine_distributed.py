"""Sampler sharding/offsets in-process, and 2-process gloo DDP / FSDP2 runs through torchrun."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from beit.engine.distributed import ResumableDistributedSampler, all_reduce_mean
from beit.engine.logging import read_metrics

SCRIPT = Path(__file__).parent / "_engine_dist_script.py"


def test_sampler_shards_pad_and_offset():
    n, ws, bs = 41, 2, 4
    samplers = [ResumableDistributedSampler(n, bs, num_replicas=ws, rank=r, seed=5) for r in range(ws)]
    for s in samplers:
        s.set_epoch(3)
    shards = [list(s) for s in samplers]
    assert [len(x) for x in shards] == [21, 21]  # padded to 42 like DistributedSampler
    assert set(shards[0] + shards[1]) == set(range(n))
    assert len(set(shards[0]) & set(shards[1])) <= 1  # only the padding sample may repeat
    # deterministic in (seed, epoch), different across epochs
    again = ResumableDistributedSampler(n, bs, num_replicas=ws, rank=0, seed=5)
    again.set_epoch(3)
    assert list(again) == shards[0]
    again.set_epoch(4)
    assert list(again) != shards[0]
    # a resumed epoch skips exactly the batches already done
    again.set_epoch(3, start_batch=2)
    assert list(again) == shards[0][2 * bs:] and len(again) == 21 - 2 * bs


def test_sampler_disjoint_when_divisible():
    shards = []
    for r in range(4):
        s = ResumableDistributedSampler(40, 2, num_replicas=4, rank=r, seed=0)
        s.set_epoch(1)
        shards.append(set(s))
    assert set().union(*shards) == set(range(40)) and sum(map(len, shards)) == 40


def test_all_reduce_mean_single_process():
    assert all_reduce_mean({"b": torch.tensor(2.0), "a": 1}) == {"a": 1.0, "b": 2.0}


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_process_gloo(tmp_path, mode):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(SCRIPT), str(tmp_path), mode]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world_size"] == 2 and r0["steps"] == 2 * (40 // 2 // 4 // 2)
    # both ranks end with identical parameters (gradients were averaged)
    for name, p in r0["full"].items():
        assert torch.equal(p, r1["full"][name]), name
    # the two ranks saw disjoint shards covering the dataset, and different ones each epoch
    for epoch in (0, 1):
        a, b = set(r0["shards"][epoch]), set(r1["shards"][epoch])
        assert not a & b and a | b == set(range(40))
    assert r0["shards"][0] != r0["shards"][1]
    # stop + resume under 2 ranks repeats the uninterrupted run exactly
    for name, p in r0["full"].items():
        assert torch.equal(p, r0["resumed"][name]), name
    full = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "full" / "metrics.jsonl")]
    part = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "part" / "metrics.jsonl")]
    assert full == part and len(full) == r0["steps"]
    if mode == "fsdp":  # a sharded DCP folder (no full gather at each save), read in full here
        from beit.engine import load_checkpoint

        assert not (tmp_path / "full" / "last.pt").exists()
        ckpt = load_checkpoint(tmp_path / "full" / "last")
    else:
        ckpt = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    assert len(ckpt["rng"]) == 2 and ckpt["world_size"] == 2
    assert set(ckpt["model"]) == set(r0["full"])  # full, unprefixed state dict


def test_nan_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(SCRIPT), str(tmp_path), "nan"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [(tmp_path / f"nan_rank{r}.txt").read_text() for r in (0, 1)] == ["diverged at step 2"] * 2


def test_an_early_refusal_reaches_every_rank_as_the_same_error(tmp_path):
    """check_run_can_start (segmentation and linprobe call it before their long work) decides on rank 0 and
    broadcasts: rank 1 raises the same error, instead of going on into a collective rank 0 never joins."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(SCRIPT), str(tmp_path), "refuse"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = ((tmp_path / f"refuse_rank{r}.txt").read_text().splitlines() for r in (0, 1))
    assert r0 == r1, (r0, r1)
    assert r0[0].startswith("exists: RunExistsError: ")
    assert r0[1] == "state: ConfigChangedError: last.pt: refused by the task at step 2"


def test_rank_and_world_come_from_one_place(monkeypatch: pytest.MonkeyPatch) -> None:
    """No process group: torchrun's environment, else one process; tasks read them through engine.distributed."""
    import dataclasses

    from beit.engine import TrainConfig
    from beit.engine import distributed as D
    from beit.tasks.classify import scaled_train_config
    from beit.tasks.classify.evaluate import _rank_world

    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert (D.rank(), D.world_size(), D.is_main(), _rank_world()) == (0, 1, True, (0, 1))
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert (D.rank(), D.world_size(), D.is_main(), _rank_world()) == (3, 4, False, (3, 4))
    train = dataclasses.replace(TrainConfig(output_dir="x"), lr=1e-3, min_lr=1e-6, batch_size=8, accum_steps=2)
    scaled = scaled_train_config(train, ref_batch=256)  # 8 x 2 x 4 ranks = 64 -> x 1/4
    assert scaled.lr == pytest.approx(2.5e-4) and scaled.min_lr == pytest.approx(2.5e-7)


def _signal_on_one_rank(out: Path) -> None:
    """Under torchrun (2 gloo ranks): the full run, then a run where only rank 1 gets SIGTERM, in the first
    micro-batch of step 1 of 4, then its resume; each rank writes what it saw to ``out/signal_rank<r>.pt``."""
    sys.path.insert(0, str(Path(__file__).parent))
    from _engine_fixtures import NoisyDataset, TinyNet, step_fn
    from beit.engine import TrainConfig, Trainer
    from beit.engine import distributed as D
    from beit.engine.trainer import TrainingInterrupted

    def make(sub: str, step=step_fn, **kw) -> Trainer:
        torch.manual_seed(0)
        cfg = TrainConfig(output_dir=str(out / sub), epochs=2, batch_size=4, num_workers=0, lr=1e-2, min_lr=1e-4,
                          warmup_steps=1, clip_grad=1.0, log_every=1, ckpt_every=100, accum_steps=2, **kw)
        return Trainer(TinyNet(), NoisyDataset(40), step, cfg)

    def params(trainer: Trainer) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in D.unwrap_model(trainer.model).state_dict().items()}

    full = make("full")
    full.fit()
    calls = []

    def sigterm_on_rank1(model, batch):
        calls.append(1)
        if D.rank() == 1 and len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return step_fn(model, batch)

    try:
        make("part", sigterm_on_rank1).fit()
        result = "finished"
    except TrainingInterrupted as e:
        result = f"{e.signal_name} step {e.step} exit {e.exit_code} {e.checkpoint}"
    D.barrier()
    lock_left = (out / "part" / ".lock").exists()
    resumed = make("part", resume="auto")
    resumed.fit()
    torch.save({"result": result, "lock_left": lock_left, "full": params(full), "resumed": params(resumed)},
               out / f"signal_rank{D.rank()}.pt")
    D.cleanup()


def test_sigterm_on_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    """Only rank 1 is signalled: the ranks agree in the step's sync, both finish step 1 and write its checkpoint
    together (none waits in a collective), the lock is released, and the resume under 2 ranks repeats the
    uninterrupted run exactly."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, "signal", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"signal_rank{r}.pt", weights_only=True) for r in (0, 1))
    expected = f"SIGTERM step 1 exit 143 {tmp_path / 'part' / 'step_0000001.pt'}"
    assert r0["result"] == r1["result"] == expected
    assert not r0["lock_left"]
    for name, p in r0["full"].items():
        assert torch.equal(p, r0["resumed"][name]) and torch.equal(p, r1["resumed"][name]), name
    full = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "full" / "metrics.jsonl")]
    part = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "part" / "metrics.jsonl")]
    assert full == part and len(full) == 4


if __name__ == "__main__" and sys.argv[1:2] == ["signal"]:  # the torchrun script of the test above
    _signal_on_one_rank(Path(sys.argv[2]))


def test_ranks_after_the_first_leave_out_the_warnings_every_rank_prints_alike(tmp_path: Path, capsys) -> None:
    """A warning marked ALIKE_ON_EVERY_RANK (the config, a checkpoint, a folder all ranks read) reaches the console
    of the first rank only; one about what a rank meets alone reaches every rank's. A real call site keeps its
    mark (a damaged config.json next to a checkpoint, which every rank reads)."""
    import logging

    from beit._text import ALIKE_ON_EVERY_RANK
    from beit.engine.logging import setup_logging
    from beit.interop.load import _read_config_json

    damaged = tmp_path / "config.json"
    damaged.write_text("{not json")
    log = logging.getLogger("beit.test_alike")
    try:
        for main in (False, True):
            setup_logging(None, main=main)
            log.warning("data.crop_padding=4 is ignored", extra=ALIKE_ON_EVERY_RANK)
            log.warning("skipping unreadable image 7.png")
            assert _read_config_json(damaged) == {}
            out = capsys.readouterr().out
            assert "skipping unreadable image 7.png" in out
            assert ("data.crop_padding=4 is ignored" in out) == main
            assert (f"{damaged}: unreadable" in out) == main
    finally:
        setup_logging(None, main=True)


def test_ranks_after_the_first_leave_out_the_alike_warnings_during_training_too(monkeypatch, capsys) -> None:
    """Inside the training loop the console goes through tqdm's stand-in handler (``console_through_tqdm``); tqdm
    before 4.70 (pyproject allows 4.60) copied the console's formatter but not its filters, so a marked warning of
    the first batches (gpu_augment's compile failure, data.jpeg_decode=device without CUDA) reached every rank."""
    import contextlib
    import logging

    from tqdm.contrib import logging as tqdm_logging

    from beit._text import ALIKE_ON_EVERY_RANK
    from beit.engine import logging as beit_logging

    @contextlib.contextmanager
    def redirect_of_tqdm_4_67(loggers):  # tqdm 4.67.1's logging_redirect_tqdm: the formatter, not the filters
        saved = [lg.handlers for lg in loggers]
        for lg in loggers:
            stand_in = tqdm_logging._TqdmLoggingHandler()
            console = tqdm_logging._get_first_found_console_logging_handler(lg.handlers)
            if console is not None:
                stand_in.setFormatter(console.formatter)
            lg.handlers = [h for h in lg.handlers if not tqdm_logging._is_console_logging_handler(h)] + [stand_in]
        try:
            yield
        finally:
            for lg, handlers in zip(loggers, saved):
                lg.handlers = handlers

    log = logging.getLogger("beit.test_alike")
    own = logging.Handler(logging.INFO)  # a handler of the user's own on the logger: neither filtered nor re-levelled
    own.emit = lambda record: None
    logging.getLogger("beit").addHandler(own)
    try:
        for redirect in (redirect_of_tqdm_4_67, tqdm_logging.logging_redirect_tqdm):
            monkeypatch.setattr(beit_logging, "logging_redirect_tqdm", redirect)
            for main in (False, True):
                with beit_logging.console_through_tqdm(beit_logging.setup_logging(None, main=main)):
                    log.warning("data.crop_padding=4 is ignored", extra=ALIKE_ON_EVERY_RANK)
                    log.warning("skipping unreadable image 7.png")
                out = capsys.readouterr()
                out = out.out + out.err
                assert "skipping unreadable image 7.png" in out
                assert ("data.crop_padding=4 is ignored" in out) == main, (redirect, main)
                assert own.filters == [] and own.level == logging.INFO
    finally:
        beit_logging.setup_logging(None, main=True)


def test_a_resume_with_a_changed_config_is_said_by_the_first_rank_alone(capsys) -> None:
    """``resume with a changed config (allow_config_change)``: every rank resumes the same checkpoint with the same
    config (Trainer.load), so under torchrun it was printed once per rank; now by the first rank alone."""
    from beit.engine.logging import setup_logging
    from beit.engine.rundir import check_resume_config

    try:
        for main in (False, True):
            setup_logging(None, main=main)
            check_resume_config({"train": {"lr": 0.01}}, {"train": {"lr": 0.02}}, source="last.pt", allow=True)
            assert ("resume with a changed config" in capsys.readouterr().out) == main
    finally:
        setup_logging(None, main=True)
