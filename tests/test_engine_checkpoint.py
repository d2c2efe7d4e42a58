"""Checkpoint files: atomic writes, keep_last pruning, best.pt, format marker, RNG round trip."""

from __future__ import annotations

import argparse
import os
import random

import numpy as np
import pytest
import torch

from _engine_fixtures import TinyNet
from beit.engine import checkpoint as C


def payload(step: int) -> dict:
    return {"format": C.FORMAT, "step": step, "model": {"w": torch.full((2,), float(step))},
            "config": {"train": {"lr": 1e-3, "betas": (0.9, 0.98)}}, "best": None}


def test_keep_last_and_best(tmp_path):
    mgr = C.CheckpointManager(tmp_path, keep_last=2)
    for step in range(1, 6):
        mgr.save(payload(step), step, is_best=step == 3)
    assert [p.name for p in mgr.step_files()] == ["step_0000004.pt", "step_0000005.pt"]
    assert C.load_checkpoint(tmp_path / "last.pt")["step"] == 5
    assert C.load_checkpoint(tmp_path / "best.pt")["step"] == 3  # survives pruning of step_0000003.pt
    assert C.load_checkpoint(tmp_path / "step_0000004.pt")["step"] == 4
    assert not list(tmp_path.glob("*.tmp"))
    mgr0 = C.CheckpointManager(tmp_path / "only_last", keep_last=0)
    mgr0.save(payload(7), 7)
    assert [p.name for p in (tmp_path / "only_last").iterdir()] == ["last.pt"]


