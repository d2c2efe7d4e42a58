"""BEiT + UperNet for semantic segmentation, as in the paper's ADE20K setup, without mmcv/mmseg.

Pieces (shapes for a 512x512 input and BEiT-base, patch 16):

* backbone: a ``beit.models.Beit`` (``head="none"``); ``forward_intermediates`` gives the patch maps of
  four blocks (base: 3, 5, 7, 11), each ``[B, 768, 32, 32]``.
* ``FeaturePyramid``: turns the four single-scale maps into strides 4, 8, 16, 32 with
  ConvT2x2-BN-GELU-ConvT2x2 / ConvT2x2 / Identity / MaxPool2 (the official ``fpn1..fpn4``).
* ``UperHead``: PPM (pool scales 1, 2, 3, 6) on the coarsest level + FPN top-down path + fusion.
* ``FCNHead``: auxiliary head on the third level (stride 16), loss weight 0.4 during training.

``BeitSegmenter(x)`` returns logits at the input resolution; ``BeitSegmenter(x, with_aux=True)`` also
returns the auxiliary logits (training). Inputs of any size work: they are padded to a multiple of
``2 * patch_size`` and the logits cropped back, so sliding-window inference can feed border windows.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from beit._text import first_few
from beit.engine.checkpoint import load_model_state, model_weights
from beit.engine.config import ConfigError
from beit.engine.rundir import class_list_key
from beit.interop.backbone import build_backbone as _build_backbone
from beit.interop.backbone import check_overrides_fit
from beit.models import Beit, BeitConfig
from beit.models.pyramid import PYRAMID_STRIDES, default_out_indices, pyramid_branch

from ..backbone_config import task_config_from_checkpoint
from .config import SHAPE_KEYS, SegmentConfig
from .data import _class_keys, _classes_source, class_names

__all__ = [
    "BeitSegmenter",
    "ConvBNReLU",
    "FCNHead",
    "FeaturePyramid",
    "PPM",
    "UperHead",
    "build_backbone",
    "build_model",
    "config_from_checkpoint",
    "default_out_indices",
    "load_segmenter",
    "segmentation_loss",
]


class ConvBNReLU(nn.Sequential):
    """mmseg's ``ConvModule``: conv (no bias, since BN follows) -> BatchNorm -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class FeaturePyramid(nn.Module):
    """Four ViT maps at stride ``patch_size`` -> strides 4, 8, 16, 32 (the official ``fpn1..fpn4``).

    For patch 16 the branches are ConvT2x2-BN-GELU-ConvT2x2 (x4), ConvT2x2 (x2), Identity, MaxPool2 (/2),
    exactly the paper's code; other power-of-two patch sizes get the same recipe with other factors.
    """

    strides = PYRAMID_STRIDES

    def __init__(self, dim: int, patch_size: int = 16) -> None:
        super().__init__()
        if patch_size & (patch_size - 1) or patch_size < 1:
            raise ValueError(f"the feature pyramid needs a power-of-two patch size, got {patch_size}")
        self.branches = nn.ModuleList(pyramid_branch(dim, patch_size / s) for s in self.strides)

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [branch(f) for branch, f in zip(self.branches, feats)]


class PPM(nn.Module):
    """Pyramid pooling: average-pool to each scale, 1x1 ConvBNReLU, upsample back (PSPNet)."""

    def __init__(self, pool_scales: Sequence[int], cin: int, channels: int) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvBNReLU(cin, channels, 1)) for s in pool_scales
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        size = x.shape[-2:]
        return [F.interpolate(stage(x), size=size, mode="bilinear", align_corners=False) for stage in self.stages]


