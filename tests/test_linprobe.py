"""Linear probing: per-block sweep on cached features, block parsing, the heads, the CLI."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch

import beit.configs as beit_configs
from _finetune_data import colored_squares, tiny_pretrain_checkpoint
from beit.cli import main as cli_main
from beit.engine import ConfigError, load_config
from beit.models import Beit
from beit.tasks.classify import LinprobeConfig, ProbeHeads, extract_features, linprobe, parse_blocks

CONFIGS = Path(beit_configs.__file__).parent  # the presets shipped in the package


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("lp")
    return {"data": colored_squares(root / "data", {"train": 16, "val": 8}),
            "ckpt": tiny_pretrain_checkpoint(root / "pt", depth=3)}


def lp_cfg(setup: dict, out: Path, *extra: str) -> LinprobeConfig:
    return load_config(LinprobeConfig, None, [
        f"model={setup['ckpt']}", "img_size=32", f"data.train_dir={setup['data'] / 'train'}",
        f"data.val_dir={setup['data'] / 'val'}", f"train.output_dir={out}", "train.epochs=10",
        "train.batch_size=16", "train.log_every=100", "extract_batch_size=16", "extract_num_workers=0", *extra])


def test_parse_blocks():
    assert parse_blocks("all", 4) == [1, 2, 3, 4]
    assert parse_blocks("last", 12) == [12]
    assert parse_blocks("9", 12) == [9]
    assert parse_blocks(" 8,6 ,10", 12) == [6, 8, 10]
    for bad in ("0", "13", "x", ""):
        with pytest.raises(ValueError):
            parse_blocks(bad, 12)
    # before the model is read (the config's own check): no upper bound ("out of range 1..1000000" said one)
    assert parse_blocks("40", None) == [40] and parse_blocks("all", None) == parse_blocks("last", None) == []
    with pytest.raises(ValueError, match=r"^block numbers are counted from 1 \(the first block\), got \[0\]$"):
        parse_blocks("0", None)
    with pytest.raises(ConfigError, match=r"^config key 'layers': block numbers are counted from 1"):
        load_config(LinprobeConfig, None, ["model=beit_base_patch16_224", "layers=0"])


def test_probe_heads_are_independent_per_block():
    heads = ProbeHeads(num_blocks=3, dim=5, num_classes=4).eval()
    x = torch.randn(7, 3, 5)
    out = heads(x)
    assert out.shape == (7, 3, 4)
    y = x.clone()
    y[:, 1] += 10.0  # another block's features change: the other heads do not move
    out2 = heads(y)
    torch.testing.assert_close(out[:, 0], out2[:, 0])
    torch.testing.assert_close(out[:, 2], out2[:, 2])
    assert heads.norm.affine is False


def test_sweep_every_block_features_extracted_once(setup, tmp_path, monkeypatch):
    calls = []
    original = Beit.get_intermediate_layers

    def counting(self, x):
        calls.append(x.shape[0])
        return original(self, x)

    monkeypatch.setattr(Beit, "get_intermediate_layers", counting)
    res = linprobe(lp_cfg(setup, tmp_path, "layers=all"))
    assert sum(calls) == 64 + 32  # one encoder pass over train and one over val, whatever the epochs
    assert res["blocks"] == [1, 2, 3] and sorted(res["top1"]) == [1, 2, 3]
    assert res["best_block"] == max(res["top1"], key=res["top1"].get)
    assert res["best_top1"] == max(res["top1"].values())
    assert res["best_top1"] > 50.0  # colour squares are linearly separable even in random features
    saved = json.loads((tmp_path / "linprobe.json").read_text())
    assert saved["best_block"] == res["best_block"] and len(saved["top1"]) == 3
    assert res["feature_dim"] == 64  # cat: cls + mean patch (2 x 32)
    assert sorted(res["knn_top1"]) == [1, 2, 3] and res["knn_k"] == 20  # k-NN from the same cache, per block
    assert res["knn_best_top1"] == max(res["knn_top1"].values()) > 50.0
    assert saved["knn_best_block"] == res["knn_best_block"]


def test_single_block_avg_pool_and_fp16_cache(setup):
    from beit.tasks.classify import build_datasets, build_encoder, build_preprocess

    cfg = lp_cfg(setup, Path("unused"), "layers=2", "pool=avg")
    enc = build_encoder(cfg)
    assert enc.rel_pos_bias is not None and not any(p.requires_grad for p in enc.parameters())
    tf = build_preprocess(cfg.data.preprocess(32))
    train, _, names = build_datasets(cfg.data, tf, tf)
    feats, labels = extract_features(enc, train, parse_blocks(cfg.layers, 3), pool="avg", batch_size=16,
                                     num_workers=0)
    assert feats.dtype == torch.float16 and feats.shape == (64, 1, 32) and labels.tolist() == sorted(labels.tolist())
    with torch.no_grad():
        x = torch.stack([train[i][0] for i in range(2)])
        ref = enc.get_intermediate_layers(x)[1][:, 1:].mean(1)
    torch.testing.assert_close(feats[:2, 0].float(), ref, atol=2e-3, rtol=2e-3)


def test_linprobe_cli_and_config(setup, tmp_path, capsys):
    cfg = load_config(LinprobeConfig, CONFIGS / "linprobe_base.yaml", ["model=x", "data.train_dir=a", "data.val_dir=b"])
    assert (cfg.layers, cfg.pool, cfg.train.weight_decay, cfg.ref_batch) == ("all", "cat", 1e-4, 256)
    with pytest.raises(ConfigError, match="layers"):
        load_config(LinprobeConfig, None, ["model=x", "layers=0"])
    with pytest.raises(ConfigError) as info:  # was OmegaConf's "Structured config ... missing mandatory value"
        load_config(LinprobeConfig, None, ["data.train_dir=a"])
    assert str(info.value) == "config key 'model': required, not set: add model=... on the command line or in the -c file"
    # the fine-tuning transform's keys: checked, then ignored before (features are cached once, unaugmented)
    for extra, key in [("data.auto_augment=autoaugment-cifar10", "auto_augment"), ("data.hflip=0.5", "hflip"),
                       ("data.reprob=0.25", "reprob"), ("data.color_jitter=0.4", "color_jitter")]:
        with pytest.raises(ConfigError, match=rf"^config key 'data\.{key}': linprobe caches each image's features "
                                              r"once, unaugmented: it has no effect here"):
            load_config(LinprobeConfig, CONFIGS / "linprobe_base.yaml", ["model=x", extra])
    assert load_config(LinprobeConfig, None, ["model=x", "data.auto_augment=null", "data.hflip=0"]).data.hflip == 0
    rc = cli_main(["linprobe", f"model={setup['ckpt']}", "img_size=32", "layers=1,3",
                   f"data.train_dir={setup['data'] / 'train'}", f"data.val_dir={setup['data'] / 'val'}",
                   f"train.output_dir={tmp_path}", "train.epochs=2", "train.batch_size=16", "extract_batch_size=32",
                   "extract_num_workers=0"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "block   1/3" in out and "block   3/3" in out and "best block" in out and "best k-NN block" in out
    assert json.loads((tmp_path / "linprobe.json").read_text())["blocks"] == [1, 3]


def test_a_preset_encoder_is_seeded_by_train_seed(setup, tmp_path, monkeypatch):
    """model=<preset> probes random features (a baseline): the encoder was built before any seeding, so the same
    command probed another random encoder, with other accuracies, each time; train.seed now fixes it (as in finetune)."""
    mod = importlib.import_module("beit.tasks.classify.linprobe")
    feats: list[torch.Tensor] = []

    def recording(*args, **kwargs):
        out = extract_features_orig(*args, **kwargs)
        feats.append(out[0])
        return out

    extract_features_orig = mod.extract_features
    monkeypatch.setattr(mod, "extract_features", recording)
    over = ["model=beit_tiny_patch16_224", "model_overrides={patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2}",
            "train.epochs=1", "knn=3"]
    torch.manual_seed(123)  # whatever the global generator's state, as a new process's
    a = linprobe(lp_cfg(setup, tmp_path / "a", *over))
    torch.rand(7)
    b = linprobe(lp_cfg(setup, tmp_path / "b", *over))
    linprobe(lp_cfg(setup, tmp_path / "c", *over, "train.seed=1"))
    train_a, train_b, train_c = feats[0], feats[2], feats[4]
    assert torch.equal(train_a, train_b) and not torch.equal(train_a, train_c)
    assert a["top1"] == b["top1"] and a["knn_top1"] == b["knn_top1"]


def test_linprobe_refuses_several_processes(setup, tmp_path, monkeypatch):
    """The world size comes from engine.distributed (torchrun's WORLD_SIZE before a group exists)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="linprobe runs in one process .* launch it without torchrun"):
        linprobe(lp_cfg(setup, tmp_path))


def _knn_reference(train_f, train_y, val_f, val_y, k, T, C):
    """One query at a time, straight from the definition."""
    correct = 0
    for q, y in zip(val_f, val_y):
        sims = torch.stack([torch.nn.functional.cosine_similarity(q, t, dim=0) for t in train_f])
        top = sims.topk(k)
        votes = torch.zeros(C, dtype=torch.float64)
        for s, i in zip(top.values, top.indices):
            votes[train_y[i]] += torch.exp(s / T)
        correct += int(votes.argmax() == y)
    return 100.0 * correct / len(val_y)


def test_knn_matches_the_definition_and_separates_what_is_separable():
    from beit.tasks.classify.knn import knn_top1

    g = torch.Generator().manual_seed(0)
    C, N, M, D = 4, 60, 25, 8
    train_y, val_y = torch.randint(0, C, (N,), generator=g), torch.randint(0, C, (M,), generator=g)
    centres = torch.randn(C, D, generator=g) * 3
    # feature set 0: clustered by class (separable); feature set 1: noise (chance)
    train_f = torch.stack([centres[train_y] + torch.randn(N, D, generator=g), torch.randn(N, D, generator=g)], 1)
    val_f = torch.stack([centres[val_y] + torch.randn(M, D, generator=g), torch.randn(M, D, generator=g)], 1)
    acc = knn_top1(train_f.half(), train_y, val_f.half(), val_y, num_classes=C, k=5, temperature=0.1, chunk=7)
    for level in range(2):
        ref = _knn_reference(train_f[:, level].half().float(), train_y, val_f[:, level].half().float(), val_y, 5,
                             0.1, C)
        assert float(acc[level]) == pytest.approx(ref)
    assert acc[0] > 90.0 and acc[1] < 60.0
    single = knn_top1(train_f[:, 0], train_y, val_f[:, 0], val_y, num_classes=C, k=500)  # k capped at N
    assert single.ndim == 0
    # small temperatures: exp(s / T) would overflow float32 (s / T > 88); the votes must not become inf ties
    for T in (0.01, 0.005):  # the reference in float64 (exp up to e^200) does not overflow
        small_t = knn_top1(train_f, train_y, val_f, val_y, num_classes=C, k=20, temperature=T)
        ref = _knn_reference(train_f[:, 0].double(), train_y, val_f[:, 0].double(), val_y, 20, T, C)
        assert float(small_t[0]) == pytest.approx(ref) and small_t[0] > 90.0
    # T -> 0: the nearest neighbour decides (1-NN)
    tiny_t = knn_top1(train_f, train_y, val_f, val_y, num_classes=C, k=20, temperature=1e-4)
    one_nn = knn_top1(train_f, train_y, val_f, val_y, num_classes=C, k=1)
    torch.testing.assert_close(tiny_t, one_nn)
    with pytest.raises(ValueError, match="labels outside"):
        knn_top1(train_f, train_y + C, val_f, val_y, num_classes=C)
    with pytest.raises(ValueError, match="k must be"):
        knn_top1(train_f, train_y, val_f, val_y, num_classes=C, k=0)
    with pytest.raises(ValueError, match="alike"):
        knn_top1(train_f, train_y, val_f[:, :1], val_y, num_classes=C)
    with pytest.raises(ConfigError, match="knn"):
        load_config(LinprobeConfig, None, ["model=x", "knn=-1"])


class _Stop(Exception):
    """Raised by a stand-in for extract_features: the test is about what happens before it."""


def test_batch_size_is_checked_before_features_are_extracted(setup, tmp_path, monkeypatch):
    """64 images and batch 1024 give no training step: said before the encoder runs, in the trainer's words."""
    lp = importlib.import_module("beit.tasks.classify.linprobe")  # the package exports a function of that name

    def no_extraction(*args, **kwargs):
        raise _Stop("features extracted before the batch size was checked")

    monkeypatch.setattr(lp, "extract_features", no_extraction)
    with pytest.raises(ConfigError, match=r"config key 'train.batch_size': 64 samples over 1 ranks give no full "
                                          r"step of batch_size 1024 x accum_steps 1"):
        linprobe(lp_cfg(setup, tmp_path, "train.batch_size=1024"))
    with pytest.raises(ConfigError, match="batch_size 32 x accum_steps 4"):
        linprobe(lp_cfg(setup, tmp_path / "b", "train.batch_size=32", "train.accum_steps=4"))


def test_warmup_is_checked_before_features_are_extracted(setup, tmp_path, monkeypatch):
    """64 images, batch 16: 4 steps an epoch, so warmup_epochs=3 is 12 steps, not shorter than max_steps=10: the
    trainer said so only after every image's features were extracted; now before the encoder runs."""
    lp = importlib.import_module("beit.tasks.classify.linprobe")

    def no_extraction(*args, **kwargs):
        raise _Stop("features extracted before the warmup was checked")

    monkeypatch.setattr(lp, "extract_features", no_extraction)
    with pytest.raises(ConfigError, match=r"config key 'train.warmup_epochs': warmup \(12 steps\) must be shorter "
                                          r"than training \(10 steps\)"):
        linprobe(lp_cfg(setup, tmp_path, "train.max_steps=10", "train.warmup_epochs=3"))


def test_output_folder_and_resume_are_checked_before_features_are_extracted(setup, tmp_path, monkeypatch):
    """A folder holding an earlier run, a --resume that does not exist, another task's checkpoint: refused after
    the whole extraction (most of a linear probe's time on real data); now before it, in the trainer's words."""
    from beit.engine.checkpoint import FORMAT, save_checkpoint
    from beit.engine.rundir import RunExistsError, TaskMismatchError

    lp = importlib.import_module("beit.tasks.classify.linprobe")

    def no_extraction(*args, **kwargs):
        raise _Stop("features extracted before the output folder was checked")

    monkeypatch.setattr(lp, "extract_features", no_extraction)
    used = tmp_path / "used"
    used.mkdir()
    (used / "metrics.jsonl").write_text('{"split": "train", "step": 1, "loss": 1.0}\n')
    with pytest.raises(RunExistsError, match="holds an earlier run"):
        linprobe(lp_cfg(setup, used))
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        linprobe(lp_cfg(setup, tmp_path / "a", f"train.resume={tmp_path / 'missing.pt'}"))
    seg = tmp_path / "seg.pt"
    save_checkpoint({"format": FORMAT, "version": 1, "task": "segmentation", "config": {}, "step": 3, "epoch": 0,
                     "batch_in_epoch": 0, "model": {}, "optimizer": {}}, seg)
    with pytest.raises(TaskMismatchError, match="is a segmentation checkpoint, not a linear probing one"):
        linprobe(lp_cfg(setup, tmp_path / "b", f"train.resume={seg}"))
    with pytest.raises(_Stop):  # --overwrite, and auto in an empty folder: on to the extraction
        linprobe(lp_cfg(setup, used, "train.overwrite=true"))
    with pytest.raises(_Stop):
        linprobe(lp_cfg(setup, tmp_path / "c", "train.resume=auto"))


def test_image_size_and_worker_count_are_said_at_start(setup, tmp_path, monkeypatch):
    """A checkpoint trained at 32 px probed at the config's img_size (e.g. linprobe_base's 224): one log line says
    which size is used and why; extract_num_workers above the usable cores is capped, with a log line."""
    import logging

    from beit.engine import threads

    lp = importlib.import_module("beit.tasks.classify.linprobe")  # the package exports a function of that name

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    log = logging.getLogger("beit")  # the probe's lines and the engine's worker cap
    log.addHandler(handler)
    old_level = log.level
    log.setLevel(logging.INFO)
    used: dict = {}

    def stop_at_extraction(model, dataset, blocks, **kw):
        used.update(kw, img_size=model.cfg.img_hw)
        raise _Stop

    monkeypatch.setattr(lp, "extract_features", stop_at_extraction)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    try:
        with pytest.raises(_Stop):
            linprobe(lp_cfg(setup, tmp_path / "a", "img_size=48", "extract_num_workers=10"))
        said = [r.getMessage() for r in records]
        assert [m for m in said if "img_size" in m] == [
            "img_size 48 (from the config) differs from the 32 px the checkpoint was trained at: images are resized "
            "to 48 and its position tables resampled; set img_size=32 to probe at its own size"], said
        assert "extract_num_workers=10 but this process may use 2 CPUs: 2 workers" in said
        assert used["num_workers"] == 2 and used["img_size"] == (48, 48)
        records.clear()
        with pytest.raises(_Stop):  # the checkpoint's own size, workers within the cores: nothing to say
            linprobe(lp_cfg(setup, tmp_path / "b", "extract_num_workers=1"))
        assert not [r for r in records if "img_size" in r.getMessage() or "extract_num_workers" in r.getMessage()]
        assert used["num_workers"] == 1 and used["img_size"] == (32, 32)
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)


