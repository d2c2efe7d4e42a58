"""YAML presets shipped inside the package: ``beit <command> -c NAME`` finds them from any folder.

Each ``NAME.yaml`` here starts with a one-line ``# description``; ``beit configs`` lists them.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["describe", "list_presets", "preset_dir", "preset_path", "resolve_config"]


def _dir() -> Path:
    return Path(str(resources.files(__name__)))


def preset_dir() -> Path:
    """The folder of the shipped presets (inside the installed package)."""
    return _dir()


def list_presets() -> list[str]:
    """Names of the shipped presets (file stems), sorted."""
    return sorted(p.stem for p in _dir().glob("*.yaml"))


def describe(name: str) -> str:
    """The preset's one-line description: its first line without the leading ``#``."""
    first = preset_path(name).read_text().splitlines()[:1]
    return first[0].lstrip("#").strip() if first and first[0].startswith("#") else ""


def preset_path(name: str) -> Path:
    """The file of the shipped preset ``name``. Raises FileNotFoundError listing the presets if unknown."""
    path = _dir() / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"unknown preset '{name}'; presets: {', '.join(list_presets())} "
                                "(or give the path of a YAML file)")
    return path


def resolve_config(name_or_path: str | None, prefix: str = "") -> str | None:
    """A ``-c`` value as a file: an existing path as given, else a shipped preset by name.

    ``finetune_base``, ``finetune_base.yaml`` and ``configs/finetune_base.yaml`` (the spelling of the
    presets' old place at the repository root) all name the shipped preset when no such file exists.
    ``None``/``""`` stays ``None``. Raises FileNotFoundError naming the value and listing the presets (those
    whose names start with ``prefix``: the ones the command takes), or IsADirectoryError for a folder.
    """
    if not name_or_path:
        return None
    path = Path(name_or_path)
    if path.is_file():
        return str(path)
    if path.is_dir():
        raise IsADirectoryError(f"-c {name_or_path} is a folder, not a config file: give a .yaml file or a preset name")
    stem = path.name[:-5] if path.name.endswith((".yaml", ".yml")) else path.name
    old_place = path.parent in (Path("."), Path("configs"))
    if old_place and (_dir() / f"{stem}.yaml").is_file():
        return str(_dir() / f"{stem}.yaml")
    presets = [p for p in list_presets() if p.startswith(prefix)] or list_presets()
    if path.suffix in (".yaml", ".yml") or not old_place:
        raise FileNotFoundError(f"config file not found: {name_or_path} (presets: {', '.join(presets)})")
    if not (_dir() / f"{stem}.yaml").is_file():
        raise FileNotFoundError(f"unknown preset '{stem}'; presets: {', '.join(presets)} (or give the path of a "
                                "YAML file)")
    return str(preset_path(stem))
