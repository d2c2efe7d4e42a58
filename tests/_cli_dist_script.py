"""Run by test_cli under torchrun (2 ranks, gloo): rank 1 fails inside a command while rank 0 waits in a
collective. Every rank must end non-zero, promptly."""

import sys

import torch.distributed as dist

from beit import cli


def boom(args) -> int:  # noqa: ANN001
    dist.init_process_group("gloo")
    if dist.get_rank() == 1:
        raise ValueError("rank 1 failed")
    dist.barrier()  # waits for a rank that is gone
    return 0


cmd = cli.Command("a command that fails on rank 1", "tool", boom)
cli.TOOLS["boom"] = cmd
cli.COMMANDS["boom"] = cmd
sys.exit(cli.main(["boom"]))
