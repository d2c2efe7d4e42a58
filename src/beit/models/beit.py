"""The BEiT vision transformer, readable top to bottom.

Bao, Dong, Piao, Wei. "BEiT: BERT Pre-Training of Image Transformers", ICLR 2022.

Parameter names follow the official code (microsoft/unilm) and timm, so their state dicts load
without renaming. One class covers the three uses: a classifier (``head="cls"``), the
masked-image-modeling model of pre-training (``head="mim"``: mask token + ``lm_head``) and a bare
feature extractor for dense tasks (``head="none"``).
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import nn
from torch._dynamo import maybe_mark_dynamic

from .attention import PACKED_ATTENTION_IMPLS, get_attention
from .config import BeitConfig
from .relpos import RelativePositionBias, _resized_bias, gather_bias, relative_position_index, table_size


def check_mask(bool_masked_pos: torch.Tensor, batch: int, grid: tuple[int, int]) -> torch.Tensor:
    """A mask checked against the images' patch grid, as a bool tensor [B, N] (True = masked).

    Accepted: [B, H, W] with (H, W) the patch grid of the images, or [B, H*W] (row-major, as ``flatten``).
    A transposed [B, W, H] mask on a non-square grid is refused rather than masking the wrong patches.
    Raises ValueError naming both shapes otherwise.
    """
    h, w = grid
    shape = tuple(bool_masked_pos.shape)
    if shape not in ((batch, h, w), (batch, h * w)):
        raise ValueError(
            f"bool_masked_pos has shape {list(shape)} but the images (batch {batch}, patch grid {h}x{w}) "
            f"need [{batch}, {h}, {w}] or [{batch}, {h * w}]"
        )
    return bool_masked_pos.reshape(batch, h * w).bool()


def masked_positions(bool_masked_pos: torch.Tensor, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed-size selection of each image's masked patches, for the MIM head without a host sync.

    ``tokens[mask]`` (the official ``x[bool_masked_pos]``) has a data-dependent size: a device-to-host sync
    each step (the CPU stops queueing work until the GPU catches up) and a graph break under ``torch.compile``.
    Instead take ``budget`` positions per image: its masked patches in raster order, then unmasked ones as
    padding. Flattening the masked rows of ``(positions, valid)`` gives exactly the order of ``tokens[mask]``.

    Args:
        bool_masked_pos: [B, N] or [B, H, W] (True = masked).
        budget: positions per image, 1 <= budget <= N: the mask generator's budget
            (``BlockwiseMaskGenerator.num_masking_patches``), which no mask it draws exceeds. An image with more
            masked patches than ``budget`` keeps its first ``budget`` of them.

    Returns:
        ``positions`` [B, budget] int64 (patch indices, for ``forward_mim(..., positions=)`` and for gathering
        the targets) and ``valid`` [B, budget] bool (which positions are masked patches, not padding).

    Raises:
        ValueError: ``budget`` outside [1, N].
    """
    mask = bool_masked_pos.flatten(1).bool()
    if not 1 <= budget <= mask.shape[1]:
        raise ValueError(f"mask budget must be in [1, {mask.shape[1]}] (patches per image), got {budget}")
    positions = torch.sort(mask.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :budget]
    return positions, mask.gather(1, positions)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens, one strided convolution."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def grid_of(self, x: torch.Tensor) -> tuple[int, int]:
        """Patch grid (H/p, W/p) of images [B, C, H, W]; ValueError when H or W is not a multiple of p."""
        if x.shape[-2] % self.patch_size or x.shape[-1] % self.patch_size:
            raise ValueError(f"input {tuple(x.shape[-2:])} is not divisible by the patch size {self.patch_size}")
        return x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        self.grid_of(x)
        x = self.proj(x.to(self.proj.weight.dtype))  # fp32 images into a 16-bit model (autocast recasts)
        grid = (x.shape[-2], x.shape[-1])
        return x.flatten(2).transpose(1, 2), grid


