"""Architecture description of a BEiT model, and the named presets.

One flat dataclass: it is what ``config.json`` holds next to our weights, what ``load_model``
infers from a foreign checkpoint, and what ``create_model`` overrides field by field.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field
from typing import Any

HEADS = ("cls", "mim", "none")
_INTS = ("patch_size", "in_chans", "embed_dim", "depth", "num_heads", "attn_head_dim", "num_classes", "vocab_size")
_FLOATS = ("mlp_ratio", "drop_rate", "attn_drop_rate", "drop_path_rate", "layer_norm_eps", "init_values", "init_std",
           "init_scale")
_OPTIONAL = ("attn_head_dim", "init_values")


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


@dataclass
class BeitConfig:
    img_size: int | tuple[int, int] = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    attn_head_dim: int | None = None  # None: embed_dim // num_heads
    mlp_ratio: float = 4.0
    qkv_bias: bool = True  # q and v biases; k never has one
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    layer_norm_eps: float = 1e-6  # official code and timm; Hugging Face configs say 1e-12
    init_values: float | None = 0.1  # layer scale gamma_1/gamma_2; None or 0 turns it off
    use_abs_pos_emb: bool = False
    use_rel_pos_bias: bool = True  # one table per block
    use_shared_rel_pos_bias: bool = False  # one table for all blocks (pre-training)
    use_mean_pooling: bool = True  # fc_norm(mean of patch tokens); False: norm then cls token
    head: str = "cls"  # "cls" classifier, "mim" masked-image-modeling lm_head, "none" features only
    num_classes: int = 1000
    vocab_size: int = 8192
    mim_head_norm: bool = False  # extra LayerNorm before lm_head (Hugging Face MIM without mean pooling)
    init_std: float = 0.02
    init_scale: float = 0.001  # classification head init multiplier (official fine-tuning)
    attn_impl: str = "sdpa"
    extra: dict[str, Any] = field(default_factory=dict)  # label names etc., carried through save/load

    def __post_init__(self) -> None:
        if isinstance(self.img_size, list):
            self.img_size = tuple(self.img_size)
        self.validate()

    @property
    def img_hw(self) -> tuple[int, int]:
        s = self.img_size
        return (s, s) if isinstance(s, int) else (int(s[0]), int(s[1]))

    @property
    def grid(self) -> tuple[int, int]:
        h, w = self.img_hw
        return h // self.patch_size, w // self.patch_size

    def _type_problems(self) -> list[str]:
        """Fields of the wrong type (``create_model(depth="2")`` failed inside a comparison, naming no field)."""
        problems = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in _OPTIONAL and v is None:
                continue
            if f.name == "img_size":
                ok = _is_int(v) or (isinstance(v, tuple) and len(v) == 2 and all(_is_int(x) for x in v))
                kind = "an int or a pair of ints"
            elif f.name in _INTS:
                ok, kind = _is_int(v), "an int"
            elif f.name in _FLOATS:
                ok, kind = isinstance(v, numbers.Real) and not isinstance(v, bool), "a number"
            elif f.type == "bool":
                ok, kind = isinstance(v, bool), "true or false"
            elif f.type == "str":
                ok, kind = isinstance(v, str), "a string"
            else:
                continue
            if not ok:
                problems.append(f"{f.name} must be {kind}, got {v!r} ({type(v).__name__})")
        return problems

    def validate(self) -> None:
        """Raises ValueError naming every field of the wrong type, else every inconsistent value."""
        problems = self._type_problems()
        if problems:
            raise ValueError("invalid BEiT config: " + "; ".join(problems))
        h, w = self.img_hw
        if self.patch_size <= 0 or h % self.patch_size or w % self.patch_size:
            problems.append(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
        head_dim = self.attn_head_dim or (self.embed_dim // max(self.num_heads, 1))
        if self.num_heads <= 0 or (self.attn_head_dim is None and self.embed_dim % self.num_heads):
            problems.append(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if head_dim <= 0 or self.depth <= 0 or self.embed_dim <= 0:
            problems.append("embed_dim, depth and head dim must be positive")
        if self.head not in HEADS:
            problems.append(f"head must be one of {HEADS}, got {self.head!r}")
        if self.head == "cls" and self.num_classes < 0:
            problems.append(f"num_classes must be >= 0, got {self.num_classes}")
        if self.head == "mim" and self.vocab_size <= 1:
            problems.append(f"vocab_size must be > 1 for a MIM head, got {self.vocab_size}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            problems.append(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if problems:
            raise ValueError("invalid BEiT config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if isinstance(d["img_size"], tuple):
            d["img_size"] = list(d["img_size"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BeitConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown BEiT config keys: {unknown}")
        return cls(**d)

    def eval_preprocess(self) -> Preprocess:
        """The stored eval preprocessing (``extra["preprocess"]``), else ImageNet-style crop at ``img_size``."""
        stored = self.extra.get(PREPROCESS_KEY)
        if isinstance(stored, dict):
            return Preprocess.from_dict(stored)
        return Preprocess(img_size=self.img_hw[0])

    def with_preprocess(self, p: Preprocess) -> BeitConfig:
        """A copy that carries ``p`` as its eval preprocessing (written to ``config.json`` by ``save_model``)."""
        return dataclasses.replace(self, extra={**self.extra, PREPROCESS_KEY: p.to_dict()})

    def replace(self, **overrides: Any) -> BeitConfig:
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown BEiT config keys: {unknown}; valid keys: {sorted(known)}")
        return dataclasses.replace(self, **overrides)


IMAGENET_MEAN = (0.485, 0.456, 0.406)  # timm.data.IMAGENET_DEFAULT_MEAN
IMAGENET_STD = (0.229, 0.224, 0.225)
PREPROCESS_KEY = "preprocess"  # where a model keeps its Preprocess: ``cfg.extra["preprocess"]``


@dataclass
class Preprocess:
    """How a model's eval images are made (timm's ``pretrained_cfg`` input fields, for our models).

    Kept beside the architecture: in memory as ``BeitConfig.extra["preprocess"]`` (a dict), on disk as
    the ``preprocess`` entry of ``config.json`` (``beit.save_model``). ``BeitConfig.eval_preprocess()``
    gives it, or the default for the model's resolution when none was stored.

    ``resize="crop"``: short side to ``img_size / crop_pct`` then center crop (ImageNet-style).
    ``resize="full"``: the whole image squashed to ``img_size x img_size``, nothing cut away
    (documents: a crop would cut off the header or footer that tells a letter from a memo).
    ``mean`` / ``std`` apply to pixels in [0, 1].
    """

    img_size: int = 224  # pixels, square
    resize: str = "crop"  # crop | full
    crop_pct: float | None = None  # None: the data helper's default (224/256, 1.0 at <=32 px and >=384 px)
    interpolation: str = "bicubic"
    grayscale: bool = False  # convert to gray and replicate to 3 channels (scanned documents)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Preprocess:
        """From a stored dict; unknown keys are ignored (a newer writer), lists become tuples."""
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: (tuple(v) if isinstance(v, list) else v) for k, v in (d or {}).items() if k in known}
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (mean / std as lists)."""
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d


# Literal hyper-parameters of the paper's sizes (tiny/small follow DeiT widths).
PRESETS: dict[str, dict[str, Any]] = {
    "beit_tiny_patch16_224": dict(embed_dim=192, depth=12, num_heads=3),
    "beit_small_patch16_224": dict(embed_dim=384, depth=12, num_heads=6),
    "beit_base_patch16_224": dict(embed_dim=768, depth=12, num_heads=12),
    "beit_large_patch16_224": dict(embed_dim=1024, depth=24, num_heads=16, init_values=1e-5),
}

# What the official pre-training script changes when the head is the MIM head.
MIM_DEFAULTS: dict[str, Any] = dict(use_shared_rel_pos_bias=True, use_rel_pos_bias=False, use_mean_pooling=False)


def preset_config(name: str, **overrides: Any) -> BeitConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; available: {sorted(PRESETS)}")
    args = dict(PRESETS[name])
    if overrides.get("head") == "mim":
        for k, v in MIM_DEFAULTS.items():
            args.setdefault(k, v)
    args.update(overrides)
    base = BeitConfig()
    return base.replace(**args)
