"""Our BEiT equals timm's and Hugging Face's on the same weights, both ways, for every layout."""

from __future__ import annotations

import json
import re

import pytest
import torch

import beit
from _interop_helpers import randomize as _randomize
from beit.interop import CheckpointError, export_hf, export_timm

timm_beit = pytest.importorskip("timm.models.beit")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
TINY = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2)



def _images(n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _mask(n: int = 2, side: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    m = torch.rand(n, side * side, generator=g) < 0.4
    m[:, 0] = True
    return m


def _timm(shared: bool, init_values: float | None, pool: str, abs_pos: bool):
    m = timm_beit.Beit(
        img_size=32, patch_size=4, num_classes=5, embed_dim=32, depth=2, num_heads=2, global_pool=pool,
        init_values=init_values, use_abs_pos_emb=abs_pos, use_rel_pos_bias=not shared,
        use_shared_rel_pos_bias=shared,
    )
    return _randomize(m)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("init_values", [0.1, None])
@pytest.mark.parametrize("pool", ["avg", "token"])
def test_timm_roundtrip(shared: bool, init_values: float | None, pool: str) -> None:
    ref = _timm(shared, init_values, pool, abs_pos=shared)
    x = _images()
    ours = beit.load_model(ref.state_dict())
    assert ours.cfg.use_shared_rel_pos_bias == shared and ours.cfg.use_mean_pooling == (pool == "avg")
    with torch.no_grad():
        expected = ref(x)
        torch.testing.assert_close(ours(x), expected, atol=TOL, rtol=0)
        back = _timm(shared, init_values, pool, abs_pos=shared)
        back.load_state_dict(export_timm(ours), strict=True)
        torch.testing.assert_close(back(x), expected, atol=TOL, rtol=0)


def _hf_config(**kw):
    base = dict(
        image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, vocab_size=40, num_labels=5,
    )
    base.update(kw)
    return transformers.BeitConfig(**base)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("layer_scale", [0.1, 0.0])
@pytest.mark.parametrize("mean_pool", [True, False])
def test_hf_classifier_roundtrip(tmp_path, shared: bool, layer_scale: float, mean_pool: bool) -> None:
    cfg = _hf_config(
        use_relative_position_bias=not shared, use_shared_relative_position_bias=shared,
        layer_scale_init_value=layer_scale, use_mean_pooling=mean_pool, use_absolute_position_embeddings=not shared,
    )
    ref = _randomize(transformers.BeitForImageClassification(cfg))
    ref.save_pretrained(tmp_path / "hf")
    x = _images()
    with torch.no_grad():
        expected = ref(pixel_values=x).logits
        ours = beit.load_model(tmp_path / "hf")
        assert ours.cfg.layer_norm_eps == pytest.approx(1e-12)
        torch.testing.assert_close(ours(x), expected, atol=TOL, rtol=0)
        # in-memory state dict with transformers' own (possibly renamed) keys
        ours2 = beit.load_model(ref.state_dict(), num_heads=2)
        torch.testing.assert_close(ours2(x), expected, atol=TOL, rtol=0)
        export_hf(ours, tmp_path / "back")
        back = transformers.BeitForImageClassification.from_pretrained(tmp_path / "back").eval()
        torch.testing.assert_close(back(pixel_values=x).logits, expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("layer_scale", [0.1, 0.0])
@pytest.mark.parametrize("mean_pool", [True, False])
def test_hf_mim_roundtrip(tmp_path, shared: bool, layer_scale: float, mean_pool: bool) -> None:
    cfg = _hf_config(
        use_relative_position_bias=not shared, use_shared_relative_position_bias=shared, use_mask_token=True,
        layer_scale_init_value=layer_scale, use_mean_pooling=mean_pool,
    )
    ref = _randomize(transformers.BeitForMaskedImageModeling(cfg))
    ref.save_pretrained(tmp_path / "hf")
    x, mask = _images(), _mask()
    with torch.no_grad():
        expected = ref(pixel_values=x, bool_masked_pos=mask).logits[mask]
        ours = beit.load_model(tmp_path / "hf")
        assert ours.cfg.head == "mim" and ours.cfg.vocab_size == 40
        got = ours(x, mask)
        assert got.shape == (int(mask.sum()), 40)
        torch.testing.assert_close(got, expected, atol=TOL, rtol=0)
        export_hf(ours, tmp_path / "back")
        # the exported file holds exactly the tensors transformers itself saved
        from safetensors.torch import load_file

        theirs, mine = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
        assert sorted(theirs) == sorted(mine)
        for k in theirs:
            torch.testing.assert_close(mine[k], theirs[k], atol=0, rtol=0)
        if not mean_pool:
            # transformers 5 swaps `layernorm` and `beit.layernorm` when it reloads even its own save of this
            # (rare) layout, so only the file-level equality above is checked for it
            return
        back = transformers.BeitForMaskedImageModeling.from_pretrained(tmp_path / "back").eval()
        torch.testing.assert_close(back(pixel_values=x, bool_masked_pos=mask).logits[mask], expected, atol=TOL, rtol=0)


def _unilm_pretrain_state(hf_model) -> dict:
    """The official pre-training checkpoint layout, written out by hand from a HF model's weights."""
    sd = {k: v.clone() for k, v in hf_model.state_dict().items()}
    out = {}
    out["cls_token"] = sd["beit.embeddings.cls_token"]
    out["mask_token"] = sd["beit.embeddings.mask_token"]
    out["patch_embed.proj.weight"] = sd["beit.embeddings.patch_embeddings.projection.weight"]
    out["patch_embed.proj.bias"] = sd["beit.embeddings.patch_embeddings.projection.bias"]
    out["rel_pos_bias.relative_position_bias_table"] = sd["beit.shared_position_bias.relative_position_bias_table"]
    out["rel_pos_bias.relative_position_index"] = torch.zeros(65, 65, dtype=torch.long)  # derived, dropped
    for i in range(2):
        p, q = f"beit.layers.{i}.", f"blocks.{i}."
        out[q + "gamma_1"], out[q + "gamma_2"] = sd[p + "lambda_1"], sd[p + "lambda_2"]
        out[q + "norm1.weight"], out[q + "norm1.bias"] = sd[p + "layernorm_before.weight"], sd[p + "layernorm_before.bias"]
        out[q + "norm2.weight"], out[q + "norm2.bias"] = sd[p + "layernorm_after.weight"], sd[p + "layernorm_after.bias"]
        out[q + "attn.qkv.weight"] = torch.cat(
            [sd[p + "attention.q_proj.weight"], sd[p + "attention.k_proj.weight"], sd[p + "attention.v_proj.weight"]]
        )
        out[q + "attn.q_bias"], out[q + "attn.v_bias"] = sd[p + "attention.q_proj.bias"], sd[p + "attention.v_proj.bias"]
        out[q + "attn.proj.weight"], out[q + "attn.proj.bias"] = sd[p + "attention.o_proj.weight"], sd[p + "attention.o_proj.bias"]
        for a in ("fc1", "fc2"):
            out[q + f"mlp.{a}.weight"], out[q + f"mlp.{a}.bias"] = sd[p + f"mlp.{a}.weight"], sd[p + f"mlp.{a}.bias"]
    out["norm.weight"], out["norm.bias"] = sd["layernorm.weight"], sd["layernorm.bias"]
    out["lm_head.weight"], out["lm_head.bias"] = sd["lm_head.weight"], sd["lm_head.bias"]
    return {"model": out, "epoch": 799, "args": None}


def test_official_pretrain_layout_and_finetune_conversion(tmp_path) -> None:
    cfg = _hf_config(use_relative_position_bias=False, use_shared_relative_position_bias=True, use_mask_token=True,
                     layer_norm_eps=1e-6)
    ref = _randomize(transformers.BeitForMaskedImageModeling(cfg))
    path = tmp_path / "beit_pt.pth"
    torch.save(_unilm_pretrain_state(ref), path)
    x, mask = _images(), _mask()
    with torch.no_grad():
        mim = beit.load_model(path)
        torch.testing.assert_close(mim(x, mask), ref(pixel_values=x, bool_masked_pos=mask).logits[mask], atol=TOL, rtol=0)
        # shared pre-training table -> one table per block, new 7-class head, as official fine-tuning does
        cls = beit.load_model(path, head="cls", num_classes=7, use_rel_pos_bias=True,
                              use_shared_rel_pos_bias=False, use_mean_pooling=True)
        assert cls.rel_pos_bias is None and cls.blocks[1].attn.relative_position_bias_table is not None
        torch.testing.assert_close(cls.blocks[1].attn.relative_position_bias_table,
                                   mim.rel_pos_bias.relative_position_bias_table)
        torch.testing.assert_close(cls.get_intermediate_layers(x)[-1], mim.get_intermediate_layers(x)[-1])
        assert cls(x).shape == (2, 7)


def test_relpos_interpolation_identity_and_new_resolution() -> None:
    ref = _timm(False, 0.1, "avg", abs_pos=True)
    x = _images()
    same = beit.load_model(ref.state_dict(), img_size=32)
    with torch.no_grad():
        torch.testing.assert_close(same(x), ref(x), atol=TOL, rtol=0)
        big = beit.load_model(ref.state_dict(), img_size=48)
        assert big.blocks[0].attn.relative_position_bias_table.shape[0] == (2 * 12 - 1) ** 2 + 3
        assert big.pos_embed.shape[1] == 12 * 12 + 1
        out = big(_images(size=48))
        assert out.shape == (2, 5) and torch.isfinite(out).all()
        # run-time resampling for dense tasks gives the same as resampling at load time
        feats_runtime = same.forward_intermediates(_images(size=48), (1,))[0]
        feats_loaded = big.forward_intermediates(_images(size=48), (1,))[0]
        torch.testing.assert_close(feats_runtime, feats_loaded, atol=1e-5, rtol=0)


def test_save_load_roundtrip_and_convert_cli(tmp_path) -> None:
    model = _randomize(beit.create_model("beit_tiny_patch16_224", **TINY, num_classes=3))
    beit.save_model(model, tmp_path / "ours")
    meta = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert meta["format"] == "beit" and meta["config"]["embed_dim"] == 32
    again = beit.load_model(tmp_path / "ours")
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), atol=0, rtol=0)
    from beit.cli import main

    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    back = transformers.BeitForImageClassification.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(pixel_values=x).logits, model(x), atol=TOL, rtol=0)
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "ours2")]) == 0
    assert main(["convert", str(tmp_path / "ours2"), str(tmp_path / "t.pth"), "--to", "timm"]) == 0
    timm_model = timm_beit.Beit(img_size=32, patch_size=4, num_classes=3, embed_dim=32, depth=2, num_heads=2,
                                init_values=0.1, use_abs_pos_emb=False, use_rel_pos_bias=True)
    timm_model.load_state_dict(torch.load(tmp_path / "t.pth", weights_only=True), strict=True)


