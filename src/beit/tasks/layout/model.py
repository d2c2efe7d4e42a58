"""A document-layout detector: BEiT backbone -> simple feature pyramid -> FPN -> torchvision Mask/Faster R-CNN.

The backbone is DiT's / BEiT's ``build_vit_fpn_backbone``: patch-token maps after four blocks (3, 5, 7, 11
for a 12-block model) are brought to strides 4, 8, 16, 32 by transposed convolutions, identity and max
pooling, then torchvision's FPN adds the top-down path and a max-pooled fifth level. Detection heads,
anchors, RoI pooling and losses are torchvision's, so nothing here needs Detectron2 or mmdet.

Pages of any size work: torchvision's transform pads the batch to a multiple of ``lcm(32, patch)`` and the
backbone resamples its relative-position tables to the page's patch grid at run time.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from beit.models.pyramid import PYRAMID_STRIDES, default_out_indices, pyramid_branch

from ...engine.checkpoint import load_model_state, model_weights
from ...interop.backbone import build_backbone, check_overrides_fit
from ...models import Beit, BeitConfig
from ..backbone_config import task_config_from_checkpoint
from .config import DetectorConfig, LayoutConfig

__all__ = ["BeitPyramidBackbone", "DetectorConfig", "LayoutDetector", "build_detector", "default_out_indices",
           "load_detector"]




class BeitPyramidBackbone(nn.Module):
    """BEiT -> four maps at strides 4/8/16/32 -> FPN (+ max-pooled level): what torchvision's R-CNNs expect.

    ``forward(images [B, 3, H, W]) -> OrderedDict('0', '1', '2', '3', 'pool')`` of ``[B, out_channels, H/s, W/s]``
    (H, W multiples of ``lcm(32, patch)``). ``out_channels`` is read by torchvision's detectors.
    """

    def __init__(self, body: Beit, out_indices: tuple[int, ...] | list[int] | None = None,
                 out_channels: int = 256, norm: str = "bn", extra_pool: bool = True) -> None:
        super().__init__()
        p = body.patch_size
        if p & (p - 1) or p < 2:
            raise ValueError(f"the pyramid needs a power-of-two patch size, got {p}")
        self.body = body
        self.out_indices = tuple(out_indices) if out_indices is not None else default_out_indices(body.num_layers)
        if len(self.out_indices) != 4:
            raise ValueError(f"out_indices must name 4 blocks, got {self.out_indices}")
        dim = body.embed_dim
        self.scales = nn.ModuleList(pyramid_branch(dim, p / s, norm) for s in PYRAMID_STRIDES)
        extra = LastLevelMaxPool() if extra_pool else None
        self.fpn = FeaturePyramidNetwork([dim] * 4, out_channels, extra_blocks=extra)
        self.out_channels = out_channels
        self.size_divisible = math.lcm(PYRAMID_STRIDES[-1], p)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        maps = self.body.forward_intermediates(x, self.out_indices)
        feats = OrderedDict((str(i), scale(m)) for i, (scale, m) in enumerate(zip(self.scales, maps)))
        # fp32 out: torchvision builds anchors in the features' dtype, and bf16 anchors / proposals would be
        # quantized to 4-8 px on an 800-1333 px page. The head layers still run under autocast.
        return OrderedDict((k, v.float()) for k, v in self.fpn(feats).items())


class _Fp32Predictor(FastRCNNPredictor):
    """Class scores and box deltas in fp32 even under autocast: bf16 scores tie often, which reorders
    COCOeval's ranking, and the cost of one small linear layer in fp32 is nothing."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


