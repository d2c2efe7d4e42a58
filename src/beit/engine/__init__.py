"""The training engine shared by every task: config, distributed setup, optimizer, checkpoints, loop."""

from .checkpoint import CheckpointManager, CheckpointMismatchError, load_checkpoint, save_checkpoint
from .config import ConfigError, TrainConfig, load_config, save_config
from .distributed import ResumableDistributedSampler, all_reduce_mean, is_main, wrap_model
from .optim import build_optimizer, lr_at, param_groups, summarize_param_groups
from .trainer import ModelEMA, Trainer, TrainingDivergedError, seed_everything

__all__ = [
    "CheckpointManager", "CheckpointMismatchError", "ConfigError", "ModelEMA", "ResumableDistributedSampler",
    "TrainConfig", "Trainer", "TrainingDivergedError", "all_reduce_mean", "build_optimizer", "is_main",
    "load_checkpoint", "load_config", "lr_at", "param_groups", "save_checkpoint", "save_config",
    "seed_everything", "summarize_param_groups", "wrap_model",
]
