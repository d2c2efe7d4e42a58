"""`beit demo` (README command 1) runs end to end offline and writes what it promises."""

from __future__ import annotations

import json
from pathlib import Path

from beit.cli import main


def test_demo_quick_end_to_end(tmp_path) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick"]) == 0
    summary = json.loads((out / "demo_summary.json").read_text())
    assert set(summary["top1"]) == {"pretrained", "scratch"}
    assert all(0.0 <= v <= 100.0 for v in summary["top1"].values())
    for name, path in summary["pngs"].items():
        assert path and Path(path).exists(), name
    assert (out / "pretrain" / "final" / "model.safetensors").exists()
    assert len(list((out / "data" / "test").rglob("*.png"))) == 359  # 20% of sklearn's 1797 digits
