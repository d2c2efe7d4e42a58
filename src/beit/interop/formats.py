"""State-dict layouts of the public BEiT implementations, and pure functions between them.

Our own layout is the official one (microsoft/unilm) minus derived buffers, which is also timm's.
Hugging Face renames everything and splits qkv; transformers 5 renames again in memory (but still
saves the 4.x names), so both spellings are read and the 4.x one is written.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

Tensor = torch.Tensor

WRAPPER_KEYS = ("model", "module", "state_dict", "model_state", "model_state_dict", "network", "net", "params",
                "teacher", "student", "model_ema", "state_dict_ema", "ema")
DERIVED = ("relative_position_index", "k_bias")  # buffers recomputed by every implementation
# the first tensor of a BEiT encoder in each layout (ours/official/timm; transformers Beit*/Data2VecVision*)
ANCHORS = ("patch_embed.proj.weight", "embeddings.patch_embeddings.projection.weight")
HF_MODEL_PREFIXES = ("beit.", "data2vec_vision.")
_WRAPPING_SEGMENTS = ("module.", "_orig_mod.")  # DDP / torch.compile wrappers, anywhere in a name


def _has_anchor(d: Mapping) -> bool:
    return any(isinstance(k, str) and k.endswith(ANCHORS) and isinstance(v, Tensor) for k, v in d.items())


def _find_state_dict(obj: Mapping, depth: int = 0) -> Mapping | None:
    """The nested mapping that holds a BEiT encoder: well-known wrapper keys first, then any other key."""
    if _has_anchor(obj):
        return obj
    if depth >= 4:
        return None
    keys = [k for k in WRAPPER_KEYS if k in obj] + [k for k in obj if k not in WRAPPER_KEYS]
    for k in keys:
        if isinstance(obj[k], Mapping):
            found = _find_state_dict(obj[k], depth + 1)
            if found is not None:
                return found
    return None


def _clean(key: str) -> str:
    for seg in _WRAPPING_SEGMENTS:
        while key.startswith(seg):
            key = key[len(seg):]
        key = key.replace("." + seg, ".")
    return key


def locate(obj: Mapping) -> tuple[dict[str, Tensor], str, list[str]]:
    """Find the BEiT encoder inside any checkpoint -> (state dict, prefix stripped, names of tensors left out).

    Handles wrappers (``{"model": ...}``, ``{"state_dict": ...}``, ``{"teacher": ...}``, ... up to 4 deep),
    DDP / torch.compile segments (``module.``, ``_orig_mod.``) and the prefix under which larger models
    keep their backbone (``backbone.``, ``encoder.``, ``model.``, ``student.backbone.``, ...): tensors
    under that prefix are taken with it removed, all others are left out (decode heads, necks, optimizer
    state...). Non-tensor entries are ignored. When no BEiT encoder is found, every tensor of the
    outermost tensor-holding mapping is returned as is (``detect`` then names it unknown).
    """
    sd = _find_state_dict(obj)
    if sd is None:  # old behaviour: peel wrappers until tensors show up
        sd = obj
        while not any(isinstance(v, Tensor) for v in sd.values()):
            inner = next((sd[k] for k in WRAPPER_KEYS if isinstance(sd.get(k), Mapping)), None)
            if inner is None:
                break
            sd = inner
        return {_clean(k): v for k, v in sd.items() if isinstance(v, Tensor)}, "", []
    tensors = {_clean(str(k)): v for k, v in sd.items() if isinstance(v, Tensor)}
    found: list[tuple[str, str]] = []  # (prefix to strip, prefix to add)
    for k in tensors:
        for anchor in ANCHORS:
            if k == anchor or k.endswith("." + anchor):
                prefix, add = k[: len(k) - len(anchor)], ""
                if anchor != ANCHORS[0]:  # transformers: keep the model's own "beit." / "data2vec_vision."
                    own = next((o for o in HF_MODEL_PREFIXES if prefix.endswith(o)), None)
                    if own is None:
                        add = "beit."  # a bare BeitModel / Data2VecVisionModel: "embeddings.*", "encoder.*"
                    else:
                        prefix = prefix[: len(prefix) - len(own)]
                found.append((prefix, add))
    # several encoders (teacher + student, model + ema): the outermost, then the first in name order
    prefix, add = min(found, key=lambda pa: (pa[0].count("."), pa[0]))
    taken = {add + k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    left_out = [k for k in tensors if not k.startswith(prefix)]
    return taken, prefix, left_out


def unwrap(obj: Mapping) -> dict[str, Tensor]:
    """The BEiT state dict inside any checkpoint (see ``locate``), without the bookkeeping."""
    return locate(obj)[0]


def detect(sd: Mapping[str, Tensor]) -> str:
    """'hf' (transformers, either naming), 'beit' (official / timm / ours), or 'unknown'."""
    keys = list(sd)
    if any(k.startswith(("beit.", "lm_head.")) and ("embeddings" in k or "encoder" in k or "layers." in k)
           for k in keys):
        return "hf"
    if "patch_embed.proj.weight" in sd and any(k.startswith("blocks.") for k in keys):
        return "beit"
    return "unknown"


def drop_derived(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v for k, v in sd.items() if not k.endswith(DERIVED)}


# transformers 5 in-memory names -> transformers 4 / hub names
_HF5_TO_HF4 = [
    (r"^beit\.layers\.(\d+)\.attention\.([qkv])_proj\.", None),
    (r"^beit\.layers\.(\d+)\.attention\.o_proj\.", r"beit.encoder.layer.\1.attention.output.dense."),
    (r"^beit\.layers\.(\d+)\.mlp\.fc1\.", r"beit.encoder.layer.\1.intermediate.dense."),
    (r"^beit\.layers\.(\d+)\.mlp\.fc2\.", r"beit.encoder.layer.\1.output.dense."),
    (r"^beit\.layers\.(\d+)\.relative_position_bias\.",
     r"beit.encoder.layer.\1.attention.attention.relative_position_bias."),
    (r"^beit\.layers\.(\d+)\.", r"beit.encoder.layer.\1."),
    (r"^beit\.shared_position_bias\.", r"beit.encoder.relative_position_bias."),
]
_QKV_NAME = {"q": "query", "k": "key", "v": "value"}

# transformers 4 names -> ours
_HF4_TO_OURS = [
    (r"^beit\.embeddings\.cls_token$", "cls_token"),
    (r"^beit\.embeddings\.mask_token$", "mask_token"),
    (r"^beit\.embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^beit\.embeddings\.position_embeddings$", "pos_embed"),
    (r"^beit\.encoder\.relative_position_bias\.relative_position_bias_table$",
     "rel_pos_bias.relative_position_bias_table"),
    (r"^beit\.encoder\.layer\.(\d+)\.attention\.attention\.relative_position_bias\.relative_position_bias_table$",
     r"blocks.\1.attn.relative_position_bias_table"),
    (r"^beit\.encoder\.layer\.(\d+)\.attention\.attention\.query\.bias$", r"blocks.\1.attn.q_bias"),
    (r"^beit\.encoder\.layer\.(\d+)\.attention\.attention\.value\.bias$", r"blocks.\1.attn.v_bias"),
    (r"^beit\.encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^beit\.encoder\.layer\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"^beit\.encoder\.layer\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"^beit\.encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
    (r"^beit\.encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
    (r"^beit\.encoder\.layer\.(\d+)\.lambda_1$", r"blocks.\1.gamma_1"),
    (r"^beit\.encoder\.layer\.(\d+)\.lambda_2$", r"blocks.\1.gamma_2"),
    (r"^beit\.pooler\.layernorm\.", "fc_norm."),
    (r"^classifier\.", "head."),
    (r"^lm_head\.", "lm_head."),
]


def _hf5_to_hf4(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for k, v in sd.items():
        m = re.match(r"^beit\.layers\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)$", k)
        if m:
            out[f"beit.encoder.layer.{m[1]}.attention.attention.{_QKV_NAME[m[2]]}.{m[3]}"] = v
            continue
        for pat, rep in _HF5_TO_HF4[1:]:
            if re.match(pat, k):
                k = re.sub(pat, rep, k)
                break
        out[k] = v
    return out


def from_hf(sd: Mapping[str, Tensor], mim: bool | None = None) -> dict[str, Tensor]:
    """Hugging Face Beit* state dict (4.x or 5.x names) -> ours."""
    sd = _hf5_to_hf4(drop_derived(sd))
    mim = ("lm_head.weight" in sd) if mim is None else mim
    out: dict[str, Tensor] = {}
    qkv: dict[str, dict[str, Tensor]] = {}
    for k, v in sd.items():
        m = re.match(r"^beit\.encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.weight$", k)
        if m:
            qkv.setdefault(m[1], {})[m[2]] = v
            continue
        if k in ("beit.layernorm.weight", "beit.layernorm.bias"):
            out["norm." + k.rsplit(".", 1)[1]] = v  # BeitModel's final norm (no mean pooling)
            continue
        if k in ("layernorm.weight", "layernorm.bias"):  # BeitForMaskedImageModeling's norm before lm_head
            has_inner = "beit.layernorm.weight" in sd
            out[("head_norm." if has_inner else "norm.") + k.rsplit(".", 1)[1]] = v
            continue
        for pat, rep in _HF4_TO_OURS:
            if re.match(pat, k):
                out[re.sub(pat, rep, k)] = v
                break
        else:
            out["__unmapped__." + k] = v
    for i, parts in qkv.items():
        missing = {"query", "key", "value"} - set(parts)
        if missing:
            raise ValueError(f"Hugging Face checkpoint: layer {i} lacks attention {sorted(missing)} weights")
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    return out


def to_hf(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Ours -> Hugging Face 4.x names (what the Hub holds; transformers 5 reads them too)."""
    sd = drop_derived(sd)
    mim = "lm_head.weight" in sd
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        m = re.match(r"^blocks\.(\d+)\.(.*)$", k)
        if m:
            i, rest = m[1], m[2]
            p = f"beit.encoder.layer.{i}."
            if rest == "attn.qkv.weight":
                q, kk, vv = v.chunk(3, dim=0)
                out[p + "attention.attention.query.weight"] = q
                out[p + "attention.attention.key.weight"] = kk
                out[p + "attention.attention.value.weight"] = vv
                continue
            table = {
                "attn.q_bias": "attention.attention.query.bias",
                "attn.v_bias": "attention.attention.value.bias",
                "attn.relative_position_bias_table":
                    "attention.attention.relative_position_bias.relative_position_bias_table",
                "gamma_1": "lambda_1",
                "gamma_2": "lambda_2",
            }
            if rest in table:
                out[p + table[rest]] = v
                continue
            for a, b in (("attn.proj.", "attention.output.dense."), ("norm1.", "layernorm_before."),
                         ("norm2.", "layernorm_after."), ("mlp.fc1.", "intermediate.dense."),
                         ("mlp.fc2.", "output.dense.")):
                if rest.startswith(a):
                    out[p + b + rest[len(a):]] = v
                    break
            else:
                raise ValueError(f"cannot export {k!r} to Hugging Face")
            continue
        simple = {
            "cls_token": "beit.embeddings.cls_token",
            "mask_token": "beit.embeddings.mask_token",
            "pos_embed": "beit.embeddings.position_embeddings",
            "rel_pos_bias.relative_position_bias_table":
                "beit.encoder.relative_position_bias.relative_position_bias_table",
        }
        if k in simple:
            out[simple[k]] = v
        elif k.startswith("patch_embed.proj."):
            out["beit.embeddings.patch_embeddings.projection." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("fc_norm."):
            out["beit.pooler.layernorm." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("head_norm."):
            out["layernorm." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("norm."):
            has_head_norm = "head_norm.weight" in sd
            prefix = "layernorm." if mim and not has_head_norm else "beit.layernorm."
            out[prefix + k.rsplit(".", 1)[1]] = v
        elif k.startswith("head."):
            out["classifier." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("lm_head."):
            out[k] = v
        else:
            raise ValueError(f"cannot export {k!r} to Hugging Face")
    return out


def shared_to_per_layer(sd: Mapping[str, Tensor], depth: int) -> dict[str, Tensor]:
    """Copy a shared pre-training table into every block, as official fine-tuning does."""
    sd = dict(sd)
    table = sd.pop("rel_pos_bias.relative_position_bias_table", None)
    if table is not None:
        for i in range(depth):
            sd.setdefault(f"blocks.{i}.attn.relative_position_bias_table", table.clone())
    return sd
