"""Checkpoints as users bring them: nested in larger models, partial, non-square, next to a damaged config."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch

import beit
from _interop_helpers import randomize as _randomize
from beit.interop import CheckpointError

timm_beit = pytest.importorskip("timm.models.beit")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
LOGGER = "beit.interop"



def _images(h: int = 32, w: int = 32) -> torch.Tensor:
    return torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(1))


def _timm(img_size=32, abs_pos=False) -> torch.nn.Module:
    return _randomize(timm_beit.Beit(img_size=img_size, patch_size=4, num_classes=5, embed_dim=32, depth=2,
                                     num_heads=2, init_values=0.1, use_abs_pos_emb=abs_pos,
                                     use_rel_pos_bias=True))


@pytest.fixture(scope="module")
def ref() -> torch.nn.Module:
    torch.set_num_threads(1)
    return _timm()


def _nest(sd: dict, prefix: str, wrapper: tuple[str, ...]) -> dict:
    obj: dict = {prefix + k: v for k, v in sd.items()}
    obj["decode_head.conv_seg.weight"] = torch.zeros(3, 32, 1, 1)  # a larger model's other parts
    obj["neck.lateral.0.weight"] = torch.zeros(8, 32)
    for key in reversed(wrapper):
        obj = {key: obj, "epoch": 7, "optimizer": {"state": {}, "param_groups": []}}
    return obj


@pytest.mark.parametrize(
    "prefix,wrapper",
    [("backbone.", ("state_dict",)), ("encoder.", ()), ("model.", ("model",)), ("module.", ("model",)),
     ("module.backbone.", ("checkpoint", "state_dict")), ("backbone.bottom_up.backbone.", ("model",)),
     ("model._orig_mod.", ("state_dict",)), ("student.backbone.", ("teacher_student",))],
)
def test_encoder_nested_in_larger_checkpoints(tmp_path, caplog, ref, prefix, wrapper) -> None:
    path = tmp_path / "big.pth"
    torch.save(_nest(ref.state_dict(), prefix, wrapper), path)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        model = beit.load_model(path)
    with torch.no_grad():
        torch.testing.assert_close(model(_images()), ref(_images()), atol=TOL, rtol=0)
    text = caplog.text
    if prefix != "module.":
        found = prefix.replace("_orig_mod.", "").removeprefix("module.")
        assert f"BEiT encoder found under {found!r}" in text
        assert "left out 2 tensors that are not part of the BEiT encoder" in text
    else:  # DDP's "module." wraps the whole model: its other parts have no place in an encoder
        assert "dropped 2 tensors that have no place in the model" in text
    assert "decode_head.conv_seg.weight" in text


def test_hf_model_inside_a_larger_checkpoint_and_bare(tmp_path, caplog) -> None:
    cfg = transformers.BeitConfig(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=128, num_labels=5,
                                  use_relative_position_bias=True)
    hf = _randomize(transformers.BeitForImageClassification(cfg))
    x = _images()
    with torch.no_grad():
        expected = hf.beit(pixel_values=x).pooler_output
        nested = {"state_dict": {"backbone." + k: v for k, v in hf.state_dict().items()}}
        got = beit.load_model(nested, head="cls", num_classes=0)
        torch.testing.assert_close(got(x), expected, atol=TOL, rtol=0)
        bare = beit.load_model(hf.beit.state_dict(), head="cls", num_classes=0)  # BeitModel: no "beit." at all
        torch.testing.assert_close(bare(x), expected, atol=TOL, rtol=0)


def test_partial_state_dict_loads_what_is_there(caplog, ref) -> None:
    sd = {k: v for k, v in ref.state_dict().items()
          if k not in ("blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight", "blocks.0.gamma_1")}
    with caplog.at_level(logging.INFO, logger=LOGGER):
        model = beit.load_model(sd)  # used to be a bare KeyError from interop/infer.py
    assert "the checkpoint lacks 3 tensors; left at their initial values: " in caplog.text
    for k in ("blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight", "blocks.0.gamma_1"):
        assert k in caplog.text
    for k, v in sd.items():
        if k in model.state_dict():
            torch.testing.assert_close(model.state_dict()[k], v, atol=0, rtol=0)
    assert model.cfg.mlp_ratio == 4.0 and model.cfg.num_heads == 2  # read from the blocks that have them
    with pytest.raises(CheckpointError, match=r"<state dict>: checkpoint lacks 3 tensors the model needs: "
                                              r"blocks\.0\.gamma_1, blocks\.0\.attn\.qkv\.weight, "
                                              r"blocks\.0\.mlp\.fc1\.weight \(strict=False leaves"):
        beit.load_model(sd, strict=True)


def test_filtered_state_dict_without_block_zero_and_extra_tensors(caplog, ref) -> None:
    sd = {k: v for k, v in ref.state_dict().items() if not k.startswith("blocks.0.")}
    sd["blocks.1.attn.adapter.weight"] = torch.zeros(4, 4)  # another code base's addition
    with caplog.at_level(logging.INFO, logger=LOGGER):
        model = beit.load_model(sd)
    assert model.cfg.depth == 2 and model.cfg.use_rel_pos_bias and model.cfg.init_values == pytest.approx(
        float(ref.blocks[1].gamma_1.float().mean()))
    assert "dropped 1 tensors that have no place in the model: blocks.1.attn.adapter.weight" in caplog.text
    assert "the checkpoint lacks" in caplog.text and "blocks.0.norm1.weight" in caplog.text
    with pytest.raises(CheckpointError, match=r"tensor 'blocks\.1\.attn\.adapter\.weight' \(4, 4\) has no place"):
        beit.load_model(sd, strict=True)


def test_malformed_tensors_are_named_not_a_bare_error(ref) -> None:
    sd = dict(ref.state_dict(), pos_embed=torch.zeros(65))
    with pytest.raises(CheckpointError, match=r"<state dict>: 'pos_embed' has shape \(65,\), expected 3 dim"):
        beit.load_model(sd)
    sd = {k: v for k, v in ref.state_dict().items() if "relative_position" not in k}
    sd["blocks.0.attn.relative_position_bias_table"] = torch.zeros(51, 2)
    with pytest.raises(CheckpointError, match=r"a relative position table of 51 rows: no patch grid fits"):
        beit.load_model(sd)


def test_a_missing_patch_embedding_is_named(ref) -> None:
    sd = {k: v for k, v in ref.state_dict().items() if not k.startswith("patch_embed.")}
    with pytest.raises(CheckpointError, match=r"^<state dict>: lacks 'patch_embed\.proj\.weight', which tells"):
        beit.load_model(sd)


def test_non_square_grid(tmp_path) -> None:
    ref = _timm(img_size=(16, 24), abs_pos=True)
    x = _images(16, 24)
    with torch.no_grad():
        expected = ref(x)
        # a bare state dict: (4, 6) and (6, 4) both fit its tensors, so the image size is needed
        with pytest.raises(CheckpointError, match=r"not square and ambiguous.*pass img_size=\(H, W\)"):
            beit.load_model(ref.state_dict())
        model = beit.load_model(ref.state_dict(), img_size=(16, 24))
        torch.testing.assert_close(model(x), expected, atol=TOL, rtol=0)
        beit.save_model(model, tmp_path / "ours")  # our config.json carries the grid
        torch.testing.assert_close(beit.load_model(tmp_path / "ours")(x), expected, atol=TOL, rtol=0)
        # resampled to another non-square size at load time
        big = beit.load_model(tmp_path / "ours", img_size=(28, 36))
        assert big.window == (7, 9) and big(_images(28, 36)).shape == (2, 5)


@pytest.mark.parametrize(
    "config_text,warning",
    [("{broken", "unreadable"), ("[1, 2]", "holds a list, not an object"),
     (json.dumps({"format": "beit", "config": {"embed_dim": "wide"}}), "damaged BEiT config"),
     (json.dumps({"format": "beit"}), "damaged BEiT config ('config' is NoneType"),
     (json.dumps({"image_size": "big", "num_attention_heads": 0, "layer_norm_eps": 1e-6}), "ignoring img_size='big'"),
     (json.dumps({"id2label": 5}), "damaged Hugging Face config")],
)
def test_damaged_config_json_is_reported_and_ignored(tmp_path, caplog, ref, config_text, warning) -> None:
    model = beit.load_model(ref.state_dict())
    beit.save_model(model, tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(config_text)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        again = beit.load_model(tmp_path / "m")
    assert warning in caplog.text and "config.json" in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(again(_images()), ref(_images()), atol=TOL, rtol=0)


def test_unknown_head_count_is_a_warning(caplog) -> None:
    m = beit.create_model("beit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=128, depth=1, num_heads=2,
                          use_rel_pos_bias=False, num_classes=3)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert beit.load_model(m.state_dict()).cfg.num_heads == 2  # 128 / 64
    assert "does not tell the number of attention heads" in caplog.text
    assert beit.load_model(m.state_dict(), num_heads=4).cfg.num_heads == 4


_PRETRAIN = dict(head="mim", vocab_size=16, use_rel_pos_bias=False, use_shared_rel_pos_bias=True,
                 use_mean_pooling=False)
_CLASSIFIER = dict(head="cls", num_classes=5)


def _said(records: list[logging.LogRecord], name: str, what: str) -> dict[str, str]:
    """The loading report's "N tensors <what> (why): a, b" lines -> {tensor: why}."""
    said: dict[str, str] = {}
    for r in records:
        m = re.fullmatch(rf"{re.escape(name)}: (\d+) tensors {re.escape(what)} \((.*)\): (.*)", r.getMessage())
        if m:
            names = m.group(3).split(", ")
            assert len(names) == int(m.group(1)), r.getMessage()  # fewer than 7: all named
            said.update(dict.fromkeys(names, m.group(2)))
    return said


