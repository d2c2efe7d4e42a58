"""Layout detection: pyramid shapes, a training step, COCO evaluation, bad annotations, predictions (CPU, tiny)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

pytest.importorskip("pycocotools")

from beit.tasks.layout import (  # noqa: E402
    BeitPyramidBackbone,
    CocoLayoutDataset,
    DetectorConfig,
    LayoutDataError,
    build_detector,
    default_out_indices,
    evaluate_coco,
    format_table,
    split_image_ids,
    write_synthetic_pages,
)

TINY = {"depth": 2, "embed_dim": 32, "num_heads": 2, "img_size": 64}
TINY_OVERRIDES = [
    "model.arch=beit_tiny_patch16_224", "model.backbone_overrides={depth: 2, embed_dim: 32, num_heads: 2, img_size: 64}",
    "model.fpn_channels=32", "model.box_head_dim=64", "model.mask_head_dim=16", "model.min_size_test=96",
    "model.max_size_test=160", "data.min_sizes=[96,112]", "data.max_size=160", "data.crop_prob=0",
    "train.max_steps=2", "train.warmup_steps=0", "train.batch_size=2", "train.num_workers=0", "eval_workers=0",
    "train.log_every=1",
]


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the tests share 2 cores
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    d = tmp_path_factory.mktemp("pages")
    return write_synthetic_pages(d, num_pages=2, size=(96, 128))


def test_out_indices_follow_the_reference():
    assert default_out_indices(12) == (3, 5, 7, 11)
    assert default_out_indices(24) == (7, 11, 15, 23)


@pytest.mark.parametrize("patch", [16, 8])
def test_pyramid_shapes_strides_4_to_64(patch):
    import beit

    body = beit.create_model("beit_tiny_patch16_224", head="none", patch_size=patch, **TINY)
    bb = BeitPyramidBackbone(body, out_channels=24, norm="gn").eval()
    assert bb.size_divisible == 32
    with torch.no_grad():
        feats = bb(torch.randn(2, 3, 96, 160))  # not the model's 64x64: rel-pos is resampled on the fly
    assert list(feats) == ["0", "1", "2", "3", "pool"]
    for (name, f), stride in zip(feats.items(), (4, 8, 16, 32, 64)):
        assert f.shape == (2, 24, math.ceil(96 / stride), math.ceil(160 / stride)), name


def test_layer_decay_hooks():
    cfg = DetectorConfig(arch="beit_tiny_patch16_224", backbone_overrides=TINY, fpn_channels=16, box_head_dim=16,
                         mask_head_dim=8)
    m = build_detector(cfg, ["text", "figure"])
    assert m.num_layers == 2 and cfg.backbone["depth"] == 2 and cfg.category_ids == [1, 2]
    assert m.layer_id("detector.backbone.body.patch_embed.proj.weight") == 0
    assert m.layer_id("detector.backbone.body.blocks.1.attn.qkv.weight") == 2
    assert m.layer_id("detector.backbone.fpn.layer_blocks.0.0.weight") == 3
    assert m.layer_id("detector.roi_heads.box_predictor.cls_score.weight") == 3
    assert "relative_position_bias_table" in m.no_weight_decay()


def test_dataset_samples_are_seeded_and_consistent(pages):
    ds = CocoLayoutDataset(pages, pages.parent / "images", train=True, with_masks=True, min_sizes=(96, 160),
                           max_size=200, flip_prob=0.5, crop_prob=0.5, seed=3)
    a, ta = ds[1]
    b, tb = ds[1]
    assert torch.equal(a, b) and torch.equal(ta["boxes"], tb["boxes"])
    assert a.dtype == torch.uint8 and a.shape[0] == 3
    for epoch in range(3):
        ds.set_epoch(epoch)
        img, t = ds[0]
        H, W = img.shape[1:]
        assert t["masks"].shape == (len(t["boxes"]), H, W)
        assert (t["boxes"][:, 2:] > t["boxes"][:, :2]).all()
        assert (t["boxes"][:, 0::2] <= W).all() and (t["boxes"][:, 1::2] <= H).all()
        for box, mask in zip(t["boxes"], t["masks"]):  # each mask lies in its (transformed) box
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert xs.min() >= box[0] - 1 and xs.max() <= box[2] + 1 and ys.min() >= box[1] - 1 and ys.max() <= box[3] + 1


def test_augmented_boxes_stay_on_their_ink(pages):
    """Crop, resize and flip move pixels and boxes together: synthetic blocks are dark, the page is white."""
    from beit.tasks.layout import RepeatedDataset

    ds = CocoLayoutDataset(pages, pages.parent / "images", train=True, min_sizes=(80, 144), max_size=200,
                           flip_prob=0.5, crop_prob=0.5, seed=1)
    rep = RepeatedDataset(ds, 2)
    rep.set_epoch(1)
    seen = set()
    for i in range(len(rep)):
        img, t = rep[i]
        seen.add((tuple(img.shape), round(float(t["boxes"].sum()), 2)))
        gray = img.float().mean(0)
        for x0, y0, x1, y1 in t["boxes"].round().int().tolist():
            inner = gray[y0 + 1:y1 - 1, x0 + 1:x1 - 1]
            if inner.numel() > 4:
                assert inner.mean() < 140, (i, (x0, y0, x1, y1))
    assert len(seen) == 4  # the two passes over the two pages drew different augmentations


def test_grayscale_pages_become_rgb(tmp_path):
    ann = write_synthetic_pages(tmp_path, num_pages=1, size=(64, 80), grayscale=True)
    img, t = CocoLayoutDataset(ann, tmp_path / "images")[0]
    assert img.shape == (3, 80, 64) and len(t["boxes"]) > 0


def test_split_is_deterministic_and_disjoint(tmp_path):
    ann = write_synthetic_pages(tmp_path, num_pages=6, size=(32, 48))
    tr, va = split_image_ids(ann, 2)
    assert (tr, va) == split_image_ids(ann, 2) and len(va) == 2 and not set(tr) & set(va)
    assert sorted(tr + va) == list(range(1, 7))


def _bad_file(tmp_path):
    ann = write_synthetic_pages(tmp_path, num_pages=2, size=(64, 80))
    data = json.loads(ann.read_text())
    data["images"].append({"id": 3, "file_name": "missing.png", "width": 64, "height": 80})
    empty = tmp_path / "images" / "page_empty.png"  # a page of its own (one file under two ids is a problem too)
    empty.write_bytes((tmp_path / "images" / data["images"][0]["file_name"]).read_bytes())
    data["images"].append({"id": 4, "file_name": empty.name, "width": 64, "height": 80})  # a page without boxes
    nxt = max(a["id"] for a in data["annotations"]) + 1
    data["annotations"] += [
        {"id": nxt, "image_id": 3, "category_id": 1, "bbox": [1, 1, 10, 10], "iscrowd": 0},  # image file missing
        {"id": nxt + 1, "image_id": 1, "category_id": 7, "bbox": [1, 1, 10, 10], "iscrowd": 0},  # unknown category
        {"id": nxt + 2, "image_id": 1, "category_id": 1, "bbox": [50, 70, 40, 40], "iscrowd": 0},  # clipped
        {"id": nxt + 3, "image_id": 2, "category_id": 2, "bbox": [10, 10, 0, 5], "iscrowd": 0},  # degenerate
        {"id": nxt + 4, "image_id": 99, "category_id": 1, "bbox": [1, 1, 5, 5], "iscrowd": 0},  # no such image
        {"id": nxt + 5, "image_id": 2, "category_id": 1, "bbox": [1, "x", 5, 5], "iscrowd": 0},  # malformed
    ]
    ann.write_text(json.dumps(data))
    return ann, nxt


def test_bad_annotations_are_skipped_and_counted(tmp_path):
    ann, _ = _bad_file(tmp_path)
    ds = CocoLayoutDataset(ann, tmp_path / "images", train=True, with_masks=True, min_sizes=(64,), max_size=128)
    r = ds.report
    assert (r["missing_image"], r["unknown_category"], r["clipped_boxes"], r["degenerate_boxes"]) == (1, 1, 1, 1)
    assert (r["unknown_image"], r["bad_bbox"], r["anns_of_skipped_images"], r["empty_pages"]) == (1, 1, 1, 1)
    assert len(ds) == 3 and "missing.png" in " ".join(ds.problems)
    for i in range(len(ds)):  # every kept page loads, the empty one as a negative
        img, t = ds[i]
        assert t["boxes"].shape[1] == 4 and t["masks"].shape[0] == len(t["boxes"])
    assert any(len(ds[i][1]["boxes"]) == 0 for i in range(len(ds)))
    assert float(max(b[2] for i in range(len(ds)) for b in ds[i][1]["boxes"])) <= 64


def test_bad_annotations_raise_when_asked(tmp_path):
    ann, nxt = _bad_file(tmp_path)
    with pytest.raises(LayoutDataError, match="missing.png"):
        CocoLayoutDataset(ann, tmp_path / "images", on_bad="error")
    data = json.loads(ann.read_text())
    data["images"] = [im for im in data["images"] if im["id"] != 3]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 3]
    ann.write_text(json.dumps(data))
    with pytest.raises(LayoutDataError, match=f"annotation {nxt + 1} .*category id 7"):
        CocoLayoutDataset(ann, tmp_path / "images", on_bad="error")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoLayoutDataset(tmp_path / "nope.json", tmp_path / "images")


def test_an_annotation_file_without_a_usable_box_is_refused(tmp_path):
    """'annotations': [] (or every box left out) trained on nothing and scored an all-'-' table with exit 0."""
    ann, _ = _bad_file(tmp_path)
    data = json.loads(ann.read_text())
    data["annotations"] = []
    ann.write_text(json.dumps(data))
    with pytest.raises(LayoutDataError, match=r"no usable box on its 3 pages \(its 'annotations' list is empty\)"):
        CocoLayoutDataset(ann, tmp_path / "images", train=True)
    data["annotations"] = [{"id": 1, "image_id": data["images"][0]["id"], "category_id": 999, "bbox": [1, 1, 5, 5]}]
    ann.write_text(json.dumps(data))
    with pytest.raises(LayoutDataError, match=r"all 1 annotations left out: .*unknown_category"):
        CocoLayoutDataset(ann, tmp_path / "images")


def test_page_broken_after_build_is_replaced_in_training_and_named_in_eval(tmp_path):
    ann = write_synthetic_pages(tmp_path, num_pages=2, size=(64, 80))
    train = CocoLayoutDataset(ann, tmp_path / "images", train=True, min_sizes=(64,), max_size=128)
    val = CocoLayoutDataset(ann, tmp_path / "images")
    broken = tmp_path / "images" / "page_000.png"
    broken.write_bytes(broken.read_bytes()[:60])  # header intact, pixels gone
    img, t = train[0]  # page 1 instead, with a warning
    assert int(t["image_id"]) == 2 and train.report["unreadable_at_load"] == 1
    with pytest.raises(LayoutDataError, match="page_000.png"):
        val[0]


def test_broken_pages_are_remembered_and_counted_once_per_replaced_sample(tmp_path, beit_warnings, monkeypatch):
    ann = write_synthetic_pages(tmp_path, num_pages=3, size=(64, 80))
    train = CocoLayoutDataset(ann, tmp_path / "images", train=True, min_sizes=(64,), max_size=128)
    for name in ("page_000.png", "page_001.png"):  # two bad pages in a row, found only at load time
        broken = tmp_path / "images" / name
        broken.write_bytes(broken.read_bytes()[:60])
    reads: list[int] = []
    load = train.load_image
    monkeypatch.setattr(train, "load_image", lambda i: reads.append(i) or load(i))
    _, t = train[0]  # page 2 after two bad pages: one replaced sample
    assert int(t["image_id"]) == 3 and train.skipped_count(0) == 1 and train.skipped_count() == 1
    assert train.report["unreadable_at_load"] == 2 and len(beit_warnings) == 2
    train.set_epoch(1)
    for index in (0, 1):  # known-bad pages: not decoded nor warned about again, one skip per sample
        _, t = train[index]
        assert int(t["image_id"]) == 3
    assert train.skipped_count(1) == 2 and train.skipped_count() == 3
    assert train.report["unreadable_at_load"] == 2 and len(beit_warnings) == 2
    assert reads == [0, 1, 2, 2, 2]


def test_all_pages_broken_at_load_raise_layout_data_error(tmp_path):
    ann = write_synthetic_pages(tmp_path, num_pages=2, size=(64, 80))
    train = CocoLayoutDataset(ann, tmp_path / "images", train=True, min_sizes=(64,), max_size=128)
    for name in ("page_000.png", "page_001.png"):
        broken = tmp_path / "images" / name
        broken.write_bytes(broken.read_bytes()[:60])
    for _ in range(2):  # again once every page is known bad
        with pytest.raises(LayoutDataError, match=r"annotations.json: none of the 2 pages of .*images can be read; "
                                                  r"first failures: .*page_000.png.*page_001.png"):
            train[1]
    assert train.skipped_count() == 0 and train.report["unreadable_at_load"] == 2


def test_coco_eval_perfect_is_one_and_empty_is_zero(pages):
    ds = CocoLayoutDataset(pages, pages.parent / "images")
    gt = ds.coco_gt()
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0,
                "segmentation": a["segmentation"]} for a in gt.dataset["annotations"]]
    m = evaluate_coco(gt, perfect, ("bbox", "segm"))
    for key in ("bbox/AP", "bbox/AP50", "bbox/AP75", "bbox/AP/text", "bbox/AP/figure", "segm/AP"):
        assert m[key] == pytest.approx(1.0), key
    m0 = evaluate_coco(gt, [], ("bbox",))
    assert m0["bbox/AP"] == 0.0 and m0["bbox/AP/text"] == 0.0
    only_text = [r for r in perfect if r["category_id"] == 1]
    m1 = evaluate_coco(gt, only_text, ("bbox",))
    assert m1["bbox/AP/text"] == pytest.approx(1.0) and m1["bbox/AP/figure"] == 0.0
    table = format_table(m, ds.class_names, reference="publaynet")
    assert "overall" in table and "text" in table and "0.934" in table


def test_docbank_preset_anchors_fit_text_lines_and_its_pages_train(pages, tmp_path):
    """DocBank's regions are mostly wide, thin and small: the preset's anchors give a text line an RPN positive
    (IoU >= 0.5) where DiT's (32-512 px, ratios 0.5 / 1 / 2) leave it below the 0.3 of a negative; a step of
    the preset's detector (5 anchors a location, Faster R-CNN) trains."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import box_iou

    from beit.configs import preset_path
    from beit.engine.config import load_config
    from beit.tasks.layout import LayoutConfig, train

    cfg = load_config(LayoutConfig, preset_path("layout_docbank"),
                      [*TINY_OVERRIDES, f"data.train_ann={pages}", "data.holdout=0", "train.eval_every=0",
                       f"train.output_dir={tmp_path / 'run'}"])
    assert not cfg.model.mask_head
    model = build_detector(cfg.model, ["text", "figure"])
    cells = torch.cat(model.detector.rpn.anchor_generator.cell_anchors)  # every size and ratio, centred on 0
    lines = torch.tensor([[-200.0, -6, 200, 6], [-150, -10, 150, 10], [-60, -5, 60, 5]])  # 400x12, 300x20, 120x10
    assert (box_iou(lines, cells).max(1).values >= 0.5).all()
    dit = AnchorGenerator(tuple((s,) for s in (32, 64, 128, 256, 512)), ((0.5, 1.0, 2.0),) * 5)
    assert (box_iou(lines, torch.cat(dit.cell_anchors)).max(1).values < 0.3).all()
    assert model.detector.rpn.head.cls_logits.out_channels == 5
    result = train(cfg)
    assert result["step"] == 2 and math.isfinite(result["train/loss"]) and "train/mask" not in result


