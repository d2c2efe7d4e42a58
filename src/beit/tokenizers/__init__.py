"""Image tokenizers: images in [0, 1] <-> discrete visual tokens (BEiT's MIM targets).

This package holds the tokenizer modules only (``dalle``, ``dvae``, ``base``, ``metrics``,
``safe_pickle``) and one registry, :data:`TOKENIZERS`, read by :func:`load_tokenizer`; training a dVAE
and the ``beit tokenizer`` commands are a task (:mod:`beit.tasks.tokenizer`).

- ``load_tokenizer("dalle", "encoder.pkl", decoder="decoder.pkl")``: OpenAI's frozen DALL-E
  dVAE (vocab 8192, 8x downsampling), read without importing ``dall_e`` or running pickled code.
- ``load_tokenizer("dvae", "my_dvae.safetensors")``: a dVAE trained with ``beit tokenizer train``.
- ``detect_tokenizer_kind(path)``: the kind of a tokenizer file, from its safetensors metadata (``format``) or its
  ending (``.pkl``: DALL-E), for ``beit pretrain tokenizer.kind=auto``.

A new tokenizer kind: a module here whose model implements :class:`Tokenizer` and a loader
``load(path, *, decoder, device, precision, **options) -> Tokenizer``, registered with
:func:`register_tokenizer`; ``beit pretrain tokenizer.kind=NAME`` and ``beit tokenizer eval NAME``
then find it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .._text import first_few
from .base import Tokenizer, TokenizerCheckpointError, map_pixels, unmap_pixels
from .dalle import FORMAT as _DALLE_FORMAT
from .dalle import DalleDecoder, DalleDecoderConfig, DalleEncoder, DalleEncoderConfig, DalleTokenizer
from .dvae import FORMAT as _DVAE_FORMAT
from .dvae import DiscreteVAE, DVAEConfig, gumbel_temperature
from .safe_pickle import UnsafeCheckpointError

PathLike = str | os.PathLike


@dataclass(frozen=True)
class TokenizerKind:
    """One entry of the registry: how to load a frozen tokenizer of this kind from a file.

    ``load(path, *, decoder, device, precision, **options)`` returns the tokenizer (eval mode);
    ``decoder`` is ``None`` unless the kind keeps its decoder in a second file; ``precision`` is
    ``None`` or one of ``precisions``. ``files`` says in one line which files ``path`` may be;
    ``suffixes`` the endings such files have and ``usual_name`` the name they usually have (both name the
    fitting files of a folder given as ``path``). ``formats``: the ``format`` values of the safetensors
    metadata of this kind's files (:func:`detect_tokenizer_kind`); ``auto_precision``: what precision ``auto``
    means on CUDA (:func:`resolve_precision`; fp32 elsewhere).
    """

    name: str
    load: Callable[..., Tokenizer]
    files: str
    precisions: tuple[str, ...] = ("fp32",)
    has_decoder_file: bool = False
    suffixes: tuple[str, ...] = ()
    usual_name: str = ""
    formats: tuple[str, ...] = ()
    auto_precision: str = "fp32"


TOKENIZERS: dict[str, TokenizerKind] = {}


def register_tokenizer(kind: TokenizerKind) -> TokenizerKind:
    """Add ``kind`` to :data:`TOKENIZERS` (its name must be new). Returns it, for use at module level."""
    if kind.name in TOKENIZERS:
        raise ValueError(f"tokenizer kind {kind.name!r} is already registered")
    TOKENIZERS[kind.name] = kind
    return kind


def _load_dalle(path: PathLike, *, decoder: PathLike | None, device: str | torch.device,
                precision: str | None, channels_last: bool | None = None) -> Tokenizer:
    # channels_last by default on CUDA: faster convs there, the same ids (see DalleTokenizer)
    if channels_last is None:
        channels_last = torch.device(device).type == "cuda"
    return DalleTokenizer.load(path, decoder, device=device, precision=precision or "fp32",  # type: ignore[arg-type]
                               channels_last=channels_last)


def _load_dvae(path: PathLike, *, decoder: PathLike | None, device: str | torch.device,
               precision: str | None, **options: object) -> Tokenizer:
    if options:
        raise ValueError(f'load_tokenizer("dvae") takes no options {sorted(options)}: just the safetensors path')
    return DiscreteVAE.load(path, device=device).eval()


register_tokenizer(TokenizerKind("dalle", _load_dalle, "the official encoder.pkl or our safetensors copy",
                                 precisions=("fp32", "tf32", "bf16", "fp16"), has_decoder_file=True,
                                 suffixes=(".pkl", ".safetensors"), usual_name="encoder.pkl",
                                 formats=(_DALLE_FORMAT,), auto_precision="fp16"))  # fp16: the official code's
register_tokenizer(TokenizerKind("dvae", _load_dvae, "a safetensors file written by `beit tokenizer train`",
                                 suffixes=(".safetensors",), usual_name="dvae.safetensors", formats=(_DVAE_FORMAT,)))

#: ``tokenizer.kind`` / ``tokenizer.precision`` value: read the kind from the file, take the kind's own precision
AUTO = "auto"


def detect_tokenizer_kind(path: PathLike) -> str:
    """The registered kind of the tokenizer file ``path``: a safetensors file by the ``format`` of its metadata
    (:attr:`TokenizerKind.formats`), another file by its ending when one kind alone takes it (``.pkl``: DALL-E).

    Raises:
        ValueError: ``path`` is a folder, missing or unreadable, a safetensors file whose metadata format no kind
            has, or a file whose ending fits no kind or several; the message names the kinds.
    """
    path = os.fspath(path)
    kinds = ", ".join(repr(k) for k in TOKENIZERS)
    if os.path.isdir(path):
        fitting = sorted({os.path.join(path, e.usual_name) for e in TOKENIZERS.values()
                          if e.usual_name and os.path.isfile(os.path.join(path, e.usual_name))})
        give = f": give the file inside it, {first_few(fitting, 4)}" if fitting else ": give the tokenizer file"
        raise ValueError(f"tokenizer path {path} is a folder, not a file{give}")
    if path.lower().endswith(".safetensors"):
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(path, framework="pt") as f:
                fmt = (f.metadata() or {}).get("format")
        except (OSError, SafetensorError) as e:
            raise ValueError(f"{path}: cannot read its safetensors metadata ({e})") from None
        found = [e.name for e in TOKENIZERS.values() if fmt in e.formats]
        if len(found) != 1:
            raise ValueError(f"{path}: its metadata format={fmt!r} is not one of a tokenizer kind ({kinds})")
        return found[0]
    found = [e.name for e in TOKENIZERS.values() if path.lower().endswith(e.suffixes)]
    if len(found) != 1:
        raise ValueError(f"{path}: its kind cannot be told from the file name (one of {kinds})")
    return found[0]


def resolve_precision(kind: str, precision: str, device: str | torch.device = "cpu") -> str:
    """``precision`` of a ``kind`` tokenizer, ``auto`` made concrete: the kind's :attr:`~TokenizerKind.auto_precision`
    on CUDA (DALL-E: fp16, as the official code), fp32 elsewhere; any other value as given.

    Raises:
        ValueError: an unknown ``kind``.
    """
    entry = TOKENIZERS.get(kind)
    if entry is None:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {tuple(TOKENIZERS)}")
    if precision != AUTO:
        return precision
    return entry.auto_precision if torch.device(device).type == "cuda" else "fp32"

TOKENIZER_KINDS = tuple(TOKENIZERS)  # the names at import time; TOKENIZERS is the live registry


def load_tokenizer(
    kind: str,
    path: PathLike | None = None,
    *,
    encoder: PathLike | None = None,
    decoder: PathLike | None = None,
    device: str | torch.device = "cpu",
    precision: str | None = None,
    **options: object,
) -> Tokenizer:
    """Load a frozen tokenizer of a registered ``kind`` (see :data:`TOKENIZERS`) in eval mode.

    The one place a tokenizer kind is dispatched (``beit pretrain``, ``beit tokenizer eval|encode``
    and the library all come here). ``path`` is the tokenizer file (``encoder=`` is its older name
    for DALL-E's ``encoder.pkl``); ``decoder`` a second file for kinds that keep one (DALL-E's
    ``decoder.pkl``, needed only by ``decode``); ``precision`` one of the kind's precisions
    (DALL-E: fp32 | tf32 | bf16 | fp16; dVAE: fp32); other keyword options go to the kind's loader
    (DALL-E: ``channels_last``, by default on when ``device`` is CUDA).

    Raises:
        ValueError: unknown kind, no file, the encoder given twice, a decoder or precision the kind
            does not take; ``path`` is a folder (naming the files inside it that would fit, e.g. the
            ``dvae.safetensors`` a ``beit tokenizer train`` run folder holds).
    """
    entry = TOKENIZERS.get(kind)
    if entry is None:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {tuple(TOKENIZERS)}")
    if encoder is not None and path is not None and os.fspath(encoder) != os.fspath(path):
        raise ValueError("give the tokenizer file once: either path or encoder=")
    path = encoder if encoder is not None else path
    if path is None:
        raise ValueError(f"load_tokenizer({kind!r}) needs the tokenizer file: {entry.files}")
    if os.path.isdir(path):
        raise ValueError(_folder_message(entry, path))
    if decoder is not None and not entry.has_decoder_file:
        raise ValueError(f"load_tokenizer({kind!r}) takes no decoder file (got decoder={os.fspath(decoder)!r})")
    if precision is not None and precision not in entry.precisions:
        raise ValueError(f"load_tokenizer({kind!r}): precision must be one of {entry.precisions}, got {precision!r}")
    return entry.load(path, decoder=decoder, device=device, precision=precision, **options)


def _folder_message(entry: TokenizerKind, folder: PathLike) -> str:
    """What to say when a folder is given as the tokenizer file: the files inside it that would fit (its
    ``usual_name`` file alone when it has one; else those with one of the kind's ``suffixes``)."""
    folder = os.fspath(folder)
    try:
        names = sorted(n for n in os.listdir(folder) if not n.startswith(".")
                       and n.lower().endswith(entry.suffixes) and os.path.isfile(os.path.join(folder, n)))
    except OSError:
        names = []
    head = f"{entry.name} tokenizer path {folder} is a folder, not a file"
    if entry.usual_name in names:
        names = [entry.usual_name]
    if not names:
        return f"{head}, and it holds no {' or '.join(entry.suffixes) or 'tokenizer'} file: give {entry.files}"
    shown = first_few([os.path.join(folder, n) for n in names], 5)
    if len(names) == 1:
        return f"{head}: give the file inside it, {shown}"
    return f"{head}: give one of the files inside it, {shown}"


__all__ = [
    "AUTO",
    "TOKENIZERS",
    "TOKENIZER_KINDS",
    "DVAEConfig",
    "DalleDecoder",
    "DalleDecoderConfig",
    "DalleEncoder",
    "DalleEncoderConfig",
    "DalleTokenizer",
    "DiscreteVAE",
    "Tokenizer",
    "TokenizerCheckpointError",
    "TokenizerKind",
    "detect_tokenizer_kind",
    "UnsafeCheckpointError",
    "gumbel_temperature",
    "load_tokenizer",
    "map_pixels",
    "register_tokenizer",
    "resolve_precision",
    "unmap_pixels",
]
