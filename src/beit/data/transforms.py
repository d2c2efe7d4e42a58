"""Transforms for BEiT pre-training, fine-tuning and evaluation.

Pre-training (BEiT paper, Sec. 2.5; unilm ``DataAugmentationForBEiT``): color jitter, flip and ONE
random-resized crop, resized twice: to ``input_size`` (bicubic, normalised) for the ViT, and to
``(input_size // patch_size) * tokenizer_downsample`` (lanczos, in [0, 1]) for the image tokenizer,
whose token grid must line up with the ViT's patch grid. Plus a blockwise mask of that grid.

Fine-tuning, linear probing and evaluation: the unilm / timm recipes (``build_finetune_transform``,
``build_linear_probe_transform``, ``build_eval_transform``) and the document recipe that resizes the
whole image to a square (``build_full_image_transform``). The batched on-device versions of these
views are in :mod:`beit.data.gpu_augment`.

All random numbers come from the global torch / Python / NumPy generators, which the datasets seed
per sample with ``beit.data.seeding.seeded``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data import auto_augment as aa
from timm.data.random_erasing import RandomErasing
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from .masking import BlockwiseMaskGenerator
from .seeding import deterministic

__all__ = [
    "EnsureMinSize",
    "PretrainTransform",
    "SmallImageRandomCrop",
    "TORCHVISION_AUTOAUGMENT",
    "build_eval_transform",
    "build_finetune_transform",
    "check_auto_augment",
    "build_full_image_transform",
    "build_linear_probe_transform",
    "collate_pretrain",
    "default_mask_generator",
    "interpolation_mode",
]

_INTERP = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "lanczos": InterpolationMode.LANCZOS,
    "nearest": InterpolationMode.NEAREST,
    "box": InterpolationMode.BOX,
    "hamming": InterpolationMode.HAMMING,
}

SMALL_IMAGE_SIZE = 32  # at or below this, follow unilm's CIFAR path: no resize-up-then-crop

#: ``auto_augment`` names of torchvision's AutoAugment policies (Cubuk et al. 2019), which timm lacks for CIFAR and
#: SVHN: ``autoaugment-cifar10`` is the augmentation of public from-scratch ViT recipes for CIFAR-10 (e.g.
#: omihub777/ViT-CIFAR's ``CIFAR10Policy``), the recipe a from-scratch baseline is held to.
TORCHVISION_AUTOAUGMENT: dict[str, T.AutoAugmentPolicy] = {
    "autoaugment-cifar10": T.AutoAugmentPolicy.CIFAR10,
    "autoaugment-imagenet": T.AutoAugmentPolicy.IMAGENET,
    "autoaugment-svhn": T.AutoAugmentPolicy.SVHN,
}


def small_image_padding(input_size: int, padding: int | None = None) -> int:
    """Pixels of padding of the random crop at ``input_size <= SMALL_IMAGE_SIZE``: ``padding`` when given
    (0 = no shift at all), else an eighth of the side, so 32 px gets unilm's CIFAR ``RandomCrop(32, padding=4)``
    and smaller inputs the same relative shift (16 px -> 2; a fixed 4 would shift a 16-px image by a quarter).

    Raises ValueError for a negative ``padding`` or one above ``input_size // 2`` (crops of mostly padding)."""
    if padding is not None:
        if int(padding) < 0:
            raise ValueError(f"crop_padding must be >= 0 (or None for input_size // 8), got {padding}")
        if int(padding) > int(input_size) // 2:
            raise ValueError(f"crop_padding must be <= input_size // 2 ({int(input_size) // 2} at {input_size} px), "
                             f"got {padding}")
        return int(padding)
    return max(1, int(input_size) // 8)


def interpolation_mode(name: str) -> InterpolationMode:
    """torchvision's ``InterpolationMode`` for a config name (bicubic | bilinear | lanczos | nearest | box |
    hamming). Raises ``ValueError`` naming the choices for any other name."""
    try:
        return _INTERP[name]
    except KeyError:
        raise ValueError(f"unknown interpolation {name!r}; choose from {sorted(_INTERP)}") from None


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(value, int):
        value = (value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 2 or min(value) <= 0:
        raise ValueError(f"{name} must be a positive int or (height, width), got {value}")
    return value  # type: ignore[return-value]


def _check_range(value: Sequence[float], name: str, upper: float | None = None) -> tuple[float, float]:
    lo, hi = (float(v) for v in value)
    if not 0 < lo <= hi or (upper is not None and hi > upper):
        bound = f" <= {upper}" if upper is not None else ""
        raise ValueError(f"{name} must satisfy 0 < min <= max{bound}, got ({lo}, {hi})")
    return lo, hi


def _check_mean_std(mean: Sequence[float], std: Sequence[float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"mean/std need 3 channels and std > 0, got mean={mean}, std={std}")
    return mean, std


def default_mask_generator(grid: int | tuple[int, int]) -> BlockwiseMaskGenerator:
    """The paper's masking scaled to any grid: 75/196 (~40%) of the patches.

    Blocks are at least 16 patches on grids with a budget of 32 or more (the official setting),
    else 4 (the official class default), so that small grids such as 8x8 still get several blocks.
    """
    gh, gw = _pair(grid, "grid")
    budget = max(1, round(gh * gw * 75 / 196))
    min_block = 16 if budget >= 32 else min(4, budget)
    return BlockwiseMaskGenerator((gh, gw), num_masking_patches=budget, min_num_patches=min_block)


class PretrainTransform:
    """Two views of one random-resized crop + a blockwise mask, for BEiT pre-training.

    Returns ``{"image": float [3, H, W] normalised, "tok_image": float [3, h, w] in [0, 1],
    "mask": bool [H/p, W/p]}`` with ``h = (H // p) * tokenizer_downsample``. The tokenizer view is
    not normalised and not ``map_pixels``-ed: the tokenizer owns its input mapping.

    Args:
        input_size: ViT input size (int or (H, W)).
        patch_size: ViT patch size; ``input_size`` must be divisible by it.
        tokenizer_downsample: the tokenizer's total stride (8 for the DALL-E dVAE).
        scale, ratio: random-resized-crop area fraction and aspect ranges.
        color_jitter: brightness/contrast/saturation strength (float or (b, c, s[, h])); 0/None = off.
        hflip: probability of a horizontal flip (shared by both views).
        mean, std: normalisation of the patch view.
        mask_generator: draws the mask; defaults to ``default_mask_generator(grid)``.
        interpolation, tokenizer_interpolation: resize filters of the two views.
    """

    def __init__(
        self,
        input_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        tokenizer_downsample: int = 8,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        color_jitter: float | Sequence[float] | None = 0.4,
        hflip: float = 0.5,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        mask_generator: BlockwiseMaskGenerator | None = None,
        interpolation: str = "bicubic",
        tokenizer_interpolation: str = "lanczos",
    ) -> None:
        self.input_size = _pair(input_size, "input_size")
        if not isinstance(patch_size, int) or patch_size <= 0:
            raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
        if self.input_size[0] % patch_size or self.input_size[1] % patch_size:
            raise ValueError(
                f"input_size {self.input_size} is not divisible by patch_size {patch_size}: "
                "the patch grid and the tokenizer grid would not line up"
            )
        if not isinstance(tokenizer_downsample, int) or tokenizer_downsample <= 0:
            raise ValueError(f"tokenizer_downsample must be a positive int, got {tokenizer_downsample!r}")
        self.patch_size = patch_size
        self.tokenizer_downsample = tokenizer_downsample
        self.grid = (self.input_size[0] // patch_size, self.input_size[1] // patch_size)
        self.tokenizer_size = (self.grid[0] * tokenizer_downsample, self.grid[1] * tokenizer_downsample)
        self.scale = _check_range(scale, "scale", upper=1.0)
        self.ratio = _check_range(ratio, "ratio")
        if not 0.0 <= hflip <= 1.0:
            raise ValueError(f"hflip is a probability, got {hflip}")
        self.hflip = float(hflip)
        self.mean, self.std = _check_mean_std(mean, std)
        self.color_jitter = self._parse_jitter(color_jitter)
        self.jitter = T.ColorJitter(*self.color_jitter) if any(self.color_jitter) else None
        if mask_generator is None:
            mask_generator = default_mask_generator(self.grid)
        if (mask_generator.height, mask_generator.width) != self.grid:
            raise ValueError(
                f"mask_generator grid {mask_generator.height}x{mask_generator.width} does not match "
                f"the patch grid {self.grid[0]}x{self.grid[1]} "
                f"(input_size {self.input_size} / patch_size {patch_size})"
            )
        self.mask_generator = mask_generator
        self.interpolation = interpolation_mode(interpolation)
        self.tokenizer_interpolation = interpolation_mode(tokenizer_interpolation)

    @staticmethod
    def _parse_jitter(cj: float | Sequence[float] | None) -> tuple[float, float, float, float]:
        if cj is None:
            return (0.0, 0.0, 0.0, 0.0)
        if isinstance(cj, (int, float)):
            return (float(cj), float(cj), float(cj), 0.0)  # official: ColorJitter(0.4, 0.4, 0.4), no hue
        vals = [float(v) for v in cj]
        if len(vals) not in (3, 4) or min(vals) < 0 or (len(vals) == 4 and vals[3] > 0.5):
            raise ValueError(f"color_jitter must be a float or (b, c, s[, hue<=0.5]) >= 0, got {cj}")
        return (vals[0], vals[1], vals[2], vals[3] if len(vals) == 4 else 0.0)

    def __call__(self, img: Image.Image) -> dict[str, torch.Tensor]:
        if not isinstance(img, Image.Image):
            raise TypeError(f"PretrainTransform takes an RGB PIL image, got {type(img).__name__}")
        if self.jitter is not None:
            img = self.jitter(img)  # before the crop, as the official code: both views share it
        top, left, h, w = T.RandomResizedCrop.get_params(img, list(self.scale), list(self.ratio))
        flip = self.hflip > 0 and torch.rand(()).item() < self.hflip
        patch = TF.resized_crop(img, top, left, h, w, list(self.input_size), self.interpolation)
        tok = TF.resized_crop(img, top, left, h, w, list(self.tokenizer_size), self.tokenizer_interpolation)
        if flip:
            patch, tok = TF.hflip(patch), TF.hflip(tok)
        image = TF.normalize(TF.to_tensor(patch), self.mean, self.std)
        return {"image": image, "tok_image": TF.to_tensor(tok), "mask": self.mask_generator()}

    def __repr__(self) -> str:
        return (
            f"PretrainTransform(input_size={self.input_size}, patch={self.patch_size}, "
            f"tokenizer_size={self.tokenizer_size}, scale={self.scale}, "
            f"ratio={tuple(round(r, 3) for r in self.ratio)}, "
            f"color_jitter={self.color_jitter}, hflip={self.hflip}, mask={self.mask_generator!r})"
        )


def collate_pretrain(batch: Sequence[Any]) -> dict[str, torch.Tensor]:
    """Stack pre-training samples: dicts from ``PretrainTransform``, ``(dict, label)`` pairs from a
    labeled dataset, or ``(image, tok_image, mask)`` tuples. Labels, when present, are kept."""
    if not batch:
        raise ValueError("collate_pretrain got an empty batch")
    first = batch[0]
    labels = None
    if isinstance(first, (tuple, list)) and len(first) == 2 and isinstance(first[0], dict):
        labels = torch.tensor([int(b[1]) for b in batch], dtype=torch.long)
        batch = [b[0] for b in batch]
        first = batch[0]
    if isinstance(first, dict):
        out = {k: torch.stack([b[k] for b in batch]) for k in ("image", "tok_image", "mask")}
    elif isinstance(first, (tuple, list)) and len(first) == 3:
        out = {k: torch.stack([b[i] for b in batch]) for i, k in enumerate(("image", "tok_image", "mask"))}
    else:
        raise TypeError(f"collate_pretrain cannot collate samples of type {type(first).__name__}")
    if labels is not None:
        out["label"] = labels
    return out


# --------------------------------------------------------------------------------------- fine-tune / eval
def _resolve_crop_pct(input_size: int, crop_pct: float | None) -> float:
    if crop_pct is None:  # unilm run_class_finetuning.py: 224/256 below 384, no crop at 384+
        crop_pct = 1.0 if input_size <= SMALL_IMAGE_SIZE or input_size >= 384 else 224 / 256
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    return float(crop_pct)


def eval_resize_size(input_size: int, crop_pct: float | None) -> int:
    """The short side, in pixels, that the eval transform resizes to before its center ``input_size`` crop:
    ``int(input_size / crop_pct)``; ``crop_pct`` None is 224/256, and 1.0 at <=32 px and >=384 px (unilm).

    Raises ValueError: a ``crop_pct`` outside (0, 1].
    """
    return int(input_size / _resolve_crop_pct(input_size, crop_pct))


def build_eval_transform(
    input_size: int = 224,
    *,
    crop_pct: float | None = None,
    interpolation: str = "bicubic",
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> Callable[[Image.Image], torch.Tensor]:
    """Resize the short side to ``input_size / crop_pct``, center crop, normalise.

    ``crop_pct`` defaults to 224/256 (the usual ImageNet eval crop) and to 1.0 for images of 32 px
    or less, which have no margin to crop away, and for 384+ (as unilm).
    """
    if not isinstance(input_size, int) or input_size <= 0:
        raise ValueError(f"input_size must be a positive int, got {input_size!r}")
    mean, std = _check_mean_std(mean, std)
    size = eval_resize_size(input_size, crop_pct)
    return deterministic(T.Compose(  # no random draw: datasets skip the per-sample seeding
        [
            T.Resize(size, interpolation=interpolation_mode(interpolation)),
            T.CenterCrop(input_size),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    ))


def build_full_image_transform(
    is_train: bool,
    input_size: int = 224,
    *,
    hflip: float = 0.0,
    re_prob: float = 0.0,
    interpolation: str = "bicubic",
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> Callable[[Image.Image], torch.Tensor]:
    """The document recipe (DiT / RVL-CDIP): the whole image resized to ``input_size`` x ``input_size``,
    no crop (a page's layout is the signal), no colour augmentation.

    Train: resize, flip with probability ``hflip`` (0 = none), normalise, then timm's random erasing
    ('pixel' mode) with probability ``re_prob`` (0 = none). Eval: resize, normalise. Output float
    ``[3, input_size, input_size]``. Raises ``ValueError`` for a bad size, probability or interpolation.
    """
    if not isinstance(input_size, int) or input_size <= 0:
        raise ValueError(f"input_size must be a positive int, got {input_size!r}")
    for name, p in (("hflip", hflip), ("re_prob", re_prob)):
        if not 0 <= p <= 1:
            raise ValueError(f"{name} is a probability, got {p}")
    mean, std = _check_mean_std(mean, std)
    steps: list[Any] = [T.Resize((input_size, input_size), interpolation=interpolation_mode(interpolation))]
    if is_train and hflip > 0:
        steps.append(T.RandomHorizontalFlip(hflip))
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    if is_train and re_prob > 0:
        steps.append(RandomErasing(re_prob, mode="pixel", device="cpu"))
    random_steps = is_train and (hflip > 0 or re_prob > 0)
    return T.Compose(steps) if random_steps else deterministic(T.Compose(steps))


def _posterize_zero_safe(img: Any, bits_to_keep: int, **_: Any) -> Any:
    """timm's posterize, with 0 bits (RandAugment's level 10 of PosterizeIncreasing) giving the black image
    that Pillow < 11 gave; Pillow >= 11 raises instead and would stop training at a random step."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _guard_posterize(transform: Any) -> Any:
    for t in getattr(transform, "transforms", []):
        if isinstance(t, aa.RandAugment):
            for op in t.ops:
                if op.aug_fn is aa.posterize:
                    op.aug_fn = _posterize_zero_safe
    return transform


class EnsureMinSize:
    """Scale an image up (keeping its aspect ratio) until both sides are at least ``min_size`` px;
    larger images pass unchanged. Put before a fixed-size crop, so that a 9x9 icon or a 2000x10
    strip is cropped like any image instead of stopping an epoch ("Required crop size ... is
    larger than input image size").

    Args:
        min_size: the smallest side allowed, in pixels.
        interpolation: resize filter name (``bicubic`` by default).
    """

    def __init__(self, min_size: int, interpolation: str = "bicubic") -> None:
        if not isinstance(min_size, int) or min_size <= 0:
            raise ValueError(f"min_size must be a positive int, got {min_size!r}")
        self.min_size = min_size
        self.interpolation = interpolation_mode(interpolation)

    def __call__(self, img: Any) -> Any:
        w, h = TF.get_image_size(img)
        short = min(w, h)
        if short >= self.min_size:
            return img
        scale = self.min_size / short
        size = [max(self.min_size, math.ceil(h * scale - 1e-6)), max(self.min_size, math.ceil(w * scale - 1e-6))]
        return TF.resize(img, size, interpolation=self.interpolation)

    def __repr__(self) -> str:
        return f"EnsureMinSize({self.min_size}, {self.interpolation.value})"


class SmallImageRandomCrop(T.RandomCrop):
    """unilm's crop for CIFAR-sized inputs, ``RandomCrop(size, padding=4)``, after scaling images
    smaller than the crop up to it (:class:`EnsureMinSize`), so a 9x9 or 2000x10 image is cropped
    like any other instead of raising "Required crop size ... is larger than input image size"."""

    def __init__(self, size: int, padding: int = 4, interpolation: str = "bicubic") -> None:
        super().__init__(size, padding=padding)
        self.ensure = EnsureMinSize(size, interpolation)

    def forward(self, img: Any) -> Any:
        return super().forward(self.ensure(img))


def _small_image_crop(input_size: int, interpolation: str, padding: int | None = None) -> SmallImageRandomCrop:
    return SmallImageRandomCrop(input_size, padding=small_image_padding(input_size, padding),
                                interpolation=interpolation)


def check_auto_augment(spec: str) -> None:
    """Whether timm parses the augmentation string ``spec`` as ``create_transform`` would (RandAugment ``rand-...``,
    AugMix ``augmix-...``, else an AutoAugment policy): its parsers end a bad one in a bare ``AssertionError``
    (``rand-mstd0.5-x9``: "Unknown RandAugment config section"; ``randfoo``: no message). The names of
    :data:`TORCHVISION_AUTOAUGMENT` (torchvision's policies: ``autoaugment-cifar10``, ...) pass too.

    Raises:
        ValueError: ``spec`` is not one timm can build, naming it and the kinds it can be.
    """
    if spec in TORCHVISION_AUTOAUGMENT:
        return
    hparams: dict[str, Any] = {"translate_const": 100, "img_mean": (124, 116, 104)}
    try:
        if spec.startswith("rand"):
            aa.rand_augment_transform(spec, hparams)
        elif spec.startswith("augmix"):
            aa.augment_and_mix_transform(spec, {**hparams, "translate_pct": 0.3})
        else:
            aa.auto_augment_transform(spec, hparams)
    except (AssertionError, ValueError, KeyError, IndexError, TypeError) as e:
        detail = f" ({e})" if str(e) else ""
        raise ValueError(f"{spec!r} is not an augmentation timm can build{detail}: RandAugment 'rand-m9-mstd0.5-inc1', "
                         "AugMix 'augmix-m5', an AutoAugment policy 'original' | 'originalr' | 'v0' | 'v0r' | '3a' "
                         f"(timm's) or {' | '.join(repr(k) for k in TORCHVISION_AUTOAUGMENT)} (torchvision's), "
                         "or null for none") from None


def build_finetune_transform(
    is_train: bool,
    input_size: int = 224,
    *,
    auto_augment: str | None = "rand-m9-mstd0.5-inc1",
    color_jitter: float | None = 0.4,
    re_prob: float = 0.25,
    re_mode: str = "pixel",
    re_count: int = 1,
    scale: tuple[float, float] = (0.08, 1.0),
    hflip: float = 0.5,
    interpolation: str = "bicubic",
    crop_pct: float | None = None,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    crop_padding: int | None = None,
) -> Callable[[Image.Image], torch.Tensor]:
    """The BEiT fine-tuning recipe (unilm ``build_transform``) through timm's ``create_transform``.

    Train: random-resized crop (bicubic), flip, RandAugment ``rand-m9-mstd0.5-inc1`` (timm then
    skips color jitter, as in the official runs), normalise, random erasing 0.25 ('pixel').
    ``auto_augment`` may also name a torchvision AutoAugment policy (:data:`TORCHVISION_AUTOAUGMENT`), which takes
    RandAugment's place (no color jitter either; its fill is ``mean`` in 0-255).
    For ``input_size <= 32`` the crop is ``RandomCrop(size, padding=crop_padding)`` instead (default
    ``size // 8``: 4 at 32 px, as unilm does for CIFAR-sized inputs; 0: no shift), after scaling images
    smaller than the crop up to it (``EnsureMinSize``), so tiny or thin images never stop an epoch.
    Eval: ``build_eval_transform``.
    """
    if not is_train:
        return build_eval_transform(input_size, crop_pct=crop_pct, interpolation=interpolation, mean=mean, std=std)
    if not isinstance(input_size, int) or input_size <= 0:
        raise ValueError(f"input_size must be a positive int, got {input_size!r}")
    if not 0 <= re_prob <= 1:
        raise ValueError(f"re_prob is a probability, got {re_prob}")
    mean, std = _check_mean_std(mean, std)
    _check_range(scale, "scale", upper=1.0)
    policy = TORCHVISION_AUTOAUGMENT.get(auto_augment) if auto_augment else None
    transform = create_transform(
        input_size=input_size,
        is_training=True,
        scale=tuple(scale),
        hflip=hflip,
        color_jitter=(color_jitter if color_jitter else 0.0) if policy is None else None,  # None: no jitter step
        auto_augment=auto_augment if policy is None else None,
        interpolation=interpolation,
        re_prob=re_prob,
        re_mode=re_mode,
        re_count=re_count,
        mean=mean,
        std=std,
    )
    if input_size <= SMALL_IMAGE_SIZE:
        transform.transforms[0] = _small_image_crop(input_size, interpolation, crop_padding)
    if policy is not None:  # where RandAugment would be: after the crop and flip, before the tensor conversion
        steps = transform.transforms
        at = next(i for i, t in enumerate(steps) if type(t).__name__ in ("MaybeToTensor", "ToTensor"))
        fill = [round(255 * m) for m in mean]
        steps.insert(at, T.AutoAugment(policy, interpolation=InterpolationMode.NEAREST, fill=fill))
    return _guard_posterize(transform)


def build_linear_probe_transform(
    is_train: bool,
    input_size: int = 224,
    *,
    interpolation: str = "bicubic",
    crop_pct: float | None = None,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> Callable[[Image.Image], torch.Tensor]:
    """Linear probing (unilm ``run_linear_eval``): light augmentation only, random-resized crop +
    flip for training (padded random crop at <= 32 px, images smaller than the crop scaled up to it
    first), ``build_eval_transform`` for evaluation."""
    if not is_train:
        return build_eval_transform(input_size, crop_pct=crop_pct, interpolation=interpolation, mean=mean, std=std)
    mean, std = _check_mean_std(mean, std)
    if input_size <= SMALL_IMAGE_SIZE:
        crop: Any = _small_image_crop(input_size, interpolation)
    else:
        crop = T.RandomResizedCrop(input_size, interpolation=interpolation_mode(interpolation))
    return T.Compose([crop, T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
