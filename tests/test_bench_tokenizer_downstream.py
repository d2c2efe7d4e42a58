"""benchmarks/tokenizer_downstream.sh: its two arms and the summary at the end, with a stand-in cifar10_repro.sh."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

FAKE_REPRO = """#!/usr/bin/env bash
# stand-in for cifar10_repro.sh: stage A prints the tokenizer's held-out figures, stage B one eval line; the old arm
# (usage_weight=0) fails in stage A with exit 3 when FAIL_OLD is set
if [ "$1" = A ]; then
  echo "got data: $2"
  echo "heldout_psnr: 25.0"; echo "heldout_perplexity: 100"
  [ "$TOK_EXTRA" = "model.usage_weight=0" ] && [ -n "${FAIL_OLD:-}" ] && exit 3
  exit 0
fi
echo "12:00:00 eval step 100 ep 1: loss 1.0, top1 70.0"
"""


def _run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    bench = tmp_path / "bench dir's"  # a path with a space and a single quote
    bench.mkdir(exist_ok=True)
    shutil.copy(REPO / "benchmarks" / "tokenizer_downstream.sh", bench)
    (bench / "cifar10_repro.sh").write_text(FAKE_REPRO)
    return subprocess.run(["bash", str(bench / "tokenizer_downstream.sh"), str(tmp_path / "data 'dir"),
                           str(tmp_path / "out dir"), "1"], cwd=tmp_path, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", **env}, timeout=60)


def test_both_arms_are_summed_up_and_a_failed_arm_sets_the_exit_status(tmp_path):
    ok = _run(tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count("heldout_psnr: 25.0") == 2 and ok.stdout.count("top1 70.0") == 2
    data = tmp_path / "data 'dir"
    for arm in ("old", "new"):  # the paths (a space, a quote) arrive whole
        assert f"got data: {data}\n" in (tmp_path / "out dir" / f"log_{arm}").read_text()
    failed = _run(tmp_path, FAIL_OLD="1")  # the old arm stops in stage A: no eval line in its log
    assert "== new: heldout_psnr: 25.0" in failed.stdout and "top1 70.0" in failed.stdout, failed.stdout
    assert failed.returncode == 3, (failed.returncode, failed.stdout, failed.stderr)
