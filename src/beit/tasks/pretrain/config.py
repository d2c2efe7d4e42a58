"""The pre-training config: :class:`PretrainConfig` (model, data, tokenizer, the engine's ``train``) and
:func:`validate`, which fails before any work (missing files, impossible shapes, a mask budget the grid cannot
hold). Defaults are the paper's BEiT-B recipe; the presets are ``beit/configs/pretrain_*.yaml``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...data.datasets import PIL_MAX_IMAGE_PIXELS
from ...data.masking import BlockwiseMaskGenerator
from ...engine.config import ConfigError, TrainConfig
from ...tokenizers import AUTO, TOKENIZERS, detect_tokenizer_kind
from ..backbone_config import check_model_overrides
from ..device_data import check_data_device

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "SHAPE_KEYS", "PretrainConfig", "PretrainDataConfig",
           "PretrainModelConfig", "PretrainTokenizerConfig", "shard_urls", "validate"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class PretrainModelConfig:
    name: str = "beit_base_patch16_224"  # a preset; the fields below override it when set
    img_size: int = 224
    patch_size: int = 16
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    drop_path_rate: float = 0.1
    init_values: float = 0.1  # layer scale (paper: 0.1 base, 1e-5 large)
    attn_impl: str = "sdpa"
    init: str = ""  # optional checkpoint to start from (any format beit.load_model reads)


@dataclass
class PretrainDataConfig:
    path: str = ""  # a folder of images (searched recursively, any layout), or webdataset shards: a .tar,
    # a folder of .tar files, or a brace pattern such as shards/train-{000000..001023}.tar
    num_samples: int = 0  # shards only: images per epoch (a stream cannot count itself)
    in_memory: bool = False  # decode every image once into RAM as uint8 (small images such as CIFAR)
    max_images: int = 0  # 0 = all
    scale: tuple[float, float] = (0.08, 1.0)
    color_jitter: float = 0.4
    hflip: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    num_mask_patches: int = 75  # ~40% of 14x14
    min_mask_patches_per_block: int = 16
    max_mask_patches_per_block: int | None = None
    device: str = "auto"  # where images are augmented: auto (gpu on CUDA) | cpu (PIL in the workers) | gpu
    # (per-sample augmentation of whole batches on the device) | batched (that path on the training device, CPU too)
    jpeg_decode: str = "workers"  # with the device path: workers (libjpeg-turbo in the loader's workers, one
    # pinned copy a batch) | device (nvJPEG on the GPU: for few CPU cores per GPU); beit.data.gpu_decode
    max_image_pixels: int | None = PIL_MAX_IMAGE_PIXELS  # PIL's decompression-bomb limit (its default): larger
    # images warn, above twice it they are skipped as unreadable; raise it for large scans / pages; null = no limit


@dataclass
class PretrainTokenizerConfig:
    # auto (read from the file: its safetensors metadata, .pkl is DALL-E) | dalle (OpenAI's dVAE, encoder.pkl) |
    # dvae (trained with `beit tokenizer train`); an explicit kind must be the file's
    kind: str = AUTO
    path: str = ""  # dalle: encoder.pkl or our safetensors; dvae: safetensors
    decoder: str = ""  # dalle only: decoder.pkl, for the image panels
    # dalle: fp32 | tf32 | bf16 | fp16 (official: fp16; ids match fp32 at ~99.7%); dvae: fp32;
    # auto: the kind's own on CUDA (dalle fp16, dvae fp32), fp32 elsewhere
    precision: str = "fp32"


def _default_train() -> TrainConfig:
    # the paper's BEiT-B recipe (per-rank batch 128 x 16 GPUs = 2048)
    return TrainConfig(
        output_dir="runs/pretrain", epochs=800, batch_size=128, lr=1.5e-3, min_lr=1e-5, warmup_epochs=10,
        weight_decay=0.05, betas=(0.9, 0.98), clip_grad=3.0, image_every=1000,
    )


@dataclass
class PretrainConfig:
    model: PretrainModelConfig = field(default_factory=PretrainModelConfig)
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    tokenizer: PretrainTokenizerConfig = field(default_factory=PretrainTokenizerConfig)
    train: TrainConfig = field(default_factory=_default_train)
    vis_samples: int = 4
    # BeitConfig fields of the model (as every task's model_overrides), e.g. {attn_impl: eager, mlp_ratio: 2}
    model_overrides: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        validate(self)



SHAPE_KEYS = ("embed_dim", "depth", "num_heads")  # model.<key>: shape shortcuts (None = the preset's / checkpoint's)


def validate(cfg: PretrainConfig) -> None:
    """Fail before any work: missing files, impossible shapes, a mask budget the grid cannot hold."""
    m, d, t = cfg.model, cfg.data, cfg.tokenizer
    check_model_overrides(cfg.model_overrides, {"head": "nothing: pre-training uses the MIM head",
                                                "vocab_size": "tokenizer (its vocabulary)",
                                                "img_size": "model.img_size", "patch_size": "model.patch_size"})
    for k in SHAPE_KEYS:
        mine, theirs = getattr(m, k), cfg.model_overrides.get(k)
        if mine and theirs is not None and mine != theirs:
            raise ConfigError(f"model_overrides.{k}", f"{theirs} but model.{k}={mine}: set one of them")
    if m.img_size % m.patch_size:
        raise ConfigError("model.img_size", f"{m.img_size} is not divisible by patch_size {m.patch_size}")
    check_data_device(d.device, d.jpeg_decode)  # before the tokenizer and model are built
    if not d.path:
        raise ConfigError("data.path", "no data: give a folder of images (data.path=DIR)")
    if not shard_urls(d.path) and not Path(d.path).exists():
        raise ConfigError("data.path", f"folder not found: {d.path}")
    if not shard_urls(d.path) and not Path(d.path).is_dir():
        raise ConfigError("data.path", f"{d.path} is a file, not a folder of images or webdataset shards (a .tar, a "
                                       "folder of them, or a brace pattern)")
    _check_transforms(d)
    if shard_urls(d.path) and d.num_samples <= 0:
        raise ConfigError("data.num_samples", f"{d.path} is webdataset shards: give the images per epoch "
                                              "(data.num_samples=N)")
    _check_masking(d, m.img_size // m.patch_size)
    if t.kind != AUTO and t.kind not in TOKENIZERS:
        raise ConfigError("tokenizer.kind", f"must be one of {', '.join(repr(k) for k in (AUTO, *TOKENIZERS))}, "
                                            f"got {t.kind!r}")
    _resolve_kind(t)
    kind = TOKENIZERS[t.kind]
    if t.precision != AUTO and t.precision not in kind.precisions:
        raise ConfigError("tokenizer.precision", f"a {t.kind} tokenizer runs in {' | '.join(kind.precisions)} "
                                                 f"(or {AUTO}: its own), got {t.precision!r}")
    if t.decoder and not kind.has_decoder_file:
        raise ConfigError("tokenizer.decoder", f"a {t.kind} tokenizer keeps its decoder in tokenizer.path; "
                                               f"leave tokenizer.decoder empty (got {t.decoder!r})")
    for key, value in (("tokenizer.decoder", t.decoder),):
        if value and not Path(value).exists():
            raise ConfigError(key, f"file not found: {value}")


def _resolve_kind(t: PretrainTokenizerConfig) -> None:
    """``tokenizer.kind``: ``auto`` becomes the file's kind (:func:`beit.tokenizers.detect_tokenizer_kind`); an
    explicit kind must be the file's, where the file tells.

    Raises:
        ConfigError: no ``tokenizer.path``, a missing one; with ``auto``, a file whose kind cannot be told; an
            explicit kind that is not the file's (naming the value to set).
    """
    if not t.path:
        raise ConfigError("tokenizer.path", "no tokenizer: give tokenizer.path (DALL-E encoder.pkl or a dVAE "
                                            "trained with `beit tokenizer train`)")
    if not Path(t.path).exists():
        raise ConfigError("tokenizer.path", f"file not found: {t.path}")
    try:
        found = detect_tokenizer_kind(t.path)
    except ValueError as e:
        if t.kind == AUTO:
            raise ConfigError("tokenizer.path", f"{e}; or set tokenizer.kind to the file's kind") from None
        return  # an explicit kind: its loader judges the file (a folder: the files inside it that fit)
    if t.kind == AUTO:
        t.kind = found
    elif found != t.kind:
        raise ConfigError("tokenizer.kind", f"{t.kind}, but {t.path} is a {found} tokenizer: set "
                                            f"tokenizer.kind={found} (or {AUTO})")


def _check_masking(d: PretrainDataConfig, grid: int) -> None:
    """The masking keys, each error naming its own key: a budget of at least one patch that leaves patches visible
    (the paper masks ~40%, 75 of 196), blocks of at least one patch, at most the budget, and a maximum >= the minimum.

    Raises:
        ConfigError: ``data.num_mask_patches``, ``data.min_mask_patches_per_block`` or
            ``data.max_mask_patches_per_block``, with the patch grid.
    """
    n, lo, hi = d.num_mask_patches, d.min_mask_patches_per_block, d.max_mask_patches_per_block
    where = f"(patch grid {grid}x{grid} = {grid * grid})"
    if n == grid * grid:  # more than the grid: the generator's error below
        raise ConfigError("data.num_mask_patches", f"{n} masks every patch {where}: nothing is left visible to predict "
                                                   "the masked tokens from (the paper masks ~40%, 75 of 196)")
    if lo < 1:
        raise ConfigError("data.min_mask_patches_per_block", f"must be >= 1, got {lo}")
    if lo > n:
        raise ConfigError("data.min_mask_patches_per_block", f"{lo} is larger than the budget data.num_mask_patches="
                                                             f"{n}: no block could ever be placed")
    if hi is not None and hi < lo:
        raise ConfigError("data.max_mask_patches_per_block", f"{hi} is smaller than data.min_mask_patches_per_block="
                                                             f"{lo} (null: the budget)")
    try:
        BlockwiseMaskGenerator((grid, grid), n, lo, hi)
    except ValueError as e:
        raise ConfigError("data.num_mask_patches", f"{e} {where}") from None


def _check_transforms(d: PretrainDataConfig) -> None:
    """The augmentation keys, each error naming its key (torchvision's own errors named none).

    Raises:
        ConfigError: ``data.scale`` not ``[min, max]`` with ``0 < min <= max <= 1``; ``data.color_jitter`` negative or
            not finite; ``data.hflip`` outside [0, 1]; ``data.std`` with a channel <= 0 or not finite.
    """
    if len(d.scale) != 2 or not 0 < d.scale[0] <= d.scale[1] <= 1:
        raise ConfigError("data.scale", f"must be [min, max] with 0 < min <= max <= 1 (the crop's share of the image), "
                                        f"got {list(d.scale)}")
    if not (math.isfinite(d.color_jitter) and d.color_jitter >= 0):
        raise ConfigError("data.color_jitter", f"must be >= 0 (0: off), got {d.color_jitter}")
    if not 0.0 <= d.hflip <= 1.0:
        raise ConfigError("data.hflip", f"must be in [0, 1] (a probability), got {d.hflip}")
    if not all(math.isfinite(s) and s > 0 for s in d.std):
        raise ConfigError("data.std", f"every channel's std must be > 0 (images are divided by it), got {list(d.std)}")


def shard_urls(path: str) -> list[str]:
    """The shard files ``path`` names (a .tar, a folder of .tar files, a brace pattern), or [] for images."""
    if "{" in path:
        import braceexpand  # optional (the webdataset extra): only brace patterns need it

        return list(braceexpand.braceexpand(path))
    p = Path(path)
    if p.is_file() and p.suffix == ".tar":
        return [str(p)]
    if p.is_dir():
        tars = sorted(str(t) for t in p.glob("*.tar"))
        has_images = any(f.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp") for f in p.iterdir())
        return tars if tars and not has_images else []
    return []

