"""Trainable dVAE and tokenizer metrics, on tiny synthetic images."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from beit.tokenizers import (
    DiscreteVAE,
    DVAEConfig,
    Tokenizer,
    TokenizerCheckpointError,
    gumbel_temperature,
    load_tokenizer,
)
from beit.tokenizers.dvae import logit_laplace_nll
from beit.tokenizers.metrics import codebook_usage, mse, psnr, save_recon_grid, token_histogram

TINY = dict(vocab_size=64, hidden=32, num_res_blocks=1, codebook_dim=16)


def _blocky_images(n: int, size: int = 16, cell: int = 4, seed: int = 0) -> torch.Tensor:
    """Piecewise-constant colour cells: easy to reconstruct, varied enough to need several codes."""
    g = torch.Generator().manual_seed(seed)
    cells = torch.rand(n, 3, size // cell, size // cell, generator=g)
    return cells.repeat_interleave(cell, 2).repeat_interleave(cell, 3)


@pytest.mark.parametrize("downsample, grid", [(4, 8), (8, 4)])
def test_shapes(downsample: int, grid: int) -> None:
    torch.manual_seed(0)
    vae = DiscreteVAE(downsample=downsample, **TINY)
    x = torch.rand(2, 3, 32, 32)
    recon, logits = vae(x, temperature=0.5)
    assert recon.shape == x.shape and logits.shape == (2, 64, grid, grid)
    ids = vae.encode(x)
    assert ids.dtype == torch.long and ids.shape == (2, grid, grid)
    out = vae.decode(ids)
    assert out.shape == x.shape and 0 <= float(out.min()) and float(out.max()) <= 1
    assert isinstance(vae, Tokenizer) and vae.downsample == downsample and vae.vocab_size == 64
    with pytest.raises(ValueError, match="divisible by"):
        vae.encode(torch.rand(1, 3, 30, 32))
    with pytest.raises(ValueError, match="0-255"):
        vae.encode(torch.rand(1, 3, 32, 32) * 255)


@pytest.fixture
def one_thread():
    """Tiny convs: thread start-up costs more than it gains on a shared 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_loss_decreases_over_50_steps(one_thread: None) -> None:
    torch.manual_seed(0)
    vae = DiscreteVAE(downsample=4, kl_weight=1e-3, temperature_anneal_steps=50, **TINY)
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    data = _blocky_images(64, seed=1)
    losses, metrics = [], {}
    for step in range(50):
        batch = data[(step * 16) % 64 :][:16]
        loss, metrics = vae.loss(batch, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert set(metrics) == {"recon_mse", "kl", "usage_kl", "perplexity", "temperature"}
    assert metrics["temperature"] == pytest.approx(gumbel_temperature(49, 1.0, 1 / 16, 50))
    assert sum(losses[-5:]) < 0.9 * sum(losses[:5]), losses
    # Tokens carry information: argmax round trip beats predicting the mean colour.
    held_out = _blocky_images(16, seed=2)
    mean_colour = data.mean((0, 2, 3), keepdim=True).expand_as(held_out)
    assert mse(vae.decode(vae.encode(held_out)), held_out) < 0.9 * mse(mean_colour, held_out)
    assert float(metrics["perplexity"]) > 1.5


@pytest.mark.parametrize("straight_through", [False, True])
def test_logit_laplace_loss_trains(straight_through: bool) -> None:
    torch.manual_seed(0)
    vae = DiscreteVAE(downsample=4, recon_loss="logit_laplace", straight_through=straight_through, **TINY)
    x = _blocky_images(8)
    loss, metrics = vae.loss(x, step=0)
    loss.backward()
    assert math.isfinite(loss.item()) and "nll" in metrics
    assert all(p.grad is not None for p in vae.encoder.parameters())
    assert vae.decode(vae.encode(x)).shape == x.shape


def test_logit_laplace_nll_is_smallest_at_the_right_mean() -> None:
    x = torch.rand(2, 3, 4, 4)
    m = 0.8 * x + 0.1
    mu = torch.log(m) - torch.log1p(-m)
    exact = torch.cat([mu, torch.full_like(mu, -2.0)], 1)
    off = torch.cat([mu + 0.5, torch.full_like(mu, -2.0)], 1)
    assert logit_laplace_nll(exact, x) < logit_laplace_nll(off, x)


def test_temperature_schedule() -> None:
    assert gumbel_temperature(0) == 1.0
    assert gumbel_temperature(5000) == pytest.approx(1 / 16)
    assert gumbel_temperature(2500) == pytest.approx(0.25)  # geometric: exp decay
    assert gumbel_temperature(10**6) == pytest.approx(1 / 16)


def test_kl_to_uniform_is_zero_for_uniform_logits() -> None:
    vae = DiscreteVAE(downsample=4, **TINY)
    for p in vae.encoder[-1].parameters():  # final 1x1 conv -> constant logits
        torch.nn.init.zeros_(p)
    _, metrics = vae.loss(torch.rand(2, 3, 16, 16), step=0)
    assert float(metrics["kl"]) == pytest.approx(0.0, abs=1e-6)


def test_save_load_roundtrip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    vae = DiscreteVAE(downsample=8, recon_loss="logit_laplace", **TINY)
    path = tmp_path / "dvae.safetensors"
    vae.save(path)
    back = load_tokenizer("dvae", path)
    assert isinstance(back, DiscreteVAE) and back.config == vae.config and not back.training
    x = torch.rand(2, 3, 32, 32)
    ids = vae.encode(x)
    assert torch.equal(back.encode(x), ids)
    assert torch.equal(back.decode(ids), vae.decode(ids))
    for k, v in vae.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_load_errors(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_tokenizer("dvae", tmp_path / "missing.safetensors")
    save_file({"x": torch.zeros(1)}, tmp_path / "foreign.safetensors")
    with pytest.raises(TokenizerCheckpointError, match="foreign.safetensors.*not a beit dVAE"):
        load_tokenizer("dvae", tmp_path / "foreign.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(TokenizerCheckpointError, match="junk.safetensors"):
        load_tokenizer("dvae", tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        load_tokenizer("vqgan", tmp_path / "x")
    with pytest.raises(ValueError, match="downsample must be 4 or 8"):
        DiscreteVAE(DVAEConfig(downsample=2))


def test_one_registry_dispatches_every_kind(tmp_path: Path) -> None:
    """``load_tokenizer`` reads TOKENIZERS; a new kind registered there is loadable by name, and
    options a kind does not take are refused with a message naming the kind."""
    from beit.tokenizers import TOKENIZERS, TokenizerKind, register_tokenizer

    assert set(TOKENIZERS) >= {"dalle", "dvae"}
    vae = DiscreteVAE(DVAEConfig(**TINY))
    vae.save(tmp_path / "t.safetensors")
    with pytest.raises(ValueError, match=r"load_tokenizer\('dvae'\) takes no decoder file"):
        load_tokenizer("dvae", tmp_path / "t.safetensors", decoder=tmp_path / "d.pkl")
    with pytest.raises(ValueError, match=r"load_tokenizer\('dvae'\): precision must be one of \('fp32',\), got 'bf16'"):
        load_tokenizer("dvae", tmp_path / "t.safetensors", precision="bf16")
    with pytest.raises(ValueError, match=r"load_tokenizer\('dvae'\) needs the tokenizer file"):
        load_tokenizer("dvae")
    with pytest.raises(ValueError, match="give the tokenizer file once"):
        load_tokenizer("dalle", tmp_path / "a.pkl", encoder=tmp_path / "b.pkl")
    seen = {}

    def load(path, *, decoder, device, precision, **options):  # noqa: ANN001, ANN003, ANN202
        seen.update(path=path, precision=precision, options=options)
        return DiscreteVAE.load(path, device=device)

    kind = register_tokenizer(TokenizerKind("test_kind", load, "a test file"))
    try:
        with pytest.raises(ValueError, match="tokenizer kind 'test_kind' is already registered"):
            register_tokenizer(kind)
        tok = load_tokenizer("test_kind", tmp_path / "t.safetensors", precision="fp32", flag=1)
        assert isinstance(tok, DiscreteVAE) and seen == {"path": tmp_path / "t.safetensors", "precision": "fp32",
                                                         "options": {"flag": 1}}
    finally:
        del TOKENIZERS["test_kind"]


# ---------------------------------------------------------------------- metrics
def test_psnr_and_mse() -> None:
    a = torch.zeros(2, 3, 4, 4)
    b = torch.full_like(a, 0.1)
    assert mse(a, b) == pytest.approx(0.01)
    assert psnr(a, b) == pytest.approx(20.0)
    assert psnr(a, a) == pytest.approx(100.0)  # capped, not inf
    with pytest.raises(ValueError, match="equal shapes"):
        psnr(a, b[:1])


def test_codebook_usage() -> None:
    ids = torch.tensor([[0, 1], [2, 3]]).repeat(5, 1, 1)  # 4 codes, equally used, of 16
    usage = codebook_usage(ids, vocab_size=16)
    assert usage["perplexity"] == pytest.approx(4.0)
    assert usage["used_codes"] == 4 and usage["dead_codes"] == 12 and usage["dead_fraction"] == 0.75
    hist = token_histogram(ids, 16) + token_histogram(torch.zeros(1, 2, 2, dtype=torch.long), 16)
    assert codebook_usage(hist)["num_tokens"] == 24
    assert codebook_usage(torch.zeros(16, dtype=torch.long))["perplexity"] == 1.0


def test_save_recon_grid(tmp_path: Path) -> None:
    from PIL import Image

    x = torch.rand(3, 3, 16, 16)
    path = save_recon_grid(x, x.flip(-1), tmp_path / "sub" / "grid.png")
    with Image.open(path) as img:
        # make_grid: 3 columns x 2 rows of 16 px enlarged 4x to 64 px, 2 px padding around every cell
        assert img.size == (3 * 66 + 2, 2 * 66 + 2) and img.mode == "RGB"
        cell = np.asarray(img)[2:66, 2:66]
    expected = (x[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert (cell == expected.repeat(4, 0).repeat(4, 1)).all()  # each pixel a 4x4 square
    big = torch.rand(1, 3, 80, 96)
    with Image.open(save_recon_grid(big, big, tmp_path / "big.png")) as img:
        assert img.size == (96 + 4, 2 * 82 + 2)  # already >= 64 px: unchanged


# ---------------------------------------------------------------------- training entry point
def test_train_tokenizer_smoke(tmp_path: Path, one_thread: None) -> None:
    """A few engine steps on a folder of PNGs: artifacts written, reloadable, metrics reported."""
    from PIL import Image

    from beit.engine import TrainConfig
    from beit.tasks.tokenizer import TokenizerTrainConfig, train_tokenizer

    data = tmp_path / "images" / "sub"
    data.mkdir(parents=True)
    for i, img in enumerate(_blocky_images(12, size=20, cell=4, seed=3)):
        array = (img.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        Image.fromarray(array).save(data / f"{i:02d}.png")
    out = tmp_path / "run"
    cfg = TokenizerTrainConfig(
        data_dir=str(tmp_path / "images"),
        img_size=16,
        val_fraction=0.25,
        grid_images=3,
        model=DVAEConfig(downsample=4, temperature_anneal_steps=4, **TINY),
        train=TrainConfig(
            output_dir=str(out),
            max_steps=4,
            batch_size=4,
            num_workers=0,
            lr=3e-3,
            warmup_steps=1,
            log_every=2,
            image_every=2,
            ckpt_every=100,
        ),
    )
    report = train_tokenizer(cfg)
    for key in ("heldout_mse", "heldout_psnr", "heldout_perplexity", "heldout_dead_codes"):
        assert math.isfinite(report[key]), key
    assert report["step"] == 4 and 0 < report["heldout_mse"] < 1
    assert (out / "recon_grid.png").is_file() and (out / "images" / "recon_0000002.png").is_file()
    vae = load_tokenizer("dvae", report["tokenizer_path"])
    assert vae.encode(torch.rand(1, 3, 16, 16)).shape == (1, 4, 4)


def test_train_tokenizer_checks_its_output_folder_before_reading_the_data(tmp_path: Path, monkeypatch) -> None:
    """``beit tokenizer train`` into a folder holding an earlier run (no --resume, no --overwrite) listed (and on a
    large set, read through) its image folders first and only then refused in fit(); pretrain and finetune refuse
    before the data. Now the same check comes first: the data is never touched."""
    from beit.engine import TrainConfig
    from beit.engine.rundir import RunExistsError
    from beit.tasks.tokenizer import TokenizerTrainConfig
    from beit.tasks.tokenizer import train as tok_train

    (tmp_path / "images").mkdir()
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"split": "train", "step": 1, "loss": 1.0}\n')  # an earlier run's
    read = []

    def build_datasets(cfg: TokenizerTrainConfig) -> None:
        read.append(cfg.data_dir)
        raise AssertionError("the data was read before the output folder was checked")

    monkeypatch.setattr(tok_train, "build_datasets", build_datasets)
    cfg = TokenizerTrainConfig(data_dir=str(tmp_path / "images"), img_size=16,
                               model=DVAEConfig(downsample=4, **TINY),
                               train=TrainConfig(output_dir=str(out), max_steps=2, batch_size=2, num_workers=0))
    with pytest.raises(RunExistsError, match=rf"output_dir {out} holds an earlier run \(metrics\.jsonl\)"):
        tok_train.train_tokenizer(cfg)
    assert not read and (out / "metrics.jsonl").is_file()


def test_train_tokenizer_refuses_a_missing_image_folder_before_the_ranks_join(tmp_path: Path, monkeypatch) -> None:
    """A missing ``data_dir`` was found after the process group was made (listing the images), so under torchrun
    every rank printed ``image folder does not exist``; it is a config error now, raised before the group, which
    the CLI prints once for all ranks."""
    from beit.engine import TrainConfig
    from beit.engine.config import ConfigError
    from beit.tasks.tokenizer import TokenizerTrainConfig
    from beit.tasks.tokenizer import train as tok_train

    def joined() -> None:
        raise AssertionError("the ranks joined their group before data_dir was checked")

    monkeypatch.setattr(tok_train.D, "init_distributed", joined)
    (tmp_path / "a_file").write_text("x")
    for data_dir, said in (("nope", "no such folder"), ("a_file", "a file, not a folder of images")):
        cfg = TokenizerTrainConfig(data_dir=str(tmp_path / data_dir), img_size=16, model=DVAEConfig(downsample=4, **TINY),
                                   train=TrainConfig(output_dir=str(tmp_path / "run"), max_steps=2, batch_size=2,
                                                     num_workers=0))
        with pytest.raises(ConfigError, match=rf"^config key 'data_dir': '.*{data_dir}': {said}$"):
            tok_train.train_tokenizer(cfg)
    assert not (tmp_path / "run").exists()


def test_a_layer_decay_is_refused_at_load(tmp_path: Path) -> None:
    """The dVAE has no layer_id(): train.layer_decay != 1 was logged as ignored once training had started."""
    from beit.engine.config import ConfigError, load_config
    from beit.tasks.tokenizer import TokenizerTrainConfig

    with pytest.raises(ConfigError, match=r"^config key 'train\.layer_decay': the dVAE has no transformer blocks to "
                                          r"decay over: leave it at 1\.0, got 0\.9$"):
        load_config(TokenizerTrainConfig, None, [f"data_dir={tmp_path}", "train.layer_decay=0.9"])
    assert load_config(TokenizerTrainConfig, None, [f"data_dir={tmp_path}"]).train.layer_decay == 1.0


def test_train_tokenizer_repeats_exactly_whatever_the_global_rng(tmp_path: Path, one_thread: None) -> None:
    """The initial weights come from train.seed, not from whatever the process drew before: two runs of one
    config give the same tokenizer (a demo's codebook usage once varied 27-46 of 128 between identical runs)."""
    from PIL import Image

    from beit.engine import TrainConfig
    from beit.tasks.tokenizer import TokenizerTrainConfig, train_tokenizer
    from beit.tokenizers.dvae import DiscreteVAE

    data = tmp_path / "images"
    data.mkdir()
    for i, img in enumerate(_blocky_images(8, size=16, cell=4, seed=3)):
        Image.fromarray((img.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()).save(data / f"{i}.png")
    weights = []
    for run, noise in enumerate((1, 2)):
        torch.manual_seed(noise)  # a different global stream before each run
        cfg = TokenizerTrainConfig(
            data_dir=str(data), img_size=16, val_fraction=0.25, grid_images=2,
            model=DVAEConfig(downsample=4, temperature_anneal_steps=2, **TINY),
            train=TrainConfig(output_dir=str(tmp_path / f"run{run}"), max_steps=2, batch_size=3, num_workers=0,
                              warmup_steps=1, log_every=1, image_every=0, ckpt_every=100))
        weights.append(DiscreteVAE.load(train_tokenizer(cfg)["tokenizer_path"]).state_dict())
    assert weights[0].keys() == weights[1].keys()
    for k in weights[0]:
        torch.testing.assert_close(weights[0][k], weights[1][k], rtol=0, atol=0, msg=k)


def test_usage_weight_adds_the_batch_mean_kl_and_spreads_the_codebook(one_thread: None) -> None:
    """usage_weight * KL(mean q || uniform) is added to the loss (its value is the logged usage_kl, between 0
    and log V), and training with it uses more of the codebook than without, on the same data and seed."""
    data = _blocky_images(64, seed=1)
    vae = DiscreteVAE(downsample=4, **TINY)
    torch.manual_seed(0)
    plain, m = vae.loss(data[:16], 0)
    vae.config.usage_weight = 0.5
    torch.manual_seed(0)  # the same Gumbel noise
    reg, m2 = vae.loss(data[:16], 0)
    assert 0 < float(m["usage_kl"]) <= math.log(64) + 1e-6
    torch.testing.assert_close(reg - plain, 0.5 * m2["usage_kl"])
    with pytest.raises(ValueError, match="usage_weight must be >= 0"):
        DiscreteVAE(downsample=4, usage_weight=-1.0, **TINY)

    def trained_perplexity(usage_weight: float) -> float:
        torch.manual_seed(0)
        v = DiscreteVAE(downsample=4, usage_weight=usage_weight, temperature_anneal_steps=60, **TINY)
        opt = torch.optim.Adam(v.parameters(), lr=3e-3)
        for step in range(60):
            loss, _ = v.loss(data[(step * 16) % 64:][:16], step)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return float(codebook_usage(v.encode(data), 64)["perplexity"])

    base, spread = trained_perplexity(0.0), trained_perplexity(0.1)
    assert spread > 1.5 * base, (base, spread)


def _rgb_pngs(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")


@pytest.mark.parametrize("size", [(16, 16), (21, 13), (40, 40)])  # the crop's size / a resize + crop / downscaled
def test_in_memory_tokenizer_samples_equal_the_per_sample_path(tmp_path: Path, size: tuple[int, int]) -> None:
    """``in_memory``: the crops and flips are drawn as T.RandomCrop / T.RandomHorizontalFlip draw them inside
    seeded(seed, epoch, index), so every sample equals the folder dataset's, train and held-out (center crop)."""
    from beit.engine import TrainConfig
    from beit.tasks.tokenizer import TokenizerTrainConfig
    from beit.tasks.tokenizer.data import CropFlipInMemory, build_datasets

    _rgb_pngs(tmp_path / "train", 6, size)
    _rgb_pngs(tmp_path / "val", 3, size, seed=1)
    sets = {}
    for in_memory in (False, True):
        cfg = TokenizerTrainConfig(data_dir=str(tmp_path / "train"), val_dir=str(tmp_path / "val"), img_size=12,
                                   in_memory=in_memory, model=DVAEConfig(downsample=4, **TINY),
                                   train=TrainConfig(seed=5))
        sets[in_memory] = build_datasets(cfg)
    assert isinstance(sets[True][0], CropFlipInMemory) and not isinstance(sets[False][0], CropFlipInMemory)
    for epoch in (0, 3):
        for part in (0, 1):  # train, held-out
            disk, memory = sets[False][part], sets[True][part]
            disk = getattr(disk, "dataset", disk)  # the held-out Subset of range(n): its dataset takes (epoch, i)
            assert len(disk) == len(memory)
            for index in range(len(disk)):
                a, b = disk[(epoch, index)], memory[(epoch, index)]
                assert b.shape == (3, 12, 12) and b.dtype == torch.float32
                torch.testing.assert_close(b, a, rtol=0, atol=0, msg=f"part {part} epoch {epoch} index {index}")
    # the draws move with the epoch (the stream is (seed, epoch, index)): not one fixed crop
    train = sets[True][0]
    assert any(not torch.equal(train[(0, i)], train[(1, i)]) for i in range(len(train)))


def test_in_memory_tokenizer_training_equals_reading_from_disk(tmp_path: Path, one_thread: None) -> None:
    """A short run with ``in_memory`` trains the same tokenizer as the same run reading the folder every epoch."""
    from beit.engine import TrainConfig
    from beit.tasks.tokenizer import TokenizerTrainConfig, train_tokenizer
    from beit.tokenizers.dvae import DiscreteVAE

    _rgb_pngs(tmp_path / "images" / "sub", 8, (20, 18))
    weights = []
    for in_memory in (False, True):
        cfg = TokenizerTrainConfig(
            data_dir=str(tmp_path / "images"), img_size=16, val_fraction=0.25, grid_images=2, in_memory=in_memory,
            model=DVAEConfig(downsample=4, temperature_anneal_steps=2, **TINY),
            train=TrainConfig(output_dir=str(tmp_path / f"run{in_memory}"), max_steps=3, batch_size=3,
                              num_workers=0, warmup_steps=1, log_every=1, image_every=0, ckpt_every=100))
        weights.append(DiscreteVAE.load(train_tokenizer(cfg)["tokenizer_path"]).state_dict())
    for k in weights[0]:
        torch.testing.assert_close(weights[1][k], weights[0][k], rtol=0, atol=0, msg=k)
