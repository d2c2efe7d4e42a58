"""Blockwise masking: budget respected, blocks big enough, reproducible, impossible settings refused."""

from __future__ import annotations

import math
import random

import pytest
import torch

from beit.data.masking import BlockwiseMaskGenerator


def _components(mask: torch.Tensor) -> list[int]:
    """Sizes of 4-connected masked regions."""
    seen = torch.zeros_like(mask)
    sizes = []
    H, W = mask.shape
    for i in range(H):
        for j in range(W):
            if mask[i, j] and not seen[i, j]:
                stack, n = [(i, j)], 0
                seen[i, j] = True
                while stack:
                    a, b = stack.pop()
                    n += 1
                    for c, d in ((a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)):
                        if 0 <= c < H and 0 <= d < W and mask[c, d] and not seen[c, d]:
                            seen[c, d] = True
                            stack.append((c, d))
                sizes.append(n)
    return sizes


def test_default_statistics() -> None:
    gen = BlockwiseMaskGenerator((14, 14), num_masking_patches=75)
    g = torch.Generator().manual_seed(0)
    counts = []
    for _ in range(300):
        m = gen(g)
        assert m.shape == (14, 14) and m.dtype == torch.bool
        counts.append(int(m.sum()))
        assert max(_components(m)) >= 16  # built from blocks of >= 16 patches, not scattered pixels
    counts_t = torch.tensor(counts, dtype=torch.float)
    assert max(counts) <= 75  # never more than the budget
    assert 72 <= counts_t.mean() <= 75  # ~40% of 196, as in the paper (official code: ~74.5)
    assert (counts_t >= 60).float().mean() > 0.95


def test_each_block_respects_min_size_and_aspect() -> None:
    gen = BlockwiseMaskGenerator((14, 14), num_masking_patches=75, min_num_patches=16)
    rng = random.Random(1)
    for _ in range(100):
        rows = [0] * 14
        added = gen._add_block(rows, 75, rng)  # one block on an empty grid
        m = torch.tensor([[(r >> j) & 1 for j in range(14)] for r in rows], dtype=torch.bool)
        rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
        h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert added == int(m.sum()) == h * w  # a single rectangle
        assert 12 <= h * w <= 75  # target area in [16, 75], rounded to the grid, never over the budget
        assert 0.3 / 2 <= h / w <= 2 / 0.3  # log-uniform aspect in [0.3, 1/0.3], rounded


def test_reproducible_with_seed() -> None:
    gen = BlockwiseMaskGenerator((8, 8), num_masking_patches=25, min_num_patches=4)
    a = [gen(torch.Generator().manual_seed(7)) for _ in range(3)]
    b = [gen(torch.Generator().manual_seed(7)) for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = gen(torch.Generator().manual_seed(8))
    assert not torch.equal(a[0], c)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(input_size=(14, 14), num_masking_patches=200), "larger than the 14x14"),
        (dict(input_size=(14, 14), num_masking_patches=10, min_num_patches=16), "larger than the budget"),
        (dict(input_size=(14, 14), num_masking_patches=0), "at least one patch"),
        (dict(input_size=(4, 4), num_masking_patches=4, min_num_patches=2, max_num_patches=1), "max_num_patches"),
        (dict(input_size=(14, 14), num_masking_patches=75, min_aspect=0), "min_aspect must be > 0"),
        (dict(input_size=(14, 14), num_masking_patches=75, min_aspect=0.5, max_aspect=0.2), "aspect range"),
    ],
)
def test_impossible_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BlockwiseMaskGenerator(**kwargs)


def test_small_grid_never_empty() -> None:
    gen = BlockwiseMaskGenerator((8, 8), num_masking_patches=26, min_num_patches=4)
    g = torch.Generator().manual_seed(3)
    for _ in range(200):
        n = int(gen(g).sum())
        assert 4 <= n <= 26


def _reference_mask(gen: BlockwiseMaskGenerator, generator: torch.Generator) -> torch.Tensor:
    """The algorithm on a boolean array, block by block, as the official ``MaskingGenerator`` writes it (and as
    this package did before the per-row bitmasks): the bitmask version must draw the same masks."""
    rng = random.Random(int(torch.randint(0, 2**62, (), generator=generator)))
    mask = torch.zeros(gen.height, gen.width, dtype=torch.bool)
    count = 0
    while count < gen.num_masking_patches:
        max_mask = min(gen.num_masking_patches - count, gen.max_num_patches)
        delta = 0
        for _ in range(gen.max_attempts):
            target_area = rng.uniform(gen.min_num_patches, max_mask)
            aspect = math.exp(rng.uniform(*gen.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if 0 < h < gen.height and 0 < w < gen.width:
                top, left = rng.randint(0, gen.height - h), rng.randint(0, gen.width - w)
                block = mask[top : top + h, left : left + w]
                new = h * w - int(block.sum())
                if 0 < new <= max_mask:
                    block.fill_(True)
                    delta = new
                    break
        if delta == 0:
            break
        count += delta
    if count == 0:  # the package's own guard against an empty mask (not in the official code)
        mask.view(-1)[torch.randperm(gen.num_patches, generator=generator)[: gen.min_num_patches]] = True
    return mask


@pytest.mark.parametrize("grid, budget, smallest", [((14, 14), 75, 16), ((8, 8), 26, 4), ((24, 24), 230, 16),
                                                    ((32, 32), 410, 16), ((4, 7), 9, 2), ((2, 2), 2, 1),
                                                    ((3, 70), 60, 8)])
def test_bitmask_rows_draw_the_array_algorithms_masks(grid: tuple[int, int], budget: int, smallest: int) -> None:
    gen = BlockwiseMaskGenerator(grid, num_masking_patches=budget, min_num_patches=smallest)
    for seed in range(300):
        got = gen(torch.Generator().manual_seed(seed))
        want = _reference_mask(gen, torch.Generator().manual_seed(seed))
        assert got.shape == grid and got.dtype == torch.bool
        assert torch.equal(got, want), (grid, seed)
