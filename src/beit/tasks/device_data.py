"""``data.device`` of a task config, read once for every task that has a batched on-device data path.

``beit.data.gpu_decode.use_device_path`` decides (``auto`` = the device path on CUDA, ``cpu``, ``gpu``, ``batched``);
this turns its ``ValueError`` into the config error that names the key, ``data.device``.
"""

from __future__ import annotations

import logging

import torch

from ..data.gpu_decode import use_device_path
from ..engine.config import ConfigError

__all__ = ["unused_jpeg_decode", "wants_device_path"]

logger = logging.getLogger(__name__)


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
        logger.warning("data.jpeg_decode=device has no effect here: %s", why)