def test_checkpoint_loading_is_reported_once_naming_what_is_not_loaded(setup, tmp_path, capsys):
    """The loading report of the probed checkpoint was said twice (the image-size check read the file, then the
    encoder was built from a second read), and said "loaded 51 of the model's 51 tensors" without naming the
    MIM head it did not load. Now: once, each tensor not loaded named, with whether that is expected."""
    from safetensors.torch import load_file

    sd = load_file(setup["ckpt"] / "model.safetensors")
    assert {"mask_token", "lm_head.weight", "lm_head.bias"} <= set(sd)  # a pre-training checkpoint
    wrapped = tmp_path / "detector.pth"  # the encoder inside a larger model's file, with that model's other parts
    torch.save({"state_dict": {**{"backbone." + k: v for k, v in sd.items()},
                               "decoder.weight": torch.zeros(3, 3), "decoder.bias": torch.zeros(3)}}, wrapped)
    rc = cli_main(["linprobe", f"model={wrapped}", "img_size=32", "layers=3", f"data.train_dir={setup['data'] / 'train'}",
                   f"data.val_dir={setup['data'] / 'val'}", f"train.output_dir={tmp_path / 'run'}", "train.epochs=1",
                   "train.batch_size=16", "extract_batch_size=32", "extract_num_workers=0"])
    assert rc == 0
    cap = capsys.readouterr()
    said = [line for line in (cap.out + cap.err).splitlines() if str(wrapped) in line]
    assert len(said) == 4, said
    assert said[0].endswith(f"{wrapped}: BEiT encoder found under 'backbone.'")
    assert said[1].endswith("left out 2 tensors that are not part of the BEiT encoder: decoder.weight, decoder.bias")
    assert said[2].endswith(f"loaded {len(sd) - 3} of the model's {len(sd) - 3} tensors; 3 of the checkpoint's "
                            "tensors not loaded (named below)")
    assert said[3].endswith("3 tensors not loaded, as expected (the MIM pre-training head: a model with head='none' "
                            "has none): lm_head.bias, lm_head.weight, mask_token")


