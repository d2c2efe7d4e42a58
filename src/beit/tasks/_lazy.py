"""The lazy ``__init__`` every task package shares: names are imported from their module on first use.

A task package's ``__init__`` is a table ``_WHERE`` (public name -> the module of the package that defines it)
and ``__getattr__ = lazy_names(__name__, _WHERE)``, so that ``import beit.tasks.<task>`` (and ``beit --help``,
which reads the task's ``cli``) imports nothing heavy: no torch models, no data pipeline, no engine.

Where a name is also the name of a module of the package (``segmentation.train``, ``layout.train``,
``classify.linprobe``), ``beit.tasks.<task>.<name>`` is the function, as when the packages imported eagerly;
the module itself is reached with ``from beit.tasks.<task>.<name> import ...`` (or ``sys.modules``).
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["lazy_names"]


class _TaskPackage(types.ModuleType):
    """A package whose functions keep their name when a module of the same name is imported."""

    _shadowed: frozenset[str] = frozenset()

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._shadowed and isinstance(value, types.ModuleType):
            return  # the import system binds a loaded submodule to its package: keep the function's name
        super().__setattr__(name, value)


def lazy_names(package: str, where: Mapping[str, str]) -> Callable[[str], Any]:
    """The module ``__getattr__`` of ``package``: ``name`` is imported from ``package.<where[name]>``.

    An unknown name raises ``AttributeError("module 'beit.tasks.x' has no attribute 'name'")``.
    """
    module = sys.modules[package]
    folder = Path(module.__file__ or "").parent
    module.__class__ = _TaskPackage
    module._shadowed = frozenset(n for n in where if (folder / f"{n}.py").exists())  # type: ignore[attr-defined]

    def __getattr__(name: str) -> Any:  # noqa: N807 - the module hook
        if name in where:
            return getattr(importlib.import_module(f".{where[name]}", package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
