"""BEiT backbone, heads and relative position bias."""

from .beit import Beit
from .config import PRESETS, BeitConfig, Preprocess
from .registry import create_model, list_models

__all__ = ["Beit", "BeitConfig", "PRESETS", "Preprocess", "create_model", "list_models"]