def test_tensors_not_loaded_are_named_a_few_then_counted(setup, tmp_path):
    """Every tensor the encoder did not take is named: the first few, then "and N more"."""
    import logging

    from safetensors.torch import load_file

    from beit.tasks.classify import build_encoder

    sd = dict(load_file(setup["ckpt"] / "model.safetensors"))
    sd.update({f"adapter.{i}.weight": torch.zeros(2) for i in range(9)})  # another code base's additions
    path = tmp_path / "adapters.pth"
    torch.save(sd, path)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    log = logging.getLogger("beit.interop.load")
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        build_encoder(lp_cfg(setup, tmp_path / "run", f"model={path}"))
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
    said = [r.getMessage() for r in records]
    assert f"{path}: loaded {len(sd) - 12} of the model's {len(sd) - 12} tensors; 12 of the checkpoint's tensors " \
           "not loaded (named below)" in said, said
    assert f"{path}: 3 tensors not loaded, as expected (the MIM pre-training head: a model with head='none' has none): " \
           "lm_head.bias, lm_head.weight, mask_token" in said, said
    unexpected = [r for r in records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in unexpected] == [
        f"{path}: dropped 9 tensors that have no place in the model: adapter.0.weight, adapter.1.weight, "
        "adapter.2.weight, adapter.3.weight, adapter.4.weight, adapter.5.weight and 3 more (not expected)"]