def test_train_eval_predict_end_to_end(pages, tmp_path, capsys):
    from beit.cli import main
    from beit.engine.config import load_config
    from beit.tasks.layout import LayoutConfig, train

    out = tmp_path / "run"
    cfg = load_config(LayoutConfig, None, [*TINY_OVERRIDES, f"data.train_ann={pages}", f"data.val_ann={pages}",
                                           f"train.output_dir={out}"])
    result = train(cfg)
    assert result["step"] == 2 and math.isfinite(result["train/loss"])
    for part in ("classifier", "box_reg", "objectness", "rpn_box_reg", "mask"):
        assert math.isfinite(result[f"train/{part}"])
    assert "bbox AP" in result["table"] and (out / "ap_table.txt").is_file() and (out / "last.pt").is_file()

    assert main(["layout", "eval", "--ckpt", str(out / "last.pt"), "--out", str(tmp_path / "ev")]) == 0
    assert "overall" in capsys.readouterr().out
    assert "bbox/AP" in json.loads((tmp_path / "ev" / "metrics.json").read_text())

    pred = tmp_path / "pred"
    assert main(["layout", "predict", "--ckpt", str(out / "last.pt"), "--out", str(pred), "--score-thresh", "0.0",
                 str(pages.parent / "images"), "model.score_thresh=0.0"]) == 0
    pngs = sorted(pred.glob("*.png"))
    assert len(pngs) == 2
    results = json.loads((pred / "results.json").read_text())
    assert isinstance(results, list) and all({"image_id", "category_id", "bbox", "score"} <= set(r) for r in results)
    assert json.loads((pred / "pages.json").read_text())["categories"][0]["name"] == "text"

    assert main(["layout", "eval", "--ckpt", str(tmp_path / "nope.pt")]) == 1  # user error: one line
    assert "nope.pt" in capsys.readouterr().err
    assert main(["layout", "eval", "--ckpt", str(out / "last.pt"), "--ema"]) == 1  # no EMA weights: said
    assert "--ema, but it has no EMA weights" in capsys.readouterr().err
    assert main(["layout", "predict", "--ckpt", str(out / "last.pt"), str(tmp_path), "--score-thresh", "5"]) == 1
    assert "--score-thresh is a detection score, in [0, 1]; got 5.0" in capsys.readouterr().err