def test_atomic_write_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    C.save_checkpoint(payload(1), path)

    def crash(obj, f, *a, **kw):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(C.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        C.save_checkpoint(payload(2), path)
    monkeypatch.undo()
    assert C.load_checkpoint(path)["step"] == 1  # the old file is intact


def test_format_marker_and_weights_only(tmp_path):
    torch.save({"model": {}}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="not a beit training checkpoint"):
        C.load_checkpoint(tmp_path / "plain.pt")
    torch.save({"format": C.FORMAT, "obj": argparse.Namespace(a=1)}, tmp_path / "evil.pt")  # arbitrary object
    with pytest.raises(ValueError, match=r"needs code to load \(argparse.Namespace\): refused, beit never runs code"):
        C.load_checkpoint(tmp_path / "evil.pt")
    with pytest.raises(FileNotFoundError):
        C.load_checkpoint(tmp_path / "missing.pt")


def test_find_resume_path(tmp_path):
    assert C.find_resume_path("", tmp_path) is None
    assert C.find_resume_path("auto", tmp_path) is None  # nothing yet: fresh start
    C.save_checkpoint(payload(1), tmp_path / "last.pt")
    assert C.find_resume_path("auto", tmp_path) == tmp_path / "last.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        C.find_resume_path(str(tmp_path / "nope.pt"), tmp_path)


def test_state_dict_mismatch_names_key_and_file():
    sd = TinyNet().state_dict()
    with pytest.raises(C.CheckpointMismatchError, match=r"ck\.pt: shape mismatch for 'head.weight'"):
        C.load_model_state(TinyNet(num_classes=5), sd, source="ck.pt")
    with pytest.raises(C.CheckpointMismatchError, match="'blocks.3.norm.weight' of the model is missing"):
        C.load_model_state(TinyNet(depth=4), sd, source="ck.pt")
    with pytest.raises(C.CheckpointMismatchError, match="unexpected key 'blocks.2.norm.weight'"):
        C.load_model_state(TinyNet(depth=2), sd, source="ck.pt")


def test_rng_state_roundtrip_through_weights_only(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    C.save_checkpoint({"format": C.FORMAT, "rng": [C.get_rng_state()]}, tmp_path / "r.pt")
    expected = (random.random(), np.random.rand(), torch.rand(()).item())
    C.set_rng_state(C.load_checkpoint(tmp_path / "r.pt")["rng"][0])
    assert (random.random(), np.random.rand(), torch.rand(()).item()) == expected


def test_resume_candidates_last_first_then_steps_newest_first_each_once(tmp_path):
    assert C.resume_candidates(tmp_path) == []
    mgr = C.CheckpointManager(tmp_path, keep_last=3)
    for step in (2, 4, 6):
        mgr.save(payload(step), step, is_best=step == 4)
    assert C.resume_candidates(tmp_path) == [tmp_path / "last.pt", tmp_path / "step_0000004.pt",
                                             tmp_path / "step_0000002.pt"]  # last.pt = step_6, best.pt = step_4
    (tmp_path / "last.pt").unlink()  # deleted, or never linked: the newest step first, each once
    assert C.resume_candidates(tmp_path) == [tmp_path / "step_0000006.pt", tmp_path / "step_0000004.pt",
                                             tmp_path / "step_0000002.pt"]
    for p in tmp_path.glob("step_*.pt"):
        p.unlink()
    assert C.resume_candidates(tmp_path) == [tmp_path / "best.pt"]  # best.pt was step_4
    (tmp_path / "best.pt").unlink()
    (tmp_path / "step_0000008").mkdir()  # a sharded checkpoint whose writing never finished (no meta.pt)
    assert C.resume_candidates(tmp_path) == [] and C.resume_candidates(tmp_path / "nowhere") == []
    assert [C.step_of(p) for p in ("step_0000042.pt", "x/step_0000007", "last.pt")] == [42, 7, None]


def test_set_aside_after_moves_later_steps_and_their_links(tmp_path):
    mgr = C.CheckpointManager(tmp_path, keep_last=10)
    for step in (3, 6, 9, 10):
        mgr.save(payload(step), step, is_best=step == 9)
    (tmp_path / "abandoned").mkdir()
    (tmp_path / "abandoned" / "step_0000010.pt").write_text("an earlier abandoned branch: kept")
    assert mgr.set_aside_after(10) == []
    moved = mgr.set_aside_after(6, tmp_path / "step_0000006.pt")
    assert [p.name for p in moved] == ["best.pt", "step_0000009.pt", "step_0000010~2.pt"]
    assert [p.name for p in mgr.step_files()] == ["step_0000003.pt", "step_0000006.pt"]
    assert C.load_checkpoint(tmp_path / "last.pt")["step"] == 6  # an auto resume before the next save: this branch
    assert (tmp_path / "last.pt").samefile(tmp_path / "step_0000006.pt") and not (tmp_path / "best.pt").exists()
    assert C.load_checkpoint(tmp_path / "abandoned" / "best.pt")["step"] == 9
    assert C.load_checkpoint(tmp_path / "abandoned" / "step_0000010~2.pt")["step"] == 10
    assert (tmp_path / "abandoned" / "step_0000010.pt").read_text() == "an earlier abandoned branch: kept"
    assert mgr.path_of(8) == tmp_path / "step_0000008.pt" and mgr.path_of(8, sharded=True) == tmp_path / "step_0000008"


def test_set_aside_after_with_sharded_folders_repoints_the_symlinks(tmp_path):
    for step in (4, 8):
        (tmp_path / f"step_{step:07d}").mkdir()
        C.save_checkpoint(payload(step), tmp_path / f"step_{step:07d}" / C.META)
    os.symlink("step_0000008", tmp_path / "last")
    os.symlink("step_0000008", tmp_path / "best")
    moved = C.CheckpointManager(tmp_path).set_aside_after(4, tmp_path / "step_0000004")
    assert [p.name for p in moved] == ["best", "step_0000008"]
    assert os.readlink(tmp_path / "last") == "step_0000004" and not (tmp_path / "best").exists()
    assert C.load_checkpoint(tmp_path / "abandoned" / "best", full=False)["step"] == 8  # follows its folder


def test_a_folder_given_as_a_checkpoint_says_what_it_is(tmp_path):
    """A run folder (or an exported model folder) passed where a checkpoint goes said "checkpoint not found:
    <folder>/meta.pt", a file of the sharded format most users never see."""
    run = tmp_path / "run"
    C.CheckpointManager(run, keep_last=2).save(payload(3), 3, is_best=True)
    with pytest.raises(FileNotFoundError, match=rf"^{run} is a run folder, not a checkpoint: pass {run / 'last.pt'} "
                                                rf"or {run / 'best.pt'}$"):
        C.load_checkpoint(run)
    model = tmp_path / "final"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="is an exported model folder .* model=... / model.init=..."):
        C.load_checkpoint(model)
    with pytest.raises(FileNotFoundError, match="is a folder without a checkpoint"):
        C.load_checkpoint(tmp_path)  # holds the two folders above, no checkpoint of its own


def test_model_weights_gives_the_ema_copy_only_when_one_was_trained():
    raw, ema = {"w": torch.zeros(1)}, {"w": torch.ones(1)}
    assert C.model_weights({"model": raw, "ema": ema}, "run/last.pt") is raw
    assert C.model_weights({"model": raw, "ema": ema}, "run/last.pt", ema=True) is ema
    for state in ({"model": raw}, {"model": raw, "ema": None}):
        with pytest.raises(ValueError, match=r"run/last\.pt: --ema, but it has no EMA weights"):
            C.model_weights(state, "run/last.pt", ema=True)
