"""What one ``seeded(seed, epoch, index)`` block costs, in the main process and in a DataLoader worker (CPU).

    python benchmarks/seeding_cost.py [--blocks 5000]

Every augmented sample of the CPU data path is drawn inside one such block (``beit.data.seeding``). In the main
process it saves and restores torch's, Python's and NumPy's global RNG states around the seeding; in a worker the
outermost block only seeds. Prints milliseconds a block, the median of 5 repeats, for an empty block (the overhead
alone).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.data import DataLoader, Dataset

from beit.data.seeding import seeded


def _ms_per_block(n: int) -> float:
    t = time.perf_counter()
    for i in range(n):
        with seeded(0, 1, i):
            pass
    return (time.perf_counter() - t) / n * 1e3


class _InWorker(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return 5

    def __getitem__(self, i: int) -> float:
        return _ms_per_block(self.n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=5000)
    n = ap.parse_args().blocks
    torch.set_num_threads(1)
    main_ms = statistics.median(_ms_per_block(n) for _ in range(5))
    worker_ms = statistics.median(float(x) for x in DataLoader(_InWorker(n), batch_size=None, num_workers=1))
    print(f"seeded() block: main process {main_ms:.3f} ms, DataLoader worker {worker_ms:.3f} ms "
          f"({n} blocks x 5, median)")


if __name__ == "__main__":
    main()
