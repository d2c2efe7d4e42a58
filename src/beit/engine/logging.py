"""Metrics out of the trainer: console, TensorBoard scalars, ``metrics.jsonl`` and a ``curves.png``.

``metrics.jsonl`` has one JSON object per log step, ``{"split": "train"|"eval", "step", "epoch", ...}``,
and is the source of truth: ``plot_curves`` and the tests read it back. Only the main rank writes.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm.contrib.logging import logging_redirect_tqdm

from .._text import first_few
from .rundir import atomic_write

__all__ = ["RUN_SEPARATOR", "MetricLogger", "close_run_log", "console_through_tqdm", "get_logger", "log_to_file",
           "plot_curves", "quiet_console", "print_summary", "read_metrics", "setup_logging"]

_LOGGER_NAME = "beit"


def get_logger() -> logging.Logger:
    return logging.getLogger(_LOGGER_NAME)


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is now (test runners and notebooks swap it)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


class _RunFileHandler(logging.FileHandler):
    """``output_dir/log.txt`` of the current run."""


def _formatter() -> logging.Formatter:
    return logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S")


def _console_handlers(logger: logging.Logger) -> list[logging.Handler]:
    """The logger's console handlers, adding the one console handler first if it has none."""
    if not any(isinstance(h, _StdoutHandler) for h in logger.handlers):
        h = _StdoutHandler()
        h.setFormatter(_formatter())
        logger.addHandler(h)
    return [h for h in logger.handlers if isinstance(h, _StdoutHandler)]


#: the line that starts each run's part of a ``log.txt`` that earlier runs wrote to (the file is appended to:
#: ``--overwrite`` and ``--resume`` keep it, see ``beit.engine.rundir``)
RUN_SEPARATOR = "---------- a new run starts here (pid {pid}, {time}); the lines above are earlier runs' ----------"


def _mark_new_run(path: Path) -> None:
    """Append :data:`RUN_SEPARATOR` to ``path`` when it holds earlier runs' lines (a missing or empty file: nothing)."""
    try:
        if path.stat().st_size == 0:
            return
    except OSError:
        return
    when = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    with open(path, "a") as f:
        f.write(RUN_SEPARATOR.format(pid=os.getpid(), time=when) + "\n")


