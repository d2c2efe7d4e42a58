"""Generated image folders for the fine-tuning / linear-probing tests (no dataset is offline)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

import beit

COLORS = [(230, 40, 40), (40, 210, 40), (40, 60, 230), (230, 220, 40)]
TINY = dict(img_size=32, patch_size=4, depth=2, embed_dim=32, num_heads=2)
TINY_OVERRIDES = ["model=beit_tiny_patch16_224", "img_size=32", "model_overrides.patch_size=4",
                  "model_overrides.depth=2", "model_overrides.embed_dim=32", "model_overrides.num_heads=2"]


def colored_squares(root: Path, per_class: dict[str, int], size: int = 32, seed: int = 0) -> Path:
    """``root/<split>/c<k>/<i>.png``: a square of class colour k at a random place on dark noise."""
    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for c, col in enumerate(COLORS):
            d = root / split / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 70, (size, size, 3)).astype(np.uint8)
                s = size * 3 // 8
                y, x = rng.integers(0, size - s, 2)
                img[y:y + s, x:x + s] = col
                Image.fromarray(img).save(d / f"{i}.png")
    return root


def document_pages(root: Path, num_classes: int = 16, per_class: int = 2, size: tuple[int, int] = (96, 128),
                   seed: int = 0) -> Path:
    """Grayscale "pages": white, with a class-dependent layout of dark text bars (columns, header, table)."""
    rng = np.random.default_rng(seed)
    w, h = size
    for c in range(num_classes):
        d = root / f"doc{c:02d}"
        d.mkdir(parents=True, exist_ok=True)
        cols, header, rows = 1 + c % 2, (c // 2) % 2 == 1, 4 + 2 * (c // 4)
        for i in range(per_class):
            page = np.full((h, w), 250, np.uint8)
            if header:
                page[6:16, 10:w - 10] = 30
            top = 22 if header else 8
            col_w = (w - 12) // cols
            for k in range(cols):
                for r in range(rows):
                    y = top + r * (h - top - 8) // rows
                    x0 = 6 + k * col_w + int(rng.integers(0, 3))
                    page[y:y + 3, x0:x0 + col_w - 6 - int(rng.integers(0, 8))] = 40
            page = np.clip(page.astype(int) + rng.integers(-8, 8, page.shape), 0, 255).astype(np.uint8)
            Image.fromarray(page, mode="L").save(d / f"page{i}.png")
    return root


def tiny_pretrain_checkpoint(path: Path, depth: int = 2, seed: int = 0) -> Path:
    """A saved tiny pre-training model: shared relative-position table, MIM head, no fc_norm."""
    import torch

    torch.manual_seed(seed)
    mim = beit.create_model("beit_tiny_patch16_224", head="mim", vocab_size=64, **{**TINY, "depth": depth})
    assert mim.cfg.use_shared_rel_pos_bias and not mim.cfg.use_rel_pos_bias
    with torch.no_grad():  # distinct non-zero tables, so that copying them is observable
        mim.rel_pos_bias.relative_position_bias_table.normal_()
    beit.save_model(mim, path)
    return path