def test_a_json_size_unlike_the_files_names_the_page_and_keeps_its_boxes(tmp_path, beit_warnings):
    """Boxes are taken in the file's pixels before they are clipped: a wrong JSON width loses no box of the real
    page, a JSON size of a resized file rescales them, and the warning names the page and both sizes."""
    ann = write_synthetic_pages(tmp_path, num_pages=2, size=(96, 128))
    data = json.loads(ann.read_text())
    nxt = max(a["id"] for a in data["annotations"]) + 1
    data["annotations"].append({"id": nxt, "image_id": 1, "category_id": 2, "bbox": [60, 20, 30, 10], "iscrowd": 0,
                                "segmentation": [[60, 20, 90, 20, 90, 30, 60, 30]], "area": 300})
    ann.write_text(json.dumps(data))
    good = CocoLayoutDataset(ann, tmp_path / "images", with_masks=True)
    data["images"][0]["width"] = 48  # wrong: page 1's boxes are in its file's pixels, some right of x=48
    data["images"][1].update(width=192, height=256)  # page 2's file was halved after annotating
    for a in data["annotations"]:
        if a["image_id"] == 2:
            a["bbox"], a["area"] = [2 * v for v in a["bbox"]], 4 * a["area"]
            a["segmentation"] = [[2 * v for v in p] for p in a["segmentation"]]
    ann.write_text(json.dumps(data))
    ds = CocoLayoutDataset(ann, tmp_path / "images", with_masks=True)
    assert ds.report["size_mismatch"] == 2 and ds.report["boxes"] == good.report["boxes"]
    assert "degenerate_boxes" not in ds.report
    for i in range(2):
        (img, t), (img0, t0) = ds[i], good[i]
        assert img.shape == img0.shape
        torch.testing.assert_close(t["boxes"], t0["boxes"])
        assert torch.equal(t["masks"], t0["masks"])
    gt, gt0 = ds.coco_gt(), good.coco_gt()
    for a, a0 in zip(gt.dataset["annotations"], gt0.dataset["annotations"]):
        assert a["bbox"] == pytest.approx(a0["bbox"]) and a["area"] == pytest.approx(a0["area"])
    warned = " ".join(r.getMessage() for r in beit_warnings)
    assert ("size_mismatch: image 1 'page_000.png': the JSON says 48x128 but the file is 96x128; its boxes reach "
            "x=90") in warned and "file's pixels" in warned
    assert any("image 2 'page_001.png': the JSON says 192x256 but the file is 96x128; its boxes are rescaled to the "
               "file's size" in p for p in ds.problems)