def test_clear_errors(tmp_path) -> None:
    model = beit.create_model("beit_tiny_patch16_224", **TINY, num_classes=3)
    path = tmp_path / "m.pth"
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError, match=r"m\.pth: tensor .cls_token. has shape \(1, 1, 32\).*needs \(1, 1, 64\) "
                                              r"\(check the overrides that change .*: embed_dim=64\)"):
        beit.load_model(path, embed_dim=64, num_heads=2)
    sd = model.state_dict()  # no override: the file disagrees with itself (fc1 edited), which the message says
    sd["blocks.0.mlp.fc1.weight"] = torch.zeros(7, 7)
    torch.save(sd, tmp_path / "edited.pth")
    with pytest.raises(CheckpointError, match=r"edited\.pth: .*no override changes the checkpoint's architecture"):
        beit.load_model(tmp_path / "edited.pth", num_classes=5)
    truncated = tmp_path / "cut.pth"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cut.pth"):
        beit.load_model(truncated)
    other = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(3)}, other)
    with pytest.raises(CheckpointError, match="not a BEiT checkpoint"):
        beit.load_model(other)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        beit.load_model(tmp_path / "nowhere.pth")


class _Evil:
    def __reduce__(self):
        return (open, ("/tmp/beit_pwned_marker", "w"))