class _PageTransform(GeneralizedRCNNTransform):
    """torchvision's transform, except that training pages come already resized by the dataset.

    The dataset draws the multi-scale short side inside ``seeded(seed, epoch, index)`` (reproducible, worker
    independent); at evaluation the model resizes to ``min_size`` and maps boxes back to the original page.
    """

    def resize(self, image: torch.Tensor, target: dict[str, torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        if self.training:
            return image, target
        return super().resize(image, target)


class LayoutDetector(nn.Module):
    """A torchvision R-CNN with a BEiT backbone, plus what the engine's optimizer and our tools need.

    ``forward(images: list[[3, H, W] in 0..1], targets=None)``: in train mode returns torchvision's loss dict,
    in eval mode a list of ``{"boxes" xyxy in page pixels, "labels" (1..K), "scores", ["masks" [N,1,H,W]]}``.
    ``layer_id`` / ``num_layers`` / ``no_weight_decay`` give layer-wise lr decay on the backbone; the
    pyramid, FPN and heads count as the top layer.
    """

    _BODY = "detector.backbone.body."

    def __init__(self, backbone: BeitPyramidBackbone, num_classes: int, class_names: list[str] | None = None,
                 cfg: DetectorConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or DetectorConfig()
        levels = ["0", "1", "2", "3"]
        n_anchor_levels = 5 if backbone.fpn.extra_blocks is not None else 4
        sizes = tuple((s,) for s in cfg.anchor_sizes)
        if len(sizes) != n_anchor_levels:
            raise ValueError(f"{len(sizes)} anchor sizes for {n_anchor_levels} pyramid levels")
        ch, n_out = backbone.out_channels, num_classes + 1  # + background
        common = dict(
            box_head=TwoMLPHead(ch * 7 * 7, cfg.box_head_dim),
            box_predictor=_Fp32Predictor(cfg.box_head_dim, n_out),
            min_size=cfg.min_size_test, max_size=cfg.max_size_test,
            image_mean=list(cfg.pixel_mean), image_std=list(cfg.pixel_std),
            rpn_anchor_generator=AnchorGenerator(sizes, (tuple(cfg.aspect_ratios),) * len(sizes)),
            box_roi_pool=MultiScaleRoIAlign(levels, output_size=7, sampling_ratio=2),
            box_score_thresh=cfg.score_thresh, box_detections_per_img=cfg.detections_per_img,
        )
        if cfg.mask_head:
            det = MaskRCNN(backbone, mask_roi_pool=MultiScaleRoIAlign(levels, output_size=14, sampling_ratio=2),
                           mask_head=MaskRCNNHeads(ch, [cfg.mask_head_dim] * 4, 1),
                           mask_predictor=MaskRCNNPredictor(cfg.mask_head_dim, cfg.mask_head_dim, n_out), **common)
        else:
            det = FasterRCNN(backbone, **common)
        det.transform = _PageTransform(cfg.min_size_test, cfg.max_size_test, list(cfg.pixel_mean),
                                       list(cfg.pixel_std), size_divisible=backbone.size_divisible)
        self.detector = det
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names else [str(i + 1) for i in range(num_classes)]
        if len(self.class_names) != num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {num_classes} classes")
        self.category_ids = list(cfg.category_ids) or list(range(1, num_classes + 1))
        self.has_masks = cfg.mask_head
        self.num_layers = backbone.body.num_layers

    @property
    def body(self) -> Beit:
        return self.detector.backbone.body

    def forward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None
                ) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        return self.detector(images, targets)

    def repeated_blocks(self) -> list[nn.Module]:
        """The BEiT body's transformer blocks: what the engine compiles and shards one by one (the model
        protocol in ``docs/CONTRACTS.md``); the torchvision detector around them stays eager."""
        return list(self.body.blocks)

    def layer_id(self, name: str) -> int:
        """Backbone params keep BEiT's depth; everything added for detection is the top layer."""
        if name.startswith(self._BODY):
            return self.body.layer_id(name[len(self._BODY):])
        return self.num_layers + 1

    def no_weight_decay(self) -> set[str]:
        return set(self.body.no_weight_decay())


def build_detector(cfg: DetectorConfig, class_names: list[str] | None = None,
                   category_ids: list[int] | None = None,
                   model_overrides: dict[str, Any] | None = None) -> LayoutDetector:
    """Backbone through ``beit.build_backbone`` from ``cfg.backbone`` (a resolved config: weights come from a
    checkpoint later), ``cfg.init`` (pre-trained weights, turned into per-layer rel-pos bias) or ``cfg.arch``
    (random init), then the detector.

    ``model_overrides`` (the layout config's top-level ``model_overrides``, BeitConfig fields such as
    ``attn_impl``) and ``cfg.backbone_overrides`` (its older spelling) both apply; a key both set to
    different values is a ValueError. ``cfg.backbone``, ``cfg.class_names`` and ``cfg.category_ids`` are
    updated, so saving ``cfg`` is enough to rebuild the model (``build_detector(cfg)``) from a training
    checkpoint.
    """
    cfg.validate()
    if class_names is not None:
        cfg.class_names = list(class_names)
        cfg.category_ids = list(category_ids) if category_ids else list(range(1, len(class_names) + 1))
    if not cfg.class_names:
        raise ValueError("build_detector needs class_names (from the dataset) or a config that has them")
    if len(cfg.category_ids) != len(cfg.class_names):
        raise ValueError(f"{len(cfg.category_ids)} category ids for {len(cfg.class_names)} class names")
    overrides = dict(cfg.backbone_overrides)
    for k, v in (model_overrides or {}).items():
        if k in overrides and overrides[k] != v:
            raise ValueError(f"model_overrides.{k}={v!r} but model.backbone_overrides.{k}={overrides[k]!r}: "
                             "set one of them")
        overrides[k] = v
    fixed = dict(head="none", drop_path_rate=cfg.drop_path_rate)
    for k in fixed:
        if k in overrides:
            raise ValueError(f"model_overrides.{k}: set by the layout config itself; use "
                             f"{'model.drop_path_rate' if k == 'drop_path_rate' else 'nothing: the detector has none'}")
    if cfg.backbone:
        stored = BeitConfig.from_dict(dict(cfg.backbone))
        check_overrides_fit("the checkpoint's stored backbone", stored, overrides)
        body = build_backbone(stored, **{**overrides, **fixed, "img_size": stored.img_size})
    elif cfg.init:
        body = build_backbone(cfg.init, rel_pos="per_layer", **{**overrides, **fixed})
    else:
        body = build_backbone(cfg.arch, **{**overrides, **fixed})
    cfg.backbone = body.cfg.to_dict()
    backbone = BeitPyramidBackbone(body, cfg.out_indices, cfg.fpn_channels, cfg.pyramid_norm,
                                   extra_pool=len(cfg.anchor_sizes) == 5)
    return LayoutDetector(backbone, len(cfg.class_names), cfg.class_names, cfg)


def load_detector(ckpt: str | Path, overrides: list[str] | None = None, use_ema: bool = False,
                  config_file: str | Path | None = None) -> tuple[LayoutDetector, LayoutConfig]:
    """The detector of a training checkpoint (``last.pt`` / ``best.pt``) and its config, in eval mode.

    The architecture comes from the config stored in the checkpoint, so the initial BEiT file and the
    annotation file are not needed. ``config_file`` (a YAML file, ``beit layout eval -c``) is merged over the
    stored config, then ``overrides`` (``key=value``).

    Raises:
        FileNotFoundError: no such checkpoint.
        ValueError: not a beit training checkpoint, or one of another task (a TaskMismatchError: ``"<ckpt> is a
            segmentation checkpoint, not a layout detection one: beit segment eval and beit segment predict take
            it"``).
        ConfigError: the stored config does not fit :class:`LayoutConfig`, or ``config_file`` / an override is
            wrong.
    """
    cfg, state = task_config_from_checkpoint(LayoutConfig, "layout detection", ckpt, config_file, overrides)
    if not cfg.model.backbone or not cfg.model.class_names:
        raise ValueError(f"{ckpt}: the stored config has no resolved backbone / classes: not a layout checkpoint?")
    model = build_detector(cfg.model, model_overrides=cfg.model_overrides)
    load_model_state(model, model_weights(state, ckpt, use_ema), source=str(ckpt))
    return model.eval(), cfg
