"""``beit demo``: the whole BEiT method in a few CPU minutes, offline, on real images.

scikit-learn ships 1,797 real 8x8 handwritten digits; upsampled to 16x16 they go through exactly the
commands a user runs on their own data: train a visual tokenizer, pre-train a BEiT by masked image
modeling, then fine-tune it and a from-scratch twin with the same recipe and steps.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
import types
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..data.demo import load_digits_images, train_test_split
from ..engine.config import TrainConfig
from ..engine.logging import quiet_console
from ..engine.rundir import RunLock
from ..engine.threads import usable_cores
from ..tokenizers.dvae import DVAEConfig
from .classify import DataConfig, FinetuneConfig, finetune
from .pretrain import PretrainConfig, PretrainDataConfig, PretrainModelConfig, PretrainTokenizerConfig, pretrain
from .tokenizer import TokenizerTrainConfig, train_tokenizer


@dataclass
class DemoConfig:
    """The demo's sizes and recipe in one place (``beit demo`` uses the defaults; ``--quick`` shrinks the steps).

    The digits are 8x8 at heart: at ``img_size`` 16 with 4-px patches each token covers 2x2 original pixels and
    a sequence has 16 tokens, which makes every stage a few seconds per hundred steps on 2 CPU cores.
    """

    img_size: int = 16
    patch_size: int = 4
    embed_dim: int = 96
    depth: int = 4
    num_heads: int = 3
    vocab_size: int = 128
    # the dVAE's regularisers (DVAEConfig): even codebook use over the batch, not a flat q at every position
    # (kl 0.03 instead: PSNR 16.8 dB, perplexity 43 of 128, pre-trained 91.4%; RESULTS.md section 10)
    tok_kl_weight: float = 0.0
    tok_usage_weight: float = 0.003
    tok_steps: int = 300
    pre_steps: int = 600
    ft_steps: int = 150
    batch_size: int = 64
    pre_lr: float = 3e-3  # with data_device batched (4e-3 on the PIL path: RESULTS.md section 5)
    # fine-tuning: 150 steps want a high lr, held off the lower blocks by the layer decay (3e-3 / 0.85 before: one
    # held-out seed of three at 88.9% on an EPYC machine; 7e-3 / 0.75 put all 18 runs of 3 pre-trainings x 6 seeds
    # at 91.4-93.3%, chosen on those digits; at layer decay 0.85 1.5e-2 drops to 88%; RESULTS.md section 5)
    ft_lr: float = 7e-3
    layer_decay: float = 0.75
    crop_padding: int = 0  # fine-tuning's random-crop shift in px (0: none; short schedules learn faster without)
    num_mask_patches: int = 6
    min_mask_patches_per_block: int = 2
    # where pre-training and fine-tuning augment: "batched" (data.device: a whole batch as tensors in the training
    # process, ~1.6x faster demo on 2 cores than "cpu", the per-sample PIL path; RESULTS.md section 5)
    data_device: str = "batched"
    seeds: tuple[int, ...] = (0, 1, 2)  # fine-tuning seeds of each arm (the tokenizer and pre-training run once)
    # processes at work at once after the tokenizer, the cores split evenly between them (one intra-op thread each
    # on 2 cores): with 2, a second process fine-tunes the from-scratch arm while this one pre-trains, then takes
    # the last pre-trained seed (a second thread barely helps these tiny models: two one-thread processes do ~1.45x
    # the work of one with two; RESULTS.md section 5). 1: every run in this process, one after another, on
    # torch's default thread pool.
    lanes: int = 2

    def encoder(self) -> dict[str, int]:
        return dict(embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads)


def write_digits(root: Path, img_size: int = 16) -> tuple[Path, Path]:
    """Digits as PNG class folders (train 80% / test 20%, stratified), like a user's own data."""
    images, labels = load_digits_images(size=img_size)
    x_tr, y_tr, x_te, y_te = train_test_split(images, labels, test_fraction=0.2, seed=0)
    for split, xs, ys in (("train", x_tr, y_tr), ("test", x_te, y_te)):
        for i, (x, y) in enumerate(zip(xs, ys)):
            d = root / split / f"digit_{int(y)}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x.numpy()).save(d / f"{i:04d}.png")
    return root / "train", root / "test"


