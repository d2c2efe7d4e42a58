"""``beit tokenizer train | eval | encode | convert``: train a dVAE, judge any tokenizer, make pickles safe.

The run functions of the command table in :mod:`beit.cli`:

- ``beit tokenizer train [-c tokenizer_cifar10] data_dir=DIR train.max_steps=20000 ...``
- ``beit tokenizer eval dalle encoder.pkl --decoder decoder.pkl --data DIR``: held-out MSE / PSNR,
  codebook perplexity and dead codes, plus a reconstruction grid PNG.
- ``beit tokenizer convert encoder.pkl decoder.pkl dalle.safetensors``: read the official pickles
  once through the restricted unpickler and keep a safetensors copy.
- ``beit tokenizer encode dvae tok.safetensors --data DIR --out ids.safetensors``: token ids of every
  image of a folder (center crop), for users who cache targets; paths in ``ids.json`` beside it.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def train(args: argparse.Namespace) -> int:
    """``beit tokenizer train``: a dVAE on a folder of images (normalised ``args`` from :mod:`beit.cli`)."""
    from ...engine import distributed as D
    from ...engine.config import load_run_config
    from ...engine.logging import print_summary
    from .config import TokenizerTrainConfig
    from .train import train_tokenizer

    cfg = load_run_config(TokenizerTrainConfig, args.config, args.overrides, ("data_dir", "val_dir"))
    report = train_tokenizer(cfg)
    if D.is_main():  # under torchrun: one report (each rank's was printed)
        print_summary(report)
    return 0


RECON_GRID_NAME = "tokenizer_recon.png"
GRID_SUFFIXES = (".png", ".jpg", ".jpeg")


def _out_file(out: str, name: str, suffixes: tuple[str, ...], file_kind: str, what: str) -> Path:
    """The file a command's ``--out OUT`` names, decided before any work: ``OUT`` itself when it ends in one of
    ``suffixes``; ``OUT/name`` when ``OUT`` is a folder (it is one, ends in ``/``, or has no suffix). ``file_kind``
    and ``what`` say in the refusal what the file holds (``"a .png or .jpg file"``, ``"the grid is"``).

    Raises:
        ValueError: ``OUT`` is a link that points nowhere, or has another suffix; its folder cannot be written in
            (:func:`beit.data.datasets.check_writable_folder`: a file in the way, a dangling link, ``/proc``).
    """
    from ...data.datasets import check_writable_folder, names_folder

    path = Path(out)
    if os.path.islink(out) and not path.exists():  # it failed after the whole work with "File exists"
        raise ValueError(f"--out {out}: a link to {os.readlink(out)}, which does not exist")
    if names_folder(out) or (not path.suffix and not path.is_file()):
        path = path / name
    elif path.suffix.lower() not in suffixes:
        problem = f"unsupported extension {path.suffix!r}" if path.suffix else "a file without an extension"
        raise ValueError(f"--out {out}: {problem}; give {file_kind}, or a folder ({what} then {name} inside it; "
                         "a new folder with a dot in its name: end it with /)")
    check_writable_folder(path.parent, f"--out {out}")
    return path


def recon_grid_path(out: str, data: str | None = None) -> Path:
    """The file ``beit tokenizer eval --out OUT`` writes its reconstruction grid to, decided before any work.

    ``OUT`` is a folder (it is one, ends in ``/``, or has no suffix: ``results/``, ``recon``) -> the grid is
    ``OUT/tokenizer_recon.png`` (the folder is made when the grid is written); else a file ending in .png,
    .jpg or .jpeg.

    Raises:
        ValueError: any other suffix (``grid.pdf``, ``grid.txt``), naming ``OUT`` and the accepted ones; a folder
            path whose place is taken by a file; a folder that cannot be written in (``/proc``, a read-only one;
            :func:`beit.data.datasets.check_writable_folder`), or a read-only grid file; a grid inside the ``data``
            folder (it would replace one of the images, or be scored with them the next time).
    """
    from ...data.datasets import lies_within

    path = _out_file(out, RECON_GRID_NAME, GRID_SUFFIXES, f"a {' or '.join(GRID_SUFFIXES)} file", "the grid is")
    if path.is_file() and not os.access(path, os.W_OK):
        raise ValueError(f"--out {out}: {path} is read-only (the grid would replace it): make it writable or give "
                         "another --out")
    if data is not None and lies_within(path, data):
        raise ValueError(f"--out {out}: the grid ({path}) would be written inside --data {data}, among the images "
                         "it evaluates (replacing one, or scored with them next time): give --out a place outside it")
    return path


def _kind_path(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", help="a kind registered in beit.tokenizers.TOKENIZERS: dalle | dvae")
    p.add_argument("path", help="dalle: encoder.pkl or our safetensors; dvae: safetensors")
    p.add_argument("--data", required=True, help="folder of images (any depth)")
    p.add_argument("--precision", default="fp32", help="dalle: fp32 | tf32 | bf16 | fp16; dvae: fp32")


def eval_args(p: argparse.ArgumentParser) -> None:
    _kind_path(p)
    p.add_argument("--decoder", default=None, help="dalle: decoder.pkl (needed unless inside the safetensors)")
    p.add_argument("--img-size", type=int, default=112, help="center crop size (default 112, BEiT's)")
    p.add_argument("--max-images", type=int, default=2048,
                   help="evaluate the first N files, N >= 1 (unreadable ones are skipped and named, never replaced)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", default=RECON_GRID_NAME,
                   help=f"reconstruction grid: a .png or .jpg file, or a folder to write {RECON_GRID_NAME} in "
                        "(an existing one, or a path ending in / or without a suffix)")


def encode_args(p: argparse.ArgumentParser) -> None:
    _kind_path(p)
    p.add_argument("--img-size", type=int, default=112, help="resize + center crop size (default 112, BEiT's)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--out", default="token_ids.safetensors",
                   help="ids [N, h, w]: a .safetensors file (+ the paths in the .json beside it), or a folder")


def convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("encoder", help="encoder.pkl")
    p.add_argument("decoder", nargs="?", default=None, help="decoder.pkl (optional)")
    p.add_argument("out", help="output .safetensors")


def convert(args: argparse.Namespace) -> int:
    """``beit tokenizer convert encoder.pkl [decoder.pkl] out.safetensors`` through the restricted unpickler."""
    from ...tokenizers.dalle import DalleTokenizer

    tok = DalleTokenizer.load(args.encoder, args.decoder)
    tok.save(args.out)
    dec = "with decoder" if tok.decoder is not None else "encoder only"
    print(f"{args.encoder} -> {args.out} ({dec}; vocab {tok.vocab_size}, {tok.downsample}x downsampling)")
    return 0


def _refuse_training_checkpoint(path: str) -> None:
    """A beit training checkpoint (a torch zip file) given where the tokenizer's weights belong: one line naming
    its task and what to pass instead (it failed as "not a safetensors file (header too large)").

    Raises:
        TaskMismatchError (a ValueError): another task's checkpoint, or the tokenizer's own training checkpoint.
    """
    from pathlib import Path

    from ...engine.checkpoint import load_checkpoint
    from ...engine.rundir import TaskMismatchError
    from ..backbone_config import check_task_of, stored_task

    p = Path(path)
    try:
        with open(p, "rb") as f:
            if f.read(2) != b"PK":  # safetensors, or the official pickles: the loader's own checks
                return
        state = load_checkpoint(p)
    except (OSError, ValueError):
        return  # not a readable training checkpoint: the loader says what it is not
    found = stored_task(state)
    if found == "dVAE tokenizer":
        raise TaskMismatchError(f"{p} is the tokenizer's training checkpoint: pass the weights its training wrote "
                                f"beside it, {p.parent / 'dvae.safetensors'}")
    check_task_of(state, "dVAE tokenizer", p)


def _tokenizer_and_images(args: argparse.Namespace):  # noqa: ANN202
    import torch

    from ...data import ImageFolderDataset
    from ...tokenizers import load_tokenizer
    from .data import eval_transform

    device = "cuda" if torch.cuda.is_available() else "cpu"
    # before the tokenizer is read: --img-size 0 ended as "none of the 8 images could be read", --batch-size 0 and
    # --num-workers -1 as torch's DataLoader messages naming no option
    for flag, value, low in (("--img-size", args.img_size, 1), ("--batch-size", args.batch_size, 1),
                             ("--num-workers", getattr(args, "num_workers", 0), 0)):
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    _refuse_training_checkpoint(args.path)
    tok = load_tokenizer(args.kind, args.path, decoder=getattr(args, "decoder", None),
                         precision=args.precision)
    tok = tok.to(device).eval()
    s = args.img_size
    if s % tok.downsample:  # one token per downsample x downsample pixels
        ok = [n for n in (s // tok.downsample * tok.downsample, (s // tok.downsample + 1) * tok.downsample) if n]
        raise ValueError(f"--img-size {s} is not divisible by the tokenizer's downsampling ({tok.downsample}): use "
                         f"{' or '.join(map(str, ok))}")
    ds = ImageFolderDataset(args.data, eval_transform(s))
    return tok, ds, device


def evaluate(args: argparse.Namespace) -> int:
    """``beit tokenizer eval KIND PATH --data DIR``: held-out MSE / PSNR, codebook usage, a recon grid PNG.

    The first ``--max-images`` files of the folder scan are each read once; a file among them that cannot be
    read (or transformed) is skipped: left out of the metrics and the grid (never replaced by a neighbour, which
    would count that one twice), counted once in ``num_skipped``, named (with its reason) in one warning and
    listed in ``skipped``. ``num_images`` is the number of images the metrics are over. Entries the folder scan
    itself could not read (a dangling link, a folder without permission) are not files of the set: the scan's
    own warning names them, and the JSON lists them under ``unreadable_entries``, outside ``num_skipped``.

    ``--out`` (see :func:`recon_grid_path`) and ``--max-images`` are checked before the tokenizer is loaded.

    Raises:
        ValueError: ``--max-images`` < 1; an ``--out`` that is neither a .png / .jpg file nor a folder, or that
            cannot be written (:func:`recon_grid_path`); a folder given as the tokenizer file (naming the files
            inside it that fit); none of the files could be read.
    """
    import logging

    import torch

    from ..._text import first_few
    from ...data.datasets import FileImages, collate_files, spread_indices
    from .train import round_trip_metrics, write_recon_grid

    if args.max_images < 1:
        raise ValueError(f"--max-images must be >= 1 (the number of files to evaluate), got {args.max_images}")
    out = recon_grid_path(args.out, args.data)
    tok, ds, _ = _tokenizer_and_images(args)
    files = FileImages(ds.paths[:args.max_images], ds.transform)
    loader = torch.utils.data.DataLoader(files, batch_size=args.batch_size, num_workers=0, collate_fn=collate_files)
    done: list[int] = []
    failed: dict[int, str] = {}
    metrics: dict = round_trip_metrics(tok, _readable_batches(loader, done, failed))
    skipped = [(files.paths[i], failed[i]) for i in sorted(failed)]
    if skipped:
        logging.getLogger(__name__).warning(
            "skipped %d unreadable file%s (left out of the metrics, not replaced): %s", len(skipped),
            "" if len(skipped) == 1 else "s", first_few([f"{p} ({why})" for p, why in skipped], 5))
    if not done:
        raise ValueError(f"none of the {len(files)} images under {args.data} could be read")
    metrics = {"num_images": len(done), "num_skipped": len(skipped), **metrics}
    if skipped:
        metrics["skipped"] = first_few([p for p, _ in skipped], 5)
    unlisted = getattr(ds, "unreadable_entries", [])
    if unlisted:  # named by the folder scan's warning already: listed here, not warned about again
        metrics["unreadable_entries"] = first_few([p for p, _ in unlisted], 5)
    if getattr(tok, "decoder", None) is not None:
        grid = [files[done[j]]["image"] for j in spread_indices(len(done), 8)]
        metrics["recon_grid"] = write_recon_grid(tok, grid, out, n=len(grid))
    print(json.dumps(metrics, indent=2, ensure_ascii=False))  # paths as they are, not \u00fc
    return 0


def _readable_batches(loader, done: list[int], failed: dict[int, str]):  # noqa: ANN001, ANN202
    """The images of each batch of ``loader`` (over :class:`beit.data.datasets.FileImages`, ``collate_files``) that
    were read, as ``[B, 3, H, W]`` tensors; their file indices are appended to ``done``, the others go into
    ``failed`` (index -> reason) and are never replaced by a neighbour."""
    for batch in loader:
        failed.update(batch["failed"])
        if batch["image"] is not None:
            done.extend(batch["index"].tolist())
            yield batch["image"]


IDS_NAME = "token_ids.safetensors"


def encode_out_path(out: str) -> Path:
    """The file ``beit tokenizer encode --out OUT`` writes the ids to (the paths go in the ``.json`` beside it),
    decided before any work: ``OUT`` ending in ``.safetensors``, or a folder (it is one, ends in ``/``, or has no
    suffix) -> ``OUT/token_ids.safetensors``.

    Raises:
        ValueError: any other suffix (``ids.json`` would be overwritten by the paths file, ``ids.pt``), naming
            ``OUT``; a folder that cannot be written in, a dangling link or a file in the way
            (:func:`beit.data.datasets.check_writable_folder`).
    """
    path = _out_file(out, IDS_NAME, (".safetensors",),
                     "a .safetensors file for the ids (their paths go in the .json beside it)", "the ids are")
    for target in (path, path.with_suffix(".json")):  # both are written after the work: the pair stays together
        if target.is_dir():
            raise ValueError(f"--out {out}: {target} is a folder (the ids and their paths are written to "
                             f"{path.name} and {path.with_suffix('.json').name}): give another --out")
    return path


def encode(args: argparse.Namespace) -> int:
    """``beit tokenizer encode KIND PATH --data DIR --out ids.safetensors``; ``--out`` is checked (see
    :func:`encode_out_path`) before the tokenizer is loaded (it failed after encoding the whole folder)."""
    args.out = str(encode_out_path(args.out))
    tok, ds, device = _tokenizer_and_images(args)
    return _encode_folder(tok, ds, args, device)


def _encode_folder(tok, ds, args: argparse.Namespace, device: str) -> int:  # noqa: ANN001
    """Token ids of a whole folder in one safetensors file (uint16 when the vocabulary allows).

    Row ``i`` of ``ids`` is the file ``paths[i]`` of the ``.json`` next to it: each file is decoded once
    and its index travels with its image through the DataLoader, so a file that cannot be read or
    transformed is left out of both (never replaced by a neighbour), named in ``skipped`` with its
    reason and counted in ``num_skipped``.
    """
    import torch
    from safetensors.torch import save
    from tqdm import tqdm

    from ..._text import first_few
    from ...data.datasets import IMG_EXTENSIONS, FileImages, collate_files
    from ...engine.threads import loader_workers

    files = FileImages(ds.paths, ds.transform)
    loader = torch.utils.data.DataLoader(files, batch_size=args.batch_size, collate_fn=collate_files,
                                         num_workers=loader_workers(args.num_workers, "--num-workers"))
    indices: list[int] = []
    failed: dict[int, str] = {}
    chunks = [tok.encode(images.to(device)).cpu()
              for images in tqdm(_readable_batches(loader, indices, failed), desc="encoding", unit="batch")]
    done = [files.paths[i] for i in indices]
    skipped = {files.paths[i]: err for i, err in failed.items()}
    if not chunks:
        raise ValueError(f"none of the {len(files)} images under {args.data} could be read")
    ids = torch.cat(chunks)
    ids = ids.to(torch.uint16 if tok.vocab_size <= 65536 else torch.int32)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"vocab_size": str(tok.vocab_size), "img_size": str(args.img_size)}
    out.write_bytes(save({"ids": ids.contiguous()}, metadata=meta))  # umask mode (save_file: 0600)
    listing = [{"path": p, "reason": why} for p, why in getattr(ds, "unreadable_entries", [])
               if p.lower().endswith(IMG_EXTENSIONS)]
    listing += [{"path": p, "reason": skipped[p]} for p in sorted(skipped)]
    out.with_suffix(".json").write_text(json.dumps({"paths": done, "num_skipped": len(listing),
                                                    "skipped": listing}, indent=1))
    print(f"{len(done)} images -> {out} ids {tuple(ids.shape)} (vocab {tok.vocab_size}); "
          f"paths in {out.with_suffix('.json')}; {len(listing)} unreadable skipped"
          + (f": {first_few([x['path'] for x in listing], 5)}" if listing else ""))
    return 0
