"""``beit tokenizer train | eval | convert``: train a dVAE, judge any tokenizer, make pickles safe.

- ``beit tokenizer train [-c run.yaml] data_dir=DIR train.max_steps=20000 ...``
- ``beit tokenizer eval dalle encoder.pkl --decoder decoder.pkl --data DIR``: held-out MSE / PSNR,
  codebook perplexity and dead codes, plus a reconstruction grid PNG.
- ``beit tokenizer convert encoder.pkl decoder.pkl dalle.safetensors``: read the official pickles
  once through the restricted unpickler and keep a safetensors copy.
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

    c = sub.add_parser("convert", help="official DALL-E pickles -> one safetensors file (no pickle later)")
    c.add_argument("encoder", help="encoder.pkl")
    c.add_argument("decoder", nargs="?", default=None, help="decoder.pkl (optional)")
    c.add_argument("out", help="output .safetensors")


@command("tokenizer", "visual tokenizers: train a dVAE, evaluate one, convert DALL-E pickles")(_args)
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
        tok = load_tokenizer("dalle", encoder=args.path, decoder=args.decoder, precision=args.precision)
    else:
        tok = load_tokenizer("dvae", args.path)
    tok = tok.to(device).eval()
    s = args.img_size
    ds = ImageFolderDataset(args.data, T.Compose([T.Resize(s), T.CenterCrop(s), T.ToTensor()]))
    ds = Subset(ds, range(min(len(ds), args.max_images)))
    metrics: dict = evaluate_tokenizer(tok, ds, args.batch_size)
    if getattr(tok, "decoder", None) is not None:
        metrics["recon_grid"] = write_recon_grid(tok, ds, args.out)
    print(json.dumps(metrics, indent=2))
    return 0