def test_a_warmup_as_long_as_the_run_is_refused_before_the_val_pages_are_read(pages, tmp_path, monkeypatch):
    """2 pages x data.repeat=4, batch 2: 4 steps an epoch, so warmup_epochs=2 is 8 steps, not shorter than
    max_steps=6. The trainer said so after the val set was read (every page header with data.check_images) and the
    detector built; now right after the training set."""
    import beit.tasks.layout.data as layout_data
    from beit.engine.config import ConfigError, load_config
    from beit.tasks.layout import LayoutConfig, train

    def no_val(cfg):
        raise AssertionError("the val pages were read before the run's steps were checked")

    monkeypatch.setattr(layout_data, "build_val_dataset", no_val)
    cfg = load_config(LayoutConfig, None, [*TINY_OVERRIDES, f"data.train_ann={pages}", f"data.val_ann={pages}",
                                           "data.repeat=4", "train.max_steps=6", "train.warmup_epochs=2",
                                           f"train.output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"^config key 'train.warmup_epochs': warmup \(8 steps\) must be shorter "
                                          r"than training \(6 steps\)$"):
        train(cfg)


def test_a_missing_annotation_file_or_image_folder_names_its_key(pages, tmp_path):
    from beit.engine.config import load_config
    from beit.tasks.layout import LayoutConfig, build_datasets

    def build(*overrides):
        return build_datasets(load_config(LayoutConfig, None, list(overrides)))

    with pytest.raises(FileNotFoundError, match=r"^data.train_ann=.*nope.json: no such file"):
        build(f"data.train_ann={tmp_path / 'nope.json'}")
    with pytest.raises(FileNotFoundError, match=r"^data.val_ann=.*val.json: no such file"):
        build(f"data.train_ann={pages}", f"data.val_ann={tmp_path / 'val.json'}")
    with pytest.raises(FileNotFoundError, match=r"^data.train_images=.*pics: no such folder"):
        build(f"data.train_ann={pages}", f"data.train_images={tmp_path / 'pics'}")


def test_layout_train_checks_its_files_before_the_ranks_join(pages, tmp_path, monkeypatch):
    """A missing annotation file or image folder was found after the process group was made, so under torchrun
    every rank printed it; it is checked before the group now (the CLI prints an error met there once)."""
    import importlib

    from beit.engine.config import load_config
    from beit.tasks.layout import LayoutConfig

    layout_train = importlib.import_module("beit.tasks.layout.train")  # the module (the package exports the function)

    def joined() -> None:
        raise AssertionError("the ranks joined their group before the files were checked")

    monkeypatch.setattr(layout_train, "init_distributed", joined)
    for overrides, said in (([f"data.train_ann={tmp_path / 'nope.json'}"], r"^data.train_ann=.*nope.json: no such"),
                            ([f"data.train_ann={pages}", f"data.val_ann={tmp_path / 'val.json'}"],
                             r"^data.val_ann=.*val.json: no such file"),
                            ([f"data.train_ann={pages}", f"data.train_images={tmp_path / 'pics'}"],
                             r"^data.train_images=.*pics: no such folder")):
        cfg = load_config(LayoutConfig, None, [*overrides, f"train.output_dir={tmp_path / 'run'}"])
        with pytest.raises(FileNotFoundError, match=said):
            layout_train.train(cfg)


def test_a_val_file_whose_category_names_differ_from_training_is_refused(tmp_path):
    """Evaluation matches the model's classes to the val file's categories by name: a val file with the training
    file's ids under other names is refused at build time, naming both lists (ids alone were compared)."""
    import json

    from beit.engine.config import ConfigError, load_config
    from beit.tasks.layout import LayoutConfig, build_datasets, write_synthetic_pages

    pages = write_synthetic_pages(tmp_path / "train")
    val = write_synthetic_pages(tmp_path / "val", seed=1)
    coco = json.loads(val.read_text())
    for c in coco["categories"]:
        c["name"] = c["name"] + "_renamed"
    val.write_text(json.dumps(coco))
    cfg = load_config(LayoutConfig, None, [*TINY_OVERRIDES, f"data.train_ann={pages}", f"data.val_ann={val}"])
    with pytest.raises(ConfigError, match=r"data.val_ann.*_renamed.*differ from training's.*names must match"):
        build_datasets(cfg)

def test_a_checkpoint_of_another_task_is_one_line_naming_both(tmp_path, capsys):
    """`layout eval` of a segmentation run's best.pt said "Key 'embed_dim' not in 'DetectorConfig'"."""
    from beit.cli import main
    from beit.engine.checkpoint import FORMAT, save_checkpoint
    from beit.engine.config import to_dict
    from beit.tasks.segmentation import SegmentConfig

    path = tmp_path / "seg" / "best.pt"
    save_checkpoint({"format": FORMAT, "version": 1, "model": {}, "config": to_dict(SegmentConfig())}, path)
    assert main(["layout", "eval", "--ckpt", str(path)]) == 1
    assert capsys.readouterr().err.strip() == (f"beit layout eval: error: {path} is a segmentation checkpoint, not a "
                                               "layout detection one: beit segment eval and beit segment predict take it")


def test_a_backbone_shape_equal_to_the_checkpoints_is_accepted_as_in_segmentation(tmp_path):
    """With model.init a shape override equal to the checkpoint's is fine, a different one names both values."""
    import beit
    from beit.engine.config import load_config
    from beit.tasks.layout import LayoutConfig

    beit.save_model(beit.create_model("beit_tiny_patch16_224", head="mim", **TINY), tmp_path / "pt")
    small = ["model.fpn_channels=32", "model.box_head_dim=64", "model.mask_head=false"]

    def detector(*overrides):
        cfg = load_config(LayoutConfig, None, [f"model.init={tmp_path / 'pt'}", *small, *overrides])
        return build_detector(cfg.model, ["text"], model_overrides=cfg.model_overrides)

    assert detector("model_overrides.embed_dim=32", "model_overrides.depth=2").body.embed_dim == 32
    with pytest.raises(ValueError, match=r"model_overrides.embed_dim=48 but .*pt has embed_dim=32"):
        detector("model_overrides.embed_dim=48")


def test_model_init_says_in_the_run_log_what_it_loaded(pages, tmp_path):
    """The checkpoint's loading report is written before the engine opens the run: it went nowhere (not even the
    console: the logger had no handler yet); now it is in the run's log.txt, as in pretrain and finetune."""
    import beit
    from beit.engine.config import load_config
    from beit.tasks.layout import LayoutConfig, train

    beit.save_model(beit.create_model("beit_tiny_patch16_224", head="mim", **TINY), tmp_path / "pt")
    out = tmp_path / "run"
    cfg = load_config(LayoutConfig, None, [*TINY_OVERRIDES, f"model.init={tmp_path / 'pt'}",
                                           f"data.train_ann={pages}", "data.holdout=0", "train.eval_every=0",
                                           f"train.output_dir={out}"])
    train(cfg)
    log = (out / "log.txt").read_text()
    assert f"{tmp_path / 'pt' / 'model.safetensors'}: loaded " in log and " tensors" in log, log[:2000]


def test_predict_finds_pages_in_sub_folders(tmp_path):
    """`layout predict DIR` skipped DIR/sub/*.jpg without a word (segment predict reads sub-folders)."""
    from beit.tasks.layout.predict import find_pages

    (tmp_path / "sub").mkdir()
    for p in (tmp_path / "a.png", tmp_path / "sub" / "b.jpg", tmp_path / "notes.txt"):
        p.write_bytes(b"x")
    assert find_pages([tmp_path]) == [tmp_path / "a.png", tmp_path / "sub" / "b.jpg"]


def test_duplicated_image_ids_are_an_error_naming_the_file_and_the_ids(tmp_path):
    """Two 'images' entries with one id were taken silently: the second page replaced the first and both pages'
    boxes were drawn on it."""
    ann = write_synthetic_pages(tmp_path, num_pages=8, size=(32, 48))
    data = json.loads(ann.read_text())
    data["images"][1]["id"] = 1
    ann.write_text(json.dumps(data))
    with pytest.raises(LayoutDataError, match=r"annotations.json: 1 image id given to more than one 'images' entry: "
                                              r"1 \(2 times\); image ids must be unique"):
        CocoLayoutDataset(ann, tmp_path / "images")
    data["images"] += [dict(im, file_name=f"copy_{im['id']}.png") for im in data["images"][2:]]  # 6 more twice
    ann.write_text(json.dumps(data))
    for build in (lambda: CocoLayoutDataset(ann, tmp_path / "images", image_ids=[1]),
                  lambda: split_image_ids(ann, 2)):
        with pytest.raises(LayoutDataError, match=rf"^{tmp_path / 'annotations.json'}: 7 image ids given to more than "
                                                  r"one 'images' entry: 1 \(2 times\), 3 \(2 times\), 4 \(2 times\), "
                                                  r"5 \(2 times\), 6 \(2 times\) and 2 more; image ids must be unique$"):
            build()


def test_one_page_file_under_two_image_ids_is_counted_warned_and_refused_when_asked(tmp_path, beit_warnings):
    """A page listed again under another id was taken silently: its boxes stayed with the first id and the second
    trained as a page without any region (only ``empty_pages 1`` said so). Now counted and named in the build-time
    warning; ``on_bad="error"`` refuses it."""
    ann = write_synthetic_pages(tmp_path, num_pages=3, size=(32, 48))
    data = json.loads(ann.read_text())
    first = data["images"][0]
    data["images"].append(dict(first, id=99, file_name="./" + first["file_name"]))  # the same file, spelt otherwise
    ann.write_text(json.dumps(data))
    said = rf"the page {first['file_name']} is listed under image ids {first['id']}, 99: list each page once"
    ds = CocoLayoutDataset(ann, tmp_path / "images")
    assert ds.report["page_listed_twice"] == 1 and len(ds) == 4
    assert any(re.search(said, r.getMessage()) for r in beit_warnings)
    with pytest.raises(LayoutDataError, match=rf"^{re.escape(str(ann))}: {said}"):
        CocoLayoutDataset(ann, tmp_path / "images", on_bad="error")


def test_annotations_of_unknown_image_ids_are_left_out_with_one_warning(tmp_path, beit_warnings):
    """With a split (data.holdout), annotations pointing at no image of the file were dropped without a word."""
    ann = write_synthetic_pages(tmp_path, num_pages=3, size=(64, 80))
    data = json.loads(ann.read_text())
    nxt = max(a["id"] for a in data["annotations"]) + 1
    data["annotations"] += [{"id": nxt + k, "image_id": i, "category_id": 1, "bbox": [1, 1, 5, 5], "iscrowd": 0}
                            for k, i in enumerate([99, 98, 99, "1", 97, 96, 95, 94])]  # "1" is not image 1
    ann.write_text(json.dumps(data))
    for ids in ([1, 2], None):
        beit_warnings.clear()
        ds = CocoLayoutDataset(ann, tmp_path / "images", image_ids=ids)
        assert ds.report["unknown_image"] == 8 and ds.report["boxes"] == sum(
            1 for a in data["annotations"] if a["image_id"] in (ids or [1, 2, 3]))
        assert len(beit_warnings) == 1
        msg = beit_warnings[0].getMessage()
        assert msg.startswith(f"{ann}: ") and "unknown_image 8" in msg
        assert ("left out 8 annotations whose image_id is not in 'images': image ids 99, 98, '1', 97, 96 and 2 "
                f"more (annotation ids {nxt}, {nxt + 1}, {nxt + 2} and 5 more)") in msg
    with pytest.raises(LayoutDataError, match=rf"annotation {nxt} points at image id 99, which is not in 'images'"):
        CocoLayoutDataset(ann, tmp_path / "images", image_ids=[1, 2], on_bad="error")


def test_under_torchrun_the_build_time_warning_is_rank_0s(tmp_path, beit_warnings, monkeypatch):
    """Every rank builds the same dataset from the same file: each gave the same build-time warning. Rank 0 gives
    it; another rank counts the same, quietly."""
    ann = write_synthetic_pages(tmp_path, num_pages=2, size=(64, 80))
    data = json.loads(ann.read_text())
    nxt = max(a["id"] for a in data["annotations"]) + 1
    data["annotations"].append({"id": nxt, "image_id": 99, "category_id": 1, "bbox": [1, 1, 5, 5], "iscrowd": 0})
    ann.write_text(json.dumps(data))
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, warned in (("1", 0), ("0", 1)):
        monkeypatch.setenv("RANK", rank)
        beit_warnings.clear()
        ds = CocoLayoutDataset(ann, tmp_path / "images")
        assert ds.report["unknown_image"] == 1 and len(beit_warnings) == warned, rank


@pytest.fixture(scope="module")
def tiny_ckpt(pages, tmp_path_factory):
    """A layout training checkpoint of an untrained tiny detector (no training: eval / predict read it back)."""
    from beit.engine.checkpoint import FORMAT, save_checkpoint
    from beit.engine.config import load_config, to_dict
    from beit.tasks.layout import LayoutConfig

    cfg = load_config(LayoutConfig, None, [*TINY_OVERRIDES, f"data.train_ann={pages}", f"data.val_ann={pages}"])
    model = build_detector(cfg.model, ["text", "figure"], model_overrides=cfg.model_overrides)
    path = tmp_path_factory.mktemp("ckpt") / "last.pt"
    save_checkpoint({"format": FORMAT, "version": 1, "model": model.state_dict(), "config": to_dict(cfg)}, path)
    return path


def test_layout_eval_and_predict_take_a_config_file_over_the_checkpoints(tiny_ckpt, pages, tmp_path, capsys):
    """`beit layout eval/predict -c FILE` was refused (unlike `segment eval/predict`): the file is merged over the
    checkpoint's stored config, then key=value overrides."""
    from beit.cli import main

    other = write_synthetic_pages(tmp_path / "other", num_pages=3, size=(96, 128))
    yaml = tmp_path / "eval.yaml"
    yaml.write_text(f"data:\n  val_ann: {other}\n  val_images: {other.parent / 'images'}\nmodel:\n"
                    "  category_ids: [5, 9]\neval_workers: 0\n")
    assert main(["layout", "eval", str(tiny_ckpt), "-c", str(yaml), "model.category_ids=[1,2]"]) == 0
    assert f"on {other} (3 pages" in capsys.readouterr().out  # the file's val_ann, not the checkpoint's
    assert main(["layout", "eval", str(tiny_ckpt), "--config", str(yaml), f"data.val_ann={pages}",
                 f"data.val_images={pages.parent / 'images'}", "model.category_ids=[1,2]"]) == 0
    assert f"on {pages} (2 pages" in capsys.readouterr().out  # overrides go over the file
    pred = tmp_path / "pred"
    assert main(["layout", "predict", str(tiny_ckpt), str(pages.parent / "images"), "-c", str(yaml),
                 "--out", str(pred)]) == 0
    cats = json.loads((pred / "pages.json").read_text())["categories"]
    assert [(c["id"], c["name"]) for c in cats] == [(5, "text"), (9, "figure")]
    assert main(["layout", "eval", str(tiny_ckpt), "-c", str(tmp_path / "nope.yaml")]) == 1
    assert "nope.yaml" in capsys.readouterr().err


def test_layout_predict_never_draws_over_the_pages(tmp_path, capsys):
    """`--out` the pages' own folder: page.png's drawing would be page.png itself. Refused before the checkpoint
    is read (a missing one here), the pages untouched; the names the helper gives stay the same elsewhere."""
    import shutil

    from beit.cli import main
    from beit.data.datasets import output_stems

    src = write_synthetic_pages(tmp_path / "p", num_pages=2, size=(96, 128)).parent / "images"
    pages = tmp_path / "pages"
    shutil.copytree(src, pages)
    before = {p.name: p.read_bytes() for p in pages.iterdir()}
    assert main(["layout", "predict", str(tmp_path / "missing.pt"), str(pages), "--out", str(pages)]) == 1
    err = capsys.readouterr().err
    assert "would be written over input images" in err and "missing.pt" not in err
    assert {p.name: p.read_bytes() for p in pages.iterdir()} == before
    files = sorted(pages.iterdir())
    assert output_stems(files, out_dir=tmp_path / "elsewhere") == [p.stem for p in files]
    with pytest.raises(ValueError, match=r"_overlay\.png"):  # segment predict's suffixes, an input of that name
        output_stems([pages / "a.png", pages / "a_overlay.png"], ("_overlay.png", "_labels.png"), out_dir=pages)


@pytest.mark.parametrize("images", [[{"id": "p1", "file_name": "a.png"}], [{"id": 1}, {"id": None}],
                                    [{"id": [1]}], [1, 2], [{"id": True}]])
def test_image_ids_that_are_not_integers_are_one_line_naming_the_file(tmp_path, images):
    from beit.tasks.layout.data import LayoutDataError, split_image_ids

    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": images, "annotations": [], "categories": [{"id": 1, "name": "text"}]}))
    with pytest.raises(LayoutDataError, match=r"ann\.json: 'images' entry \d has no integer id"):
        split_image_ids(ann, 1)


def test_layout_predict_replaces_only_its_own_outputs_and_skips_its_output_folder(tiny_ckpt, tmp_path, capsys):
    """A drawing may replace an earlier run's (pages.json there), never a file that is not one (page_000.png
    beside the page_000.jpg predicted); an --out below the pages' folder is not read back as pages next time."""
    import shutil

    from beit.cli import main
    from beit.data.datasets import output_stems

    src = write_synthetic_pages(tmp_path / "p", num_pages=2, size=(96, 128)).parent / "images"
    pages = tmp_path / "pages"
    shutil.copytree(src, pages)
    first = sorted(pages.glob("*.png"))[0]
    from PIL import Image

    Image.open(first).convert("RGB").save(first.with_suffix(".jpg"))
    before = first.read_bytes()
    assert main(["layout", "predict", str(tiny_ckpt), str(first.with_suffix(".jpg")), "--out", str(pages)]) == 1
    assert "no pages.json of an earlier run" in capsys.readouterr().err and first.read_bytes() == before
    first.with_suffix(".jpg").unlink()
    for _ in range(2):  # the second run must not take the first run's drawings in pages/preds for pages
        assert main(["layout", "predict", str(tiny_ckpt), str(pages), "--out", str(pages / "preds"),
                     "--score-thresh", "0"]) == 0, capsys.readouterr().err
        assert sorted(p.name for p in (pages / "preds").glob("*.png")) == sorted(p.name for p in src.glob("*.png"))
    assert output_stems([pages / first.name], out_dir=pages / "preds", manifest="pages.json") == [first.stem]


def test_compiled_blocks_trace_one_graph_a_block_for_any_number_of_page_sizes(monkeypatch):
    """Multi-scale pages change the token count nearly every step. The engine's regional compile (what
    ``train.compile=true`` does) must not compile per page size: each block's graph is dynamic in the token
    count from the first page on (a graph a block: each has its own drop-path rate) and no later size adds one.
    It was [6, 13, 14, 14, 14] here (2 x depth + 8 on BEiT-B's 12 blocks): each block split in three around the
    eager rel-pos resampling, those graphs static at the first size and recompiled dynamic at the next, and an
    empty one as each side of the grid turned dynamic in the rel-pos lookup."""
    import torch._dynamo
    from torch import nn
    from torch._dynamo.utils import counters

    from beit.engine import distributed as D

    inputs: list[bool] = []  # per graph: is any input symbolic (dynamic)?

    def counting_aot_eager(gm, example_inputs):
        inputs.append(_symbolic(gm))
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)  # the autograd trace too

    plain_compile = nn.Module.compile
    monkeypatch.setattr(nn.Module, "compile", lambda self, *a, **k: plain_compile(self, *a, backend=counting_aot_eager,
                                                                               **k))
    torch.manual_seed(0)
    cfg = DetectorConfig(arch="beit_tiny_patch16_224", backbone_overrides={**TINY, "depth": 3}, fpn_channels=16,
                         box_head_dim=16, mask_head=False, drop_path_rate=0.1)
    model = build_detector(cfg, ["text", "figure"]).train()
    depth = len(model.body.blocks)
    sizes = [(128, 160), (160, 224), (192, 256), (224, 320), (256, 288)]  # 5 grids: (8, 10) ... (16, 18)
    torch._dynamo.reset()
    counters.clear()
    graphs = []
    with torch._dynamo.config.patch(recompile_limit=8):  # compile_blocks raises it: restored on exit
        assert D.compile_blocks(model, "none") == "blocks"
        for h, w in sizes:
            target = {"boxes": torch.tensor([[4.0, 4, w / 2, 20], [8, 30, w - 8, 60]]), "labels": torch.tensor([1, 2])}
            sum(model([torch.rand(3, h, w)], [target]).values()).backward()
            graphs.append(counters["stats"]["unique_graphs"])
    torch._dynamo.reset()
    assert graphs == [depth] * len(sizes), graphs  # one graph a block at the first page size, none later
    assert inputs == [True] * depth  # all of them dynamic
    assert model.body.blocks[1].attn.relative_position_bias_table.grad is not None


