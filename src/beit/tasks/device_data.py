"""``data.device`` of a task config, read once for every task that has a batched on-device data path.

``beit.data.gpu_decode.use_device_path`` decides (``auto`` = the device path on CUDA, ``cpu``, ``gpu``, ``batched``);
this turns its ``ValueError`` into the config error that names the key, ``data.device``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from .._text import ALIKE_ON_EVERY_RANK
from ..data.gpu_decode import DEVICE_SETTINGS, JPEG_DECODERS, BatchDecoder, use_device_path
from ..engine.config import ConfigError

__all__ = ["check_data_device", "decode_summary", "unused_jpeg_decode", "wants_device_path"]

logger = logging.getLogger(__name__)


def check_data_device(device: str, jpeg_decode: str, prefix: str = "data.") -> None:
    """``data.device`` and ``data.jpeg_decode`` of a task config, checked where the config is read: before the run
    folder, the tokenizer or the model exist (``prefix``: how the task's errors name the ``data`` section).

    Raises:
        ConfigError: ``device`` is not auto | cpu | gpu | batched, or ``jpeg_decode`` not workers | device.
    """
    if device not in DEVICE_SETTINGS:
        raise ConfigError(f"{prefix}device", f"must be {' | '.join(DEVICE_SETTINGS)}, got {device!r}")
    if jpeg_decode not in JPEG_DECODERS:
        raise ConfigError(f"{prefix}jpeg_decode", f"must be {' | '.join(JPEG_DECODERS)}, got {jpeg_decode!r}")


def wants_device_path(setting: str, device: torch.device | str, key: str = "data.device") -> bool:
    """Whether the data of a run on ``device`` goes through the batched device path (``setting``: ``data.device``).

    Raises:
        ConfigError: ``setting`` is not auto | cpu | gpu | batched
            (``config key 'data.device': must be auto | cpu | gpu | batched, got 'x'``).
    """
    try:
        return use_device_path(setting, device)
    except ValueError as e:
        raise ConfigError(key, str(e)) from None


def unused_jpeg_decode(jpeg_decode: str, why: str) -> None:
    """Warn that ``data.jpeg_decode=device`` was asked for but this run does not decode JPEGs on the device
    path (``why``: the CPU data path, or images held in memory); the default ``workers`` says nothing."""
    if jpeg_decode == "device":
        logger.warning("data.jpeg_decode=device has no effect here: %s", why, extra=ALIKE_ON_EVERY_RANK)


def decode_summary(decoder: BatchDecoder, log: Callable[[str], Any]) -> dict[str, Any]:
    """What a run's batched decoder did (``BatchDecoder.summary``: GPU decodes, CPU fallbacks, skipped files), for
    the task's result, and said once through ``log`` unless the decoder was idle (images held in memory, as in
    ``beit demo``: nothing to say, not a line of zeros)."""
    summary = decoder.summary()
    if not decoder.idle:
        log(f"data: {summary}")
    return summary