class Attention(nn.Module):
    """Multi-head self-attention with q/v biases (no k bias) and an optional per-layer rel-pos bias."""

    def __init__(self, cfg: BeitConfig, window: tuple[int, int], use_rel_pos_bias: bool) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.attn_head_dim or cfg.embed_dim // cfg.num_heads
        all_head_dim = self.head_dim * self.num_heads
        self.qkv = nn.Linear(cfg.embed_dim, all_head_dim * 3, bias=False)
        if cfg.qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(all_head_dim))
            self.v_bias = nn.Parameter(torch.zeros(all_head_dim))
        else:
            self.q_bias = self.v_bias = None
        self.window = tuple(window)
        if use_rel_pos_bias:  # per-layer table, stored under ``attn`` as in the official code and timm
            self.relative_position_bias_table = nn.Parameter(torch.zeros(table_size(self.window), cfg.num_heads))
            self.register_buffer("relative_position_index", relative_position_index(self.window), persistent=False)
        else:
            self.relative_position_bias_table = None
        self.attn_drop = cfg.attn_drop_rate
        self.proj = nn.Linear(all_head_dim, cfg.embed_dim)
        self.proj_drop = nn.Dropout(cfg.drop_rate)
        self.attn_fn = get_attention(cfg.attn_impl)
        self.packed_attn_fn = PACKED_ATTENTION_IMPLS.get(cfg.attn_impl)  # takes [B, L, 3, H, d], gives [B, L, C]

    def own_bias(self, grid: tuple[int, int] | None = None) -> torch.Tensor | None:
        """This layer's relative-position bias [H, L, L], or None without a per-layer table.

        ``grid`` None: the native grid's, gathered from the table (inside a compiled graph). Any grid given
        (``Beit`` gives only run-time ones, see ``Beit._block_grid``): the table resampled to it eagerly
        (``relpos._resized_bias``, a graph break), without comparing it with the native grid here, as such a
        comparison in a compiled block would guard on the grid's two ints (a recompile as each first changes).
        """
        table = self.relative_position_bias_table
        if table is None:
            return None
        if grid is None:
            return gather_bias(table, self.relative_position_index, self.window, None)
        return _resized_bias(table, self.window, grid)

    def forward(
        self, x: torch.Tensor, shared_bias: torch.Tensor | None = None, grid: tuple[int, int] | None = None,
        own_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``own_bias``: this layer's :meth:`own_bias` for ``grid``, when the caller has it already (``Block``
        does: it asks for it before any other work, see there); else it is gathered here."""
        B, L, _ = x.shape
        bias = None
        if self.q_bias is not None:
            bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).reshape(B, L, 3, self.num_heads, self.head_dim)
        attn_bias = shared_bias
        own = own_bias if own_bias is not None else self.own_bias(grid)
        if own is not None:
            own = own.unsqueeze(0)
            attn_bias = own if attn_bias is None else attn_bias + own
        drop = self.attn_drop if self.training else 0.0
        if self.packed_attn_fn is not None:
            x = self.packed_attn_fn(qkv, attn_bias, drop)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, L, d]
            x = self.attn_fn(q, k, v, attn_bias, drop).transpose(1, 2).reshape(B, L, -1)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


class Block(nn.Module):
    """Pre-norm transformer block with layer scale (gamma_1, gamma_2) and stochastic depth."""

    def __init__(self, cfg: BeitConfig, window: tuple[int, int], drop_path: float) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg, window, use_rel_pos_bias=cfg.use_rel_pos_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio), cfg.drop_rate)
        if cfg.init_values:
            self.gamma_1 = nn.Parameter(cfg.init_values * torch.ones(dim))
            self.gamma_2 = nn.Parameter(cfg.init_values * torch.ones(dim))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(
        self, x: torch.Tensor, shared_bias: torch.Tensor | None = None, grid: tuple[int, int] | None = None
    ) -> torch.Tensor:
        # the layer's rel-pos bias first: on a run-time grid (dense tasks) it is resampled eagerly, a graph break
        # in a compiled block. Breaking before any other work leaves one graph, after it, whose inputs are the
        # block's (x and the biases, dynamic in the token count: Beit._blocks_input). Breaking inside the
        # attention split the block in three graphs, the later two resumed with the token count as a Python int:
        # static at the first page size, recompiled dynamic at the next, each block (own drop-path rate) again
        own = self.attn.own_bias(grid)
        y = self.attn(self.norm1(x), shared_bias, grid, own)
        x = x + self.drop_path(y if self.gamma_1 is None else self.gamma_1 * y)
        y = self.mlp(self.norm2(x))
        return x + self.drop_path(y if self.gamma_2 is None else self.gamma_2 * y)


class Beit(nn.Module):
    """BEiT encoder with a classification head, a MIM head, or no head (see ``BeitConfig.head``)."""

    def __init__(self, cfg: BeitConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.num_layers = cfg.depth
        self.embed_dim = cfg.embed_dim
        self.patch_size = cfg.patch_size
        self.window = cfg.grid
        num_patches = self.window[0] * self.window[1]

        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim)) if cfg.head == "mim" else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, cfg.embed_dim)) if cfg.use_abs_pos_emb else None
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        self.rel_pos_bias = (
            RelativePositionBias(self.window, cfg.num_heads) if cfg.use_shared_rel_pos_bias else None
        )
        dpr = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # linear, as official
        self.blocks = nn.ModuleList(Block(cfg, self.window, dpr[i]) for i in range(cfg.depth))

        use_fc_norm = cfg.use_mean_pooling and cfg.head != "mim"
        self.norm = nn.Identity() if use_fc_norm else nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.fc_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps) if use_fc_norm else None
        self.head_norm = None
        if cfg.head == "cls":
            self.head = nn.Linear(cfg.embed_dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        elif cfg.head == "mim":
            if cfg.mim_head_norm:
                self.head_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
            self.lm_head = nn.Linear(cfg.embed_dim, cfg.vocab_size)
        self._init_weights()

    # ---------------------------------------------------------------- init
    def _init_weights(self) -> None:
        std = self.cfg.init_std
        for p in (self.cls_token, self.mask_token, self.pos_embed):
            if p is not None:
                trunc_normal_(p, std=std)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for i, blk in enumerate(self.blocks):  # rescale residual branches by depth (official fix_init_weight)
            blk.attn.proj.weight.data.div_(math.sqrt(2.0 * (i + 1)))
            blk.mlp.fc2.weight.data.div_(math.sqrt(2.0 * (i + 1)))
        if self.cfg.head == "cls" and isinstance(self.head, nn.Linear):
            self.head.weight.data.mul_(self.cfg.init_scale)
            self.head.bias.data.mul_(self.cfg.init_scale)

    # ---------------------------------------------------------------- optimizer helpers
    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "mask_token", "pos_embed", "relative_position_bias_table"}

    def layer_id(self, name: str) -> int:
        """Depth of a parameter for layer-wise lr decay: 0 embeddings, i+1 for blocks.i, depth+1 the rest."""
        if name.startswith(("cls_token", "mask_token", "pos_embed", "patch_embed")):
            return 0
        m = re.match(r"blocks\.(\d+)\.", name)
        if m:
            return int(m.group(1)) + 1
        return self.num_layers + 1

    # ---------------------------------------------------------------- forward
    def _pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        pos = self.pos_embed
        if grid == self.window:
            return pos
        patch = pos[:, 1:].reshape(1, *self.window, -1).permute(0, 3, 1, 2)
        patch = F.interpolate(patch.float(), size=grid, mode="bicubic", align_corners=False).to(pos.dtype)
        return torch.cat([pos[:, :1], patch.flatten(2).transpose(1, 2)], dim=1)

    def prepare_tokens(
        self, x: torch.Tensor, bool_masked_pos: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        x, grid = self.patch_embed(x)
        B = x.shape[0]
        if bool_masked_pos is not None:
            if self.mask_token is None:
                raise ValueError("this model has no mask token: create it with head='mim' to pass bool_masked_pos")
            w = check_mask(bool_masked_pos, B, grid).unsqueeze(-1).to(x.dtype)
            x = x * (1 - w) + self.mask_token * w
        # the residual stream keeps the parameters' dtype: fp32 under autocast (layer scale is an fp32
        # parameter, so every block sees one dtype and one compiled graph serves all blocks), and 16 bits
        # in a model cast with .half() / .to(torch.bfloat16)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x.to(self.cls_token.dtype)], dim=1)
        if self.pos_embed is not None:
            x = x + self._pos_embed(grid)
        return self.pos_drop(x), grid

    def _shared_bias(self, grid: tuple[int, int]) -> torch.Tensor | None:
        if self.rel_pos_bias is None:
            return None
        shared = self.rel_pos_bias(grid).unsqueeze(0)
        if grid != self.window and not torch.compiler.is_compiling():
            maybe_mark_dynamic(shared, [2, 3])  # a run-time grid: see _blocks_input
        return shared

    def _block_grid(self, grid: tuple[int, int]) -> tuple[int, int] | None:
        """The grid the blocks are given: None for the native one (their rel-pos bias gathered in their graphs),
        else the run-time grid (dense tasks; resampled eagerly, see ``Attention.own_bias``)."""
        return None if grid == self.window else grid

    def _blocks_input(self, x: torch.Tensor, block_grid: tuple[int, int] | None) -> torch.Tensor:
        """``x`` for the next block. On a run-time grid (dense tasks: multi-scale pages, sliding windows) the
        token count changes from call to call, so it is marked dynamic here, as the biases of that grid are
        (``relpos._resized_bias``, :meth:`_shared_bias`): compiled blocks then trace one graph for every size
        from the first call on, instead of a graph for the first size and a dynamic one at the next (per block:
        each has its own drop-path rate). The native grid (classification, pre-training) stays static."""
        if block_grid is not None and not torch.compiler.is_compiling():
            maybe_mark_dynamic(x, 1)
        return x

    def forward_features(self, x: torch.Tensor, bool_masked_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Token features [B, 1+N, D] after the final norm (Identity when mean pooling)."""
        x, grid = self.prepare_tokens(x, bool_masked_pos)
        shared, block_grid = self._shared_bias(grid), self._block_grid(grid)  # once a forward, not a block
        for blk in self.blocks:
            x = blk(self._blocks_input(x, block_grid), shared, block_grid)
        return self.norm(x)

    def forward_intermediates(self, x: torch.Tensor, indices: tuple[int, ...] | list[int]) -> list[torch.Tensor]:
        """Patch-token maps [B, D, H/p, W/p] after the given blocks (0-based, negative from the end)."""
        wanted = [i if i >= 0 else self.num_layers + i for i in indices]
        if not wanted or max(wanted) >= self.num_layers or min(wanted) < 0:
            raise ValueError(f"block indices {list(indices)} out of range for depth {self.num_layers}")
        B = x.shape[0]
        x, grid = self.prepare_tokens(x)
        shared, block_grid = self._shared_bias(grid), self._block_grid(grid)
        outs: dict[int, torch.Tensor] = {}
        for i, blk in enumerate(self.blocks[: max(wanted) + 1]):
            x = blk(self._blocks_input(x, block_grid), shared, block_grid)
            if i in wanted:
                outs[i] = x[:, 1:].transpose(1, 2).reshape(B, -1, *grid)
        return [outs[i] for i in wanted]

    def get_intermediate_layers(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Token features [B, 1+N, D] after every block (linear probing picks the best one)."""
        x, grid = self.prepare_tokens(x)
        shared, block_grid = self._shared_bias(grid), self._block_grid(grid)
        outs = []
        for blk in self.blocks:
            x = blk(self._blocks_input(x, block_grid), shared, block_grid)
            outs.append(x)
        return outs

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.fc_norm is not None:
            return self.fc_norm(tokens[:, 1:].mean(dim=1))
        return tokens[:, 0]

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(tokens)
        return x if pre_logits or self.cfg.head != "cls" else self.head(x)

    def forward_mim(self, x: torch.Tensor, bool_masked_pos: torch.Tensor,
                    positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the MIM head for the masked patches (BEiT section 2.3; official ``modeling_pretrain.py``).

        Without ``positions``: [num_masked_total, vocab], rows in ``nonzero()`` order (as the official
        ``x[bool_masked_pos]``: a host sync). With ``positions`` [B, K] from :func:`masked_positions`:
        [B, K, vocab] for those patches (no host sync; rows that are padding are the caller's to weight out).
        """
        if self.cfg.head != "mim":
            raise ValueError("forward_mim needs a model created with head='mim'")
        mask = check_mask(bool_masked_pos, x.shape[0], self.patch_embed.grid_of(x))
        tokens = self.forward_features(x, mask)[:, 1:]
        if positions is not None:  # only the selected positions go through the 8192-way head
            if positions.ndim != 2 or positions.shape[0] != x.shape[0]:
                raise ValueError(f"positions must be [batch, K] with batch {x.shape[0]} (masked_positions), got "
                                 f"{list(positions.shape)}")
            tokens = tokens.gather(1, positions.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        else:
            tokens = tokens[mask]
        if self.head_norm is not None:
            tokens = self.head_norm(tokens)
        return self.lm_head(tokens)

    def forward(self, x: torch.Tensor, bool_masked_pos: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        if self.cfg.head == "mim":
            if bool_masked_pos is None:
                raise ValueError("a MIM model needs bool_masked_pos: model(images, bool_masked_pos)")
            return self.forward_mim(x, bool_masked_pos, positions)
        if positions is not None:
            raise ValueError("positions select patches for the MIM head: only a model with head='mim' takes them")
        tokens = self.forward_features(x, bool_masked_pos)
        return self.forward_head(tokens)