def _symbolic(gm) -> bool:
    """Whether a dynamo graph takes a symbolic size (a dynamic-shape graph: its inputs' example values)."""
    values = [n.meta.get("example_value") for n in gm.graph.find_nodes(op="placeholder")]
    return any(isinstance(v, torch.SymInt) or (isinstance(v, torch.Tensor) and not all(isinstance(d, int) for d in v.shape))
               for v in values)


class _Oracle(torch.nn.Module):
    """A perfect detector of ``dataset``'s pages with its own classes (``class_names``: its label k is
    class_names[k - 1]): it returns each page's ground truth, in the DataLoader's order."""

    def __init__(self, dataset, class_names):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.class_names, self.has_masks = list(class_names), False
        outs = []
        for i in range(len(dataset)):
            t = dataset[i][1]
            names = [dataset.class_names[int(k) - 1] for k in t["labels"]]
            keep = [j for j, n in enumerate(names) if n in self.class_names]  # what the model cannot know is missed
            outs.append({"boxes": t["boxes"][keep], "scores": torch.ones(len(keep)),
                         "labels": torch.tensor([self.class_names.index(names[j]) + 1 for j in keep], dtype=torch.int64)})
        self._outs = outs

    def forward(self, images):
        return [self._outs.pop(0) for _ in images]


def _recategorized(pages, tmp_path, categories, keep=None):
    """``pages``' COCO file with new ``categories`` (name -> id) and only the annotations of the names in ``keep``."""
    data = json.loads(pages.read_text())
    old = {c["id"]: c["name"] for c in data["categories"]}
    keep = set(categories) if keep is None else set(keep)
    data["annotations"] = [dict(a, category_id=categories[old[a["category_id"]]]) for a in data["annotations"]
                           if old[a["category_id"]] in keep]
    data["categories"] = [{"id": i, "name": n} for n, i in categories.items()]
    path = tmp_path / f"other_{len(list(tmp_path.glob('other_*.json')))}.json"
    path.write_text(json.dumps(data))
    return path


def test_eval_maps_the_models_classes_to_the_files_categories_by_name(pages, tmp_path, beit_warnings):
    """A val file with the training names under other ids scored a perfect detector 0.077 (labels went through the
    file's own id order); one without a class of the model shifted the later ones or raised IndexError."""
    from beit.tasks.layout import evaluate_model

    images = pages.parent / "images"
    swapped = CocoLayoutDataset(_recategorized(pages, tmp_path, {"figure": 3, "text": 7}), images)
    m = evaluate_model(_Oracle(swapped, ["text", "figure"]), swapped)
    assert m["bbox/AP"] == pytest.approx(1.0) and m["bbox/AP/text"] == pytest.approx(1.0)
    assert not beit_warnings

    only_figure = CocoLayoutDataset(_recategorized(pages, tmp_path, {"figure": 2}), images)
    m = evaluate_model(_Oracle(only_figure, ["text", "figure"]), only_figure)  # the model's 'text' has no category
    assert m["bbox/AP"] == pytest.approx(1.0) and m["bbox/AP/figure"] == pytest.approx(1.0)
    assert len(beit_warnings) == 1
    assert beit_warnings[0].getMessage() == (f"{only_figure.ann_file}: the model's class 'text' is not a category of "
                                             "this file: its detections are left out of the scores")

    beit_warnings.clear()  # a category the model does not know: not scored (it would count as AP 0)
    more = CocoLayoutDataset(_recategorized(pages, tmp_path, {"text": 1, "figure": 2, "table": 4}, ["text", "figure"]),
                             images)
    m = evaluate_model(_Oracle(more, ["text", "figure"]), more)
    assert m["bbox/AP"] == pytest.approx(1.0) and math.isnan(m["bbox/AP/table"])
    assert len(beit_warnings) == 1
    assert beit_warnings[0].getMessage() == (f"{more.ann_file}: category 'table' (id 4) of this file is not a class "
                                             "of the model (text, figure): not scored")

    data = json.loads(pages.read_text())
    data["categories"] = [{"id": 1, "name": "caption"}, {"id": 2, "name": "footnote"}]
    (tmp_path / "renamed.json").write_text(json.dumps(data))
    other = CocoLayoutDataset(tmp_path / "renamed.json", images)
    with pytest.raises(LayoutDataError, match=r"renamed.json: none of its categories \(caption, footnote\) is a class "
                                              r"of the model \(text, figure\): nothing to score"):
        evaluate_model(_Oracle(other, ["text", "figure"]), other)


def test_layout_eval_of_a_file_with_fewer_classes_scores_the_shared_ones(tiny_ckpt, pages, tmp_path, capsys,
                                                                        beit_warnings):
    """PubLayNet's 5 classes against DocBank's 13 raised IndexError in predictions_to_coco."""
    from beit.cli import main

    only_figure = _recategorized(pages, tmp_path, {"figure": 1})
    assert main(["layout", "eval", str(tiny_ckpt), f"data.val_ann={only_figure}",
                 f"data.val_images={pages.parent / 'images'}", "model.score_thresh=0.0"]) == 0
    assert "figure" in capsys.readouterr().out
    assert any(r.getMessage() == f"{only_figure}: the model's class 'text' is not a category of this file: its "
               "detections are left out of the scores" for r in beit_warnings)


def test_layout_eval_applies_the_runs_page_size_limit(tiny_ckpt, pages, monkeypatch):
    """`layout eval` read pages under PIL's default decompression-bomb limit whatever data.max_image_pixels said."""
    from PIL import Image

    from beit.cli import main

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    assert main(["layout", "eval", str(tiny_ckpt), "data.max_image_pixels=123456789"]) == 0
    assert Image.MAX_IMAGE_PIXELS == 123456789

