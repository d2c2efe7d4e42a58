"""``beit tokenizer train | eval | convert``: train a dVAE, judge any tokenizer, make pickles safe.

- ``beit tokenizer train [-c run.yaml] data_dir=DIR train.max_steps=20000 ...``
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

from ..cli import command


def _args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)

    t = sub.add_parser("train", help="train a dVAE tokenizer on a folder of images")
    t.add_argument("--config", "-c", default=None, help="YAML config (fields of TokenizerTrainConfig)")
    t.add_argument("--resume", default=None, help="checkpoint to resume from, or 'auto' (output_dir/last.pt)")
    t.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides, e.g. data_dir=images/ model.vocab_size=8192 train.max_steps=20000",
    )

    e = sub.add_parser("eval", help="reconstruction error and codebook usage of a tokenizer on images")
    e.add_argument("kind", choices=["dalle", "dvae"])
    e.add_argument("path", help="dalle: encoder.pkl or our safetensors; dvae: safetensors")
    e.add_argument("--decoder", default=None, help="dalle: decoder.pkl (needed unless inside the safetensors)")
    e.add_argument("--data", required=True, help="folder of images (any depth)")
    e.add_argument("--img-size", type=int, default=112, help="center crop size (default 112, BEiT's)")
    e.add_argument("--max-images", type=int, default=2048)
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--precision", default="fp32", help="dalle: fp32 | tf32 | bf16 | fp16")
    e.add_argument("--out", default="tokenizer_recon.png", help="reconstruction grid PNG")

    n = sub.add_parser("encode", help="precompute the token ids of every image of a folder")
    n.add_argument("kind", choices=["dalle", "dvae"])
    n.add_argument("path", help="dalle: encoder.pkl or our safetensors; dvae: safetensors")
    n.add_argument("--data", required=True, help="folder of images (any depth)")
    n.add_argument("--img-size", type=int, default=112, help="resize + center crop size (default 112, BEiT's)")
    n.add_argument("--batch-size", type=int, default=64)
    n.add_argument("--num-workers", type=int, default=4)
    n.add_argument("--precision", default="fp32", help="dalle: fp32 | tf32 | bf16 | fp16")
    n.add_argument("--out", default="token_ids.safetensors", help="ids [N, h, w] (+ the paths in OUT.json)")

    c = sub.add_parser("convert", help="official DALL-E pickles -> one safetensors file (no pickle later)")
    c.add_argument("encoder", help="encoder.pkl")
    c.add_argument("decoder", nargs="?", default=None, help="decoder.pkl (optional)")
    c.add_argument("out", help="output .safetensors")


@command("tokenizer", "visual tokenizers: train a dVAE, evaluate or encode with one, convert DALL-E pickles")(_args)
def _run(args: argparse.Namespace) -> int:
    if args.tokenizer_command == "train":
        from ..engine.config import load_config
        from .train import TokenizerTrainConfig, train_tokenizer

        overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])
        report = train_tokenizer(load_config(TokenizerTrainConfig, args.config, overrides))
        for k, v in report.items():
            print(f"{k}: {v}")
        return 0

    if args.tokenizer_command == "convert":
        from .dalle import DalleTokenizer

        tok = DalleTokenizer.load(args.encoder, args.decoder)
        tok.save(args.out)
        dec = "with decoder" if tok.decoder is not None else "encoder only"
        print(f"{args.encoder} -> {args.out} ({dec}; vocab {tok.vocab_size}, {tok.downsample}x downsampling)")
        return 0

    import torch
    from torch.utils.data import Subset
    from torchvision import transforms as T

    from ..data import ImageFolderDataset
    from . import load_tokenizer
    from .train import evaluate_tokenizer, write_recon_grid

    device = "cuda" if torch.cuda.is_available() else "cpu"

    if args.kind == "dalle":
        tok = load_tokenizer("dalle", encoder=args.path, decoder=getattr(args, "decoder", None),
                             precision=args.precision)
    else:
        tok = load_tokenizer("dvae", args.path)
    tok = tok.to(device).eval()
    s = args.img_size
    ds = ImageFolderDataset(args.data, T.Compose([T.Resize(s), T.CenterCrop(s), T.ToTensor()]))
    if args.tokenizer_command == "encode":
        return _encode_folder(tok, ds, args, device)
    ds = Subset(ds, range(min(len(ds), args.max_images)))
    metrics: dict = evaluate_tokenizer(tok, ds, args.batch_size)
    if getattr(tok, "decoder", None) is not None:
        metrics["recon_grid"] = write_recon_grid(tok, ds, args.out)
    print(json.dumps(metrics, indent=2))
    return 0


def _encode_folder(tok, ds, args: argparse.Namespace, device: str) -> int:  # noqa: ANN001
    """Token ids of a whole folder in one safetensors file (uint16 when the vocabulary allows).

    Row ``i`` of ``ids`` is the file ``paths[i]`` of the ``.json`` next to it: each file is decoded once
    and its index travels with its image through the DataLoader, so a file that cannot be read or
    transformed is left out of both (never replaced by a neighbour), named in ``skipped`` with its
    reason and counted in ``num_skipped``.
    """
    from pathlib import Path

    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm

    from ..data.datasets import IMG_EXTENSIONS, FileImages, collate_files

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
    save_file({"ids": ids.contiguous()}, str(out), metadata={"vocab_size": str(tok.vocab_size),
                                                              "img_size": str(args.img_size)})
    listing = [{"path": p, "reason": why} for p, why in getattr(ds, "unreadable_entries", [])
               if p.lower().endswith(IMG_EXTENSIONS)]
    listing += [{"path": p, "reason": skipped[p]} for p in sorted(skipped)]
    out.with_suffix(".json").write_text(json.dumps({"paths": done, "num_skipped": len(listing),
                                                    "skipped": listing}, indent=1))
    print(f"{len(done)} images -> {out} ids {tuple(ids.shape)} (vocab {tok.vocab_size}); "
          f"paths in {out.with_suffix('.json')}; {len(listing)} unreadable skipped"
          + (f": {', '.join(x['path'] for x in listing[:5])}" if listing else ""))
    return 0
