"""The input pipeline at GPU speed (issue 17): loader alone, and training steps fed by the loader vs the same
step on GPU-resident batches, side by side in one command.

Rows (img/s; ratios against the resident step of the same model):
  loader_cpu        PIL decode + two views + mask in DataLoader workers (the CPU path)
  loader_dev        JPEGs decoded in the workers (libjpeg-turbo, data.jpeg_decode=workers), each cut to its crop
                    box there (as beit pretrain / finetune do; --no-worker-crop: whole photos), one pinned copy
                    of the batch's pixels, per-sample views on the device
  loader_dev_whole  the same with whole photos travelling (the crop made on the device): the crop's gain
  *_nvjpeg          the same row with bytes from the workers and nvJPEG batch decode on the device
                    (data.jpeg_decode=device); --jpeg-decode picks which of the two run
  transform_pt/_ft  the device transforms alone on one fixed loader batch (pre-training views / the
                    fine-tuning recipe, + decode for *_nvjpeg), synchronised: their whole cost per batch
  pretrain_dev      BEiT-B/16 MIM step + DALL-E-format tokenizer fed from the JPEG folder (device path) as the
                    engine feeds it (persistent workers; the transform one batch ahead on a side stream,
                    launched after the backward; one host sync a step), two epochs, with the slowest window
                    after an epoch start against the median
  pretrain_cpu      the same step fed by the CPU path (PIL in the workers, data.device=cpu)
  pretrain_res      the same step on one GPU-resident batch
  finetune_dev      BEiT-B/16 classification at 224, RandAugment + random erasing on the device, mixup/cutmix
                    + label smoothing (timm Mixup) in the step, fed from class folders of the JPEGs
  finetune_res      the same step (mixup included) on one GPU-resident batch
  token_agreement   share of tokenizer ids equal on device-made vs CPU-made (PIL Lanczos) views of the same crops
  cifar_ft / cifar_pt   21M BEiT (384 wide, 12 blocks, 4-px patches) on 32 px images kept in GPU memory:
                    fine-tuning with the full recipe, pre-training with a dVAE tokenizer in the loop
                    (``_res``: the same steps on one GPU-resident batch)
  --profile FILE    torch.profiler tables (ops by host and by device time, host syncs) of each fed row

    python benchmarks/data_pipeline.py --json $OUT/data_pipeline.json             # on a GPU
    python benchmarks/data_pipeline.py --device cpu --tiny                         # smoke test, a minute on CPU
    python benchmarks/data_pipeline.py --photos data/camvid/train --cifar data/cifar10/train   # real images
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image

import beit
from beit.data.datasets import ImageFolderDataset, load_image_folder_to_memory
from beit.data.gpu_augment import FinetuneAugment, PretrainViews
from beit.data.gpu_decode import (
    EncodedImageFiles,
    FinetunePipeline,
    InMemoryIndices,
    PretrainPipeline,
    collate_encoded,
)
from beit.data.transforms import PretrainTransform, collate_pretrain, default_mask_generator
from beit.engine.precision import autocast_for

sys.path.insert(0, str(Path(__file__).parent))
from loader_throughput import make_jpegs  # noqa: E402


# ------------------------------------------------------------------------------------------ helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _endless(ds: Any, batch: int, workers: int, collate: Callable, device: torch.device) -> Iterator[Any]:
    """Batches epoch after epoch from ONE loader iterator, as the engine makes them: persistent workers, the
    engine's sampler running through the epochs (``epoch_batches``: no drain at an epoch boundary) with
    ``(epoch, index)`` keys, pinned batches on CUDA."""
    from beit.engine.distributed import EpochIndexed, ResumableDistributedSampler

    sampler = ResumableDistributedSampler(len(ds), batch, num_replicas=1, rank=0, seed=0,
                                          epoch_batches=len(ds) // batch)
    yield from torch.utils.data.DataLoader(EpochIndexed(ds), batch_size=batch, sampler=sampler, num_workers=workers,
                                           collate_fn=collate, drop_last=True, pin_memory=device.type == "cuda",
                                           persistent_workers=workers > 0)


def photos_to_jpegs(src: Path, dst: Path, n: int) -> None:
    """Real photos (e.g. CamVid frames) resized to 500x375 and saved as JPEG q90, cycling if fewer than n."""
    files = [p for p in sorted(src.rglob("*")) if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
    if not files:
        raise SystemExit(f"--photos {src}: no images found")
    dst.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.open(files[i % len(files)]).convert("RGB").resize((500, 375), Image.BICUBIC)
        if i >= len(files):  # a different crop of a repeated photo, so files differ
            img = img.transpose(Image.FLIP_LEFT_RIGHT) if (i // len(files)) % 2 else img
        img.save(dst / f"{i:05d}.jpg", quality=90)


def _classes(root: Path, out: Path, num_classes: int) -> Path:
    """Class folders of symlinks to the same JPEGs (fine-tuning reads root/<class>/<image>), made once."""
    if out.exists():
        return out
    files = sorted(root.glob("*.jpg"))
    for i, f in enumerate(files):
        d = out / f"c{i % num_classes}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f.name).symlink_to(f)
    return out


def _timed(next_batch: Callable[[], Any], step: Callable[[Any], None], batch: int, steps: int, warmup: int,
           device: torch.device, window: int = 0) -> dict[str, float]:
    """img/s of ``step(next_batch())`` over ``steps`` after ``warmup``; with ``window``, per-window img/s too."""
    for _ in range(warmup):
        step(next_batch())
    _sync(device)
    t0 = last = time.perf_counter()
    windows: list[float] = []
    for i in range(steps):
        step(next_batch())
        if window and (i + 1) % window == 0:
            _sync(device)
            now = time.perf_counter()
            windows.append(window * batch / (now - last))
            last = now
    _sync(device)
    out = {"img_per_s": steps * batch / (time.perf_counter() - t0)}
    if windows:
        med = statistics.median(windows)
        out.update(window_min_img_per_s=min(windows), window_median_img_per_s=med,
                   worst_window_vs_median=min(windows) / med)
    return out


def _fed(raw: Iterator[Any], pipe: Callable[[Any], Any] | None, device: torch.device,
         train: Callable[..., None]) -> tuple[Callable[[], Any], Callable[[Any], None]]:
    """``(next_batch, step)`` for ``_timed`` that feed ``train`` as the engine does: the loader's batch moved
    and transformed by ``pipe`` one step ahead on a side stream (``beit.engine.prefetch.DevicePrefetcher``),
    prefetched right after the backward, then the engine's one host sync a step (finite loss)."""
    from beit.engine.prefetch import DevicePrefetcher

    pf = DevicePrefetcher(raw, device, pipe)
    return (lambda: next(pf)), (lambda b: train(b, after_backward=pf.prefetch))


