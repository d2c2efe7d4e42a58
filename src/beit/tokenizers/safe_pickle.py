"""Read a pickled DALL-E dVAE module without running pickled code or importing ``dall_e``.

OpenAI ship ``encoder.pkl`` / ``decoder.pkl`` as whole ``nn.Module`` objects saved with
``torch.save``. ``torch.load(weights_only=False)`` on such a file imports ``dall_e`` and calls any
global the pickle names, so a tampered file runs arbitrary code. Here every global goes through an
allow-list: tensor rebuilds and storages map to our own small functions, containers to their
builtin types, and the known ``dall_e`` / ``torch.nn`` module classes to inert
:class:`PickledObject` stand-ins that only record their state. Anything else raises
:class:`UnsafeCheckpointError` naming the global and the file, before it can be called.

The zip format (``torch.save`` default since 1.6) is read with :mod:`zipfile`, not ``torch.load``,
so no environment flag (``TORCH_FORCE_WEIGHTS_ONLY_LOAD``) changes the behaviour. The legacy
(pre-1.6) format goes through ``torch.load(pickle_module=...)`` with the same allow-list.
"""

from __future__ import annotations

import _compat_pickle
import io
import os
import pickle
import sys
import types
import warnings
import zipfile
from collections import OrderedDict
from typing import Any

import torch

# dall_e / torch.nn classes a DALL-E checkpoint pickles; unpickled as inert stand-ins.
ALLOWED_MODULE_CLASSES = frozenset(
    {
        "dall_e.encoder.Encoder",
        "dall_e.encoder.EncoderBlock",
        "dall_e.decoder.Decoder",
        "dall_e.decoder.DecoderBlock",
        "dall_e.utils.Conv2d",
        "torch.nn.modules.container.Sequential",
        "torch.nn.modules.activation.ReLU",
        "torch.nn.modules.pooling.MaxPool2d",
        "torch.nn.modules.linear.Identity",
        "torch.nn.modules.upsampling.Upsample",
        "torch.nn.modules.conv.Conv2d",
    }
)

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}

_HARMLESS_TYPES: dict[str, Any] = {
    "collections.OrderedDict": OrderedDict,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "torch.device": torch.device,
    "torch.Size": torch.Size,
}