def _clear_previous_demo(out: Path) -> None:
    """Remove what an earlier demo wrote into ``out`` (its digits, its fine-tuning seeds), so that nothing stale or
    foreign is trained on or reported. Folders holding anything the demo does not write are left alone and refused:
    ``out`` might be a user's folder.

    Raises:
        ValueError: ``out/data`` or ``out/finetune_*`` holds files the demo did not write.
    """
    digit_dirs = {f"digit_{d}" for d in range(10)}
    data = out / "data"
    if data.exists():
        ok = data.is_dir() and all(
            split.name in ("train", "test") and split.is_dir() and all(
                d.name in digit_dirs and d.is_dir() and all(f.suffix == ".png" for f in d.iterdir())
                for d in split.iterdir())
            for split in data.iterdir())
        if not ok:
            raise ValueError(f"{data} holds files the demo did not write: choose another --out")
        shutil.rmtree(data)
    for arm in ("pretrained", "scratch"):
        runs = out / f"finetune_{arm}"
        if runs.exists():
            if not (runs.is_dir() and all(p.is_dir() and p.name.startswith("seed") for p in runs.iterdir())):
                raise ValueError(f"{runs} holds files the demo did not write: choose another --out")
            shutil.rmtree(runs)


def _finetune_top1(cfg: FinetuneConfig, threads: int | None = None, quiet: bool = False) -> float:
    """One fine-tuning run's held-out top-1 (%): the job of a lane (module level, so that a worker process can run it).

    ``threads``: this process's intra-op thread pool for the run (None: left as it is); ``quiet``: log to the run's
    ``log.txt`` only, not the console.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    with quiet_console() if quiet else nullcontext():
        return float(finetune(cfg).get("top1", float("nan")))


def _lane_init() -> None:
    """The start of a lane's worker process. Ctrl-C is left to the demo's process, which stops the worker itself
    (:meth:`_SecondLane.close`; the trainer installs no handler over an ignored SIGINT), and the worker exits as soon
    as that process is gone (SIGKILL, the OOM killer: no orphan running the queued runs, then waiting forever).
    Outside a worker (no parent process): nothing."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # tqdm's console lock would be a multiprocessing one, a named semaphore that a worker killed by close() leaves
    # behind ("resource_tracker: There appear to be 1 leaked semaphore objects" after Ctrl-C); a thread lock is
    # enough in a process that starts none
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())

    def exit_with_parent() -> None:
        parent.join()  # returns when the parent process has ended
        os._exit(1)

    threading.Thread(target=exit_with_parent, name="beit-demo-parent-watch", daemon=True).start()


@contextmanager
def _caller_script_not_rerun() -> Iterator[None]:
    """While a worker process is started (``spawn``): ``sys.modules["__main__"]`` is an empty module. ``spawn``
    runs the caller's main script again in the worker (as ``__mp_main__``), and a script that calls
    :func:`run_demo` without ``if __name__ == "__main__":`` would run the whole demo again there, into the same
    folder, before the worker failed. The worker's jobs need nothing from that script, only this module."""
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if main is None:
            del sys.modules["__main__"]
        else:
            sys.modules["__main__"] = main