def _kernels(events: Any) -> list[Any]:
    """The profiler's device-side events (kernels, copies, memsets), as its table totals them: the host ops
    named like a Triton kernel carry that kernel's time too, and summing every row would count it twice."""
    from torch.autograd import DeviceType

    return [e for e in events if e.device_type == DeviceType.CUDA and not e.is_user_annotation]


def device_busy(events: Any, steps: int) -> tuple[float, float]:
    """Device time (ms) and device events a step from a profiler's ``key_averages()`` over ``steps`` steps."""
    kernels = _kernels(events)
    return sum(e.self_device_time_total for e in kernels) / 1e3 / steps, sum(e.count for e in kernels) / steps


def _profile(name: str, next_batch: Callable[[], Any], step: Callable[[Any], None], steps: int, out: str) -> None:
    """torch.profiler over ``steps`` fed steps: the ops by self CPU time and by device time, and the syncs."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step(next_batch())
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    ka = prof.key_averages()
    dev_ms, kernels = device_busy(ka, steps)
    text = [f"==== profile {name}: {steps} steps, wall {1e3 * wall / steps:.1f} ms a step (profiled), device "
            f"busy {dev_ms:.1f} ms a step in {kernels:.0f} device events",
            ka.table(sort_by="self_cpu_time_total", row_limit=30)]
    if torch.cuda.is_available():
        text.append(ka.table(sort_by="self_cuda_time_total", row_limit=30))
    text.append("syncs: " + ", ".join(f"{e.key} x{e.count}" for e in ka if "ynchronize" in e.key or
                                      e.key in ("cudaMemcpy", "cudaStreamWaitEvent", "cudaEventSynchronize")))
    print("\n".join(text), flush=True)
    if out:
        with open(out, "a") as f:
            f.write("\n".join(text) + "\n")


def _optimizer(model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), fused=device.type == "cuda")


def _train_step(model: torch.nn.Module, step_fn: Callable, device: torch.device,
                clip_grad: float | None = None) -> Callable[..., None]:
    """One optimizer step as ``Trainer.train_one_epoch``'s, with the engine's own pieces: forward + backward,
    ``after_backward`` (the prefetch), the grad norm (clipped to ``clip_grad`` as the recipe), one host sync
    on the loss, grad norm and the previous update's weights probe, the update, the new weights probe."""
    from beit.engine.trainer import _weights_probe, grad_norm_, step_checks

    opt = _optimizer(model, device)
    params = [p for g in opt.param_groups for p in g["params"]]
    probe: list[torch.Tensor | None] = [None]

    def run(batch: Any, after_backward: Callable[[], None] | None = None) -> None:
        with autocast_for(device, "auto"):
            loss, _ = step_fn(model, batch)
        loss.backward()
        if after_backward is not None:
            after_backward()
        if not bool(torch.isfinite(step_checks(loss, grad_norm_(params, clip_grad), probe[0])).all()):
            raise FloatingPointError("non-finite loss, grad norm or weights")
        opt.step()
        probe[0] = _weights_probe(params)
        opt.zero_grad(set_to_none=True)

    return run


