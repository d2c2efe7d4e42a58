"""Run by test_cli under torchrun (2 ranks, gloo).

``fail``: rank 1 fails inside a command while rank 0 waits in a collective; every rank must end non-zero, promptly.
``ok``: the command succeeds; ``cli.main`` must leave the process group before returning (a group left for
interpreter exit can abort a finished rank).
``peer``: rank 1 fails inside a command while rank 0 is in a collective (an all-reduce): rank 0's collective fails
on the gone peer (gloo's "Connection reset by peer"), which rank 0 must say in one line, not a traceback.
"""

import sys

import torch
import torch.distributed as dist

from beit import cli

MODE = sys.argv[1] if len(sys.argv) > 1 else "fail"


def boom(args) -> int:  # noqa: ANN001
    dist.init_process_group("gloo")
    if MODE == "fail" and dist.get_rank() == 1:
        raise ValueError("rank 1 failed")
    if MODE == "peer":
        if dist.get_rank() == 1:
            raise ValueError("rank 1 failed")
        dist.all_reduce(torch.ones(1))  # fails once rank 1 is gone
    dist.barrier()  # in "fail" mode: waits for a rank that is gone
    return 0


cmd = cli.Command("a command that fails on rank 1", "tool", boom)
cli.TOOLS["boom"] = cmd
cli.COMMANDS["boom"] = cmd
code = cli.main(["boom"])
print(f"rank group still initialized after main: {dist.is_initialized()}", flush=True)
sys.exit(code)
