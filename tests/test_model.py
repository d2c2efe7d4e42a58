"""The backbone itself: shapes, heads, attention paths agree, presets, clear errors."""

from __future__ import annotations

import pytest
import torch

import beit
from beit.models.attention import eager_attention, sdpa_attention

TINY = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2)


def _rand_tables(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "relative_position_bias_table" in n or n.endswith(("q_bias", "v_bias")):
                p.copy_(torch.randn(p.shape, generator=g))


def test_presets_sizes() -> None:
    counts = {}
    for name in ("beit_tiny_patch16_224", "beit_small_patch16_224", "beit_base_patch16_224"):
        with torch.device("meta"):
            m = beit.create_model(name)
        counts[name] = sum(p.numel() for p in m.parameters())
    assert 5.5e6 < counts["beit_tiny_patch16_224"] < 6.5e6
    assert 21e6 < counts["beit_small_patch16_224"] < 23e6
    assert 86e6 < counts["beit_base_patch16_224"] < 87.5e6  # BEiT-B: 86M
    with torch.device("meta"):
        large = beit.create_model("beit_large_patch16_224", head="mim")
    assert large.cfg.init_values == 1e-5 and large.cfg.use_shared_rel_pos_bias and large.rel_pos_bias is not None
    assert 300e6 < sum(p.numel() for p in large.parameters()) < 315e6
    with pytest.raises(ValueError, match="unknown model"):
        beit.create_model("beit_huge")
    with pytest.raises(ValueError, match="unknown BEiT config keys"):
        beit.create_model("beit_tiny_patch16_224", embed_dimm=3)


def test_classifier_and_features() -> None:
    m = beit.create_model("beit_tiny_patch16_224", **TINY, num_classes=7).eval()
    x = torch.randn(3, 3, 32, 32)
    assert m(x).shape == (3, 7)
    assert m.forward_features(x).shape == (3, 65, 32)
    feats = m.forward_intermediates(torch.randn(1, 3, 40, 24), (0, -1))
    assert [f.shape for f in feats] == [(1, 32, 10, 6)] * 2
    assert len(m.get_intermediate_layers(x)) == 2
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        m(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="out of range"):
        m.forward_intermediates(x, (5,))


def test_mim_logits_are_the_masked_rows_in_order() -> None:
    torch.manual_seed(0)
    m = beit.create_model("beit_tiny_patch16_224", **TINY, head="mim", vocab_size=50).eval()
    _rand_tables(m)
    x = torch.randn(2, 3, 32, 32)
    mask = torch.rand(2, 8, 8) < 0.4
    with torch.no_grad():
        got = m(x, mask)
        all_tokens = m.lm_head(m.forward_features(x, mask.flatten(1))[:, 1:])  # the Hugging Face way
        torch.testing.assert_close(got, all_tokens[mask.flatten(1)])
        # masked positions really see the mask token: changing a masked patch's pixels changes nothing
        i, j = [int(v) for v in mask[0].nonzero()[0]]
        x2 = x.clone()
        x2[0, :, i * 4 : i * 4 + 4, j * 4 : j * 4 + 4] += 5
        torch.testing.assert_close(m(x2, mask), got)
    with pytest.raises(ValueError, match="needs bool_masked_pos"):
        m(x)


@pytest.mark.parametrize("shared", [False, True])
def test_sdpa_matches_eager_forward_and_grads(shared: bool) -> None:
    torch.manual_seed(0)
    kw = dict(TINY, use_shared_rel_pos_bias=shared, use_rel_pos_bias=not shared, num_classes=4)
    a = beit.create_model("beit_tiny_patch16_224", attn_impl="eager", **kw)
    _rand_tables(a)
    b = beit.create_model("beit_tiny_patch16_224", attn_impl="sdpa", **kw)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32)
    la, lb = a(x).square().sum(), b(x).square().sum()
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)
    la.backward()
    lb.backward()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-5, msg=n)


def test_attention_functions_agree() -> None:
    q, k, v = (torch.randn(2, 3, 17, 8) for _ in range(3))
    bias = torch.randn(1, 3, 17, 17)
    torch.testing.assert_close(eager_attention(q, k, v, bias), sdpa_attention(q, k, v, bias), rtol=1e-5, atol=1e-5)