def test_pickled_code_is_never_run(tmp_path) -> None:
    import os

    marker = "/tmp/beit_pwned_marker"
    if os.path.exists(marker):
        os.remove(marker)
    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": _Evil()}}, path)
    with pytest.raises(CheckpointError, match="evil.pth"):
        beit.load_model(path)
    assert not os.path.exists(marker)


def test_hub_id_and_url_offline(tmp_path, monkeypatch) -> None:
    """Hub ids and URLs resolve through the usual caches; here pre-filled, so no network is touched."""
    cfg = _hf_config(use_relative_position_bias=True)
    ref = _randomize(transformers.BeitForImageClassification(cfg))
    hf_home = tmp_path / "hf_home"
    snap = hf_home / "hub" / "models--microsoft--beit-tiny-test" / "snapshots" / ("a" * 40)
    ref.save_pretrained(snap)
    (snap.parent.parent / "refs").mkdir(parents=True)
    (snap.parent.parent / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(hf_home / "hub"), raising=False)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True, raising=False)
    x = _images()
    with torch.no_grad():
        expected = ref(pixel_values=x).logits
        torch.testing.assert_close(beit.load_model("microsoft/beit-tiny-test")(x), expected, atol=TOL, rtol=0)
    pth = tmp_path / "release.pth"
    torch.save({"model": beit.load_model("microsoft/beit-tiny-test").state_dict()}, pth)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    model = beit.load_model(pth.as_uri())
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=TOL, rtol=0)
    assert (tmp_path / "torch_home" / "hub" / "checkpoints" / "release.pth").exists()


