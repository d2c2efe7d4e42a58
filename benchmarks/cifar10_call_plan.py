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
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

MARGIN = 15  # seconds cifar10_call.sh keeps back from training in each call (the stop, the copies)
# a resumed call's start-up as a share of the first call's: 48 s vs 96 s on 2026-12-07 (H100, RESULTS 2)
RESUMED_STARTUP = 0.5
EVAL = re.compile(r"^(\d\d):(\d\d):(\d\d) eval step \d+ ep (\d+):")


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
    evals = []
    for line in log.read_text(errors="replace").splitlines():
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
    with open(run / "calls.tsv", "a") as f:
        f.write(row + "\n")
    return (f"[record] call {len(calls) + 1}: {call_seconds:.0f} s (setup {setup_seconds:.0f} s), epoch {before} -> "
            f"{reached}, {pace:.2f} s an epoch, start-up {startup:.0f} s; arm so far "
            f"{sum(c[0] for c in calls) + call_seconds:.0f} s")


if __name__ == "__main__":
    a = sys.argv[1:]
    if a and a[0] == "--record":
        print(record(Path(a[1]), Path(a[2]), float(a[3]), float(a[4])))
    else:
        print(plan(Path(a[0]), float(a[1]), float(a[2]), int(a[3])))