def test_layer_ids_and_no_weight_decay() -> None:
    m = beit.create_model("beit_tiny_patch16_224", **TINY, num_classes=3)
    ids = {n: m.layer_id(n) for n, _ in m.named_parameters()}
    assert ids["cls_token"] == 0 and ids["patch_embed.proj.weight"] == 0
    assert ids["blocks.0.attn.qkv.weight"] == 1 and ids["blocks.1.mlp.fc2.bias"] == 2
    assert ids["head.weight"] == 3 and ids["fc_norm.weight"] == 3
    assert {"cls_token", "relative_position_bias_table"} <= m.no_weight_decay()


def test_drop_path_and_layer_scale_config() -> None:
    m = beit.create_model("beit_tiny_patch16_224", **TINY, drop_path_rate=0.2, init_values=None)
    assert m.blocks[0].gamma_1 is None
    assert m.blocks[1].drop_path.drop_prob == pytest.approx(0.2)
    m.train()
    x = torch.randn(4, 3, 32, 32)
    assert not torch.equal(m(x), m(x))  # stochastic depth is active in training
    m.eval()
    assert torch.equal(m(x), m(x))


def test_masks_are_checked_against_the_images() -> None:
    """[B, H, W] or [B, N] of the images' patch grid; anything else (incl. a transposed mask) is refused."""
    torch.manual_seed(0)
    m = beit.create_model("beit_tiny_patch16_224", **dict(TINY, img_size=(32, 48)), head="mim", vocab_size=20).eval()
    x = torch.randn(2, 3, 32, 48)  # patch grid 8 x 12
    mask = torch.rand(2, 8, 12) < 0.4
    with torch.no_grad():
        got = m(x, mask)
        torch.testing.assert_close(m(x, mask.flatten(1)), got, atol=0, rtol=0)
        assert got.shape[0] == int(mask.sum())
        cases = {
            (2, 12, 8): r"bool_masked_pos has shape \[2, 12, 8\] but the images \(batch 2, patch grid 8x12\) "
                        r"need \[2, 8, 12\] or \[2, 96\]",
            (2, 95): r"shape \[2, 95\] .*need \[2, 8, 12\] or \[2, 96\]",
            (1, 96): r"shape \[1, 96\] .*batch 2",
            (2, 4, 24): r"shape \[2, 4, 24\]",
        }
        for shape, msg in cases.items():
            bad = torch.zeros(shape, dtype=torch.bool)
            with pytest.raises(ValueError, match=msg):
                m(x, bad)
            with pytest.raises(ValueError, match=msg):
                m.forward_features(x, bad)
        with pytest.raises(ValueError, match=r"input \(30, 48\) is not divisible by the patch size 4"):
            m(torch.randn(2, 3, 30, 48), mask)
        # a mask that fits the default image size does not fit another input size
        with pytest.raises(ValueError, match=r"patch grid 4x4"):
            m(torch.randn(2, 3, 16, 16), mask)


def test_a_config_field_of_the_wrong_type_is_named() -> None:
    """``create_model(depth="2")`` failed inside a comparison ("'<=' not supported between 'str' and 'int'"),
    naming no field; every field of the wrong type is now named with what it takes, and values of the right type
    (None where a field allows it, a pair for img_size) still pass."""
    with pytest.raises(ValueError, match=r"^invalid BEiT config: depth must be an int, got '2' \(str\); "
                                         r"qkv_bias must be true or false, got 1 \(int\)$"):
        beit.create_model("beit_tiny_patch16_224", depth="2", qkv_bias=1)
    with pytest.raises(ValueError, match=r"img_size must be an int or a pair of ints, got \(32, 'a'\)"):
        beit.create_model("beit_tiny_patch16_224", img_size=(32, "a"))
    with pytest.raises(ValueError, match=r"mlp_ratio must be a number, got None"):
        beit.create_model("beit_tiny_patch16_224", mlp_ratio=None)
    m = beit.create_model("beit_tiny_patch16_224", img_size=[32, 48], patch_size=16, depth=1, init_values=None,
                          attn_head_dim=None, mlp_ratio=2)
    assert m.cfg.img_hw == (32, 48) and m.cfg.mlp_ratio == 2