def test_saved_weights_get_the_umask_mode_like_every_other_file(tmp_path) -> None:
    """safetensors' save_file creates 0600 files: a model shared on a cluster would be unreadable to the team.
    Every weight file we write gets 0666 & ~umask, as config.json beside it."""
    import os

    from beit.tokenizers import DiscreteVAE
    from beit.tokenizers.dvae import DVAEConfig

    old = os.umask(0o022)
    try:
        model = beit.create_model("beit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=3)
        beit.save_model(model, tmp_path / "m")
        export_hf(model, tmp_path / "hf")
        DiscreteVAE(DVAEConfig(vocab_size=8, hidden=4, downsample=4, num_res_blocks=0, codebook_dim=4)).save(
            tmp_path / "tok.safetensors")
        for f in (tmp_path / "m" / "model.safetensors", tmp_path / "m" / "config.json",
                  tmp_path / "hf" / "model.safetensors", tmp_path / "tok.safetensors"):
            assert oct(f.stat().st_mode & 0o777) == oct(0o644), f
    finally:
        os.umask(old)


def test_a_new_head_does_not_keep_the_checkpoints_class_names(tmp_path) -> None:
    """A 5-class Hugging Face classifier loaded with num_classes=3 kept the 5 names: its export_hf wrote 5 labels
    for a 3-class head (transformers refused it), and beit predict refused the saved model."""
    names = {i: f"c{i}" for i in range(5)}
    ref = _randomize(transformers.BeitForImageClassification(
        _hf_config(id2label=names, label2id={n: i for i, n in names.items()})))
    ref.save_pretrained(tmp_path / "hf")
    assert beit.load_model(tmp_path / "hf").cfg.extra["class_names"] == list(names.values())
    for over in (dict(num_classes=3), dict(head="none"), dict(head="mim")):
        assert "class_names" not in beit.load_model(tmp_path / "hf", **over).cfg.extra, over
    model = beit.load_model(tmp_path / "hf", num_classes=3)
    export_hf(model, tmp_path / "back")
    back = transformers.BeitForImageClassification.from_pretrained(tmp_path / "back").eval()
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(back(pixel_values=x).logits, model(x), atol=TOL, rtol=0)


@pytest.mark.parametrize("mim_head_norm", [False, True])
def test_export_timm_of_a_pretraining_model_loads_strictly_into_timm(mim_head_norm: bool) -> None:
    """timm's Beit has no MIM head: export_timm kept mask_token and lm_head, and load_state_dict(strict=True)
    (what its docstring promises, and what `beit convert pt.pth t.pth --to timm` is for) failed on them."""
    mim = _randomize(beit.create_model("beit_tiny_patch16_224", **TINY, head="mim", vocab_size=40,
                                       mim_head_norm=mim_head_norm))
    sd = export_timm(mim)
    ref = timm_beit.Beit(img_size=32, patch_size=4, num_classes=0, embed_dim=32, depth=2, num_heads=2,
                         global_pool="token", init_values=0.1, use_abs_pos_emb=False, use_rel_pos_bias=False,
                         use_shared_rel_pos_bias=True).eval()
    ref.load_state_dict(sd, strict=True)
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(ref.forward_features(x), mim.forward_features(x), atol=TOL, rtol=0)


@pytest.mark.parametrize("over", [dict(img_size=(32, 48), patch_size=8), dict(attn_head_dim=8)])
def test_export_hf_refuses_what_transformers_cannot_hold_before_writing(tmp_path, over) -> None:
    """transformers reshapes the relative-position table as a square grid: a non-square model exported silently and
    its logits differed (or its pos_embed crashed transformers). An unexportable model also left model.safetensors
    behind without a config.json."""
    model = beit.create_model("beit_tiny_patch16_224", **{**TINY, **over}, num_classes=3)
    with pytest.raises(ValueError, match="Hugging Face BEiT needs"):
        export_hf(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("to,name", [("hf", "hf/model.safetensors"), ("timm", "t.pth")])
def test_convert_dtype_applies_to_every_output_format(tmp_path, to: str, name: str) -> None:
    """`beit convert --to hf --dtype bf16` (or --to timm) wrote fp32 weights without a word."""
    from safetensors.torch import load_file

    from beit.cli import main

    model = _randomize(beit.create_model("beit_tiny_patch16_224", **TINY, num_classes=3))
    beit.save_model(model, tmp_path / "ours")
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / name.split("/")[0]), "--to", to,
                 "--dtype", "bf16"]) == 0
    out = tmp_path / name
    sd = load_file(out) if to == "hf" else torch.load(out, weights_only=True)
    assert {v.dtype for v in sd.values() if v.is_floating_point()} == {torch.bfloat16}
    back = beit.load_model(tmp_path / name.split("/")[0] if to == "hf" else out)
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), atol=3e-2, rtol=0)


