"""data.in_memory: the decoded size is estimated from the headers and refused before decoding when it would not fit;
data.max_images is applied before decoding."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import beit.data.datasets as datasets
from beit.data.datasets import MemoryBudgetError, decode_image_folder, estimate_decoded_bytes
from beit.engine.config import ConfigError
from beit.tasks.classify.config import DataConfig
from beit.tasks.classify.data import build_datasets


def _images(root: Path, n: int = 3, size: tuple[int, int] = (40, 30)) -> Path:
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_estimate_reads_headers_only(tmp_path: Path, monkeypatch) -> None:
    root = _images(tmp_path / "d")
    paths = sorted(str(p) for p in root.rglob("*.png"))
    monkeypatch.setattr(datasets, "decode_image", lambda *a, **k: pytest.fail("decoded"))
    assert estimate_decoded_bytes(paths) == 6 * 40 * 30 * 3
    assert estimate_decoded_bytes(paths, 8) == 6 * 8 * 8 * 3


def test_too_large_for_ram_or_device_is_refused_before_decoding(tmp_path: Path, monkeypatch) -> None:
    root = _images(tmp_path / "d")
    monkeypatch.setattr(datasets, "decode_image", lambda *a, **k: pytest.fail("decoded"))
    monkeypatch.setattr(datasets, "available_memory", lambda: 20_000)  # 6 x 3,600 bytes > 50% of it
    with pytest.raises(MemoryBudgetError, match=r"the 6 images under .* more than 50% of the 0.00 GiB of RAM"):
        decode_image_folder(root, progress=False)
    monkeypatch.setattr(datasets, "available_memory", lambda: 10**12)
    monkeypatch.setattr(datasets, "free_device_memory", lambda device: 20_000)
    with pytest.raises(MemoryBudgetError, match="free on cuda"):
        decode_image_folder(root, progress=False, device="cuda")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # every rank of the host decodes the folder
    monkeypatch.setattr(datasets, "available_memory", lambda: 100_000)
    with pytest.raises(MemoryBudgetError, match="in each of the 8 ranks of this host"):
        decode_image_folder(root, progress=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "x")  # not a number: one rank (was a ValueError ending the run)
    monkeypatch.setattr(datasets, "available_memory", lambda: 10**12)
    monkeypatch.setattr(datasets, "free_device_memory", lambda device: None)
    monkeypatch.setattr(datasets, "decode_image", lambda *a, **k: np.zeros((30, 40, 3), np.uint8))
    assert len(decode_image_folder(root, progress=False).images) == 6


def test_in_memory_refusal_names_the_config_key(tmp_path: Path, monkeypatch) -> None:
    root = _images(tmp_path / "d")
    monkeypatch.setattr(datasets, "available_memory", lambda: 20_000)
    with pytest.raises(ConfigError, match=r"'data.in_memory': the 6 images .*set data.in_memory=false"):
        build_datasets(DataConfig(train_dir=str(root), in_memory=True), None, None)


def test_max_images_is_applied_before_decoding(tmp_path: Path, caplog) -> None:
    root = tmp_path / "u"
    root.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(root / f"{i}.png")
    (root / "9_broken.png").write_bytes(b"not an image")  # after the first 3: never read
    with caplog.at_level(logging.WARNING):
        out = decode_image_folder(root, labeled=False, max_images=3, progress=False)
    assert tuple(out.images.shape) == (3, 8, 8, 3) and out.dropped == [] and "broken" not in caplog.text
    assert [int(v) for v in out.images[:, 0, 0, 0]] == [0, 1, 2]


def test_a_container_limit_counts_not_only_the_host(tmp_path: Path, monkeypatch) -> None:
    v2_max, v2_cur = tmp_path / "memory.max", tmp_path / "memory.current"
    v2_max.write_text("1000000\n")
    v2_cur.write_text("400000\n")
    assert datasets.cgroup_memory_left([(str(v2_max), str(v2_cur))]) == 600_000
    v2_max.write_text("max\n")  # cgroup v2 without a limit
    assert datasets.cgroup_memory_left([(str(v2_max), str(v2_cur))]) is None
    v1_lim, v1_use = tmp_path / "limit_in_bytes", tmp_path / "usage_in_bytes"
    v1_lim.write_text(f"{2**63 - 4096}\n")  # cgroup v1 without a limit
    v1_use.write_text("5\n")
    missing = (str(tmp_path / "nope"), str(tmp_path / "nope2"))
    assert datasets.cgroup_memory_left([missing, (str(v1_lim), str(v1_use))]) is None
    v1_lim.write_text("300\n")
    assert datasets.cgroup_memory_left([missing, (str(v1_lim), str(v1_use))]) == 295
    # the smaller of the host's available memory and the container's headroom decides
    monkeypatch.setattr(datasets, "cgroup_memory_left", lambda: 12_345)
    assert datasets.available_memory() == 12_345
    monkeypatch.setattr(datasets, "cgroup_memory_left", lambda: None)
    assert datasets.available_memory() > 12_345