class _SecondLane:
    """Worker processes (``lanes - 1``) for the fine-tuning runs that can go beside this process's own work.

    Started with ``spawn`` (a fresh interpreter, the same on every platform, nothing inherited from a process that
    has already run torch). Where no process can be started (e.g. a sandbox without semaphores) every run goes in
    this one; so does a run whose worker died (e.g. killed for memory: it is done again here, not lost), and every
    later run, on this process's whole thread pool again. ``lanes`` <= 1: no worker.
    """

    def __init__(self, lanes: int) -> None:
        self.lanes = max(1, lanes)
        self.threads_before = torch.get_num_threads()
        self.threads: int | None = None  # each lane's intra-op threads once split (None: this process's pool)
        self.pool: ProcessPoolExecutor | None = None
        if self.lanes > 1:
            try:
                self.pool = ProcessPoolExecutor(max_workers=self.lanes - 1, initializer=_lane_init,
                                                mp_context=multiprocessing.get_context("spawn"))
            except (OSError, NotImplementedError, ImportError) as e:
                print(f"      (no second process could be started: {e}; every run goes in this one)", flush=True)

    def split_cores(self) -> bool:
        """Give this process its share of the cores (the workers get theirs per job); False: no worker."""
        if self.pool is None:
            return False
        self.threads = max(1, usable_cores() // self.lanes)
        torch.set_num_threads(self.threads)
        return True

    def submit(self, cfg: FinetuneConfig) -> Future | None:
        """``cfg``'s run as a worker's job (quiet: logged to its ``log.txt`` only), or None: no worker (any more),
        the run is for this process."""
        return self._submit_job(_finetune_top1, cfg, self.threads, True)

    def _submit_job(self, fn: Any, *args: Any) -> Future | None:
        """``fn(*args)`` as a worker's job (``fn`` and ``args`` picklable), or None where there is no worker."""
        if self.pool is None:
            return None
        try:
            with _caller_script_not_rerun():  # the first job starts the worker
                return self.pool.submit(fn, *args)
        except (BrokenProcessPool, OSError) as e:  # it died while this process worked (e.g. killed for memory)
            self._lost(e)
            return None

    def result(self, job: Future | None, cfg: FinetuneConfig, quiet: bool) -> float:
        """The worker's top-1 for ``cfg``, or the run done in this process when it had no job there or that
        worker died. An error raised in the run itself is raised here."""
        if job is not None:
            try:
                return job.result()
            except BrokenProcessPool as e:
                self._lost(e)
        return _finetune_top1(cfg, quiet=quiet)

    def _lost(self, e: Exception) -> None:
        """The worker died (or could not be started): said once; this process takes every run from here, on its
        whole thread pool."""
        if self.pool is None:
            return
        print(f"      (the second process stopped: {e}; its runs are done in this one)", flush=True)
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.pool = None
        torch.set_num_threads(self.threads_before)

    def close(self, failed: bool) -> None:
        """End the workers and give this process its thread pool back. ``failed`` (an error, Ctrl-C, SIGTERM):
        the workers are killed at once, not waited for (their current run and the one queued would finish first:
        a started job cannot be cancelled); their run folders are the demo's own, replaced by the next demo."""
        pool, self.pool = self.pool, None
        try:
            if pool is not None:
                if failed:
                    for p in list((getattr(pool, "_processes", None) or {}).values()):
                        p.kill()
                pool.shutdown(wait=True, cancel_futures=True)
        finally:
            torch.set_num_threads(self.threads_before)


def _mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    m = sum(values) / len(values)
    sd = (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return m, sd


def run_demo(out: str | Path = "runs/demo", quick: bool = False, cfg: DemoConfig | None = None) -> dict[str, Any]:
    """Tokenizer -> MIM pre-training -> fine-tuning of the pre-trained model and of a from-scratch twin.

    Each arm is fine-tuned once per seed in ``cfg.seeds`` with the same recipe and steps; the held-out top-1
    (%) of every run, their mean and spread are printed and written to ``OUT/demo_summary.json``. A run replaces
    the previous demo in ``out`` (its ``data/``, ``tokenizer/``, ``pretrain/``, ``finetune_*/``).

    With ``cfg.lanes`` 2 (the default; not ``quick``) a second process (``spawn``) fine-tunes beside this one; it
    does not run the caller's script again (no ``if __name__ == "__main__":`` needed), ends with this process, and
    is killed at once when the demo stops on an error, Ctrl-C or SIGTERM. An error of one of its runs is raised
    here as it was raised there.

    Raises:
        ValueError: ``out`` is empty, or its ``data/`` / ``finetune_*/`` hold files the demo did not write.
        RunLockedError: another demo (a live process) is writing to ``out`` (``out/.lock`` names it).
    """
    if not str(out).strip():
        raise ValueError("out is empty: give the folder the demo writes to")
    out = Path(out)
    c = cfg or DemoConfig()
    if quick:
        c = replace(c, tok_steps=12, pre_steps=12, ft_steps=12, seeds=c.seeds[:1], lanes=1)  # no process to start
    t0 = time.perf_counter()
    # overwrite: running the demo again replaces its previous run (training commands refuse that by default)
    common = dict(num_workers=0, log_every=10 if quick else 50, overwrite=True)
    # one demo per folder: a second one would delete and rewrite the digits the first is training on
    with RunLock(out):
        _clear_previous_demo(out)
        train_dir, test_dir = write_digits(out / "data", c.img_size)
        print(f"[1/4] wrote the digits as images: {train_dir} (train), {test_dir} (test)", flush=True)
        lane = _SecondLane(c.lanes)
        failed = True
        try:
            summary = _run_stages(c, out, train_dir, test_dir, common, lane, t0, quick)
            failed = False
            return summary
        finally:
            lane.close(failed)


def _run_stages(c: DemoConfig, out: Path, train_dir: Path, test_dir: Path, common: dict[str, Any],
                lane: _SecondLane, t0: float, quick: bool) -> dict[str, Any]:
    """``run_demo`` from the tokenizer on; ``lane``: the second lane (without a worker: every run here, in order)."""
    ft_train = TrainConfig(output_dir="", max_steps=c.ft_steps, batch_size=c.batch_size, lr=c.ft_lr, min_lr=1e-5,
                           warmup_steps=max(1, c.ft_steps // 10), weight_decay=0.05, layer_decay=c.layer_decay,
                           eval_every=2, **{**common, "log_every": 10 if quick else 25})
    data = DataConfig(train_dir=str(train_dir), val_dir=str(test_dir), in_memory=True, auto_augment=None,
                      reprob=0.0, hflip=0.0, color_jitter=0.0, crop_padding=c.crop_padding, device=c.data_device)
    scratch_source = ("beit_tiny_patch16_224", dict(patch_size=c.patch_size, **c.encoder()))

    def ft_cfg(arm: str, source: tuple[str, dict[str, Any]], seed: int) -> FinetuneConfig:
        return FinetuneConfig(model=source[0], model_overrides=source[1], img_size=c.img_size, drop_path=0.0,
                              mixup=0.0, cutmix=0.0, smoothing=0.1, data=data,
                              train=replace(ft_train, output_dir=str(out / f"finetune_{arm}" / f"seed{seed}"),
                                            seed=seed))

    tok_cfg = TokenizerTrainConfig(
        data_dir=str(train_dir), val_dir=str(test_dir), img_size=c.img_size, grid_images=8, in_memory=True,
        # a pull of the batch's code use towards uniform keeps the codebook in use (without it: ~5 of 128 codes)
        model=DVAEConfig(vocab_size=c.vocab_size, hidden=48, downsample=c.patch_size, num_res_blocks=1,
                         codebook_dim=32, kl_weight=c.tok_kl_weight, usage_weight=c.tok_usage_weight,
                         temperature_anneal_steps=c.tok_steps),
        train=TrainConfig(output_dir=str(out / "tokenizer"), max_steps=c.tok_steps, batch_size=64, lr=3e-3,
                          min_lr=1e-4, warmup_steps=10, weight_decay=0.0, eval_every=10**9, seed=0, **common),
    )
    tok = train_tokenizer(tok_cfg)
    psnr, ppl = tok.get("heldout_psnr", float("nan")), tok.get("heldout_perplexity", float("nan"))
    print(f"[2/4] ({time.perf_counter() - t0:.0f}s) tokenizer: held-out PSNR {psnr:.1f} dB, codebook perplexity "
          f"{ppl:.1f} of {c.vocab_size}", flush=True)

    # The tokenizer had every core (its convolutions use them). From here each lane has its share (one thread on
    # 2 cores): the from-scratch arm needs no pre-training, so the second lane fine-tunes it while this one
    # pre-trains.
    scratch_jobs: dict[int, Future | None] = {}
    if lane.split_cores():
        scratch_jobs = {seed: lane.submit(ft_cfg("scratch", scratch_source, seed)) for seed in c.seeds}
        print(f"      a second process fine-tunes the from-scratch arm meanwhile (quietly: its logs are in "
              f"{out}/finetune_scratch/seed*/log.txt)", flush=True)

    pre_cfg = PretrainConfig(
        model=PretrainModelConfig(name="beit_tiny_patch16_224", img_size=c.img_size, patch_size=c.patch_size,
                                  drop_path_rate=0.0, **c.encoder()),
        data=PretrainDataConfig(path=str(train_dir), in_memory=True, device=c.data_device, scale=(0.5, 1.0),
                                color_jitter=0.0, hflip=0.0,
                                num_mask_patches=c.num_mask_patches,
                                min_mask_patches_per_block=c.min_mask_patches_per_block),
        tokenizer=PretrainTokenizerConfig(kind="dvae", path=tok["tokenizer_path"]),
        train=TrainConfig(output_dir=str(out / "pretrain"), max_steps=c.pre_steps, batch_size=c.batch_size,
                          lr=c.pre_lr, min_lr=1e-5, warmup_steps=max(1, c.pre_steps // 10), weight_decay=0.05,
                          betas=(0.9, 0.98), clip_grad=3.0, image_every=10**9, seed=0, **common),
        vis_samples=6,
    )
    pre = pretrain(pre_cfg)
    mim_acc = pre.get("train/mim_acc", float("nan"))
    # in percent as the top-1 below; metrics.jsonl's and the summary's mim_acc is the fraction
    print(f"[3/4] ({time.perf_counter() - t0:.0f}s) pre-trained: masked-token accuracy {100 * mim_acc:.1f}% "
          f"(mim_acc {mim_acc:.3f})", flush=True)

    pretrained_source = (pre["model_dir"], {})
    # the second lane, done with the from-scratch arm by now or soon, takes the last pre-trained seed
    pretrained_jobs: dict[int, Future | None] = {}
    if len(c.seeds) > 1:
        pretrained_jobs[c.seeds[-1]] = lane.submit(ft_cfg("pretrained", pretrained_source, c.seeds[-1]))
    top1: dict[str, list[float]] = {"pretrained": [], "scratch": []}
    for i, seed in enumerate(c.seeds):
        if i == 1:
            print(f"      the other seeds run quietly: their logs are in {out}/finetune_*/seed*/log.txt", flush=True)
        for arm, source, jobs in (("pretrained", pretrained_source, pretrained_jobs),
                                  ("scratch", scratch_source, scratch_jobs)):
            top1[arm].append(lane.result(jobs.get(seed), ft_cfg(arm, source, seed), quiet=i > 0))
        print(f"      ({time.perf_counter() - t0:.0f}s) seed {seed}: pre-trained {top1['pretrained'][-1]:.1f}% vs "
              f"from scratch {top1['scratch'][-1]:.1f}%", flush=True)
    stats = {arm: _mean_spread(v) for arm, v in top1.items()}
    n_test = sum(1 for _ in test_dir.rglob("*.png"))
    pm, ps = stats["pretrained"]
    sm, ss = stats["scratch"]
    print(f"[4/4] ({time.perf_counter() - t0:.0f}s) fine-tuned {c.ft_steps} steps, {len(c.seeds)} seed(s) per arm, "
          f"top-1 on {n_test} held-out digits (mean +- std): pre-trained {pm:.1f} +- {ps:.1f}% vs from scratch "
          f"{sm:.1f} +- {ss:.1f}%", flush=True)
    if quick:
        print(f"      (--quick: {c.ft_steps} steps a stage show that every stage runs; these accuracies are no result: "
              "`beit demo` without --quick compares the arms)", flush=True)
    last = c.seeds[-1]
    pngs = {
        "tokenizer reconstructions": tok.get("recon_grid"),
        "masked-prediction panel": pre.get("panel"),
        "pre-training curves": pre.get("curves"),
        "fine-tune curves (pre-trained)": str(out / "finetune_pretrained" / f"seed{last}" / "curves.png"),
        "fine-tune curves (scratch)": str(out / "finetune_scratch" / f"seed{last}" / "curves.png"),
    }
    for name, path in pngs.items():
        print(f"  {name}: {path}")
    summary = dict(top1={arm: dict(runs=v, mean=stats[arm][0], std=stats[arm][1]) for arm, v in top1.items()},
                   seeds=list(c.seeds), seconds=round(time.perf_counter() - t0, 1), pngs=pngs,
                   tokenizer={k: tok.get(k) for k in ("heldout_psnr", "heldout_perplexity", "heldout_dead_codes")},
                   mim_acc=mim_acc, config=asdict(c))
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"done in {summary['seconds']}s; summary: {out / 'demo_summary.json'}")
    return summary
