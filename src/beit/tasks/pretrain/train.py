"""BEiT masked-image-modeling pre-training on the shared engine.

Per step: the frozen tokenizer turns the tokenizer view into visual tokens (no grad), the masked
patches are replaced by the mask token, and cross-entropy is taken on the masked positions only.
Everything else (optimizer, schedule, bf16, DDP/FSDP, checkpoints, resume, logging) is the engine's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.utils import save_image

from ...data.datasets import ImageFolderDataset, TensorImageDataset, WebDatasetShards, load_image_folder_to_memory
from ...data.gpu_augment import PretrainViews
from ...data.gpu_decode import (
    EncodedImageFiles,
    EncodedWebDataset,
    InMemoryIndices,
    PretrainPipeline,
    collate_encoded,
    use_device_path,
    with_pipeline,
)
from ...data.masking import BlockwiseMaskGenerator
from ...data.transforms import PretrainTransform, collate_pretrain
from ...engine import Trainer
from ...engine import distributed as D
from ...engine.config import ConfigError, TrainConfig
from ...engine.trainer import seed_everything
from ...interop import save_model
from ...interop.backbone import build_backbone
from ...models import BeitConfig
from ...models.config import preset_config
from ...tokenizers import TOKENIZERS, load_tokenizer
from ..backbone_config import check_model_overrides

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
    device: str = "auto"  # where images are decoded and augmented: auto (gpu on CUDA) | cpu (PIL in the
    # workers) | gpu (batched nvJPEG decode + per-sample augmentation on the device)


@dataclass
class PretrainTokenizerConfig:
    kind: str = "dalle"  # dalle (OpenAI's dVAE, encoder.pkl) | dvae (trained with `beit tokenizer train`)
    path: str = ""  # dalle: encoder.pkl or our safetensors; dvae: safetensors
    decoder: str = ""  # dalle only: decoder.pkl, for the image panels
    precision: str = "fp32"  # dalle: fp32 | tf32 | bf16 | fp16 (official: fp16; ids match fp32 at ~99.7%)


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


# ------------------------------------------------------------------------------------------ building
SHAPE_KEYS = ("embed_dim", "depth", "num_heads")  # model.<key>: shape shortcuts (None = the preset's / checkpoint's)


def model_overrides(cfg: PretrainConfig, vocab_size: int) -> dict[str, Any]:
    """The ``BeitConfig`` fields pre-training sets: the MIM head, the image / patch size of the masks, the
    recipe's drop path / layer scale / attention, the shape shortcuts ``model.depth`` ..., then ``model_overrides``
    (which win over ``model.drop_path_rate`` / ``model.init_values`` / ``model.attn_impl``)."""
    m = cfg.model
    over: dict[str, Any] = dict(
        head="mim", vocab_size=vocab_size, img_size=m.img_size, patch_size=m.patch_size,
        drop_path_rate=m.drop_path_rate, init_values=m.init_values, attn_impl=m.attn_impl,
    )
    over.update({k: getattr(m, k) for k in SHAPE_KEYS if getattr(m, k)})
    over.update(cfg.model_overrides)
    return over


def model_config(cfg: PretrainConfig, vocab_size: int) -> BeitConfig:
    """The from-scratch architecture: preset ``model.name`` with :func:`model_overrides`."""
    try:
        return preset_config(cfg.model.name, **model_overrides(cfg, vocab_size))
    except ValueError as e:
        raise ConfigError("model", str(e)) from None


def build_model(cfg: PretrainConfig, vocab_size: int) -> nn.Module:
    """The MIM model through ``beit.build_backbone``: preset ``model.name`` (random init), or ``model.init``
    (a checkpoint, any format ``beit.load_model`` reads: its shape comes from its tensors, ``model.depth`` /
    ``model_overrides.depth`` ... that disagree are an error; its relative-position scheme is kept)."""
    over = model_overrides(cfg, vocab_size)
    if not cfg.model.init:
        model_config(cfg, vocab_size)  # config errors name the key
        return build_backbone(cfg.model.name, **over)
    over.setdefault("use_mean_pooling", False)  # the final norm feeds the lm head, as a pre-training model
    return build_backbone(cfg.model.init, key="model", **over)


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
    if not d.path:
        raise ConfigError("data.path", "no data: give a folder of images (data.path=DIR)")
    if not shard_urls(d.path) and not Path(d.path).exists():
        raise ConfigError("data.path", f"folder not found: {d.path}")
    if shard_urls(d.path) and d.num_samples <= 0:
        raise ConfigError("data.num_samples", f"{d.path} is webdataset shards: give the images per epoch "
                                              "(data.num_samples=N)")
    grid = m.img_size // m.patch_size
    try:
        BlockwiseMaskGenerator((grid, grid), d.num_mask_patches, d.min_mask_patches_per_block,
                               d.max_mask_patches_per_block)
    except ValueError as e:
        key = "data.min_mask_patches_per_block" if "budget" in str(e) else "data.num_mask_patches"
        raise ConfigError(key, f"{e} (patch grid {grid}x{grid})") from None
    kind = TOKENIZERS.get(t.kind)
    if kind is None:
        raise ConfigError("tokenizer.kind", f"must be one of {', '.join(repr(k) for k in TOKENIZERS)}, got {t.kind!r}")
    if t.precision not in kind.precisions:
        raise ConfigError("tokenizer.precision", f"a {t.kind} tokenizer runs in {' | '.join(kind.precisions)}, "
                                                 f"got {t.precision!r}")
    if t.decoder and not kind.has_decoder_file:
        raise ConfigError("tokenizer.decoder", f"a {t.kind} tokenizer keeps its decoder in tokenizer.path; "
                                               f"leave tokenizer.decoder empty (got {t.decoder!r})")
    if not t.path:
        raise ConfigError("tokenizer.path", "no tokenizer: give tokenizer.path (DALL-E encoder.pkl or a dVAE "
                                            "trained with `beit tokenizer train`)")
    for key, value in (("tokenizer.path", t.path), ("tokenizer.decoder", t.decoder)):
        if value and not Path(value).exists():
            raise ConfigError(key, f"file not found: {value}")


def shard_urls(path: str) -> list[str]:
    """The shard files ``path`` names (a .tar, a folder of .tar files, a brace pattern), or [] for images."""
    if "{" in path:
        import braceexpand

        return list(braceexpand.braceexpand(path))
    p = Path(path)
    if p.is_file() and p.suffix == ".tar":
        return [str(p)]
    if p.is_dir():
        tars = sorted(str(t) for t in p.glob("*.tar"))
        has_images = any(f.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp") for f in p.iterdir())
        return tars if tars and not has_images else []
    return []


def build_tokenizer(t: PretrainTokenizerConfig, device: torch.device | str = "cpu") -> nn.Module:
    """The frozen tokenizer ``t`` names, through the one registry (:func:`beit.tokenizers.load_tokenizer`),
    on ``device`` in eval mode without gradients. Raises ``ValueError`` for a kind or option the
    registry does not know."""
    tok = load_tokenizer(t.kind, t.path, decoder=t.decoder or None, precision=t.precision, device=device)
    return tok.to(device).eval().requires_grad_(False)


def build_dataset(cfg: PretrainConfig, tokenizer_downsample: int) -> torch.utils.data.Dataset:
    m, d = cfg.model, cfg.data
    grid = m.img_size // m.patch_size
    masks = BlockwiseMaskGenerator((grid, grid), d.num_mask_patches, d.min_mask_patches_per_block,
                                   d.max_mask_patches_per_block)
    transform = PretrainTransform(
        input_size=m.img_size, patch_size=m.patch_size, tokenizer_downsample=tokenizer_downsample,
        scale=tuple(d.scale), color_jitter=d.color_jitter, hflip=d.hflip, mean=tuple(d.mean), std=tuple(d.std),
        mask_generator=masks,
    )
    seed = cfg.train.seed
    urls = shard_urls(d.path)
    if urls:
        return WebDatasetShards(urls, transform=transform, seed=seed, num_samples=d.num_samples)
    if d.in_memory:
        images, _, _ = load_image_folder_to_memory(d.path)
        if d.max_images:
            images = images[: d.max_images]
        return TensorImageDataset(images, transform=transform, seed=seed)
    ds = ImageFolderDataset(d.path, transform=transform, seed=seed)
    if d.max_images and d.max_images < len(ds):
        ds = torch.utils.data.Subset(ds, range(d.max_images))
        ds.set_epoch = ds.dataset.set_epoch  # type: ignore[attr-defined]  # keep per-epoch augmentation
    return ds


def build_device_data(cfg: PretrainConfig, tokenizer_downsample: int, device: torch.device | str
                      ) -> tuple[torch.utils.data.Dataset, Any, Any] | None:
    """The batched on-device data path (``data.device``), or None for the CPU path.

    Returns ``(dataset, collate_fn, pipeline)``: the workers read bytes and draw masks, ``pipeline(batch)``
    decodes and makes the two views on ``device``. Folders, webdataset shards and ``data.in_memory``.

    Raises:
        ConfigError: ``data.device`` is not auto | cpu | gpu.
    """
    m, d = cfg.model, cfg.data
    try:
        wanted = use_device_path(d.device, device)
    except ValueError as e:
        raise ConfigError("data.device", str(e)) from None
    if not wanted:
        return None
    grid = m.img_size // m.patch_size
    masks = BlockwiseMaskGenerator((grid, grid), d.num_mask_patches, d.min_mask_patches_per_block,
                                   d.max_mask_patches_per_block)
    t = PretrainTransform(input_size=m.img_size, patch_size=m.patch_size, tokenizer_downsample=tokenizer_downsample,
                          scale=tuple(d.scale), color_jitter=d.color_jitter, hflip=d.hflip, mean=tuple(d.mean),
                          std=tuple(d.std), mask_generator=masks)
    views = PretrainViews.from_transform(t, seed=cfg.train.seed)
    seed = cfg.train.seed
    urls = shard_urls(d.path)
    if urls:
        shards = EncodedWebDataset(urls, mask_generator=masks, seed=seed, num_samples=d.num_samples)
        return shards, collate_encoded, PretrainPipeline(views, device)
    if d.in_memory:
        images, _, _ = load_image_folder_to_memory(d.path)
        if d.max_images:
            images = images[: d.max_images]
        return (InMemoryIndices(len(images), mask_generator=masks, seed=seed), InMemoryIndices.collate,
                PretrainPipeline(views, device, images))
    ds = EncodedImageFiles.from_folder(d.path, mask_generator=masks, seed=seed)
    if d.max_images:
        ds.samples = ds.samples[: d.max_images]
    return ds, collate_encoded, PretrainPipeline(views, device)


def make_step_fn(tokenizer: nn.Module):
    """``(model, batch) -> (loss, metrics)``: tokens of the masked patches are the targets."""

    def step_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        images, mask = batch["image"], batch["mask"].flatten(1).bool()
        with torch.no_grad():
            tokens = tokenizer.encode(batch["tok_image"], validate=False).flatten(1)  # [B, N]
        labels = tokens[mask]
        logits = model(images, mask)  # [num_masked, vocab]: the head runs on masked tokens only
        loss = F.cross_entropy(logits.float(), labels)
        acc = (logits.argmax(-1) == labels).float().mean()
        return loss, {"mim_acc": acc, "masked_frac": mask.float().mean()}

    return step_fn


# ------------------------------------------------------------------------------------------ pictures
def _denorm(x: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x * s + m).clamp(0, 1)


@torch.no_grad()
def mim_panel(model: nn.Module, tokenizer: nn.Module, batch: dict[str, torch.Tensor], mean: tuple, std: tuple,
              path: str | Path) -> Path:
    """One row per image: input | input with its mask | tokenizer's reconstruction of the true tokens |
    the same with the model's predictions at the masked patches (decoded through the tokenizer)."""
    model_was_training = model.training
    model.eval()
    images, mask = batch["image"], batch["mask"].bool()
    B, gh, gw = mask.shape
    tokens = tokenizer.encode(batch["tok_image"], validate=False)  # [B, gh, gw]
    pred = model(images, mask.flatten(1)).argmax(-1)
    mixed = tokens.clone()
    mixed[mask] = pred
    shown = _denorm(images.float(), mean, std)
    H, W = shown.shape[-2:]
    up = F.interpolate(mask[:, None].float(), size=(H, W), mode="nearest")
    masked = shown * (1 - up) + 0.5 * up
    cols = [shown, masked]
    try:  # a DALL-E tokenizer loaded without its decoder cannot decode
        rec_true = F.interpolate(tokenizer.decode(tokens).float(), size=(H, W), mode="bilinear")
        rec_pred = F.interpolate(tokenizer.decode(mixed).float(), size=(H, W), mode="bilinear")
        cols += [rec_true.clamp(0, 1), rec_pred.clamp(0, 1)]
    except RuntimeError:
        pass
    if len(cols) == 2:  # no decoder: show where the prediction is right (green) or wrong (red)
        right = (mixed == tokens).float()[:, None]
        color = torch.cat([1 - right, right, torch.zeros_like(right)], 1)
        color = F.interpolate(color, size=(H, W), mode="nearest")
        cols.append(shown * (1 - up) + color * up)
    grid = torch.stack(cols, dim=1).flatten(0, 1)  # row-major: each image's panels side by side
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, str(path), nrow=len(cols), padding=2, pad_value=1.0)
    model.train(model_was_training)
    return path


