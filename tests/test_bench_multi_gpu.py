"""benchmarks/multi_gpu.py: the synthetic GPU-resident data, the scaling table, and one real tiny run on CPU."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mg():
    spec = importlib.util.spec_from_file_location("multi_gpu", REPO / "benchmarks" / "multi_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_bank_pretrain_masks_follow_the_generator(mg):
    bank = mg.gpu_bank("pretrain", 5, 64, 4, 32, 6, 2, 0, torch.device("cpu"), seed=0)
    assert bank["image"].shape == (5, 3, 64, 64) and bank["tok_image"].shape == (5, 3, 32, 32)
    assert bank["mask"].dtype == torch.bool and bank["mask"].shape == (5, 4, 4)
    assert bank["mask"].flatten(1).sum(1).tolist() == [6] * 5  # exactly num_mask patches per sample
    assert 0.0 <= bank["tok_image"].min() and bank["tok_image"].max() <= 1.0


def test_bank_step_gathers_the_indexed_rows(mg):
    bank = mg.gpu_bank("finetune", 4, 8, 0, 0, 0, 0, 10, torch.device("cpu"), seed=1)
    seen = {}

    def step_fn(model, batch):
        seen["batch"] = batch
        return torch.tensor(0.0), {}

    mg.bank_step(step_fn, bank, "finetune")(None, torch.tensor([2, 5]))  # 5 wraps to 1
    images, labels = seen["batch"]
    assert torch.equal(images, bank["image"][[2, 1]]) and torch.equal(labels, bank["label"][[2, 1]])


def test_find_preset(mg, tmp_path):
    assert mg.find_preset("pretrain_base") == REPO / "src" / "beit" / "configs" / "pretrain_base.yaml"
    f = tmp_path / "x.yaml"
    f.write_text("{}")
    assert mg.find_preset(str(f)) == f
    with pytest.raises(FileNotFoundError, match="unknown preset 'nope'; presets: .*pretrain_base"):
        mg.find_preset("nope")


def _run_json(path: Path, **kw) -> None:
    row = dict(task="pretrain", mode="single", gpus=1, img_per_s=1000.0, device="cpu", torch="x", date="d",
               batch_per_gpu=4, steps=8, warmup_windows=1, compile=False, max_mem_gb=0.0, error="")
    row.update(kw)
    path.write_text(json.dumps(row))


def test_report_scaling_and_target(mg, tmp_path, capsys):
    _run_json(tmp_path / "a.json")
    _run_json(tmp_path / "b.json", mode="ddp", gpus=2, img_per_s=1900.0)
    _run_json(tmp_path / "c.json", mode="fsdp", gpus=2, img_per_s=1500.0)
    out = tmp_path / "table.json"
    args = type("A", (), {"dir": str(tmp_path), "json": str(out)})
    assert mg.report(args) == 0
    runs = {r["mode"]: r for r in json.loads(out.read_text())["runs"]}
    assert runs["ddp"]["scaling"] == pytest.approx(1.9) and runs["ddp"]["efficiency"] == pytest.approx(0.95)
    assert runs["fsdp"]["scaling"] == pytest.approx(1.5)
    text = capsys.readouterr().out
    assert "pretrain ddp x2: scaling efficiency 95.0% (target >= 90%: met)" in text
    assert "pretrain fsdp x2: scaling efficiency 75.0% (target >= 90%: NOT met)" in text
    _run_json(tmp_path / "d.json", task="finetune", mode="ddp", gpus=2, img_per_s=None, error="exit 1: boom")
    assert mg.report(args) == 1  # a failed run fails the report


@pytest.mark.parametrize("task", ["pretrain", "finetune"])
def test_one_tiny_run_on_the_real_engine(mg, tmp_path, task, one_thread):
    out = tmp_path / "run.json"
    rc = mg.main(["run", "--task", task, "--tiny", "--bank", "8", "--steps", "4", "--batch", "2", "--log-every",
                  "1", "--warmup-windows", "1", "--compile", "false", "--work", str(tmp_path), "--out", str(out)])
    r = json.loads(out.read_text())
    assert rc == 0 and r["error"] == "" and (r["task"], r["mode"], r["gpus"]) == (task, "single", 1)
    assert len(r["windows"]) == 4 and r["img_per_s"] == pytest.approx(sorted(r["windows"][1:])[1])
    assert not list(tmp_path.glob("**/*.pt"))  # no checkpoint written in the timed loop
