"""beit: pre-train and fine-tune BEiT vision transformers (Bao et al., ICLR 2022).

The names below are imported on first use (PEP 562), so that ``beit --help`` and ``import beit.cli`` do not load
torch: ``beit.load_model`` is ``beit.interop.load_model``, ``beit.Beit`` is ``beit.models.Beit``, and so on.
"""

import importlib as _importlib
from typing import Any as _Any

__version__ = "0.1.0"
__all__ = ["Beit", "BeitConfig", "CheckpointError", "Preprocess", "build_backbone", "create_model", "list_models",
           "load_model", "save_model"]

_WHERE = {"CheckpointError": "interop", "build_backbone": "interop", "load_model": "interop", "save_model": "interop",
          "Beit": "models", "BeitConfig": "models", "Preprocess": "models", "create_model": "models",
          "list_models": "models"}


def __getattr__(name: str) -> _Any:
    if name in _WHERE:
        value = getattr(_importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
