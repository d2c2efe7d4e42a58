"""The BEiT family loads: data2vec-vision (transformers), DiT (HF Beit and unilm/detectron2 layouts), BEiT v2.

Each reference model gets tiny random weights; ours must give the same outputs (fp32, 1e-4).
"""

from __future__ import annotations

import logging

import pytest
import torch

import beit
from _interop_helpers import randomize as _randomize

timm_beit = pytest.importorskip("timm.models.beit")
transformers = pytest.importorskip("transformers")

TOL = 1e-4



def _images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _mask(n: int = 2) -> torch.Tensor:
    m = torch.rand(n, 64, generator=torch.Generator().manual_seed(2)) < 0.4
    m[:, 0] = True
    return m


SMALL = dict(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
             intermediate_size=128, num_labels=5)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.mark.parametrize(
    "pos", [dict(use_relative_position_bias=True), dict(use_absolute_position_embeddings=True),
            dict(use_relative_position_bias=True, use_mean_pooling=False, layer_scale_init_value=0.0)],
    ids=["relpos", "abspos", "cls-token"],
)
def test_data2vec_vision_classifier(tmp_path, pos) -> None:
    ref = _randomize(transformers.Data2VecVisionForImageClassification(transformers.Data2VecVisionConfig(**SMALL, **pos)))
    ref.save_pretrained(tmp_path / "d2v")
    x = _images()
    with torch.no_grad():
        expected = ref(pixel_values=x).logits
        ours = beit.load_model(tmp_path / "d2v")
        assert ours.cfg.layer_norm_eps == pytest.approx(1e-12) and ours.cfg.num_classes == 5
        torch.testing.assert_close(ours(x), expected, atol=TOL, rtol=0)
        torch.testing.assert_close(beit.load_model(ref.state_dict(), num_heads=2)(x), expected, atol=TOL, rtol=0)


def test_data2vec_vision_model_and_segmentation_backbone(tmp_path, caplog) -> None:
    cfg = transformers.Data2VecVisionConfig(**SMALL, use_relative_position_bias=True, out_indices=[0, 1, 1, 1])
    ref = _randomize(transformers.Data2VecVisionModel(cfg))
    ref.save_pretrained(tmp_path / "d2v")
    x = _images()
    with torch.no_grad():
        out = ref(pixel_values=x)
        ours = beit.load_model(tmp_path / "d2v")
        assert ours.cfg.head == "none"  # transformers 5 saves Data2VecVisionModel without a pooler
        torch.testing.assert_close(ours.forward_features(x), out.last_hidden_state, atol=TOL, rtol=0)
        seg = _randomize(transformers.Data2VecVisionForSemanticSegmentation(cfg))
        seg.save_pretrained(tmp_path / "seg")
        with caplog.at_level(logging.INFO, logger="beit.interop"):
            backbone = beit.load_model(tmp_path / "seg", head="none")
        assert "left out" in caplog.text and "decode_head" in caplog.text
        hidden = seg.data2vec_vision(pixel_values=x, output_hidden_states=True).hidden_states
        ours_maps = backbone.forward_intermediates(x, (0, 1))
        for i, fmap in enumerate(ours_maps):
            expected = hidden[i + 1][:, 1:].transpose(1, 2).reshape(2, 32, 8, 8)
            torch.testing.assert_close(fmap, expected, atol=TOL, rtol=0)


DIT = dict(use_absolute_position_embeddings=True, use_relative_position_bias=False, use_mask_token=True,
           use_mean_pooling=True, layer_scale_init_value=0.1, vocab_size=40)


def test_dit_hf_checkpoints(tmp_path) -> None:
    """microsoft/dit-*: transformers Beit classes with absolute position embeddings and no rel-pos tables."""
    x, mask = _images(), _mask()
    mim = _randomize(transformers.BeitForMaskedImageModeling(transformers.BeitConfig(**SMALL, **DIT)))
    mim.save_pretrained(tmp_path / "dit-base")
    cls = _randomize(transformers.BeitForImageClassification(transformers.BeitConfig(**SMALL, **DIT)))
    cls.save_pretrained(tmp_path / "dit-base-finetuned")
    with torch.no_grad():
        ours = beit.load_model(tmp_path / "dit-base")
        assert ours.cfg.use_abs_pos_emb and not ours.cfg.use_rel_pos_bias and ours.cfg.head == "mim"
        torch.testing.assert_close(ours(x, mask), mim(pixel_values=x, bool_masked_pos=mask).logits[mask],
                                   atol=TOL, rtol=0)
        torch.testing.assert_close(beit.load_model(tmp_path / "dit-base-finetuned")(x), cls(pixel_values=x).logits,
                                   atol=TOL, rtol=0)