@pytest.fixture
def beit_info() -> list:
    """Every record of the ``beit`` logger at INFO and above (the level restored after)."""
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    log = logging.getLogger("beit")
    old_level = log.level
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    yield records
    log.removeHandler(handler)
    log.setLevel(old_level)


def test_lr_scaling_and_resume_changes_are_said_once(setup, tmp_path, monkeypatch, beit_info):
    """`lr 0.001 x 16/256 = 6.25e-05` was logged twice per run (the lr was scaled for the early output-folder check
    and again for the trainer), and `resume: settings changed since the checkpoint (allowed): ...` twice with
    --resume auto (the early check, then the trainer's resume). Now once each; and when the early check refuses the
    resume (the trainer never runs), the allowed changes are still said, once, before the error."""
    from beit.engine.rundir import ConfigChangedError

    def lines(start: str) -> list[str]:
        return [r.getMessage() for r in beit_info if r.getMessage().startswith(start)]

    out = tmp_path / "run"
    linprobe(lp_cfg(setup, out, "train.epochs=1", "knn=0"))
    assert lines("lr 0.001 x 16/256 = 6.25e-05") == ["lr 0.001 x 16/256 = 6.25e-05 (total batch 16)"]
    beit_info.clear()

    linprobe(lp_cfg(setup, out, "train.epochs=2", "knn=0", "train.resume=auto"))
    assert len(lines("lr 0.001 x 16/256")) == 1
    assert lines("resume: settings changed") == [
        "resume: settings changed since the checkpoint (allowed): train.epochs: 1 -> 2"], lines("resume")
    beit_info.clear()

    lp = importlib.import_module("beit.tasks.classify.linprobe")

    def no_extraction(*args, **kwargs):
        raise _Stop("features extracted before the resume was checked")

    monkeypatch.setattr(lp, "extract_features", no_extraction)
    with pytest.raises(ConfigChangedError, match="train.weight_decay"):  # refused by the early check alone
        linprobe(lp_cfg(setup, out, "train.epochs=3", "knn=0", "train.resume=auto", "train.weight_decay=0.5"))
    assert lines("resume: settings changed") == [
        "resume: settings changed since the checkpoint (allowed): train.epochs: 2 -> 3"], lines("resume")
    assert len(lines("lr 0.001 x 16/256")) == 1
