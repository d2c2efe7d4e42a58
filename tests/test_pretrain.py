"""Pre-training end to end on tiny generated images: it learns, resumes exactly, and refuses bad configs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from beit.engine.config import ConfigError, load_config
from beit.tasks.pretrain import PretrainConfig, make_step_fn, pretrain
from beit.tokenizers import DiscreteVAE


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    data = root / "images" / "nested"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(24):
        img = np.zeros((32, 32, 3), np.uint8)
        img[:, :, i % 3] = 200  # coloured halves: tokens are predictable from context
        img[: 16 + (i % 8)] = rng.integers(0, 255, 3)
        Image.fromarray(img).save(data / f"{i}.png")
    (root / "images" / "broken.jpg").write_bytes(b"not an image")
    tok = DiscreteVAE(vocab_size=16, hidden=8, downsample=4, num_res_blocks=0, codebook_dim=8)
    torch.manual_seed(0)
    tok.save(root / "tok.safetensors")
    return root


def _cfg(root, out, **train) -> PretrainConfig:
    overrides = [
        f"data.path={root / 'images'}", "data.num_mask_patches=26", "data.min_mask_patches_per_block=4",
        "data.color_jitter=0.0", "model.name=beit_tiny_patch16_224", "model.img_size=32", "model.patch_size=4",
        "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.drop_path_rate=0.1",
        "tokenizer.kind=dvae", f"tokenizer.path={root / 'tok.safetensors'}", f"train.output_dir={out}",
        "train.batch_size=8", "train.num_workers=0", "train.lr=1e-3", "train.warmup_steps=2", "train.log_every=1",
        "train.ckpt_every=3", "train.image_every=4", "vis_samples=2",
    ] + [f"train.{k}={v}" for k, v in train.items()]
    return load_config(PretrainConfig, None, overrides)


def _losses(out) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r.get("split", "train") == "train" and "loss" in r]


def test_pretrain_runs_learns_and_writes_pictures(tiny_setup, tmp_path) -> None:
    out = tmp_path / "run"
    result = pretrain(_cfg(tiny_setup, out, max_steps=12))
    losses = _losses(out)
    assert len(losses) == 12 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3])  # 16-way token prediction gets better
    assert (out / "mim_panel.png").exists() and (out / "curves.png").exists()
    assert list(out.rglob("mim_step*.png"))
    assert (out / "final" / "model.safetensors").exists()
    import beit

    model = beit.load_model(out / "final")
    assert model.cfg.head == "mim" and model.cfg.vocab_size == 16 and model.cfg.use_shared_rel_pos_bias
    assert any("mim_acc" in k for k in result)
    # `beit visualize` makes the same panel from a checkpoint (its config.yaml is found beside it)
    from beit.cli import main

    png = tmp_path / "panel.png"
    assert main(["visualize", str(out / "last.pt"), "--out", str(png), "--num", "3"]) == 0
    from PIL import Image

    assert Image.open(png).size[0] > 4 * 32  # input | mask | true tokens decoded | predictions decoded
    # a checkpoint copied alone (no config.yaml beside it): its own stored config; --out a folder: the panel inside
    import shutil

    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(out / "last.pt", alone / "last.pt")
    assert main(["visualize", str(alone / "last.pt"), "--out", str(tmp_path / "pics") + "/", "--num", "2"]) == 0
    assert (tmp_path / "pics" / "mim_panel.png").is_file()
    with pytest.raises(ValueError, match=r"--out panel: give a \.png"):  # before any image is decoded
        main(["visualize", str(alone / "last.pt"), "--out", "panel", "--debug"])
    with pytest.raises(ValueError, match="--num must be in 1..64"):
        main(["visualize", str(alone / "last.pt"), "--num", "1000", "--debug"])
    # --out inside the run's data.path: the next pre-training would train on the panel; refused, nothing written
    images = tiny_setup / "images"
    before = sorted(images.rglob("*"))
    with pytest.raises(ValueError, match=r"would be written inside the run's data.path .*give --out a place outside"):
        main(["visualize", str(out / "last.pt"), "--out", str(images) + "/", "--num", "2", "--debug"])
    assert sorted(images.rglob("*")) == before


def test_model_init_says_in_the_run_log_what_it_loaded(tiny_setup, tmp_path) -> None:
    first = tmp_path / "first"
    pretrain(_cfg(tiny_setup, first, max_steps=3))
    second = tmp_path / "second"
    cfg = _cfg(tiny_setup, second, max_steps=3)
    cfg.model.init = str(first / "final")
    pretrain(cfg)
    log = (second / "log.txt").read_text()
    assert f"{first / 'final' / 'model.safetensors'}: loaded " in log and " tensors" in log, log[:2000]


def test_resume_is_exact(tiny_setup, tmp_path) -> None:
    full = tmp_path / "full"
    pretrain(_cfg(tiny_setup, full, max_steps=8))
    part = tmp_path / "part"
    from beit.engine.trainer import Trainer

    real_fit = Trainer.fit
    Trainer.fit = lambda self, stop_after_step=None: real_fit(self, stop_after_step=5)  # as if killed at step 5
    try:
        pretrain(_cfg(tiny_setup, part, max_steps=8))
    finally:
        Trainer.fit = real_fit
    assert len(_losses(part)) == 5
    pretrain(_cfg(tiny_setup, part, max_steps=8, resume="auto"))
    assert _losses(part) == _losses(full)  # bit-exact, not allclose


def test_overwrite_leaves_no_stale_final_model(tiny_setup, tmp_path, monkeypatch) -> None:
    """--overwrite kept the earlier run's final/model.safetensors and mim_panel.png beside a new run that failed
    before writing its own: a stale model to ship. Now they go with the earlier run's checkpoints."""
    out = tmp_path / "run"
    pretrain(_cfg(tiny_setup, out, max_steps=3))
    assert (out / "final" / "model.safetensors").is_file() and (out / "mim_panel.png").is_file()
    import beit.tasks.pretrain.train as T

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(T, "save_model", fail)  # the new run fails after training, before its final model
    with pytest.raises(OSError, match="disk full"):
        pretrain(_cfg(tiny_setup, out, max_steps=4, overwrite="true"))
    assert not (out / "final").exists() and not (out / "mim_panel.png").exists()
    from beit.engine import load_checkpoint

    assert load_checkpoint(out / "last.pt")["step"] == 4


