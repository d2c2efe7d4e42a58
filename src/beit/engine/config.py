"""Typed run configs: dataclass schemas + YAML files + ``key=value`` overrides, checked before any work.

Every task nests :class:`TrainConfig` inside its own dataclass, e.g.::

    @dataclass
    class PretrainConfig:
        train: TrainConfig = field(default_factory=lambda: TrainConfig(betas=(0.9, 0.98)))
        model: ModelConfig = field(default_factory=ModelConfig)

    cfg = load_config(PretrainConfig, "run.yaml", ["train.lr=1.5e-3", "model.depth=6"])

Any dataclass in the tree may define ``validate(self) -> None`` raising :class:`ConfigError`; ``load_config``
calls it on every node and prefixes the dotted path, so a typo or a bad value fails in the first second
with the offending key named, not after an hour of data loading.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from .precision import PRECISIONS

__all__ = ["ConfigError", "TrainConfig", "check_output_dir", "file_in_the_way", "load_config", "load_run_config",
           "output_dir_removed_on_failure", "save_config", "stored_config", "to_dict", "validate_config"]

T = TypeVar("T")


def rebuilt_error(cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any]) -> BaseException:
    """An error as it was pickled (see :class:`PicklableError`): its ``args`` and attributes, without calling its
    ``__init__``."""
    error = cls.__new__(cls, *args)
    error.args = args
    error.__dict__.update(state)
    return error


class PicklableError:
    """Base (first, before the exception class) of an error whose ``__init__`` takes more than its message: pickle
    would call that ``__init__`` with ``args`` (the one message) and fail, so an error raised in another process
    (e.g. a ProcessPoolExecutor worker) would not come back and that pool would be broken instead. Pickled with
    its ``args`` and attributes, it is rebuilt as it was (:func:`rebuilt_error`)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return rebuilt_error, (type(self), self.args, self.__dict__)  # type: ignore[attr-defined]


class ConfigError(PicklableError, ValueError):
    """A config key is unknown, has the wrong type, or holds a bad value. ``key`` is the dotted path."""

    def __init__(self, key: str, message: str):
        self.key, self.message = key, message
        super().__init__(f"config key '{key}': {message}" if key else message)


