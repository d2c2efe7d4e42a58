"""Multi-process / compile behaviour of the engine (issue [scale]), on CPU.

In-process: the repeated-blocks protocol, what regional compile touches, the sampler's global order and
persistent loader workers. Through ``torchrun --nproc_per_node 2`` (gloo): the full ``beit pretrain``
command under DDP + compile and under FSDP2 to the final export, a 2-rank FSDP2 checkpoint resumed in one
process, a ``finetune`` under DDP, and clean failures on every rank.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from _engine_fixtures import NoisyDataset, TinyNet, step_fn
from beit.engine import TrainConfig, Trainer, load_checkpoint
from beit.engine import distributed as D

pytestmark = pytest.mark.usefixtures("one_thread")


# --- in process -------------------------------------------------------------------------------------------

def _tiny_beit(**kw):
    from beit import create_model

    return create_model("beit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2,
                        **kw)


def test_repeated_blocks_protocol_for_every_task_model():
    from beit.tasks.segmentation.model import BeitSegmenter

    beit = _tiny_beit()
    assert D.repeated_blocks(beit) == list(beit.blocks)
    seg = BeitSegmenter(_tiny_beit(head="none"), num_classes=3, channels=8, aux_channels=4)
    assert D.repeated_blocks(seg) == list(seg.backbone.blocks) and len(D.repeated_blocks(seg)) == 2
    assert D.repeated_blocks(nn.Linear(2, 2)) == []


def test_layout_detector_exposes_its_body_blocks():
    pytest.importorskip("torchvision")
    from beit.tasks.layout import DetectorConfig, build_detector

    cfg = DetectorConfig(arch="beit_tiny_patch16_224", fpn_channels=8, box_head_dim=8, mask_head_dim=8,
                         backbone_overrides=dict(img_size=64, patch_size=16, embed_dim=16, depth=4, num_heads=2))
    det = build_detector(cfg, class_names=["a", "b"])
    assert D.repeated_blocks(det) == list(det.body.blocks) and len(det.body.blocks) == 4


def test_compile_blocks_compiles_only_the_blocks_and_turns_off_ddp_graph_splitting():
    import torch._dynamo

    from beit.tasks.segmentation.model import BeitSegmenter

    with torch._dynamo.config.patch(optimize_ddp=True):  # restored on exit
        seg = BeitSegmenter(_tiny_beit(head="none"), num_classes=3, channels=8, aux_channels=4)
        assert D.compile_blocks(seg, "ddp") == "blocks"
        compiled = [m for m in seg.modules() if getattr(m, "_compiled_call_impl", None) is not None]
        assert compiled == list(seg.backbone.blocks)  # never the whole segmenter, its heads or the backbone
        assert torch._dynamo.config.optimize_ddp is False
    with torch._dynamo.config.patch(optimize_ddp=True):
        lin = nn.Linear(2, 2)
        assert D.compile_blocks(lin, "fsdp") == "whole" and lin._compiled_call_impl is not None
        assert torch._dynamo.config.optimize_ddp is True  # only DDP needs it off


def test_compile_scope_model_compiles_the_whole_model_once_and_bad_scopes_are_refused():
    from beit.engine.config import ConfigError, TrainConfig

    model = _tiny_beit(head="none")
    assert D.compile_blocks(model, "none", scope="model") == "whole"
    compiled = [m for m in model.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert compiled == [model]  # one graph: no block compiled on its own
    with pytest.raises(ValueError, match="'blocks' or 'model'"):
        D.compile_blocks(_tiny_beit(head="none"), "none", scope="all")
    cfg = TrainConfig(output_dir="x", compile_scope="whole")
    with pytest.raises(ConfigError, match="compile_scope"):
        cfg.validate()


def test_trainer_with_compile_scope_model_trains_the_whole_model_graph_as_eager(tmp_path, monkeypatch):
    """``train.compile_scope=model`` puts the whole model in one graph (dynamo's eager backend here: the trace,
    not code generation, is under test) and trains exactly as the uncompiled model."""
    import torch._dynamo

    graphs: list[int] = []

    def counting_backend(gm, example_inputs):
        graphs.append(len(list(gm.graph.nodes)))
        return gm.forward

    compile_calls: list[str] = []
    plain_compile = nn.Module.compile

    def compile_eager(self, *args, **kwargs):
        compile_calls.append(type(self).__name__)
        return plain_compile(self, *args, backend=counting_backend, **kwargs)

    monkeypatch.setattr(nn.Module, "compile", compile_eager)
    finals = []
    for compile_on in (False, True):
        torch._dynamo.reset()
        cfg = TrainConfig(output_dir=str(tmp_path / str(compile_on)), epochs=2, batch_size=4, num_workers=0,
                          lr=1e-2, warmup_steps=1, log_every=100, compile=compile_on, compile_scope="model")
        torch.manual_seed(0)  # the same initial weights
        trainer = Trainer(TinyNet(), NoisyDataset(16), step_fn, cfg)
        trainer.fit()
        finals.append({k: v.detach().clone() for k, v in trainer.raw_model.state_dict().items()})
    assert compile_calls == ["TinyNet"]  # the model once, no block on its own
    assert graphs and max(graphs) > 20  # the blocks traced inside one graph, not a graph per block
    assert finals[0].keys() == finals[1].keys()  # no _orig_mod prefixes in what is saved
    for k in finals[0]:
        torch.testing.assert_close(finals[1][k], finals[0][k], rtol=1e-5, atol=1e-6, msg=k)


def test_evaluation_and_pictures_run_compiled_code_eagerly(tmp_path):
    """Eval inputs (sliding windows, other sizes, no_grad) must never reach dynamo: the trainer evaluates
    and draws under ``force_eager``, while training keeps compiled graphs."""
    import torch._dynamo

    graphs: list[str] = []

    def counting_backend(gm, example_inputs):
        graphs.append("graph")
        return gm.forward

    @torch.compile(backend=counting_backend, dynamic=False)
    def probe(x):
        return torch.sin(x) + 1

    seen = {}

    def eval_fn(model):
        seen["eval"] = probe(torch.ones(3 + len(seen))).sum().item()
        return {"score": 1.0}

    def visualize_fn(model, step, out_dir):
        seen["vis"] = probe(torch.ones(7)).sum().item()

    torch._dynamo.reset()
    cfg = TrainConfig(output_dir=str(tmp_path), epochs=1, batch_size=4, num_workers=0, lr=1e-2, warmup_steps=1,
                      log_every=100, ckpt_every=1000, image_every=2)
    Trainer(TinyNet(), NoisyDataset(8), step_fn, cfg, eval_fn=eval_fn, visualize_fn=visualize_fn).fit()
    assert "eval" in seen and "vis" in seen and graphs == []
    probe(torch.ones(2))  # outside evaluation the same function compiles
    assert graphs == ["graph"]


def test_sharded_checkpoint_folders_keep_last_and_best_and_load_back(tmp_path):
    """The FSDP2 checkpoint layout, in one process (DCP needs no process group): atomic step folders,
    ``last`` / ``best`` symlinks, keep_last pruning that never drops the best, full and sharded loads."""
    from beit.engine.checkpoint import CheckpointManager, CheckpointMismatchError, find_resume_path, load_sharded_state

    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for step in range(1, 5):
        loss = model(torch.randn(2, 4)).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
        mgr.save_sharded(model, opt, {"format": "beit-train-ckpt", "step": step}, step, is_best=step == 1)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["best", "last", "step_0000001", "step_0000003", "step_0000004"]  # best pinned, no .tmp
    assert (tmp_path / "last").resolve().name == "step_0000004" and find_resume_path("auto", tmp_path).name == "last"
    state = load_checkpoint(tmp_path / "last")
    assert state["step"] == 4 and state["sharded"] is True
    for k, v in model.state_dict().items():
        assert torch.equal(state["model"][k], v), k
    assert set(state["optimizer"]["state"]) == {n for n, _ in model.named_parameters()}  # keyed by name

    torch.manual_seed(1)
    fresh = TinyNet()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    load_sharded_state(fresh, fresh_opt, tmp_path / "best")
    first = load_checkpoint(tmp_path / "step_0000001")["model"]
    for k, v in fresh.state_dict().items():
        assert torch.equal(first[k], v), k
    assert fresh_opt.state_dict()["state"][0]["step"].item() == 1
    bad = nn.Module()
    bad.other = nn.Linear(8, 3)
    with pytest.raises(CheckpointMismatchError, match=r"step_0000001: key 'other.weight' of the model is "
                                                      r"missing from the checkpoint \(different architecture\?\)"):
        load_sharded_state(bad, torch.optim.AdamW(bad.parameters()), tmp_path / "step_0000001")


def test_global_batch_is_the_same_for_any_number_of_ranks():
    n, seed = 37, 3
    two = [D.ResumableDistributedSampler(n, 4, num_replicas=2, rank=r, seed=seed) for r in range(2)]
    one = D.ResumableDistributedSampler(n, 8, num_replicas=1, rank=0, seed=seed)
    for s in (*two, one):
        s.set_epoch(2)
    for b in range(n // 8):
        per_rank = [set(s.shard()[b * 4:(b + 1) * 4]) for s in two]
        assert per_rank[0] | per_rank[1] == set(one.shard()[b * 8:(b + 1) * 8])
    # a checkpoint after 2 batches of 2 ranks x 4 = 16 samples continues at batch 2 of 1 rank x 8
    assert one.start_batch_for(2 * 4 * 2) == 2
    with pytest.raises(ValueError, match=r"^12 samples of the epoch were trained on, not a multiple of this "
                                         r"run's global batch 8 x 1 ranks = 8"):
        one.start_batch_for(12)


def test_sampler_can_yield_epoch_index_pairs():
    s = D.ResumableDistributedSampler(10, 2, num_replicas=1, rank=0, seed=0, yield_epoch=True)
    s.set_epoch(4, start_batch=1)
    plain = D.ResumableDistributedSampler(10, 2, num_replicas=1, rank=0, seed=0)
    plain.set_epoch(4, start_batch=1)
    assert list(s) == [(4, i) for i in plain] and len(s) == 8


def test_sampler_with_epoch_batches_runs_through_the_epochs_without_mixing_them():
    s = D.ResumableDistributedSampler(10, 3, num_replicas=1, rank=0, seed=0, epoch_batches=3)
    s.set_epoch(2, start_batch=1)
    it = iter(s)
    got = [next(it) for _ in range(6 + 9 + 9)]
    # epoch 2 from its second batch, then epochs 3 and 4 in full: 3 full batches each (the 10th index dropped)
    want = [(2, i) for i in s.shard(2)[3:9]] + [(3, i) for i in s.shard(3)[:9]] + [(4, i) for i in s.shard(4)[:9]]
    assert got == want and len(s) == 6
    assert s.shard(3) != s.shard(4)  # a new order every epoch
    batches = [got[k : k + 3] for k in range(0, len(got), 3)]
    assert all(len({e for e, _ in b}) == 1 for b in batches)  # no batch mixes two epochs
    with pytest.raises(ValueError, match="epoch_batches must be >= 1, got 0"):
        D.ResumableDistributedSampler(10, 3, epoch_batches=0, num_replicas=1, rank=0)


def test_one_loader_iterator_runs_through_all_epochs(tmp_path, monkeypatch):
    """The loader is iterated once per fit(): its workers never drain at an epoch boundary."""
    calls = []
    orig = D.ResumableDistributedSampler.__iter__

    def counting(self):
        calls.append(self.epoch)
        return orig(self)

    monkeypatch.setattr(D.ResumableDistributedSampler, "__iter__", counting)
    torch.manual_seed(0)
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), epochs=3, batch_size=4, num_workers=0, lr=1e-2,
                      warmup_steps=1, log_every=100, ckpt_every=1000)
    t = Trainer(TinyNet(), NoisyDataset(18), step_fn, cfg)  # 4 steps an epoch, 2 samples left out each epoch
    t.fit()
    assert calls == [0] and t.step == 12 and t.epoch == 3


class _EpochProbe(NoisyDataset):
    """NoisyDataset that also says which epoch and which process produced each sample."""

    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return x, y, torch.tensor([self.epoch, os.getpid()])


def _probe_step(model, batch):
    x, y, _ = batch
    return step_fn(model, (x, y))


def test_loader_workers_persist_across_epochs_and_follow_the_epoch(tmp_path):
    if not hasattr(NoisyDataset(4), "set_epoch"):
        pytest.skip("fixture dataset has no set_epoch")
    seen: dict[int, list] = {}

    def record(model, batch):
        seen.setdefault(len(seen), batch[2].tolist())
        return _probe_step(model, batch)

    def run(workers):
        seen.clear()
        torch.manual_seed(0)
        cfg = TrainConfig(output_dir=str(tmp_path / f"w{workers}"), epochs=3, batch_size=4, num_workers=workers,
                          lr=1e-2, warmup_steps=1, log_every=100, ckpt_every=1000)
        t = Trainer(TinyNet(), _EpochProbe(16), record, cfg)
        t.fit()
        return [row for step in sorted(seen) for row in seen[step]], t

    rows, trainer = run(2)
    epochs = [r[0] for r in rows]
    assert epochs == sorted(epochs) and set(epochs) == {0, 1, 2}  # workers saw every set_epoch
    assert len({r[1] for r in rows}) == 2 and os.getpid() not in {r[1] for r in rows}  # same 2 workers
    assert trainer._loader is None  # persistent through the epochs (the same 2 workers, above), stopped with fit()
    rows0, _ = run(0)
    assert [r[0] for r in rows0] == epochs


# --- torchrun, 2 processes (gloo) ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pretrain_data(tmp_path_factory):
    from beit.tokenizers import DiscreteVAE

    root = tmp_path_factory.mktemp("scale")
    data = root / "images"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        img = np.zeros((32, 32, 3), np.uint8)
        img[:, :, i % 3] = 200
        img[: 16 + (i % 8)] = rng.integers(0, 255, 3)
        Image.fromarray(img).save(data / f"{i}.png")
    tok = DiscreteVAE(vocab_size=16, hidden=8, downsample=4, num_res_blocks=0, codebook_dim=8)
    torch.manual_seed(0)
    tok.save(root / "tok.safetensors")
    return root


def _pretrain_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["pretrain", f"data.path={root / 'images'}", "data.num_mask_patches=26",
            "data.min_mask_patches_per_block=4", "data.color_jitter=0.0", "model.name=beit_tiny_patch16_224",
            "model.img_size=32", "model.patch_size=4", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
            "tokenizer.kind=dvae", f"tokenizer.path={root / 'tok.safetensors'}", f"train.output_dir={out}",
            "train.batch_size=4", "train.num_workers=0", "train.warmup_steps=1", "train.log_every=1",
            "train.image_every=0", *extra]


def _beit(nproc: int, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    if nproc == 1:
        cmd = [sys.executable, "-m", "beit", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "beit", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return proc.stdout + proc.stderr


def _train_losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r.get("split", "train") == "train" and "loss" in r}


def _assert_export_is_the_trained_model(out: Path) -> None:
    from safetensors.torch import load_file

    exported = load_file(str(out / "final" / "model.safetensors"))
    trained = load_checkpoint(out / "last" if (out / "last").exists() else out / "last.pt")["model"]
    assert set(exported) == set(trained)
    for k, v in trained.items():
        assert torch.equal(exported[k], v), k
    assert json.loads((out / "final" / "config.json").read_text())["config"]["depth"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["blocks", "model"])
def test_pretrain_ddp_with_compile_to_the_final_model(pretrain_data, tmp_path, scope):
    out = tmp_path / "ddp"
    text = _ok(_beit(2, *_pretrain_args(pretrain_data, out, "train.max_steps=3", "train.compile=true",
                                        f"train.compile_scope={scope}", "model.drop_path_rate=0.1")))
    assert f"compile {scope}" in text  # the setup line names what was compiled
    assert sorted(_train_losses(out)) == [1, 2, 3]
    _assert_export_is_the_trained_model(out)
    assert text.count("step 3/3") == 1  # rank 0 logs, rank 1 does not


@pytest.mark.slow
def test_pretrain_fsdp_exports_and_resumes_in_one_process(pretrain_data, tmp_path):
    """2 ranks x 4 under FSDP2 + compile for 6 steps (2 epochs) to the final export; resume its mid-epoch
    step-2 checkpoint in 1 process x 8: the same global batches, so the same losses as the uninterrupted run."""
    full = tmp_path / "full"
    common = ("train.max_steps=6", "model.drop_path_rate=0.0", "train.ckpt_every=1", "train.keep_last=10")
    _ok(_beit(2, *_pretrain_args(pretrain_data, full, "train.distributed=fsdp", "train.compile=true", *common)))
    _assert_export_is_the_trained_model(full)
    ref = _train_losses(full)
    assert sorted(ref) == [1, 2, 3, 4, 5, 6]
    # FSDP2 checkpoints are sharded DCP folders; last -> the newest, the last keep_last kept
    assert not (full / "last.pt").exists() and (full / "last").resolve() == (full / "step_0000006").resolve()
    assert sorted(p.name for p in full.glob("step_*")) == [f"step_{i:07d}" for i in range(1, 7)]
    meta = load_checkpoint(full / "step_0000002", full=False)
    assert (meta["world_size"], meta["epoch"], meta["batch_in_epoch"], meta["sharded"]) == (2, 0, 2, True)

    part = tmp_path / "part"
    shutil.copytree(full / "step_0000002", part / "step_0000002")
    text = _ok(_beit(1, *_pretrain_args(pretrain_data, part, *common, "train.batch_size=8",
                                        f"train.resume={part / 'step_0000002'}")))
    assert "resumed from" in text and "at step 2 (epoch 0, batch 2)" in text
    got = _train_losses(part)
    assert sorted(got) == [3, 4, 5, 6]
    np.testing.assert_allclose([got[s] for s in (3, 4, 5, 6)], [ref[s] for s in (3, 4, 5, 6)], rtol=2e-4)


@pytest.mark.slow
def test_finetune_under_ddp(tmp_path):
    from _finetune_data import TINY_OVERRIDES, colored_squares

    data = colored_squares(tmp_path / "sq", {"train": 8, "val": 4})
    out = tmp_path / "ft"
    text = _ok(_beit(2, "finetune", *TINY_OVERRIDES, f"train.output_dir={out}", "train.num_workers=0",
                     "train.batch_size=4", "train.log_every=1", "train.warmup_epochs=0", "train.epochs=1",
                     f"data.train_dir={data / 'train'}", f"data.val_dir={data / 'val'}", "data.auto_augment=null"))
    assert "2 rank(s) on cpu" in text
    assert (out / "model" / "model.safetensors").is_file() and (out / "model" / "config.json").is_file()
    assert sorted(_train_losses(out)) == [1, 2, 3, 4]  # 32 images / (2 ranks x 4) = 4 steps


@pytest.mark.slow
def test_every_rank_fails_cleanly_on_a_missing_file(pretrain_data, tmp_path):
    proc = _beit(2, *_pretrain_args(pretrain_data, tmp_path / "x", "train.max_steps=2",
                                    f"tokenizer.path={tmp_path / 'missing.safetensors'}"), timeout=120)
    assert proc.returncode != 0
    assert "missing.safetensors" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_one_process_checkpoint_resumes_under_fsdp_on_two(pretrain_data, tmp_path):
    """1 process x 8 for 6 steps; its mid-epoch step-2 checkpoint resumed by 2 FSDP2 ranks x 4 gives the
    same losses (same global batches, same lr schedule)."""
    common = ("train.max_steps=6", "model.drop_path_rate=0.0", "train.ckpt_every=1", "train.keep_last=10")
    full = tmp_path / "full"
    _ok(_beit(1, *_pretrain_args(pretrain_data, full, *common, "train.batch_size=8")))
    ref = _train_losses(full)
    part = tmp_path / "part"
    part.mkdir()
    shutil.copyfile(full / "step_0000002.pt", part / "last.pt")
    text = _ok(_beit(2, *_pretrain_args(pretrain_data, part, *common, "train.distributed=fsdp",
                                        "train.resume=auto")))
    assert "at step 2 (epoch 0, batch 2)" in text
    got = _train_losses(part)
    assert sorted(got) == [3, 4, 5, 6]
    np.testing.assert_allclose([got[s] for s in (3, 4, 5, 6)], [ref[s] for s in (3, 4, 5, 6)], rtol=2e-4)
    _assert_export_is_the_trained_model(part)