def test_bad_configs_fail_fast(tiny_setup, tmp_path) -> None:
    with pytest.raises(ConfigError, match="data.num_mask_patches.*larger than the 8x8"):
        load_config(
            PretrainConfig, None, [f"data.path={tiny_setup}", "model.img_size=32", "model.patch_size=4",
                                   "data.num_mask_patches=100", f"tokenizer.path={tiny_setup / 'tok.safetensors'}"])
    with pytest.raises(ConfigError, match="data.min_mask_patches_per_block"):
        load_config(PretrainConfig, None, [f"data.path={tiny_setup}", "model.img_size=32", "model.patch_size=4",
                                           "data.num_mask_patches=10", "data.min_mask_patches_per_block=16",
                                           f"tokenizer.path={tiny_setup / 'tok.safetensors'}"])
    with pytest.raises(ConfigError, match="data.path.*not found"):
        load_config(PretrainConfig, None, ["data.path=/nowhere/at/all", f"tokenizer.path={tiny_setup}"])
    with pytest.raises(ConfigError, match="tokenizer.path.*file not found"):
        load_config(PretrainConfig, None, [f"data.path={tiny_setup}", "tokenizer.path=/no/encoder.pkl"])
    with pytest.raises(ConfigError, match="data.nmask"):
        load_config(PretrainConfig, None, ["data.nmask=3"])


def test_masking_and_transform_keys_name_themselves(tiny_setup, tmp_path) -> None:
    """Each bad masking / augmentation value named another key (data.num_mask_patches for the block sizes) or
    none (torchvision's "If brightness is a single number, ..."); a budget of every patch was accepted."""
    base = [f"data.path={tiny_setup / 'images'}", "model.img_size=32", "model.patch_size=4",
            "data.num_mask_patches=26", "data.min_mask_patches_per_block=4",
            f"tokenizer.path={tiny_setup / 'tok.safetensors'}"]
    cases = {
        "data.max_mask_patches_per_block=2": "'data.max_mask_patches_per_block': 2 is smaller than "
                                             "data.min_mask_patches_per_block=4",
        "data.min_mask_patches_per_block=0": "'data.min_mask_patches_per_block': must be >= 1, got 0",
        "data.color_jitter=-1": "'data.color_jitter': must be >= 0 (0: off), got -1",
        "data.hflip=2": "'data.hflip': must be in [0, 1] (a probability), got 2",
        "data.std=[0,0,0]": "'data.std': every channel's std must be > 0",
        "data.scale=[1.5,0.2]": "'data.scale': must be [min, max] with 0 < min <= max <= 1",
        "data.num_mask_patches=64": "'data.num_mask_patches': 64 masks every patch (patch grid 8x8 = 64)",
        f"data.path={tiny_setup / 'tok.safetensors'}": "'data.path': ",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError) as info:
            load_config(PretrainConfig, None, [*base, override])
        assert f"config key {message}" in str(info.value), (override, str(info.value))
    assert load_config(PretrainConfig, None, [*base, "data.num_mask_patches=63", "data.max_mask_patches_per_block=4"])


