"""DALL-E tokenizer: exact agreement with OpenAI's ``dall_e`` package, and safe loading.

``dall_e`` is only a test-time reference here: the official weights are whole pickled
``dall_e`` modules, so we make random-weight ones the same way (``torch.save(module, path)``).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

dall_e = pytest.importorskip("dall_e")

from beit.tokenizers import (  # noqa: E402
    DalleTokenizer,
    Tokenizer,
    TokenizerCheckpointError,
    UnsafeCheckpointError,
    load_tokenizer,
)

VOCAB = 512  # dall_e's validators need vocab >= 512 and n_hid >= 64


def _randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random biases (dall_e inits them to zero) so that every parameter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return module


def _center_logits(enc: torch.nn.Module, size: int = 32) -> torch.nn.Module:
    """A random encoder gives nearly the same argmax everywhere (a shared offset dominates the
    logits); centering the output conv on calibration images makes ids vary with the image."""
    with torch.no_grad():
        x = dall_e.map_pixels(torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(9)))
        feats = enc.blocks.output.relu(enc.blocks[:-1](x)).mean((0, 2, 3))
        conv = enc.blocks.output.conv
        conv.b.copy_(-(conv.w[:, :, 0, 0] @ feats))
    return enc


@pytest.fixture(scope="module")
def ref(tmp_path_factory: pytest.TempPathFactory) -> dict:
    torch.manual_seed(0)
    enc = _center_logits(_randomize(dall_e.Encoder(n_hid=64, n_blk_per_group=1, vocab_size=VOCAB), 1)).eval()
    dec = _randomize(dall_e.Decoder(n_init=32, n_hid=64, n_blk_per_group=1, vocab_size=VOCAB), 2).eval()
    d = tmp_path_factory.mktemp("dalle")
    torch.save(enc, d / "encoder.pkl")  # exactly how the official files were written
    torch.save(dec, d / "decoder.pkl")
    return {"enc": enc, "dec": dec, "dir": d}


@pytest.fixture(scope="module")
def tok(ref: dict) -> DalleTokenizer:
    return load_tokenizer("dalle", encoder=ref["dir"] / "encoder.pkl", decoder=ref["dir"] / "decoder.pkl")


def _images(b: int = 2, h: int = 32, w: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _ref_decode(dec: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    z = torch.nn.functional.one_hot(ids, VOCAB).permute(0, 3, 1, 2).float()
    return dall_e.unmap_pixels(torch.sigmoid(dec(z)[:, :3]))


# ---------------------------------------------------------------------- agreement with dall_e
def test_encode_matches_reference(ref: dict, tok: DalleTokenizer) -> None:
    x = _images()
    with torch.no_grad():
        ref_logits = ref["enc"](dall_e.map_pixels(x))
    ids = tok.encode(x)
    assert ids.dtype == torch.long and ids.shape == (2, 4, 6)
    assert torch.equal(ids, ref_logits.argmax(1))
    assert ids.unique().numel() > 20  # not a comparison between two constant maps
    torch.testing.assert_close(tok.encoder_logits(x), ref_logits, rtol=1e-5, atol=1e-5)


def test_decode_matches_reference(ref: dict, tok: DalleTokenizer) -> None:
    ids = torch.randint(0, VOCAB, (2, 3, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = _ref_decode(ref["dec"], ids)
    out = tok.decode(ids)
    assert out.shape == (2, 3, 24, 40) and out.dtype == torch.float32
    assert 0 <= float(out.min()) and float(out.max()) <= 1
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_config_inferred_from_weights(tok: DalleTokenizer) -> None:
    assert isinstance(tok, Tokenizer)
    assert tok.vocab_size == VOCAB and tok.downsample == 8 and tok.in_chans == 3
    e, d = tok.encoder.config, tok.decoder.config
    assert (e.n_hid, e.n_blk_per_group, e.group_count, e.input_channels) == (64, 1, 4, 3)
    assert (d.n_init, d.n_hid, d.n_blk_per_group, d.output_channels, d.vocab_size) == (32, 64, 1, 3, VOCAB)


def test_default_config_encoder_matches_reference(tmp_path: Path) -> None:
    """The real architecture (n_hid 256, 2 blocks per group, vocab 8192), random weights."""
    torch.manual_seed(0)
    enc = _center_logits(dall_e.Encoder(), size=16).eval()
    torch.save(enc, tmp_path / "encoder.pkl")
    tok = load_tokenizer("dalle", encoder=tmp_path / "encoder.pkl")
    assert tok.vocab_size == 8192 and tok.encoder.config == type(tok.encoder.config)()
    x = _images(1, 16, 24)
    with torch.no_grad():
        expected = enc(dall_e.map_pixels(x)).argmax(1)
    assert torch.equal(tok.encode(x), expected) and expected.unique().numel() > 1


def test_legacy_and_state_dict_files_load(ref: dict, tmp_path: Path) -> None:
    torch.save(ref["enc"], tmp_path / "legacy.pkl", _use_new_zipfile_serialization=False)
    torch.save(ref["enc"].state_dict(), tmp_path / "state.pt")
    x = _images(seed=3)
    with torch.no_grad():
        expected = ref["enc"](dall_e.map_pixels(x)).argmax(1)
    for name in ("legacy.pkl", "state.pt"):
        assert torch.equal(load_tokenizer("dalle", encoder=tmp_path / name).encode(x), expected), name


def test_safetensors_roundtrip(tok: DalleTokenizer, tmp_path: Path) -> None:
    path = tmp_path / "dalle.safetensors"
    tok.save(path)
    back = load_tokenizer("dalle", path)  # decoder comes along in the same file
    x = _images(seed=4)
    ids = tok.encode(x)
    assert torch.equal(back.encode(x), ids)
    assert torch.equal(back.decode(ids), tok.decode(ids))
    assert back.encoder.config == tok.encoder.config and back.decoder.config == tok.decoder.config


def test_loader_does_not_import_dall_e(ref: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Any import of dall_e (by us or by unpickling) would fail: sys.modules[name] = None."""
    for name in [m for m in sys.modules if m == "dall_e" or m.startswith("dall_e.")]:
        monkeypatch.setitem(sys.modules, name, None)
    tok = load_tokenizer("dalle", encoder=ref["dir"] / "encoder.pkl", decoder=ref["dir"] / "decoder.pkl")
    ids = tok.encode(_images())
    tok.decode(ids)
    src = Path(__import__("beit.tokenizers").tokenizers.__file__).parent
    assert not [p for p in src.rglob("*.py") if "import dall_e" in p.read_text()]


