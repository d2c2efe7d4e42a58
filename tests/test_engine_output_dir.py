"""A training run's output folder is none of the folders it reads images from, nor inside one. ``beit finetune
data.train_dir=data/train --out data/train`` trained and wrote ``model/``, ``tb/``, checkpoints and ``log.txt``
into the class folders' root: every later run on that set stopped at "class folders without images: ['model',
'tb']"; under ``data.path`` of a pre-training its ``curves.png`` / ``mim_panel.png`` became training images."""

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
