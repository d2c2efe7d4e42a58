"""beit: pre-train and fine-tune BEiT vision transformers (Bao et al., ICLR 2022)."""

from .interop import CheckpointError, build_backbone, load_model, save_model
from .models import Beit, BeitConfig, Preprocess, create_model, list_models

__version__ = "0.1.0"
__all__ = ["Beit", "BeitConfig", "CheckpointError", "Preprocess", "build_backbone", "create_model", "list_models",
           "load_model", "save_model"]
