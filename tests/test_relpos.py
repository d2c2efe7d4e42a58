"""Relative-position tables are resampled the official way (unilm / timm), at load time and at run time."""

from __future__ import annotations

import pytest
import torch

import beit
from beit.models.relpos import relative_position_index, resize_table, table_size

timm_pos = pytest.importorskip("timm.layers.pos_embed_rel")


def _table(window: tuple[int, int], heads: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(table_size(window), heads, generator=torch.Generator().manual_seed(seed))


def _row(window: tuple[int, int], dh: int, dw: int) -> int:
    """Table row of the offset (dh, dw) in the official layout."""
    return (dh + window[0] - 1) * (2 * window[1] - 1) + (dw + window[1] - 1)


@pytest.mark.parametrize(
    "old,new",
    [((8, 8), (16, 16)), ((14, 14), (32, 32)), ((14, 14), (15, 15)), ((3, 3), (5, 5)), ((8, 8), (40, 40)),
     ((4, 6), (7, 9)), ((8, 6), (12, 9)), ((6, 8), (9, 12)), ((2, 5), (4, 11))],
)
def test_growing_equals_timm(old, new) -> None:
    table = _table(old)
    expected = timm_pos.resize_rel_pos_bias_table(table, new, (table_size(new), 3), old_window_size=old)
    got = resize_table(table, old, new)
    assert got.shape == (table_size(new), 3)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_near_offsets_keep_their_bias() -> None:
    """The issue's example: a 'right neighbour' bias of -1 stays -1 when an 8x8 window grows to 16x16."""
    table = torch.zeros(table_size((8, 8)), 1)
    table[_row((8, 8), 0, 1)] = -1.0
    table[_row((8, 8), 0, 0)] = 2.0
    table[-3:] = torch.tensor([[5.0], [6.0], [7.0]])
    big = resize_table(table, (8, 8), (16, 16))
    assert big[_row((16, 16), 0, 1), 0].item() == pytest.approx(-1.0, abs=1e-6)
    assert big[_row((16, 16), 0, 0), 0].item() == pytest.approx(2.0, abs=1e-6)
    assert big[-3:, 0].tolist() == [5.0, 6.0, 7.0]  # cls entries copied


@pytest.mark.parametrize("old,new", [((16, 16), (8, 8)), ((6, 9), (3, 4)), ((5, 5), (1, 1))])
def test_shrinking_takes_the_exact_central_block(old, new) -> None:
    table = _table(old)
    small = resize_table(table, old, new)
    assert small.shape == (table_size(new), 3)
    for dh in range(-(new[0] - 1), new[0]):
        for dw in range(-(new[1] - 1), new[1]):
            assert torch.equal(small[_row(new, dh, dw)], table[_row(old, dh, dw)])
    assert torch.equal(small[-3:], table[-3:])


def test_axes_are_resampled_independently() -> None:
    """One axis grows, one shrinks, or stays: the unchanged axis is untouched, the shrunk one cropped."""
    old = (6, 6)
    table = _table(old)
    mixed = resize_table(table, old, (12, 6))  # width unchanged
    for dw in range(-5, 6):  # column dh=0 keeps every width offset exactly
        assert torch.equal(mixed[_row((12, 6), 0, dw)], table[_row(old, 0, dw)])
    crop_grow = resize_table(table, old, (3, 12))
    height_only = resize_table(table, old, (3, 6))
    torch.testing.assert_close(resize_table(height_only, (3, 6), (3, 12)), crop_grow, atol=1e-6, rtol=0)


def test_wrong_table_size_is_named() -> None:
    with pytest.raises(ValueError, match=r"table has 10 rows, expected 228 for a 8x8 window"):
        resize_table(torch.zeros(10, 2), (8, 8), (16, 16))


def test_runtime_equals_load_time_on_a_non_square_grid_and_is_differentiable() -> None:
    torch.manual_seed(0)
    kw = dict(img_size=(16, 24), patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=3, use_abs_pos_emb=True)
    m = beit.create_model("beit_tiny_patch16_224", **kw).eval()
    with torch.no_grad():
        for blk in m.blocks:
            blk.attn.relative_position_bias_table.normal_()
    assert m.window == (4, 6)
    x = torch.randn(1, 3, 28, 36)  # grid (7, 9)
    loaded = beit.load_model(m.state_dict(), img_size=(16, 24))  # non-square: image size from the caller
    assert loaded.window == (4, 6)
    big = beit.load_model(m.state_dict(), img_size=(28, 36))  # non-square source grid, via img_size
    assert big.window == (7, 9)
    torch.testing.assert_close(
        big.blocks[0].attn.relative_position_bias_table,
        timm_pos.resize_rel_pos_bias_table(m.blocks[0].attn.relative_position_bias_table.detach(), (7, 9),
                                           (table_size((7, 9)), 2), old_window_size=(4, 6)),
        atol=1e-5, rtol=0,
    )
    with torch.no_grad():
        torch.testing.assert_close(m.forward_intermediates(x, (1,))[0], big.forward_intermediates(x, (1,))[0],
                                   atol=1e-5, rtol=0)
    m.forward_intermediates(x, (1,))[0].sum().backward()
    assert m.blocks[0].attn.relative_position_bias_table.grad.abs().sum() > 0
    assert relative_position_index((7, 9)).max() == table_size((7, 9)) - 1


def test_compiled_blocks_take_new_grids_without_a_graph_per_size():
    """Dense tasks feed many grid sizes (multi-scale pages, sliding windows): the run-time table resampling
    runs eagerly (one graph break, first thing in the block), so the blocks' graphs are shape-generic instead
    of one per size."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    import beit

    torch.manual_seed(0)
    model = beit.create_model("beit_tiny_patch16_224", head="none", img_size=32, patch_size=8, embed_dim=32,
                              depth=3, num_heads=2, use_rel_pos_bias=True).eval()
    sizes = (32, 48, 64, 80, 96, 112)
    images = {s: torch.randn(2, 3, s, s + 16, generator=torch.Generator().manual_seed(s)) for s in sizes}
    with torch.no_grad():
        ref = {s: model.forward_intermediates(images[s], (1, 2)) for s in sizes}
        torch._dynamo.reset()
        counters.clear()
        for block in model.blocks:
            block.compile(backend="eager")  # dynamo's tracing is what is tested; no code generation
        for s in sizes:
            for got, want in zip(model.forward_intermediates(images[s], (1, 2)), ref[s]):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # one graph for every grid, dynamic in the token count (the blocks share it: no drop path). It was 9 with the
    # blocks split in three around the eager resampling (a static set at the first grid, a dynamic one at the
    # next, an empty one as each grid side turned dynamic in the rel-pos lookup), 17 before that
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


@pytest.mark.parametrize("window", [(1, 1), (1, 5), (4, 1), (3, 2), (7, 9), (12, 5)])
def test_bias_without_an_index_equals_the_official_gather(window) -> None:
    """The run-time bias (no [L, L] index) has the official index's values bit for bit, and the same gradient."""
    from beit.models.relpos import _bias_of_table, _gather

    table = _table(window, heads=3).requires_grad_()
    want = _gather(table, relative_position_index(window), window)
    got = _bias_of_table(table, window)
    assert torch.equal(got, want)
    weights = torch.randn(want.shape, generator=torch.Generator().manual_seed(1))
    (g_want,) = torch.autograd.grad((want * weights).sum(), table)
    (g_got,) = torch.autograd.grad((got * weights).sum(), table)
    torch.testing.assert_close(g_got, g_want, atol=1e-5, rtol=1e-5)


def test_runtime_grids_make_no_index_and_reuse_the_resampling_matrices(monkeypatch) -> None:
    """A layout step at a new page size used to build the [L, L] int64 index on the host (a 100 MB clone per
    block for a 3,550-token page, 0.2 s for a grid not cached) and copy it and the resampling matrices to the
    device in every block: now neither is made per call."""
    from beit.models import relpos

    def no_index(window):  # noqa: ANN001, ANN202
        raise AssertionError(f"an index was built for the run-time grid {window}")

    torch.manual_seed(0)
    model = beit.create_model("beit_tiny_patch16_224", head="none", img_size=32, patch_size=8, embed_dim=32,
                              depth=3, num_heads=2, use_rel_pos_bias=True)
    x = torch.randn(1, 3, 40, 56)  # grid (5, 7), not the native (4, 4)
    ref = model.forward_intermediates(x, (2,))[0]
    monkeypatch.setattr(relpos, "relative_position_index", no_index)
    relpos._axis_matrix_on.cache_clear()
    out = model.forward_intermediates(x, (2,))[0]
    out.sum().backward()
    assert torch.equal(out, ref)
    assert model.blocks[0].attn.relative_position_bias_table.grad.abs().sum() > 0
    info = relpos._axis_matrix_on.cache_info()
    assert info.misses == 2 and info.hits == 2 * len(model.blocks) - 2  # one matrix per axis, made once


def test_the_native_grid_keeps_static_graphs_and_run_time_grids_get_dynamic_ones():
    """Classification and pre-training run the model's own grid: their compiled blocks stay specialised to
    its token count (no dynamic-shape code). A run-time grid (dense tasks) is traced dynamic in the token count
    from its first call on, the resampled bias included: one graph for every later size."""
    import torch._dynamo

    import beit

    seen: list[bool] = []  # per graph: is any input symbolic?

    def backend(gm, example_inputs):
        seen.append(_symbolic(gm))
        return gm.forward

    torch.manual_seed(0)
    model = beit.create_model("beit_tiny_patch16_224", head="none", img_size=32, patch_size=8, embed_dim=32,
                              depth=2, num_heads=2, use_rel_pos_bias=True).eval()
    torch._dynamo.reset()
    for block in model.blocks:
        block.compile(backend=backend)
    with torch.no_grad():
        model.forward_features(torch.randn(2, 3, 32, 32))
        assert seen == [False]  # the native grid: one static graph the two blocks share
        for size in (48, 64, 80):
            model.forward_intermediates(torch.randn(2, 3, size, size + 8), (1,))
    torch._dynamo.reset()
    assert seen == [False, True], seen  # a dynamic one at the first run-time grid, then none


def _symbolic(gm) -> bool:
    """Whether a dynamo graph takes a symbolic size (a dynamic-shape graph: its inputs' example values)."""
    values = [n.meta.get("example_value") for n in gm.graph.find_nodes(op="placeholder")]
    return any(isinstance(v, torch.SymInt) or (isinstance(v, torch.Tensor) and not all(isinstance(d, int) for d in v.shape))
               for v in values)
