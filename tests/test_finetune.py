"""Fine-tuning, evaluation and prediction on tiny models and generated images (CPU, a few seconds each)."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import beit
import beit.configs as beit_configs
from _finetune_data import TINY_OVERRIDES, colored_squares, document_pages, tiny_pretrain_checkpoint
from beit.cli import main as cli_main
from beit.engine import ConfigError, load_config, param_groups
from beit.engine.logging import read_metrics
from beit.models.relpos import table_size
from beit.tasks.classify import (
    FinetuneConfig,
    LinprobeConfig,
    build_model,
    evaluate_checkpoint,
    finetune,
    load_classifier,
    predict_folder,
)

CONFIGS = Path(beit_configs.__file__).parent  # the presets shipped in the package


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cfg(tmp: Path, data: Path | None, *extra: str) -> FinetuneConfig:
    base = [*TINY_OVERRIDES, f"train.output_dir={tmp}", "train.num_workers=0", "train.batch_size=16",
            "train.log_every=1", "train.warmup_epochs=0", "train.epochs=1"]
    if data is not None:
        base += [f"data.train_dir={data / 'train'}", f"data.val_dir={data / 'val'}"]
    return load_config(FinetuneConfig, None, base + list(extra))


@pytest.fixture(scope="module")
def squares(tmp_path_factory) -> Path:
    return colored_squares(tmp_path_factory.mktemp("squares"), {"train": 32, "val": 8})


@pytest.fixture(scope="module")
def trained(squares, tmp_path_factory) -> dict:
    """One tiny fine-tune with the paper's recipe (mixup, cutmix, erasing, layer decay, EMA) minus RandAugment,
    whose Invert/Solarize/Color ops change the very colours these classes are told apart by."""
    out = tmp_path_factory.mktemp("run")
    cfg = tiny_cfg(out, squares, "train.epochs=6", "train.warmup_epochs=1", "train.lr=4e-3", "train.eval_every=3",
                   "train.layer_decay=0.75", "train.ema=0.9", "train.log_every=10", "data.auto_augment=null")
    return finetune(cfg)


def test_layer_decay_groups_scale_each_block(tmp_path):
    cfg = tiny_cfg(tmp_path, None, "model_overrides.depth=3")
    model = build_model(cfg, num_classes=4)
    depth, ld = 3, 0.65
    groups = param_groups(model, 0.05, ld)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        if name.startswith(("cls_token", "patch_embed")):
            layer = 0
        elif name.startswith("blocks."):
            layer = int(name.split(".")[1]) + 1
        else:  # head, fc_norm
            assert name.startswith(("head", "fc_norm")), name
            layer = depth + 1
        assert scale_of[id(p)] == pytest.approx(ld ** (depth + 1 - layer)), name
    assert scale_of[id(model.head.weight)] == 1.0
    assert scale_of[id(model.patch_embed.proj.weight)] == pytest.approx(ld ** 4)


def test_pretraining_checkpoint_becomes_finetune_model(tmp_path):
    src = tiny_pretrain_checkpoint(tmp_path / "pt")
    shared = beit.load_model(src).rel_pos_bias.relative_position_bias_table.detach()

    same = build_model(tiny_cfg(tmp_path, None, f"model={src}"), num_classes=5)
    assert same.rel_pos_bias is None and same.fc_norm is not None and same.head.out_features == 5
    for blk in same.blocks:  # shared table copied into every block
        torch.testing.assert_close(blk.attn.relative_position_bias_table.detach(), shared)
    pt = beit.load_model(src)
    torch.testing.assert_close(same.blocks[1].mlp.fc1.weight, pt.blocks[1].mlp.fc1.weight)
    assert same.head.weight.abs().max() < 0.01  # fresh head, scaled by init_scale

    big = build_model(tiny_cfg(tmp_path, None, f"model={src}", "img_size=48", "drop_path=0.2"), num_classes=5)
    assert big.cfg.grid == (12, 12) and big.cfg.drop_path_rate == 0.2
    for blk in big.blocks:  # per-layer and resampled from 8x8 to 12x12
        assert blk.attn.relative_position_bias_table.shape == (table_size((12, 12)), 2)
    assert big(torch.randn(2, 3, 48, 48)).shape == (2, 5)

    # an override that contradicts the checkpoint's tensors says so (not a shape error deep in load_state_dict)
    with pytest.raises(ValueError, match="model_overrides.embed_dim=64 but .* has embed_dim=32"):
        build_model(tiny_cfg(tmp_path, None, f"model={src}", "model_overrides.embed_dim=64"), num_classes=5)

    # an official-style .pth ({"model": state dict}) goes the same way
    torch.save({"model": pt.state_dict()}, tmp_path / "pt.pth")
    again = build_model(tiny_cfg(tmp_path, None, f"model={tmp_path / 'pt.pth'}"), num_classes=5)
    torch.testing.assert_close(again.blocks[0].attn.relative_position_bias_table, shared)


def test_tiny_finetune_learns_colored_squares(trained):
    assert trained["top1"] > 70.0, trained  # 4 classes: chance is 25%
    assert "ema_top1" in trained and Path(trained["model_dir"]).is_dir() and Path(trained["model_ema_dir"]).is_dir()
    assert Path(trained["confusion_png"]).stat().st_size > 1000
    report = json.loads(Path(trained["report"]).read_text())
    assert set(report["per_class"]) == {"c0", "c1", "c2", "c3"} and report["num_images"] == 32
    model, names, pre = load_classifier(trained["model_dir"])
    assert names == ["c0", "c1", "c2", "c3"] and pre.img_size == 32 and model.cfg.num_classes == 4


def test_resume_through_finetune_is_exact(squares, tmp_path):
    knobs = ["train.max_steps=6", "train.warmup_steps=2", "train.ema=0.9", "drop_path=0.1",
             "train.layer_decay=0.75", "train.ckpt_every=1"]
    full = finetune(tiny_cfg(tmp_path / "full", squares, *knobs))
    finetune(tiny_cfg(tmp_path / "part", squares, *knobs), stop_after_step=3)
    part = finetune(tiny_cfg(tmp_path / "part", squares, *knobs, "train.resume=auto"))

    def losses(d):
        return [(r["step"], r["loss"]) for r in read_metrics(d / "metrics.jsonl")]

    assert len(losses(tmp_path / "full")) == 6
    assert losses(tmp_path / "full") == losses(tmp_path / "part")
    assert full["top1"] == part["top1"] and full["ema_top1"] == part["ema_top1"]
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "part" / "last.pt", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_evaluate_and_predict_saved_model(trained, squares, tmp_path):
    res = evaluate_checkpoint(trained["model_dir"], squares / "val", tmp_path / "eval", num_workers=0)
    assert res["top1"] == pytest.approx(trained["top1"])
    assert (tmp_path / "eval" / "confusion.png").stat().st_size > 1000
    rows = list(csv.DictReader(open(tmp_path / "eval" / "per_class.csv")))
    assert [r["class"] for r in rows] == ["c0", "c1", "c2", "c3"] and all(int(r["n"]) == 8 for r in rows)

    # the training checkpoint gives the same numbers (EMA weights on request)
    run = Path(trained["output_dir"])
    res_pt = evaluate_checkpoint(run / "last.pt", squares / "val", tmp_path / "eval_pt", num_workers=0)
    assert res_pt["top1"] == pytest.approx(res["top1"])
    res_ema = evaluate_checkpoint(run / "last.pt", squares / "val", tmp_path / "eval_ema", num_workers=0, ema=True)
    assert res_ema["top1"] == pytest.approx(trained["ema_top1"])

    images = tmp_path / "imgs"
    (images / "sub").mkdir(parents=True)
    for i, src in enumerate(sorted((squares / "val" / "c2").glob("*.png"))[:3]):
        (images / "sub" / f"{i}.png").write_bytes(src.read_bytes())
    (images / "broken.png").write_bytes(b"not an image")
    pred = predict_folder(trained["model_dir"], images, tmp_path / "pred.csv", topk=3, num_workers=0)
    assert pred["num_images"] == 3 and [Path(p).name for p in pred["skipped"]] == ["broken.png"]
    rows = list(csv.DictReader(open(tmp_path / "pred.csv")))
    assert list(rows[0]) == ["path", "label_1", "prob_1", "label_2", "prob_2", "label_3", "prob_3"]
    assert rows[0]["path"] == "sub/0.png"
    for r in rows:
        probs = [float(r[f"prob_{j}"]) for j in (1, 2, 3)]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
        assert r["label_1"] in {"c0", "c1", "c2", "c3"}

    # the same through the command line
    assert cli_main(["predict", trained["model_dir"], str(images), "--out", str(tmp_path / "cli.csv"),
                     "--topk", "2", "--num-workers", "0"]) == 0
    assert len(list(csv.DictReader(open(tmp_path / "cli.csv")))) == 3
    assert cli_main(["evaluate", trained["model_dir"], "--data", str(squares / "val"), "--out",
                     str(tmp_path / "cli_eval"), "--num-workers", "0"]) == 0
    assert (tmp_path / "cli_eval" / "confusion.png").is_file()
    # without --out, evaluating a training checkpoint writes beside it, named after the data: the training's
    # own report (<run>/eval/metrics.json) is left as it was
    reports = {p: p.read_bytes() for p in run.glob("eval*/metrics.json")}  # the training's eval/ and eval_ema/
    assert {p.parent.name for p in reports} == {"eval", "eval_ema"}

    def evaluate_cli(ckpt, data, *more):
        assert cli_main(["evaluate", str(ckpt), "--data", str(data), "--num-workers", "0", *more]) == 0

    evaluate_cli(run / "last.pt", squares / "val")
    assert (run / "eval-last-val" / "metrics.json").is_file()
    ema_named = tmp_path / "ema"  # a data folder named like the training's EMA report
    shutil.copytree(squares / "val", ema_named)
    evaluate_cli(run / "last.pt", ema_named)
    evaluate_cli(run / "last.pt", squares / "val", "--ema")
    other_val = tmp_path / "other" / "val"  # another folder of the same name: its own report, not an overwrite
    shutil.copytree(squares / "val", other_val)
    evaluate_cli(run / "last.pt", other_val)
    evaluate_cli(run / "last.pt", str(squares / "val") + "/")  # the same pair again: rewrites its own report
    assert {p: p.read_bytes() for p in reports} == reports
    assert sorted(p.name for p in run.glob("eval-*")) == ["eval-last-ema", "eval-last-val", "eval-last-val-2",
                                                         "eval-last-val-ema"]
    with pytest.raises(ValueError, match="model_ema/"):
        evaluate_checkpoint(trained["model_dir"], squares / "val", tmp_path / "e2", num_workers=0, ema=True)


def test_clear_errors(trained, squares, tmp_path, capsys):
    with pytest.raises(ValueError, match="num_classes=10 but .* has 4 classes"):
        finetune(tiny_cfg(tmp_path / "a", squares, "num_classes=10"))
    # data with other classes than the saved model
    other = tmp_path / "other"
    for c in ("cat", "dog"):
        (other / c).mkdir(parents=True)
        (other / c / "x.png").write_bytes((squares / "val" / "c0" / "0.png").read_bytes())
    with pytest.raises(ValueError, match="do not match the model's 4 classes"):
        evaluate_checkpoint(trained["model_dir"], other, tmp_path / "e", num_workers=0)
    # a flat folder of images (no class sub-folders): said so, not "folders the model does not know: []"
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "x.png").write_bytes((squares / "val" / "c0" / "0.png").read_bytes())
    with pytest.raises(ValueError, match=r"flat: no class sub-folders; beit evaluate reads .*<class>/<image> with "
                                         r"the model's 4 classes .*; for unlabeled images use beit predict"):
        evaluate_checkpoint(trained["model_dir"], flat, tmp_path / "e", num_workers=0)
    # an empty class folder
    (other / "empty").mkdir()
    with pytest.raises(ValueError, match="without images.*empty"):
        finetune(tiny_cfg(tmp_path / "b", None, f"data.train_dir={other}"))
    # bad config values name their key, through the CLI as one line
    with pytest.raises(ConfigError, match="mixup_mode"):
        tiny_cfg(tmp_path, squares, "mixup_mode=weird")
    with pytest.raises(ConfigError, match="model_overrides.dpeth"):
        tiny_cfg(tmp_path, squares, "model_overrides.dpeth=3")
    with pytest.raises(ConfigError, match=r"^config key 'class_names': has names given more than once: 'c1' \(2 times\), "
                                          r"'c0' \(3 times\)$"):
        tiny_cfg(tmp_path, squares, "class_names=[c1,c0,c1,c0,c2,c0]")
    assert cli_main(["finetune", *TINY_OVERRIDES, "train.batch_size=15"]) == 1
    assert "even batch" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["cpu", "batched"])
def test_a_malformed_auto_augment_is_a_config_error(squares, tmp_path, capsys, device):
    """timm's RandAugment / AutoAugment parsers assert: a malformed data.auto_augment ended `beit finetune` in an
    AssertionError traceback when the training transform was built (after the run folder was made), on either
    data path. Now it is the one-line config error naming the key, at load; timm's own strings still load. A
    misspelt policy is named as such with data.device=batched too (it was refused as a recipe the device path lacks,
    "use auto or cpu", and named only on the second try)."""
    for good in ("rand-m9-mstd0.5-inc1", "rand-m7-n3", "original", "v0r", "augmix-m5", "autoaugment-cifar10"):
        assert tiny_cfg(tmp_path, squares, f"data.auto_augment={good}").data.auto_augment == good
    out = tmp_path / "run"
    bad_specs = [("rand-mstd0.5-x9", r" \(Unknown RandAugment config section\)"), ("randfoo", ""),
                 ("orignal", r" \(Unknown AA policy orignal\)"),
                 ("autoaugment-cifra10", r" \(Unknown AutoAugment config section\)")]
    for bad, detail in bad_specs:
        assert cli_main(["finetune", *TINY_OVERRIDES, f"data.train_dir={squares / 'train'}", f"data.device={device}",
                         f"train.output_dir={out}", f"data.auto_augment={bad}"]) == 1
        err = capsys.readouterr().err
        assert re.fullmatch(rf"beit finetune: error: config key 'data\.auto_augment': '{bad}' is not an augmentation "
                            rf"timm can build{detail}: RandAugment 'rand-m9-mstd0\.5-inc1', .*\n", err), err
    assert not out.exists()


def test_resize_full_refuses_any_auto_augment_by_its_value(squares, tmp_path):
    """resize=full (documents) takes no augmentation policy: the error named RandAugment whatever was given (an
    AutoAugment policy such as autoaugment-cifar10 too); it names the value now."""
    for spec in ("rand-m9-mstd0.5-inc1", "autoaugment-cifar10", "original"):
        with pytest.raises(ConfigError, match=rf"^config key 'data\.auto_augment': resize=full \(documents\) takes no "
                                              rf"augmentation policy, got '{spec}'; set it to null$"):
            tiny_cfg(tmp_path, squares, "data.resize=full", f"data.auto_augment={spec}")


def test_mean_and_std_on_the_0_255_scale_are_refused(squares, tmp_path):
    """data.mean / data.std are for pixels in [0, 1]; segmentation's are on the 0-255 scale, and such values were
    taken as they were (every image normalised to about -500; the AutoAugment fill 255 * mean overflowed); a zero
    std was a ValueError that named no key. Each is now a config error naming the key; linprobe's too."""
    for extra, key, msg in [("data.mean=[124,116,104]", "mean", r"is for pixels in \[0, 1\]"),
                            ("data.std=[58.4,57.1,57.4]", "std", r"is for pixels in \[0, 1\]"),
                            ("data.std=[0,0.5,0.5]", "std", r"must be > 0"),
                            ("data.mean=[-0.1,0.5,0.5]", "mean", r"is for pixels in \[0, 1\]")]:
        with pytest.raises(ConfigError, match=rf"^config key 'data\.{key}': {msg}"):
            tiny_cfg(tmp_path, squares, extra)
        with pytest.raises(ConfigError, match=rf"^config key 'data\.{key}': {msg}"):
            load_config(LinprobeConfig, None, ["model=beit_tiny_patch16_224", extra])
    cfg = tiny_cfg(tmp_path, squares, "data.mean=[0,0.5,1]", "data.std=[1,1,1]")  # the bounds themselves load
    assert cfg.data.mean == (0.0, 0.5, 1.0)


