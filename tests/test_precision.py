"""A model cast to 16 bits runs every forward path, close to fp32; autocast keeps working."""

from __future__ import annotations

import pytest
import torch

import beit

TINY = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2)
# relative error max|out16 - out32| / max|out32| on these tiny random models: fp16 measured ~2e-3, bf16 ~7e-3
TOL = {torch.float16: 1e-2, torch.bfloat16: 3e-2}


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref.float()).abs().max() / ref.float().abs().max())


def _random_model(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    m = beit.create_model("beit_tiny_patch16_224", **TINY, **kw).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "relative_position_bias_table" in n or n.endswith(("q_bias", "v_bias")):
                p.normal_()
    return m


def _paths(m: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every forward path: head, tokens, pyramid maps at another resolution, per-layer tokens."""
    out = {}
    if m.cfg.head == "mim":
        out["mim"] = m(x, mask)
    else:
        out["logits"] = m(x)
        out["features"] = m.forward_features(x)
    big = torch.nn.functional.interpolate(x.float(), size=(40, 24)).to(x.dtype)  # run-time table resampling
    out["intermediates"] = m.forward_intermediates(big, (0, 1))[1]
    out["layers"] = m.get_intermediate_layers(x)[-1]
    return out


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
@pytest.mark.parametrize(
    "kw",
    [dict(num_classes=5), dict(head="mim", vocab_size=40),
     dict(num_classes=5, use_abs_pos_emb=True, use_mean_pooling=False, use_shared_rel_pos_bias=True)],
    ids=["cls", "mim", "abs-shared"],
)
def test_cast_model_runs_close_to_fp32(one_thread, device, dtype, attn_impl, kw) -> None:
    m = _random_model(attn_impl=attn_impl, **kw).to(device)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(device)
    mask = (torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(2)) < 0.4).to(device)
    with torch.no_grad():
        ref = _paths(m, x, mask)
        half = m.to(dtype)
        got = _paths(half, x.to(dtype), mask)
        got_from_fp32_input = half(x, mask) if m.cfg.head == "mim" else half(x)  # images need not be cast
    for name, r in ref.items():
        assert got[name].dtype == dtype, name
        assert _rel_err(got[name], r) < TOL[dtype], name
    assert torch.equal(got_from_fp32_input, got["mim" if m.cfg.head == "mim" else "logits"])


def test_autocast_keeps_fp32_weights_and_stream(one_thread) -> None:
    m = _random_model(num_classes=5)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = m(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tokens = m.forward_features(x)
            out = m(x)
    assert m.cls_token.dtype == torch.float32
    assert tokens.dtype == torch.float32  # the residual stream stays fp32 under autocast
    assert _rel_err(out, ref) < TOL[torch.bfloat16]
