"""The rooms' one-way order (beit/rooms.py), checked on the AST of every source file, lazy imports included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from beit.rooms import ROOM_LEVELS, may_import

SRC = Path(__file__).resolve().parents[1] / "src" / "beit"


def room_of(rel: Path) -> str:
    """``models/beit.py`` -> ``models``; ``cli.py`` -> ``cli``; ``__init__.py`` -> ``__init__``."""
    return rel.parts[0].removesuffix(".py")


def beit_imports(source: str, rel: Path) -> list[tuple[int, str]]:
    """(line, imported room) for every import of ``beit.X`` in ``source`` (top level or inside a function),
    for a file at ``rel`` under ``src/beit`` (relative imports are resolved from there)."""
    package = ["beit", *rel.parts[:-1]]
    found = []
    for node in ast.walk(ast.parse(source, str(rel))):
        if isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                modules = (([".".join([*base, node.module])]) if node.module
                           else [".".join([*base, a.name]) for a in node.names])
            else:
                modules = [node.module or ""]
        else:
            continue
        found += [(node.lineno, m.split(".")[1]) for m in modules if m.startswith("beit.")]
    return found


def test_every_source_file_respects_the_room_order() -> None:
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 50
    broken = []
    for f in files:
        rel = f.relative_to(SRC)
        broken += [f"{rel}:{line} ({room_of(rel)}) imports beit.{room}"
                   for line, room in beit_imports(f.read_text(), rel) if not may_import(room_of(rel), room)]
    assert not broken, "imports against the room order of beit/rooms.py:\n" + "\n".join(broken)


def test_the_order_says_what_the_architecture_promises() -> None:
    for room in ("models", "data", "tokenizers"):
        assert not any(may_import(room, higher) for higher in ("interop", "engine", "tasks", "cli")), room
    assert not may_import("engine", "tasks") and not may_import("engine", "cli")
    assert [r for r in ROOM_LEVELS if r != "cli" and may_import(r, "cli")] == ["__main__"]
    assert may_import("tasks", "engine") and may_import("interop", "models") and not may_import("models", "data")
    # the bottom room: every room may use its text helpers, and it uses none of theirs
    assert all(may_import(room, "_text") for room in ROOM_LEVELS)
    assert not any(may_import("_text", room) for room in ROOM_LEVELS if room != "_text")


def test_a_forbidden_lazy_import_is_caught() -> None:
    """The checker itself: imports hidden inside a function of models/ are found and refused."""
    src = "import torch\n\ndef f():\n    from ..engine import Trainer\n    import beit.cli\n    from . import relpos\n"
    found = beit_imports(src, Path("models/fake.py"))
    assert found == [(4, "engine"), (5, "cli"), (6, "models")]
    assert [may_import("models", r) for _, r in found] == [False, False, True]
    with pytest.raises(KeyError, match="'newroom' is not a room of beit: add it to beit/rooms.py ROOM_LEVELS"):
        may_import("newroom", "models")
