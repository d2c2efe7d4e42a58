"""The classification configs: :class:`FinetuneConfig` (``beit finetune``), :class:`LinprobeConfig`
(``beit linprobe``), the image-folder :class:`DataConfig` both use, and their validation. Defaults are the
paper's recipes (unilm ``run_class_finetuning.py`` / ``run_linear_eval.py``); the presets are
``beit/configs/finetune_*.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..._text import repeated
from ...data.datasets import PIL_MAX_IMAGE_PIXELS
from ...data.transforms import SMALL_IMAGE_SIZE, check_auto_augment
from ...engine.config import ConfigError, TrainConfig
from ...models.config import Preprocess
from ..backbone_config import check_model_overrides
from ..device_data import check_data_device

__all__ = ["DataConfig", "FinetuneConfig", "LinprobeConfig", "parse_blocks"]


@dataclass
class DataConfig:
    """Image folders (``root/<class>/<image>``) and their preprocessing; shared by fine-tuning and linprobe."""

    train_dir: str = ""
    val_dir: str = ""  # "" = no evaluation during training
    in_memory: bool = False  # decode every image once into a uint8 tensor (small images: CIFAR)
    memory_size: int | None = None  # with in_memory: resize short side + center crop to this when decoding
    verify_val: bool = True  # decode the val set once up front and leave unreadable files out
    resize: str = "crop"  # crop: random-resized crop / center crop; full: whole image to img_size^2 (documents)
    grayscale: bool = False  # gray -> 3 channels (scans); keeps color out of the decision
    # RandAugment (timm string), an AutoAugment policy (timm's or torchvision's: autoaugment-cifar10), null = off
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    color_jitter: float = 0.4  # used by timm only when auto_augment is off
    reprob: float = 0.25  # random erasing probability
    scale: tuple[float, float] = (0.08, 1.0)  # random-resized-crop area range
    hflip: float = 0.5
    crop_padding: int | None = None  # at <= 32 px: random-crop padding in px; null = img_size // 8, 0 = no shift
    crop_pct: float | None = None  # eval center-crop fraction; null = 224/256 (1.0 at <=32 and >=384 px)
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_MEAN)  # type: ignore[assignment]
    std: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_STD)  # type: ignore[assignment]
    eval_batch_size: int = 0  # 0 = train.batch_size
    device: str = "auto"  # where training images are augmented: auto (gpu on CUDA when the recipe allows) |
    # cpu (PIL in the workers) | gpu (per-sample augmentation of whole batches on the device) | batched (that
    # path on the training device, CPU included: ~2x the PIL path's img/s for small images on few cores)
    jpeg_decode: str = "workers"  # with the device path: workers (libjpeg-turbo in the loader's workers, one
    # pinned copy a batch) | device (nvJPEG on the GPU: for few CPU cores per GPU); beit.data.gpu_decode
    max_image_pixels: int | None = PIL_MAX_IMAGE_PIXELS  # PIL's decompression-bomb limit (its default): larger
    # images warn, above twice it they are skipped as unreadable; raise it for large scans / pages; null = no limit

    def validate(self) -> None:
        if self.resize not in ("crop", "full"):
            raise ConfigError("resize", f"must be 'crop' or 'full', got '{self.resize}'")
        if self.resize == "full" and self.auto_augment:
            raise ConfigError("auto_augment", f"resize=full (documents) takes no augmentation policy, got "
                                              f"{self.auto_augment!r}; set it to null")
        if self.auto_augment:  # timm's parsers assert: a traceback after the run folder was made, on either path
            try:
                check_auto_augment(str(self.auto_augment))
            except ValueError as e:
                raise ConfigError("auto_augment", str(e)) from None
        for key, values in (("mean", self.mean), ("std", self.std)):  # 0-255 values: segmentation's data.mean
            if key == "std" and min(values) <= 0:
                raise ConfigError(key, f"must be > 0, got {list(values)}")
            if any(not 0.0 <= v <= 1.0 for v in values):
                raise ConfigError(key, f"is for pixels in [0, 1] (each value in [0, 1]), got {list(values)} (values "
                                       "on the 0-255 scale: divide them by 255)")
        if not 0.0 <= self.reprob <= 1.0:
            raise ConfigError("reprob", f"must be in [0, 1], got {self.reprob}")
        if self.crop_padding is not None and self.crop_padding < 0:
            raise ConfigError("crop_padding", f"must be >= 0 or null (img_size // 8), got {self.crop_padding}")
        if not 0.0 <= self.hflip <= 1.0:
            raise ConfigError("hflip", f"must be in [0, 1], got {self.hflip}")
        if self.crop_pct is not None and not 0.0 < self.crop_pct <= 1.0:
            raise ConfigError("crop_pct", f"must be in (0, 1] or null, got {self.crop_pct}")
        if self.eval_batch_size < 0:
            raise ConfigError("eval_batch_size", f"must be >= 0, got {self.eval_batch_size}")
        # here, not when the training data is built: before the run folder is made (as pre-training's)
        check_data_device(self.device, self.jpeg_decode, prefix="")

    def device_path_blocker(self) -> str | None:
        """Why this training recipe cannot run on the batched device path (None = it can)."""
        if self.resize != "crop":
            return f"data.resize={self.resize!r} (only 'crop')"
        if self.grayscale:
            return "data.grayscale=true"
        if self.interpolation != "bicubic":
            return f"data.interpolation={self.interpolation!r} (only 'bicubic')"
        if self.auto_augment and not str(self.auto_augment).startswith("rand"):
            return f"data.auto_augment={self.auto_augment!r} (only RandAugment 'rand-...')"
        if not self.auto_augment and self.color_jitter:
            return "data.color_jitter without auto_augment (no colour jitter on the device path)"
        return None

    def check_device_path(self) -> str | None:
        """:meth:`device_path_blocker`, refused when the device path was asked for by name (``gpu`` / ``batched``):
        ``auto`` falls back to the CPU path instead.

        Raises:
            ConfigError: ``data.device`` is ``gpu`` or ``batched`` and the recipe has a blocker.
        """
        blocker = self.device_path_blocker()
        if blocker is not None and self.device in ("gpu", "batched"):
            raise ConfigError("data.device", f"{self.device} cannot run this recipe: {blocker}; use auto or cpu")
        return blocker

    def preprocess(self, img_size: int) -> Preprocess:
        """The eval preprocessing, as stored in the fine-tuned model."""
        return Preprocess(img_size=img_size, resize=self.resize, crop_pct=self.crop_pct,
                          interpolation=self.interpolation, grayscale=self.grayscale,
                          mean=tuple(self.mean), std=tuple(self.std))


def _finetune_train_defaults() -> TrainConfig:
    return TrainConfig(output_dir="runs/finetune", epochs=100, warmup_epochs=20, lr=4e-3, min_lr=1e-6,
                       weight_decay=0.05, layer_decay=0.65, batch_size=128)


@dataclass
class FinetuneConfig:
    """``beit finetune``: model + data + recipe knobs + the engine's ``train`` section."""

    model: str = MISSING  # preset name (from scratch) or checkpoint: file, directory, Hub id, URL, last.pt
    model_overrides: dict[str, Any] = field(default_factory=dict)  # BeitConfig fields, e.g. {depth: 6}
    num_classes: int = 0  # 0 = the number of class folders; else must equal it
    class_names: list[str] = field(default_factory=list)  # label order; [] = sorted folders (filled in)
    img_size: int = 224
    drop_path: float = 0.1
    use_mean_pooling: bool = True  # fc_norm(mean of patch tokens), as the paper's fine-tuning
    rel_pos: str = "per_layer"  # per_layer: shared table copied to every block | keep: as in the checkpoint
    ref_batch: int = 0  # > 0: train.lr/min_lr are for this total batch and scale linearly to the real one
    # mixup / cutmix (timm Mixup); label smoothing is folded into its soft targets
    mixup: float = 0.8
    cutmix: float = 1.0
    cutmix_minmax: tuple[float, float] | None = None
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"  # batch | pair | elem
    smoothing: float = 0.1
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=_finetune_train_defaults)

    @property
    def mixup_active(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0 or self.cutmix_minmax is not None

    def validate(self) -> None:
        if self.num_classes < 0:
            raise ConfigError("num_classes", f"must be >= 0 (0 = from the data), got {self.num_classes}")
        if self.img_size <= 0:
            raise ConfigError("img_size", f"must be > 0, got {self.img_size}")
        if not 0.0 <= self.drop_path < 1.0:
            raise ConfigError("drop_path", f"must be in [0, 1), got {self.drop_path}")
        if self.rel_pos not in ("per_layer", "keep"):
            raise ConfigError("rel_pos", f"must be 'per_layer' or 'keep', got '{self.rel_pos}'")
        pad = self.data.crop_padding
        if pad is not None and self.img_size <= SMALL_IMAGE_SIZE and pad > self.img_size // 2:
            raise ConfigError("data.crop_padding", f"must be <= img_size // 2 ({self.img_size // 2} at img_size "
                                                   f"{self.img_size}), got {pad}")
        check_model_overrides(self.model_overrides)
        for k in ("img_size", "num_classes", "drop_path_rate", "head"):
            if k in self.model_overrides:
                raise ConfigError(f"model_overrides.{k}", "set by the fine-tuning config itself "
                                                          "(img_size, num_classes, drop_path); set those keys")
        if not 0.0 <= self.smoothing < 1.0:
            raise ConfigError("smoothing", f"must be in [0, 1), got {self.smoothing}")
        if self.mixup < 0 or self.cutmix < 0:
            raise ConfigError("mixup", f"mixup and cutmix alphas must be >= 0, got {self.mixup}, {self.cutmix}")
        if not 0.0 <= self.mixup_prob <= 1.0 or not 0.0 <= self.mixup_switch_prob <= 1.0:
            raise ConfigError("mixup_prob", "mixup_prob and mixup_switch_prob must be in [0, 1]")
        if self.mixup_mode not in ("batch", "pair", "elem"):
            raise ConfigError("mixup_mode", f"must be batch | pair | elem, got '{self.mixup_mode}'")
        if self.mixup_active and self.train.batch_size % 2:
            raise ConfigError("train.batch_size", f"mixup/cutmix need an even batch, got {self.train.batch_size}")
        if self.ref_batch < 0:
            raise ConfigError("ref_batch", f"must be >= 0, got {self.ref_batch}")
        if self.class_names and len(set(self.class_names)) != len(self.class_names):
            raise ConfigError("class_names", f"has names given more than once: {repeated(self.class_names, 5)}")
        # after the data node's own checks (validate_config runs them first): a misspelt data.auto_augment is
        # named as such, not as a recipe the device path lacks
        self.data.check_device_path()  # gpu / batched asked for by name with a recipe it lacks: refused at load



def _linprobe_train_defaults() -> TrainConfig:
    # num_workers=0: training reads the in-memory feature cache; no lr warmup, lr to 0 (unilm)
    return TrainConfig(output_dir="runs/linprobe", epochs=100, warmup_epochs=0, lr=1e-3, min_lr=0.0,
                       weight_decay=1e-4, layer_decay=1.0, batch_size=1024, num_workers=0, log_every=50)


def _linprobe_data_defaults() -> DataConfig:
    return DataConfig(auto_augment=None, color_jitter=0.0, reprob=0.0, hflip=0.0)


@dataclass
class LinprobeConfig:
    """``beit linprobe``: frozen encoder + cached features + one linear head per probed block."""

    model: str = MISSING  # checkpoint (or a preset name: random features, a baseline)
    model_overrides: dict[str, Any] = field(default_factory=dict)
    img_size: int = 224
    layers: str = "all"  # all | last | block numbers counted from 1, e.g. "9" or "6,8,10"
    pool: str = "cat"  # cat (cls + mean patch, unilm) | avg (mean patch) | cls
    batchnorm: bool = True  # BatchNorm1d(affine=False) before each linear head
    knn: int = 20  # weighted k-NN accuracy per block from the same features (0 = off); see classify/knn.py
    knn_temperature: float = 0.07
    num_classes: int = 0  # 0 = from the data
    class_names: list[str] = field(default_factory=list)
    ref_batch: int = 256  # train.lr is per 256 images (unilm base_lr), scaled to the real batch; 0 = absolute
    extract_batch_size: int = 256
    extract_num_workers: int = 8  # DataLoader workers of the two encoder passes (training reads the cache)
    data: DataConfig = field(default_factory=_linprobe_data_defaults)
    train: TrainConfig = field(default_factory=_linprobe_train_defaults)

    def validate(self) -> None:
        if self.pool not in ("cat", "avg", "cls"):
            raise ConfigError("pool", f"must be cat | avg | cls, got '{self.pool}'")
        if self.img_size <= 0 or self.extract_batch_size <= 0:
            raise ConfigError("img_size", "img_size and extract_batch_size must be > 0")
        if self.extract_num_workers < 0:
            raise ConfigError("extract_num_workers", f"must be >= 0, got {self.extract_num_workers}")
        if self.knn < 0:
            raise ConfigError("knn", f"must be >= 0 (0 = no k-NN), got {self.knn}")
        if self.knn_temperature <= 0:
            raise ConfigError("knn_temperature", f"must be > 0, got {self.knn_temperature}")
        check_model_overrides(self.model_overrides)
        for k in ("img_size", "head", "num_classes"):
            if k in self.model_overrides:
                raise ConfigError(f"model_overrides.{k}", "set by the linprobe config itself")
        if self.ref_batch < 0:
            raise ConfigError("ref_batch", f"must be >= 0, got {self.ref_batch}")
        if self.train.layer_decay != 1.0:
            raise ConfigError("train.layer_decay", "linear heads have no layers: leave it at 1.0")
        # the training transform's keys: set, they were checked and then ignored (no augmentation of cached features)
        for key, off in (("auto_augment", "null"), ("color_jitter", "0"), ("reprob", "0"), ("hflip", "0")):
            if getattr(self.data, key):
                raise ConfigError(f"data.{key}", f"linprobe caches each image's features once, unaugmented: it has no "
                                                 f"effect here, got {getattr(self.data, key)!r}; leave it at {off}")
        try:
            parse_blocks(self.layers, None)  # the depth is known once the model is read
        except ValueError as e:
            raise ConfigError("layers", str(e)) from None



def parse_blocks(spec: str | int, depth: int | None) -> list[int]:
    """``"all"`` / ``"last"`` / ``"9"`` / ``"6,8,10"`` -> sorted 1-based block numbers (block k = ``blocks[k-1]``).

    ``depth`` None (the model not read yet): only the spelling and the lower bound are checked (``"all"`` and
    ``"last"`` give ``[]``).

    Raises:
        ValueError: another spelling, or a block number below 1 or above ``depth``.
    """
    s = str(spec).strip().lower()
    if s in ("all", "last"):
        if depth is None:
            return []
        return list(range(1, depth + 1)) if s == "all" else [depth]
    try:
        blocks = sorted({int(x) for x in s.replace(" ", "").split(",") if x})
    except ValueError:
        raise ValueError(f"layers must be 'all', 'last' or block numbers like '9' or '6,8,10', got {spec!r}") from None
    if not blocks or blocks[0] < 1:
        raise ValueError(f"block numbers are counted from 1 (the first block), got {blocks or spec!r}")
    if depth is not None and blocks[-1] > depth:
        raise ValueError(f"block numbers {blocks} out of range 1..{depth} (counted from 1)")
    return blocks