@dataclass
class TrainConfig:
    """Everything the engine needs; model/data settings live in the task's own config."""

    output_dir: str = "runs/default"
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    batch_size: int = 64  # per rank, per micro-step
    num_workers: int = 4
    seed: int = 0
    # optimizer
    lr: float = 1e-3  # peak lr, used as given (tasks scale it by batch size if their recipe says so)
    min_lr: float = 1e-6
    warmup_epochs: float = 0.0
    warmup_steps: int = 0  # overrides warmup_epochs when > 0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)  # BEiT pre-training uses (0.9, 0.98)
    eps: float = 1e-8
    clip_grad: float | None = None  # max grad norm; None or 0 = off (the norm is logged either way)
    layer_decay: float = 1.0  # 1.0 = off; fine-tuning uses 0.65-0.9
    schedule: str = "cosine"  # cosine | poly | constant (after linear warmup)
    poly_power: float = 1.0
    accum_steps: int = 1  # micro-batches per optimizer step
    ema: float = 0.0  # model EMA decay, 0 = off
    # runtime
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    compile: bool = False  # torch.compile the model (train.compile_scope says how much of it)
    # blocks: each of model.blocks (regional; one block's compile, DDP/FSDP-friendly) | model: the whole model
    # in one graph (fewer host-side wrappers a step: +9% fine-tuning, +15% pre-training img/s on a 21M
    # CIFAR-size model, RESULTS 9; a longer compile; a single process or DDP, not FSDP)
    compile_scope: str = "blocks"
    distributed: str = "ddp"  # ddp | fsdp (FSDP2 fully_shard per block); ignored in a single process
    # logging / checkpoints
    log_every: int = 10  # steps
    ckpt_every: int = 1000  # steps; also saved at every epoch end and at the end
    keep_last: int = 3  # step_XXXXXXX.pt files kept; last.pt/best.pt are always kept
    eval_every: int = 1  # epochs; 0 = only at the end
    image_every: int = 0  # steps between visualize_fn calls; 0 = off
    resume: str = ""  # "" | path/to/ckpt.pt | "auto" (output_dir/last.pt, else its newest step_*.pt, if any)
    overwrite: bool = False  # a fresh run may replace an earlier run in output_dir (else it is refused)
    allow_config_change: bool = False  # resume even if keys that define the run changed (else refused)

    def validate(self) -> None:
        """Reject values that would fail (or silently misbehave) later."""
        positive = ["epochs", "batch_size", "accum_steps", "log_every", "ckpt_every"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(name, f"must be > 0, got {getattr(self, name)}")
        non_negative = ["num_workers", "min_lr", "warmup_epochs", "warmup_steps", "weight_decay",
                        "keep_last", "eval_every", "image_every", "eps"]
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")
        if self.min_lr > self.lr:
            raise ConfigError("min_lr", f"must be <= lr ({self.lr}), got {self.min_lr}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ConfigError("max_steps", f"must be > 0 or null, got {self.max_steps}")
        if self.max_steps is not None and self.warmup_steps >= self.max_steps:
            raise ConfigError("warmup_steps", f"warmup ({self.warmup_steps}) must be shorter than "
                                              f"max_steps ({self.max_steps})")
        if self.max_steps is None and self.warmup_steps == 0 and self.warmup_epochs >= self.epochs:
            raise ConfigError("warmup_epochs", f"warmup ({self.warmup_epochs}) must be shorter than "
                                               f"epochs ({self.epochs})")
        # an epoch is at least one step: warmup_epochs alone may already be as long as max_steps (a preset's
        # warmup_epochs=20 with train.max_steps=10); the exact check, which needs the data's size, is the engine's
        # check_schedule
        if self.max_steps is not None and self.warmup_steps == 0 and round(self.warmup_epochs) >= self.max_steps:
            raise ConfigError("warmup_epochs", f"warmup ({self.warmup_epochs} epochs, at least "
                                               f"{round(self.warmup_epochs)} steps) must be shorter than max_steps "
                                               f"({self.max_steps}): lower train.warmup_epochs, or set "
                                               "train.warmup_steps")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError("betas", f"must be two values in [0, 1), got {list(self.betas)}")
        if self.clip_grad is not None and self.clip_grad < 0:
            raise ConfigError("clip_grad", f"must be > 0 (or 0/null = off), got {self.clip_grad}")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError("layer_decay", f"must be in (0, 1], got {self.layer_decay}")
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError("ema", f"must be in [0, 1) (0 = off), got {self.ema}")
        if self.poly_power <= 0:
            raise ConfigError("poly_power", f"must be > 0, got {self.poly_power}")
        choices = {"schedule": ("cosine", "poly", "constant"), "precision": PRECISIONS,
                   "distributed": ("ddp", "fsdp"), "compile_scope": ("blocks", "model")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(name, f"must be one of {allowed}, got '{getattr(self, name)}'")
        if not self.output_dir:
            raise ConfigError("output_dir", "must not be empty")


# Integer fields that may be negative (seeds, label indices); every other int must be >= 0.
SIGNED_INT_FIELDS = frozenset({"seed", "split_seed", "ignore_index"})
# Integer fields that count or measure something: they must be > 0 (0 allowed only where the field's default
# is 0, which then documents "0 = auto / off / all").
_SIZE_SUFFIXES = ("size", "sizes", "dim", "depth", "heads", "channels", "hidden", "epochs", "steps_per_epoch",
                  "pixels")


def _is_size_name(name: str) -> bool:
    return name.endswith(_SIZE_SUFFIXES) or name in ("batch_size", "accum_steps", "repeat", "vocab_size")


def _check_value(key: str, name: str, value: Any, zero_ok: bool) -> None:
    """Generic checks on one value (recursing into lists/tuples): finite floats, non-negative ints, sizes > 0."""
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, list | tuple):
        for v in value:
            _check_value(key, name, v, zero_ok)
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(key, f"must be a finite number, got {value}")
    if isinstance(value, int) and name not in SIGNED_INT_FIELDS and not name.endswith(("_index", "indices")):
        if _is_size_name(name) and value <= 0 and not (zero_ok and value == 0):
            raise ConfigError(key, f"must be > 0, got {value}")
        if value < 0:
            raise ConfigError(key, f"must be >= 0{' (0 = ' + 'off/all/auto)' if zero_ok else ''}, got {value}")


def check_values(cfg: Any, prefix: str = "") -> None:
    """Checks by kind over every field of every dataclass node of ``cfg``, before any ``validate()`` method runs
    (so that those can divide by sizes and compare numbers safely):

    - every float (also inside lists/tuples) is finite: ``train.lr=inf``, ``train.clip_grad=nan`` are refused;
    - every int is >= 0, except :data:`SIGNED_INT_FIELDS` and ``*_index`` / ``*indices`` fields;
    - every size-like int (``*size``, ``*_dim``, ``depth``, ``*heads``, ``*channels``, ``batch_size``, ...) is > 0,
      or 0 where the field's default is 0 (there ``0`` documents "auto" / "off").

    Raises :class:`ConfigError` with the dotted key.
    """
    if not dataclasses.is_dataclass(cfg):
        return
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check_values(value, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            try:
                default = f.default_factory()  # type: ignore[misc]
            except Exception:  # noqa: BLE001 - a factory that needs context: no zero exemption
                default = None
        _check_value(prefix + f.name, f.name, value, zero_ok=default == 0)


def validate_config(cfg: Any, prefix: str = "") -> None:
    """Generic checks (:func:`check_values`) on the whole tree, then ``validate()`` on every dataclass node, its
    nested nodes before it (a node's checks may use its parts: they are sound by then); errors get the full dotted
    key. A validator that trips over a value (e.g. divides by zero) becomes a :class:`ConfigError` naming the node
    instead of a traceback."""
    if not prefix:
        check_values(cfg)
    if not dataclasses.is_dataclass(cfg):
        return
    for f in dataclasses.fields(cfg):
        validate_config(getattr(cfg, f.name), f"{prefix}{f.name}.")
    if hasattr(cfg, "validate"):
        try:
            cfg.validate()
        except ConfigError as e:
            raise ConfigError(prefix + e.key, e.message) from None
        except (ArithmeticError, TypeError) as e:
            raise ConfigError(prefix.rstrip(".") or "config", f"invalid values ({type(e).__name__}: {e})") from None


def file_in_the_way(path: str | os.PathLike) -> Path | None:
    """The file standing where ``path`` or one of its folders should be (the first existing part of the path,
    when it is not a folder), else None. For "File exists" / "Not a directory" errors that name a deeper path."""
    p = Path(os.fsdecode(path))
    for part in (p, *p.parents):
        if part.exists():
            return None if part.is_dir() else part
    return None


#: the folders :func:`check_output_dir` made inside :func:`output_dir_removed_on_failure` (None: outside one)
_MADE: ContextVar[list[Path] | None] = ContextVar("beit_output_dirs_made", default=None)


def check_output_dir(path: str | Path) -> Path:
    """Fail now, not after the dataset is built, if ``path`` cannot be used as an output folder.

    Creates the folder (and parents) and writes/removes a probe file in it; inside
    :func:`output_dir_removed_on_failure` the folders it made are removed again if the run then fails before
    writing into them. Raises :class:`ConfigError` (key ``train.output_dir``) naming the folder and the reason: a
    file in the way, no permission, read-only or full file system.
    """
    path = Path(path)
    probe = path / f".beit_write_probe_{os.getpid()}"
    missing = _folders_to_make(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        made = _MADE.get()
        if made is not None:
            made.extend(missing)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        blocker = file_in_the_way(path)
        if blocker is not None:
            raise ConfigError("train.output_dir",
                              f"cannot write to {path}: {blocker} is a file, not a folder") from None
        why = e.strerror or type(e).__name__
        where = f" ({e.filename})" if e.filename and str(e.filename) not in (str(path), str(probe)) else ""
        raise ConfigError("train.output_dir", f"cannot write to {path}: {why}{where}") from None
    return path


def _folders_to_make(path: Path) -> list[Path]:
    """The folders ``path.mkdir(parents=True)`` makes, the deepest first, each by its real path (no ``..``, no link).

    A ``..`` after a missing folder cannot be judged by its own path (``a/new/../b`` does not exist while ``a/new``
    does not, whether or not ``a/b`` does): the path is followed from its deepest existing part (resolved), a ``..``
    below it is the folder's parent (mkdir makes real folders there), and a folder counts only if it is not there
    now. ``--out a/new/../b`` makes ``a/new`` alone when ``a/b`` exists; ``a/b`` is never taken for one it made.
    """
    existing = next(p for p in (path, *path.parents) if os.path.lexists(p))  # "." or "/" at the latest
    here = Path(os.path.realpath(existing))
    made: list[Path] = []
    for name in path.parts[len(existing.parts):]:
        here = here.parent if name == ".." else here / name
        if here not in made and not os.path.lexists(here):
            made.append(here)
    return made[::-1]


@contextmanager
def output_dir_removed_on_failure() -> Iterator[None]:
    """Inside the block, the output folder that :func:`check_output_dir` makes (with the parents it makes for it)
    is removed again when the block fails before anything was written into it: a check made after the config's
    (the data, the model, the schedule) or an interrupt during the set-up left an empty run folder behind
    (``beit finetune data.train_dir=/nonexistent`` left ``--out`` with an empty ``log.txt``).

    Only folders this block made are removed, each only while it is empty or holds nothing but an empty
    ``log.txt`` (the run's logging: this process's handler on it is closed first; under torchrun the rank that
    made the folder may not be the one that logs); a folder that existed before, or holds anything else, is kept.
    The error itself goes on, unchanged.
    """
    made: list[Path] = []
    token = _MADE.set(made)
    try:
        yield
    except BaseException:
        _remove_unused(made)
        raise
    finally:
        _MADE.reset(token)


def _remove_unused(folders: Sequence[Path]) -> None:
    """Remove each of ``folders`` (the deepest first) while it is empty or holds only an empty ``log.txt``; stop at
    the first one that holds anything else."""
    from .logging import close_run_log

    for folder in folders:
        try:
            log = folder / "log.txt"
            if os.listdir(folder) == ["log.txt"] and log.is_file() and log.stat().st_size == 0:
                close_run_log(log)
                log.unlink()
            folder.rmdir()  # only an empty folder: a file written meanwhile keeps it
        except OSError:  # gone, or not empty: kept, and so are its parents
            return


def _key_of(e: OmegaConfBaseException, fallback: str) -> str:
    return getattr(e, "full_key", None) or fallback


def _msg_of(e: Exception) -> str:
    return str(e).splitlines()[0]


def _plain(msg: str, key: str = "") -> str:
    """OmegaConf's node jargon in user terms ("AnyNode is not a ListConfig ..." -> a list is expected)."""
    if re.search(r"is not a (TupleConfig, )?ListConfig", msg):
        key = key or "key"
        return f"a list is expected here, e.g. {key}=[a,b] (quote it for the shell: \"{key}=[a,b]\")"
    return msg


def _merge_override(cfg: DictConfig, item: str) -> DictConfig:
    """``cfg`` with the ``key=value`` override ``item`` merged in. An empty value (``key=``) is null, as YAML reads
    it, for a key that takes null; for a text key that does not (``data.val_ann=``), it is the empty text ``''``."""
    try:
        return OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
    except OmegaConfBaseException:
        key, _, value = item.partition("=")
        if value.strip() or not isinstance(OmegaConf.select(cfg, key, default=None), str):
            raise
        return OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{key}=''"]))


def load_config(schema: type[T] | T, path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Merge ``schema`` defaults <- YAML file <- ``key=value`` overrides; return a validated dataclass.

    ``schema`` is a dataclass type or instance (an instance gives task-specific defaults). Overrides are
    dotted (``train.lr=3e-4``, ``train.betas=[0.9,0.98]``, ``train.max_steps=null``); a leading ``--``
    is accepted; an empty value (``data.val_ann=``) is null, or ``''`` for a text key that takes no null.
    Raises :class:`ConfigError` naming the key on unknown keys, wrong types or bad values.
    """
    try:
        cfg = OmegaConf.structured(schema)
    except OmegaConfBaseException as e:
        raise ConfigError("", f"bad config schema {schema!r}: {_msg_of(e)}") from None
    if path:
        path = Path(path)
        if path.is_dir():
            raise ConfigError("", f"{path} is a folder, not a config file (give a .yaml file or a preset name)")
        if not path.is_file():
            raise ConfigError("", f"config file not found: {path}")
        try:
            file_cfg = OmegaConf.load(path)
            if not isinstance(file_cfg, DictConfig):
                raise ConfigError("", f"{path}: a config is a mapping of keys (key: value lines), not a "
                                      f"{type(file_cfg).__name__.replace('Config', '').lower() or 'list'}")
            cfg = OmegaConf.merge(cfg, file_cfg)
        except OmegaConfBaseException as e:
            raise ConfigError(_key_of(e, ""), f"{_plain(_msg_of(e), _key_of(e, ''))} (in {path})") from None
        except TypeError:  # a mapping where the schema has a list (or the other way round)
            raise ConfigError("", f"{path}: a key holds another kind of value than it takes (a mapping where a list "
                                  "or a single value is expected, or the other way round)") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f", line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or _msg_of(e)
            if mark is not None and "\t" in (path.read_text(errors="replace").splitlines()[mark.line:mark.line + 1]
                                             or [""])[0]:
                problem += "; that line holds a tab: YAML indents with spaces"
            raise ConfigError("", f"{path}{line}: not valid YAML ({problem})") from None
        except UnicodeDecodeError:  # e.g. a checkpoint given as -c
            if path.read_bytes()[:2] in (b"\xff\xfe", b"\xfe\xff"):
                raise ConfigError("", f"{path}: a UTF-16 text file; save it as UTF-8 (YAML configs are read as "
                                      "UTF-8)") from None
            raise ConfigError("", f"{path}: not a YAML config (binary data, not text): -c takes a .yaml file or a "
                                  "preset name; a checkpoint or model goes where the command takes it "
                                  "(`beit <task> <command> --help`)") from None
    for item in overrides or []:
        item = item[2:] if item.startswith("--") else item
        key, sep, _ = item.partition("=")
        if not sep or not key:
            raise ConfigError(key, f"override '{item}' is not of the form key=value")
        try:
            cfg = _merge_override(cfg, item)
        except OmegaConfBaseException as e:
            msg = _plain(_msg_of(e), _key_of(e, key))
            if not item.partition("=")[2].strip():  # `key=`: YAML reads nothing as null, which this key does not take
                msg = f"an empty value (read as null), which it does not take: give a value ({key}=...) ({msg})"
            raise ConfigError(_key_of(e, key), msg) from None
        except TypeError:  # OmegaConf: "Cannot merge incompatible container types" (a mapping for a list, ...)
            raise ConfigError(key, f"{item.partition('=')[2]!r}: another kind of value than this key takes "
                                   "(a mapping where a list or a single value is expected, or the other way round)"
                              ) from None
    try:
        obj = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as e:  # a key without a default that nothing set
        key = _key_of(e, "")
        raise ConfigError(key, f"required, not set: add {key}=... on the command line or in the -c file") from None
    except OmegaConfBaseException as e:  # bad interpolations
        raise ConfigError(_key_of(e, ""), _msg_of(e)) from None
    validate_config(obj)
    return obj



def load_run_config(schema: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
                    image_folders: Sequence[str] = ()) -> T:
    """:func:`load_config` for a training run, then :func:`check_output_outside` of its ``image_folders`` (dotted
    keys of the folders it reads images from) and :func:`check_output_dir` on its ``train.output_dir``: every
    check a training command makes before any work (raises :class:`ConfigError`, or ``OSError`` naming the
    folder that cannot be written)."""
    cfg = load_config(schema, path, overrides)
    check_output_outside(cfg, image_folders)
    check_output_dir(cfg.train.output_dir)
    return cfg


def check_output_outside(cfg: Any, image_folders: Sequence[str]) -> None:
    """``train.output_dir`` is none of the folders the run reads images from (``image_folders``: dotted keys of
    ``cfg``), nor inside one, before the folder is created: the run's folders (``model/``, ``tb/``, ``eval/``) would
    become classes of a class-folder set and its pictures (``curves.png``) images of a searched one, which the next
    run reads (a fine-tuning into its own ``data.train_dir`` left a set that no later run accepts).

    Raises:
        ConfigError: key ``train.output_dir``, naming the folder's key and value.
    """
    from ..data.datasets import lies_within

    out = os.fsdecode(cfg.train.output_dir)
    for key in image_folders:
        value: Any = cfg
        for part in key.split("."):
            value = getattr(value, part, None)
        if not isinstance(value, str) or not value or not Path(value).expanduser().is_dir():
            continue
        if lies_within(out, value):
            where = "is" if lies_within(value, out) else "is inside"
            raise ConfigError("train.output_dir", f"{cfg.train.output_dir} {where} the image folder {key}={value}: the "
                                                  "run's checkpoints, folders and pictures would be read as data by "
                                                  "the next run; choose an output_dir outside it")


def stored_config(schema: type[T] | T, saved: Any, path: str | Path | None = None,
                  overrides: list[str] | None = None, source: str = "the checkpoint") -> T:
    """A run config stored in a checkpoint (``saved``: its dict), read back into ``schema``, then a YAML file
    and ``key=value`` overrides on top (as :func:`load_config`); validated.

    Keys the schema no longer has, or values of the wrong type, raise ConfigError naming ``source`` and the
    key (the checkpoint is not one of this task's, or from an incompatible version).
    """
    try:
        base = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), saved or {}))
    except OmegaConfBaseException as e:
        name = getattr(schema, "__name__", type(schema).__name__)
        raise ConfigError(_key_of(e, ""), f"{source}: its stored config does not fit {name} ({_msg_of(e)})") from None
    return load_config(base, path, overrides)


def to_dict(cfg: Any) -> dict:
    """Resolved config as plain containers and scalars (safe for YAML, JSON, ``torch.load(weights_only)``)."""
    if isinstance(cfg, dict):
        return cfg
    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.structured(cfg)
    return OmegaConf.to_container(node, resolve=True, enum_to_str=True)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML, so a run can be reproduced with ``load_config(Schema, path)``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg))))