_REBUILDS = {
    "torch._utils._rebuild_tensor": "_rebuild_tensor",
    "torch._utils._rebuild_tensor_v2": "_rebuild_tensor_v2",
    "torch._utils._rebuild_parameter": "_rebuild_parameter",
    "torch._utils._rebuild_parameter_with_state": "_rebuild_parameter_with_state",
}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The file names a global that a DALL-E checkpoint never needs; it was not called."""


class PickledObject:
    """Inert stand-in for an instance of an allowed class: keeps its pickled state, runs no code.

    ``pickled_global`` is the class' ``module.qualname``; ``state`` is what ``__setstate__`` got
    (for an ``nn.Module`` its ``__dict__``: ``_parameters``, ``_modules``, config attributes).
    """

    pickled_global: str = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # only reached through REDUCE
        self.args = args
        self.state: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            merged = dict(state[0] or {})
            merged.update(state[1] or {})
            state = merged
        self.state = state if isinstance(state, dict) else {"__state__": state}

    def __getattr__(self, name: str) -> Any:  # only called for missing attributes
        state = self.__dict__.get("state")
        if state is not None and name in state:
            return state[name]
        raise AttributeError(f"{self.pickled_global} stand-in has no attribute {name!r}")

    def __repr__(self) -> str:
        return f"PickledObject({self.pickled_global})"


class _StorageType:
    """Marker for ``torch.FloatStorage`` & co. in a zip checkpoint's persistent ids."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` only hands out allow-listed, side-effect-free globals.

    Rebuild helpers are bound methods and stand-in classes are made per instance, so a pickle
    cannot tamper with them (BUILD on a global) in a way that outlives this one load.
    """

    source = "<bytes>"  # file name used in error messages; set per load

    def __init__(self, file: Any, *args: Any, source: str | None = None, **kwargs: Any) -> None:
        super().__init__(file, *args, **kwargs)
        if source is not None:
            self.source = source
        self._stand_ins: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 names (protocol 2 pickles say ``__builtin__.set``); the result is still checked.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        full = f"{module}.{name}"
        if full in _HARMLESS_TYPES:
            return _HARMLESS_TYPES[full]
        if full in _REBUILDS:
            return getattr(self, _REBUILDS[full])
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if full in ALLOWED_MODULE_CLASSES:
            if full not in self._stand_ins:
                self._stand_ins[full] = type(name, (PickledObject,), {"pickled_global": full})
            return self._stand_ins[full]
        raise UnsafeCheckpointError(
            f"refusing to load {self.source}: it references the global {full!r}, which a DALL-E "
            "dVAE checkpoint never needs (allowed: tensor storages and rebuilds, OrderedDict, and the "
            "dall_e / torch.nn module classes). Nothing from the file was executed; do not open it "
            "with torch.load(weights_only=False)."
        )

    # Tensor rebuilds. ``storage`` is a flat tensor (our zip reader) or a TypedStorage (legacy path).
    def _as_tensor(self, storage: Any, offset: int, size: Any, stride: Any) -> torch.Tensor:
        if isinstance(storage, torch.Tensor):
            return torch.as_strided(storage, tuple(size), tuple(stride), int(offset))
        if isinstance(storage, torch.storage.TypedStorage):
            t = torch.empty(0, dtype=storage.dtype)
            return t.set_(storage._untyped_storage, int(offset), tuple(size), tuple(stride))
        raise pickle.UnpicklingError(f"{self.source}: bad tensor storage {type(storage).__name__}")

    def _rebuild_tensor(self, storage: Any, offset: int, size: Any, stride: Any) -> torch.Tensor:
        return self._as_tensor(storage, offset, size, stride)

    def _rebuild_tensor_v2(
        self,
        storage: Any,
        offset: int,
        size: Any,
        stride: Any,
        requires_grad: bool = False,
        backward_hooks: Any = None,
        metadata: Any = None,
    ) -> torch.Tensor:
        return self._as_tensor(storage, offset, size, stride)

    def _rebuild_parameter(self, data: Any, requires_grad: bool = False, backward_hooks: Any = None) -> Any:
        return data  # weights only; hooks and requires_grad are irrelevant to us

    def _rebuild_parameter_with_state(
        self, data: Any, requires_grad: bool = False, backward_hooks: Any = None, state: Any = None
    ) -> Any:
        return data


def _zip_load(path: str) -> Any:
    """Unpickle ``data.pkl`` of a torch zip checkpoint, reading tensor storages from the archive."""
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if not pkl:
            raise pickle.UnpicklingError(f"{path}: zip file without a torch 'data.pkl' record")
        root = pkl[0][: -len("data.pkl")]
        byteorder = "little"
        if root + "byteorder" in names:
            byteorder = zf.read(root + "byteorder").decode().strip()
        storages: dict[str, torch.Tensor] = {}

        def persistent_load(pid: Any) -> torch.Tensor:
            if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
                raise UnsafeCheckpointError(f"refusing to load {path}: unexpected persistent id {pid!r}")
            storage_type, key = pid[1], str(pid[2])
            if not isinstance(storage_type, _StorageType):
                raise UnsafeCheckpointError(f"refusing to load {path}: bad storage type {storage_type!r}")
            if key not in storages:
                record = f"{root}data/{key}"
                if record not in names:
                    raise pickle.UnpicklingError(f"{path}: missing tensor record {record!r}")
                raw = zf.read(record)
                dtype = storage_type.dtype
                if not raw:
                    storages[key] = torch.empty(0, dtype=dtype)
                else:
                    t = torch.frombuffer(bytearray(raw), dtype=dtype)
                    if byteorder != sys.byteorder and t.element_size() > 1:
                        t = torch.from_numpy(t.numpy().byteswap())
                    storages[key] = t
            return storages[key]

        unpickler = RestrictedUnpickler(io.BytesIO(zf.read(pkl[0])), source=path, encoding="utf-8")
        unpickler.persistent_load = persistent_load
        return unpickler.load()


def _legacy_load(path: str) -> Any:
    """Pre-1.6 ``torch.save`` format: torch's own reader, with our unpickler as ``pickle_module``."""

    unpickler_cls = type("Unpickler", (RestrictedUnpickler,), {"source": path})

    def load(f: Any, **kwargs: Any) -> Any:
        return unpickler_cls(f, **kwargs).load()

    module = types.SimpleNamespace(Unpickler=unpickler_cls, load=load, __name__="beit_safe_pickle")
    with warnings.catch_warnings():  # torch cannot find the source of our stand-in classes: expected
        warnings.filterwarnings("ignore", message="Couldn't retrieve source code")
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=module)


def safe_load(path: str | os.PathLike) -> Any:
    """Load a ``torch.save`` file through the allow-list; the result holds tensors and stand-ins.

    Raises ``FileNotFoundError`` if the file is missing, :class:`UnsafeCheckpointError` if it names a
    global outside the allow-list, ``pickle.UnpicklingError`` if it is not a torch pickle at all.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if zipfile.is_zipfile(path):
        return _zip_load(path)
    with open(path, "rb") as f:
        head = f.read(2)
    if head[:1] != b"\x80":
        raise pickle.UnpicklingError(f"{path}: not a torch.save file (neither a zip archive nor a pickle)")
    return _legacy_load(path)


def flatten_module_state(obj: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Walk a stand-in module tree: (``state_dict``-style tensors, module path -> pickled class name)."""
    tensors: dict[str, torch.Tensor] = {}
    classes: dict[str, str] = {prefix.rstrip("."): obj.pickled_global}
    state = obj.state if isinstance(obj.state, dict) else {}
    for group in ("_parameters", "_buffers"):
        for name, value in (state.get(group) or {}).items():
            if isinstance(value, torch.Tensor):
                tensors[prefix + name] = value
    for name, child in (state.get("_modules") or {}).items():
        if isinstance(child, PickledObject):
            t, c = flatten_module_state(child, f"{prefix}{name}.")
            tensors.update(t)
            classes.update(c)
    return tensors, classes
