"""Relative position bias of BEiT: one learned table per head, gathered into an [L, L] bias.

The table holds (2Wh-1)(2Ww-1) patch-to-patch offsets plus 3 extra entries for cls->token,
token->cls and cls->cls. The index layout is the official one (microsoft/unilm), so tables load
unchanged from every public checkpoint.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


def table_size(window: tuple[int, int]) -> int:
    return (2 * window[0] - 1) * (2 * window[1] - 1) + 3


@functools.lru_cache(maxsize=16)
def _relative_position_index_cpu(window: tuple[int, int]) -> torch.Tensor:
    wh, ww = window
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # [N, N, 2]
    rel[:, :, 0] += wh - 1
    rel[:, :, 1] += ww - 1
    rel[:, :, 0] *= 2 * ww - 1
    n = table_size(window)
    index = torch.zeros((wh * ww + 1,) * 2, dtype=torch.long)
    index[1:, 1:] = rel.sum(-1)
    index[0, :] = n - 3  # cls -> token
    index[:, 0] = n - 2  # token -> cls
    index[0, 0] = n - 1  # cls -> cls
    return index


def relative_position_index(window: tuple[int, int]) -> torch.Tensor:
    """LongTensor [Wh*Ww+1, Wh*Ww+1] of table rows, official layout."""
    return _relative_position_index_cpu(tuple(window)).clone()


def window_from_table(num_rows: int) -> tuple[int, int]:
    """Square window that a table of ``num_rows`` rows was made for (checkpoints store only the table)."""
    side = round(((num_rows - 3) ** 0.5 + 1) / 2)
    if table_size((side, side)) != num_rows:
        raise ValueError(f"a relative position table of {num_rows} rows matches no square patch grid")
    return side, side


def resize_table(table: torch.Tensor, old_window: tuple[int, int], new_window: tuple[int, int]) -> torch.Tensor:
    """Resample a [(2Wh-1)(2Ww-1)+3, H] table to another window, bicubic over the offset grid.

    Used when fine-tuning at 384 from 224, or segmenting at 512. The 3 cls entries are kept as
    they are. Identity when the windows match.
    """
    old_window, new_window = tuple(old_window), tuple(new_window)
    if old_window == new_window:
        return table
    if table.shape[0] != table_size(old_window):
        raise ValueError(
            f"relative position table has {table.shape[0]} rows, expected {table_size(old_window)} "
            f"for a {old_window[0]}x{old_window[1]} window"
        )
    num_heads = table.shape[1]
    oh, ow = 2 * old_window[0] - 1, 2 * old_window[1] - 1
    nh, nw = 2 * new_window[0] - 1, 2 * new_window[1] - 1
    grid = table[:-3].float().T.reshape(1, num_heads, oh, ow)
    grid = F.interpolate(grid, size=(nh, nw), mode="bicubic", align_corners=False)
    grid = grid.reshape(num_heads, nh * nw).T.to(table.dtype)
    return torch.cat([grid, table[-3:]], dim=0)


def gather_bias(
    table: torch.Tensor, index: torch.Tensor, native: tuple[int, int], window: tuple[int, int] | None
) -> torch.Tensor:
    """Bias [num_heads, L, L] from a table made for ``native``, for the patch grid ``window``."""
    window = native if window is None else tuple(window)
    if window != native:  # another resolution at run time (dense tasks): resample the table on the fly
        table = resize_table(table, native, window)
        index = relative_position_index(window).to(table.device)
    length = window[0] * window[1] + 1
    return table[index.view(-1)].view(length, length, -1).permute(2, 0, 1).contiguous()


class RelativePositionBias(nn.Module):
    """The table shared by all blocks (official pre-training: ``rel_pos_bias``)."""

    def __init__(self, window: tuple[int, int], num_heads: int) -> None:
        super().__init__()
        self.window = tuple(window)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(table_size(self.window), num_heads))
        self.register_buffer("relative_position_index", relative_position_index(self.window), persistent=False)

    def forward(self, window: tuple[int, int] | None = None) -> torch.Tensor:
        return gather_bias(self.relative_position_bias_table, self.relative_position_index, self.window, window)
