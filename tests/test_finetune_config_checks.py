"""A misspelt ``model=`` (a preset name or a path) of ``beit finetune`` / ``beit linprobe`` is a config error naming
the key and the presets before any data is read; it was ``checkpoint not found: ...`` once the training set had
been listed and decoded (with ``data.in_memory=true``, minutes on a large set)."""

from __future__ import annotations

import pytest

from beit.cli import main
from beit.engine import ConfigError
from beit.tasks.backbone_config import check_model_source


def _err(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("command", ["finetune", "linprobe"])
@pytest.mark.parametrize("model", ["beit_tiny_patch16_225", "no_such_run/final/model.safetensors", "nothere.pt"])
def test_a_misspelt_model_fails_before_the_data_is_read(tmp_path, capsys, command, model) -> None:
    cls = tmp_path / "train" / "a"
    cls.mkdir(parents=True)
    (cls / "broken.png").write_bytes(b"not a png")  # read first, this class would be the error
    preset = "finetune_cifar10_small" if command == "finetune" else "linprobe_base"
    argv = [command, "-c", preset, f"model={model}", f"data.train_dir={tmp_path / 'train'}",
            f"data.val_dir={tmp_path / 'train'}", "--out", str(tmp_path / "run")]
    assert main(argv) == 1
    err = _err(capsys)
    assert err.startswith(f"beit {command}: error: config key 'model': no preset and no checkpoint file or folder "
                          f"named '{model}'")
    assert "beit_tiny_patch16_224" in err


def test_what_is_left_to_the_loader(tmp_path) -> None:
    (tmp_path / "m.pt").write_bytes(b"")
    for ok in ("beit_base_patch16_224", str(tmp_path / "m.pt"), str(tmp_path), "microsoft/beit-base-patch16-224",
               "https://example.com/beit.pth"):
        check_model_source(ok)
    with pytest.raises(ConfigError, match="config key 'model.init': no preset"):
        check_model_source("beit_base", "model.init")


def test_linprobe_without_a_val_set_fails_before_the_encoder_is_read(tmp_path, capsys) -> None:
    (tmp_path / "train" / "a").mkdir(parents=True)
    damaged = tmp_path / "big.safetensors"
    damaged.write_bytes(b"\0" * 64)  # read first, this would be the error (a BEiT-L takes seconds to read)
    argv = ["linprobe", "-c", "linprobe_base", f"model={damaged}", f"data.train_dir={tmp_path / 'train'}",
            "--out", str(tmp_path / "run")]
    assert main(argv) == 1
    assert _err(capsys) == ("beit linprobe: error: config key 'data.val_dir': linear probing needs a val set to pick "
                            "and report the best block")
