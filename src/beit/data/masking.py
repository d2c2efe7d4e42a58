"""Blockwise masking, as in BEiT (Bao et al. 2022, Algorithm 1).

Rectangular blocks of at least ``min_num_patches`` patches with a log-uniform aspect ratio are
added until the budget ``num_masking_patches`` is reached; a block is accepted only if it adds new
patches without overshooting the budget, so a mask never holds more than the budget and may end
slightly short of it when the remainder is smaller than the minimum block.

Unlike the official code (Python's global ``random``, never seeded) each mask is seeded from a
``torch.Generator`` (or torch's global stream), so masks are reproducible per seed, worker and rank.
"""

from __future__ import annotations

import math
import random

import torch


class BlockwiseMaskGenerator:
    """Draw a BoolTensor [H, W] (True = masked) of roughly ``num_masking_patches`` patches."""

    def __init__(
        self,
        input_size: int | tuple[int, int] = (14, 14),
        num_masking_patches: int = 75,
        min_num_patches: int = 16,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        max_attempts: int = 10,
    ) -> None:
        if isinstance(input_size, int):
            input_size = (input_size, input_size)
        self.height, self.width = int(input_size[0]), int(input_size[1])
        self.num_patches = self.height * self.width
        self.num_masking_patches = int(num_masking_patches)
        self.min_num_patches = int(min_num_patches)
        self.max_num_patches = (
            self.num_masking_patches if max_num_patches is None else int(max_num_patches)
        )
        if not min_aspect > 0:  # before 1 / min_aspect and the logs below
            raise ValueError(f"min_aspect must be > 0, got {min_aspect}")
        max_aspect = max_aspect if max_aspect is not None else 1.0 / min_aspect
        self._validate(min_aspect, max_aspect)
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        self.max_attempts = max_attempts

    def _validate(self, min_aspect: float, max_aspect: float) -> None:
        if self.height <= 0 or self.width <= 0:
            raise ValueError(f"mask grid must be positive, got {self.height}x{self.width}")
        if self.num_masking_patches < 1:
            raise ValueError(
                f"num_masking_patches={self.num_masking_patches}: at least one patch must be masked, "
                "or the masked-image-modeling loss has nothing to predict"
            )
        if self.num_masking_patches > self.num_patches:
            raise ValueError(
                f"num_masking_patches={self.num_masking_patches} is larger than the "
                f"{self.height}x{self.width}={self.num_patches} patch grid"
            )
        if self.min_num_patches < 1:
            raise ValueError(f"min_num_patches must be >= 1, got {self.min_num_patches}")
        if self.min_num_patches > self.num_masking_patches:
            raise ValueError(
                f"min_num_patches={self.min_num_patches} (smallest block) is larger than the budget "
                f"num_masking_patches={self.num_masking_patches}: no block could ever be placed"
            )
        if self.max_num_patches < self.min_num_patches:
            raise ValueError(
                f"max_num_patches={self.max_num_patches} is smaller than min_num_patches={self.min_num_patches}"
            )
        if not 0 < min_aspect <= max_aspect:
            raise ValueError(f"aspect range must satisfy 0 < min <= max, got ({min_aspect}, {max_aspect})")

    def __repr__(self) -> str:
        return (
            f"BlockwiseMaskGenerator(grid={self.height}x{self.width}, budget={self.num_masking_patches}, "
            f"block=[{self.min_num_patches}, {self.max_num_patches}], "
            f"log_aspect={tuple(round(v, 3) for v in self.log_aspect_ratio)})"
        )

    def _add_block(self, rows: list[int], max_mask: int, rng: random.Random) -> int:
        """Try to mask one new block of at most ``max_mask`` new patches; return how many were added.

        ``rows``: the mask so far, one int per grid row (bit ``j`` = column ``j``), updated in place: the same
        draws and decisions as the official code's array version at a fraction of its cost (a mask is drawn
        per image in the loader's workers)."""
        for _ in range(self.max_attempts):
            # as official: when the remainder is below the minimum block this draws in [max_mask, min],
            # and a block overlapping earlier ones can still fill the budget exactly
            target_area = rng.uniform(self.min_num_patches, max_mask)
            aspect = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if 0 < h < self.height and 0 < w < self.width:  # strict, as the official code
                top = rng.randint(0, self.height - h)
                left = rng.randint(0, self.width - w)
                bits = ((1 << w) - 1) << left
                new = h * w - sum((rows[r] & bits).bit_count() for r in range(top, top + h))
                if 0 < new <= max_mask:
                    for r in range(top, top + h):
                        rows[r] |= bits
                    return new
        return 0

    def __call__(self, generator: torch.Generator | None = None) -> torch.Tensor:
        # one draw from torch's (seeded) stream, then a fast local generator: reproducible per seed and
        # ~50x cheaper than a torch draw per random number
        rng = random.Random(int(torch.randint(0, 2**62, (), generator=generator)))
        rows = [0] * self.height
        count = 0
        while count < self.num_masking_patches:
            max_mask = min(self.num_masking_patches - count, self.max_num_patches)
            delta = self._add_block(rows, max_mask, rng)
            if delta == 0:
                break
            count += delta
        if self.width <= 62:  # rows fit int64: shift and mask in two tensor ops
            mask = torch.tensor(rows).view(-1, 1).bitwise_right_shift(torch.arange(self.width)).bitwise_and_(1).bool()
        else:
            mask = torch.tensor([[(r >> j) & 1 for j in range(self.width)] for r in rows], dtype=torch.bool)
        if count == 0:  # practically unreachable with valid settings; never hand an empty mask to the loss
            flat = mask.view(-1)
            idx = torch.randperm(self.num_patches, generator=generator)[: self.min_num_patches]
            flat[idx] = True
        return mask