# ---------------------------------------------------------------------- safety
class _Payload:
    """Unpickling this calls ``fn(*args)``: what a tampered checkpoint would do."""

    def __init__(self, fn: object, *args: object) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple:
        return self.fn, self.args


def _payloads(marker: Path) -> dict[str, _Payload]:
    """Keyed by the global each one pickles as."""
    return {
        "posix.system": _Payload(os.system, f"touch {marker}"),
        "builtins.eval": _Payload(eval, f"open({str(marker)!r}, 'w').close()"),
        "subprocess.call": _Payload(subprocess.call, ["touch", str(marker)]),
        "io.open": _Payload(open, str(marker), "w"),
    }


@pytest.mark.parametrize("name", ["posix.system", "builtins.eval", "subprocess.call", "io.open"])
def test_malicious_pickle_is_refused(name: str, tmp_path: Path) -> None:
    if name == "posix.system" and os.name != "posix":
        pytest.skip("os.system pickles as nt.system on Windows")
    marker = tmp_path / "pwned"
    enc = dall_e.Encoder(n_hid=64, n_blk_per_group=1, vocab_size=VOCAB)
    enc.payload = _payloads(marker)[name]  # hidden in an otherwise valid module
    path = tmp_path / "encoder.pkl"
    torch.save(enc, path)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_tokenizer("dalle", encoder=path)
    assert repr(name) in str(info.value) and str(path) in str(info.value)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: the unsafe way runs it
    assert marker.exists()


def test_malicious_legacy_and_bare_pickles_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    enc = dall_e.Encoder(n_hid=64, n_blk_per_group=1, vocab_size=VOCAB)
    enc.payload = _payloads(marker)["builtins.eval"]
    torch.save(enc, tmp_path / "legacy.pkl", _use_new_zipfile_serialization=False)
    torch.save(_payloads(marker)["builtins.eval"], tmp_path / "bare.pkl")
    with open(tmp_path / "raw.pkl", "wb") as f:
        pickle.dump(_payloads(marker)["builtins.eval"], f, protocol=2)
    for name in ("legacy.pkl", "bare.pkl", "raw.pkl"):
        with pytest.raises(UnsafeCheckpointError, match="builtins.eval"):
            load_tokenizer("dalle", encoder=tmp_path / name)
    assert not marker.exists()


# ---------------------------------------------------------------------- bad files
def test_bad_files_give_clear_errors(ref: dict, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pkl"
    with pytest.raises(FileNotFoundError, match="nope.pkl"):
        load_tokenizer("dalle", encoder=missing)
    text = tmp_path / "encoder.pkl"
    text.write_text("<html>404</html>")  # e.g. a failed download
    with pytest.raises(TokenizerCheckpointError, match="encoder.pkl"):
        load_tokenizer("dalle", encoder=text)
    other = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(3)}, other)
    with pytest.raises(TokenizerCheckpointError, match="other.pt.*not a DALL-E"):
        load_tokenizer("dalle", encoder=other)
    linear = tmp_path / "linear.pt"
    torch.save(torch.nn.Linear(2, 2), linear)
    with pytest.raises(UnsafeCheckpointError, match="torch.nn.modules.linear.Linear"):
        load_tokenizer("dalle", encoder=linear)
    with pytest.raises(TokenizerCheckpointError, match="decoder.pkl.*is a DALL-E decoder"):
        load_tokenizer("dalle", encoder=ref["dir"] / "decoder.pkl")
    state = ref["enc"].state_dict()
    state["blocks.group_2.block_1.res_path.conv_2.w"] = torch.zeros(32, 32, 5, 5)
    bad = tmp_path / "bad_shapes.pt"
    torch.save(state, bad)
    with pytest.raises(TokenizerCheckpointError, match="bad_shapes.pt.*group_2.block_1.res_path.conv_2"):
        load_tokenizer("dalle", encoder=bad)