@pytest.mark.parametrize("override, key, says", [
    ("model.min_size_test=0", "model.min_size_test", "must be > 0, got 0"),
    ("model.max_size_test=0", "model.max_size_test", "must be > 0, got 0"),
    ("model.min_size_test=300 model.max_size_test=100", "model.min_size_test", r"must not exceed.*\(100\)"),
    ("model.aspect_ratios=[]", "model.aspect_ratios", "at least one anchor aspect ratio"),
    ("model.aspect_ratios=[-1.0,1.0]", "model.aspect_ratios", r"must be > 0.*\[-1.0, 1.0\]"),
    ("model.pixel_std=[0,0,0]", "model.pixel_std", r"must be > 0.*\[0.0, 0.0, 0.0\]"),
    ("data.crop_size=[600,384]", "data.crop_size", r"\(min, max\).*\[600, 384\]"),
    ("model.detections_per_img=0", "model.detections_per_img", "must be > 0, got 0"),
    ("vis_score_thresh=2", "vis_score_thresh", r"must be in \[0, 1\] \(a detection score\), got 2"),
])
def test_layout_config_values_that_fail_later_are_refused_naming_the_key(override, key, says):
    """Each was accepted: a traceback at the first step or the final evaluation, 'training diverged... lower the lr'
    (a negative aspect ratio, a zero pixel_std), every AP 0 (no detection kept) or no box drawn."""
    from beit.engine.config import ConfigError, load_config
    from beit.tasks.layout import LayoutConfig

    with pytest.raises(ConfigError, match=rf"^config key '{key}': .*{says}"):
        load_config(LayoutConfig, None, override.split())


def test_an_interrupted_predict_writes_the_json_of_the_pages_done(tiny_ckpt, tmp_path, beit_warnings, monkeypatch):
    """Ctrl-C, SIGTERM or an error (out of memory) part-way left the drawings but no results.json / pages.json."""
    import beit.tasks.layout.predict as layout_predict
    from beit.tasks.layout.model import load_detector

    src = write_synthetic_pages(tmp_path / "p", num_pages=3, size=(96, 128)).parent / "images"
    model, cfg = load_detector(tiny_ckpt, ["model.score_thresh=0.0"])
    forward = model.forward
    for stop in (KeyboardInterrupt(), RuntimeError("CUDA out of memory")):
        calls: list[int] = []

        def forward_until_stopped(images, targets=None, stop=stop, calls=calls):
            calls.append(1)
            if len(calls) == 3:
                raise stop
            return forward(images, targets)

        monkeypatch.setattr(model, "forward", forward_until_stopped)
        out = tmp_path / type(stop).__name__
        beit_warnings.clear()
        with pytest.raises(type(stop)):
            layout_predict.predict_pages(model, sorted(src.glob("*.png")), out, class_names=cfg.model.class_names,
                                         score_thresh=0.0)
        manifest = json.loads((out / "pages.json").read_text())
        assert manifest["partial"] is True and [im["id"] for im in manifest["images"]] == [1, 2]
        assert manifest["note"] == f"stopped by {type(stop).__name__} after 2 of 3 pages: the others were not predicted"
        results = json.loads((out / "results.json").read_text())
        assert results and {r["image_id"] for r in results} == {1, 2}
        assert [r.getMessage() for r in beit_warnings] == [
            f"{out}: stopped by {type(stop).__name__} after 2 of 3 pages: {out / 'results.json'} and "
            f"{out / 'pages.json'} hold those pages (\"partial\": true)"]
    monkeypatch.setattr(model, "forward", forward)
    done = layout_predict.predict_pages(model, sorted(src.glob("*.png")), tmp_path / "all",
                                        class_names=cfg.model.class_names)
    assert json.loads(open(done["pages"]).read())["partial"] is False


def test_layout_predict_stopped_by_sigterm_writes_the_pages_done_and_exits_143(tiny_ckpt, tmp_path, capsys,
                                                                               monkeypatch):
    import os
    import signal

    import beit.tasks.layout.predict as layout_predict
    from beit.cli import main

    src = write_synthetic_pages(tmp_path / "p", num_pages=3, size=(96, 128)).parent / "images"
    decode = layout_predict.decode_image
    calls: list[int] = []

    def decode_then_terminate(path):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs in this thread, before the next page
        return decode(path)

    def not_predict(signum, frame):  # without predict's own handler the test process would end: a Ctrl-C instead
        raise KeyboardInterrupt

    monkeypatch.setattr(layout_predict, "decode_image", decode_then_terminate)
    before = signal.signal(signal.SIGTERM, not_predict)
    try:
        code = main(["layout", "predict", str(tiny_ckpt), str(src), "--out", str(tmp_path / "pred")])
        assert signal.getsignal(signal.SIGTERM) is not_predict  # put back
    finally:
        signal.signal(signal.SIGTERM, before)
    assert code == 143 and capsys.readouterr().err.strip().endswith("beit layout predict: interrupted by SIGTERM")
    manifest = json.loads((tmp_path / "pred" / "pages.json").read_text())
    assert manifest["partial"] is True and len(manifest["images"]) == 1
    assert manifest["note"] == "stopped by SIGTERM after 1 of 3 pages: the others were not predicted"
    assert (tmp_path / "pred" / "results.json").is_file()


def test_layout_predict_leaves_out_an_earlier_runs_output_folder_below_the_pages(tiny_ckpt, tmp_path, capsys):
    """`predict CKPT pages --out pages/pred` then `predict CKPT pages --out pq` took pages/pred/*.png for pages: only
    the current --out was left out. A folder holding pages.json and results.json is an earlier run's: left out, said
    in one line; a folder with only one of the two (someone's own pages.json) is read as pages."""
    import shutil

    from beit.cli import main
    from beit.tasks.layout.predict import find_pages

    pages = tmp_path / "pages"
    shutil.copytree(write_synthetic_pages(tmp_path / "p", num_pages=2, size=(96, 128)).parent / "images", pages)
    assert main(["layout", "predict", str(tiny_ckpt), str(pages), "--out", str(pages / "pred")]) == 0
    (pages / "mine").mkdir()
    shutil.copy(pages / "page_000.png", pages / "mine" / "page_9.png")
    (pages / "mine" / "pages.json").write_text("{}")
    capsys.readouterr()
    assert main(["layout", "predict", str(tiny_ckpt), str(pages), "--out", str(tmp_path / "pq")]) == 0
    said = capsys.readouterr().out
    assert (f"{pages / 'pred'}: left out, it holds an earlier layout predict's outputs (pages.json, results.json)"
            in said.splitlines())
    listed = [im["file_name"] for im in json.loads((tmp_path / "pq" / "pages.json").read_text())["images"]]
    assert listed == [str(pages / "mine" / "page_9.png"), str(pages / "page_000.png"), str(pages / "page_001.png")]
    notes: list[str] = []
    assert find_pages([pages / "pred"], note=notes.append) == sorted((pages / "pred").glob("*.png")) and not notes


def test_layout_eval_refuses_an_out_that_is_a_file_before_evaluating(tiny_ckpt, tmp_path, capsys, monkeypatch):
    """`layout eval CKPT --out afile` failed only after the whole evaluation."""
    import beit.tasks.layout.evaluate as layout_evaluate
    from beit.cli import main

    def never(*args, **kwargs):
        raise AssertionError("evaluated before --out was checked")

    monkeypatch.setattr(layout_evaluate, "evaluate_model", never)
    afile = tmp_path / "afile"
    afile.write_text("mine")
    assert main(["layout", "eval", str(tiny_ckpt), "--out", str(afile)]) == 1
    assert capsys.readouterr().err.strip() == f"beit layout eval: error: --out {afile}: {afile} is a file, not a folder"
    assert afile.read_text() == "mine"


def test_layout_predict_says_when_it_wrote_no_detection(tiny_ckpt, tmp_path, capsys):
    """results.json is [] then, which pycocotools' loadRes cannot read: said, not left to a crash later."""
    from beit.cli import main

    src = write_synthetic_pages(tmp_path / "p", num_pages=1, size=(96, 128)).parent / "images"
    out = tmp_path / "pred"
    assert main(["layout", "predict", str(tiny_ckpt), str(src), "--out", str(out), "model.score_thresh=0.99"]) == 0
    assert json.loads((out / "results.json").read_text()) == []
    assert (f"no detections: {out / 'results.json'} is an empty list (pycocotools' COCO.loadRes cannot load one; "
            "a lower model.score_thresh keeps more)") in capsys.readouterr().out.splitlines()


def test_predict_brings_a_large_page_down_before_the_detector_and_maps_boxes_back(tiny_ckpt, tmp_path):
    """A 99 MP page peaked at ~4.9 GB: it became float at full size before the detector resized it. Now the uint8
    page is brought to the test size first; boxes and masks come back in the page's pixels. A page 4x the small
    one (each pixel 4x4) comes down to the small page exactly, so its boxes are 4x the small page's."""
    import numpy as np
    from PIL import Image

    from beit.tasks.layout.model import load_detector
    from beit.tasks.layout.predict import predict_pages

    src = write_synthetic_pages(tmp_path / "p", num_pages=1, size=(96, 128)).parent / "images" / "page_000.png"
    big = tmp_path / "big" / "page_000.png"
    big.parent.mkdir()
    Image.fromarray(np.asarray(Image.open(src).convert("RGB")).repeat(4, 0).repeat(4, 1)).save(big)  # 384 x 512
    model, cfg = load_detector(tiny_ckpt, ["model.score_thresh=0.0"])  # min_size_test 96, max_size_test 160
    seen: list[tuple[int, ...]] = []
    model.register_forward_pre_hook(lambda m, args: seen.extend(tuple(im.shape) for im in args[0]))
    runs = {}
    for name, page in (("small", src), ("big", big)):
        out = predict_pages(model, [page], tmp_path / f"out_{name}", class_names=cfg.model.class_names,
                            score_thresh=0.0)
        runs[name] = json.loads(open(out["results"]).read())
    assert seen == [(3, 128, 96), (3, 128, 96)]  # the big page came down in uint8, not at 512 x 384 in float
    small, large = runs["small"], runs["big"]
    assert len(small) == len(large) > 0
    for a, b in zip(small, large):
        assert b["score"] == pytest.approx(a["score"], abs=1e-4) and b["category_id"] == a["category_id"]
        assert b["bbox"] == pytest.approx([4 * v for v in a["bbox"]], abs=0.05)
        assert b["segmentation"]["size"] == [512, 384] and a["segmentation"]["size"] == [128, 96]
    assert Image.open(tmp_path / "out_big" / "page_000.png").size == (384, 512)