def _compile(model: torch.nn.Module, device: torch.device, enabled: bool, scope: str = "blocks") -> torch.nn.Module:
    if enabled and device.type == "cuda":
        from beit.engine.distributed import compile_blocks

        compile_blocks(model, scope=scope)  # the engine's train.compile / train.compile_scope
    return model


# ------------------------------------------------------------------------------------------ rows
def _crop(views: Any, jpeg_decode: str, a: argparse.Namespace) -> Any:
    """The workers' crop as beit's tasks set it (``views.worker_crop()``), unless --no-worker-crop."""
    return views.worker_crop() if a.worker_crop else None


def _suffix(jpeg_decode: str) -> str:
    return "" if jpeg_decode == "workers" else "_nvjpeg"


def loader_rows(folder: Path, a: argparse.Namespace, device: torch.device, res: dict) -> None:
    size, patch, ds_tok = a.size, a.patch, a.tok_down
    t = PretrainTransform(size, patch, ds_tok, color_jitter=0.4)
    cpu = ImageFolderDataset(folder, transform=t, seed=0)
    it = _endless(cpu, a.batch, a.workers, collate_pretrain, device)
    res["loader_cpu"] = _timed(lambda: next(it), lambda b: None, a.batch, a.steps, a.warmup, device)
    it.close()  # its workers stop
    classes = _classes(folder, folder.parent / "classes", 10)
    for where in a.jpeg_decode:
        sfx = _suffix(where)
        views = PretrainViews.from_transform(t)
        if where == "workers" and a.worker_crop:  # the row without the workers' crop, for comparison
            whole = EncodedImageFiles.from_folder(folder, mask_generator=t.mask_generator, seed=0)
            it0 = _endless(whole, a.batch, a.workers, collate_encoded, device)
            res["loader_dev_whole"] = _timed(lambda it=it0: next(it), PretrainPipeline(views, device), a.batch,
                                             a.steps, a.warmup, device)
            it0.close()
        enc = EncodedImageFiles.from_folder(folder, mask_generator=t.mask_generator, seed=0, jpeg_decode=where,
                                            crop=_crop(views, where, a))
        pipe = PretrainPipeline(views, device)
        it2 = _endless(enc, a.batch, a.workers, collate_encoded, device)
        res["loader_dev" + sfx] = _timed(lambda it=it2: next(it), pipe, a.batch, a.steps, a.warmup, device)
        res["loader_dev" + sfx]["decoder"] = pipe.decoder.summary() | {"skipped_names": pipe.decoder.skipped_names[:5]}
        # the device transforms alone (one fixed loader batch, synchronised): their cost per batch, host + device
        raw = next(it2)
        it2.close()
        res["transform_pt" + sfx] = _timed(lambda r=raw: r, pipe, a.batch, a.steps, 2, device)
        aug = FinetuneAugment(a.size, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25)
        enc_ft = EncodedImageFiles.from_folder(classes, labeled=True, seed=0, jpeg_decode=where,
                                               crop=_crop(aug, where, a))
        ft = FinetunePipeline(aug, device)
        raw_ft = collate_encoded([enc_ft[i] for i in range(a.batch)])
        raw_ft = raw_ft.pin_memory() if device.type == "cuda" else raw_ft  # as the loader hands it over
        res["transform_ft" + sfx] = _timed(lambda r=raw_ft: r, ft, a.batch, a.steps, 2, device)
        if a.profile:
            _profile("transform_pt" + sfx, lambda r=raw: r, pipe, 3, a.profile)
            _profile("transform_ft" + sfx, lambda r=raw_ft: r, ft, 3, a.profile)


