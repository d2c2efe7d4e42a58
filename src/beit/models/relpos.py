"""Relative position bias of BEiT: one learned table per head, gathered into an [L, L] bias.

The table holds (2Wh-1)(2Ww-1) patch-to-patch offsets plus 3 extra entries for cls->token,
token->cls and cls->cls. The index layout is the official one (microsoft/unilm), so tables load
unchanged from every public checkpoint.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch._dynamo import maybe_mark_dynamic


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


def window_from_table(num_rows: int, hint: tuple[int, int] | None = None) -> tuple[int, int]:
    """Patch grid (Wh, Ww) that a table of ``num_rows`` rows was made for (checkpoints store only the table).

    ``hint`` (e.g. from a config's image size) is taken when it fits, which is how non-square grids are
    recognised; otherwise the square grid of that size. Raises ValueError when neither fits.
    """
    if hint is not None and table_size(hint) == num_rows:
        return int(hint[0]), int(hint[1])
    side = round(((max(num_rows - 3, 0)) ** 0.5 + 1) / 2)
    if table_size((side, side)) != num_rows:
        raise ValueError(
            f"a relative position table of {num_rows} rows matches no square patch grid"
            + ("" if hint is None else f" nor the {hint[0]}x{hint[1]} grid of the given image size")
            + "; pass img_size=(H, W) for a non-square grid"
        )
    return side, side


def _geometric_offsets(src: int, dst: int) -> list[float]:
    """Source offsets -n..n (n = src // 2) placed on the geometric grid of the official resampling.

    microsoft/unilm run_class_finetuning.py and timm ``resize_rel_pos_bias_table``: the gaps from the
    centre grow as 1, q, q^2, ... so near offsets keep (almost) their place and far ones stretch; q solves
    1 + q + ... + q^(n-1) = dst // 2 by bisection in [1.01, 1.5] (the official interval, kept so the
    numbers are identical: for a stretch beyond it the grid stops short of the edge and the outermost
    target offsets take the outermost source value).
    """
    n, target = src // 2, dst // 2

    def span(q: float) -> float:
        return (1.0 - q**n) / (1.0 - q)

    left, right = 1.01, 1.5
    q = (left + right) / 2.0
    while right - left > 1e-6:
        q = (left + right) / 2.0
        if span(q) > target:
            right = q
        else:
            left = q
    offsets, cur = [], 1.0
    for i in range(n):  # the official code uses the last midpoint q, not the bracket's ends
        offsets.append(cur)
        cur += q ** (i + 1)
    return [-o for o in reversed(offsets)] + [0.0] + offsets


@functools.lru_cache(maxsize=64)
def _axis_matrix(src: int, dst: int) -> torch.Tensor:
    """[dst, src] float64 matrix resampling one axis of the offset grid (src, dst odd: 2W-1).

    Equal sizes: identity. Shrinking: the exact central block (the offsets both windows have keep their
    learned values). Growing: linear interpolation on the geometric grid of ``_geometric_offsets``;
    target offsets beyond the outermost source offset take its value.
    """
    if dst == src:
        return torch.eye(src, dtype=torch.float64)
    m = torch.zeros(dst, src, dtype=torch.float64)
    if dst < src:
        start = (src - dst) // 2
        m[torch.arange(dst), torch.arange(start, start + dst)] = 1.0
        return m
    if src == 1:  # a single offset (window of 1): nothing to interpolate between
        m[:, 0] = 1.0
        return m
    pos = torch.tensor(_geometric_offsets(src, dst), dtype=torch.float64)
    half = dst // 2
    for i, t in enumerate(range(-half, half + 1)):
        t = min(max(float(t), float(pos[0])), float(pos[-1]))
        j = int(torch.searchsorted(pos, torch.tensor(t, dtype=torch.float64), right=True)) - 1
        j = min(max(j, 0), src - 2)
        w = (t - float(pos[j])) / float(pos[j + 1] - pos[j])
        m[i, j] += 1.0 - w
        m[i, j + 1] += w
    return m


@functools.lru_cache(maxsize=128)
def _axis_matrix_on(src: int, dst: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """:func:`_axis_matrix` on ``device`` in ``dtype``, made once: at run time every block resamples its table
    each step, and a fresh host-to-device copy of a pageable CPU tensor there may wait for the GPU to catch up."""
    return _axis_matrix(src, dst).to(device=device, dtype=dtype)


def resize_table(table: torch.Tensor, old_window: tuple[int, int], new_window: tuple[int, int]) -> torch.Tensor:
    """Resample a relative-position table [(2Wh-1)(2Ww-1)+3, heads] from ``old_window`` to ``new_window``.

    The official way (microsoft/unilm fine-tuning, timm ``resize_rel_pos_bias_table``): each axis of the
    offset grid that grows is resampled on a geometric grid that keeps near offsets where they were
    (linear interpolation, as timm without scipy); an axis that shrinks keeps the exact central block;
    an unchanged axis is untouched. Windows may be non-square. The 3 cls entries are kept as they are.
    Differentiable (a fixed linear map), so it also serves run-time resizing during training; computed
    in fp32 at least, returned in the table's dtype. Identity when the windows match.

    Raises ValueError when the table's row count does not fit ``old_window``.
    """
    old_window = (int(old_window[0]), int(old_window[1]))
    new_window = (int(new_window[0]), int(new_window[1]))
    if table.shape[0] != table_size(old_window):
        raise ValueError(
            f"relative position table has {table.shape[0]} rows, expected {table_size(old_window)} "
            f"for a {old_window[0]}x{old_window[1]} window"
        )
    if old_window == new_window:
        return table
    num_heads = table.shape[1]
    oh, ow = 2 * old_window[0] - 1, 2 * old_window[1] - 1
    nh, nw = 2 * new_window[0] - 1, 2 * new_window[1] - 1
    if table.is_meta:
        return table.new_empty(table_size(new_window), num_heads)
    work = torch.promote_types(table.dtype, torch.float32)
    my = _axis_matrix_on(oh, nh, table.device, work)
    mx = _axis_matrix_on(ow, nw, table.device, work)
    grid = table[:-3].to(work).T.reshape(num_heads, oh, ow)
    grid = my @ grid @ mx.T  # [heads, nh, nw]
    grid = grid.reshape(num_heads, nh * nw).T.to(table.dtype)
    return torch.cat([grid, table[-3:]], dim=0)


def _gather(table: torch.Tensor, index: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    length = window[0] * window[1] + 1
    return table[index.view(-1)].view(length, length, -1).permute(2, 0, 1).contiguous()


def _bias_of_table(table: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """Bias [num_heads, L, L] of a table made for ``window``, without an index tensor: the same values as
    ``_gather(table, relative_position_index(window), window)``, bit for bit.

    The patch-to-patch bias is ``grid[qy - ky + Wh - 1, qx - kx + Ww - 1]`` of the (2Wh-1, 2Ww-1) offset grid:
    the flipped grid's (Wh, Ww) windows (two ``unfold`` views), read in reverse window order. That replaces
    the [L, L] int64 index (100 MB for a 3,550-token page), which had to be built on the host (a 100 MB clone
    of the cached one, or 0.2 s to build a new one) and copied to the device by every block at every step, and
    the sort that its gather's backward does over L * L entries; ``unfold``'s backward is a plain reduction.
    The cls entries are those of the official index: cls -> token (row 0) ``table[-3]``, token -> cls
    (column 0) ``table[-2]``, cls -> cls ``table[-1]``. (Built with ``cat``: slice assignments into one
    buffer would each clone the whole gradient in the backward.)
    """
    wh, ww = window
    heads, n = table.shape[1], wh * ww
    grid = table[:-3].T.reshape(heads, 2 * wh - 1, 2 * ww - 1)
    # windows[h, ry, rx, ky, kx] = flipped[h, ry + ky, rx + kx] = grid[h, qy - ky + Wh - 1, ...] for ry = Wh-1-qy
    windows = grid.flip(1, 2).unfold(1, wh, 1).unfold(2, ww, 1)
    patch = windows.flip(1, 2).reshape(heads, n, n)
    top = torch.cat([table[-1, :, None], table[-3, :, None].expand(heads, n)], dim=1)
    rows = torch.cat([table[-2, :, None, None].expand(heads, n, 1), patch], dim=2)
    return torch.cat([top[:, None], rows], dim=1)


@torch.compiler.disable
def _resized_bias(table: torch.Tensor, native: tuple[int, int], window: tuple[int, int]) -> torch.Tensor:
    """The bias [H, L, L] for another grid than the table's, computed eagerly even inside compiled blocks.

    Dense tasks change the grid at run time (sliding windows, multi-scale pages): tracing this per-grid
    Python (cached resampling matrices) into every block's graph made each new size a slow recompile. Here
    it is one graph break (``beit.Block`` takes it before any other work), and the bias comes out marked dynamic
    in L, so the graph that takes it is shape-generic from the first grid on. Autograd is unaffected (the table
    still gets its gradient). Nothing here is made on the host: the resampling matrices are cached on the
    table's device and the bias is read out of the table without an index (:func:`_bias_of_table`). The table's
    own grid gives the same values as :func:`gather_bias` (``resize_table`` is then the identity)."""
    window = (int(window[0]), int(window[1]))
    bias = _bias_of_table(resize_table(table, native, window), window)
    # the graph after this break takes the bias as an input: dynamic in L from the first grid on (as the tokens
    # are, beit.Beit._blocks_input), not static at the first grid and recompiled dynamic at the next
    maybe_mark_dynamic(bias, [1, 2])
    return bias


def gather_bias(
    table: torch.Tensor, index: torch.Tensor, native: tuple[int, int], window: tuple[int, int] | None
) -> torch.Tensor:
    """Bias [num_heads, L, L] from a table made for ``native``, for the patch grid ``window``."""
    window = native if window is None else tuple(window)
    if window != native:  # another resolution at run time (dense tasks): resample the table on the fly
        return _resized_bias(table, native, window)
    return _gather(table, index, window)


class RelativePositionBias(nn.Module):
    """The table shared by all blocks (official pre-training: ``rel_pos_bias``)."""

    def __init__(self, window: tuple[int, int], num_heads: int) -> None:
        super().__init__()
        self.window = tuple(window)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(table_size(self.window), num_heads))
        self.register_buffer("relative_position_index", relative_position_index(self.window), persistent=False)

    def forward(self, window: tuple[int, int] | None = None) -> torch.Tensor:
        return gather_bias(self.relative_position_bias_table, self.relative_position_index, self.window, window)
