"""Pictures of masked image modeling: the MIM panel (input | mask | the tokenizer's reconstruction of the true
tokens | of the predicted ones), written during pre-training and by ``beit visualize``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.utils import save_image

from ...data.datasets import spread_indices
from ...data.transforms import collate_pretrain
from ...tokenizers.metrics import upscale_for_display

__all__ = ["fixed_batch", "mim_panel"]


def _denorm(x: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x * s + m).clamp(0, 1)


@torch.no_grad()
def mim_panel(model: nn.Module, tokenizer: nn.Module, batch: dict[str, torch.Tensor], mean: tuple, std: tuple,
              path: str | Path) -> Path:
    """One row per image: input | input with its mask | tokenizer's reconstruction of the true tokens |
    the same with the model's predictions at the masked patches (decoded through the tokenizer). Cells of small
    images are enlarged to >= 64 px (nearest), so that the panel of a 16-px run is readable."""
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
    grid = upscale_for_display(torch.stack(cols, dim=1).flatten(0, 1))  # row-major: each image's panels side by side
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, str(path), nrow=len(cols), padding=2, pad_value=1.0)
    model.train(model_was_training)
    return path


def fixed_batch(dataset: torch.utils.data.Dataset, n: int, device: torch.device,
                 device_data: tuple[Any, Any, Any] | None = None) -> dict[str, torch.Tensor]:
    """``n`` samples spread over ``dataset`` (the first ``n`` of a stream) as one batch on ``device`` (``image``,
    ``tok_image``, ``mask``), the same at every call, for the panels; ``device_data`` = ``(dataset, collate,
    pipeline)`` of the device path."""
    if isinstance(dataset, torch.utils.data.IterableDataset):
        samples = [s for _, s in zip(range(n), iter(dataset))]
    else:
        samples = [dataset[i] for i in spread_indices(len(dataset), n)]
    if device_data is not None:  # the on-device path: collate raw samples, then decode + views
        _, collate, pipeline = device_data
        return {k: v.to(device) for k, v in pipeline(collate(samples)).items()}
    return {k: v.to(device) for k, v in collate_pretrain(samples).items()}

