"""The DALL-E dVAE (Ramesh et al. 2021) as BEiT's frozen image tokenizer.

Same layers, layer names, residual gain and pixel mapping as OpenAI's ``dall_e`` package, so the
official ``encoder.pkl`` / ``decoder.pkl`` load into it and give the same token ids. Differences,
all for speed with unchanged fp32 numerics: plain ``nn.Conv2d`` (parameters ``weight``/``bias``
instead of ``w``/``b``), no dtype checks inside ``forward`` (so ``torch.compile``, ``channels_last``
and autocast work), and the decoder's one-hot input convolution done as an embedding lookup when
decoding ids. ``dall_e`` itself is never imported: see :mod:`beit.tokenizers.safe_pickle`.

Encoder: 7x7 conv -> ``group_count`` groups of ``n_blk_per_group`` residual blocks with widths
``n_hid * (1, 2, 4, 8)`` and a 2x max-pool after every group but the last -> ReLU, 1x1 conv to
``vocab_size`` logits. 112x112 -> 14x14 tokens with the default 4 groups.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import zipfile
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save
from torch import nn

from .._text import first_few
from .base import (
    LOGIT_LAPLACE_EPS,
    Tokenizer,
    TokenizerCheckpointError,
    check_ids,
    check_images,
    map_pixels,
    unmap_pixels,
)
from .safe_pickle import PickledObject, UnsafeCheckpointError, flatten_module_state, safe_load

FORMAT = "beit.tokenizer.dalle"
Precision = Literal["fp32", "tf32", "bf16", "fp16"]
_BODY_DTYPES = {"fp32": None, "tf32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class DalleEncoderConfig:
    group_count: int = 4
    n_hid: int = 256
    n_blk_per_group: int = 2
    input_channels: int = 3
    vocab_size: int = 8192

    @property
    def downsample(self) -> int:
        return 2 ** (self.group_count - 1)


@dataclass(frozen=True)
class DalleDecoderConfig:
    group_count: int = 4
    n_init: int = 128
    n_hid: int = 256
    n_blk_per_group: int = 2
    output_channels: int = 3
    vocab_size: int = 8192

    @property
    def upsample(self) -> int:
        return 2 ** (self.group_count - 1)


def _conv(n_in: int, n_out: int, kw: int) -> nn.Conv2d:
    """DALL-E's conv: 'same' padding, N(0, 1/fan_in) weights, zero bias."""
    conv = nn.Conv2d(n_in, n_out, kw, padding=(kw - 1) // 2)
    nn.init.normal_(conv.weight, std=1 / (n_in * kw**2) ** 0.5)
    nn.init.zeros_(conv.bias)
    return conv


class _ResBlock(nn.Module):
    """``id_path(x) + post_gain * res_path(x)`` with a bottleneck of ``n_out // 4`` channels.

    ``post_gain = 1 / n_layers**2`` (n_layers = total blocks) keeps the deep residual stack stable
    at init. Encoder and decoder blocks differ only in kernel sizes.
    """

    def __init__(self, n_in: int, n_out: int, n_layers: int, kernels: tuple[int, int, int, int]) -> None:
        super().__init__()
        if n_out % 4:
            raise ValueError(f"block width must be divisible by 4, got {n_out}")
        n_hid = n_out // 4
        self.post_gain = 1 / n_layers**2
        self.id_path = _conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = [n_in, n_hid, n_hid, n_hid, n_out]
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for i, kw in enumerate(kernels):
            layers[f"relu_{i + 1}"] = nn.ReLU()
            layers[f"conv_{i + 1}"] = _conv(widths[i], widths[i + 1], kw)
        self.res_path = nn.Sequential(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DalleEncoder(nn.Module):
    """Images mapped to [0.1, 0.9] ([B, C, H, W]) -> token logits [B, vocab_size, H/8, W/8]."""

    def __init__(self, config: DalleEncoderConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        cfg = DalleEncoderConfig(**{**asdict(config or DalleEncoderConfig()), **overrides})
        self.config = cfg
        n_layers = cfg.group_count * cfg.n_blk_per_group
        widths = [cfg.n_hid * 2**g for g in range(cfg.group_count)]
        blocks: OrderedDict[str, nn.Module] = OrderedDict(input=_conv(cfg.input_channels, cfg.n_hid, 7))
        n_in = cfg.n_hid
        for g, width in enumerate(widths):
            group: OrderedDict[str, nn.Module] = OrderedDict()
            for i in range(cfg.n_blk_per_group):
                group[f"block_{i + 1}"] = _ResBlock(n_in if i == 0 else width, width, n_layers, (3, 3, 3, 1))
            if g < cfg.group_count - 1:
                group["pool"] = nn.MaxPool2d(kernel_size=2)
            blocks[f"group_{g + 1}"] = nn.Sequential(group)
            n_in = width
        blocks["output"] = nn.Sequential(OrderedDict(relu=nn.ReLU(), conv=_conv(widths[-1], cfg.vocab_size, 1)))
        self.blocks = nn.Sequential(blocks)
        # None: run in whatever precision the caller set up. bf16/fp16: the body under autocast, the
        # head (1x1 conv to logits) in fp32, like dall_e's use_float16 on GPU. Set by DalleTokenizer;
        # inside forward so that a compiled encoder covers both parts.
        self.body_dtype: torch.dtype | None = None

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Everything but the output head (ReLU + 1x1 conv to logits)."""
        for name, module in self.blocks.named_children():
            if name != "output":
                x = module(x)
        return x

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks.output(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.body_dtype is None:
            return self.blocks(x)
        with torch.autocast(x.device.type, dtype=self.body_dtype):
            h = self.forward_features(x)
        with torch.autocast(x.device.type, enabled=False):
            return self.forward_head(h.float())


class DalleDecoder(nn.Module):
    """Token one-hots [B, vocab_size, h, w] -> logit-Laplace stats [B, 2*C, 8h, 8w].

    Channels ``[:C]`` are the location (pixels are ``unmap_pixels(sigmoid(.))``), ``[C:]`` the log
    scale, as in DALL-E.
    """

    def __init__(self, config: DalleDecoderConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        cfg = DalleDecoderConfig(**{**asdict(config or DalleDecoderConfig()), **overrides})
        self.config = cfg
        n_layers = cfg.group_count * cfg.n_blk_per_group
        widths = [cfg.n_hid * 2**g for g in reversed(range(cfg.group_count))]
        blocks: OrderedDict[str, nn.Module] = OrderedDict(input=_conv(cfg.vocab_size, cfg.n_init, 1))
        n_in = cfg.n_init
        for g, width in enumerate(widths):
            group: OrderedDict[str, nn.Module] = OrderedDict()
            for i in range(cfg.n_blk_per_group):
                group[f"block_{i + 1}"] = _ResBlock(n_in if i == 0 else width, width, n_layers, (1, 3, 3, 3))
            if g < cfg.group_count - 1:
                group["upsample"] = nn.Upsample(scale_factor=2, mode="nearest")
            blocks[f"group_{g + 1}"] = nn.Sequential(group)
            n_in = width
        blocks["output"] = nn.Sequential(
            OrderedDict(relu=nn.ReLU(), conv=_conv(widths[-1], 2 * cfg.output_channels, 1))
        )
        self.blocks = nn.Sequential(blocks)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.blocks(z)

    def forward_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Same as ``forward(one_hot(ids))`` without materializing [B, 8192, h, w] one-hots.

        A 1x1 conv of a one-hot picks one weight column, i.e. an embedding lookup.
        """
        conv = self.blocks.input
        table = conv.weight[:, :, 0, 0].t()  # [vocab, n_init]
        x = F.embedding(ids, table) + conv.bias  # [B, h, w, n_init]
        x = x.permute(0, 3, 1, 2)
        for name, module in self.blocks.named_children():
            if name != "input":
                x = module(x)
        return x


class DalleTokenizer(Tokenizer):
    """Frozen DALL-E dVAE: ``encode`` images in [0, 1] to ids, ``decode`` ids back to images.

    Args:
        encoder: the encoder (required: it defines the tokens).
        decoder: optional; only needed for ``decode``.
        precision: how ``encode`` computes, whatever the caller's autocast state:
            "fp32" (default): true fp32, TF32 off for the convs on CUDA; the same ids as on CPU.
            "tf32": fp32 with TF32 convs on CUDA (PyTorch's default for cuDNN).
            "bf16" / "fp16": the conv body under autocast, the output 1x1 conv and the argmax in
            fp32 (TF32 as the caller set it). "fp16" is what ``dall_e`` does on GPU (``use_float16``).
            Every mode but "fp32" flips a small fraction of ids (on an H100, random-weight encoder:
            tf32 and fp16 about 0.3%, bf16 about 2%).
        channels_last: run the encoder in channels_last memory format (faster convs on GPU).

    For ``torch.compile`` compile the module in place: ``tok.encoder.compile()``. Fastest on GPU:
    ``precision="fp16", channels_last=True`` and compiled (H100, 128 images of 112x112, default
    architecture: 22.6 ms; dall_e itself 46.6 ms; strict "fp32" 177 ms; "tf32" compiled 37.8 ms).
    """

    def __init__(
        self,
        encoder: DalleEncoder,
        decoder: DalleDecoder | None = None,
        *,
        precision: Precision = "fp32",
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if decoder is not None and decoder.vocab_size != encoder.vocab_size:
            raise ValueError(f"encoder vocab_size {encoder.vocab_size} != decoder vocab_size {decoder.vocab_size}")
        self.encoder = encoder
        self.decoder = decoder
        self.vocab_size = encoder.config.vocab_size
        self.downsample = encoder.config.downsample
        self.in_chans = encoder.config.input_channels
        self.precision: Precision = "fp32"
        self.set_precision(precision)
        self.channels_last = False
        self.set_channels_last(channels_last)
        self.requires_grad_(False)
        self.eval()

    def set_precision(self, precision: Precision) -> DalleTokenizer:
        """Choose the encoder numerics (see the class docstring)."""
        if precision not in _BODY_DTYPES:
            raise ValueError(f"precision must be one of {sorted(_BODY_DTYPES)}, got {precision!r}")
        self.precision = precision
        self.encoder.body_dtype = _BODY_DTYPES[precision]
        return self

    def _numerics(self, device_type: str) -> contextlib.ExitStack:
        """Autocast off (the encoder sets its own), and TF32 on/off for "fp32"/"tf32" on CUDA."""
        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast(device_type, enabled=False))
        if device_type == "cuda" and self.precision in ("fp32", "tf32"):
            cudnn = torch.backends.cudnn
            stack.enter_context(
                cudnn.flags(
                    enabled=cudnn.enabled,
                    benchmark=cudnn.benchmark,
                    deterministic=cudnn.deterministic,
                    allow_tf32=self.precision == "tf32",
                )
            )
        return stack

    def set_channels_last(self, enabled: bool = True) -> DalleTokenizer:
        """Switch the encoder/decoder weights (and inputs in ``encode``) to channels_last."""
        fmt = torch.channels_last if enabled else torch.contiguous_format
        self.encoder.to(memory_format=fmt)
        if self.decoder is not None:
            self.decoder.to(memory_format=fmt)
        self.channels_last = enabled
        return self

    def train(self, mode: bool = True) -> DalleTokenizer:
        """Frozen: stays in eval mode (it has no dropout/norm anyway, this just keeps it honest)."""
        return super().train(False)

    def encoder_logits(self, images: torch.Tensor, validate: bool = True) -> torch.Tensor:
        """Images in [0, 1] -> fp32 logits [B, vocab, H/8, W/8] (``map_pixels`` applied inside)."""
        if validate:
            images = check_images(images, self.in_chans, self.downsample)
        x = map_pixels(images.float())
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._numerics(x.device.type):
            return self.encoder(x)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, validate: bool = True) -> torch.Tensor:
        """Images float [B, 3, H, W] in [0, 1] -> LongTensor ids [B, H/8, W/8] (argmax of logits).

        ``validate=False`` skips the value-range check (one device sync) for hot loops.
        """
        return self.encoder_logits(images, validate=validate).argmax(dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``tok(images)`` = ``tok.encode(images)``."""
        return self.encode(images)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor, validate: bool = True) -> torch.Tensor:
        """LongTensor ids [B, h, w] -> images float [B, 3, 8h, 8w] in [0, 1] (needs a decoder)."""
        if self.decoder is None:
            raise RuntimeError("this DalleTokenizer has no decoder; load one with decoder=PATH to decode")
        if validate:
            ids = check_ids(ids, self.vocab_size)
        with self._numerics(ids.device.type):
            stats = self.decoder.forward_ids(ids).float()
        c = self.decoder.config.output_channels
        return unmap_pixels(torch.sigmoid(stats[:, :c]), LOGIT_LAPLACE_EPS)

    # ------------------------------------------------------------------ save / load
    def save(self, path: str | os.PathLike) -> None:
        """Write one safetensors file: ``encoder.*`` / ``decoder.*`` weights, configs in the metadata."""
        tensors = {f"encoder.{k}": v.detach().contiguous().cpu() for k, v in self.encoder.state_dict().items()}
        meta = {"format": FORMAT, "encoder_config": json.dumps(asdict(self.encoder.config))}
        if self.decoder is not None:
            tensors.update(
                {f"decoder.{k}": v.detach().contiguous().cpu() for k, v in self.decoder.state_dict().items()}
            )
            meta["decoder_config"] = json.dumps(asdict(self.decoder.config))
        Path(path).write_bytes(save(tensors, metadata=meta))  # umask mode (save_file: 0600)

    @classmethod
    def load(
        cls,
        encoder: str | os.PathLike,
        decoder: str | os.PathLike | None = None,
        *,
        device: str | torch.device = "cpu",
        **kwargs: Any,
    ) -> DalleTokenizer:
        """Official ``encoder.pkl`` (+ optional ``decoder.pkl``), or a safetensors file from ``save``."""
        enc, dec = load_dalle_modules(encoder, decoder)
        return cls(enc, dec, **kwargs).to(device)


# ---------------------------------------------------------------------- checkpoint reading
def _is_safetensors(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 1


def _rename_dalle_keys(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """dall_e's Conv2d names its parameters ``w``/``b``; ours are ``weight``/``bias``."""
    out = {}
    for k, v in tensors.items():
        if k.endswith(".w"):
            k = k[:-2] + ".weight"
        elif k.endswith(".b"):
            k = k[:-2] + ".bias"
        out[k] = v
    return out


def _count(tensors: dict[str, torch.Tensor], prefix: str) -> int:
    """Number of distinct ``{prefix}{i}`` children (``group_1``, ``group_2`` ...)."""
    found = set()
    for k in tensors:
        if k.startswith(prefix):
            head = k[len(prefix) :].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return len(found)


def _shape(tensors: dict[str, torch.Tensor], key: str, ndim: int, source: str) -> tuple[int, ...]:
    if key not in tensors:
        raise TokenizerCheckpointError(f"{source}: not a DALL-E dVAE checkpoint (no {key!r} tensor)")
    shape = tuple(tensors[key].shape)
    if len(shape) != ndim:
        raise TokenizerCheckpointError(f"{source}: {key!r} has shape {shape}, expected {ndim} dims")
    return shape


def _infer_role(tensors: dict[str, torch.Tensor]) -> str | None:
    """Encoder input conv is 7x7 from pixels; decoder input conv is 1x1 from one-hots."""
    w = tensors.get("blocks.input.weight")
    if w is None or w.dim() != 4:
        return None
    return "encoder" if w.shape[-1] == 7 else "decoder" if w.shape[-1] == 1 else None


def _infer_config(role: str, t: dict[str, torch.Tensor], source: str) -> Any:
    group_count = _count(t, "blocks.group_")
    n_blk = _count(t, "blocks.group_1.block_")
    if group_count < 1 or n_blk < 1:
        raise TokenizerCheckpointError(f"{source}: not a DALL-E dVAE {role} (no blocks.group_*.block_* weights)")
    w_in = _shape(t, "blocks.input.weight", 4, source)
    w_out = _shape(t, "blocks.output.conv.weight", 4, source)
    if role == "encoder":
        return DalleEncoderConfig(
            group_count=group_count,
            n_hid=w_in[0],
            n_blk_per_group=n_blk,
            input_channels=w_in[1],
            vocab_size=w_out[0],
        )
    if w_out[0] % 2:
        raise TokenizerCheckpointError(f"{source}: decoder output has {w_out[0]} channels, expected 2 * C")
    return DalleDecoderConfig(
        group_count=group_count,
        n_init=w_in[0],
        n_hid=w_out[1],
        n_blk_per_group=n_blk,
        output_channels=w_out[0] // 2,
        vocab_size=w_in[1],
    )


def _build(role: str, tensors: dict[str, torch.Tensor], source: str, config: Any = None) -> nn.Module:
    """Instantiate our module from a config inferred from (or stored with) the weights, strictly."""
    if config is None:
        config = _infer_config(role, tensors, source)
    try:
        with torch.device("meta"):  # no wasted random init: every tensor comes from the file
            module = DalleEncoder(config) if role == "encoder" else DalleDecoder(config)
    except (TypeError, ValueError) as e:
        raise TokenizerCheckpointError(f"{source}: cannot build a DALL-E {role} from {config}: {e}") from e
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [
        f"{k}: {tuple(tensors[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tensors[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {first_few(missing, 5)}")
        if unexpected:
            parts.append(f"unexpected {first_few(unexpected, 5)}")
        if wrong:
            parts.append(f"wrong shapes (file vs expected) {first_few(wrong, 5, sep='; ')}")
        raise TokenizerCheckpointError(
            f"{source}: weights do not fit a DALL-E {role} with {config}: " + "; ".join(parts)
        )
    module.load_state_dict({k: v.float().contiguous() for k, v in tensors.items()}, assign=True)
    return module


def _read_pickled(path: str, role: str) -> nn.Module:
    try:
        obj = safe_load(path)
    except UnsafeCheckpointError:
        raise
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError) as e:
        raise TokenizerCheckpointError(f"{path}: not a readable DALL-E dVAE checkpoint ({e})") from e
    if isinstance(obj, PickledObject):
        top = obj.pickled_global
        if top not in ("dall_e.encoder.Encoder", "dall_e.decoder.Decoder"):
            raise TokenizerCheckpointError(f"{path}: holds a {top}, not a dall_e Encoder or Decoder")
        found = "encoder" if top.endswith("Encoder") else "decoder"
        tensors, _ = flatten_module_state(obj)
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        tensors = dict(obj)  # a plain state_dict of a dall_e module
        found = _infer_role(_rename_dalle_keys(tensors)) or role
    else:
        raise TokenizerCheckpointError(
            f"{path}: not a DALL-E dVAE checkpoint (unpickled a {type(obj).__name__}, expected a "
            "pickled dall_e Encoder/Decoder or its state_dict)"
        )
    if found != role:
        raise TokenizerCheckpointError(f"{path}: is a DALL-E {found}, but was given as the {role}")
    return _build(role, _rename_dalle_keys(tensors), path)


def _read_safetensors(path: str) -> tuple[DalleEncoder | None, DalleDecoder | None]:
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise TokenizerCheckpointError(
                f"{path}: safetensors file is not a DALL-E tokenizer saved by beit "
                f"(metadata format={meta.get('format')!r}, expected {FORMAT!r})"
            )
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    out: list[Any] = []
    for role, cfg_cls in (("encoder", DalleEncoderConfig), ("decoder", DalleDecoderConfig)):
        if f"{role}_config" not in meta:
            out.append(None)
            continue
        cfg = cfg_cls(**json.loads(meta[f"{role}_config"]))
        sub = {k[len(role) + 1 :]: v for k, v in tensors.items() if k.startswith(role + ".")}
        out.append(_build(role, sub, path, cfg))
    return out[0], out[1]


def load_dalle_modules(
    encoder: str | os.PathLike, decoder: str | os.PathLike | None = None
) -> tuple[DalleEncoder, DalleDecoder | None]:
    """Read encoder (and decoder) weights from official pickles or our safetensors file.

    A safetensors file from :meth:`DalleTokenizer.save` holds both halves; an explicit ``decoder``
    path overrides the one stored with the encoder.
    """
    enc_path = os.fspath(encoder)
    if not os.path.isfile(enc_path):
        raise FileNotFoundError(
            f"DALL-E encoder file not found: {enc_path} (official weights: "
            "https://cdn.openai.com/dall-e/encoder.pkl; note wget -O, not -o)"
        )
    dec: DalleDecoder | None = None
    if _is_safetensors(enc_path):
        enc, dec = _read_safetensors(enc_path)
        if enc is None:
            raise TokenizerCheckpointError(f"{enc_path}: holds no encoder weights")
    else:
        enc = _read_pickled(enc_path, "encoder")
    if decoder is not None:
        dec_path = os.fspath(decoder)
        if not os.path.isfile(dec_path):
            raise FileNotFoundError(
                f"DALL-E decoder file not found: {dec_path} (official weights: "
                "https://cdn.openai.com/dall-e/decoder.pkl)"
            )
        if _is_safetensors(dec_path):
            _, dec = _read_safetensors(dec_path)
            if dec is None:
                raise TokenizerCheckpointError(f"{dec_path}: holds no decoder weights")
        else:
            dec = _read_pickled(dec_path, "decoder")
    return enc, dec