def test_tokenizer_config_is_checked_against_the_registry(tiny_setup) -> None:
    """tokenizer.kind / precision / decoder are judged by the kind's registry entry, before any work."""
    base = [f"data.path={tiny_setup}", f"tokenizer.path={tiny_setup / 'tok.safetensors'}"]
    with pytest.raises(ConfigError, match="tokenizer.kind': must be one of 'auto', 'dalle', 'dvae', got 'vqgan'"):
        load_config(PretrainConfig, None, base + ["tokenizer.kind=vqgan"])
    with pytest.raises(ConfigError, match=r"tokenizer.precision': a dvae tokenizer runs in fp32 \(or auto: its own\), "
                                          "got 'bf16'"):
        load_config(PretrainConfig, None, base + ["tokenizer.kind=dvae", "tokenizer.precision=bf16"])
    with pytest.raises(ConfigError, match="tokenizer.decoder': a dvae tokenizer keeps its decoder in tokenizer.path"):
        load_config(PretrainConfig, None, base + ["tokenizer.kind=dvae", f"tokenizer.decoder={tiny_setup / 'tok.safetensors'}"])
    cfg = load_config(PretrainConfig, None, base + ["tokenizer.kind=dvae"])
    from beit.tasks.pretrain import build_tokenizer

    tok = build_tokenizer(cfg.tokenizer)
    assert isinstance(tok, DiscreteVAE) and not tok.training and tok.vocab_size == 16


def test_readme_own_dvae_command_shape(tiny_setup) -> None:
    """README: `beit pretrain -c pretrain_base data.path=... tokenizer.path=runs/tok/dvae.safetensors` failed
    (the preset's kind dalle: "not a DALL-E tokenizer"; then its fp16: "a dvae tokenizer runs in fp32"). The kind
    is read from the file and the precision follows it; an explicit kind or precision stays strict, saying what
    to set."""
    from beit.configs import preset_path
    from beit.tasks.pretrain import build_tokenizer

    base = [f"data.path={tiny_setup / 'images'}", f"tokenizer.path={tiny_setup / 'tok.safetensors'}"]
    cfg = load_config(PretrainConfig, preset_path("pretrain_base"), base)
    assert (cfg.tokenizer.kind, cfg.tokenizer.precision) == ("dvae", "auto")
    assert isinstance(build_tokenizer(cfg.tokenizer), DiscreteVAE)
    cfg = load_config(PretrainConfig, None, base)  # the dataclass's default kind too
    assert cfg.tokenizer.kind == "dvae"
    with pytest.raises(ConfigError, match=r"'tokenizer.kind': dalle, but .*tok.safetensors is a dvae tokenizer: "
                                          r"set tokenizer.kind=dvae \(or auto\)"):
        load_config(PretrainConfig, preset_path("pretrain_base"), [*base, "tokenizer.kind=dalle"])
    with pytest.raises(ConfigError, match="'tokenizer.precision': a dvae tokenizer runs in fp32"):
        load_config(PretrainConfig, preset_path("pretrain_base"), [*base, "tokenizer.precision=fp16"])
    from beit.tokenizers import detect_tokenizer_kind, resolve_precision

    assert detect_tokenizer_kind("x/encoder.pkl") == "dalle"
    assert resolve_precision("dalle", "auto", "cuda") == "fp16" and resolve_precision("dalle", "auto") == "fp32"
    assert resolve_precision("dvae", "auto", "cuda") == "fp32"
    with pytest.raises(ConfigError, match="'tokenizer.path': .*is a folder, not a file"):
        load_config(PretrainConfig, None, [f"data.path={tiny_setup / 'images'}", f"tokenizer.path={tiny_setup}"])


