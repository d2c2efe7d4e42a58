"""``beit convert`` of a fine-tuning run's training checkpoint keeps what the run's ``model/`` folder stores beside
the weights: its class names (in the run's label order) and its eval preprocessing. Without them the converted
classifier was read with the class folders' sorted order (a run with ``class_names=[dog, cat]`` scored 0% on the
data it had learnt) and an ImageNet crop, and ``--to hf`` wrote ``LABEL_0 ...``."""

from __future__ import annotations

import json

import pytest
import torch

import beit
from beit.cli import main
from beit.tasks.classify.evaluate import TRAIN_CKPT_FORMAT, load_classifier

TINY = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2)


def _finetune_checkpoint(path, names):
    model = beit.create_model("beit_tiny_patch16_224", **TINY, num_classes=len(names))
    state = {"format": TRAIN_CKPT_FORMAT, "task": "classification", "step": 3, "model": model.state_dict(),
             "config": {"class_names": names, "img_size": 32,
                        "data": {"grayscale": True, "resize": "full", "mean": [0.5] * 3, "std": [0.25] * 3}}}
    torch.save(state, path)
    return model


def test_convert_of_a_finetune_checkpoint_keeps_class_names_and_preprocessing(tmp_path) -> None:
    names = ["dog", "cat", "bird"]  # not sorted: the run's label order, not the folders'
    _finetune_checkpoint(tmp_path / "last.pt", names)
    assert main(["convert", str(tmp_path / "last.pt"), str(tmp_path / "ours")]) == 0
    _, got, pre = load_classifier(tmp_path / "ours")
    _, want, want_pre = load_classifier(tmp_path / "last.pt")
    assert got == want == names
    assert pre == want_pre and pre.grayscale and pre.resize == "full" and tuple(pre.mean) == (0.5,) * 3
    assert main(["convert", str(tmp_path / "last.pt"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    id2label = json.loads((tmp_path / "hf" / "config.json").read_text())["id2label"]
    assert [id2label[str(i)] for i in range(3)] == names


def test_convert_of_other_checkpoints_adds_nothing(tmp_path) -> None:
    mim = beit.create_model("beit_tiny_patch16_224", **TINY, head="mim")
    torch.save({"format": TRAIN_CKPT_FORMAT, "task": "pre-training", "model": mim.state_dict(),
                "config": {"model": {"name": "beit_tiny_patch16_224"}}}, tmp_path / "pt.pt")
    assert main(["convert", str(tmp_path / "pt.pt"), str(tmp_path / "out")]) == 0
    meta = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "preprocess" not in meta and meta["config"]["extra"] == {}
    plain = beit.create_model("beit_tiny_patch16_224", **TINY, num_classes=2)
    torch.save(plain.state_dict(), tmp_path / "plain.pth")  # a bare state dict: nothing to take names from
    assert main(["convert", str(tmp_path / "plain.pth"), str(tmp_path / "out2")]) == 0
    assert "class_names" not in json.loads((tmp_path / "out2" / "config.json").read_text())["config"]["extra"]


def test_convert_of_a_legacy_format_classifier_file(tmp_path) -> None:
    """A classifier .pth in torch's legacy (non-zip) format, which load_model reads: convert looked for a run's
    metadata with torch.load(mmap=True), which cannot read that format, and ended in a RuntimeError traceback."""
    plain = beit.create_model("beit_tiny_patch16_224", **TINY, num_classes=2)
    torch.save({"model": plain.state_dict()}, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    assert main(["convert", str(tmp_path / "old.pth"), str(tmp_path / "out")]) == 0
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(beit.load_model(tmp_path / "out")(x), plain.eval()(x))


def test_evaluate_of_a_classifier_without_class_names_says_which_order_it_assumes(tmp_path, beit_warnings) -> None:
    from PIL import Image

    from beit.tasks.classify.evaluate import evaluate_checkpoint

    plain = beit.create_model("beit_tiny_patch16_224", **TINY, num_classes=2)
    beit.save_model(plain, tmp_path / "plain")
    for c in ("dog", "cat"):
        (tmp_path / "val" / c).mkdir(parents=True)
        Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "val" / c / "a.png")
    evaluate_checkpoint(tmp_path / "plain", tmp_path / "val", tmp_path / "rep", num_workers=0)
    said = [r.getMessage() for r in beit_warnings if "stores no class names" in r.getMessage()]
    assert len(said) == 1 and "sorted order (cat, dog)" in said[0]


def test_predict_out_never_replaces_an_image_and_takes_a_folder(tmp_path) -> None:
    from PIL import Image

    from beit.tasks.classify.evaluate import predict_folder

    beit.save_model(beit.create_model("beit_tiny_patch16_224", **TINY, num_classes=2), tmp_path / "m")
    (tmp_path / "imgs").mkdir()
    img = tmp_path / "imgs" / "a.png"
    Image.new("RGB", (32, 32), (0, 90, 200)).save(img)
    before = img.read_bytes()
    for out in (img, tmp_path / "other.JPG"):  # an input, or any image name: refused before any work
        with pytest.raises(ValueError, match="names an image file; beit predict writes a CSV"):
            predict_folder(tmp_path / "m", img, out, num_workers=0)
    assert img.read_bytes() == before and not (tmp_path / "other.JPG").exists()
    r = predict_folder(tmp_path / "m", tmp_path / "imgs", tmp_path / "imgs", num_workers=0)  # --out an existing folder
    assert r["csv"] == str(tmp_path / "imgs" / "predictions.csv") and r["num_images"] == 1
    assert (tmp_path / "imgs" / "predictions.csv").read_text().startswith("path,label_1")


def test_predict_out_ending_in_a_slash_is_a_folder_even_before_it_exists(tmp_path) -> None:
    """``--out results/`` for a folder that does not exist yet wrote a CSV file named ``results`` (Path() drops the
    slash), where ``beit visualize`` and ``beit tokenizer eval|encode`` make the folder and write inside it."""
    from PIL import Image

    from beit.tasks.classify.evaluate import predict_folder

    beit.save_model(beit.create_model("beit_tiny_patch16_224", **TINY, num_classes=2), tmp_path / "m")
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (32, 32), (0, 90, 200)).save(tmp_path / "imgs" / "a.png")
    r = predict_folder(tmp_path / "m", tmp_path / "imgs", f"{tmp_path / 'results'}/", num_workers=0)
    assert (tmp_path / "results").is_dir() and r["csv"] == str(tmp_path / "results" / "predictions.csv")
    assert (tmp_path / "results" / "predictions.csv").read_text().startswith("path,label_1")
