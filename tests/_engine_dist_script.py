"""Run by tests/test_engine_distributed.py under ``torchrun --nproc_per_node 2`` (gloo, CPU).

usage: _engine_dist_script.py OUT_DIR ddp|fsdp|nan|refuse
Trains uninterrupted, then stopped + resumed, and saves per rank: final params, sampler shards.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _engine_fixtures import NoisyDataset, TinyNet, step_fn  # noqa: E402
from beit.engine import TrainConfig, Trainer  # noqa: E402
from beit.engine import distributed as D  # noqa: E402


def make(out: Path, mode: str, **kw) -> Trainer:
    torch.manual_seed(0)  # same init on every rank
    cfg = TrainConfig(output_dir=str(out), epochs=2, batch_size=4, num_workers=0, lr=1e-2, min_lr=1e-4,
                      warmup_steps=1, clip_grad=1.0, log_every=1, ckpt_every=2, distributed=mode,
                      accum_steps=2, **kw)
    groups = None
    if mode == "fsdp":  # FSDP2 replaces the parameters: groups must be built from the sharded model
        from beit.engine.optim import param_groups

        groups = lambda m: param_groups(m, cfg.weight_decay, 0.75, cfg.lr)  # noqa: E731
    return Trainer(TinyNet(), NoisyDataset(40), step_fn, cfg, param_groups=groups)


def full_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in D.unwrap_model(model).named_parameters():
        out[name] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
    return out


def nan_on_one_rank(out: Path) -> None:
    """Rank 1 alone sees a NaN loss at step 2 (its gradients stay finite): every rank must stop there."""
    from beit.engine import TrainingDivergedError

    calls = []

    def step(model, batch):
        loss, metrics = step_fn(model, batch)
        calls.append(1)
        if D.rank() == 1 and len(calls) == 3:  # micro-batch 1 of step 2 (accum_steps=2)
            loss = loss + torch.tensor(float("nan"))  # a constant: no effect on the gradients
        return loss, metrics

    torch.manual_seed(0)
    cfg = TrainConfig(output_dir=str(out / "nan"), epochs=2, batch_size=4, num_workers=0, lr=1e-2,
                      warmup_steps=1, log_every=1, ckpt_every=100, accum_steps=2)
    try:
        Trainer(TinyNet(), NoisyDataset(40), step, cfg).fit()
        result = "finished"
    except TrainingDivergedError as e:
        result = f"diverged at step {e.step}"
    (out / f"nan_rank{D.rank()}.txt").write_text(result)
    D.cleanup()


def refusals_reach_every_rank(out: Path) -> None:
    """check_run_can_start decides on rank 0; its refusals (an earlier run without --resume; a task's own check of
    the checkpoint, which runs on rank 0 only) must be raised on every rank, as the same error."""
    from beit.engine.rundir import ConfigChangedError
    from beit.engine.trainer import check_run_can_start

    make(out / "r", "ddp").fit(stop_after_step=2)
    lines = []
    for name, kw in (("exists", {}), ("state", {"resume": "auto"})):
        cfg = make(out / "r", "ddp", **kw).cfg

        def check_state(state, path):  # noqa: ANN001, ANN202
            raise ConfigChangedError(f"{path.name}: refused by the task at step {state['step']}")

        try:
            check_run_can_start(cfg, check_state=check_state if name == "state" else None)
            lines.append(f"{name}: passed")
        except Exception as e:  # noqa: BLE001 - the type and message are what the test compares
            lines.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
    (out / f"refuse_rank{D.rank()}.txt").write_text("\n".join(lines))
    D.cleanup()


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    if mode == "nan":
        nan_on_one_rank(out)
        return
    if mode == "refuse":
        refusals_reach_every_rank(out)
        return
    full = make(out / "full", mode)
    full.fit()
    make(out / "part", mode).fit(stop_after_step=3)
    resumed = make(out / "part", mode, resume="auto")
    resumed.fit()
    shards = {}
    for epoch in (0, 1):
        full.sampler.set_epoch(epoch)
        shards[epoch] = full.sampler.shard()
    torch.save({"full": full_params(full.model), "resumed": full_params(resumed.model), "shards": shards,
                "world_size": D.world_size(), "steps": full.step},
               out / f"rank{D.rank()}.pt")
    D.cleanup()


if __name__ == "__main__":
    main()