def test_step_only_scores_masked_tokens() -> None:
    import beit

    model = beit.create_model("beit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=32, depth=1,
                              num_heads=2, head="mim", vocab_size=16)
    tok = DiscreteVAE(vocab_size=16, hidden=8, downsample=4, num_res_blocks=0, codebook_dim=8).eval()
    mask = torch.zeros(2, 8, 8, dtype=torch.bool)
    mask[:, :2, :3] = True
    batch = {"image": torch.randn(2, 3, 32, 32), "tok_image": torch.rand(2, 3, 32, 32), "mask": mask}
    loss, metrics = make_step_fn(tok)(model, batch)
    tokens = tok.encode(batch["tok_image"]).flatten(1)[mask.flatten(1)]
    expected = torch.nn.functional.cross_entropy(model(batch["image"], mask), tokens)
    torch.testing.assert_close(loss, expected)
    assert float(metrics["masked_frac"]) == pytest.approx(6 / 64)


def test_fixed_budget_step_equals_boolean_indexing_without_a_host_sync() -> None:
    """The step with ``mask_budget`` (fixed-size positions, no data-dependent shape) gives the loss, accuracy
    and gradients of the official boolean indexing, on masks of different counts per image."""
    import beit
    from beit.data.masking import BlockwiseMaskGenerator
    from beit.models.beit import masked_positions

    torch.manual_seed(0)
    model = beit.create_model("beit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=32, depth=1,
                              num_heads=2, head="mim", vocab_size=16)
    tok = DiscreteVAE(vocab_size=16, hidden=8, downsample=4, num_res_blocks=0, codebook_dim=8).eval()
    gen = BlockwiseMaskGenerator((8, 8), 26, 4)
    g = torch.Generator().manual_seed(3)
    mask = torch.stack([gen(g) for _ in range(6)])
    counts = mask.flatten(1).sum(1)
    assert counts.max() <= 26 and len(set(counts.tolist())) > 1  # some images below the budget: padding used
    batch = {"image": torch.randn(6, 3, 32, 32), "tok_image": torch.rand(6, 3, 32, 32), "mask": mask}
    results = []
    for budget in (None, 26):
        model.zero_grad()
        loss, metrics = make_step_fn(tok, mask_budget=budget)(model, batch)
        loss.backward()
        results.append((loss.detach(), metrics["mim_acc"], {n: p.grad.clone() for n, p in model.named_parameters()
                                                            if p.grad is not None}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1])
    assert results[1][2].keys() == results[0][2].keys()
    for n in results[0][2]:
        torch.testing.assert_close(results[1][2][n], results[0][2][n], rtol=1e-4, atol=1e-6, msg=n)
    positions, valid = masked_positions(mask, 26)  # the masked rows, flattened, are tokens[mask]'s order
    assert torch.equal(positions[valid], mask.flatten(1).nonzero()[:, 1]) and torch.equal(valid.sum(1), counts)
    with pytest.raises(ValueError, match="mask budget"):
        masked_positions(mask, 65)
    with pytest.raises(RuntimeError, match="more masked patches than mask_budget 20"):  # never a silent cut
        make_step_fn(tok, mask_budget=20)(model, batch)
    empty = dict(batch, mask=torch.zeros_like(mask))  # as the boolean path: NaN, so the engine stops
    assert math.isnan(float(make_step_fn(tok, mask_budget=26)(model, empty)[0].detach()))
    with pytest.raises(ValueError, match="positions must be"):
        model(batch["image"], mask, positions=positions[:1])
    with pytest.raises(ValueError, match="head='mim'"):
        beit.create_model("beit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=32, depth=1,
                          num_heads=2)(batch["image"], positions=positions)


def test_webdataset_shards_train_and_resume_exactly(tiny_setup, tmp_path) -> None:
    """Large sets come as tar shards: a stream, split over ranks and workers; resume stays exact."""
    import io

    import webdataset as wds

    shards = tmp_path / "shards"
    shards.mkdir()
    images = sorted((tiny_setup / "images" / "nested").glob("*.png"))
    for s in range(3):
        with wds.TarWriter(str(shards / f"train-{s:04d}.tar")) as w:
            for p in images[s * 8 : (s + 1) * 8]:
                buf = io.BytesIO()
                Image.open(p).save(buf, format="PNG")
                w.write({"__key__": f"{s}_{p.stem}", "png": buf.getvalue()})

    def cfg(out, **train):
        c = _cfg(tiny_setup, out, **train)
        c.data.path, c.data.num_samples = str(shards), 24
        return c

    with pytest.raises(ConfigError, match="data.num_samples"):
        load_config(PretrainConfig, None, [f"data.path={shards}", f"tokenizer.path={tiny_setup / 'tok.safetensors'}"])
    full = tmp_path / "full"
    pretrain(cfg(full, max_steps=7))
    assert len(_losses(full)) == 7
    part = tmp_path / "part"
    from beit.engine.trainer import Trainer

    real_fit = Trainer.fit
    Trainer.fit = lambda self, stop_after_step=None: real_fit(self, stop_after_step=4)  # killed mid-epoch
    try:
        pretrain(cfg(part, max_steps=7))
    finally:
        Trainer.fit = real_fit
    pretrain(cfg(part, max_steps=7, resume="auto"))
    assert _losses(part) == _losses(full)


