"""Issue 14.10: commands that write one result per input file keep results aligned with the files when
some are unreadable, and report the skipped ones."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

import beit.tasks.classify.evaluate as ev
from beit.data.datasets import FileImages, collate_files


class _Brightness(nn.Module):
    """Class 1 ("bright") when the mean pixel is above 0.5, else class 0 ("dark")."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=(1, 2, 3)) - 0.5
        return torch.stack([-m, m], dim=1) * 20 * self.w


def _folder(root: Path) -> dict[str, str]:
    expected = {}
    for i, bright in enumerate([1, 0, 0, 1, 1, 0, 1]):
        name = f"{i:02d}.png" if i % 2 else f"sub/{i:02d}.png"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (10, 7), (230,) * 3 if bright else (20,) * 3).save(root / name)
        expected[name] = "bright" if bright else "dark"
    (root / "02_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (root / "sub" / "04_junk.jpg").write_bytes(b"junk")
    os.symlink(root / "missing.png", root / "05_gone.png")
    return expected


@pytest.mark.parametrize("num_workers", [0, 2])
def test_predict_rows_aligned_with_files_when_some_are_unreadable(tmp_path: Path, monkeypatch,
                                                                  num_workers: int) -> None:
    images = tmp_path / "images"
    expected = _folder(images)
    pre = ev.Preprocess(img_size=8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    monkeypatch.setattr(ev, "load_classifier", lambda *a, **k: (_Brightness(), ["dark", "bright"], pre))
    out = tmp_path / "pred.csv"
    res = ev.predict_folder("unused", images, out, topk=2, batch_size=2, num_workers=num_workers, device="cpu")
    rows = list(csv.DictReader(open(out)))
    assert [r["path"] for r in rows] == sorted(expected)
    assert {r["path"]: r["label_1"] for r in rows} == expected
    assert res["num_images"] == 7 and res["num_skipped"] == 3
    assert res["skipped"] == [str(images / "02_corrupt.png"), str(images / "05_gone.png"),
                              str(images / "sub" / "04_junk.jpg")]


def test_file_images_keep_indices_and_name_failures(tmp_path: Path) -> None:
    Image.new("RGB", (5, 5)).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"no")
    Image.new("RGB", (6, 6)).save(tmp_path / "c.png")

    def tf(img: Image.Image) -> torch.Tensor:
        if img.size == (6, 6):
            raise ValueError("six")
        return torch.zeros(2)

    ds = FileImages([tmp_path / n for n in ("a.png", "b.png", "c.png")], tf)
    (batch,) = list(DataLoader(ds, batch_size=3, collate_fn=collate_files))
    assert batch["index"].tolist() == [0] and batch["image"].shape == (1, 2)
    assert [i for i, _ in batch["failed"]] == [1, 2]
    assert batch["failed"][0][1].startswith("unreadable: UnidentifiedImageError")
    assert batch["failed"][1][1] == "transform failed: ValueError: six"


def test_tokenizer_encode_ids_aligned_with_paths(tmp_path: Path) -> None:
    import json

    import numpy as np
    from safetensors.torch import load_file
    from torchvision.transforms import functional as TF

    from beit.cli import main
    from beit.tokenizers import DiscreteVAE

    data = tmp_path / "imgs"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(data / f"{i}.png")
    (data / "1_broken.png").write_bytes(b"broken")
    os.symlink(data / "nowhere.png", data / "2_gone.png")
    torch.manual_seed(0)
    tok = DiscreteVAE(vocab_size=32, hidden=8, downsample=4, num_res_blocks=0, codebook_dim=8).eval()
    tok.save(tmp_path / "tok.safetensors")
    out = tmp_path / "ids.safetensors"
    assert main(["tokenizer", "encode", "dvae", str(tmp_path / "tok.safetensors"), "--data", str(data),
                 "--img-size", "32", "--num-workers", "2", "--batch-size", "2", "--out", str(out)]) == 0
    ids = load_file(out)["ids"]
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["paths"] == [str(data / f"{i}.png") for i in range(4)] and ids.shape == (4, 8, 8)
    assert meta["num_skipped"] == 2
    assert [x["path"] for x in meta["skipped"]] == [str(data / "2_gone.png"), str(data / "1_broken.png")]
    for row, path in zip(ids, meta["paths"]):
        x = TF.to_tensor(TF.center_crop(TF.resize(Image.open(path).convert("RGB"), 32), 32))
        torch.testing.assert_close(row.long(), tok.encode(x[None])[0])


def test_segment_predict_skips_unreadable_and_keeps_repeated_stems_apart(tmp_path: Path, one_thread) -> None:
    import json

    import beit
    from beit.configs import preset_path
    from beit.engine import load_config
    from beit.tasks.segmentation import BeitSegmenter, SegmentConfig, predict

    cfg = load_config(SegmentConfig, preset_path("segment_camvid"),
                      ["data.test_scale=[32,32]", "test.mode=whole", "train.precision=fp32"])
    torch.manual_seed(0)
    bb = beit.create_model("beit_tiny_patch16_224", head="none", img_size=32, patch_size=8, embed_dim=32, depth=4,
                           num_heads=2)
    model = BeitSegmenter(bb, 3, channels=16, aux_channels=8)
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        Image.new("RGB", (32, 24), (200, 0, 0) if d == "a" else (0, 0, 200)).save(tmp_path / d / "x.png")
    (tmp_path / "a" / "bad.png").write_bytes(b"junk")
    inputs = [str(tmp_path / "a" / "x.png"), str(tmp_path / "a" / "bad.png"), str(tmp_path / "b" / "x.png")]
    written = predict(model, cfg, inputs, tmp_path / "out")
    assert [p.name for p in written] == ["a__x_overlay.png", "b__x_overlay.png"]
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert [e["input"] for e in index["files"]] == inputs and index["num_skipped"] == 1
    assert index["files"][1]["error"].startswith("unreadable: UnidentifiedImageError")
    assert index["files"][2]["labels"] == str(tmp_path / "out" / "b__x_labels.png")


def test_layout_predict_skips_unreadable_pages_keeping_ids(tmp_path: Path) -> None:
    import json

    from beit.tasks.layout import predict_pages

    class _OneBox(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(()))

        def forward(self, images):
            return [{"boxes": torch.tensor([[1.0, 1.0, 5.0, 5.0]]), "labels": torch.tensor([1]),
                     "scores": torch.tensor([0.9]) * self.w} for _ in images]

    pages = []
    for name in ("p1.png", "p2.png", "p3.png"):
        path = tmp_path / name
        Image.new("RGB", (12, 16), (255, 255, 255)).save(path)
        pages.append(path)
    pages[1].write_bytes(b"truncated")
    with torch.no_grad():
        out = predict_pages(_OneBox(), pages, tmp_path / "out", class_names=["text"], device="cpu")
    meta = json.loads((tmp_path / "out" / "pages.json").read_text())
    assert [im["id"] for im in meta["images"]] == [1, 3]
    assert meta["skipped"][0]["id"] == 2 and meta["skipped"][0]["file_name"] == str(pages[1])
    assert meta["num_skipped"] == 1 and out["skipped"] == [str(pages[1])]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert sorted({r["image_id"] for r in results}) == [1, 3]
    assert [Path(p).name for p in out["pngs"]] == ["p1.png", "p3.png"]