def _fixed_batch(dataset: torch.utils.data.Dataset, n: int, device: torch.device,
                 device_data: tuple[Any, Any, Any] | None = None) -> dict[str, torch.Tensor]:
    if isinstance(dataset, torch.utils.data.IterableDataset):
        samples = [s for _, s in zip(range(n), iter(dataset))]
    else:
        samples = [dataset[i] for i in range(min(n, len(dataset)))]
    if device_data is not None:  # the on-device path: collate raw samples, then decode + views
        _, collate, pipeline = device_data
        return {k: v.to(device) for k, v in pipeline(collate(samples)).items()}
    return {k: v.to(device) for k, v in collate_pretrain(samples).items()}


# ------------------------------------------------------------------------------------------ entry point
def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Run (or resume) a pre-training; returns the final metrics and where things were written."""
    validate(cfg)
    D.init_distributed()
    seed_everything(cfg.train.seed)  # the model's initial weights are a function of the seed alone
    device = D.device()
    tokenizer = build_tokenizer(cfg.tokenizer, device)
    model = build_model(cfg, tokenizer.vocab_size)

    device_data = build_device_data(cfg, tokenizer.downsample, device)
    if device_data is None:
        dataset, collate = build_dataset(cfg, tokenizer.downsample), collate_pretrain
        step_fn = make_step_fn(tokenizer)
    else:
        dataset, collate, pipeline = device_data

        step_fn = with_pipeline(make_step_fn(tokenizer), pipeline)
    panel_batch: dict[str, torch.Tensor] = {}
    d = cfg.data

    def visualize(model: nn.Module, step: int, out_dir: Path) -> None:
        if not panel_batch:
            panel_batch.update(_fixed_batch(dataset, cfg.vis_samples, device, device_data))
        mim_panel(model, tokenizer, panel_batch, tuple(d.mean), tuple(d.std), Path(out_dir) / f"mim_step{step:07d}.png")

    trainer = Trainer(model, dataset, step_fn, cfg.train, collate_fn=collate, visualize_fn=visualize,
                      run_config=cfg)
    metrics = trainer.fit()
    out = Path(cfg.train.output_dir)
    result: dict[str, Any] = dict(metrics)
    final_model = trainer.export_model()  # collective: under FSDP2 gathers the full weights to rank 0
    if D.is_main():
        final = save_model(final_model, out / "final")
        with torch.compiler.set_stance("force_eager"):  # compiled blocks: no recompile for the panel's shapes
            panel = mim_panel(final_model, tokenizer, _fixed_batch(dataset, cfg.vis_samples, device, device_data),
                              tuple(d.mean), tuple(d.std), out / "mim_panel.png")
        result.update(model_dir=str(final), panel=str(panel), curves=str(out / "curves.png"))
    if device_data is not None:  # what the batched decoder did: GPU decodes, CPU fallbacks, skipped files
        result["data_decode"] = device_data[2].decoder.summary()
        trainer.log.info(f"data: {result['data_decode']}")
    return result