def test_overwrite_keeps_the_page_images_next_to_the_annotations(tmp_path, capsys):
    """`beit layout train data.train_ann=owd/annotations.json --out owd`, then the same with --overwrite, deleted
    owd/images: the data set's pages (data.train_images unset: the images/ next to data.train_ann). Those implied
    folders, train's and val's, are the run's inputs: an overwrite never deletes them."""
    from beit.cli import main
    from beit.engine.config import load_config
    from beit.engine.rundir import IMAGES_MARK
    from beit.tasks.layout import LayoutConfig
    from beit.tasks.layout.data import image_folders

    owd = tmp_path / "owd"
    ann = write_synthetic_pages(owd, num_pages=4, size=(96, 128))
    pages = {p.name: p.read_bytes() for p in (owd / "images").iterdir()}
    args = ["layout", "train", *TINY_OVERRIDES, "train.eval_every=0", f"data.train_ann={ann}", "data.holdout=2",
            "--out", str(owd)]
    assert main(args) == 0, capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0, capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (owd / "images").iterdir()} == pages
    assert main([*args, "train.max_steps=3", "--resume", "auto"]) == 0, capsys.readouterr().err  # not refused early
    # an images/ that was the engine's (marked) holding the pages: refused, naming the key the folder stands for
    (owd / "images" / IMAGES_MARK).write_text("")
    assert main([*args, "--overwrite"]) == 1
    assert (f"--overwrite would delete {owd / 'images'}, which overlaps this run's input "
            f"data.train_images={owd / 'images'}: nothing was deleted") in capsys.readouterr().err
    # the val pages next to data.val_ann, training on another file
    other = write_synthetic_pages(tmp_path / "other", num_pages=2, size=(96, 128))
    val = ["layout", "train", *TINY_OVERRIDES, f"data.train_ann={other}", f"data.val_ann={ann}", "--out", str(owd),
           "--overwrite"]
    assert main(val) == 1
    assert f"this run's input data.val_images={owd / 'images'}: nothing was deleted" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (owd / "images").iterdir() if p.name != IMAGES_MARK} == pages
    assert (owd / "last.pt").is_file()
    cfg = load_config(LayoutConfig, None, [f"data.train_ann={other}", f"data.val_ann={ann}",
                                           f"data.train_images={tmp_path}"])
    assert image_folders(cfg) == {"data.train_images": str(tmp_path), "data.val_images": str(owd / "images")}


def _edited(tmp_path, edit):
    ann = write_synthetic_pages(tmp_path, num_pages=2, size=(64, 80))
    data = json.loads(ann.read_text())
    edit(data)
    ann.write_text(json.dumps(data))
    return ann


@pytest.mark.parametrize("edit,message", [
    (lambda d: d["annotations"].insert(1, None), r"'annotations' entry 1 is None, not an object \(1 such entry"),
    (lambda d: d["categories"].append({"name": "table"}), r"'categories' entry 2 has no integer id \(its id is None"),
    (lambda d: d["categories"].append("table"), r"'categories' entry 2 has no integer id \(it is 'table', not an "),
    (lambda d: d["categories"].append({"id": 1, "name": "title"}), r"category id given to more than one 'categories' "
                                                                     r"entry: 1 \(2 times\)"),
    (lambda d: d["images"][0].update(id=2**70), r"'images' entry 0 .*1180591620717411303424"),  # beyond int64
])
def test_a_malformed_coco_entry_is_an_error_naming_the_file_and_the_entry(tmp_path, edit, message):
    """A null annotation crashed with AttributeError, a category without an id with KeyError, one that is not an
    object with TypeError: each is now a LayoutDataError naming the file and the entry, whatever data.on_bad."""
    ann = _edited(tmp_path, edit)
    for on_bad in ("skip", "error"):
        with pytest.raises(LayoutDataError, match=rf"^{ann}: {message}"):
            CocoLayoutDataset(ann, tmp_path / "images", on_bad=on_bad)


@pytest.mark.parametrize("edit,kind,message", [
    (lambda d: d["images"][1].update(file_name=5), "bad_image_entry", r"image 2 has file_name 5, not a file name"),
    (lambda d: d["images"][1].update(width="64"), "bad_image_entry", r"image 2 'page_001.png' has width '64', not a "
                                                                     r"number of pixels"),
    (lambda d: d["images"][1].update(height=[80]), "bad_image_entry", r"image 2 'page_001.png' has height \[80\]"),
    (lambda d: d["annotations"][-1].update(area="big"), "bad_area", r"annotation \d+ \(image 'page_001.png'\) has area "
                                                                    r"'big', not a number of pixels: its box's area "
                                                                    r"is used"),
    (lambda d: d["annotations"][-1].update(image_id=[2]), "unknown_image", r"annotation \d+ points at image id \[2\]"),
    (lambda d: d["annotations"][-1].update(category_id={"id": 1}), "unknown_category", r"annotation \d+ \(image "
                                                                                      r"'page_001.png'\) has category "
                                                                                      r"id \{'id': 1\}"),

    (lambda d: d["annotations"][-1]["bbox"].__setitem__(0, True), "bad_bbox", r"annotation \d+ \(image "
                                                                             r"'page_001.png'\) has a malformed bbox "
                                                                             r"\[True"),
    # pycocotools' rasteriser ended the process (segfault) on such a polygon when the page was read
    (lambda d: d["annotations"][-1].update(segmentation=[[0, 0, 1e30, 0, 1e30, 1e30]]), "bad_segmentation",
     r"annotation \d+ \(image 'page_001.png'\) has a segmentation with a point far outside its 64x80 page"),
])
def test_a_malformed_coco_field_is_a_bad_entry_of_on_bad(tmp_path, edit, kind, message):
    """``"file_name": 5``, ``"width": "773"`` crashed with a TypeError, ``"area": "big"`` with a ValueError naming
    neither the file nor the annotation, an id given as a list with "unhashable type": now the entry is skipped and
    counted (data.on_bad=skip; a bad area is replaced by the box's) or the error names the file and the entry."""
    ann = _edited(tmp_path, edit)
    ds = CocoLayoutDataset(ann, tmp_path / "images", with_masks=True)
    assert ds.report[kind] == 1 and ds[len(ds) - 1][1]["boxes"].shape[1] == 4
    if kind == "bad_area":
        last = json.loads(ann.read_text())["annotations"][-1]
        kept = next(a for a in ds.coco_gt().dataset["annotations"] if a["bbox"] == pytest.approx(last["bbox"]))
        assert kept["area"] == last["bbox"][2] * last["bbox"][3]
    with pytest.raises(LayoutDataError, match=rf"^{ann}: {message}"):
        CocoLayoutDataset(ann, tmp_path / "images", on_bad="error")


def test_a_page_above_the_decompression_bomb_limit_is_skipped_naming_the_setting(tmp_path, beit_warnings,
                                                                                 monkeypatch):
    """A training page of more than twice PIL's limit (a 14000 x 14000 scan at the default) raised PIL's
    DecompressionBombError out of the build-time check, which caught only OSError: now it is skipped and counted as
    an unreadable page, with a warning naming data.max_image_pixels (or raised, with data.on_bad=error)."""
    from PIL import Image

    ann = write_synthetic_pages(tmp_path, num_pages=3, size=(64, 80))  # 5,120 pixels a page
    Image.new("L", (200, 200), 255).save(tmp_path / "images" / "page_001.png")  # 40,000 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # as data.max_image_pixels=10000 sets it
    ds = CocoLayoutDataset(ann, tmp_path / "images", train=True, min_sizes=(64,), max_size=128)
    assert len(ds) == 2 and ds.report["unreadable_image"] == 1 and [im["id"] for im in ds.images] == [1, 3]
    warned = " ".join(r.getMessage() for r in beit_warnings)
    assert "unreadable_image: image 2 " in warned and "page_001.png' cannot be read" in warned
    assert "data.max_image_pixels=N" in warned
    with pytest.raises(LayoutDataError, match=r"image 2 .*page_001.png' cannot be read .*data\.max_image_pixels"):
        CocoLayoutDataset(ann, tmp_path / "images", on_bad="error")


def test_training_without_a_val_set_whose_first_page_has_no_box(tmp_path):
    """With data.holdout=0 a training set whose lowest page id has no box (kept as a negative) failed with "no
    usable box on its 1 pages": the picture page of train.image_every was built from that page, even with
    image_every=0. Now only when pictures are drawn, from the first page with a box."""
    from beit.engine.config import load_config
    from beit.tasks.layout import LayoutConfig, train

    ann = _edited(tmp_path, lambda d: d.update(annotations=[a for a in d["annotations"] if a["image_id"] != 1]))
    for every in (0, 1):
        out = tmp_path / f"run{every}"
        cfg = load_config(LayoutConfig, None, [*TINY_OVERRIDES, f"data.train_ann={ann}", "data.holdout=0",
                                               f"train.image_every={every}", "train.max_steps=1",
                                               f"train.output_dir={out}"])
        result = train(cfg)
        assert result["step"] == 1 and result["data"]["train"]["empty_pages"] == 1
        assert sorted(p.name for p in (out / "images").glob("*.png")) == (["layout_0000001.png"] if every else [])