def _not_loaded_as_expected(records: list[logging.LogRecord], name: str) -> dict[str, str]:
    """The loading report's "N tensors not loaded, as expected (why): a, b" lines -> {tensor: why}."""
    return _said(records, name, "not loaded, as expected")


@pytest.mark.parametrize("src_kw,over", [
    (_PRETRAIN, dict(head="none")),
    (_PRETRAIN, dict(head="none", use_mean_pooling=True)),
    (_PRETRAIN, dict(head="cls", num_classes=3, use_rel_pos_bias=True, use_shared_rel_pos_bias=False,
                     use_mean_pooling=True)),
    (_CLASSIFIER, dict(num_classes=3)),
    (dict(_CLASSIFIER, use_mean_pooling=False), dict(head="mim", vocab_size=16)),
    (_CLASSIFIER, dict(head="none", img_size=48)),
    (_CLASSIFIER, dict()),
])
def test_what_is_reported_dropped_on_purpose_is_what_the_adaptation_dropped(tmp_path, caplog, src_kw, over) -> None:
    """The report of the tensors not loaded, as expected, is the adaptation's own account (it used to repeat the
    adaptation's rules in a second function that could drift apart): every tensor the adaptation left out is named
    with its reason, and nothing else is."""
    from beit.interop.load import _adapt_and_explain
    from beit.models import Beit, BeitConfig

    src = BeitConfig(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, **src_kw)
    sd = Beit(src).state_dict()
    adapted, dropped, moved = _adapt_and_explain(sd, src, src.replace(**over))
    gone = set(sd) - set(adapted)
    assert set(dropped) <= gone and all(dropped.values())
    # what is gone without a reason was moved, not dropped: the shared table into every block, said in `moved`
    assert gone - set(dropped) <= {"rel_pos_bias.relative_position_bias_table"}
    assert set(moved) == set(adapted) - set(sd) and all(moved.values())
    assert list(dropped) == [k for k in sd if k in dropped]  # the checkpoint's order

    path = beit.save_model(Beit(src), tmp_path / "ckpt") / "model.safetensors"
    with caplog.at_level(logging.INFO, logger=LOGGER):
        beit.load_model(path.parent, strict=False, **over)
    assert _not_loaded_as_expected(caplog.records, str(path)) == dropped
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_the_report_takes_the_reasons_from_the_adaptation(tmp_path, caplog, monkeypatch) -> None:
    """Changing the adaptation's account changes the report: it is not derived a second time."""
    import beit.interop.load as load
    from beit.models import Beit, BeitConfig

    real = load._adapt_and_explain

    def adapt(sd, src, dst):
        adapted, dropped, moved = real(sd, src, dst)
        return adapted, {k: f"said by the adaptation: {why}" for k, why in dropped.items()}, moved

    monkeypatch.setattr(load, "_adapt_and_explain", adapt)
    src = BeitConfig(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, **_PRETRAIN)
    path = beit.save_model(Beit(src), tmp_path / "ckpt") / "model.safetensors"
    with caplog.at_level(logging.INFO, logger=LOGGER):
        beit.load_model(path.parent, head="none")
    assert _not_loaded_as_expected(caplog.records, str(path)) == dict.fromkeys(
        ["lm_head.bias", "lm_head.weight", "mask_token"],
        "said by the adaptation: the MIM pre-training head: a model with head='none' has none")



