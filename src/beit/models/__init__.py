"""BEiT backbone, heads and relative position bias."""

from .beit import Beit
from .config import PRESETS, BeitConfig
from .registry import create_model, list_models

__all__ = ["Beit", "BeitConfig", "PRESETS", "create_model", "list_models"]
