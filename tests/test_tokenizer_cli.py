"""`beit tokenizer encode` caches the token ids of a folder, in file order, matching `tok.encode`."""

from __future__ import annotations

import json
import os
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


def _tiny_dvae_and_images(tmp_path: Path, n: int = 3) -> tuple[Path, Path]:
    """A small dVAE saved as ``tok.safetensors`` and a folder of ``n`` random PNGs."""
    data = tmp_path / "imgs"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(data / f"{i}.png")
    torch.manual_seed(0)
    tok = tmp_path / "tok.safetensors"
    DiscreteVAE(vocab_size=32, hidden=8, downsample=4, num_res_blocks=0, codebook_dim=8).eval().save(tok)
    return tok, data


def _report(out: str) -> dict:
    return json.JSONDecoder().raw_decode(out[out.index("{\n"):])[0]


def test_eval_out_may_be_a_folder_and_a_bad_extension_is_refused_before_the_work(tmp_path, capsys,
                                                                                  monkeypatch) -> None:
    """`--out results/` or `--out recon` ran the whole evaluation, then failed with PIL's `unknown file extension:`
    (no path, no metrics). A folder (existing, ending in /, or without a suffix) now gets tokenizer_recon.png
    inside it; another extension is refused before the tokenizer is even loaded, naming the value and the
    accepted ones."""
    from beit.tasks.tokenizer import cli as tok_cli

    tok, data = _tiny_dvae_and_images(tmp_path)
    base = ["tokenizer", "eval", "dvae", str(tok), "--data", str(data), "--img-size", "32"]
    existing = tmp_path / "existing"
    existing.mkdir()
    for out, grid in ((existing, existing / "tokenizer_recon.png"),
                      (f"{tmp_path / 'results'}/", tmp_path / "results" / "tokenizer_recon.png"),
                      (tmp_path / "recon", tmp_path / "recon" / "tokenizer_recon.png"),
                      (tmp_path / "g.jpg", tmp_path / "g.jpg")):
        assert main([*base, "--out", str(out)]) == 0, capsys.readouterr().err
        assert _report(capsys.readouterr().out)["recon_grid"] == str(grid) and grid.is_file()

    def no_work(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the tokenizer was loaded before --out was checked")

    monkeypatch.setattr(tok_cli, "_tokenizer_and_images", no_work)
    bad = tmp_path / "grid.pdf"
    assert main([*base, "--out", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"--out {bad}: unsupported extension '.pdf'" in err and ".png or .jpg" in err, err
    in_the_way = tmp_path / "afile"
    in_the_way.write_text("x")
    assert main([*base, "--out", str(in_the_way / "g.png")]) == 1
    assert f"{in_the_way} is a file, not a folder" in capsys.readouterr().err
    first = sorted(data.iterdir())[0]  # the grid over an input image, or among them: refused, the data untouched
    before = first.read_bytes()
    for inside in (first, data, data / "sub" / "g.png"):
        assert main([*base, "--out", str(inside)]) == 1
        assert f"would be written inside --data {data}" in capsys.readouterr().err
    assert first.read_bytes() == before and not (data / "tokenizer_recon.png").exists()
    dangling = tmp_path / "dang"
    dangling.symlink_to(tmp_path / "nowhere")
    assert main([*base, "--out", str(dangling)]) == 1  # was: the whole evaluation, then "File exists"
    assert "which does not exist" in capsys.readouterr().err


def _writable_as_me(folder: Path) -> bool:
    """Whether this process can still create a file in ``folder`` (root can in a chmod 0o500 folder)."""
    try:
        (folder / ".probe").touch()
    except OSError:
        return False
    (folder / ".probe").unlink()
    return True


def test_an_out_that_cannot_be_written_is_refused_before_the_work_naming_it_and_why(tmp_path, capsys,
                                                                                     monkeypatch) -> None:
    """`beit tokenizer eval ... --out /proc/x.png` (or into a read-only folder) ran the whole evaluation, then failed
    in the grid's save (`encode --out` likewise, after encoding the whole folder). Now one line before the tokenizer
    is loaded: the --out given, the folder that cannot be written in, and the system's reason."""
    from beit.tasks.tokenizer import cli as tok_cli

    tok, data = _tiny_dvae_and_images(tmp_path)

    def no_work(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the tokenizer was loaded before --out was checked")

    monkeypatch.setattr(tok_cli, "_tokenizer_and_images", no_work)
    base = ["dvae", str(tok), "--data", str(data), "--img-size", "32"]
    if Path("/proc").is_dir():  # refused even as root: /proc takes no new files
        for cmd, out, made in (("eval", "/proc/x.png", ""), ("eval", "/proc/sub/", ", where /proc/sub would be made"),
                               ("encode", "/proc/ids.safetensors", "")):
            assert main(["tokenizer", cmd, *base, "--out", out]) == 1
            assert capsys.readouterr().err.strip() == (
                f"beit tokenizer {cmd}: error: --out {out}: cannot write in /proc{made} (it takes no new files: No "
                "such file or directory): give a folder you can write to")
    in_the_way = tmp_path / "afile"
    in_the_way.write_text("x")
    for cmd, name in (("eval", "g.png"), ("encode", "ids.safetensors")):  # a file in the way: encode refuses too
        assert main(["tokenizer", cmd, *base, "--out", str(in_the_way / "sub" / name)]) == 1
        assert capsys.readouterr().err.strip() == (
            f"beit tokenizer {cmd}: error: --out {in_the_way / 'sub' / name}: {in_the_way} is a file, not a folder")
    nowhere = tmp_path / "gone"
    nowhere.symlink_to(tmp_path / "no" / "such" / "dir")  # a dangling link as the folder: mkdir fails after the work
    for cmd, name in (("eval", "g.png"), ("encode", "ids.safetensors")):
        assert main(["tokenizer", cmd, *base, "--out", str(nowhere / name)]) == 1
        assert capsys.readouterr().err.strip() == (
            f"beit tokenizer {cmd}: error: --out {nowhere / name}: {nowhere} is a link to "
            f"{tmp_path / 'no' / 'such' / 'dir'}, which does not exist")
    assert not list(tmp_path.glob(".beit-write-check-*"))


def test_an_out_in_a_read_only_folder_is_refused_before_the_work(tmp_path, capsys, monkeypatch) -> None:
    """The same in a chmod 0o500 folder (or a folder below it that would be made), and over a read-only grid file;
    the probe file leaves nothing behind. Skipped as root, who may write there."""
    from beit.tasks.tokenizer import cli as tok_cli

    tok, data = _tiny_dvae_and_images(tmp_path)

    def no_work(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the tokenizer was loaded before --out was checked")

    monkeypatch.setattr(tok_cli, "_tokenizer_and_images", no_work)
    base = ["dvae", str(tok), "--data", str(data), "--img-size", "32"]
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "old.png").write_bytes(b"x")
    locked.chmod(0o500)
    try:
        if _writable_as_me(locked):
            pytest.skip("running as root: a chmod 0o500 folder stays writable")
        for out, made in ((locked / "g.png", ""), (locked / "new" / "g.png", f", where {locked / 'new'} would be made")):
            assert main(["tokenizer", "eval", *base, "--out", str(out)]) == 1
            assert capsys.readouterr().err.strip() == (
                f"beit tokenizer eval: error: --out {out}: cannot write in {locked}{made} (Permission denied): give "
                "a folder you can write to")
        assert [p.name for p in locked.iterdir()] == ["old.png"]  # the probe left nothing behind
    finally:
        locked.chmod(0o700)
    ro = tmp_path / "ro.png"
    ro.write_bytes(b"x")
    ro.chmod(0o400)
    assert not os.access(ro, os.W_OK)
    assert main(["tokenizer", "eval", *base, "--out", str(ro)]) == 1
    assert capsys.readouterr().err.strip() == (f"beit tokenizer eval: error: --out {ro}: {ro} is read-only (the grid "
                                               "would replace it): make it writable or give another --out")
    assert not list(tmp_path.glob(".beit-write-check-*"))


def test_eval_names_a_dangling_link_once_and_counts_only_the_files_evaluated(tmp_path, capsys,
                                                                             beit_warnings) -> None:
    """A dangling link was named twice (the folder scan's warning, then eval's "skipped N unreadable files") and
    counted in num_skipped even with --max-images 2, when it is not among the first 2 files. Now the scan's
    warning names it, the JSON lists it under unreadable_entries, and num_skipped counts only evaluated files."""
    tok, data = _tiny_dvae_and_images(tmp_path, n=3)
    (data / "0_dangling.png").symlink_to(tmp_path / "nowhere.png")
    (data / "9_broken.png").write_bytes(b"not an image")  # the last file: evaluated only without --max-images
    base = ["tokenizer", "eval", "dvae", str(tok), "--data", str(data), "--img-size", "32",
            "--out", str(tmp_path / "g.png")]
    assert main([*base, "--max-images", "2"]) == 0
    report = _report(capsys.readouterr().out)
    assert report["num_images"] == 2 and report["num_skipped"] == 0 and "skipped" not in report, report
    assert str(data / "0_dangling.png") in report["unreadable_entries"]
    said = [r.getMessage() for r in beit_warnings]
    assert sum(m.count("0_dangling.png") for m in said) == 1 and len(said) == 1, said  # the scan's warning
    beit_warnings.clear()

    assert main(base) == 0
    report = _report(capsys.readouterr().out)
    assert report["num_images"] == 3 and report["num_skipped"] == 1, report
    assert report["skipped"] == str(data / "9_broken.png")
    said = [r.getMessage() for r in beit_warnings]
    assert sum(m.count("0_dangling.png") for m in said) == 1, said
    assert len(said) == 2 and said[1].startswith(f"skipped 1 unreadable file (left out of the metrics, not "
                                                 f"replaced): {data / '9_broken.png'} ("), said


def test_eval_refuses_max_images_below_one(tmp_path, capsys) -> None:
    """`--max-images 0` said "none of the 0 images under X could be read"; now refused up front, naming the option."""
    tok, data = _tiny_dvae_and_images(tmp_path, n=1)
    for n in ("0", "-3"):
        assert main(["tokenizer", "eval", "dvae", str(tok), "--data", str(data), "--max-images", n]) == 1
        assert f"error: --max-images must be >= 1 (the number of files to evaluate), got {n}" in \
            capsys.readouterr().err


def test_eval_and_encode_name_a_bad_img_size_batch_size_or_worker_count(tmp_path, capsys, monkeypatch) -> None:
    """`--img-size 0` said "none of the 1 images under X could be read" (the images were fine); `--img-size 30` for a
    tokenizer of 4x downsampling, `--batch-size 0` and `--num-workers -1` were torch's messages naming no option; and
    encode's default 4 workers on a 2-core machine printed torch's "suggested max number of worker" warning twice."""
    import warnings

    import beit.engine.threads as threads

    tok, data = _tiny_dvae_and_images(tmp_path, n=1)
    cases = [(["--img-size", "0"], "--img-size must be >= 1, got 0"),
             (["--img-size", "30"], "--img-size 30 is not divisible by the tokenizer's downsampling (4): use 28 or 32"),
             (["--img-size", "2"], "--img-size 2 is not divisible by the tokenizer's downsampling (4): use 4"),
             (["--batch-size", "0"], "--batch-size must be >= 1, got 0")]
    for command in ("eval", "encode"):
        for extra, message in cases + ([(["--num-workers", "-1"], "--num-workers must be >= 0, got -1")]
                                       if command == "encode" else []):
            out = ["--out", str(tmp_path / "o" / "x.png" if command == "eval" else tmp_path / "o" / "ids.safetensors")]
            assert main(["tokenizer", command, "dvae", str(tok), "--data", str(data), *extra, *out]) == 1, extra
            assert capsys.readouterr().err.strip().endswith(f"error: {message}"), extra
    monkeypatch.setattr(threads, "usable_cores", lambda: 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's worker warning would fail the command
        assert main(["tokenizer", "encode", "dvae", str(tok), "--data", str(data), "--img-size", "32",
                     "--out", str(tmp_path / "ids.safetensors")]) == 0
    assert load_file(tmp_path / "ids.safetensors")["ids"].shape == (1, 8, 8)


def test_a_folder_given_as_the_tokenizer_names_the_files_inside_it(tmp_path, capsys) -> None:
    """`beit tokenizer eval dvae runs/tok` (the training run's folder) said `dVAE file not found: runs/tok`; now it
    says it is a folder and names the file inside it to pass (the same through load_tokenizer, as beit pretrain)."""
    from beit.tokenizers import load_tokenizer

    tok, data = _tiny_dvae_and_images(tmp_path, n=1)
    run = tmp_path / "runs" / "tok"
    run.mkdir(parents=True)
    (run / "dvae.safetensors").write_bytes(tok.read_bytes())
    (run / "other.safetensors").write_bytes(tok.read_bytes())
    (run / "last.pt").write_bytes(b"PK")
    assert main(["tokenizer", "eval", "dvae", str(run), "--data", str(data), "--out", str(tmp_path / "g.png")]) == 1
    assert capsys.readouterr().err.strip() == (f"beit tokenizer eval: error: dvae tokenizer path {run} is a folder, "
                                               f"not a file: give the file inside it, {run / 'dvae.safetensors'}")
    (run / "dvae.safetensors").unlink()
    with pytest.raises(ValueError, match=f"give the file inside it, {run / 'other.safetensors'}$"):
        load_tokenizer("dvae", run)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="is a folder, not a file, and it holds no .safetensors file: give a "
                                         "safetensors file written by"):
        load_tokenizer("dvae", empty)
    with pytest.raises(ValueError, match=r"dalle tokenizer path .* holds no \.pkl or \.safetensors file"):
        load_tokenizer("dalle", empty)


def test_encode_out_names_a_safetensors_file_or_a_folder(tmp_path, capsys, monkeypatch) -> None:
    """`encode --out x.json` wrote the ids, then the paths file over them (`x.json` both times): the ids were lost
    without a word. Now --out is a .safetensors file or a folder (existing, ending in /, or without a suffix:
    token_ids.safetensors inside), decided before the tokenizer is loaded."""
    from beit.tasks.tokenizer import cli as tok_cli

    assert tok_cli.encode_out_path(str(tmp_path)) == tmp_path / "token_ids.safetensors"
    assert tok_cli.encode_out_path(str(tmp_path / "new") + "/") == tmp_path / "new" / "token_ids.safetensors"
    assert tok_cli.encode_out_path(str(tmp_path / "ids")) == tmp_path / "ids" / "token_ids.safetensors"
    assert tok_cli.encode_out_path(str(tmp_path / "a.safetensors")) == tmp_path / "a.safetensors"
    tok, data = _tiny_dvae_and_images(tmp_path)
    base = ["tokenizer", "encode", "dvae", str(tok), "--data", str(data), "--img-size", "32", "--num-workers", "0"]
    calls = []
    real = tok_cli._tokenizer_and_images
    monkeypatch.setattr(tok_cli, "_tokenizer_and_images", lambda args: calls.append(args) or real(args))
    for bad in ("x.json", "ids.pt"):
        assert main([*base, "--out", str(tmp_path / bad)]) == 1
        assert capsys.readouterr().err.strip() == (
            f"beit tokenizer encode: error: --out {tmp_path / bad}: unsupported extension {Path(bad).suffix!r}; give "
            "a .safetensors file for the ids (their paths go in the .json beside it), or a folder (the ids are then "
            "token_ids.safetensors inside it; a new folder with a dot in its name: end it with /)")
    link = tmp_path / "gone.safetensors"
    link.symlink_to(tmp_path / "no" / "such.safetensors")  # a dangling link as the ids file
    assert main([*base, "--out", str(link)]) == 1
    assert capsys.readouterr().err.strip() == (f"beit tokenizer encode: error: --out {link}: a link to "
                                               f"{tmp_path / 'no' / 'such.safetensors'}, which does not exist")
    (tmp_path / "pair").mkdir()
    (tmp_path / "pair" / "ids.json").mkdir()  # the paths file's place taken by a folder: the ids would lose it
    assert main([*base, "--out", str(tmp_path / "pair" / "ids.safetensors")]) == 1
    assert "pair/ids.json is a folder" in capsys.readouterr().err
    assert not calls  # refused before the tokenizer was loaded
    out = tmp_path / "cache"
    out.mkdir()
    assert main([*base, "--out", str(out)]) == 0  # an existing folder (it failed after the work: IsADirectoryError)
    ids = load_file(str(out / "token_ids.safetensors"))["ids"]
    paths = json.loads((out / "token_ids.json").read_text())["paths"]
    assert ids.shape[0] == len(paths) > 0
