"""The tokenizer-training config: :class:`TokenizerTrainConfig` (the images, the dVAE's
:class:`beit.tokenizers.DVAEConfig`, the engine's ``train``) and its validation; preset ``tokenizer_*.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...data.datasets import PIL_MAX_IMAGE_PIXELS
from ...engine.config import ConfigError, TrainConfig
from ...tokenizers.dvae import DVAEConfig

__all__ = ["TokenizerTrainConfig"]


def _default_train() -> TrainConfig:
    # dVAEs like a higher lr than ViTs and little weight decay (DALL-E: AdamW, wd 1e-4).
    return TrainConfig(
        output_dir="runs/dvae",
        lr=1e-3,
        min_lr=1e-5,
        weight_decay=1e-4,
        warmup_steps=500,
        max_steps=20000,
        batch_size=64,
        image_every=1000,
        ckpt_every=2000,
    )


@dataclass
class TokenizerTrainConfig:
    data_dir: str = ""  # images under it at any depth
    val_dir: str = ""  # held-out images; "" = hold out val_fraction of data_dir
    val_fraction: float = 0.02
    max_val_images: int = 2048  # cap on held-out images used per evaluation
    img_size: int = 128  # random crops for training, center crops for evaluation
    in_memory: bool = False  # decode the images once into RAM (uint8; small images such as CIFAR or the demo's
    # digits): the same crops and flips as reading them every epoch, without decoding them again (tokenizer/data.py)
    grid_images: int = 8  # columns of the reconstruction grid
    max_image_pixels: int | None = PIL_MAX_IMAGE_PIXELS  # PIL's decompression-bomb limit (its default): larger
    # images warn, above twice it they are skipped as unreadable; raise it for large scans / pages; null = no limit
    model: DVAEConfig = field(default_factory=lambda: DVAEConfig(temperature_anneal_steps=20000))
    train: TrainConfig = field(default_factory=_default_train)

    def validate(self) -> None:
        if not self.data_dir:
            raise ConfigError("data_dir", "is required (a folder of images)")
        if not 0 < self.val_fraction < 1:
            raise ConfigError("val_fraction", f"must be in (0, 1), got {self.val_fraction}")
        if self.img_size % self.model.downsample:
            raise ConfigError("img_size", f"must be divisible by model.downsample ({self.model.downsample})")
        if self.max_val_images < 1 or self.grid_images < 1:
            raise ConfigError("max_val_images", "max_val_images and grid_images must be >= 1")
        if self.train.layer_decay != 1.0:  # logged as ignored, deep in the run, before
            raise ConfigError("train.layer_decay", "the dVAE has no transformer blocks to decay over: leave it at "
                                                   f"1.0, got {self.train.layer_decay:g}")
        try:
            self.model.check()
        except ValueError as e:
            raise ConfigError("model", str(e)) from None