def test_an_mlp_width_that_is_no_round_ratio_of_the_width_loads() -> None:
    """A Hugging Face checkpoint of width 56 and intermediate_size 115: the ratio read off the tensors, 115 / 56,
    built int(56 * (115 / 56)) = 114 MLP units, and loading failed saying the file disagreed with itself."""
    ref = _randomize(transformers.BeitForImageClassification(_hf_config(hidden_size=56, intermediate_size=115)))
    x = _images()
    ours = beit.load_model(ref.state_dict(), num_heads=2)
    assert ours.blocks[0].mlp.fc1.out_features == 115
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(pixel_values=x).logits, atol=TOL, rtol=0)


def test_a_hugging_face_model_folder_brings_its_preprocessing(tmp_path) -> None:
    """Hugging Face keeps a model's eval preprocessing in preprocessor_config.json (microsoft/beit-base-patch16-224:
    the whole image to 224 px, bilinear, mean = std = 0.5); it was not read, and beit predict / evaluate fed such a
    model ImageNet-normalised center crops: other logits than transformers' own for the same image."""
    import numpy as np
    from PIL import Image

    from beit.tasks.classify.data import build_preprocess
    from beit.tasks.classify.evaluate import load_classifier

    ref = _randomize(transformers.BeitForImageClassification(_hf_config(use_relative_position_bias=True)))
    ref.save_pretrained(tmp_path / "hf")
    proc = transformers.BeitImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False, resample=2,
                                           image_mean=[0.5] * 3, image_std=[0.5] * 3)
    proc.save_pretrained(tmp_path / "hf")
    _, _, pre = load_classifier(tmp_path / "hf")
    assert (pre.resize, pre.img_size, pre.interpolation, tuple(pre.mean)) == ("full", 32, "bilinear", (0.5,) * 3)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8))
    theirs = proc(image, return_tensors="pt")["pixel_values"]
    ours = build_preprocess(pre)(image)[None]
    torch.testing.assert_close(ours, theirs, atol=2e-2, rtol=0)
    model = beit.load_model(tmp_path / "hf")
    assert beit.load_model(tmp_path / "hf", num_classes=3).cfg.eval_preprocess() == pre  # kept with a new head
    beit.save_model(model, tmp_path / "ours")  # and carried into our format
    assert load_classifier(tmp_path / "ours")[2] == pre
    with torch.no_grad():
        torch.testing.assert_close(model(ours), ref(pixel_values=theirs).logits, atol=5e-2, rtol=0)