class _SaidByTheFirstRank(logging.Filter):
    """Drops the records marked :data:`beit._text.ALIKE_ON_EVERY_RANK`: on the console of ranks other than the
    first, which would print them word for word as the first rank does."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "alike_on_every_rank", False)


def setup_logging(output_dir: str | Path | None, main: bool) -> logging.Logger:
    """Console (INFO) and ``output_dir/log.txt`` handlers on the main rank; other ranks only warn, and not the
    warnings marked :data:`beit._text.ALIKE_ON_EVERY_RANK` (the first rank prints those for all).

    Idempotent: handlers are added once per file.
    """
    logger = get_logger()
    logger.setLevel(logging.INFO if main else logging.WARNING)
    logger.propagate = False
    for h in _console_handlers(logger):
        for f in [f for f in h.filters if isinstance(f, _SaidByTheFirstRank)]:
            h.removeFilter(f)
        if not main:
            h.addFilter(_SaidByTheFirstRank())
    if main and output_dir is not None:
        path = str(Path(output_dir).resolve() / "log.txt")
        for h in [h for h in logger.handlers if isinstance(h, _RunFileHandler)]:
            if h.baseFilename != path:  # a new run in the same process: log to its own dir only
                logger.removeHandler(h)
                h.close()
        if not any(isinstance(h, _RunFileHandler) for h in logger.handlers):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            _mark_new_run(Path(path))
            fh = _RunFileHandler(path)
            fh.setFormatter(_formatter())
            logger.addHandler(fh)
    return logger


def close_run_log(path: str | Path) -> None:
    """Detach and close the handler that :func:`setup_logging` opened on ``path`` (a run's ``log.txt``), if any:
    before the file is removed (:func:`beit.engine.config.output_dir_removed_on_failure`)."""
    logger = get_logger()
    target = str(Path(path).resolve())
    for h in [h for h in logger.handlers if isinstance(h, _RunFileHandler) and h.baseFilename == target]:
        logger.removeHandler(h)
        h.close()


def log_to_file(logger: logging.Logger, level: int, message: str) -> None:
    """``message`` into the run's ``log.txt`` only (not the console): for a line that the caller also shows in
    its own words (``beit``'s last line of an interrupted run), so the record is complete without a repeat."""
    if not logger.isEnabledFor(level):
        return
    record = logger.makeRecord(logger.name, level, "(engine)", 0, message, None, None)
    for h in logger.handlers:
        if isinstance(h, logging.FileHandler) and record.levelno >= h.level:
            h.handle(record)


@contextmanager
def quiet_console(level: int = logging.WARNING) -> Iterator[None]:
    """Inside the block the console shows only records at ``level`` or above, and no progress bars of the data
    loading (``beit.data.datasets.SHOW_PROGRESS``); each run's ``log.txt`` still gets everything. For drivers that
    run many trainings in a row (``beit demo``'s seeds)."""
    from ..data import datasets

    handlers = _console_handlers(get_logger())
    before = [h.level for h in handlers]
    progress, datasets.SHOW_PROGRESS = datasets.SHOW_PROGRESS, False
    for h in handlers:
        h.setLevel(level)
    try:
        yield
    finally:
        datasets.SHOW_PROGRESS = progress
        for h, lvl in zip(handlers, before):
            h.setLevel(lvl)


@contextmanager
def console_through_tqdm(logger: logging.Logger) -> Iterator[None]:
    """tqdm's ``logging_redirect_tqdm`` (console lines printed above the progress bar) that keeps the console's
    level (tqdm's handler would show everything, :func:`quiet_console` included) and filters (tqdm before 4.70 drops
    them: a rank other than the first printed the warnings marked ``ALIKE_ON_EVERY_RANK`` during training)."""
    consoles = [h for h in logger.handlers if isinstance(h, _StdoutHandler)]
    levels = [h.level for h in consoles]
    filters = [f for h in consoles for f in h.filters]
    before = list(logger.handlers)
    with logging_redirect_tqdm(loggers=[logger]):
        for h in logger.handlers:
            if h not in before:  # tqdm's stand-in for the console (a handler of the caller's own: left as it is)
                if levels:
                    h.setLevel(max(levels))
                for f in filters:
                    h.addFilter(f)  # none twice (addFilter checks): tqdm 4.70+ copies them itself
        yield


def read_metrics(path: str | Path, split: str | None = "train") -> list[dict[str, Any]]:
    """Lines of ``metrics.jsonl`` (of one split, or all with ``split=None``).

    A line that is not a JSON object (cut short by a crash or a full disk) is skipped with a warning naming
    the file and line, so an incomplete file never blocks a resume or a plot.
    """
    path = Path(path)
    if not path.is_file():
        return []
    rows, bad = [], []
    for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad.append(i)
    if bad:
        lines = first_few(bad, 5)
        get_logger().warning(f"{path}: skipped {len(bad)} incomplete or damaged line(s) (line {lines}), "
                             "e.g. cut short by a crash")
    return [r for r in rows if split is None or r.get("split") == split]


class MetricLogger:
    """Writes scalars to TensorBoard (``train/loss``, ``train/lr``, ``eval/acc1``...) and ``metrics.jsonl``.

    ``resume_step``: drop JSONL lines and TensorBoard events after that step, so a run resumed from an
    older checkpoint does not leave duplicate, diverging points behind.
    """

    def __init__(self, output_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True,
                 resume_step: int | None = None):
        self.dir = Path(output_dir)
        self.enabled = enabled
        self.jsonl = self.dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.jsonl.unlink(missing_ok=True)
        elif self.jsonl.is_file():  # damaged lines (a crash mid-write) are dropped here too
            keep = [r for r in read_metrics(self.jsonl, split=None) if r.get("step", 0) <= resume_step]
            with atomic_write(self.jsonl) as tmp:
                tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.dir / "tb"), purge_step=resume_step)
            except ImportError:  # tensorboard is optional at runtime
                get_logger().warning("tensorboard not installed: no TensorBoard logs")

    def log(self, step: int, metrics: dict[str, float], *, split: str = "train",
            epoch: int | None = None) -> None:
        if not self.enabled:
            return
        row: dict[str, Any] = {"split": split, "step": step}
        if epoch is not None:
            row["epoch"] = epoch
        row.update({k: float(v) for k, v in metrics.items()})
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(f"{split}/{k}", float(v), step)

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def print_summary(result: Mapping[str, Any], units: Mapping[str, str] | None = None, skip: Sequence[str] = ()
                  ) -> None:
    """Print a command's summary of a run, ``key: value`` a line (``skip``'s keys left out), with the unit of the
    key's metric when ``units`` (metric name -> unit, the task's) has one: ``train/mim_acc: 0.26 (fraction, 0-1)``,
    ``top1: 85.3 (percent)``.

    The metric of a key is its last ``/`` part without ``ema_`` (``train/acc``, ``eval/ema_top1``, ``best/top1``:
    ``acc``, ``top1``, ``top1``). Only the text says the unit: ``metrics.jsonl`` keeps the values as logged.
    """
    for key, value in result.items():
        if key not in skip:
            unit = (units or {}).get(key.rsplit("/", 1)[-1].removeprefix("ema_"))
            print(f"{key}: {value}" + (f" ({unit})" if unit else ""))


def _panel_names(series: dict[tuple[str, str], tuple[list[float], list[float]]]) -> list[str]:
    """The metrics worth a panel, loss first: a skip counter (``skipped_files``, ``skipped_files_total``) that
    stayed 0 in every split gets none (the JSONL still has it); any other metric does, 0 or not (a top-1 or an
    lr stuck at 0 is news)."""
    names = {k for (k, _), (_, ys) in series.items() if any(ys) or not k.startswith("skipped")}
    return sorted(names, key=lambda k: (k != "loss", k))


