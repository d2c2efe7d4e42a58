"""``data.device`` of a task config, read once for every task that has a batched on-device data path.

``beit.data.gpu_decode.use_device_path`` decides (``auto`` = the device path on CUDA, ``cpu``, ``gpu``);
this turns its ``ValueError`` into the config error that names the key, ``data.device``.
"""

from __future__ import annotations

import torch

from ..data.gpu_decode import use_device_path
from ..engine.config import ConfigError

__all__ = ["wants_device_path"]


def wants_device_path(setting: str, device: torch.device | str, key: str = "data.device") -> bool:
    """Whether the data of a run on ``device`` goes through the batched device path (``setting``: ``data.device``).

    Raises:
        ConfigError: ``setting`` is not auto | cpu | gpu
            (``config key 'data.device': must be auto | cpu | gpu, got 'x'``).
    """
    try:
        return use_device_path(setting, device)
    except ValueError as e:
        raise ConfigError(key, str(e)) from None