def test_convert_to_timm_onto_a_folder_is_one_line(tmp_path, capsys) -> None:
    """`beit convert src existing_dir/ --to timm` ended in torch.save's RuntimeError traceback ("Is a directory")."""
    from beit.cli import main

    beit.save_model(beit.create_model("beit_tiny_patch16_224", **TINY, num_classes=3), tmp_path / "ours")
    (tmp_path / "out").mkdir()
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "out"), "--to", "timm"]) == 1
    assert "is a folder: --to timm writes one state-dict file" in capsys.readouterr().err
    # a folder not made yet, said with its slash: it was written as a file named "new"
    assert main(["convert", str(tmp_path / "ours"), f"{tmp_path / 'new'}/", "--to", "timm"]) == 1
    assert "is a folder: --to timm writes one state-dict file" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("resize", ["full", "crop"])
def test_export_hf_writes_the_image_processor_transformers_loads(tmp_path, resize) -> None:
    """export_hf wrote no preprocessor_config.json: AutoImageProcessor.from_pretrained / pipeline() on the export
    failed, and the model's eval preprocessing (its mean / std, resize) was lost on the way to transformers."""
    import numpy as np
    from PIL import Image

    from beit.models.config import Preprocess
    from beit.tasks.classify.data import build_preprocess

    pre = Preprocess(img_size=32, resize=resize, crop_pct=0.8, interpolation="bilinear", mean=(0.5,) * 3,
                     std=(0.25,) * 3)
    model = beit.create_model("beit_tiny_patch16_224", **TINY, num_classes=3)
    model = beit.load_model(model.state_dict(), **TINY, num_classes=3)
    model.cfg = model.cfg.with_preprocess(pre)
    export_hf(model, tmp_path / "hf")
    proc = transformers.AutoImageProcessor.from_pretrained(tmp_path / "hf")
    # the crop resize is ours for square images only (the processor squashes before it crops): a square one there
    shape = (40, 56, 3) if resize == "full" else (48, 48, 3)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8))
    torch.testing.assert_close(proc(image, return_tensors="pt")["pixel_values"], build_preprocess(pre)(image)[None],
                               atol=5e-2, rtol=0)
    back = beit.load_model(tmp_path / "hf").cfg.eval_preprocess()  # and read back as it was
    assert (back.resize, back.img_size, back.interpolation, back.mean, back.std) == (
        resize, 32, "bilinear", pre.mean, pre.std)
    assert back.crop_pct == pytest.approx(0.8, abs=0.03) if resize == "crop" else True


