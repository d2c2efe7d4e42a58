"""`beit tokenizer encode` caches the token ids of a folder, in file order, matching `tok.encode`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torchvision.transforms import functional as TF

from beit.cli import main
from beit.tokenizers import DiscreteVAE


def test_encode_folder(tmp_path) -> None:
    data = tmp_path / "imgs" / "sub"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(data / f"{i}.png")
    torch.manual_seed(0)
    tok = DiscreteVAE(vocab_size=32, hidden=8, downsample=4, num_res_blocks=0, codebook_dim=8).eval()
    tok.save(tmp_path / "tok.safetensors")
    out = tmp_path / "ids.safetensors"
    assert main(["tokenizer", "encode", "dvae", str(tmp_path / "tok.safetensors"), "--data", str(tmp_path / "imgs"),
                 "--img-size", "32", "--num-workers", "0", "--out", str(out)]) == 0
    ids = load_file(out)["ids"]
    assert ids.shape == (5, 8, 8) and ids.dtype == torch.uint16
    paths = json.loads(out.with_suffix(".json").read_text())["paths"]
    first = TF.to_tensor(TF.center_crop(TF.resize(Image.open(paths[0]).convert("RGB"), 32), 32))
    torch.testing.assert_close(ids[0].long(), tok.encode(first[None])[0])


def test_kind_and_precision_are_checked_by_the_registry(tmp_path, capsys) -> None:
    """`beit tokenizer eval|encode KIND` resolves KIND through beit.tokenizers.TOKENIZERS: one-line errors."""
    (tmp_path / "imgs").mkdir()
    DiscreteVAE(vocab_size=32, hidden=8, downsample=4, num_res_blocks=0, codebook_dim=8).save(tmp_path / "t.safetensors")
    args = [str(tmp_path / "t.safetensors"), "--data", str(tmp_path / "imgs"), "--num-workers", "0"]
    assert main(["tokenizer", "encode", "vqgan", *args]) != 0
    assert "unknown tokenizer kind 'vqgan'; expected one of ('dalle', 'dvae')" in capsys.readouterr().err
    assert main(["tokenizer", "encode", "dvae", *args, "--precision", "bf16"]) != 0
    assert "load_tokenizer('dvae'): precision must be one of ('fp32',), got 'bf16'" in capsys.readouterr().err


def test_eval_skips_unreadable_files_once_and_scores_the_readable_ones(tmp_path, capsys, beit_warnings) -> None:
    """`beit tokenizer eval` on a folder with broken files: the dataset used to put a neighbour in each broken
    file's place, so the metrics counted that neighbour twice and nothing said how many images were scored.
    Now each broken file is skipped once (named, counted) and the metrics are those of the readable images."""
    from torchvision import transforms as T

    from beit.data import ImageFolderDataset
    from beit.tasks.tokenizer import evaluate_tokenizer

    data, good = tmp_path / "imgs", tmp_path / "good"
    (data / "sub").mkdir(parents=True)
    good.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        img = Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
        img.save(data / ("sub" if i % 2 else "") / f"{i}.png")
        img.save(good / f"{i}.png")
    bad = [data / "2_broken.png", data / "sub" / "9_truncated.jpg", data / "sub" / "empty.png"]
    bad[0].write_bytes(b"not an image")
    bad[1].write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 20)
    bad[2].write_bytes(b"")
    torch.manual_seed(0)
    tok = DiscreteVAE(vocab_size=32, hidden=8, downsample=4, num_res_blocks=0, codebook_dim=8).eval()
    tok.save(tmp_path / "tok.safetensors")
    assert main(["tokenizer", "eval", "dvae", str(tmp_path / "tok.safetensors"), "--data", str(data), "--img-size",
                 "32", "--batch-size", "3", "--out", str(tmp_path / "grid.png")]) == 0
    out = capsys.readouterr().out
    report, _ = json.JSONDecoder().raw_decode(out[out.index("{\n"):])
    assert report["num_images"] == 5 and report["num_skipped"] == 3, report
    assert sorted(report["skipped"].split(", ")) == sorted(str(p) for p in bad)
    said = [r.getMessage() for r in beit_warnings]
    assert len(said) == 1 and said[0].startswith("skipped 3 unreadable files (left out of the metrics, not "
                                                 "replaced): "), said
    assert all(said[0].count(f"{p} (") == 1 for p in bad), said  # each named once, with its reason
    s = 32
    expected = evaluate_tokenizer(tok, ImageFolderDataset(good, T.Compose([T.Resize(s), T.CenterCrop(s),
                                                                            T.ToTensor()])))
    for k, v in expected.items():
        assert report[k] == pytest.approx(v, rel=1e-5), k
    assert Path(report["recon_grid"]).is_file()
