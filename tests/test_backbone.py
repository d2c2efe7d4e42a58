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
    from beit.tasks.evaluate import load_classifier

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
