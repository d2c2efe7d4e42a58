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
from pathlib import Path


def train(args: argparse.Namespace) -> int:
    """``beit tokenizer train``: a dVAE on a folder of images (normalised ``args`` from :mod:`beit.cli`)."""
    from ...engine.config import load_run_config
    from .config import TokenizerTrainConfig
    from .train import train_tokenizer

    cfg = load_run_config(TokenizerTrainConfig, args.config, args.overrides)
    report = train_tokenizer(cfg)
    for k, v in report.items():
        print(f"{k}: {v}")
    return 0


def _kind_path(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", help="a kind registered in beit.tokenizers.TOKENIZERS: dalle | dvae")
    p.add_argument("path", help="dalle: encoder.pkl or our safetensors; dvae: safetensors")
    p.add_argument("--data", required=True, help="folder of images (any depth)")
    p.add_argument("--precision", default="fp32", help="dalle: fp32 | tf32 | bf16 | fp16; dvae: fp32")


def eval_args(p: argparse.ArgumentParser) -> None:
    _kind_path(p)
    p.add_argument("--decoder", default=None, help="dalle: decoder.pkl (needed unless inside the safetensors)")
    p.add_argument("--img-size", type=int, default=112, help="center crop size (default 112, BEiT's)")
    p.add_argument("--max-images", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", default="tokenizer_recon.png", help="reconstruction grid PNG")


def encode_args(p: argparse.ArgumentParser) -> None:
    _kind_path(p)
    p.add_argument("--img-size", type=int, default=112, help="resize + center crop size (default 112, BEiT's)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--out", default="token_ids.safetensors", help="ids [N, h, w] (+ the paths in OUT.json)")


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
    from torchvision import transforms as T

    from ...data import ImageFolderDataset
    from ...tokenizers import load_tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    _refuse_training_checkpoint(args.path)
    tok = load_tokenizer(args.kind, args.path, decoder=getattr(args, "decoder", None),
                         precision=args.precision)
    tok = tok.to(device).eval()
    s = args.img_size
    ds = ImageFolderDataset(args.data, T.Compose([T.Resize(s), T.CenterCrop(s), T.ToTensor()]))
    return tok, ds, device


def evaluate(args: argparse.Namespace) -> int:
    """``beit tokenizer eval KIND PATH --data DIR``: held-out MSE / PSNR, codebook usage, a recon grid PNG."""
    from torch.utils.data import Subset

    from .train import evaluate_tokenizer, write_recon_grid

    tok, ds, _ = _tokenizer_and_images(args)
    ds = Subset(ds, range(min(len(ds), args.max_images)))
    metrics: dict = evaluate_tokenizer(tok, ds, args.batch_size)
    if getattr(tok, "decoder", None) is not None:
        metrics["recon_grid"] = write_recon_grid(tok, ds, args.out)
    print(json.dumps(metrics, indent=2))
    return 0


def encode(args: argparse.Namespace) -> int:
    """``beit tokenizer encode KIND PATH --data DIR --out ids.safetensors``."""
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

    from ...data.datasets import IMG_EXTENSIONS, FileImages, collate_files

    files = FileImages(ds.paths, ds.transform)
    loader = torch.utils.data.DataLoader(files, batch_size=args.batch_size, num_workers=args.num_workers,
                                         collate_fn=collate_files)
    chunks, done, skipped = [], [], {}
    for batch in tqdm(loader, desc="encoding", unit="batch"):
        skipped.update({files.paths[i]: err for i, err in batch["failed"]})
        if batch["image"] is None:
            continue
        chunks.append(tok.encode(batch["image"].to(device)).cpu())
        done += [files.paths[i] for i in batch["index"].tolist()]
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
          + (f": {', '.join(x['path'] for x in listing[:5])}" if listing else ""))
    return 0
