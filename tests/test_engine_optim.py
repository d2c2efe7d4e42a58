"""Param groups (weight-decay rules, layer-wise lr decay), AdamW and lr schedules."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

from _engine_fixtures import TinyNet
from beit.engine.optim import build_optimizer, lr_at, param_groups, summarize_param_groups


def group_of(groups, model):
    ids = {id(p): g for g in groups for p in g["params"]}
    return {n: ids[id(p)] for n, p in model.named_parameters() if id(p) in ids}


def test_layer_decay_scales_and_no_decay_rules():
    model = TinyNet(depth=3)
    L, ld, wd = 3, 0.65, 0.05
    groups = param_groups(model, weight_decay=wd, layer_decay=ld, lr=1e-3)
    by_name = group_of(groups, model)
    for name, g in by_name.items():
        assert g["lr_scale"] == ld ** (L + 1 - model.layer_id(name)), name
        assert g["lr"] == pytest.approx(1e-3 * g["lr_scale"])
    # exact per-layer scales: embeddings ld^4, blocks.i ld^(3-i), head 1
    assert by_name["patch_embed.weight"]["lr_scale"] == ld ** 4
    for i in range(L):
        assert by_name[f"blocks.{i}.fc.weight"]["lr_scale"] == ld ** (L - i)
    assert by_name["head.weight"]["lr_scale"] == 1.0
    # no weight decay: 1-D params, biases, no_weight_decay() names (pos_embed / cls_token are 2-D here)
    for name in ["cls_token", "pos_embed", "patch_embed.bias", "blocks.0.norm.weight", "norm.bias", "head.bias"]:
        assert by_name[name]["weight_decay"] == 0.0, name
    for name in ["patch_embed.weight", "blocks.2.fc.weight", "head.weight"]:
        assert by_name[name]["weight_decay"] == wd, name
    # grouped by (lr_scale, wd): 5 layers x {decay, no_decay}
    assert len(groups) == 10 and len({(g["lr_scale"], g["weight_decay"]) for g in groups}) == 10
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    summary = summarize_param_groups(groups)
    assert "layer_00_no_decay" in summary and "layer_04_decay" in summary and "total 363" in summary


def test_no_layer_decay_two_groups_frozen_params_and_suffix_match(caplog):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(4, 4)
            self.enc.relative_position_bias_table = nn.Parameter(torch.zeros(5, 2))
            self.frozen = nn.Linear(4, 4).requires_grad_(False)

        def no_weight_decay(self):
            return {"relative_position_bias_table"}

    m = M()
    with caplog.at_level(logging.WARNING, logger="beit"):
        groups = param_groups(m, 0.1, layer_decay=0.5)  # no layer_id: warn, scale 1
    said = [r for r in caplog.records if "layer_decay=0.5 ignored: M has no layer_id()" in r.getMessage()]
    assert len(said) == 1 and said[0].alike_on_every_rank  # the first rank alone prints it (setup_logging)
    by_name = group_of(groups, m)
    assert set(by_name) == {"enc.weight", "enc.bias", "enc.relative_position_bias_table"}  # frozen left out
    assert len(groups) == 2 and all(g["lr_scale"] == 1.0 for g in groups)
    assert by_name["enc.relative_position_bias_table"]["weight_decay"] == 0.0
    assert by_name["enc.weight"]["weight_decay"] == 0.1


def test_adamw_keeps_group_keys():
    model = TinyNet()
    opt = build_optimizer(param_groups(model, 0.05, 0.75, 1e-3), lr=1e-3, betas=(0.9, 0.98))
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["foreach"]
    assert all("lr_scale" in g and g["betas"] == (0.9, 0.98) for g in opt.param_groups)


def test_schedules():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=110)
    assert lr_at(0, **kw) == 0.0 and lr_at(5, **kw) == 0.5  # linear warmup from 0
    assert lr_at(10, **kw) == 1.0
    assert lr_at(60, **kw) == pytest.approx(0.55)  # cosine midpoint
    assert lr_at(110, **kw) == pytest.approx(0.1) and lr_at(500, **kw) == pytest.approx(0.1)
    assert lr_at(60, schedule="poly", power=2.0, **kw) == pytest.approx(0.1 + 0.9 * 0.25)
    assert lr_at(109, schedule="constant", **kw) == 1.0
    values = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone after warmup
    assert math.isclose(lr_at(0, lr=1.0, min_lr=0.0, warmup_steps=0, total_steps=10), 1.0)
    with pytest.raises(ValueError, match="schedule"):
        lr_at(20, schedule="step", **kw)