class UperHead(nn.Module):
    """UperNet decoder (Xiao et al., 2018) as in mmseg 0.11's ``UPerHead``: PPM + FPN + fused 3x3 conv.

    Returns logits at the finest input level (stride 4).
    """

    def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1) -> None:
        super().__init__()
        self.psp = PPM(pool_scales, in_channels[-1], channels)
        self.bottleneck = ConvBNReLU(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvBNReLU(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvBNReLU(channels, channels, 3) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvBNReLU(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        top = feats[-1]
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        laterals.append(self.bottleneck(torch.cat([top, *self.psp(top)], dim=1)))
        for i in range(len(laterals) - 1, 0, -1):  # top-down path
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[-2:], mode="bilinear", align_corners=False)
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[-2:]
        outs = [outs[0]] + [F.interpolate(o, size=size, mode="bilinear", align_corners=False) for o in outs[1:]]
        return self.conv_seg(self.dropout(self.fpn_bottleneck(torch.cat(outs, dim=1))))


class FCNHead(nn.Module):
    """Auxiliary head (mmseg ``FCNHead``, one 3x3 ConvBNReLU, no input concat): deep supervision only."""

    def __init__(self, cin: int, channels: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.conv = ConvBNReLU(cin, channels, 3)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(self.conv(x)))


class BeitSegmenter(nn.Module):
    """BEiT backbone + feature pyramid + UperNet (+ auxiliary FCN head).

    Exposes ``num_layers``, ``layer_id`` and ``no_weight_decay`` so the engine's default parameter groups
    apply layer-wise lr decay to the backbone: everything outside it (pyramid, heads) counts as the top
    layer, as in the official ``LayerDecayOptimizerConstructor``.
    """

    def __init__(self, backbone: Beit, num_classes: int, *, out_indices: Sequence[int] | None = None,
                 channels: int = 512, aux_channels: int = 256, pool_scales: Sequence[int] = (1, 2, 3, 6),
                 dropout: float = 0.1, use_aux: bool = True) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        depth = backbone.num_layers
        self.out_indices = tuple(out_indices) if out_indices else default_out_indices(depth)
        if len(self.out_indices) != 4 or not all(0 <= i < depth for i in self.out_indices):
            raise ValueError(f"out_indices must be 4 block indices in [0, {depth}), got {list(self.out_indices)}")
        # The segmenter reads block outputs directly: the final norms would get no gradient (and trip
        # DDP's unused-parameter check), so they are dropped, as in the official backbone.
        backbone.norm = nn.Identity()
        backbone.fc_norm = None
        self.backbone = backbone
        self.num_classes = num_classes
        self.num_layers = depth
        self.patch_size = backbone.patch_size
        dim = backbone.embed_dim
        self.neck = FeaturePyramid(dim, self.patch_size)
        self.decode_head = UperHead([dim] * 4, channels, num_classes, pool_scales, dropout)
        self.auxiliary_head = FCNHead(dim, aux_channels, num_classes, dropout) if use_aux else None
        self._init_heads()

    def _init_heads(self) -> None:
        heads = [self.neck, self.decode_head] + ([self.auxiliary_head] if self.auxiliary_head else [])
        for head in heads:
            for m in head.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
        for head in (self.decode_head, self.auxiliary_head):
            if head is not None:  # mmseg: normal(0, 0.01) for the classifier
                nn.init.normal_(head.conv_seg.weight, std=0.01)
                nn.init.zeros_(head.conv_seg.bias)

    def repeated_blocks(self) -> list[nn.Module]:
        """The backbone's transformer blocks: what the engine compiles and shards one by one (the model
        protocol in ``docs/CONTRACTS.md``); pyramid, heads and sliding-window padding stay eager."""
        return list(self.backbone.blocks)

    # ---------------------------------------------------------------- optimizer helpers
    def layer_id(self, name: str) -> int:
        """Backbone params keep their depth (0 .. depth); the pyramid and heads are layer depth + 1."""
        if name.startswith("backbone."):
            return self.backbone.layer_id(name[len("backbone."):])
        return self.num_layers + 1

    def no_weight_decay(self) -> set[str]:
        return set(self.backbone.no_weight_decay())

    # ---------------------------------------------------------------- forward
    def extract_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Four maps at strides 4, 8, 16, 32; ``x`` must be divisible by the patch size."""
        return self.neck(self.backbone.forward_intermediates(x, self.out_indices))

    def forward(self, x: torch.Tensor, with_aux: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[B, num_classes, H, W]`` at the input size (and the auxiliary logits if ``with_aux``)."""
        H, W = x.shape[-2:]
        m = 2 * self.patch_size  # so that the stride-32 max-pool sees an even grid
        pad_h, pad_w = (-H) % m, (-W) % m
        if pad_h or pad_w:  # zeros = the mean colour after normalisation, like mmseg's Pad
            x = F.pad(x, (0, pad_w, 0, pad_h))
        feats = self.extract_pyramid(x)
        size = x.shape[-2:]
        logits = F.interpolate(self.decode_head(feats), size=size, mode="bilinear", align_corners=False)
        logits = logits[..., :H, :W]
        if not with_aux:
            return logits
        if self.auxiliary_head is None:
            raise ValueError("this model was built with use_aux=False")
        aux = F.interpolate(self.auxiliary_head(feats[2]), size=size, mode="bilinear", align_corners=False)
        return logits, aux[..., :H, :W]


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255,
                      aux_logits: torch.Tensor | None = None, aux_weight: float = 0.4
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pixel cross-entropy averaged over non-ignored pixels, plus ``aux_weight`` x the auxiliary loss.

    Logits are upsampled to the label size first (mmseg decodes at 1/4 and resizes, as here). A batch with
    only ignored pixels gives a zero loss (with a graph), not NaN. (mmseg 0.11 divided by all pixels,
    ignored ones included; later mmseg made the non-ignored mean, used here, an option.)
    """
    def ce(lg: torch.Tensor) -> torch.Tensor:
        if lg.shape[-2:] != target.shape[-2:]:
            lg = F.interpolate(lg, size=target.shape[-2:], mode="bilinear", align_corners=False)
        total = F.cross_entropy(lg.float(), target, ignore_index=ignore_index, reduction="sum")
        return total / (target != ignore_index).sum().clamp(min=1)  # no host sync, no NaN

    loss_seg = ce(logits)
    parts = {"loss_seg": loss_seg.detach()}
    loss = loss_seg
    if aux_logits is not None:
        loss_aux = ce(aux_logits)
        parts["loss_aux"] = loss_aux.detach()
        loss = loss + aux_weight * loss_aux
    return loss, parts


# --------------------------------------------------------------------------------------- from the config
_NOT_DIVISIBLE = re.compile(r"img_size (\d+) is not divisible by patch_size (\d+)")


def _crop_error(e: ValueError, crop: int) -> ConfigError | None:
    """The backbone refused ``img_size`` = ``data.crop_size``: the same error naming the user's key, else None."""
    m = _NOT_DIVISIBLE.search(str(e))
    if m is None:
        return None
    p = int(m.group(2))
    near = sorted({max(p, crop // p * p), -(-crop // p) * p})
    return ConfigError("data.crop_size", f"{crop} is not divisible by the backbone's patch size {p}: use a multiple "
                                         f"of {p} (e.g. {' or '.join(map(str, near))})")


def build_backbone(cfg: SegmentConfig) -> Beit:
    """The BEiT backbone at the crop size through ``beit.build_backbone``: from ``model.init`` (rel-pos tables
    made per-layer and resampled to the crop's grid), from the config stored by training
    (``model.backbone``), or from the preset ``model.arch``; ``model_overrides`` apply to all three.

    A shape key (``model.embed_dim`` / ``depth`` / ``num_heads`` / ``patch_size``, or the same in
    ``model_overrides``) may be given with a checkpoint only when it equals the checkpoint's value.

    Raises:
        ConfigError: ``data.crop_size`` not a multiple of the patch size, or a ``model.<shape key>`` that
            disagrees with ``model.init``'s (naming both values).
        ValueError: a ``model_overrides`` shape key that disagrees with the checkpoint's (naming both values).
        FileNotFoundError / CheckpointError: ``model.init`` cannot be read.
    """
    m, crop = cfg.model, cfg.data.crop_size
    user = dict(cfg.model_overrides)
    shape = {k: getattr(m, k) for k in SHAPE_KEYS if getattr(m, k) is not None}
    fixed = {"head": "none", "drop_path_rate": m.drop_path_rate}  # SegmentConfig.validate refuses them in user
    try:
        if m.init:
            # model.<shape key> is compared below, to name the key the user set (model_overrides' are checked
            # by build_backbone); SegmentConfig.validate made the two agree where both are set
            body = _build_backbone(m.init, rel_pos="per_layer", **{**user, **fixed, "img_size": crop})
            for k, v in shape.items():
                have = getattr(body.cfg, k)
                if have != v:
                    raise ConfigError(f"model.{k}", f"{k}={v} but model.init={m.init!r} has {k}={have}: a checkpoint's "
                                                    f"architecture comes from its tensors. Remove model.{k}, set it "
                                                    f"to {have}, or clear model.init to train from scratch")
            return body
        user.update(shape)
        if m.backbone:
            stored = BeitConfig.from_dict(dict(m.backbone))
            check_overrides_fit("the checkpoint's stored backbone", stored, user)
            return _build_backbone(stored, **{**user, **fixed})
        return _build_backbone(m.arch, **{"use_rel_pos_bias": True, "use_shared_rel_pos_bias": False, **user,
                                          **fixed, "img_size": crop})
    except ConfigError:
        raise
    except ValueError as e:
        err = _crop_error(e, crop)
        if err is None:
            raise
        raise err from None


def build_model(cfg: SegmentConfig, num_classes: int | None = None) -> BeitSegmenter:
    """Backbone + pyramid + UperNet (+ aux head); records the backbone config in ``cfg.model.backbone``."""
    num_classes = num_classes or len(class_names(cfg.data))
    backbone = build_backbone(cfg)
    m = cfg.model
    model = BeitSegmenter(backbone, num_classes, out_indices=m.out_indices, channels=m.channels,
                          aux_channels=m.aux_channels, pool_scales=tuple(m.pool_scales), dropout=m.dropout,
                          use_aux=m.aux_weight > 0)
    m.backbone = backbone.cfg.to_dict()
    return model.train()  # load_model hands the backbone back in eval mode



def config_from_checkpoint(path: str | Path, config_file: str | None = None,
                           overrides: list[str] | None = None) -> tuple[SegmentConfig, dict[str, Any]]:
    """The run config stored in a training checkpoint (+ a YAML file + ``key=value`` overrides), and the state
    (``beit.engine.checkpoint.config_from_checkpoint`` with the segmentation schema).

    Raises:
        FileNotFoundError: no such checkpoint.
        ValueError: not a beit training checkpoint, or one of another task (a TaskMismatchError: ``"<path> is a
            classification checkpoint, not a segmentation one: beit evaluate and beit predict take it"``).
        ConfigError: the stored config does not fit :class:`SegmentConfig`, or an override is wrong.
    """
    return task_config_from_checkpoint(SegmentConfig, "segmentation", path, config_file, overrides)


def load_segmenter(path: str | Path, config_file: str | None = None, overrides: list[str] | None = None,
                   use_ema: bool = False) -> tuple[BeitSegmenter, SegmentConfig]:
    """A trained segmenter (eval mode) and its config from a training checkpoint (``last.pt`` / ``best.pt``).

    The class names are those the checkpoint stores (``model.classes``, filled in by training): no class list
    file is read, and the returned config's ``data.classes`` holds them (``data.classes_file`` cleared). A
    ``data.classes`` / ``data.classes_file`` / ``data.num_classes`` / ``data.format`` that the config file or
    overrides change, or a checkpoint from before the names were stored, gives the names from the data config
    (:func:`~beit.tasks.segmentation.data.class_names`) instead; there must be as many as the heads were trained for.

    Raises:
        FileNotFoundError, ValueError, TaskMismatchError, ConfigError: as :func:`config_from_checkpoint`.
        ValueError: the config has no ``model.backbone`` (not written by ``beit segment train``); ``--ema``
            (``use_ema``) of a run without EMA.
        ConfigError: the class list cannot be read (for an older checkpoint, saying that the path is its stored
            ``data.classes_file`` and how to point it elsewhere), or gives another number of classes than the
            checkpoint was trained for (naming both, where each comes from, and the fix).
    """
    cfg, state = config_from_checkpoint(path, config_file, overrides)
    if not cfg.model.backbone:
        raise ValueError(f"{path}: the config has no model.backbone; was it written by `beit segment train`?")
    weights = model_weights(state, path, use_ema)
    names = _checkpoint_class_names(cfg, state.get("config") or {}, weights, path)
    init, cfg.model.init = cfg.model.init, ""  # rebuild from the stored architecture, not the pre-trained file
    model = build_model(cfg, len(names))
    cfg.model.init = init
    load_model_state(model, weights, source=str(path))
    return model.eval(), cfg


def _norm(value: Any) -> Any:
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else value


def _checkpoint_class_names(cfg: SegmentConfig, saved: dict[str, Any], weights: dict[str, Any],
                            path: str | Path) -> list[str]:
    """The class names for the segmenter of checkpoint ``path`` (``saved``: its stored config, ``weights``: its
    tensors) under ``cfg`` (that config with the user's file and overrides): see :func:`load_segmenter`.

    In order: ``model.classes`` given anew (renaming the classes); the names the checkpoint stores, unless the
    data config now gives a list of its own (``data.classes`` / ``data.classes_file`` / ``data.num_classes``
    changed from the stored ones); else the data config's list. Any of them must have as many names as the heads
    have classes."""
    d = cfg.data
    stored_model = saved.get("model") if isinstance(saved.get("model"), dict) else {}
    trained = [str(n) for n in stored_model.get("classes") or []]
    stored = saved.get("data") if isinstance(saved.get("data"), dict) else {}
    keys = {"classes": [], "classes_file": "", "num_classes": 0}  # the data keys that give the names: defaults
    changed = [f"data.{k}" for k, default in keys.items()
               if _norm(getattr(d, k)) != _norm(default if stored.get(k) is None else stored[k])]
    head = weights.get("decode_head.conv_seg.weight")
    n_trained = len(trained) or (int(head.shape[0]) if isinstance(head, torch.Tensor) else 0)
    own_list = bool(d.classes or d.classes_file or d.num_classes not in (0, n_trained))
    given = [str(n) for n in cfg.model.classes or []]
    if given and given != trained:
        names, key, source = given, "model.classes", "model.classes"
    elif trained and not (changed and own_list):
        names, key, source = trained, "", ""
    else:
        if d.classes_file and "data.classes_file" not in changed and not Path(d.classes_file).exists():
            why = ("its own class names are used only while the config gives no list of its own, and "
                   f"{', '.join(changed)} changed" if trained
                   else "the run predates checkpoints that keep their class names")
            raise ConfigError("data.classes_file", f"class list file {d.classes_file!r} not found: the path is the "
                                                   f"one {path}'s stored config names ({why}); point it at the "
                                                   "list's new place: data.classes_file=NEW (or give the names: "
                                                   "\"data.classes=[a,b,...]\" data.classes_file=null)")
        names = class_names(d)
        key = class_list_key(_class_keys(d)) or "data.format"
        source = _classes_source(d)
    if n_trained and len(names) != n_trained:
        was = f"its classes: {first_few(trained, 4)}" if trained else "its heads' size; it stores no class names"
        fix = "; or leave the class list out to use the names the checkpoint stores" if trained else ""
        raise ConfigError(key, f"{path} was trained for {n_trained} classes ({was}), but the config (-c file or "
                               f"overrides) now gives {len(names)} ({source}): give {n_trained} class names{fix}; "
                               f"{len(names)} classes need a model trained for them (beit segment train)")
    cfg.model.classes = list(names)
    d.classes, d.classes_file = list(names), ""  # what evaluate's datasets then read: no file needed
    return names
