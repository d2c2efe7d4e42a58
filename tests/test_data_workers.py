"""DataLoader workers do not change the data: same batches for num_workers=0 and 2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from beit.data.datasets import ImageFolderDataset, WebDatasetShards
from beit.data.transforms import PretrainTransform, collate_pretrain


def _folder(root: Path, n: int = 12) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = root / f"part{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(sub / f"{i:03d}.png")
    (root / "part0" / "zzz_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")


def _batches(ds, num_workers: int, epoch: int) -> list[dict[str, torch.Tensor]]:
    ds.set_epoch(epoch)
    loader = DataLoader(ds, batch_size=4, shuffle=False, num_workers=num_workers, collate_fn=collate_pretrain)
    return list(loader)


@pytest.mark.slow
def test_workers_give_identical_batches(tmp_path: Path) -> None:
    _folder(tmp_path)
    ds = ImageFolderDataset(tmp_path, PretrainTransform(32, 4, 4), seed=11)
    assert len(ds) == 13
    ref = _batches(ds, 0, epoch=2)
    par = _batches(ds, 2, epoch=2)
    assert len(ref) == len(par) == 4
    for a, b in zip(ref, par):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    other = _batches(ds, 0, epoch=3)
    assert not torch.equal(ref[0]["image"], other[0]["image"])


@pytest.mark.slow
def test_webdataset_workers_read_every_shard_once(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    urls, k = [], 0
    for s in range(4):
        url = str(tmp_path / f"s{s}.tar")
        with wds.TarWriter(url) as sink:
            for _ in range(3):
                img = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
                sink.write({"__key__": f"k{k:03d}", "png": _png(img), "cls": str(k).encode()})
                k += 1
        urls.append(url)
    ds = WebDatasetShards(urls, transform=lambda im: torch.from_numpy(np.asarray(im).copy()), label_key="cls")
    loader = DataLoader(ds, batch_size=None, num_workers=2)
    labels = sorted(int(lbl) for _, lbl in loader)
    assert labels == list(range(12))


@pytest.mark.slow
def test_webdataset_persistent_workers_count_each_epochs_skips_in_that_epoch(tmp_path: Path) -> None:
    """Persistent workers keep the dataset copy they were started with: set_epoch() in the main process must still
    reach them, or the second epoch's skip is counted (and its shards ordered, its samples augmented) as the first's."""
    rng = np.random.default_rng(0)
    urls = []
    for s in range(2):
        url = str(tmp_path / f"s{s}.tar")
        with wds.TarWriter(url) as sink:
            if s == 0:
                sink.write({"__key__": "bad", "jpg": b"\xff\xd8\xff\xe0 truncated", "cls": b"0"})
            for k in range(3):
                img = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
                sink.write({"__key__": f"s{s}k{k}", "png": _png(img), "cls": str(k).encode()})
        urls.append(url)
    ds = WebDatasetShards(urls, transform=lambda im: torch.from_numpy(np.asarray(im).copy()), label_key="cls")
    loader = DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=True)
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        assert len(list(loader)) == 6
        assert ds.skipped_count(epoch) == 1
    assert [ds.skipped_count(0), ds.skipped_count(1), ds.skipped_count()] == [1, 1, 2]


def _png(img: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
