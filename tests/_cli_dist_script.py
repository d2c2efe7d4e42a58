"""Run by test_cli under torchrun (2 ranks, gloo).

``fail``: rank 1 fails inside a command while rank 0 waits in a collective; every rank must end non-zero, promptly.
``ok``: the command succeeds; ``cli.main`` must leave the process group before returning (a group left for
interpreter exit can abort a finished rank).
"""

import sys

import torch.distributed as dist

from beit import cli

MODE = sys.argv[1] if len(sys.argv) > 1 else "fail"


def boom(args) -> int:  # noqa: ANN001
    dist.init_process_group("gloo")
    if MODE == "fail" and dist.get_rank() == 1:
        raise ValueError("rank 1 failed")
    dist.barrier()  # in "fail" mode: waits for a rank that is gone
    return 0


cmd = cli.Command("a command that fails on rank 1", "tool", boom)
cli.TOOLS["boom"] = cmd
cli.COMMANDS["boom"] = cmd
code = cli.main(["boom"])
print(f"rank group still initialized after main: {dist.is_initialized()}", flush=True)
sys.exit(code)