def _step_tick(x: float, _pos: int | None = None) -> str:
    """A step axis' tick label: ``800``, ``80k``, ``1.2M`` (short enough for ~6 ticks a 5-inch panel)."""
    if abs(x) >= 1e6:
        return f"{x / 1e6:g}M"
    return f"{x / 1e3:g}k" if abs(x) >= 1e4 else f"{x:g}"


#: ``plot_curves``' grid in inches: the figure's left and right margins, the gap between two panels of a row
_LEFT, _RIGHT, _GAP = 0.75, 0.2, 0.95


def _set_columns(fig: Any, cols: int, left: float = _LEFT, gap: float = _GAP) -> None:
    """The left margin and the gap between ``cols`` panels of a row, in inches (matplotlib takes them as fractions
    of the figure's width and of a panel's)."""
    w = fig.get_figwidth()
    width = (w - left - _RIGHT - (cols - 1) * gap) / cols  # of each panel
    fig.subplots_adjust(left=left / w, right=1 - _RIGHT / w, wspace=gap / width)


def _fit_y_tick_labels(fig: Any, cols: int) -> None:
    """Widen ``plot_curves``' fixed left margin and gaps between panels where a y tick label needs more (an lr tail
    such as ``0.000150``, a negative ``-0.00010``): measured on the y axes only, so still far cheaper than
    tight_layout. Without it such a label is cut at the figure's edge (``.000150``, the sign lost) or runs into
    the panel on its left."""
    renderer = fig.canvas.get_renderer()
    need = [0.0] * cols  # inches each column's widest y tick label reaches left of its panel
    for i, ax in enumerate(fig.axes):  # in the order they were added: row by row
        labels = ax.yaxis.get_tightbbox(renderer)
        if labels is not None:
            need[i % cols] = max(need[i % cols], (ax.get_window_extent(renderer).x0 - labels.x0) / fig.dpi)
    left = max(_LEFT, need[0] + 0.1)
    gap = max([_GAP] + [n + 0.3 for n in need[1:]])
    if left > _LEFT or gap > _GAP:
        _set_columns(fig, cols, left, gap)


def plot_curves(jsonl_path: str | Path, png_path: str | Path) -> Path | None:
    """One panel per metric (loss first; none for a skip counter that stayed 0) vs step; eval points as markers.
    Uses the Agg canvas directly, so it works headless and leaves the user's matplotlib backend alone. Written
    atomically: on an error (e.g. ``OSError`` of a full disk, raised) the previous ``png_path`` is kept and no
    temporary file remains.
    Returns ``png_path``, or None when there is nothing to plot."""
    rows = read_metrics(jsonl_path, split=None)
    if not rows:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    series: dict[tuple[str, str], tuple[list[float], list[float]]] = {}
    for r in rows:
        for k, v in r.items():
            if k in ("split", "step", "epoch") or not isinstance(v, (int, float)) or not math.isfinite(v):
                continue
            xs, ys = series.setdefault((k, r.get("split", "train")), ([], []))
            xs.append(r["step"])
            ys.append(v)
    names = _panel_names(series)
    if not names:
        return None
    cols = min(3, len(names))
    nrows = math.ceil(len(names) / cols)
    w, h = 5.0 * cols, 3.2 * nrows
    fig = Figure(figsize=(w, h))
    # a regular grid: margins fixed in inches (room for tick labels, a title above and "step" below each panel)
    # instead of tight_layout, which measures every text and took half of the plot's ~1 s (RESULTS.md section 5)
    fig.subplots_adjust(bottom=0.55 / h, top=1 - 0.35 / h, hspace=0.95 / ((h - 0.9) / nrows - 0.95))
    _set_columns(fig, cols)
    FigureCanvasAgg(fig)
    for i, name in enumerate(names):
        ax = fig.add_subplot(nrows, cols, i + 1)
        for (k, split), (xs, ys) in series.items():
            if k == name:
                style = {"marker": "o"} if split != "train" else {}
                ax.plot(xs, ys, label=split, **style)
        ax.set_title(name)
        ax.set_xlabel("step")
        # at most ~6 step ticks, 80k / 1.2M past 10,000: long runs' step labels would otherwise run together
        ax.xaxis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10], integer=True))
        ax.xaxis.set_major_formatter(FuncFormatter(_step_tick))
        ax.grid(alpha=0.3)
        values = [y for (k, _), (_, ys) in series.items() if k == name for y in ys]
        if name in ("loss", "lr") and min(values) > 0 and max(values) / min(values) > 20:
            ax.set_yscale("log")  # lr warmup / long runs span decades
        elif name.endswith("_gb") and min(values) >= 0:
            ax.set_ylim(0, max(values) * 1.15 or 1)  # memory: a flat line at its level, not magnified noise
        splits = {s for k, s in series if k == name}
        if len(splits) > 1:
            ax.legend()
        elif splits != {"train"}:
            ax.set_title(f"{name} ({splits.pop()})")
    _fit_y_tick_labels(fig, cols)
    png_path = Path(png_path)
    with atomic_write(png_path) as tmp:  # never a truncated or 0-byte png (crash, full disk)
        fig.savefig(tmp, dpi=100, format="png")
    return png_path