def test_mismatched_vocab_and_foreign_safetensors(ref: dict, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    dec = dall_e.Decoder(n_init=32, n_hid=64, n_blk_per_group=1, vocab_size=1024)
    torch.save(dec, tmp_path / "decoder.pkl")
    with pytest.raises(ValueError, match="vocab_size"):
        load_tokenizer("dalle", encoder=ref["dir"] / "encoder.pkl", decoder=tmp_path / "decoder.pkl")
    save_file({"x": torch.zeros(2)}, tmp_path / "foreign.safetensors")
    with pytest.raises(TokenizerCheckpointError, match="foreign.safetensors"):
        load_tokenizer("dalle", encoder=tmp_path / "foreign.safetensors")


# ---------------------------------------------------------------------- inputs
@pytest.mark.parametrize(
    "images, error, match",
    [
        (torch.rand(3, 32, 32), ValueError, r"\[B, C, H, W\].*\(3, 32, 32\)"),
        (torch.rand(1, 1, 32, 32), ValueError, "expected 3 channels, got 1"),
        (torch.rand(1, 3, 30, 32), ValueError, "divisible by 8, got 30x32"),
        (torch.rand(1, 3, 32, 32) * 255, ValueError, "0-255"),
        ((torch.rand(1, 3, 32, 32) - 0.45) / 0.225, ValueError, "mean/std"),
        ((torch.rand(1, 3, 32, 32) * 255).to(torch.uint8), TypeError, "divide by 255"),
    ],
)
def test_encode_validates_input(tok: DalleTokenizer, images: torch.Tensor, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        tok.encode(images)


def test_decode_validates_ids(ref: dict, tok: DalleTokenizer) -> None:
    with pytest.raises(ValueError, match=r"\[0, 512\)"):
        tok.decode(torch.full((1, 2, 2), VOCAB))
    with pytest.raises(ValueError, match=r"\[B, h, w\]"):
        tok.decode(torch.zeros(4, dtype=torch.long))
    no_decoder = load_tokenizer("dalle", encoder=ref["dir"] / "encoder.pkl")
    with pytest.raises(RuntimeError, match="no decoder"):
        no_decoder.decode(torch.zeros(1, 2, 2, dtype=torch.long))


# ---------------------------------------------------------------------- speed knobs
def test_fp32_ids_ignore_callers_autocast(tok: DalleTokenizer) -> None:
    x = _images(seed=5)
    expected = tok.encode(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(tok.encode(x), expected)
    tok.train()
    assert not tok.training and not any(p.requires_grad for p in tok.parameters())


def test_bf16_channels_last_and_compile_trace(ref: dict, tok: DalleTokenizer) -> None:
    fast = load_tokenizer("dalle", encoder=ref["dir"] / "encoder.pkl", precision="bf16", channels_last=True)
    x = _images(seed=6)
    ids = fast.encode(x)
    assert ids.dtype == torch.long and ids.shape == (2, 4, 6)
    assert (ids == tok.encode(x)).float().mean() > 0.5  # bf16 flips a few near-ties, not most
    assert fast.encoder.blocks.input.weight.is_contiguous(memory_format=torch.channels_last)
    # The encoder traces as one graph (no graph breaks), mixed precision included; "eager" skips
    # slow CPU codegen.
    for module in (tok.encoder, fast.encoder):
        compiled = torch.compile(module, backend="eager", fullgraph=True)
        with torch.no_grad():
            out = compiled(x)
        assert out.dtype == torch.float32
        with torch.no_grad():
            torch.testing.assert_close(out, module(x))
    with pytest.raises(ValueError, match="precision"):
        fast.set_precision("int8")


def test_cli_convert_and_eval(ref: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``beit tokenizer convert`` writes a safetensors copy; ``eval`` reports metrics and a grid."""
    from PIL import Image

    from beit.cli import main

    out = tmp_path / "dalle.safetensors"
    assert (
        main(["tokenizer", "convert", str(ref["dir"] / "encoder.pkl"), str(ref["dir"] / "decoder.pkl"), str(out)]) == 0
    )
    x = _images(seed=7)
    assert torch.equal(
        load_tokenizer("dalle", out).encode(x), load_tokenizer("dalle", ref["dir"] / "encoder.pkl").encode(x)
    )
    data = tmp_path / "imgs"
    data.mkdir()
    for i in range(3):
        Image.fromarray((_images(1, 24, 24, seed=i)[0].permute(1, 2, 0) * 255).byte().numpy()).save(data / f"{i}.png")
    capsys.readouterr()
    grid = tmp_path / "grid.png"
    args = ["tokenizer", "eval", "dalle", str(out), "--data", str(data), "--img-size", "16", "--out", str(grid)]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"mse", "psnr", "perplexity", "dead_codes"} <= set(report) and grid.is_file()
    assert main(["tokenizer", "eval", "dalle", str(tmp_path / "missing.pkl"), "--data", str(data)]) == 1