def _timm(**kw) -> torch.nn.Module:
    args = dict(img_size=32, patch_size=4, num_classes=0, embed_dim=32, depth=2, num_heads=2, init_values=0.1,
                global_pool="token")
    args.update(kw)
    return _randomize(timm_beit.Beit(**args))


def test_dit_unilm_detectron2_layout() -> None:
    """unilm dit/object_detection checkpoints: the encoder under backbone.bottom_up.backbone., FPN beside it."""
    ref = _timm(use_abs_pos_emb=True, use_rel_pos_bias=False)
    sd = {"backbone.bottom_up.backbone." + k: v for k, v in ref.state_dict().items()}
    sd.update({"backbone.fpn_lateral2.weight": torch.zeros(8, 32, 1, 1),
               "roi_heads.box_predictor.cls_score.weight": torch.zeros(6, 8)})
    x = _images()
    with torch.no_grad():
        # no rel-pos table: the head count comes from the detectron2 config, here passed by hand
        ours = beit.load_model({"model": sd, "iteration": 60000}, head="none", num_heads=2)
        torch.testing.assert_close(ours.forward_features(x), ref.forward_features(x), atol=TOL, rtol=0)


def _unilm_mim_tokens(ref: torch.nn.Module, mask_token: torch.Tensor, x: torch.Tensor, mask: torch.Tensor):
    """unilm beit2 ``forward_features`` written with timm's modules: masked patches -> mask token, then blocks."""
    t = ref.patch_embed(x)
    w = mask.unsqueeze(-1).float()
    t = torch.cat([ref.cls_token.expand(t.shape[0], -1, -1), t * (1 - w) + mask_token * w], dim=1)
    shared = ref.rel_pos_bias()
    for blk in ref.blocks:
        t = blk(t, shared_rel_pos_bias=shared)
    return ref.norm(t)


@pytest.mark.parametrize("shared_lm_head", [True, False])
def test_beit_v2_pretraining_checkpoint(tmp_path, caplog, shared_lm_head) -> None:
    """unilm beit2 VisionTransformerForMaskedImageModelingCLS: a BEiT MIM model plus patch-aggregation layers."""
    ref = _timm(use_abs_pos_emb=False, use_rel_pos_bias=False, use_shared_rel_pos_bias=True)
    sd = dict(ref.state_dict())
    g = torch.Generator().manual_seed(3)
    sd["mask_token"] = torch.randn(1, 1, 32, generator=g)
    sd["lm_head.weight"], sd["lm_head.bias"] = torch.randn(40, 32, generator=g), torch.randn(40, generator=g)
    for k, v in ref.blocks[0].state_dict().items():  # the two extra blocks on top of early layers
        for i in (0, 1):
            sd[f"cls_pt_layers.{i}.{k}"] = torch.randn(v.shape, generator=g)
    if not shared_lm_head:
        sd["cls_pt_norm.weight"], sd["cls_pt_norm.bias"] = torch.ones(32), torch.zeros(32)
        sd["cls_pt_lm_head.weight"], sd["cls_pt_lm_head.bias"] = torch.zeros(40, 32), torch.zeros(40)
    path = tmp_path / "beitv2_pt.pth"
    torch.save({"model": sd, "epoch": 299}, path)
    x, mask = _images(), _mask()
    with caplog.at_level(logging.INFO, logger="beit.interop"), torch.no_grad():
        ours = beit.load_model(path, strict=True)  # nothing lacking, nothing left without a place
        assert ours.cfg.head == "mim" and ours.cfg.vocab_size == 40 and ours.cfg.use_shared_rel_pos_bias
        tokens = ref.forward_features(x)  # timm's Beit is the v2 encoder; the MIM head reads its normed tokens
        torch.testing.assert_close(ours.forward_features(x), tokens, atol=TOL, rtol=0)
        expected = torch.nn.functional.linear(_unilm_mim_tokens(ref, sd["mask_token"], x, mask)[:, 1:][mask],
                                              sd["lm_head.weight"], sd["lm_head.bias"])
        torch.testing.assert_close(ours(x, mask), expected, atol=TOL, rtol=0)
    assert "BEiT v2 patch-aggregation layers" in caplog.text and "cls_pt_layers." in caplog.text
    with torch.no_grad():  # and as a fine-tuning start point (per-layer tables, mean pooling, new head)
        ft = beit.load_model(path, head="cls", num_classes=3, use_rel_pos_bias=True, use_shared_rel_pos_bias=False,
                             use_mean_pooling=True)
        assert ft(x).shape == (2, 3)