def test_a_sharded_hugging_face_checkpoint_loads(tmp_path) -> None:
    """save_pretrained(max_shard_size=...) writes model-0000N-of-0000M.safetensors and an index: the folder was
    refused as having 'no weights file'. A shard missing is named."""
    ref = _randomize(transformers.BeitForImageClassification(_hf_config(use_relative_position_bias=True)))
    ref.save_pretrained(tmp_path / "hf", max_shard_size="50KB")
    shards = sorted((tmp_path / "hf").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "hf" / "model.safetensors.index.json").exists()
    ours = beit.load_model(tmp_path / "hf", strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(pixel_values=x).logits, atol=TOL, rtol=0)
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=f"its shard {shards[-1].name} is missing"):
        beit.load_model(tmp_path / "hf")
    shards[-1].mkdir()  # a folder of the shard's name: IsADirectoryError, in a traceback
    with pytest.raises(CheckpointError, match=f"its shard {shards[-1].name} is missing"):
        beit.load_model(tmp_path / "hf")


@pytest.mark.parametrize("size,crop", [(225, 192), (14, 9), (256, 224)])
def test_a_hugging_face_center_crop_is_read_with_its_own_resize(size: int, crop: int) -> None:
    """crop_pct = crop / size read back through the eval transform's int(crop / crop_pct) came out a pixel short
    for some sizes (size 225, crop 192: ours resized to 224), and ours -> HF -> ours moved the resize the same way."""
    from beit.data.transforms import build_eval_transform
    from beit.interop.infer import preprocess_from_hf, preprocess_to_hf
    from beit.models.config import Preprocess

    pre = Preprocess.from_dict(preprocess_from_hf({"size": size, "crop_size": crop}))
    assert build_eval_transform(crop, crop_pct=pre.crop_pct).transforms[0].size == size
    assert preprocess_to_hf(pre)["size"] == {"height": size, "width": size}


@pytest.mark.parametrize("pp", [dict(size=-32, do_center_crop=False), dict(size=40, crop_size=-32),
                                dict(size=32, do_center_crop=False, image_std=[0, 0, 0]),
                                dict(size=32, do_center_crop=False, rescale_factor=1 / 127.5, image_mean=[1] * 3,
                                     image_std=[1] * 3),
                                dict(size=32, do_center_crop=False, resample=9)])
def test_a_preprocessor_config_no_processor_runs_is_ignored_at_load(tmp_path, pp, caplog) -> None:
    """A size of -32 px, a std of 0 or an unknown resample filter was taken as the model's preprocessing (beit
    predict failed later on 'input_size must be a positive int', naming no file; save_model stored it), and a
    rescale_factor other than 1 / 255 was dropped: other pixels than transformers' without a word."""
    ref = _randomize(transformers.BeitForImageClassification(_hf_config()))
    ref.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "preprocessor_config.json").write_text(json.dumps(pp))
    with caplog.at_level("WARNING"):
        model = beit.load_model(tmp_path / "hf")
    assert "preprocess" not in model.cfg.extra
    assert "not a preprocessing beit reproduces" in caplog.text


@pytest.mark.parametrize("pp,resize,crop_pct", [(dict(do_center_crop=False), "full", None),
                                                 (dict(crop_pct=0.9), "crop", 0.9), ({"size": None}, "crop", None)])