def test_evaluate_a_folder_with_a_class_without_images(trained, squares, tmp_path, capsys, beit_warnings):
    """``beit evaluate`` on a folder where one class has no image stopped with 'class folders without images ...:
    remove them or pass class_names without them', and removing the folder gave 'no folder for c2': no way out on
    the command line. A class folder without images is now evaluated as one whose images all fail to decode (and as
    a training run's validation set): a warning naming it, per-class accuracy null; a missing folder's error says to
    create it empty."""
    val = tmp_path / "val"
    shutil.copytree(squares / "val", val)
    shutil.rmtree(val / "c2")
    (val / "c2").mkdir()
    out = tmp_path / "report"
    assert cli_main(["evaluate", trained["model_dir"], "--data", str(val), "--out", str(out),
                     "--num-workers", "0"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["num_images"] == 24 and report["per_class"]["c2"]["acc"] is None
    assert report["per_class"]["c0"]["acc"] is not None
    said = [r.getMessage() for r in beit_warnings]
    assert any(m.startswith(f"1 class without a readable image: 'c2' ({val / 'c2'}: no images); it is missing from "
                            "the metrics") and "best.pt" not in m for m in said), said
    capsys.readouterr()
    (val / "c2").rmdir()
    assert cli_main(["evaluate", trained["model_dir"], "--data", str(val), "--out", str(out),
                     "--num-workers", "0"]) == 1
    err = capsys.readouterr().err
    assert (f"{val}: class folders do not match the model's 4 classes (no folder for c2). To evaluate without a class "
            f"that has no images, give it an empty folder ({val}/c2/): its per-class accuracy is then null") in err


def test_max_image_pixels_sets_the_decompression_bomb_limit(squares, tmp_path, beit_warnings, monkeypatch):
    """PIL refuses an image above twice its MAX_IMAGE_PIXELS (a decompression bomb) and warns above it: large scans
    and pages were skipped with no setting to raise the limit. ``data.max_image_pixels`` (default PIL's) is applied
    before any image is decoded; the error names it. Here a limit of 1,500 pixels refuses a 64 x 64 val image."""
    from PIL import Image

    from beit.data.datasets import MAX_IMAGE_PIXELS_ENV, PIL_MAX_IMAGE_PIXELS

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    monkeypatch.delenv(MAX_IMAGE_PIXELS_ENV, raising=False)
    assert FinetuneConfig().data.max_image_pixels == PIL_MAX_IMAGE_PIXELS == int(1024 * 1024 * 1024 // 4 // 3)
    data = tmp_path / "data"
    shutil.copytree(squares, data)
    big = data / "val" / "c1" / "zz_big.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(big)
    res = finetune(tiny_cfg(tmp_path / "small", data, "train.max_steps=1", "data.max_image_pixels=1500"))
    assert json.loads(Path(res["report"]).read_text())["num_images"] == 32  # the 4,096-pixel image left out
    said = [r.getMessage() for r in beit_warnings if "zz_big.png" in r.getMessage()]
    assert any("DecompressionBombError" in m and "raise the limit: data.max_image_pixels=N" in m for m in said), said
    assert os.environ[MAX_IMAGE_PIXELS_ENV] == "1500"  # for DataLoader workers that do not fork
    res = finetune(tiny_cfg(tmp_path / "none", data, "train.max_steps=1", "data.max_image_pixels=null"))
    assert json.loads(Path(res["report"]).read_text())["num_images"] == 33 and Image.MAX_IMAGE_PIXELS is None
    with pytest.raises(ConfigError, match=r"'data.max_image_pixels': must be > 0, got 0"):
        tiny_cfg(tmp_path, data, "data.max_image_pixels=0")
    # a spawned worker reads the limit on import
    code = "import beit.data.datasets; from PIL import Image; print(Image.MAX_IMAGE_PIXELS)"
    env = {**os.environ, MAX_IMAGE_PIXELS_ENV: "1500", "PYTHONPATH": str(Path(beit.__file__).parents[1])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "1500"


def test_a_warmup_as_long_as_the_run_is_refused_before_the_val_set_is_read(squares, tmp_path, monkeypatch):
    """train.warmup_epochs against train.max_steps needs the steps of an epoch, i.e. the training set's size: the
    trainer refused only after the val set was decoded (data.verify_val, or data.in_memory: the whole set). Now
    as soon as the training set is there (128 images, batch 16: 8 steps an epoch, 3 warmup epochs = 24 >= 20)."""
    import beit.tasks.classify.data as classify_data

    def no_val(*args, **kwargs):
        raise AssertionError("the val set was read before the run's steps were checked")

    monkeypatch.setattr(classify_data, "build_val", no_val)
    for extra in ([], ["data.in_memory=true"]):
        with pytest.raises(ConfigError, match=r"^config key 'train.warmup_epochs': warmup \(24 steps\) must be "
                                              r"shorter than training \(20 steps\)$"):
            finetune(tiny_cfg(tmp_path / "run", squares, "train.max_steps=20", "train.warmup_epochs=3", *extra))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_unreadable_images_are_skipped(squares, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(squares, data)
    (data / "train" / "c1" / "truncated.png").write_bytes((data / "train" / "c1" / "0.png").read_bytes()[:60])
    (data / "val" / "c3" / "junk.png").write_bytes(b"\x00" * 10)
    res = finetune(tiny_cfg(tmp_path / "run", data, "train.max_steps=2"))
    assert res["step"] == 2
    report = json.loads(Path(res["report"]).read_text())
    assert report["num_images"] == 32  # the junk val file is left out, not replaced by a neighbour


def test_a_folder_with_no_readable_image_is_the_no_readable_images_error(tmp_path):
    """readable_subset raised a plain ValueError: under torchrun every rank printed it (the CLI prints a
    NoReadableImagesError once, every rank reading the same folder)."""
    from beit.data.datasets import LabeledImageFolder, NoReadableImagesError
    from beit.tasks.classify import readable_subset

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        (tmp_path / c / "x.png").write_bytes(b"not an image")
    with pytest.raises(NoReadableImagesError, match=r"^none of the 2 images under .* could be decoded$"):
        readable_subset(LabeledImageFolder(tmp_path), num_threads=1)


@pytest.mark.parametrize("augment", [None, "autoaugment-cifar10"])
def test_in_memory_cifar_config_runs(squares, tmp_path, augment):
    """The CIFAR preset as shipped, and with torchvision's CIFAR-10 AutoAugment policy (the public from-scratch
    recipes' augmentation; the CPU path, since the device path implements RandAugment alone)."""
    cfg = load_config(FinetuneConfig, CONFIGS / "finetune_cifar10_small.yaml", [
        *TINY_OVERRIDES, f"data.train_dir={squares / 'train'}", f"data.val_dir={squares / 'val'}",
        f"train.output_dir={tmp_path}", "train.num_workers=0", "train.batch_size=16", "train.max_steps=2",
        "train.warmup_epochs=0", *([f"data.auto_augment={augment}"] if augment else [])])
    assert cfg.data.in_memory
    assert (cfg.data.device_path_blocker() is None) == (augment is None)
    if augment:  # and from scratch without the preset's layer decay: no word about it
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, layer_decay=1.0))
    res = finetune(cfg)
    assert res["step"] == 2 and 0.0 <= res["top1"] <= 100.0
    # the preset is from scratch: its layer decay (meant for model=<pre-training run>) is said to apply, in the log
    said = "layer_decay 0.85 with model=beit_tiny_patch16_224, a preset trained from scratch (every block starts random)"
    assert (said in (tmp_path / "log.txt").read_text()) == (augment is None)


def test_rvlcdip_preset_runs_on_generated_pages(tmp_path):
    pages = document_pages(tmp_path / "pages", num_classes=16, per_class=2)
    out = tmp_path / "run"
    rc = cli_main(["finetune", "-c", str(CONFIGS / "finetune_rvlcdip_base.yaml"),
                   "model=beit_tiny_patch16_224", "img_size=64", "model_overrides.patch_size=8",
                   "model_overrides.depth=2", "model_overrides.embed_dim=32", "model_overrides.num_heads=2",
                   f"data.train_dir={pages}", f"data.val_dir={pages}", f"train.output_dir={out}",
                   "train.batch_size=8", "train.max_steps=2", "train.warmup_epochs=0", "train.num_workers=0"])
    assert rc == 0
    assert len(read_metrics(out / "metrics.jsonl")) >= 1
    model, names, pre = load_classifier(out / "model")
    assert len(names) == 16 and pre.resize == "full" and pre.grayscale and pre.img_size == 64
    report = json.loads((out / "eval" / "metrics.json").read_text())
    assert report["num_images"] == 32 and len(report["per_class"]) == 16
    # the preset asks for 16 classes: 15 folders is an error, not a silently smaller head (in a fresh folder: the
    # earlier run in out is refused first, before the data is read)
    (pages / "doc15" / "page0.png").unlink()
    (pages / "doc15" / "page1.png").unlink()
    (pages / "doc15").rmdir()
    with pytest.raises(ValueError, match="num_classes=16 but .* has 15 classes"):
        finetune(load_config(FinetuneConfig, CONFIGS / "finetune_rvlcdip_base.yaml", [
            "model=beit_tiny_patch16_224", f"data.train_dir={pages}", f"train.output_dir={tmp_path / 'run2'}"]))


def test_preset_configs_load():
    for name in ("finetune_base", "finetune_cifar10_small", "finetune_rvlcdip_base"):
        cfg = load_config(FinetuneConfig, CONFIGS / f"{name}.yaml", ["model=x", "data.train_dir=t"])
        assert cfg.train.weight_decay == 0.05
    base = load_config(FinetuneConfig, CONFIGS / "finetune_base.yaml", ["model=x", "data.train_dir=t"])
    assert (base.train.lr, base.train.epochs, base.train.warmup_epochs, base.train.layer_decay, base.drop_path,
            base.mixup, base.cutmix, base.smoothing, base.data.reprob, base.ref_batch) == \
        (4e-3, 100, 20, 0.65, 0.1, 0.8, 1.0, 0.1, 0.25, 1024)
    with pytest.raises(ConfigError, match="model"):
        load_config(FinetuneConfig, CONFIGS / "finetune_base.yaml", ["data.train_dir=t"])




def _cifar_preset_args(out: Path, *extra: str) -> list[str]:
    return ["finetune", "-c", "finetune_cifar10_small", *TINY_OVERRIDES, f"train.output_dir={out}",
            "train.num_workers=0", "train.batch_size=16", "train.warmup_epochs=0", *extra]


@pytest.mark.parametrize("in_memory", ["true", "false"])
def test_folder_without_class_subfolders_is_refused_before_any_work(squares, tmp_path, capsys, in_memory):
    """One class's folder as data.train_dir (or data.val_dir) trained a 0-class model, then failed with "too many
    values to unpack"; now one line names the key, the folder, the layout it needs and what it holds."""
    flat = squares / "train" / "c0"
    for val in ("data.val_dir=''", f"data.val_dir={squares / 'val'}"):
        out = tmp_path / f"run_{len(val)}"
        rc = cli_main(_cifar_preset_args(out, f"data.in_memory={in_memory}", f"data.train_dir={flat}", val))
        err = capsys.readouterr().err
        assert rc == 1
        assert (f"beit finetune: error: config key 'data.train_dir': '{flat}' has 32 images but no class "
                f"sub-folders: the ImageFolder layout <dir>/<class>/<image> is needed") in err, err
        assert "found 32 images directly in it (0.png, 1.png, 10.png and 29 more)" in err, err
        assert not (out / "metrics.jsonl").exists()
    rc = cli_main(_cifar_preset_args(tmp_path / "val", f"data.in_memory={in_memory}",
                                     f"data.train_dir={squares / 'train'}", f"data.val_dir={squares / 'val' / 'c1'}"))
    err = capsys.readouterr().err
    assert rc == 1 and "config key 'data.val_dir': " in err and "has 8 images but no class sub-folders" in err, err
    # one class sub-folder (loose images beside it): refused, a 1-class classifier learns nothing
    mixed = tmp_path / "mixed"
    shutil.copytree(squares / "train" / "c0", mixed / "one")
    shutil.copy(squares / "train" / "c1" / "0.png", mixed / "loose.png")
    rc = cli_main(_cifar_preset_args(tmp_path / "one", f"data.in_memory={in_memory}", f"data.train_dir={mixed}",
                                     "data.val_dir=''"))
    err = capsys.readouterr().err
    assert rc == 1 and f"config key 'data.train_dir': '{mixed}' has one class sub-folder ('one')" in err, err


@pytest.mark.parametrize("rank, warned", [("0", True), ("1", False)])
def test_loose_images_beside_class_folders_are_named_as_unused(squares, tmp_path, beit_warnings, monkeypatch,
                                                               rank: str, warned: bool):
    """Named in one warning; under torchrun by rank 0 alone (every rank checks the same folder: each said it)."""
    from beit.tasks.classify.data import check_image_folders

    data = tmp_path / "data"
    shutil.copytree(squares / "train", data)
    shutil.copy(squares / "train" / "c1" / "0.png", data / "loose.png")
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    check_image_folders(FinetuneConfig().data.__class__(train_dir=str(data)))
    assert any("1 images directly in it (e.g. loose.png) belong to no class sub-folder and are not used"
               in r.getMessage() for r in beit_warnings) == warned


@pytest.mark.parametrize("device", ["cpu", "gpu"])  # gpu: the batched device path (on CPU tensors without CUDA)
def test_in_memory_unreadable_files_are_counted_in_metrics(squares, tmp_path, beit_warnings, device):
    """With data.in_memory=true unreadable files are left out at load: metrics.jsonl counts them as the file
    datasets count theirs (skipped_files_total in train records, one "split": "data" record per epoch, the drops in
    the first), and the warning says they are left out, not replaced."""
    data = tmp_path / "data"
    shutil.copytree(squares / "train", data)
    for c in ("c1", "c2", "c3"):
        (data / c / "zz_broken.png").write_bytes(b"not an image")
    out = tmp_path / "run"
    res = finetune(load_config(FinetuneConfig, CONFIGS / "finetune_cifar10_small.yaml", [
        *TINY_OVERRIDES, f"data.train_dir={data}", "data.val_dir=''", f"data.device={device}",
        f"train.output_dir={out}", "train.num_workers=0", "train.batch_size=16", "train.epochs=2",
        "train.warmup_epochs=0", "train.log_every=2"]))
    assert res["step"] == 16 and res["skipped_files"] == 3
    rows = read_metrics(out / "metrics.jsonl", split="data")
    assert [(r["epoch"], r["skipped_files"], r["skipped_files_total"]) for r in rows] == [(0, 3, 3), (1, 0, 3)]
    assert all(r["skipped_files_total"] == 3 for r in read_metrics(out / "metrics.jsonl"))
    named = [r.getMessage() for r in beit_warnings
             if "zz_broken.png" in r.getMessage() and not r.getMessage().startswith("data: ")]  # the summary below
    assert len(named) == 3 and all("left out of the images decoded into memory" in m for m in named), named
    assert not any("replacement sample" in r.getMessage() for r in beit_warnings)
    if device == "gpu":  # the device path's decoder summary agrees with skipped_files
        assert res["data_decode"]["skipped"] == 3


def test_predict_a_single_image_file(trained, squares, tmp_path, capsys):
    """`beit predict CKPT IMAGE` takes one image file, as `segment predict` and `layout predict` do."""
    image = squares / "val" / "c2" / "3.png"
    assert cli_main(["predict", trained["model_dir"], str(image), "--out", str(tmp_path / "one.csv"),
                     "--topk", "2", "--num-workers", "0"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "one.csv")))
    assert len(rows) == 1 and rows[0]["path"] == "3.png" and rows[0]["label_1"] in {"c0", "c1", "c2", "c3"}
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert json.loads(printed[-1])["num_images"] == 1
    res = predict_folder(trained["model_dir"], image, tmp_path / "api.csv", topk=1, num_workers=0)
    assert res["num_images"] == 1 and res["num_skipped"] == 0
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    before = (tmp_path / "one.csv").read_text()
    assert cli_main(["predict", trained["model_dir"], str(broken), "--out", str(tmp_path / "one.csv"),
                     "--num-workers", "0"]) == 1
    err = capsys.readouterr().err
    assert f"'{broken}' could not be read as an image: unreadable: UnidentifiedImageError" in err
    assert err.count("UnidentifiedImageError") == 1  # said once, in the error line
    assert (tmp_path / "one.csv").read_text() == before and not list(tmp_path.glob(".*.tmp"))  # CSV kept
    assert cli_main(["predict", trained["model_dir"], str(tmp_path / "missing.png"), "--num-workers", "0"]) == 1
    assert "no such image file or folder" in capsys.readouterr().err


def test_a_missing_or_file_train_dir_names_its_key() -> None:
    """data.train_dir=/nonexistent (or a file) named the folder but not the key."""
    from beit.engine.config import ConfigError as _ConfigError
    from beit.tasks.classify.config import DataConfig as _DataConfig
    from beit.tasks.classify.data import check_image_folders

    for path, problem in (("/nonexistent/x", "image folder does not exist"), ("/etc/passwd", "got a file")):
        with pytest.raises(_ConfigError) as info:
            check_image_folders(_DataConfig(train_dir=path))
        assert str(info.value).startswith("config key 'data.train_dir': ") and problem in str(info.value)


def test_img_size_and_an_earlier_run_are_refused_before_the_data_is_read(squares, tmp_path, monkeypatch):
    """The README's first-second promise: img_size against the preset's patch size and an output folder holding
    an earlier run are refused before the train and val folders are listed or decoded."""
    from beit.engine.rundir import RunExistsError
    from beit.tasks.classify import train as ft

    read: list[str] = []
    monkeypatch.setattr(ft, "build_datasets", lambda *a, **k: read.append("cpu"))
    monkeypatch.setattr(ft, "build_device_train", lambda *a, **k: read.append("device"))
    with pytest.raises(ConfigError, match=r"^config key 'img_size': 30 is not divisible by the model's patch size 4: "
                                          r"use a multiple of 4 \(e\.g\. 28 or 32\)$"):
        finetune(tiny_cfg(tmp_path / "a", squares, "img_size=30"))
    for bad in ("0", "-4"):  # was a ZeroDivisionError traceback / passed to fail after decoding
        with pytest.raises(ConfigError, match=r"^config key 'model_overrides.patch_size': must be a positive whole"):
            finetune(tiny_cfg(tmp_path / "p", squares, f"model_overrides.patch_size={bad}"))
    out = tmp_path / "b"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')  # an earlier run
    with pytest.raises(RunExistsError, match="holds an earlier run"):
        finetune(tiny_cfg(out, squares))
    assert read == []


def test_data_device_is_refused_before_the_run_folder_and_the_data(squares, tmp_path, monkeypatch):
    """A data.device typo, or gpu / batched with a recipe the device path lacks, is a config error when the config
    is read, as pre-training's: it was raised when the training data was built, after the run folder was made."""
    from beit.tasks.classify import train as ft

    read: list[str] = []
    monkeypatch.setattr(ft, "build_datasets", lambda *a, **k: read.append("cpu"))
    monkeypatch.setattr(ft, "build_device_train", lambda *a, **k: read.append("device"))
    for i, extra in enumerate([("data.device=Batched",), ("data.device=batched", "data.grayscale=true")]):
        out = tmp_path / f"run{i}"
        with pytest.raises(ConfigError, match=r"^config key 'data\.device': "):
            finetune(tiny_cfg(out, squares, *extra))
        assert not out.exists()
    assert read == []


def test_img_size_of_a_checkpoint_names_its_key(tmp_path):
    """A checkpoint's patch size is known once it is read: the same error, naming img_size."""
    ckpt = tiny_pretrain_checkpoint(tmp_path / "ckpt")
    cfg = load_config(FinetuneConfig, None, [f"model={ckpt}", "img_size=30", f"train.output_dir={tmp_path / 'o'}"])
    with pytest.raises(ConfigError, match=r"^config key 'img_size': 30 is not divisible by the model's patch size"):
        build_model(cfg, 3)
