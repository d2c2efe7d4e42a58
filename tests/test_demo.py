"""`beit demo` (README command 1) runs end to end offline and writes what it promises."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from beit.cli import main
from beit.tasks.demo import run_demo


def test_demo_quick_end_to_end(tmp_path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "demo_summary.json").read_text())
    assert set(summary["top1"]) == {"pretrained", "scratch"} and summary["seeds"] == [0]  # --quick: one seed
    for arm in summary["top1"].values():
        assert len(arm["runs"]) == 1 and 0.0 <= arm["mean"] <= 100.0 and arm["std"] == 0.0
    assert "(mean +- std): pre-trained" in printed and "seed 0: pre-trained" in printed
    for name, path in summary["pngs"].items():
        assert path and Path(path).exists(), name
    assert (out / "pretrain" / "final" / "model.safetensors").exists()
    # pre-training and fine-tuning augment whole batches in memory (data.device=batched: ~1.6x faster on 2 cores)
    for run in (out / "pretrain", out / "finetune_pretrained" / "seed0", out / "finetune_scratch" / "seed0"):
        cfg = (run / "config.yaml").read_text()
        assert "  device: batched\n" in cfg and "  in_memory: true\n" in cfg, run
        assert "without CUDA" not in (run / "log.txt").read_text()
    assert "\nin_memory: true\n" in (out / "tokenizer" / "config.yaml").read_text()  # decoded once, same samples
    assert len(list((out / "data" / "test").rglob("*.png"))) == 359  # 20% of sklearn's 1797 digits


def test_mean_spread() -> None:
    from beit.tasks.demo import _mean_spread

    assert _mean_spread([90.0, 92.0, 94.0]) == (92.0, 2.0)  # sample standard deviation
    assert _mean_spread([91.5]) == (91.5, 0.0)


def test_demo_defaults_are_the_recorded_recipe() -> None:
    """The README and RESULTS.md quote the demo's numbers for these settings: change them together."""
    from beit.tasks.demo import DemoConfig

    c = DemoConfig()
    assert (c.img_size, c.patch_size, c.embed_dim, c.depth, c.tok_steps, c.pre_steps, c.ft_steps, c.seeds) == (
        16, 4, 96, 4, 300, 600, 150, (0, 1, 2))
    assert (c.pre_lr, c.ft_lr, c.layer_decay, c.data_device, c.lanes) == (3e-3, 3e-3, 0.85, "batched", 2)


@pytest.mark.parametrize("lanes", [1, 2])
def test_later_seeds_run_quietly_with_full_logs(tmp_path, capsys, lanes) -> None:
    """Two seeds: the first seed's runs log to the console, the second's only to their log.txt. With a second
    lane (process) the from-scratch arm and the last pre-trained seed run there, quietly, with the same results."""
    import torch

    from beit.tasks.demo import DemoConfig, run_demo

    out = tmp_path / "demo"
    threads = torch.get_num_threads()
    summary = run_demo(out, cfg=DemoConfig(tok_steps=12, pre_steps=12, ft_steps=12, seeds=(0, 1), lanes=lanes))
    printed = capsys.readouterr().out
    assert [len(a["runs"]) for a in summary["top1"].values()] == [2, 2]
    assert "seed 0: pre-trained" in printed and "seed 1: pre-trained" in printed
    assert "the other seeds run quietly" in printed
    # tokenizer + pre-training + seed 0's pre-trained arm, + its scratch arm in one lane; never seed 1's
    assert printed.count("step 12/12") == (4 if lanes == 1 else 3)
    assert ("a second process fine-tunes the from-scratch arm" in printed) == (lanes == 2)
    for arm in ("pretrained", "scratch"):
        for seed in (0, 1):
            assert "step 12/12" in (out / f"finetune_{arm}" / f"seed{seed}" / "log.txt").read_text()
    assert torch.get_num_threads() == threads  # the demo's one-thread lanes do not outlive it


def test_a_run_whose_second_process_died_is_done_again_here(monkeypatch, capsys) -> None:
    """The second lane's process killed (e.g. for memory): its run is repeated in this process, not lost; and
    where no second process can be started at all, every run goes in this one."""
    from concurrent.futures import Future
    from concurrent.futures.process import BrokenProcessPool

    import beit.tasks.demo as demo

    done_here = []
    monkeypatch.setattr(demo, "_finetune_top1", lambda cfg, quiet=False: done_here.append((cfg, quiet)) or 87.5)
    job: Future = Future()
    job.set_exception(BrokenProcessPool("a child process terminated abruptly"))
    assert demo._result(job, "the run's config", quiet=True) == 87.5 and done_here == [("the run's config", True)]
    assert "the second process stopped: a child process terminated abruptly" in capsys.readouterr().out
    ok: Future = Future()
    ok.set_result(91.0)
    assert demo._result(ok, "another", quiet=False) == 91.0 and len(done_here) == 1

    def no_semaphores(*args, **kwargs):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(demo, "ProcessPoolExecutor", no_semaphores)
    assert demo._second_lane(2) is None and demo._second_lane(1) is None
    assert "no second process could be started" in capsys.readouterr().out


def test_demo_refuses_an_empty_out_and_folders_it_did_not_write(tmp_path, capsys) -> None:
    assert main(["demo", "--out", "", "--quick"]) == 2  # a usage error, as for every command (test_cli)
    assert "--out is empty" in capsys.readouterr().err
    with pytest.raises(ValueError, match="out is empty"):  # the Python entrance refuses it too
        run_demo("")
    out = tmp_path / "mine"
    (out / "data" / "train" / "digit_0").mkdir(parents=True)
    (out / "data" / "train" / "digit_0" / "notes.txt").write_text("a user's file")
    assert main(["demo", "--out", str(out), "--quick"]) == 1
    assert f"{out / 'data'} holds files the demo did not write: choose another --out" in capsys.readouterr().err
    assert (out / "data" / "train" / "digit_0" / "notes.txt").exists()  # left alone


def test_a_second_demo_replaces_the_first(tmp_path) -> None:
    """Stale seeds and stray images of an earlier demo are removed, not reported or trained on."""
    from beit.tasks.demo import _clear_previous_demo

    out = tmp_path / "demo"
    (out / "data" / "train" / "digit_3").mkdir(parents=True)
    (out / "data" / "train" / "digit_3" / "stray.png").write_bytes(b"")
    (out / "finetune_scratch" / "seed7").mkdir(parents=True)
    (out / "finetune_scratch" / "seed7" / "log.txt").write_text("old")
    _clear_previous_demo(out)
    assert not (out / "data").exists() and not (out / "finetune_scratch").exists()