def _rle_of(box, height, width):
    from pycocotools import mask as mask_util

    m = np.zeros((height, width), dtype=np.uint8, order="F")
    x, y, w, h = box
    m[y:y + h, x:x + w] = 1
    rle = mask_util.encode(m)
    return {"size": [height, width], "counts": rle["counts"].decode()}


@pytest.mark.parametrize("bad,problem", [
    (lambda rle: {"counts": rle["counts"]}, r"without a 'size' \(\[height, width\]\)"),
    (lambda rle: dict(rle, size=[40, 32]), r"whose size \[40, 32\] is not its page's \[80, 64\]"),
    (lambda rle: dict(rle, counts="?>"), r"whose counts cover 29 pixels, not the page's 5120"),
    (lambda rle: dict(rle, counts="\x7f\x7f"), r"whose counts are not COCO's compressed RLE text"),
    (lambda rle: dict(rle, counts=[100, 20, 4000]), r"whose counts cover 4120 pixels, not the page's 5120"),
    (lambda rle: dict(rle, counts={"a": 1}), r"whose counts \{'a': 1\} are neither"),
])
def test_a_bad_rle_segmentation_is_a_bad_annotation_not_a_crash_of_the_evaluation(tmp_path, bad, problem):
    """An RLE segmentation without 'size' (or with counts that do not cover the page) went through to pycocotools,
    which raised KeyError 'size' at the evaluation, after the training. Now checked at build time as polygons are:
    left out (the box stands in for the mask) or, with data.on_bad=error, an error naming the annotation."""
    from beit.tasks.layout import evaluate_coco

    good = {}

    def with_rles(d):
        for a in d["annotations"][:2]:  # page 1: 64 x 80
            good[a["id"]] = a["segmentation"] = _rle_of(a["bbox"], 80, 64)
        d["annotations"][1]["segmentation"] = bad(d["annotations"][1]["segmentation"])

    ann = _edited(tmp_path, with_rles)
    ds = CocoLayoutDataset(ann, tmp_path / "images", with_masks=True)
    assert ds.report["bad_segmentation"] == 1
    gt = ds.coco_gt()
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0,
                "segmentation": a["segmentation"]} for a in gt.dataset["annotations"]]
    assert evaluate_coco(gt, perfect, ("bbox", "segm"))["segm/AP"] == pytest.approx(1.0)
    first = json.loads(ann.read_text())["annotations"][0]
    assert next(a for a in gt.dataset["annotations"] if a["bbox"] == first["bbox"])["segmentation"] == good[first["id"]]
    with pytest.raises(LayoutDataError, match=rf"^{ann}: annotation {first['id'] + 1} \(image 'page_000.png'\) has an "
                                              rf"RLE segmentation {problem}.*: its box stands in"):
        CocoLayoutDataset(ann, tmp_path / "images", on_bad="error")


def test_a_polygon_of_other_things_than_numbers_is_a_bad_annotation(tmp_path):
    ann = _edited(tmp_path, lambda d: d["annotations"][0].update(segmentation=[[1, 2, "x", 4, 5, 6]]))
    ds = CocoLayoutDataset(ann, tmp_path / "images", with_masks=True)
    assert ds.report["bad_segmentation"] == 1 and ds.report["mask_from_box"] == 1 and ds[0][1]["masks"].any()
    with pytest.raises(LayoutDataError, match=r"annotation 1 \(image 'page_000.png'\) has a segmentation whose "
                                              r"polygon 0 is \[1, 2, 'x', 4, 5, 6\], not a list of x, y numbers"):
        CocoLayoutDataset(ann, tmp_path / "images", on_bad="error")


def test_a_val_file_that_is_the_training_file_with_a_holdout_is_refused(pages, tmp_path, monkeypatch):
    """data.val_ann=data.train_ann with data.holdout=2 validated on the training pages, the holdout silently not
    used (a data.val_ann is the validation set). Refused, naming both keys and what to do; without a holdout it is
    still allowed (validation on the training pages, asked for), as is a holdout with another val file."""
    from beit.engine.config import ConfigError, load_config
    from beit.tasks.layout import LayoutConfig, build_datasets, build_val_dataset

    def cfg(*overrides):
        return load_config(LayoutConfig, None, [f"data.train_ann={pages}", *overrides])

    monkeypatch.chdir(pages.parent)
    for val in (pages, "annotations.json"):  # the same file, however it is spelled
        for build in (build_datasets, build_val_dataset):
            with pytest.raises(ConfigError, match=r"^config key 'data.val_ann': .*annotations.json is data.train_ann, "
                                                  r"with data.holdout=1: .*Leave data.val_ann unset \(data.val_ann=''\) "
                                                  r"to hold out 1 page of data.train_ann, or give another file$"):
                build(cfg(f"data.val_ann={val}", "data.holdout=1"))
    train_ds, val_ds = build_datasets(cfg(f"data.val_ann={pages}"))
    assert len(train_ds) == len(val_ds) == 2
    other = write_synthetic_pages(tmp_path, num_pages=3, size=(96, 128))
    assert len(build_val_dataset(cfg(f"data.val_ann={other}", "data.holdout=1"))) == 3
    assert len(build_val_dataset(cfg("data.holdout=1"))) == 1


def test_on_bad_error_stops_on_a_box_of_negative_size_or_off_its_page(tmp_path):
    """data.on_bad=error promises to stop on a malformed box, but a negative width or a box wholly off its page was
    only dropped and counted as an empty box. Now both are bad boxes of data.on_bad (counted: bad_bbox, box_off_page;
    or an error naming the annotation), while a box on its page left thinner than 1 px by clipping is dropped and
    counted either way (degenerate_boxes)."""
    extra = [{"image_id": 1, "category_id": 1, "bbox": [20, 20, -10, 5]},  # negative width
             {"image_id": 1, "category_id": 1, "bbox": [70, 10, 10, 5]},  # right of the 64 x 80 page
             {"image_id": 2, "category_id": 2, "bbox": [10, -30, 10, 20]},  # above it
             {"image_id": 2, "category_id": 1, "bbox": [10, 10, 0, 5]}]  # no width: empty, dropped either way

    def add(d):
        nxt = max(a["id"] for a in d["annotations"]) + 1
        d["annotations"] += [dict(a, id=nxt + i, iscrowd=0) for i, a in enumerate(extra)]

    ann = _edited(tmp_path, add)
    nxt = json.loads(ann.read_text())["annotations"][-4]["id"]
    ds = CocoLayoutDataset(ann, tmp_path / "images")
    r = ds.report
    assert (r["bad_bbox"], r["box_off_page"], r["degenerate_boxes"], r.get("clipped_boxes", 0)) == (1, 2, 1, 0)
    assert any(f"annotation {nxt + 1} (image 'page_000.png'): box [70, 10, 10, 5] lies wholly outside its 64x80 page"
               in p for p in ds.problems)
    with pytest.raises(LayoutDataError, match=rf"^{ann}: annotation {nxt} \(image 'page_000.png'\) has a bbox "
                                              r"\[20, 20, -10, 5\] of negative width or height"):
        CocoLayoutDataset(ann, tmp_path / "images", on_bad="error")
    for drop in (0, 1):  # the first bad box left out of the file: the next one stops the build
        data = json.loads(ann.read_text())
        del data["annotations"][-4 + drop]
        ann.write_text(json.dumps(data))
        with pytest.raises(LayoutDataError, match=rf"^{ann}: annotation {nxt + 1 + drop} \(image 'page_00{drop}.png'\): "
                                                  r"box .* lies wholly outside its 64x80 page"):
            CocoLayoutDataset(ann, tmp_path / "images", on_bad="error")
    data = json.loads(ann.read_text())
    del data["annotations"][-2]
    ann.write_text(json.dumps(data))
    assert CocoLayoutDataset(ann, tmp_path / "images", on_bad="error").report["degenerate_boxes"] == 1


@pytest.mark.parametrize("value", ["no", "0", None, 2, [1], 0.5])
def test_an_iscrowd_other_than_0_or_1_is_a_bad_annotation(tmp_path, value):
    """``"iscrowd": "no"`` made a crowd region (bool("no") is true): left out of training, a box the detector may
    find or not at evaluation. Only 0 / 1 / false / true are read; anything else is a bad annotation of on_bad."""
    ann = _edited(tmp_path, lambda d: [d["annotations"][0].update(iscrowd=value),
                                       d["annotations"][1].update(iscrowd=True), d["annotations"][2].update(iscrowd=0)])
    ds = CocoLayoutDataset(ann, tmp_path / "images")
    kept = {a["id"]: a["iscrowd"] for v in ds.anns.values() for a in v}
    assert ds.report["bad_iscrowd"] == 1 and 1 not in kept and (kept[2], kept[3]) == (1, 0)
    with pytest.raises(LayoutDataError, match=rf"^{ann}: annotation 1 \(image 'page_000.png'\) has iscrowd "
                                              rf"{re.escape(repr(value))}, not 0 or 1 \(false or true\)$"):
        CocoLayoutDataset(ann, tmp_path / "images", on_bad="error")
