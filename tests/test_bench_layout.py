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


def test_evals_spread_over_the_run(bench):
    # 1060 steps of 8 pages over 80 pages, 5 evaluations: epochs of 22 passes (220 steps), each evaluated
    assert bench.eval_schedule(1060, 8, 80, 5) == (22, 1)
    assert bench.eval_schedule(1060, 8, 80, 1) == (106, 0)  # one epoch, the final evaluation only
    assert bench.eval_schedule(3, 2, 80, 10) == (1, 1)  # never more evaluations than steps


def test_ap_curve_reads_the_evaluations_and_the_loss_before_each(bench, tmp_path):
    import json

    rows = [{"split": "train", "step": 10, "loss": 2.0}, {"split": "train", "step": 20, "loss": 1.5},
            {"split": "eval", "step": 20, "bbox/AP": 0.1, "bbox/AP50": 0.2},
            {"split": "train", "step": 30, "loss": 1.0},
            {"split": "eval", "step": 40, "bbox/AP": float("nan"), "bbox/AP50": 0.3}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    curve = bench.ap_curve(path)
    assert curve == [{"step": 20, "bbox_AP": 0.1, "bbox_AP50": 0.2, "train_loss": 1.5},
                     {"step": 40, "bbox_AP": None, "bbox_AP50": 0.3, "train_loss": 1.0}]
    runs = {"pretrained": {"ap_curve": curve}, "scratch": {"ap_curve": curve[:1]}}
    png = bench.plot_ap_curves("docbank", runs, tmp_path / "curve.png")
    assert png is not None and png.stat().st_size > 0
    assert bench.plot_ap_curves("docbank", {"a": {"ap_curve": curve[:1]}}, tmp_path / "none.png") is None