def test_a_pretraining_checkpoint_into_a_mean_pooling_classifier_says_what_was_moved_and_what_starts_fresh(
        tmp_path, caplog) -> None:
    """A MIM checkpoint has a final ``norm`` and no ``fc_norm``: the official fine-tuning (unilm
    run_class_finetuning.py) and timm copy nothing into ``fc_norm``, so ours starts fresh too (it used to take the
    MIM norm, silently), and the report says so, and names the tensors loaded from another key (the shared table)."""
    from beit.models import Beit, BeitConfig

    src = BeitConfig(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, **_PRETRAIN)
    mim = Beit(src)
    with torch.no_grad():  # a trained-looking final norm, so that copying it would show
        mim.norm.weight.uniform_(2.0, 3.0)
        mim.norm.bias.uniform_(-1.0, -0.5)
    path = beit.save_model(mim, tmp_path / "ckpt") / "model.safetensors"
    with caplog.at_level(logging.INFO, logger=LOGGER):
        model = beit.load_model(path.parent, strict=True, head="cls", num_classes=3, use_rel_pos_bias=True,
                                use_shared_rel_pos_bias=False, use_mean_pooling=True)
    torch.testing.assert_close(model.fc_norm.weight.detach(), torch.ones(32))  # LayerNorm's own init
    torch.testing.assert_close(model.fc_norm.bias.detach(), torch.zeros(32))
    name = str(path)
    fresh = _said(caplog.records, name, "left at their initial values, as expected")
    assert {k: fresh[k] for k in ("fc_norm.weight", "fc_norm.bias")} == dict.fromkeys(
        ["fc_norm.weight", "fc_norm.bias"], beit.interop.load.FRESH_FC_NORM)
    assert "run_class_finetuning.py" in fresh["fc_norm.weight"]
    dropped = _said(caplog.records, name, "not loaded, as expected")
    assert "fc_norm starts fresh" in dropped["norm.weight"] and dropped["norm.bias"] == dropped["norm.weight"]
    moved = _said(caplog.records, name, "loaded from another key")
    assert set(moved) == {"blocks.0.attn.relative_position_bias_table", "blocks.1.attn.relative_position_bias_table"}
    assert "rel_pos_bias.relative_position_bias_table" in moved["blocks.0.attn.relative_position_bias_table"]
    for blk in model.blocks:
        torch.testing.assert_close(blk.attn.relative_position_bias_table, mim.rel_pos_bias.relative_position_bias_table)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text

    caplog.clear()  # a classifier with its own fc_norm keeps it, and nothing is said to have moved
    clf = Beit(BeitConfig(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, **_CLASSIFIER))
    with torch.no_grad():
        clf.fc_norm.weight.fill_(2.5)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        again = beit.load_model(clf.state_dict())
    torch.testing.assert_close(again.fc_norm.weight.detach(), torch.full((32,), 2.5))
    assert "loaded from another key" not in caplog.text and "fc_norm" not in caplog.text