def token_agreement_row(folder: Path, a: argparse.Namespace, device: torch.device, res: dict) -> None:
    """How often the tokenizer's ids on device-made tokenizer views equal those on the CPU path's views
    (PIL Lanczos resize of the same crop and flip, no colour jitter), over ``a.batch`` images. The tokenizer:
    ``--tokenizer`` (the official DALL-E encoder.pkl), else a DALL-E-format encoder with random weights (fp16 on
    CUDA, fp32 on CPU; ``--tiny``: the tiny test VAE), seeded, so a CPU run measures the same thing as a GPU one."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    if a.tokenizer:
        from beit.tokenizers import load_tokenizer

        tok = load_tokenizer("dalle", encoder=a.tokenizer, precision="fp16" if device.type == "cuda" else "fp32")
        tok = tok.to(device).eval()
    elif a.tiny:
        tok = _tokenizer(a, device, a.tok_down, compile=False)
    else:
        from beit.tokenizers import DalleEncoder, DalleTokenizer

        torch.manual_seed(0)
        tok = DalleTokenizer(DalleEncoder(), precision="fp16" if device.type == "cuda" else "fp32",
                             channels_last=device.type == "cuda").to(device).eval().requires_grad_(False)
    views = PretrainViews((a.size, a.size), (a.size // a.patch * tok.downsample,) * 2, color_jitter=(0, 0, 0))
    enc = EncodedImageFiles.from_folder(folder, seed=0)
    batch = collate_encoded([enc[i] for i in range(min(a.batch, len(enc)))])
    pipe = PretrainPipeline(views, device)
    dev_views = pipe(batch)["tok_image"]
    imgs, _ = pipe.decoder(batch)
    p = views.params(batch.index, batch.epoch, torch.tensor([i.shape[-2] for i in imgs]),
                     torch.tensor([i.shape[-1] for i in imgs]))
    cpu_views = []
    for path, (t, left, h, w), flip in zip(batch.names, p["box"].tolist(), p["flip"].tolist()):
        img = Image.open(path).convert("RGB")
        v = TF.resized_crop(img, t, left, h, w, list(views.tokenizer_size), InterpolationMode.LANCZOS)
        cpu_views.append(TF.to_tensor(TF.hflip(v) if flip else v))
    cpu_views = torch.stack(cpu_views).to(device)
    with torch.no_grad():
        ids_dev = tok.encode(dev_views, validate=False)
        ids_cpu = tok.encode(cpu_views, validate=False)
    res["token_agreement"] = {"ids_equal_frac": float((ids_dev == ids_cpu).float().mean()),
                              "pixel_mean_abs_diff": float((dev_views - cpu_views).abs().mean()),
                              "tokenizer": a.tokenizer or "random weights (pass --tokenizer encoder.pkl)"}


def _mim_model(a: argparse.Namespace, vocab: int, device: torch.device) -> torch.nn.Module:
    if a.tiny:
        m = beit.create_model("beit_tiny_patch16_224", head="mim", vocab_size=vocab, img_size=a.size,
                              patch_size=a.patch, embed_dim=32, depth=2, num_heads=2)
    else:
        m = beit.create_model("beit_base_patch16_224", head="mim", vocab_size=vocab, attn_impl="cudnn")
    return _compile(m.to(device).train(), device, a.compile)


def _tokenizer(a: argparse.Namespace, device: torch.device, downsample: int, compile: bool = True) -> torch.nn.Module:
    if a.tiny or device.type != "cuda":
        from beit.tokenizers import DiscreteVAE

        tok = DiscreteVAE(vocab_size=64, hidden=16, downsample=downsample, num_res_blocks=0, codebook_dim=16)
    else:  # DALL-E format, random weights: the FLOPs of the official encoder, fp16 as the official code
        from beit.tokenizers import DalleEncoder, DalleTokenizer

        tok = DalleTokenizer(DalleEncoder(), precision="fp16", channels_last=True)
    tok = tok.to(device).eval().requires_grad_(False)
    if device.type == "cuda" and a.compile and compile and hasattr(tok, "encoder"):
        tok.encoder.compile()
    return tok


def pretrain_rows(folder: Path, a: argparse.Namespace, device: torch.device, res: dict) -> None:
    from beit.tasks.pretrain import make_step_fn

    tok = _tokenizer(a, device, a.tok_down)
    model = _mim_model(a, tok.vocab_size, device)
    t = PretrainTransform(a.size, a.patch, a.tok_down, color_jitter=0.4)
    budget = None if a.boolean_mask else t.mask_generator.num_masking_patches  # as beit pretrain: no host sync
    step = _train_step(model, make_step_fn(tok, budget), device, clip_grad=3.0)
    resident = None
    for where in a.jpeg_decode:
        sfx = _suffix(where)
        views = PretrainViews.from_transform(t)
        enc = EncodedImageFiles.from_folder(folder, mask_generator=t.mask_generator, seed=0, jpeg_decode=where,
                                            crop=_crop(views, where, a))
        pipe = PretrainPipeline(views, device)
        it = _endless(enc, a.batch, a.workers, collate_encoded, device)
        steps_per_epoch = len(enc) // a.batch
        fed = _fed(it, pipe, device, step)
        res["pretrain_dev" + sfx] = _timed(*fed, a.batch, max(a.steps, 2 * steps_per_epoch), a.warmup,
                                           device, window=max(1, steps_per_epoch // 4))
        if a.profile:
            _profile("pretrain_dev" + sfx, *fed, 4, a.profile)
        resident = pipe(next(it))
        it.close()
    if a.pretrain_cpu:  # the CPU path (PIL in the workers) feeding the same step: plain moves, no transform
        cpu = ImageFolderDataset(folder, transform=t, seed=0)
        itc = _endless(cpu, a.batch, a.workers, collate_pretrain, device)
        res["pretrain_cpu"] = _timed(*_fed(itc, None, device, step), a.batch, a.steps, a.warmup, device)
        itc.close()
    res["pretrain_res"] = _timed(lambda: resident, step, a.batch, a.steps, 3, device)
    for k in ("pretrain_dev", "pretrain_dev_nvjpeg", "pretrain_cpu"):
        if k in res:
            res[k.replace("_dev", "") + "_ratio"] = res[k]["img_per_s"] / res["pretrain_res"]["img_per_s"]


def _finetune_step_fn(num_classes: int) -> Callable:
    from beit.engine import load_config
    from beit.tasks.classify import FinetuneConfig, make_step_fn

    cfg = load_config(FinetuneConfig, None, ["model=beit_base_patch16_224"])  # paper: mixup .8, cutmix 1, ls .1
    return make_step_fn(cfg, num_classes)


def finetune_rows(folder: Path, a: argparse.Namespace, device: torch.device, res: dict) -> None:
    nc = 10
    classes = _classes(folder, folder.parent / "classes", nc)
    if a.tiny:
        model = beit.create_model("beit_tiny_patch16_224", num_classes=nc, img_size=a.size, patch_size=a.patch,
                                  embed_dim=32, depth=2, num_heads=2)
    else:
        model = beit.create_model("beit_base_patch16_224", num_classes=nc, attn_impl="cudnn")
    model = _compile(model.to(device).train(), device, a.compile)
    step = _train_step(model, _finetune_step_fn(nc), device)
    for where in a.jpeg_decode:
        sfx = _suffix(where)
        aug = FinetuneAugment(a.size, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25)
        enc = EncodedImageFiles.from_folder(classes, labeled=True, seed=0, jpeg_decode=where, crop=_crop(aug, where, a))
        pipe = FinetunePipeline(aug, device)
        it = _endless(enc, a.batch, a.workers, collate_encoded, device)
        fed = _fed(it, pipe, device, step)
        res["finetune_dev" + sfx] = _timed(*fed, a.batch, a.steps, a.warmup, device)
        if a.profile:
            _profile("finetune_dev" + sfx, *fed, 4, a.profile)
        x, y = pipe(next(it))
        it.close()
    res["finetune_res"] = _timed(lambda: (x.clone(), y), step, a.batch, a.steps, 3, device)  # mixup is in place
    for k in ("finetune_dev", "finetune_dev_nvjpeg"):
        if k in res:
            res[k.replace("_dev", "") + "_ratio"] = res[k]["img_per_s"] / res["finetune_res"]["img_per_s"]


def cifar_rows(a: argparse.Namespace, device: torch.device, res: dict) -> None:
    from beit.tasks.pretrain import make_step_fn

    if a.cifar:
        images, labels, _ = load_image_folder_to_memory(a.cifar, progress=False)
    else:
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 255, (a.cifar_images, 32, 32, 3), dtype=torch.uint8, generator=g)
        labels = torch.randint(0, 10, (a.cifar_images,), generator=g)
    wide = dict(embed_dim=32, depth=2, num_heads=2) if a.tiny else dict(embed_dim=384, depth=12, num_heads=6)
    batch = a.cifar_batch
    # fine-tuning: crop 4-px pad, flip, RandAugment, erasing on the device; mixup/cutmix + smoothing in the step
    model = beit.create_model("beit_small_patch16_224" if not a.tiny else "beit_tiny_patch16_224", num_classes=10,
                              img_size=32, patch_size=4, **wide)
    model = _compile(model.to(device).train(), device, a.compile, a.compile_scope)
    res["cifar_params_M"] = sum(p.numel() for p in model.parameters()) / 1e6
    step = _train_step(model, _finetune_step_fn(10), device)
    ds = InMemoryIndices(len(images), seed=0)
    pipe = FinetunePipeline(FinetuneAugment(32, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25), device,
                            images, labels)
    it = _endless(ds, batch, min(a.workers, 2), InMemoryIndices.collate, device)
    res["cifar_ft"] = _timed(*_fed(it, pipe, device, step), batch, a.steps, a.warmup, device)
    x, y = pipe(next(it))
    res["cifar_ft_res"] = _timed(lambda: (x.clone(), y), step, batch, a.steps, 3, device)  # mixup is in place
    if a.profile:
        _profile("cifar_ft", *_fed(it, pipe, device, step), 4, a.profile)
        _profile("cifar_ft_res", lambda: (x.clone(), y), step, 4, a.profile)
    # pre-training: masks in the workers, views on the device, dVAE tokenizer (4x down) in the loop
    from beit.tokenizers import DiscreteVAE

    tok = DiscreteVAE(vocab_size=8192 if not a.tiny else 64, hidden=64 if not a.tiny else 16, downsample=4,
                      num_res_blocks=1 if not a.tiny else 0).to(device).eval().requires_grad_(False)
    mim = beit.create_model("beit_small_patch16_224" if not a.tiny else "beit_tiny_patch16_224", head="mim",
                            vocab_size=tok.vocab_size, img_size=32, patch_size=4, **wide)
    mim = _compile(mim.to(device).train(), device, a.compile, a.compile_scope)
    masks = default_mask_generator(8)
    budget = None if a.boolean_mask else masks.num_masking_patches  # as beit pretrain: no host sync
    pstep = _train_step(mim, make_step_fn(tok, budget), device, clip_grad=3.0)
    pds = InMemoryIndices(len(images), mask_generator=masks, seed=0)
    ppipe = PretrainPipeline(PretrainViews((32, 32), (32, 32)), device, images)
    pit = _endless(pds, batch, a.workers, InMemoryIndices.collate, device)  # masks: CPU work
    res["cifar_pt"] = _timed(*_fed(pit, ppipe, device, pstep), batch, a.steps, a.warmup, device)
    resident = ppipe(next(pit))
    res["cifar_pt_res"] = _timed(lambda: resident, pstep, batch, a.steps, 3, device)
    if a.profile:
        _profile("cifar_pt", *_fed(pit, ppipe, device, pstep), 4, a.profile)
        _profile("cifar_pt_res", lambda: resident, pstep, 4, a.profile)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny models, images and step counts (CPU smoke test)")
    ap.add_argument("--workers", type=int, default=min(15, (os.cpu_count() or 2) - 1))
    ap.add_argument("--images", type=int, default=6144, help="synthetic 500x375 JPEGs to write")
    ap.add_argument("--photos", default="", help="a folder of real photos to resize to 500x375 JPEGs instead")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=10,
                    help="steps before timing a loader-fed row (worker start-up and the first queue fill)")
    ap.add_argument("--cifar", default="", help="CIFAR class folders to keep in memory (default: random 32px)")
    ap.add_argument("--cifar-images", type=int, default=50000)
    ap.add_argument("--cifar-batch", type=int, default=512)
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--boolean-mask", action="store_true",
                    help="pre-training rows: the masked tokens by boolean indexing (two host syncs a step), as "
                         "before the fixed mask budget")
    ap.add_argument("--compile-scope", default="blocks", choices=("blocks", "model"),
                    help="the CIFAR rows' models: train.compile_scope (blocks = regional, model = one graph)")
    ap.add_argument("--tokenizer", default="", help="DALL-E encoder.pkl / safetensors for the id-agreement row")
    ap.add_argument("--only", default="loader,tokens,pretrain,finetune,cifar")
    ap.add_argument("--jpeg-decode", default="workers,device",
                    help="which JPEG decoders the loader/pretrain/finetune rows run: workers and/or device (nvJPEG)")
    ap.add_argument("--no-pretrain-cpu", dest="pretrain_cpu", action="store_false",
                    help="skip the pretrain_cpu row (the CPU path feeding the pre-training step)")
    ap.add_argument("--no-worker-crop", dest="worker_crop", action="store_false",
                    help="workers ship whole photos (the crop made on the device), as before the workers' crop")
    ap.add_argument("--no-engine-threads", dest="engine_threads", action="store_false",
                    help="keep PyTorch's intra-op thread pool at every core (the engine shrinks it beside its workers)")
    ap.add_argument("--json", default="")
    ap.add_argument("--profile", default="", help="also profile each fed row (torch.profiler tables) into this file")
    a = ap.parse_args()
    a.jpeg_decode = [w for w in a.jpeg_decode.split(",") if w]
    if not a.jpeg_decode or set(a.jpeg_decode) - {"workers", "device"}:
        ap.error(f"--jpeg-decode: a comma list of workers, device; got {a.jpeg_decode}")
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    a.size, a.patch, a.tok_down = (64, 8, 4) if a.tiny else (224, 16, 8)
    if a.tiny:
        a.images, a.batch, a.steps, a.warmup = min(a.images, 48), min(a.batch, 8), min(a.steps, 4), min(a.warmup, 2)
        a.cifar_images, a.cifar_batch, a.workers = min(a.cifar_images, 256), min(a.cifar_batch, 32), min(a.workers, 2)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    host_threads = torch.get_num_threads()
    if a.engine_threads:  # as the Trainer does beside its loader workers (beit.engine.threads)
        from beit.engine.threads import cap_intra_op_threads

        host_threads = cap_intra_op_threads(device, a.workers) or host_threads
    only = set(a.only.split(","))
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                           "torch": torch.__version__, "cpus": os.cpu_count(), "workers": a.workers,
                           "host_threads": host_threads, "batch": a.batch, "tiny": a.tiny,
                           "compile": a.compile, "compile_scope": a.compile_scope,
                           "boolean_mask": a.boolean_mask, "worker_crop": a.worker_crop,
                           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps(res), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "jpegs"
        t0 = time.perf_counter()
        if a.photos:
            photos_to_jpegs(Path(a.photos), folder, a.images)
        else:
            make_jpegs(folder, a.images)
        print(f"{a.images} JPEGs 500x375 written in {time.perf_counter() - t0:.1f}s", flush=True)
        for name, fn in (("loader", lambda: loader_rows(folder, a, device, res)),
                         ("tokens", lambda: token_agreement_row(folder, a, device, res)),
                         ("pretrain", lambda: pretrain_rows(folder, a, device, res)),
                         ("finetune", lambda: finetune_rows(folder, a, device, res)),
                         ("cifar", lambda: cifar_rows(a, device, res))):
            if name not in only:
                continue
            t0 = time.perf_counter()
            try:
                fn()
            except Exception as e:  # one failing row must not hide the others
                import traceback

                traceback.print_exc(limit=4)
                res[name + "_error"] = f"{type(e).__name__}: {e}"
            print(f"[{name} {time.perf_counter() - t0:.0f}s] " + json.dumps(
                {k: v for k, v in res.items() if k.startswith(name[:5]) or k.startswith("transform")},
                default=float), flush=True)
            if a.json:  # the rows so far, in case a time limit cuts the run
                Path(a.json).write_text(json.dumps(res, indent=2, default=float))
    print("\nsummary (img/s):")
    for k, v in res.items():
        if isinstance(v, dict) and "img_per_s" in v:
            worst = v.get("worst_window_vs_median")
            extra = f"  worst window / median {worst:.2f}" if worst is not None else ""
            print(f"  {k:22s} {v['img_per_s']:9.0f}{extra}")
    for k in ("cifar_ft", "cifar_pt"):
        if k in res and k + "_res" in res:
            res[k + "_ratio"] = res[k]["img_per_s"] / res[k + "_res"]["img_per_s"]
    for k in ("pretrain_ratio", "pretrain_nvjpeg_ratio", "pretrain_cpu_ratio", "finetune_ratio",
              "finetune_nvjpeg_ratio", "cifar_ft_ratio", "cifar_pt_ratio"):
        if k in res:
            print(f"  {k:22s} {res[k]:9.2f}  (loader-fed / GPU-resident)")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2, default=float))


if __name__ == "__main__":
    main()
