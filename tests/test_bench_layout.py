"""benchmarks/layout_docbank.py: its defaults and ``--profile`` (a few engine steps under torch.profiler), on CPU."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("pycocotools")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("layout_docbank", REPO / "benchmarks" / "layout_docbank.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_defaults_are_the_recipe_of_the_docstring(bench):
    a = bench.parse_args(["--data", "d", "--out", "o"])
    assert (a.batch_size, a.lr, a.minutes, a.profile) == (8, 4e-4, 3.5, "")


def test_profile_names_the_step_parts_and_appends_its_tables(bench, tmp_path):
    from beit.engine.config import load_config
    from beit.tasks.layout import LayoutConfig, write_synthetic_pages

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pages = write_synthetic_pages(tmp_path / "pages", num_pages=2, size=(96, 128))
        cfg = load_config(LayoutConfig, None, [
            "model.arch=beit_tiny_patch16_224", "model.backbone_overrides={depth: 2, embed_dim: 32, num_heads: 2}",
            "model.fpn_channels=32", "model.box_head_dim=64", "model.mask_head=false", "data.min_sizes=[96]",
            "data.max_size=160", "data.crop_prob=0", "train.batch_size=2", "train.num_workers=0",
            f"data.train_ann={pages}", f"train.output_dir={tmp_path / 'run'}"])
        out = tmp_path / "profile.txt"
        out.write_text("earlier\n")
        text = bench.profile_steps(cfg, 1, out)
    finally:
        torch.set_num_threads(n)
    assert "ms a step (median of 1;" in text and "2 pages a step, short sides [96]" in text
    for part in ("fwd: backbone", "fwd: FPN", "fwd: RPN", "fwd: RoI heads"):
        assert part in text
    assert "self_cpu_time_total" in text and "aten::" in text
    assert out.read_text() == "earlier\n" + text + "\n"  # appended