def _offline(*args, **kwargs):
    raise OSError("Got: ConnectError: [Errno -2] Name or service not known\nAn error happened while trying to "
                  "locate the files on the Hub. Please check your internet connection and try again.")


def test_an_unfetchable_hub_id_is_one_line_naming_a_likely_local_typo(tmp_path, monkeypatch) -> None:
    """A checkpoint given as ``owner/name`` that is neither a local path nor fetchable from the Hub: one line that says
both, and a likely misspelt local path as such. The message was huggingface_hub's, over several lines, so that the
CLI's one line ended mid-sentence ("... (Got: ConnectError: [Errno -2] Name or service not known") and never said
that no local file of that name exists."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _offline)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(CheckpointError) as e:
        beit.load_model("runs/finall")
    msg = str(e.value)
    assert "\n" not in msg and msg.endswith("Name or service not known)")
    assert msg.startswith("'runs/finall': no such local file or folder (runs/ is a folder here: a misspelt path?), "
                          "and it could not be fetched as a Hugging Face Hub id")
    with pytest.raises(CheckpointError, match=r"^'microsoft/beit-x': no such local file or folder, and it could not"):
        beit.load_model("microsoft/beit-x")


def test_save_model_onto_an_existing_file_says_it_writes_a_folder(tmp_path) -> None:
    """``beit.save_model(model, "mk.py")`` with that file present: ``mkdir``'s bare ``[Errno 17] File exists``; now
    the file is named and the folder it needs said, before anything is written (export_hf alike)."""
    model = beit.create_model("beit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    taken = tmp_path / "mk.py"
    taken.write_text("print('mine')")
    for save in (beit.save_model, beit.interop.export_hf):
        with pytest.raises(FileExistsError, match=rf"^{re.escape(str(taken))} is a file: \w+ writes a folder"):
            save(model, taken)
    assert taken.read_text() == "print('mine')"
    assert (beit.save_model(model, tmp_path / "new" / "m") / "config.json").exists()  # parents made
