"""Time ``beit demo`` with some of its settings changed (a ``DemoConfig`` ablation), on this machine's CPU.

    python benchmarks/demo_variants.py OUT '{"data_device": "cpu", "pre_lr": 0.004}'   # the per-sample PIL path
    python benchmarks/demo_variants.py OUT '{}'                                            # the shipped defaults

Runs ``run_demo(OUT, cfg=DemoConfig(**KWARGS))`` in this process and prints one line: the settings, the wall
seconds of the demo (as its "done in"), and the held-out top-1 of every fine-tuning seed of each arm. Measure on an
otherwise idle machine: the demo's time is the machine's (benchmarks/RESULTS.md section 5).
"""

from __future__ import annotations

import argparse
import json
import time

from beit.tasks.demo import DemoConfig, run_demo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="the demo's output folder (replaced)")
    ap.add_argument("settings", nargs="?", default="{}", help="JSON object of DemoConfig fields")
    args = ap.parse_args()
    kwargs = json.loads(args.settings)
    if "seeds" in kwargs:
        kwargs["seeds"] = tuple(kwargs["seeds"])
    t0 = time.perf_counter()
    summary = run_demo(args.out, cfg=DemoConfig(**kwargs))
    runs = {arm: [round(v, 1) for v in r["runs"]] for arm, r in summary["top1"].items()}
    print(f"RESULT {json.dumps(kwargs)} {time.perf_counter() - t0:.1f} s {json.dumps(runs)}", flush=True)


if __name__ == "__main__":
    main()
