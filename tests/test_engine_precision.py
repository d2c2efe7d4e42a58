"""engine.precision: the one bf16 decision every task and the trainer share."""

from __future__ import annotations

import contextlib

import pytest
import torch

from beit.engine.precision import autocast_for, use_bf16


@pytest.mark.parametrize(("device", "precision", "expected"), [
    ("cpu", "auto", False), ("cuda", "auto", True), ("cpu", "bf16", True), ("cuda", "fp32", False),
    (torch.device("cuda", 1), "auto", True), ("meta", "auto", False),
])
def test_use_bf16(device, precision, expected) -> None:
    assert use_bf16(device, precision) is expected


def test_unknown_precision_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="precision must be one of auto | bf16 | fp32, got 'fp16'"):
        use_bf16("cpu", "fp16")
    with pytest.raises(ValueError, match="got 'half'"):
        autocast_for("cpu", "half")


def test_autocast_for_runs_matmuls_in_bf16_only_when_asked() -> None:
    a = torch.randn(4, 4)
    with autocast_for("cpu", "auto"):
        assert (a @ a).dtype == torch.float32
    with autocast_for("cpu", "bf16"):
        assert (a @ a).dtype == torch.bfloat16
    assert isinstance(autocast_for("cpu", "fp32"), contextlib.nullcontext)


def test_trainer_config_accepts_exactly_the_helpers_precisions() -> None:
    from beit.engine import ConfigError, TrainConfig
    from beit.engine.config import validate_config

    with pytest.raises(ConfigError, match="precision.*must be one of \\('auto', 'bf16', 'fp32'\\), got 'fp16'"):
        validate_config(TrainConfig(output_dir="x", precision="fp16"))
