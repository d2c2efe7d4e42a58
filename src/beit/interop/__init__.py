"""Checkpoint formats: official (microsoft/unilm), timm, Hugging Face and ours."""

from .backbone import build_backbone, check_overrides_fit, source_config
from .formats import detect, from_hf, shared_to_per_layer, to_hf, unwrap
from .load import CheckpointError, export_hf, export_timm, load_model, read_checkpoint, save_model

__all__ = [
    "CheckpointError", "build_backbone", "check_overrides_fit", "detect", "export_hf", "export_timm", "from_hf",
    "load_model", "read_checkpoint", "save_model", "shared_to_per_layer", "source_config", "to_hf", "unwrap",
]
