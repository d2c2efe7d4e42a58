"""``beit.build_backbone``: one entrance for presets, checkpoints and state dicts; the eval preprocessing
stored beside the architecture in ``config.json``."""

from __future__ import annotations

import json

import pytest
import torch

import beit
from beit.interop import CheckpointError
from beit.models import Preprocess

TINY = dict(img_size=32, patch_size=4, depth=2, embed_dim=32, num_heads=2)


def _tiny_mim(tmp_path):
    torch.manual_seed(0)
    mim = beit.create_model("beit_tiny_patch16_224", head="mim", vocab_size=64, **TINY)
    with torch.no_grad():
        mim.rel_pos_bias.relative_position_bias_table.normal_()
    return mim, beit.save_model(mim, tmp_path / "pt")


def test_from_preset_with_overrides() -> None:
    m = beit.build_backbone("beit_tiny_patch16_224", head="none", attn_impl="eager", **TINY)
    assert isinstance(m, beit.Beit) and m.training
    assert (m.cfg.embed_dim, m.cfg.depth, m.cfg.num_heads, m.cfg.attn_impl, m.cfg.head) == (32, 2, 2, "eager", "none")
    mim = beit.build_backbone("beit_tiny_patch16_224", head="mim", **TINY)  # the pre-training defaults apply
    assert mim.cfg.use_shared_rel_pos_bias and not mim.cfg.use_rel_pos_bias


def test_from_config() -> None:
    cfg = beit.BeitConfig(**TINY, head="none")
    assert beit.build_backbone(cfg, depth=1).cfg.depth == 1


def test_from_checkpoint_dir_keeps_weights_and_applies_overrides(tmp_path) -> None:
    mim, path = _tiny_mim(tmp_path)
    m = beit.build_backbone(path, head="none", attn_impl="eager", drop_path_rate=0.1)
    assert (m.cfg.head, m.cfg.attn_impl, m.cfg.drop_path_rate, m.cfg.depth) == ("none", "eager", 0.1, 2)
    assert m.training
    torch.testing.assert_close(m.blocks[1].mlp.fc1.weight, mim.blocks[1].mlp.fc1.weight)
    assert m.cfg.use_shared_rel_pos_bias  # rel_pos="keep": the checkpoint's scheme


def test_per_layer_rel_pos_copies_the_shared_table(tmp_path) -> None:
    mim, path = _tiny_mim(tmp_path)
    m = beit.build_backbone(path, rel_pos="per_layer", head="none")
    assert m.cfg.use_rel_pos_bias and not m.cfg.use_shared_rel_pos_bias
    shared = mim.rel_pos_bias.relative_position_bias_table
    for blk in m.blocks:
        torch.testing.assert_close(blk.attn.relative_position_bias_table, shared)
    with pytest.raises(ValueError, match=r"^rel_pos must be one of \('keep', 'per_layer'\), got 'shared'$"):
        beit.build_backbone(path, rel_pos="shared")


def test_from_state_dict_of_a_wrapper(tmp_path) -> None:
    mim, _ = _tiny_mim(tmp_path)
    sd = {f"backbone.{k}": v for k, v in mim.state_dict().items()}  # a dense-task checkpoint's layout
    m = beit.build_backbone(sd, head="none", img_size=32)
    torch.testing.assert_close(m.patch_embed.proj.weight, mim.patch_embed.proj.weight)
    assert m.cfg.embed_dim == 32


def test_conflicting_shape_override_is_one_clear_error(tmp_path) -> None:
    _, path = _tiny_mim(tmp_path)
    with pytest.raises(ValueError) as info:
        beit.build_backbone(path, embed_dim=64)
    assert str(info.value).startswith(f"model_overrides.embed_dim=64 but {path} has embed_dim=32: a checkpoint's "
                                      "architecture comes from its tensors.")
    with pytest.raises(ValueError, match=r"^model\.backbone_overrides\.depth=3 but the state dict has depth=2"):
        beit.build_backbone(beit.create_model("beit_tiny_patch16_224", **TINY).state_dict(), depth=3,
                            key="model.backbone_overrides")
    # the same value as the checkpoint is no conflict
    assert beit.build_backbone(path, embed_dim=32, head="none").cfg.embed_dim == 32


def test_unknown_override_and_empty_source() -> None:
    with pytest.raises(ValueError, match=r"^model_overrides\.dpeth: not a BeitConfig field; valid: \["):
        beit.build_backbone("beit_tiny_patch16_224", dpeth=2)
    with pytest.raises(ValueError, match="^no backbone source: give a preset name"):
        beit.build_backbone("")
    with pytest.raises(FileNotFoundError, match="checkpoint not found: no/such/dir"):
        beit.build_backbone("no/such/dir")


