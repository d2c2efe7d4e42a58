"""The schedule of an equal-GPU-time arm run over several device calls (benchmarks/cifar10_call.sh, ARM_SECONDS).

Two modes, both on ``<run>/calls.tsv`` (one row a call: seconds, epoch reached, seconds an epoch, start-up seconds):

    python cifar10_call_plan.py RUN ARM_SECONDS CALL_SECONDS FIRST_EPOCHS
        prints "<train.epochs> <train.warmup_epochs or -> <seconds this call may take>"; exit 1 when the arm's
        seconds are spent.
    python cifar10_call_plan.py --record RUN LOG CALL_SECONDS SETUP_SECONDS
        appends this call's row, read from the run's log ("HH:MM:SS eval step N ep E: ..." lines, an eval every
        epoch), and prints it; a log with fewer than two evals records the call's seconds with no pace (0), and the
        plan takes the pace and start-up of the last call that measured them (none: the first guess again).

The first call runs FIRST_EPOCHS (a guess). A later call plans
``epochs = reached + (remaining - calls * (start-up + margin)) / pace``, with ``calls`` the calls the remaining seconds
still need, pace and start-up those of the last call (a resumed call's start-up is the one that repeats; after the cold
first call only, half of its start-up), and pins the warm-up to the run's config.yaml so that the engine accepts the
new length (train.epochs may change on a resume, the warm-up may not). A new length within 2% of the current one is
not taken (no step in the learning rate for a few epochs).

A bad argument (``1628s``, ``abc``, a negative or non-finite number, a fractional FIRST_EPOCHS, a missing one) exits 2
with one line naming it and its value.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from typing import NoReturn

MARGIN = 15  # seconds cifar10_call.sh keeps back from training in each call (the stop, the copies)
# a resumed call's start-up as a share of the first call's: 48 s vs 96 s on 2026-12-07 (H100, RESULTS 2)
RESUMED_STARTUP = 0.5
EVAL = re.compile(r"^(\d\d):(\d\d):(\d\d) eval step \d+ ep (\d+):")


USAGE = ("usage: cifar10_call_plan.py RUN ARM_SECONDS CALL_SECONDS FIRST_EPOCHS\n"
         "       cifar10_call_plan.py --record RUN LOG CALL_SECONDS SETUP_SECONDS")


def _refuse(line: str) -> NoReturn:
    print(f"cifar10_call_plan: {line}", file=sys.stderr)
    sys.exit(2)


def seconds_arg(name: str, value: str, zero: bool = False) -> float:
    """Argument ``name``'s ``value`` as seconds: a finite number above 0 (or 0 with ``zero``); exits 2 with one line
    naming the argument and its value otherwise."""
    try:
        x = float(value) if "_" not in value else math.nan  # float() takes 1_628
    except ValueError:
        x = math.nan
    if not math.isfinite(x) or x < 0 or (x == 0 and not zero):
        _refuse(f"{name} is {value!r}: not a number of seconds {'of 0 or more' if zero else 'above 0'}")
    return x


def epochs_arg(name: str, value: str) -> int:
    """Argument ``name``'s ``value`` as a whole number of epochs above 0; exits 2 with one line naming the argument
    and its value otherwise."""
    try:
        n = int(value) if "_" not in value else 0  # int() takes 1_000
    except ValueError:
        n = 0
    if n < 1:
        _refuse(f"{name} is {value!r}: not a whole number of epochs above 0")
    return n


def read_calls(run: Path) -> list[tuple[float, int, float, float]]:
    f = run / "calls.tsv"
    if not f.exists():
        return []
    return [(float(a), int(b), float(c), float(d)) for a, b, c, d in
            (line.split("\t") for line in f.read_text().splitlines() if line.strip())]


def plan(run: Path, arm_seconds: float, call_seconds: float, first_epochs: int) -> str:
    calls = read_calls(run)
    if not calls:
        return f"{first_epochs} - {int(min(call_seconds, arm_seconds))}"
    remaining = arm_seconds - sum(c[0] for c in calls)
    measured = [i for i, c in enumerate(calls) if c[2] > 0]  # a call with fewer than two evals measured no pace
    if not measured:  # none yet: the first guess again, within the arm's seconds left
        if remaining <= 2 * MARGIN:
            sys.exit(f"cifar10_call_plan: the arm's {arm_seconds:.0f} s are spent ({remaining:.0f} s left): nothing "
                     "to run")
        return f"{first_epochs} - {int(min(call_seconds, remaining))}"
    reached = calls[-1][1]
    _, _, pace, startup = calls[measured[-1]]
    if measured[-1] == 0:  # only the cold call so far: a resumed call finds the compile cache warm and no extraction
        startup *= RESUMED_STARTUP
    if remaining < startup + 2 * pace:
        sys.exit(f"cifar10_call_plan: the arm's {arm_seconds:.0f} s are spent ({remaining:.0f} s left, a call's "
                 f"start-up {startup:.0f} s): nothing to run")
    n_calls = math.ceil(remaining / call_seconds)
    epochs = reached + max(1, int((remaining - n_calls * (startup + MARGIN)) // pace))
    import yaml

    train = (yaml.safe_load((run / "config.yaml").read_text()) or {}).get("train", {})
    warm, current = train.get("warmup_epochs", "-"), train.get("epochs")
    if isinstance(current, int) and reached >= current:
        sys.exit(f"cifar10_call_plan: the run has finished its {current} epochs: nothing to run")
    if isinstance(current, int) and abs(epochs - current) <= max(2, 0.02 * current):
        epochs = current  # close enough: no step in the learning rate for a few epochs
    print(f"[plan] {remaining:.0f} s of the arm left over {n_calls} call(s), {pace:.2f} s an epoch, start-up "
          f"{startup:.0f} s a call: train.epochs {reached} reached -> {epochs}", file=sys.stderr)
    return f"{epochs} {warm} {int(min(call_seconds, remaining))}"


def record(run: Path, log: Path, call_seconds: float, setup_seconds: float) -> str:
    try:
        text = log.read_text(errors="replace")
    except OSError as e:  # no log (the sweep refused the arm): the call's seconds count all the same
        print(f"cifar10_call_plan: {log} unreadable ({e.strerror})", file=sys.stderr)
        text = ""
    evals = []
    for line in text.splitlines():
        m = EVAL.match(line.rsplit("\r", 1)[-1])
        if m:
            h, mi, s, ep = map(int, m.groups())
            evals.append((h * 3600 + mi * 60 + s, ep))
    calls = read_calls(run)
    before = calls[-1][1] if calls else 0
    if len(evals) < 2 or evals[-1][1] == evals[0][1]:
        # a call that failed or stopped before two evals: no pace (0: the plan takes an earlier call's), but its
        # seconds count against the arm all the same (they were left out, and the arm ran over its budget)
        print(f"cifar10_call_plan: fewer than two evals in {log}: no pace measured, the call's seconds recorded",
              file=sys.stderr)
        reached, pace, startup = (evals[-1][1] if evals else before), 0.0, 0.0
    else:
        span = (evals[-1][0] - evals[0][0]) % 86400  # across midnight too
        pace = span / (evals[-1][1] - evals[0][1])
        reached = evals[-1][1]
        startup = call_seconds - (reached - before) * pace  # imports, decode, compile, the unfinished epoch, the stop
    row = f"{call_seconds:.0f}\t{reached}\t{pace:.3f}\t{startup:.0f}"
    run.mkdir(parents=True, exist_ok=True)  # a call whose run never started
    with open(run / "calls.tsv", "a") as f:
        f.write(row + "\n")
    return (f"[record] call {len(calls) + 1}: {call_seconds:.0f} s (setup {setup_seconds:.0f} s), epoch {before} -> "
            f"{reached}, {pace:.2f} s an epoch, start-up {startup:.0f} s; arm so far "
            f"{sum(c[0] for c in calls) + call_seconds:.0f} s")


if __name__ == "__main__":
    a = sys.argv[1:]
    if a[:1] == ["--record"] and len(a) == 5:
        print(record(Path(a[1]), Path(a[2]), seconds_arg("CALL_SECONDS", a[3]),
                     seconds_arg("SETUP_SECONDS", a[4], zero=True)))
    elif a[:1] != ["--record"] and len(a) == 4:
        print(plan(Path(a[0]), seconds_arg("ARM_SECONDS", a[1]), seconds_arg("CALL_SECONDS", a[2]),
                   epochs_arg("FIRST_EPOCHS", a[3])))
    else:
        print(USAGE, file=sys.stderr)
        sys.exit(2)
