"""A class whose files all fail to decode: an error for training (in memory, streaming, device path), a warning for
validation, and never a NaN in the evaluation report."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from beit.data.datasets import NoReadableImagesError, decode_image_folder, unreadable_classes
from beit.tasks.classify.config import DataConfig
from beit.tasks.classify.data import build_datasets, build_val, check_train_classes
from beit.tasks.classify.evaluate import ClassificationMeter, write_report


def _folder(root: Path, good_cat: bool = False) -> Path:
    """``root/cat`` with only unreadable files (an empty .jpg, text named .jpg, a truncated JPEG; plus one good image
    with ``good_cat``), ``root/dog`` with 4 good images."""
    rng = np.random.default_rng(0)
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / "dog" / f"{i}.jpg")
    (root / "cat" / "empty.jpg").write_bytes(b"")
    (root / "cat" / "text.jpg").write_text("not an image")
    data = (root / "dog" / "0.jpg").read_bytes()
    (root / "cat" / "trunc.jpg").write_bytes(data[: len(data) // 3])
    if good_cat:
        (root / "cat" / "good.jpg").write_bytes(data)
    return root


@pytest.mark.parametrize("in_memory", [False, True])
def test_training_class_without_a_readable_image_is_an_error_naming_it(tmp_path: Path, in_memory: bool) -> None:
    root = _folder(tmp_path / "train")
    data = DataConfig(train_dir=str(root), in_memory=in_memory)
    with pytest.raises(NoReadableImagesError, match=r"1 training class without a readable image: 'cat' \(.*train/cat: "
                                                    r"3 files, none decodes"):
        build_datasets(data, None, None)


def test_device_path_check_and_the_cheap_check_stops_at_the_first_good_file(tmp_path: Path) -> None:
    root = _folder(tmp_path / "train")
    samples = [(str(p), 0) for p in sorted((root / "cat").iterdir())] + [(str(root / "dog" / "0.jpg"), 1)]
    with pytest.raises(NoReadableImagesError, match="'cat'"):
        check_train_classes(str(root), samples, ["cat", "dog"])
    assert unreadable_classes(samples, ["cat", "dog"]).keys() == {"cat"}
    good_first = [(str(root / "dog" / "0.jpg"), 0), *samples]  # cat's first file decodes: the rest are not read
    assert unreadable_classes(good_first, ["cat", "dog"]) == {}


@pytest.mark.parametrize("mode", ["memory", "verify", "cheap"])
def test_validation_class_without_a_readable_image_is_a_warning_naming_it(tmp_path: Path, caplog, mode: str) -> None:
    train = _folder(tmp_path / "train", good_cat=True)
    val = _folder(tmp_path / "val")
    data = DataConfig(train_dir=str(train), val_dir=str(val), in_memory=mode == "memory",
                      verify_val=mode == "verify")
    with caplog.at_level(logging.WARNING):
        ds = build_val(data, None, ["cat", "dog"], 0)
    assert ds is not None
    assert "1 validation class without a readable image: 'cat'" in caplog.text
    assert "val/cat: 3 files, none decodes" in caplog.text
    if mode == "verify":  # the verified val set leaves bad files out: no "replacement" is said
        assert "replacement" not in caplog.text and "it is left out" in caplog.text


@pytest.mark.parametrize("mode", ["memory", "verify", "cheap"])
def test_under_torchrun_the_validation_set_warnings_are_rank_0s(tmp_path: Path, monkeypatch, beit_warnings,
                                                               mode: str) -> None:
    """Every rank builds the same validation set: each named its unreadable files, the files left out and the class
    without a readable image, the same warnings once per rank. Rank 0 names them; another rank keeps quiet and
    leaves out the same files."""
    train = _folder(tmp_path / "train", good_cat=True)
    val = _folder(tmp_path / "val")
    data = DataConfig(train_dir=str(train), val_dir=str(val), in_memory=mode == "memory",
                      verify_val=mode == "verify")
    sizes = {}
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", "2")
        beit_warnings.clear()
        ds = build_val(data, None, ["cat", "dog"], 0)
        assert ds is not None
        sizes[rank] = len(ds)
        said = " | ".join(r.getMessage() for r in beit_warnings)
        if rank == "1":
            assert said == ""
            continue
        assert "1 validation class without a readable image: 'cat'" in said
        if mode != "cheap":  # each bad file named, and the count left out
            assert all(f"{name}.jpg" in said for name in ("empty", "text", "trunc")), said
            assert ("left out 3 unreadable images under" if mode == "memory" else "left out 3 unreadable images:"
                    ) in said, said
            if mode == "memory":  # a validation set's are no skipped files of an epoch (the words said they were)
                assert "a training set counts them as skipped files" in said and "; they count as" not in said
    assert sizes["0"] == sizes["1"] == (4 if mode != "cheap" else 7)


def test_in_memory_val_class_check_is_a_warning_train_an_error(tmp_path: Path, caplog) -> None:
    root = _folder(tmp_path / "d")
    with caplog.at_level(logging.WARNING):
        out = decode_image_folder(root, labeled=True, every_class=False, progress=False)
    assert len(out.images) == 4 and "'cat'" in caplog.text
    with pytest.raises(NoReadableImagesError, match="'cat'"):
        decode_image_folder(root, labeled=True, progress=False)


def test_report_of_a_class_without_images_writes_null_not_nan(tmp_path: Path, caplog) -> None:
    meter = ClassificationMeter(2, (1,))
    meter.update(torch.tensor([[0.0, 1.0], [0.0, 1.0]]), torch.tensor([1, 1]))
    with caplog.at_level(logging.WARNING):
        r = write_report(meter, ["cat", "dog"], tmp_path)
    text = (tmp_path / "metrics.json").read_text()
    strict = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in metrics.json"))
    assert strict["per_class"]["cat"] == {"acc": None, "precision": None, "n": 0}
    assert r["per_class"]["dog"]["acc"] == 100.0
    assert "cat" in caplog.text and "null" in caplog.text
    assert (tmp_path / "per_class.csv").read_text().splitlines()[1] == "cat,,,0"