def test_a_preprocessor_config_without_a_size_keeps_its_other_fields(tmp_path, caplog, pp, resize, crop_pct) -> None:
    """A preprocessor_config.json without `size` was ignored whole (mean = std = 0.5 lost: ImageNet-normalised
    inputs), the warning not saying why: its other fields are used at the model's image size, the warning names
    the file and the missing size."""
    ref = _randomize(transformers.BeitForImageClassification(_hf_config()))
    ref.save_pretrained(tmp_path / "hf")
    pp_file = tmp_path / "hf" / "preprocessor_config.json"
    pp_file.write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.25] * 3, "resample": 2, **pp}))
    with caplog.at_level("WARNING"):
        pre = beit.load_model(tmp_path / "hf").cfg.eval_preprocess()
    assert (pre.img_size, pre.resize, pre.crop_pct, pre.interpolation) == (32, resize, crop_pct, "bilinear")
    assert (pre.mean, pre.std) == ((0.5,) * 3, (0.25,) * 3)
    assert f"{pp_file}: no 'size'" in caplog.text
    # the model's size is the one it is built at: an img_size override's, not the checkpoint's 32
    assert beit.load_model(tmp_path / "hf", img_size=48).cfg.eval_preprocess().img_size == 48


@pytest.mark.parametrize("field,value", [("size", "224"), ("size", 32.0), ("size", {"h": 32}),
                                         ("size", {"height": "32", "width": "32"}), ("crop_size", [32])])
def test_a_preprocessor_config_with_an_unparseable_size_is_refused_naming_it(tmp_path, field, value) -> None:
    """A size no image processor takes ("224", {"h": 32}; transformers refuses the file) was ignored with 'not a
    preprocessing beit reproduces', as if the file were only unusual: the load fails naming the file and field.
    A pair is (height, width), as transformers reads it."""
    ref = _randomize(transformers.BeitForImageClassification(_hf_config()))
    ref.save_pretrained(tmp_path / "hf")
    pp_file = tmp_path / "hf" / "preprocessor_config.json"
    pp_file.write_text(json.dumps({"size": 36, "crop_size": 32, field: value}))
    with pytest.raises(ValueError, match=f"^{re.escape(str(pp_file))}: '{field}' is .*not a size an image processor"):
        beit.load_model(tmp_path / "hf")
    pp_file.write_text(json.dumps({"size": [32, 32], "do_center_crop": False}))
    assert beit.load_model(tmp_path / "hf").cfg.eval_preprocess().img_size == 32


@pytest.mark.parametrize("crop_pct,warned", [(0.9, True), (0.8, False)])
def test_export_hf_says_when_transformers_center_crop_starts_a_pixel_before_ours(tmp_path, caplog, crop_pct,
                                                                                  warned) -> None:
    """README said the exported processor equals ours for square images; with a 3-px margin (32 px from 35) its
    crop starts at 1, torchvision's at round(1.5) = 2: other pixels, and pipeline() gave other scores than beit
    predict, without a word."""
    import numpy as np
    from PIL import Image

    from beit.models.config import Preprocess
    from beit.tasks.classify.data import build_preprocess

    pre = Preprocess(img_size=32, resize="crop", crop_pct=crop_pct, interpolation="bilinear")
    model = beit.create_model("beit_tiny_patch16_224", **TINY, num_classes=3)
    model.cfg = model.cfg.with_preprocess(pre)
    with caplog.at_level("WARNING"):
        export_hf(model, tmp_path / "hf")
    assert ("starts a pixel before ours" in caplog.text) == warned
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8))
    theirs = transformers.AutoImageProcessor.from_pretrained(tmp_path / "hf")(image, return_tensors="pt")
    assert torch.allclose(theirs["pixel_values"][0], build_preprocess(pre)(image), atol=1e-3) != warned
    caplog.clear()
    with caplog.at_level("WARNING"):
        beit.load_model(tmp_path / "hf")
    assert ("starts a pixel before ours" in caplog.text) == warned
