"""A training run's output folder is none of the folders it reads images from, nor inside one. ``beit finetune
data.train_dir=data/train --out data/train`` trained and wrote ``model/``, ``tb/``, checkpoints and ``log.txt``
into the class folders' root: every later run on that set stopped at "class folders without images: ['model',
'tb']"; under ``data.path`` of a pre-training its ``curves.png`` / ``mim_panel.png`` became training images.

A run refused by a check made after the config's (the data, the model) leaves no empty output folder behind: the
folder was made before those checks (``beit finetune data.train_dir=/nonexistent`` left ``--out`` with an empty
``log.txt``)."""

from __future__ import annotations

import pytest
from PIL import Image

from beit.cli import main


def _err(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.fixture
def data(tmp_path):
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            Image.new("RGB", (16, 16), (40, 90, 200)).save(tmp_path / split / c / "x.png")
    return tmp_path


@pytest.mark.parametrize("out,where,key", [("train", "is", "data.train_dir"), ("val/run", "is inside", "data.val_dir")])
def test_finetune_refuses_an_output_dir_in_its_data(data, capsys, out, where, key) -> None:
    argv = ["finetune", "-c", "finetune_cifar10_small", f"data.train_dir={data / 'train'}",
            f"data.val_dir={data / 'val'}", "--out", str(data / out)]
    assert main(argv) == 1
    assert _err(capsys).startswith(f"beit finetune: error: config key 'train.output_dir': {data / out} {where} the "
                                   f"image folder {key}=")
    for split in ("train", "val"):  # nothing written there: no folder, no log.txt
        assert sorted(p.name for p in (data / split).iterdir()) == ["a", "b"]


def test_tokenizer_refuses_an_output_dir_inside_its_data_and_a_sibling_is_fine(data, capsys) -> None:
    base = ["tokenizer", "train", "-c", "tokenizer_cifar10", f"data_dir={data}"]
    assert main([*base, "--out", str(data / "runs" / "tok")]) == 1
    assert "is inside the image folder data_dir=" in _err(capsys)
    assert not (data / "runs").exists()
    from beit.engine.config import check_output_outside
    from beit.tasks.tokenizer.config import TokenizerTrainConfig

    cfg = TokenizerTrainConfig(data_dir=str(data / "train"))
    cfg.train.output_dir = str(data / "tok")  # beside the data: fine
    check_output_outside(cfg, ("data_dir", "val_dir"))


def _bad_runs(data, tmp_path) -> dict[str, list[str]]:
    """Commands refused by a check made after the output folder was (before the fix: made) checked."""
    from beit.tokenizers.dvae import DiscreteVAE

    (tmp_path / "no_images").mkdir(parents=True)
    DiscreteVAE(vocab_size=16, hidden=8, downsample=4, num_res_blocks=0, codebook_dim=8).save(tmp_path / "tok.st")
    folders = [f"data.train_dir={data / 'train'}", f"data.val_dir={data / 'val'}"]
    return {
        "finetune data": ["finetune", "-c", "finetune_cifar10_small", f"data.train_dir={tmp_path / 'missing'}"],
        "finetune model": ["finetune", "-c", "finetune_cifar10_small", *folders, f"model={tmp_path / 'missing.pt'}"],
        "linprobe model": ["linprobe", "-c", "linprobe_base", *folders, f"model={tmp_path / 'missing.pt'}"],
        "pretrain data": ["pretrain", "-c", "pretrain_cifar10_small", f"data.path={tmp_path / 'no_images'}",
                          "tokenizer.kind=dvae", f"tokenizer.path={tmp_path / 'tok.st'}"],
        "segment data": ["segment", "train", "-c", "segment_camvid", f"data.root={tmp_path / 'missing'}"],
        "layout data": ["layout", "train", "-c", "layout_docbank", f"data.train_ann={tmp_path / 'missing.json'}"],
        "tokenizer data": ["tokenizer", "train", "-c", "tokenizer_cifar10", f"data_dir={tmp_path / 'missing'}"],
    }


def test_a_run_refused_after_the_config_check_leaves_no_output_folder(data, tmp_path, monkeypatch, capsys) -> None:
    """The folder (and the parents made for it) is removed again; a folder that existed before is kept, and so is
    one that holds anything."""
    runs = _bad_runs(data, tmp_path / "inputs")
    (tmp_path / "out").mkdir()
    for name, argv in runs.items():
        fresh = tmp_path / "out" / name.replace(" ", "_")
        assert main([*argv, "--out", str(fresh / "run")]) == 1, name
        assert " error: " in _err(capsys), name
        assert not fresh.exists(), (name, sorted(p.name for p in fresh.rglob("*")))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []  # the folder above them was there before
    from beit.engine.logging import get_logger  # the removed log.txt's handler is closed: a later run opens its own

    assert not [h for h in get_logger().handlers if str(tmp_path / "out") in getattr(h, "baseFilename", "")]
    existing = tmp_path / "existing"  # empty, but not made by the run: kept (with the run's log.txt in it)
    existing.mkdir()
    assert main([*runs["finetune data"], "--out", str(existing)]) == 1
    assert existing.is_dir()
    holds = tmp_path / "holds"  # made by the run, but a file was written into it: kept

    def fail_after_writing(cfg, **kw):
        (holds / "run" / "notes.txt").write_text("x")
        raise ValueError("failed after writing")

    monkeypatch.setattr("beit.tasks.classify.train.finetune", fail_after_writing)
    assert main([*runs["finetune model"], "--out", str(holds / "run")]) == 1
    assert _err(capsys).endswith("error: failed after writing")
    assert (holds / "run" / "notes.txt").read_text() == "x"


def test_output_dir_removed_on_failure_removes_only_what_it_made_while_empty(tmp_path) -> None:
    from beit.engine.config import check_output_dir, output_dir_removed_on_failure

    def fail(out, write=None):
        with pytest.raises(ValueError), output_dir_removed_on_failure():
            check_output_dir(out)
            if write:
                (out / write[0]).write_text(write[1])
            raise ValueError("a check after the config's")

    fail(tmp_path / "a" / "b" / "run", ("log.txt", ""))  # another rank's empty log.txt: removed, parents too
    assert not (tmp_path / "a").exists()
    fail(tmp_path / "c" / "run", ("log.txt", "a line\n"))  # something was logged: kept
    assert (tmp_path / "c" / "run" / "log.txt").read_text() == "a line\n"
    (tmp_path / "d").mkdir()
    fail(tmp_path / "d")  # there before: kept
    assert (tmp_path / "d").is_dir()
    fail(tmp_path / "d" / "new" / ".." / "run")  # a/new/../run makes a/new too: both removed, d kept
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == []
    with output_dir_removed_on_failure():  # success: kept
        check_output_dir(tmp_path / "e")
    assert (tmp_path / "e").is_dir()


@pytest.mark.parametrize("out", ["d/new/../b", "d/x/../x/../b", "d/n1/../n2/../b/../b", "link/n/../b", "d/new/../b/run"])
def test_output_dir_removed_on_failure_keeps_a_folder_reached_through_new_ones_and_dot_dot(tmp_path, monkeypatch,
                                                                                          out) -> None:
    """``--out d/new/../b`` with ``d/b`` there before: ``d/new/../b`` does not exist while ``d/new`` does not, but it
    is ``d/b``, which a failed start must keep (it was removed while empty); the new folders go (``d/n1``, ``d/n2``
    were left behind)."""
    from beit.engine.config import check_output_dir, output_dir_removed_on_failure

    (tmp_path / "d" / "b").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "d", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(ValueError), output_dir_removed_on_failure():
        check_output_dir(out)
        raise ValueError("a check after the config's")
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
