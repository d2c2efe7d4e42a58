"""`beit tokenizer encode` caches the token ids of a folder, in file order, matching `tok.encode`."""

from __future__ import annotations

import json

import numpy as np
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