def test_two_process_gloo_pretraining(tiny_setup, tmp_path) -> None:
    """`torchrun --nproc_per_node 2 -m beit pretrain` on CPU (gloo): ranks train on disjoint shards in step."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    cfg = _cfg(tiny_setup, out, max_steps=4)
    overrides = [
        f"data.path={cfg.data.path}", "data.num_mask_patches=26", "data.min_mask_patches_per_block=4",
        "data.color_jitter=0.0", "model.name=beit_tiny_patch16_224", "model.img_size=32", "model.patch_size=4",
        "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "tokenizer.kind=dvae",
        f"tokenizer.path={cfg.tokenizer.path}", f"train.output_dir={out}", "train.batch_size=4",
        "train.num_workers=0", "train.warmup_steps=1", "train.max_steps=4", "train.log_every=1",
        "train.image_every=0",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "beit", "pretrain", *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert len(_losses(out)) == 4 and (out / "last.pt").exists()
    assert "2 rank(s) on cpu" in proc.stdout + proc.stderr


@pytest.mark.parametrize("device", ["cpu", "gpu"])
def test_in_memory_pretraining_counts_the_files_it_left_out(tiny_setup, tmp_path, device) -> None:
    """``data.in_memory``: the unreadable file is left out at load and counted as a skip of the first epoch,
    on the CPU dataset and on the device path's indices (which the engine reads the same way)."""
    from beit.tasks.pretrain.data import build_dataset, build_device_data

    cfg = _cfg(tiny_setup, tmp_path)
    cfg.data.in_memory = True
    cfg.data.device = device
    if device == "cpu":
        ds = build_dataset(cfg, 4)
    else:
        ds = build_device_data(cfg, 4, "cpu")[0]
    ds.set_epoch(0)
    assert len(ds) == 24 and ds.num_skipped == 1 and ds.bad_paths[0].endswith("broken.jpg")
    assert ds.skipped_count(0) == 1 and ds.skipped_count(1) == 0 and ds.skipped_count() == 1


def test_shards_of_garbage_are_a_data_error_naming_them(tiny_setup, tmp_path) -> None:
    """A shard pattern whose every shard is garbage ends in the one-line data error naming the pattern."""
    from beit.data.datasets import NoReadableImagesError

    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "train-0000.tar").write_bytes(np.random.default_rng(0).integers(0, 255, 5000, dtype=np.uint8).tobytes())
    c = _cfg(tiny_setup, tmp_path / "run", max_steps=3)
    c.data.path, c.data.num_samples = str(shards), 16
    with pytest.raises(NoReadableImagesError, match=r"webdataset shards .*train-0000.tar \(1 shard\) yield no full "
                                                    r"batch of 8: 1 shard read\(s\) failed"):
        pretrain(c)


def test_output_folder_and_data_device_are_refused_before_the_tokenizer_and_data(tiny_setup, tmp_path,
                                                                              monkeypatch) -> None:
    """The README's first-second promise: neither refusal waits for the tokenizer, the model or the images."""
    from beit.engine.rundir import RunExistsError
    from beit.tasks.pretrain import train as pretrain_train

    built: list[str] = []
    monkeypatch.setattr(pretrain_train, "build_tokenizer", lambda *a, **k: built.append("tokenizer"))
    monkeypatch.setattr(pretrain_train, "build_dataset", lambda *a, **k: built.append("data"))
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')  # an earlier run
    with pytest.raises(RunExistsError, match="holds an earlier run"):
        pretrain(_cfg(tiny_setup, out))
    with pytest.raises(ConfigError, match=r"^config key 'data.device': must be auto \| cpu \| gpu \| batched, got 'tpu'$"):
        pretrain(load_config(PretrainConfig, None, [*_overrides_of(tiny_setup, tmp_path / "b"), "data.device=tpu"]))
    assert built == []


def _overrides_of(root, out) -> list[str]:
    return [f"data.path={root / 'images'}", "model.img_size=32", "model.patch_size=4", "data.num_mask_patches=26",
            "tokenizer.kind=dvae", f"tokenizer.path={root / 'tok.safetensors'}", f"train.output_dir={out}"]