def test_preprocess_round_trips_through_config_json(tmp_path) -> None:
    pre = Preprocess(img_size=32, resize="full", crop_pct=0.9, interpolation="bilinear", grayscale=True,
                     mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    model = beit.create_model("beit_tiny_patch16_224", num_classes=3, **TINY)
    model.cfg = model.cfg.with_preprocess(pre)
    out = beit.save_model(model, tmp_path / "m")
    meta = json.loads((out / "config.json").read_text())
    assert meta["preprocess"] == pre.to_dict()
    assert "preprocess" not in meta["config"]["extra"]  # one place on disk
    assert model.cfg.extra["preprocess"] == pre.to_dict()  # saving does not change the model
    back = beit.load_model(out)
    assert back.cfg.eval_preprocess() == pre
    assert beit.build_backbone(out).cfg.eval_preprocess() == pre
    from beit.tasks.classify import load_classifier

    assert load_classifier(out)[2] == pre


def test_preprocess_defaults_and_old_layout(tmp_path) -> None:
    model = beit.create_model("beit_tiny_patch16_224", num_classes=3, **TINY)
    assert model.cfg.eval_preprocess() == Preprocess(img_size=32)  # nothing stored: ImageNet crop at its size
    out = beit.save_model(model, tmp_path / "m")
    assert "preprocess" not in json.loads((out / "config.json").read_text())
    # config.json written before the move kept it inside config.extra: still read
    meta = json.loads((out / "config.json").read_text())
    meta["config"]["extra"]["preprocess"] = {"img_size": 32, "resize": "full"}
    (out / "config.json").write_text(json.dumps(meta))
    assert beit.load_model(out).cfg.eval_preprocess() == Preprocess(img_size=32, resize="full")


def test_checkpoint_error_names_the_file(tmp_path) -> None:
    bad = tmp_path / "x.pt"
    torch.save({"foo": torch.zeros(2)}, bad)
    with pytest.raises(CheckpointError, match=f"^{bad}: not a BEiT checkpoint"):
        beit.build_backbone(bad)


# ------------------------------------------------------------------------------------------------ every task
SEG = ["data.crop_size=32", "data.root=x", "data.num_classes=3", "data.format=folder", "model.channels=8",
       "model.aux_channels=8", "model.arch=beit_tiny_patch16_224", "model.depth=2", "model.embed_dim=32",
       "model.num_heads=2", "model.patch_size=4"]


def test_segmentation_model_overrides_reach_the_backbone(tmp_path) -> None:
    from beit.engine import ConfigError, load_config
    from beit.tasks.segmentation import SegmentConfig, build_model

    cfg = load_config(SegmentConfig, None, SEG + ["model_overrides.attn_impl=eager"])
    model = build_model(cfg, 3)
    assert model.backbone.cfg.attn_impl == "eager" and cfg.model.backbone["attn_impl"] == "eager"
    assert model.backbone.cfg.use_rel_pos_bias and not model.backbone.cfg.use_shared_rel_pos_bias
    # a checkpoint: its shared table made per-layer, the override applied
    _, path = _tiny_mim(tmp_path)
    cfg = load_config(SegmentConfig, None, SEG[:6] + [f"model.init={path}", "model_overrides.attn_impl=eager"])
    bb = build_model(cfg, 3).backbone
    assert (bb.cfg.attn_impl, bb.cfg.use_rel_pos_bias, bb.cfg.img_hw) == ("eager", True, (32, 32))
    # the stored architecture (eval / predict of a trained run) takes overrides too
    cfg.model.init = ""
    cfg.model_overrides = {"attn_impl": "sdpa"}
    assert build_model(cfg, 3).backbone.cfg.attn_impl == "sdpa"
    with pytest.raises(ConfigError) as info:
        load_config(SegmentConfig, None, SEG + ["model_overrides.img_size=64"])
    assert str(info.value) == ("config key 'model_overrides.img_size': set by the task's config itself; "
                               "use data.crop_size")
    with pytest.raises(ConfigError) as info:
        load_config(SegmentConfig, None, SEG + ["model_overrides.depth=3"])
    assert str(info.value) == "config key 'model_overrides.depth': 3 but model.depth=2: set one of them"
    cfg = load_config(SegmentConfig, None, SEG[:6] + [f"model.init={path}", "model_overrides.depth=3"])
    with pytest.raises(ValueError, match=r"^model_overrides\.depth=3 but .*pt has depth=2: a checkpoint's"):
        build_model(cfg, 3)


def test_layout_model_overrides_and_old_spelling() -> None:
    from beit.engine import ConfigError, load_config
    from beit.tasks.layout import DetectorConfig, LayoutConfig, build_detector

    tiny = {"depth": 2, "embed_dim": 32, "num_heads": 2, "img_size": 64}
    cfg = DetectorConfig(arch="beit_tiny_patch16_224", backbone_overrides=tiny, fpn_channels=16, box_head_dim=16,
                         mask_head_dim=8)
    m = build_detector(cfg, ["text"], model_overrides={"attn_impl": "eager"})
    assert m.body.cfg.attn_impl == "eager" and m.body.cfg.depth == 2 and cfg.backbone["attn_impl"] == "eager"
    with pytest.raises(ValueError, match=r"^model_overrides\.depth=3 but model\.backbone_overrides\.depth=2: "):
        build_detector(DetectorConfig(arch="beit_tiny_patch16_224", backbone_overrides=tiny), ["t"],
                       model_overrides={"depth": 3})
    with pytest.raises(ValueError, match=r"^model_overrides\.drop_path_rate: set by the layout config itself; "
                                         r"use model\.drop_path_rate$"):
        build_detector(DetectorConfig(arch="beit_tiny_patch16_224", backbone_overrides=tiny), ["t"],
                       model_overrides={"drop_path_rate": 0.3})
    with pytest.raises(ConfigError) as info:
        load_config(LayoutConfig, None, ["model.backbone_overrides={depth: 2}", "model_overrides.depth=3"])
    assert str(info.value) == ("config key 'model_overrides.depth': 3 but model.backbone_overrides.depth=2: "
                               "set one of them")
    with pytest.raises(ConfigError, match=r"^config key 'model_overrides.dpeth': not a BeitConfig field"):
        load_config(LayoutConfig, None, ["model_overrides.dpeth=3"])
    # a value of the wrong type: one line naming the key and the type (was a traceback, or taken as-is)
    from beit.tasks.segmentation import SegmentConfig

    for schema in (LayoutConfig, SegmentConfig):
        with pytest.raises(ConfigError) as info:
            load_config(schema, None, ["model_overrides.depth=abc"])
        assert str(info.value) == "config key 'model_overrides.depth': must be int, got 'abc'"
        with pytest.raises(ConfigError, match=r"'model_overrides.qkv_bias': must be bool, got 'maybe'"):
            load_config(schema, None, ["model_overrides.qkv_bias=maybe"])
    with pytest.raises(ConfigError, match=r"'model.backbone_overrides.mlp_ratio': must be float, got 'abc'"):
        load_config(LayoutConfig, None, ["model.backbone_overrides={mlp_ratio: abc}"])
    with pytest.raises(ValueError, match=r"^model_overrides\.drop_rate: must be float, got 'x'$"):
        beit.build_backbone("beit_tiny_patch16_224", drop_rate="x")


def test_pretrain_builds_through_build_backbone(tmp_path) -> None:
    from beit.engine import ConfigError, load_config
    from beit.tasks.pretrain import PretrainConfig, build_model

    (tmp_path / "imgs").mkdir()
    base = [f"data.path={tmp_path / 'imgs'}", "model.name=beit_tiny_patch16_224", "model.img_size=32",
            "model.patch_size=4", "model.depth=2", "model.embed_dim=32", "model.num_heads=2",
            "data.num_mask_patches=10", "data.min_mask_patches_per_block=2", "tokenizer.kind=dvae",
            f"tokenizer.path={tmp_path / 'tok.safetensors'}"]
    (tmp_path / "tok.safetensors").write_bytes(b"")
    cfg = load_config(PretrainConfig, None, base + ["model_overrides.attn_impl=eager"])
    m = build_model(cfg, 64)
    assert (m.cfg.head, m.cfg.vocab_size, m.cfg.attn_impl, m.cfg.depth) == ("mim", 64, "eager", 2)
    mim, path = _tiny_mim(tmp_path)
    cfg.model.init, cfg.model.depth, cfg.model.embed_dim, cfg.model.num_heads = str(path), None, None, None
    m = build_model(cfg, 64)
    torch.testing.assert_close(m.lm_head.weight, mim.lm_head.weight)
    cfg.model.depth = 3
    with pytest.raises(ValueError, match=r"^model\.depth=3 but .*pt has depth=2: a checkpoint's architecture"):
        build_model(cfg, 64)
    with pytest.raises(ConfigError) as info:
        load_config(PretrainConfig, None, base + ["model_overrides.patch_size=8"])
    assert str(info.value) == ("config key 'model_overrides.patch_size': set by the task's config itself; "
                               "use model.patch_size")


def test_one_loader_for_the_config_stored_in_a_checkpoint(tmp_path) -> None:
    from beit.engine import ConfigError
    from beit.engine.checkpoint import config_from_checkpoint
    from beit.engine.config import stored_config
    from beit.tasks.layout import LayoutConfig
    from beit.tasks.segmentation import SegmentConfig

    cfg = stored_config(SegmentConfig, {"model_overrides": {"attn_impl": "eager"}, "data": {"crop_size": 64}},
                        None, ["test.stride=7"])
    assert (cfg.model_overrides, cfg.data.crop_size, cfg.test.stride) == ({"attn_impl": "eager"}, 64, 7)
    with pytest.raises(ConfigError) as info:
        stored_config(LayoutConfig, {"no_such_key": 1}, source="x/last.pt")
    assert str(info.value).startswith("config key 'no_such_key': x/last.pt: its stored config does not fit "
                                      "LayoutConfig (")
    ckpt = tmp_path / "last.pt"
    torch.save({"format": "beit-train-ckpt", "version": 1, "model": {}, "config": {"data": {"crop_size": 48}}}, ckpt)
    cfg, state = config_from_checkpoint(SegmentConfig, ckpt, None, ["data.repeat=2"])
    assert (cfg.data.crop_size, cfg.data.repeat, state["model"]) == (48, 2, {})
