"""The ``beit`` command: one static table, one shape per kind, presets by name, one error boundary, and
validation of every config before any work (issue 14 items 11-12, issue 16 items 3-4)."""

from __future__ import annotations

import dataclasses
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import beit.cli as cli
from beit.cli import COMMANDS, SHORT, TASKS, TOOLS, build_parser, main
from beit.configs import describe, list_presets, preset_path, resolve_config
from beit.engine.config import ConfigError, TrainConfig, check_output_dir, check_values, load_config
from beit.tokenizers.dvae import DiscreteVAE

SRC = Path(cli.__file__).resolve().parents[1]
PRESETS = ["finetune_base", "finetune_cifar10_small", "finetune_rvlcdip_base", "layout_docbank",
           "layout_publaynet_base", "linprobe_base", "pretrain_base", "pretrain_cifar10_small",
           "segment_ade20k_base", "segment_camvid", "tokenizer_cifar10"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A folder of 8 tiny images and a tiny dVAE: enough for `beit pretrain` to get past validation."""
    root = tmp_path_factory.mktemp("cli")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3)).astype(np.uint8)).save(root / "images" / f"{i}.png")
    torch.manual_seed(0)
    DiscreteVAE(vocab_size=16, hidden=8, downsample=4, num_res_blocks=0, codebook_dim=8).save(root / "tok.safetensors")
    return root


def _pretrain_args(root: Path, *extra: str) -> list[str]:
    """`beit pretrain` on the tiny setup: the cifar preset made tiny, then ``extra``."""
    return ["pretrain", "-c", "pretrain_cifar10_small", f"data.path={root / 'images'}", "data.in_memory=false",
            "tokenizer.kind=dvae", f"tokenizer.path={root / 'tok.safetensors'}", "model.embed_dim=32", "model.depth=1",
            "model.num_heads=2", "train.batch_size=4", "train.num_workers=0", "train.epochs=1", "train.warmup_epochs=0", "train.log_every=1",
            *extra]


@pytest.fixture
def captured(monkeypatch):
    """Replace the pre-training itself: the configs the command would have trained with."""
    seen: list = []

    def fake(cfg):
        seen.append(cfg)
        return {"done": 1}

    monkeypatch.setattr("beit.tasks.pretrain.train.pretrain", fake)
    return seen


def _err(capsys) -> str:
    return capsys.readouterr().err.strip()


# ------------------------------------------------------------------ [shape] 4: presets inside the package
def test_presets_ship_in_the_package_each_with_a_description():
    assert list_presets() == PRESETS
    assert preset_path("segment_camvid") == SRC / "beit" / "configs" / "segment_camvid.yaml"
    for name in PRESETS:
        line = preset_path(name).read_text().splitlines()[0]
        assert line.startswith("# ") and describe(name) == line[2:].strip() and len(describe(name)) > 20
    assert describe("segment_camvid") == "BEiT + UperNet on CamVid (SegNet split, 11 classes, void = 11)"
    pyproject = (SRC.parent / "pyproject.toml").read_text()
    assert '"beit.configs" = ["*.yaml"]' in pyproject  # shipped in wheels as package data


def test_config_resolves_by_name_from_any_folder(setup, tmp_path, monkeypatch, captured):
    monkeypatch.chdir(tmp_path)  # no configs/ here
    assert main(_pretrain_args(setup, "--out", str(tmp_path / "run"))) == 0
    cfg = captured[-1]
    assert (cfg.model.patch_size, cfg.model.img_size, cfg.data.num_mask_patches) == (4, 32, 26)  # from the preset
    assert cfg.model.embed_dim == 32  # the command line over the preset
    # the old spellings of the presets' place keep working; an existing file wins over a preset
    assert resolve_config("configs/pretrain_base.yaml") == str(preset_path("pretrain_base"))
    assert resolve_config("pretrain_base.yaml") == str(preset_path("pretrain_base"))
    (tmp_path / "pretrain_base.yaml").write_text("model: {}\n")
    assert resolve_config("pretrain_base.yaml") == "pretrain_base.yaml"
    assert resolve_config(None) is None


def test_unknown_preset_lists_the_presets(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", "-c", "pretrain_huge"]) == 1
    assert _err(capsys) == ("beit pretrain: error: unknown preset 'pretrain_huge'; presets: "
                            + ", ".join(p for p in PRESETS if p.startswith("pretrain_"))
                            + " (or give the path of a YAML file)")  # the presets this command takes
    assert main(["finetune", "-c", "nope/x.yaml"]) == 1
    assert _err(capsys) == ("beit finetune: error: config file not found: nope/x.yaml (presets: "
                            + ", ".join(p for p in PRESETS if p.startswith("finetune_")) + ")")


def test_beit_configs_lists_one_line_each(capsys):
    assert main(["configs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name, line in zip(PRESETS, lines):
        assert line.split()[0] == name and line.endswith(describe(name))


# --------------------------------------------------------------------- [shape] 3: one static table
def test_the_table_is_static_and_imports_nothing_heavy():
    """cli.py imports only the light tasks' cli modules (which import no beit.cli, no task code at module level):
    the heavy imports stay inside each run function."""
    import ast

    def top_imports(path: Path) -> set[str]:
        names: set[str] = set()
        for node in ast.parse(path.read_text()).body:  # module level only, not inside functions
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                names |= {("." * node.level) + (node.module or "") + (":" + a.name if node.level else "")
                          for a in node.names}
        return names

    light = {"__future__", "argparse", "json", "pathlib", "os", "re", "sys", "collections.abc", "dataclasses",
             "contextlib", "signal", "threading", "typing"}
    for mod in ("tasks/pretrain/cli.py", "tasks/classify/cli.py", "tasks/segmentation/cli.py", "tasks/layout/cli.py",
                "tasks/tokenizer/cli.py"):
        assert top_imports(SRC / "beit" / mod) <= light, mod
    assert top_imports(Path(cli.__file__)) - light == {".tasks.classify:cli", ".tasks.layout:cli",
                                                       ".tasks.pretrain:cli", ".tasks.segmentation:cli",
                                                       ".tasks.tokenizer:cli"}
    assert not hasattr(cli, "command") and "importlib" not in Path(cli.__file__).read_text()


def test_every_command_has_the_shape_of_its_kind():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, type(parser._subparsers._group_actions[0])))

    def options(p):
        return {o for a in p._actions for o in a.option_strings}

    for task, actions in TASKS.items():
        tsub = next(a for a in sub.choices[task]._actions if a.dest == "action")
        for action, cmd in actions.items():
            opts = options(tsub.choices[action])
            assert "--debug" in opts
            if cmd.kind == "train":
                assert {"-c", "--config", "--resume", "--out", "--overwrite"} <= opts, (task, action)
            elif cmd.kind == "checkpoint":
                assert {"--ckpt", "--out", "--output"} <= opts, (task, action)
                assert ("--config" in opts) == cmd.config
    expected = {"pretrain": {"train", "visualize"}, "classify": {"train", "linprobe", "eval", "predict"},
                "segment": {"train", "eval", "predict"}, "layout": {"train", "eval", "predict"},
                "tokenizer": {"train", "eval", "encode", "convert"}}
    assert {t: set(a) for t, a in TASKS.items()} == expected
    for short, (task, action) in SHORT.items():
        assert COMMANDS[short] is TASKS[task][action]
    assert set(TOOLS) == {"convert", "demo", "configs"}
    assert set(sub.choices) == set(TASKS) | set(SHORT) | set(TOOLS)


def test_train_flags_become_overrides_in_any_order(setup, tmp_path, captured):
    out = tmp_path / "run"
    # the long form, options after the overrides, every flag of the shape
    assert main(["pretrain", "train", *_pretrain_args(setup)[1:], "--out", str(out), "--resume", "auto",
                 "--overwrite", "train.seed=3"]) == 0
    cfg = captured[-1]
    assert (cfg.train.output_dir, cfg.train.resume, cfg.train.overwrite, cfg.train.seed) == (str(out), "auto", True, 3)
    assert out.is_dir()  # probed (created) at config time
    assert main(_pretrain_args(setup)) == 0  # the short form, no flags
    assert (captured[-1].train.resume, captured[-1].train.overwrite) == ("", False)
    assert cli._expand(["--debug", "pretrain", "-c", "x"]) == ["--debug", "pretrain", "train", "-c", "x"]
    assert cli._expand(["pretrain", "visualize", "x.pt"]) == ["pretrain", "visualize", "x.pt"]


def test_the_printed_summaries_say_which_accuracy_is_a_fraction(setup, tmp_path, monkeypatch, capsys):
    """`beit pretrain` printed `train/mim_acc: 0.25` (a fraction) and `beit finetune` `top1: 85.3` (a percent) beside
    its step's `train/acc: 0.9` (a fraction), the unit said nowhere; metrics.jsonl keeps the keys and values."""
    monkeypatch.setattr("beit.tasks.pretrain.train.pretrain",
                        lambda cfg: {"step": 2, "train/mim_acc": 0.25, "train/masked_frac": 0.4, "train/loss": 2.5})
    assert main(_pretrain_args(setup, "--out", str(tmp_path / "pre"))) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["step: 2", "train/mim_acc: 0.25 (fraction, 0-1)", "train/masked_frac: 0.4 (fraction, 0-1)",
                   "train/loss: 2.5"]
    monkeypatch.setattr("beit.tasks.classify.train.finetune",
                        lambda cfg: {"train/acc": 0.9, "eval/top1": 85.0, "eval/ema_top5": 99.0, "best/top1": 86.0,
                                     "best/step": 40, "top1": 85.0, "class_names": ["a", "b"]})
    assert main(["finetune", "-c", "finetune_cifar10_small", f"data.train_dir={setup / 'images'}",
                 f"data.val_dir={setup / 'images'}", "--out", str(tmp_path / "ft")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:6] == ["train/acc: 0.9 (fraction, 0-1)", "eval/top1: 85.0 (percent)", "eval/ema_top5: 99.0 (percent)",
                       "best/top1: 86.0 (percent)", "best/step: 40", "top1: 85.0 (percent)"]


def test_a_flag_and_its_key_together_are_refused(setup, tmp_path, captured, capsys):
    assert main(_pretrain_args(setup, "--out", "a", "train.output_dir=b")) == 1
    assert _err(capsys) == "beit pretrain: error: --out and train.output_dir=... both given: keep one"
    assert main(_pretrain_args(setup, "stray")) == 1
    assert _err(capsys) == ("beit pretrain: error: unexpected argument(s) ['stray']: overrides are key=value, "
                            "options go as --name")
    assert not captured


def test_checkpoint_commands_take_the_checkpoint_either_way(tmp_path, capsys):
    missing = tmp_path / "missing.pt"
    for argv in (["segment", "eval", str(missing)], ["segment", "eval", "--ckpt", str(missing)],
                 ["layout", "eval", str(missing)]):
        assert main(argv) == 1
        assert _err(capsys).endswith(f"error: checkpoint not found: {missing}")
    assert main(["segment", "eval"]) == 1
    assert _err(capsys) == "beit segment eval: error: beit segment eval needs a checkpoint: --ckpt PATH (or the first " \
                           "argument)"
    assert main(["evaluate", str(missing), "--data", str(tmp_path), "train.lr=1"]) == 1
    assert _err(capsys) == "beit evaluate: error: beit evaluate takes no key=value overrides, got ['train.lr=1']"


# ------------------------------------------------------------------- [robust] 11: one error boundary
def test_yaml_syntax_error_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1e-3, 2\n")
    assert main(["pretrain", "-c", str(bad)]) == 1
    err = _err(capsys)
    assert err.startswith(f"beit pretrain: error: {bad}, line 3 column 1: not valid YAML (")
    assert "\n" not in err
    bad.write_text("train:\n\tlr: 0.1\n")  # a tab: PyYAML's words alone do not say so
    assert main(["pretrain", "-c", str(bad)]) == 1
    assert _err(capsys).endswith("that line holds a tab: YAML indents with spaces)")


def test_malicious_pickle_on_the_dalle_path_is_one_line(tmp_path, capsys):
    path = tmp_path / "encoder.pkl"
    torch.save({"w": torch.zeros(1), "x": _Evil()}, path)
    assert main(["tokenizer", "convert", str(path), str(tmp_path / "out.safetensors")]) == 1
    err = _err(capsys)
    assert err.startswith(f"beit tokenizer convert: error: refusing to load {path}: it references the global "
                          "'posix.system'") and "\n" not in err
    assert not (tmp_path / "pwned").exists()


class _Evil:
    def __reduce__(self):
        return os.system, ("touch pwned",)


@pytest.mark.parametrize("argv", [["evaluate", "{bad}", "--data", "{tmp}"], ["predict", "{bad}", "{tmp}"],
                                  ["visualize", "{bad}"], ["segment", "eval", "{bad}"], ["layout", "eval", "{bad}"]])
def test_damaged_checkpoint_is_one_line_naming_it(argv, tmp_path, capsys):
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    (tmp_path / "config.yaml").write_text("model: {}\n")
    argv = [a.format(bad=bad, tmp=tmp_path) for a in argv]
    assert main(argv) == 1
    err = _err(capsys)
    assert f"error: {bad}: not a readable checkpoint, damaged or truncated? (" in err and "\n" not in err


def test_damaged_checkpoint_on_resume_is_one_line(setup, tmp_path, capsys):
    bad = tmp_path / "step.pt"
    bad.write_bytes(b"\x80\x02garbage")
    assert main(_pretrain_args(setup, "--out", str(tmp_path / "run"), "--resume", str(bad))) == 1
    assert f"beit pretrain: error: {bad}: not a readable checkpoint, damaged or truncated?" in _err(capsys)


def test_divergence_permission_interrupt_and_bugs(setup, tmp_path, monkeypatch, capsys):
    from beit.engine.trainer import TrainingDivergedError

    errors = {
        "diverged": (TrainingDivergedError(7, {"loss": float("nan")}, Path("run/last.pt")),
                     "beit pretrain: error: training diverged at step 7: loss=nan. last good checkpoint: "
                     "run/last.pt. Lower the lr, raise warmup, set clip_grad, or check the batch (e.g. a mask with "
                     "no masked patch)."),
        "denied": (PermissionError(13, "Permission denied", "/data/run/metrics.jsonl"),
                   "beit pretrain: error: Permission denied: /data/run/metrics.jsonl (PermissionError)"),
        "full": (OSError(28, "No space left on device", "/data/run/step_0000010.pt.tmp"),
                 "beit pretrain: error: No space left on device: /data/run/step_0000010.pt.tmp (OSError)"),
        "interrupt": (KeyboardInterrupt(), "beit pretrain: interrupted"),
    }
    current: list[BaseException] = []

    def fake(cfg):
        raise current[0]

    monkeypatch.setattr("beit.tasks.pretrain.train.pretrain", fake)
    args = _pretrain_args(setup, "--out", str(tmp_path / "run"))
    # a Ctrl-C outside the training loop (setting up, or writing the report after the last step): what continues
    errors["interrupt"] = (KeyboardInterrupt(), (
        "beit pretrain: interrupted outside the training loop (while setting up, or after training while "
        f"writing its results); if checkpoints were written, beit pretrain {' '.join(args[1:])} --resume auto "
        "continues the "
        "run, or only writes what is missing when training had finished"))
    for exc, line in errors.values():
        current[:] = [exc]
        assert main(args) == (130 if isinstance(exc, KeyboardInterrupt) else 1)
        assert _err(capsys) == line
        with pytest.raises(type(exc)):  # --debug: the traceback
            main([*args, "--debug"])
        monkeypatch.setenv("BEIT_DEBUG", "1")
        with pytest.raises(type(exc)):
            main(args)
        monkeypatch.delenv("BEIT_DEBUG")
    current[:] = [AttributeError("a bug")]  # not anticipated: the traceback, never a swallowed bug
    with pytest.raises(AttributeError):
        main(args)


def test_under_torchrun_a_failing_rank_exits_at_once(setup, tmp_path, monkeypatch, capsys):
    """A rank that fails must not hang in a collective or the teardown: it exits non-zero right away (torchrun
    then stops the other ranks)."""
    exits: list[int] = []

    class Exited(BaseException):
        pass

    def fake_exit(code):
        exits.append(code)
        raise Exited

    monkeypatch.setattr(cli, "_distributed", lambda: True)
    monkeypatch.setattr(cli.os, "_exit", fake_exit)
    monkeypatch.setattr("beit.tasks.pretrain.train.pretrain", lambda cfg: (_ for _ in ()).throw(ValueError("rank 1 failed")))
    for extra, code in (([], 1), (["--debug"], 1)):
        with pytest.raises(Exited):
            main(_pretrain_args(setup, "--out", str(tmp_path / "run"), *extra))
        assert exits[-1] == code
    assert "error: rank 1 failed" in capsys.readouterr().err


@pytest.mark.parametrize("command, module, func", [
    (["pretrain"], "beit.tasks.pretrain.train", "pretrain"),
    (["segment", "train"], "beit.tasks.segmentation.train", "train"),
    (["tokenizer", "train"], "beit.tasks.tokenizer.train", "train_tokenizer"),
    (["finetune"], "beit.tasks.classify.train", "finetune"),
])
def test_under_torchrun_only_rank_0_prints_the_training_summary(command, module, func, monkeypatch, capsys):
    """Each rank printed the run's final summary, the two interleaved and with their own img/s (52 vs 138 on two
    CPU ranks): the other ranks print nothing now, rank 0 prints it as before."""
    import importlib

    import beit.engine.config as engine_config
    import beit.engine.distributed as D

    monkeypatch.setattr(engine_config, "load_run_config", lambda *a, **k: object())
    monkeypatch.setattr(importlib.import_module(module), func, lambda cfg: {"step": 3, "train/img_per_s": 52.2})
    for rank, printed in ((1, ""), (0, "52.2")):
        monkeypatch.setattr(D, "rank", lambda rank=rank: rank)
        assert main([*command, "train.max_steps=3"]) == 0
        out = capsys.readouterr().out
        assert (printed in out) if printed else out == "", (rank, out)


def _as_rank(monkeypatch, rank: int, local_rank: int, world_size: int = 2) -> None:
    """torchrun's environment for one rank, before the process group exists."""
    for var, value in (("RANK", rank), ("LOCAL_RANK", local_rank), ("WORLD_SIZE", world_size)):
        monkeypatch.setenv(var, str(value))


class _Stopped(BaseException):
    """What torchrun does to a rank waiting in ``_report`` once the first rank has failed: stops it (SIGTERM)."""


@pytest.mark.parametrize("bad", [["finetune", "-c", "finetune_cifar10_small", "train.lr=-1"],
                                 ["finetune", "-c", "finetune_cifar10_small", "data.train_dir=/nonexistent"],
                                 ["finetune", "--bogus"]])
def test_under_torchrun_an_error_every_rank_meets_is_printed_once(bad, tmp_path, monkeypatch, capsys):
    """Each rank printed the error of a bad config value (``beit finetune: error: config key 'train.lr': ...``),
    the same line once per rank: the host's first rank prints it; the others wait, silent, until torchrun stops
    them (exiting at once, they could have had the first rank stopped before it printed)."""
    argv = [*bad, "--out", str(tmp_path / "run")] if bad[-1] != "--bogus" else bad
    code = 2 if bad[-1] == "--bogus" else 1
    waits: list[int] = []

    def stopped_by_torchrun() -> None:
        waits.append(1)
        raise _Stopped

    monkeypatch.setattr(cli, "_wait_for_the_first_rank", stopped_by_torchrun)
    for rank, local_rank, world_size, first in ((1, 1, 2, False), (0, 0, 2, True), (3, 1, 4, False),
                                                (2, 0, 4, True)):  # ranks 2, 3: a second host
        _as_rank(monkeypatch, rank, local_rank, world_size)
        if first:
            assert main(argv) == code, rank
            assert "error: " in capsys.readouterr().err
        else:
            with pytest.raises(_Stopped):
                main(argv)
            assert capsys.readouterr().err == "", rank
    assert len(waits) == 2
    monkeypatch.setattr(cli, "_wait_for_the_first_rank", lambda: None)  # not stopped: the first rank did not fail
    _as_rank(monkeypatch, 1, 1)
    assert main(argv) == code
    assert "error: " in capsys.readouterr().err


def test_under_torchrun_an_error_of_one_rank_is_printed_by_that_rank(setup, tmp_path, monkeypatch, capsys):
    """A rank that fails alone, once the ranks joined their group (its data shard, its GPU), still says why."""
    import beit.engine.distributed as D

    _as_rank(monkeypatch, 1, 1)
    monkeypatch.setattr(D, "is_dist", lambda: True)
    monkeypatch.setattr(D, "rank", lambda: 1)
    monkeypatch.setattr(D, "world_size", lambda: 2)
    monkeypatch.setattr(cli.os, "_exit", lambda code: exits.append(code))
    exits: list[int] = []
    monkeypatch.setattr("beit.tasks.pretrain.train.pretrain", lambda cfg: (_ for _ in ()).throw(ValueError("rank 1 failed")))
    assert main(_pretrain_args(setup, "--out", str(tmp_path / "run"))) == 1 and exits == [1]
    assert "beit pretrain: error: rank 1 failed" in capsys.readouterr().err
    monkeypatch.setattr("beit.tasks.pretrain.train.pretrain",  # a config value the trainer finds bad: every rank's
                        lambda cfg: (_ for _ in ()).throw(ConfigError("train.batch_size", "too large")))
    monkeypatch.setattr(cli, "_wait_for_the_first_rank", lambda: (_ for _ in ()).throw(_Stopped()))
    with pytest.raises(_Stopped):
        main(_pretrain_args(setup, "--out", str(tmp_path / "run")))
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("bad, line", [
    (["finetune", "-c"], "beit finetune: error: argument -c/--config: expected one argument"),
    (["finetun", "-c", "x"], "beit: error: argument COMMAND: invalid choice: 'finetun' (choose from "),
])
def test_under_torchrun_argparse_usage_errors_are_printed_once(bad, line, monkeypatch, capsys):
    """A usage error argparse finds itself (a missing option argument, a mistyped command) was printed by each
    rank, usage and error line twice: the host's first rank prints it, the others wait silent until torchrun stops
    them. One process prints argparse's usage and error line, as before."""
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(cli, "_wait_for_the_first_rank", lambda: (_ for _ in ()).throw(AssertionError("waited")))
    with pytest.raises(SystemExit) as exited:
        main(bad)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: beit") and err.endswith("\n") and err.splitlines()[-1].startswith(line), err
    assert all(ln.startswith(" ") for ln in err.splitlines()[1:-1]), err  # the usage, then the error line
    monkeypatch.setattr(cli, "_wait_for_the_first_rank", lambda: (_ for _ in ()).throw(_Stopped()))
    _as_rank(monkeypatch, 1, 1)
    with pytest.raises(_Stopped):
        main(bad)
    assert capsys.readouterr().err == ""
    _as_rank(monkeypatch, 0, 0)
    with pytest.raises(SystemExit):
        main(bad)
    assert capsys.readouterr().err == err


@pytest.mark.parametrize("argv", [["finetune", "--help"], ["segment", "train", "-h"], ["--help"]])
def test_under_torchrun_the_help_is_printed_once_per_host(argv, monkeypatch, capsys):
    """``beit finetune --help`` under torchrun printed the help once per rank: the host's first rank prints it (on
    each host), the others print nothing and exit 0 as it does, at once (no wait: an exit 0 has torchrun stop no
    rank). One process prints it as before."""
    monkeypatch.setattr(cli, "_wait_for_the_first_rank", lambda: (_ for _ in ()).throw(AssertionError("waited")))

    def help_printed() -> str:
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 0
        out = capsys.readouterr()
        assert out.err == ""
        return out.out

    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    alone = help_printed()
    assert alone.startswith("usage: beit") and "--debug" in alone, alone
    for rank, local_rank, world_size, first in ((1, 1, 2, False), (0, 0, 2, True), (3, 1, 4, False),
                                                (2, 0, 4, True)):  # ranks 2, 3: a second host
        _as_rank(monkeypatch, rank, local_rank, world_size)
        assert help_printed() == (alone if first else ""), rank


def test_under_torchrun_beit_without_a_command_prints_its_help_once(monkeypatch, capsys):
    """``beit`` alone prints the help and exits 2, a usage error: under torchrun the host's first rank prints it; the
    others wait, silent, until torchrun stops them (exiting 2 at once could get the first rank stopped before it
    printed), as for the other usage errors."""
    monkeypatch.setattr(cli, "_wait_for_the_first_rank", lambda: (_ for _ in ()).throw(_Stopped()))
    _as_rank(monkeypatch, 1, 1)
    with pytest.raises(_Stopped):
        main([])
    assert capsys.readouterr().out == ""
    _as_rank(monkeypatch, 0, 0)
    assert main([]) == 2
    assert capsys.readouterr().out.startswith("usage: beit")


@pytest.mark.parametrize("env, printed", [({}, True), ({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}, True),
                                          ({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}, False),
                                          ({"RANK": "1", "LOCAL_RANK": "x", "WORLD_SIZE": "2"}, True)])
def test_the_help_imports_no_torch(env, printed) -> None:
    """The help says once per host under torchrun without loading torch: ``beit finetune --help`` of one process
    (no ``LOCAL_RANK``) imports none, as before, and neither does a torchrun rank (each imported torch to learn
    from torchrun's environment whether it is its host's first: ~3x the help's time on a 2-core machine). A
    ``LOCAL_RANK`` that is not a number: this process prints the help."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from beit.cli import main\n"
            "try:\n"
            "    main(['finetune', '--help'])\n"
            "except SystemExit as e:\n"
            "    assert e.code == 0, e.code\n"
            "print('torch loaded:', 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin", **env})
    assert out.returncode == 0 and out.stdout.startswith("usage: beit finetune") == printed, out.stdout + out.stderr
    assert out.stdout.strip().endswith("torch loaded: False"), out.stdout + out.stderr


def test_under_torchrun_no_image_that_decodes_is_printed_once(tmp_path, monkeypatch, capsys):
    """``beit pretrain`` joins the process group before it reads its images: a folder none of whose images
    decodes was ``error: none of the 1 images under ... could be decoded`` from each rank. Every rank reads the
    same folder: the host's first rank says it (a rank the wait does not end still says it, after the wait)."""
    import beit.engine.distributed as D
    from beit.data.datasets import NoReadableImagesError, decode_image_folder

    (tmp_path / "onlybad").mkdir()
    (tmp_path / "onlybad" / "x.png").write_bytes(b"not an image")
    with pytest.raises(NoReadableImagesError, match="none of the 1 images under .* could be decoded"):
        decode_image_folder(tmp_path / "onlybad", labeled=False, progress=False)
    _as_rank(monkeypatch, 1, 1)
    monkeypatch.setattr(D, "is_dist", lambda: True)  # after the group was made
    monkeypatch.setattr(D, "rank", lambda: 1)
    monkeypatch.setattr(D, "world_size", lambda: 2)
    monkeypatch.setattr(cli.os, "_exit", lambda code: None)
    monkeypatch.setattr(cli, "_wait_for_the_first_rank", lambda: (_ for _ in ()).throw(_Stopped()))
    monkeypatch.setattr("beit.tasks.classify.train.finetune",
                        lambda cfg: decode_image_folder(tmp_path / "onlybad", labeled=False, progress=False))
    argv = ["finetune", "-c", "finetune_cifar10_small", "--out", str(tmp_path / "run")]
    with pytest.raises(_Stopped):
        main(argv)
    assert "error:" not in capsys.readouterr().err
    monkeypatch.setattr(cli, "_wait_for_the_first_rank", lambda: None)  # not stopped: it says it itself
    assert main(argv) == 1
    assert "beit finetune: error: none of the 1 images under " in capsys.readouterr().err


def test_under_torchrun_a_collective_failed_by_a_gone_rank_is_one_line(setup, tmp_path, monkeypatch, capsys):
    """Rank 1 fails alone after the group was made; rank 0's collective then fails on the gone peer, and rank 0
    printed gloo's traceback (``RuntimeError: [.../pair.cc:561] Connection closed by peer ...``) below rank 1's
    line. Now one line that says so; any other error of the rank (not the peer's) keeps its traceback."""
    import torch.distributed as dist

    exits: list[int] = []
    monkeypatch.setattr(cli, "_distributed", lambda: True)
    monkeypatch.setattr(cli.os, "_exit", lambda code: exits.append(code))
    raised: list[BaseException] = []
    monkeypatch.setattr("beit.tasks.pretrain.train.pretrain", lambda cfg: (_ for _ in ()).throw(raised[0]))
    args = _pretrain_args(setup, "--out", str(tmp_path / "run"))
    head = "beit pretrain: error: another rank stopped (its error, if it printed one, is above): "
    for error, first in (
        (RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by "
                      "peer [127.0.0.1]:24467. This is typically caused by a remote worker crashing. Check the logs "
                      "of the remote worker before reporting an error. GLHF!"),
         "Connection closed by peer [127.0.0.1]:24467."),
        (RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error [127.0.0.1]:30626: Connection "
                      "reset by peer. This is typically caused by a remote worker hanging"),
         "Read error [127.0.0.1]:30626: Connection reset by peer."),
        (dist.DistBackendError("NCCL communicator was aborted: remote process exited or there was a network error\n"
                               "Exception raised from ..."),
         "NCCL communicator was aborted: remote process exited or there was a network error"),
    ):
        raised[:] = [error]
        assert main(args) == 1 and exits[-1] == 1
        assert _err(capsys) == head + first
    for error in (RuntimeError("CUDA error: an illegal memory access was encountered"),  # this rank's own
                  RuntimeError("Connection reset by peer"),  # not a collective's: this rank's own too
                  # a path holding nccl / gloo is no collective (the checks were "gloo|nccl" anywhere)
                  RuntimeError("Failed to write checkpoint /data/nccl_runs/x.pt: [Errno 32] Broken pipe"),
                  RuntimeError("Failed to save to /ckpt/gloo-exp/x.pt: Connection reset by peer")):
        raised[:] = [error]
        with pytest.raises(RuntimeError):
            main(args)
        assert "Traceback" in capsys.readouterr().err
    monkeypatch.setattr(cli, "_distributed", lambda: False)  # one process: no other rank to blame
    raised[:] = [RuntimeError("[pair.cc:561] gloo: Connection closed by peer")]
    with pytest.raises(RuntimeError):
        main(args)


@pytest.mark.slow
def test_under_real_torchrun_a_rank_whose_peer_is_gone_says_so_in_one_line():
    """2 gloo ranks: rank 1 fails while rank 0 is in an all-reduce; rank 0's error is one line, no gloo traceback
    (``--monitor-interval``: torchrun stops rank 0 after that, long after gloo failed its collective)."""
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--monitor-interval", "10", str(Path(__file__).parent / "_cli_dist_script.py"), "peer"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "beit boom: error: rank 1 failed" in out, out[-3000:]
    assert "beit boom: error: another rank stopped (its error, if it printed one, is above): Connection " in out, out[-3000:]
    assert "pair.cc" not in out and "RuntimeError" not in out, out[-3000:]


@pytest.mark.slow
def test_under_real_torchrun_every_rank_exits_non_zero():
    """2 gloo ranks: rank 1 fails in a command while rank 0 waits in a barrier; both end non-zero, no hang."""
    import re
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).parent / "_cli_dist_script.py")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "beit boom: error: rank 1 failed" in out, out[-3000:]
    codes = [int(c) for c in re.findall(r"exitcode\s+:\s*(-?\d+)", out)]  # the per-rank table
    assert len(codes) == 2 and all(codes), out[-3000:]


@pytest.mark.slow
def test_under_real_torchrun_a_successful_command_leaves_the_process_group():
    """Both ranks succeed: main destroys the group before returning (CI once saw a finished gloo rank abort at
    interpreter exit, 'terminate called without an active exception', when it did not)."""
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).parent / "_cli_dist_script.py"), "ok"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert out.count("rank group still initialized after main: False") == 2, out[-3000:]


# ---------------------------------------------------------------- [robust] 12: validation before any work
@pytest.mark.parametrize("override, message", [
    ("train.lr=inf", "config key 'train.lr': must be a finite number, got inf"),
    ("train.clip_grad=nan", "config key 'train.clip_grad': must be a finite number, got nan"),
    ("train.warmup_epochs=nan", "config key 'train.warmup_epochs': must be a finite number, got nan"),
    ("data.mean=[0.5,nan,0.5]", "config key 'data.mean': must be a finite number, got nan"),
    ("model.patch_size=0", "config key 'model.patch_size': must be > 0, got 0"),
    ("model.embed_dim=0", "config key 'model.embed_dim': must be > 0, got 0"),
    ("data.max_images=-5", "config key 'data.max_images': must be >= 0 (0 = off/all/auto), got -5"),
    ("train.batch_size=0", "config key 'train.batch_size': must be > 0, got 0"),
])
def test_bad_numbers_fail_before_any_work(override, message, setup, tmp_path, captured, capsys):
    assert main(_pretrain_args(setup, "--out", str(tmp_path / "run"), override)) == 1
    assert _err(capsys) == f"beit pretrain: error: {message}"
    assert not captured and not (tmp_path / "run").exists()


def test_every_float_of_every_task_config_must_be_finite():
    """By kind: each float field (also inside lists) of every task's config, set to nan, is refused by name."""
    from beit.tasks.classify import FinetuneConfig, LinprobeConfig
    from beit.tasks.layout import LayoutConfig
    from beit.tasks.pretrain import PretrainConfig
    from beit.tasks.segmentation import SegmentConfig
    from beit.tasks.tokenizer import TokenizerTrainConfig

    def floats(node, prefix=""):
        for f in dataclasses.fields(node):
            v = getattr(node, f.name)
            if dataclasses.is_dataclass(v):
                yield from floats(v, f"{prefix}{f.name}.")
            elif isinstance(v, float) or (isinstance(v, list | tuple) and v and isinstance(v[0], float)):
                yield node, f.name, prefix + f.name

    checked = 0
    for schema in (PretrainConfig, FinetuneConfig, LinprobeConfig, SegmentConfig, LayoutConfig, TokenizerTrainConfig):
        cfg = schema()
        for node, name, key in list(floats(cfg)):
            old = getattr(node, name)
            bad = float("inf") if isinstance(old, float) else type(old)([float("nan")] * len(old))
            setattr(node, name, bad)
            with pytest.raises(ConfigError) as info:
                check_values(cfg)
            assert info.value.key == key and "must be a finite number" in info.value.message
            setattr(node, name, old)
            checked += 1
    assert checked > 60


def test_size_checks_by_kind_and_validators_that_trip():
    @dataclasses.dataclass
    class Node:
        crop_size: int = 0  # default 0 = auto: 0 allowed
        hidden: int = 8
        seed: int = 0
        ignore_index: int = 255

        def validate(self) -> None:
            _ = 10 // self.seed  # a validator that would divide by zero

    from beit.engine.config import validate_config

    for bad, msg in ((Node(crop_size=-1), "config key 'crop_size': must be > 0, got -1"),
                     (Node(hidden=0), "config key 'hidden': must be > 0, got 0")):
        with pytest.raises(ConfigError) as info:
            check_values(bad)
        assert str(info.value) == msg
    check_values(Node(seed=-3, ignore_index=-1))  # signed fields may be negative
    with pytest.raises(ConfigError, match=r"^config key 'config': invalid values \(ZeroDivisionError"):
        validate_config(Node())


def test_output_dir_that_cannot_be_written_fails_before_the_dataset(setup, tmp_path, captured, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(_pretrain_args(setup, "--out", str(blocker / "run"))) == 1
    assert _err(capsys) == (f"beit pretrain: error: config key 'train.output_dir': cannot write to "
                            f"{blocker / 'run'}: {blocker} is a file, not a folder")
    assert not captured
    with pytest.raises(ConfigError, match=f"cannot write to {blocker}: {blocker} is a file, not a folder"):
        check_output_dir(blocker)
    with pytest.raises(ConfigError, match=f"cannot write to {blocker / 'x' / 'y'}: {blocker} is a file"):
        check_output_dir(blocker / "x" / "y")
    assert check_output_dir(tmp_path / "new" / "run").is_dir() and not list((tmp_path / "new" / "run").iterdir())


def test_users_shape_is_never_dropped_for_a_checkpoints(tmp_path):
    """A shape key beside model.init is checked against the checkpoint when it is read (equal: accepted,
    different: refused naming both); against a stored run's backbone here."""
    from beit.tasks.segmentation import SegmentConfig

    assert load_config(SegmentConfig, None, ["model.init=pt.pth", "model.depth=6"]).model.depth == 6
    assert load_config(SegmentConfig, None, ["model.depth=6"]).model.depth == 6  # from scratch: the user's value
    assert load_config(SegmentConfig, None, ["model.depth=6", "model.backbone={depth: 6}"]).model.depth == 6
    with pytest.raises(ConfigError, match=r"^config key 'model.depth': depth=4 but the checkpoint's stored backbone "
                                          r"has depth=6: "):
        load_config(SegmentConfig, None, ["model.depth=4", "model.backbone={depth: 6}"])


def test_train_config_has_overwrite():
    assert TrainConfig().overwrite is False
    assert load_config(TrainConfig, None, ["overwrite=true"]).overwrite is True


def test_every_readme_command_parses_and_resolves():
    """Each `beit ...` line of the README parses, names an existing command and its preset resolves."""
    import re
    import shlex

    text = (SRC.parent / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    lines = " \n".join(blocks).replace("\\\n", " ").splitlines()
    commands = []
    for line in lines:
        for part in line.split("&&"):
            part = part.split(" #")[0].strip()
            m = re.search(r"(?:^|-m )beit (.*)$", part)
            if m:
                commands.append([t for t in shlex.split(m.group(1)) if t != "..." and not t.endswith("=...")])
    assert len(commands) >= 20
    parser = build_parser()
    for argv in commands:
        args, extra = parser.parse_known_args(cli._expand(argv))
        assert getattr(args, "_cmd", None) and not [e for e in extra if e.startswith("-")], argv
        if extra:
            args.rest = list(args.rest) + extra
        cli._normalize(args, " ".join(argv[:2]))
        config = getattr(args, "config", None)  # tools have none
        assert config is None or Path(config).is_file(), argv


def test_layout_refuses_backbone_overrides_it_would_replace():
    from beit.tasks.layout import LayoutConfig

    with pytest.raises(ConfigError) as info:
        load_config(LayoutConfig, None, ["model.backbone_overrides={drop_path_rate: 0.3}"])
    assert str(info.value) == ("config key 'model.backbone_overrides.drop_path_rate': set by the layout config "
                               "itself; use model.drop_path_rate")
    assert load_config(LayoutConfig, None, ["model.drop_path_rate=0.3"]).model.drop_path_rate == 0.3


def test_device_values_are_checked_in_one_line(tmp_path, capsys):
    from beit.engine.distributed import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"--device 'gpu0': not a device name"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"--device 'cuda': no CUDA GPU is available here"):
            resolve_device("cuda")


def test_random_bytes_checkpoint_never_suggests_running_its_code(tmp_path, capsys):
    bad = tmp_path / "random.pt"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    for argv in (["convert", str(bad), str(tmp_path / "out")], ["evaluate", str(bad), "--data", str(tmp_path)]):
        assert main(argv) == 1
        err = _err(capsys)
        assert f"{bad}: not a readable checkpoint" in err and "\n" not in err
        assert "weights_only" not in err and "arbitrary code" not in err


def _other_task_checkpoints(root: Path) -> dict[str, tuple[Path, str]]:
    """A training checkpoint of every task but classification (its config as the trainer stores it; the weights do
    not matter: the task is refused first), one from before checkpoints recorded their task, beit pretrain's final
    model folder and a dVAE file of beit tokenizer train: name -> (path, task)."""
    from beit.engine.checkpoint import FORMAT, save_checkpoint
    from beit.engine.config import to_dict
    from beit.interop import save_model
    from beit.models.registry import create_model
    from beit.tasks import classify, layout, pretrain, segmentation, tokenizer

    configs = {"linear probing": classify.LinprobeConfig(model="runs/pt/final"),
               "pre-training": pretrain.PretrainConfig(), "segmentation": segmentation.SegmentConfig(),
               "layout detection": layout.LayoutConfig(),
               "dVAE tokenizer": tokenizer.TokenizerTrainConfig(data_dir="imgs")}
    found: dict[str, tuple[Path, str]] = {}
    for task, cfg in configs.items():
        path = root / task.replace(" ", "_") / "last.pt"
        path.parent.mkdir(parents=True)
        save_checkpoint({"format": FORMAT, "version": 1, "task": task, "config": to_dict(cfg), "step": 3,
                         "model": {}}, path)
        found[task] = (path, task)
    old = root / "old_segment.pt"  # no "task": the task is read from the config's shape
    save_checkpoint({"format": FORMAT, "version": 1, "config": to_dict(configs["segmentation"]), "model": {}}, old)
    found["old segmentation"] = (old, "segmentation")
    torch.manual_seed(0)
    mim = create_model("beit_base_patch16_224", head="mim", vocab_size=16, embed_dim=32, depth=1, num_heads=2,
                       img_size=32, patch_size=8)
    found["pre-training model"] = (save_model(mim, root / "final"), "pre-training")
    dvae = root / "dvae.safetensors"
    DiscreteVAE(vocab_size=16, hidden=8, downsample=4, num_res_blocks=0, codebook_dim=8).save(dvae)
    found["dVAE"] = (dvae, "dVAE tokenizer")
    return found


def test_evaluate_and_predict_name_the_task_and_command_of_another_tasks_checkpoint(tmp_path, capsys):
    """``beit evaluate`` / ``beit predict`` given a checkpoint of another task: one line naming the checkpoint, the task
    that saved it and the commands that take it (not "not a classifier", not "not a BEiT checkpoint")."""
    from beit.tasks.backbone_config import TASK_COMMANDS

    (tmp_path / "images" / "a").mkdir(parents=True)
    for name, (ckpt, task) in _other_task_checkpoints(tmp_path / "ckpts").items():
        for argv in (["evaluate", str(ckpt), "--data", str(tmp_path / "images")],
                     ["predict", str(ckpt), str(tmp_path / "images")]):
            assert main(argv) == 1, name
            assert _err(capsys) == (f"beit {argv[0]}: error: {ckpt} is a {task} checkpoint, not a classification one: "
                                    f"{TASK_COMMANDS[task]}"), name


def test_every_task_names_the_commands_that_take_its_checkpoints():
    """``TASK_COMMANDS`` (the end of the line that refuses a checkpoint of another task) has every task, and each
    ``beit ...`` in it is a command of the table."""
    import re

    from beit.tasks.backbone_config import TASK_COMMANDS, TASK_KINDS

    assert sorted(TASK_COMMANDS) == sorted(TASK_KINDS)
    for task, line in TASK_COMMANDS.items():
        named = re.findall(r"\bbeit ([a-z]+)(?: ([a-z]+))?", line)
        assert named, task
        for first, second in named:
            assert f"{first} {second}" in COMMANDS or first in COMMANDS, (task, first, second)
        assert "\n" not in line


def test_visualize_refuses_a_run_that_is_not_pre_training(tmp_path, capsys):
    run = tmp_path / "finetune"
    (run / "model").mkdir(parents=True)
    (run / "config.yaml").write_text("model: runs/pretrain/final\ndata: {}\n")
    assert main(["visualize", str(run / "model")]) == 1
    assert f"{run / 'model'}: not a pre-training run" in _err(capsys)


def test_output_piped_into_head_is_not_an_error():
    import subprocess
    import sys

    proc = subprocess.run(f"{sys.executable} -m beit configs | head -n 1", shell=True, capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.count("\n") == 1 and "Broken pipe" not in proc.stderr and "error" not in proc.stderr


def test_errors_found_by_the_trainer_name_their_train_key(setup, tmp_path, capsys):
    """Checks that need the data (warmup longer than training, a batch larger than the data) name the key as a
    user writes it, ``train.<key>``, like every other config error."""
    assert main(_pretrain_args(setup, "--out", str(tmp_path / "a"), "train.warmup_epochs=0.9")) == 1  # 2 steps
    assert _err(capsys) == ("beit pretrain: error: config key 'train.warmup_epochs': warmup (2 steps) must be "
                            "shorter than training (2 steps)")
    assert main(_pretrain_args(setup, "--out", str(tmp_path / "b"), "train.batch_size=64")) == 1
    err = _err(capsys)
    assert "config key 'train.batch_size': 8 samples over 1 ranks give no full step" in err
    assert err.endswith("use train.batch_size=8 or less (or more data)")


def test_a_preset_of_another_command_is_refused_by_name(capsys):
    assert main(["finetune", "-c", "pretrain_cifar10_small"]) == 1
    assert _err(capsys) == ("beit finetune: error: -c pretrain_cifar10_small is a preset of another command; "
                            "beit finetune takes: finetune_base, finetune_cifar10_small, finetune_rvlcdip_base")
    assert main(["segment", "train", "-c", "layout_docbank"]) == 1
    assert "beit segment train takes: segment_ade20k_base, segment_camvid" in _err(capsys)
    from beit.configs import preset_path

    assert main(["finetune", "-c", str(preset_path("pretrain_cifar10_small"))]) == 1  # the shipped file by its path
    assert "-c pretrain_cifar10_small is a preset of another command" in _err(capsys)


def test_a_copied_preset_of_another_command_names_that_command(tmp_path, capsys):
    from beit.configs import preset_path

    mine = tmp_path / "my_run.yaml"
    mine.write_text(preset_path("finetune_cifar10_small").read_text())
    assert main(["pretrain", "-c", str(mine)]) == 1
    assert _err(capsys).endswith(f"; {mine} is a config of `beit finetune`, not of `beit pretrain`")
    seg = tmp_path / "seg.yaml"
    seg.write_text(preset_path("segment_camvid").read_text())
    assert main(["linprobe", "-c", str(seg)]) == 1
    assert _err(capsys).endswith(f"; {seg} is a config of `beit segment train`, not of `beit linprobe`")
    # a file that fits its own command: the error is its own, no hint
    own = tmp_path / "own.yaml"
    own.write_text("train:\n  lr: 3.0e-4\n")
    assert main(["pretrain", "-c", str(own)]) == 1
    assert "is a config of" not in _err(capsys)


def test_config_paths_that_are_not_config_files(tmp_path, capsys):
    assert main(["pretrain", "-c", str(tmp_path)]) == 1
    assert f"-c {tmp_path} is a folder, not a config file" in _err(capsys)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    assert main(["pretrain", "-c", str(listed)]) == 1
    assert _err(capsys).endswith(f"{listed}: a config is a mapping of keys (key: value lines), not a list")
    assert main(["segment", "train", "-c", str(tmp_path / "nope.yaml")]) == 1
    assert _err(capsys).endswith("(presets: segment_ade20k_base, segment_camvid)")  # this command's presets
    assert main(["finetune", "-c", "nope"]) == 1
    assert "unknown preset 'nope'; presets: finetune_base, finetune_cifar10_small, finetune_rvlcdip_base (or" in \
        _err(capsys)


def test_an_output_path_through_a_file_is_named_as_such(tmp_path, capsys):
    from beit.cli import _error_line

    f = tmp_path / "afile"
    f.write_text("x")
    for err in (FileExistsError(17, "File exists", str(f)), NotADirectoryError(20, "Not a directory", str(f))):
        assert _error_line(err) == (f"{f} is a file, not a folder: give an output path whose folders are folders "
                                    f"({type(err).__name__})")
    assert main(["demo", "--quick", "--out", str(f / "sub")]) == 1
    assert _err(capsys) == (f"beit demo: error: {f} is a file, not a folder: give an output path whose folders are "
                            "folders (NotADirectoryError)")


def test_an_error_raised_in_a_dataloader_worker_is_shown_by_its_own_line():
    """torch re-raises a worker's error as "Caught X in DataLoader worker process 0. Original Traceback ...":
    the CLI line is the worker's own message (with the file names), not that header."""
    from torch.utils.data import DataLoader, Dataset

    from beit.cli import _error_line
    from beit.data.datasets import NoReadableImagesError

    class Broken(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            raise NoReadableImagesError("none of the 2 images could be read: a.png (broken)")

    with pytest.raises(NoReadableImagesError) as info:
        next(iter(DataLoader(Broken(), num_workers=1)))
    assert str(info.value).startswith("Caught NoReadableImagesError in DataLoader worker process 0")
    assert _error_line(info.value) == "none of the 2 images could be read: a.png (broken)"


# ---------------------------------------------------------------- a training run stopped by SIGINT / SIGTERM
def test_an_interrupted_run_ends_in_one_line_with_step_checkpoint_and_resume_command(setup, tmp_path, monkeypatch,
                                                                                      capsys):
    from beit.engine.trainer import TrainingInterrupted

    ckpt = tmp_path / "run" / "step_0000265.pt"
    raised: list[BaseException] = []
    monkeypatch.setattr("beit.tasks.pretrain.train.pretrain", lambda cfg: (_ for _ in ()).throw(raised[0]))
    args = _pretrain_args(setup, "--out", str(tmp_path / "run"), "--resume", str(tmp_path / "old.pt"))
    resume = "beit pretrain " + " ".join(a for a in args[1:] if a not in ("--resume", str(tmp_path / "old.pt")))
    for signum, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        raised[:] = [TrainingInterrupted(signum, 265, ckpt)]
        assert main(args) == code
        name = signal.Signals(signum).name
        assert _err(capsys) == (f"beit pretrain: interrupted by {name} after step 265; checkpoint of that step: "
                                f"{ckpt}; resume with: {resume} --resume auto")
    raised[:] = [TrainingInterrupted(signal.SIGINT, 3, None, at_once=True)]
    assert main(args) == 130
    assert _err(capsys) == ("beit pretrain: stopped at once by a second SIGINT after step 3, not saved; no "
                            "checkpoint written yet")


_SIGTERM_IN_SETUP = """
import json, os, signal, sys, time
from pathlib import Path

from beit.cli import main
from beit.engine.config import check_output_dir


def setting_up(cfg):  # the run folder made, then SIGTERM (timeout, scancel) before the trainer's own handler
    check_output_dir(Path(cfg.train.output_dir))
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)


import beit.tasks.pretrain.train
beit.tasks.pretrain.train.pretrain = setting_up
code = main(json.loads(sys.argv[1]))
assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, "the default action is back after main"
sys.exit(code)
"""


def test_sigterm_while_setting_up_ends_as_ctrl_c_does_and_removes_the_new_folder(setup, tmp_path):
    """SIGTERM before the trainer set its handler (``timeout --preserve-status 3.4 beit finetune ...``) killed the
    process silently, leaving an empty run folder; a Ctrl-C there printed a line and removed it. Now SIGTERM does
    as Ctrl-C: the line, naming the signal; the new folder removed; exit 143 (128 + SIGTERM)."""
    import json
    import subprocess
    import sys

    out = tmp_path / "x" / "run"
    args = _pretrain_args(setup, "--out", str(out))
    proc = subprocess.run([sys.executable, "-c", _SIGTERM_IN_SETUP, json.dumps(args)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(SRC)})
    assert proc.returncode == 143, (proc.returncode, proc.stderr[-3000:])
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "beit pretrain: interrupted by SIGTERM outside the training loop (while setting up, or after training while "
        f"writing its results); if checkpoints were written, beit pretrain {' '.join(args[1:])} --resume auto "
        "continues the run"), proc.stderr[-3000:]
    assert not (tmp_path / "x").exists()
    # under torchrun SIGTERM keeps its default action: torchrun's way to stop a rank (a Python handler waits for C++
    # code to return: a rank blocked in init_process_group ignored it until torchrun's SIGKILL, 30 s later)
    env = {**os.environ, "PYTHONPATH": str(SRC), "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    proc = subprocess.run([sys.executable, "-c", _SIGTERM_IN_SETUP, json.dumps(args)], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == -signal.SIGTERM and "interrupted" not in proc.stderr, (proc.returncode, proc.stderr)


def test_resuming_another_tasks_checkpoint_is_one_line_before_any_config_diff(setup, tmp_path, capsys):
    from beit.engine.checkpoint import FORMAT, save_checkpoint

    other = tmp_path / "finetune_last.pt"
    config = {"model": {"name": "beit_base_patch16_224", "num_classes": 10}, "data": {"path": "x", "mixup": 0.8},
              "train": {"lr": 4e-3, "layer_decay": 0.65}}
    save_checkpoint({"format": FORMAT, "version": 1, "task": "classification", "config": config, "step": 10,
                     "epoch": 1, "batch_in_epoch": 0, "model": {}, "optimizer": {}}, other)
    assert main(_pretrain_args(setup, "--out", str(tmp_path / "run"), "--resume", str(other))) == 1
    assert _err(capsys) == (f"beit pretrain: error: {other} is a classification checkpoint, not a pre-training "
                            "one: --resume (train.resume) continues a run of the same task")


def test_tokenizer_eval_of_a_training_checkpoint_is_one_line(setup, tmp_path, capsys):
    """beit tokenizer eval / encode given a .pt training checkpoint (the tokenizer's own, or another task's) said
    "not a safetensors file (header too large)"; now one line naming it and what to pass instead."""
    from beit.engine.checkpoint import FORMAT, save_checkpoint

    base = {"format": FORMAT, "version": 1, "step": 3, "epoch": 0, "batch_in_epoch": 0, "model": {},
            "optimizer": {}}
    own, other = tmp_path / "tok" / "last.pt", tmp_path / "pre" / "last.pt"
    save_checkpoint({**base, "task": "dVAE tokenizer"}, own)
    save_checkpoint({**base, "task": "pre-training"}, other)
    data = str(setup / "images")
    assert main(["tokenizer", "eval", "dvae", str(own), "--data", data]) == 1
    assert _err(capsys) == (f"beit tokenizer eval: error: {own} is the tokenizer's training checkpoint: pass the "
                            f"weights its training wrote beside it, {own.parent / 'dvae.safetensors'}")
    assert main(["tokenizer", "encode", "dvae", str(other), "--data", data, "--out", str(tmp_path / "ids")]) == 1
    assert _err(capsys) == (f"beit tokenizer encode: error: {other} is a pre-training checkpoint, not a dVAE "
                            "tokenizer one: beit finetune takes it as model=..., beit visualize shows its predictions")
    assert main(["tokenizer", "eval", "dvae", str(setup / "tok.safetensors"), "--data", data, "--img-size", "32",
                 "--out", str(tmp_path / "grid.png")]) == 0  # its weights: evaluated


@pytest.mark.slow
def test_sigterm_to_the_whole_process_group_saves_and_exits_143(setup, tmp_path):
    """As `timeout -s TERM` or scancel do: the training process and its DataLoader workers all get SIGTERM. The
    run finishes its step, writes its checkpoint, releases the folder, prints one line naming both and the
    resume command, exits 143, and leaves no process behind."""
    import re
    import subprocess
    import sys
    import time

    from beit.engine import load_checkpoint
    from beit.engine.logging import read_metrics

    out = tmp_path / "run"
    args = _pretrain_args(setup, "--out", str(out), "train.max_steps=100000", "train.num_workers=2",
                          "train.ckpt_every=100000")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen([sys.executable, "-m", "beit", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not any(r["step"] >= 3 for r in read_metrics(out / "metrics.jsonl")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    last = err.strip().splitlines()[-1]
    assert proc.returncode == 143, err[-3000:]
    m = re.fullmatch(r"beit pretrain: interrupted by SIGTERM after step (\d+); checkpoint of that step: "
                     r"(\S+); resume with: beit pretrain .* --resume auto", last)
    assert m, err[-3000:]
    step, ckpt = int(m.group(1)), m.group(2)
    assert ckpt == str(out / f"step_{step:07d}.pt") and load_checkpoint(out / "last.pt")["step"] == step
    assert not (out / ".lock").exists()
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):  # no DataLoader worker left in the group
        os.killpg(proc.pid, 0)


def test_an_unknown_option_names_the_command(capsys):
    """argparse said `beit: error: unrecognized arguments`, naming no command; now the command as typed and where
    its options are listed (exit 2, a usage error)."""
    assert main(["pretrain", "-c", "pretrain_cifar10_small", "--bogus"]) == 2
    assert _err(capsys) == "beit pretrain: error: unrecognized arguments: --bogus (see beit pretrain --help)"
    assert main(["tokenizer", "eval", "dvae", "x.safetensors", "--data", "d", "--num-workers", "0"]) == 2
    assert _err(capsys) == ("beit tokenizer eval: error: unrecognized arguments: --num-workers (see beit tokenizer "
                            "eval --help)")


# every command with an --out option, with the arguments it needs to parse (they are never read: the empty --out
# is refused first)
_OUT_ARGV = {
    "pretrain train": [], "classify train": [], "classify linprobe": [], "segment train": [], "layout train": [],
    "tokenizer train": [],
    "pretrain visualize": ["ck.pt"], "classify eval": ["ck.pt", "--data", "d"], "classify predict": ["ck.pt", "d"],
    "segment eval": ["ck.pt"], "segment predict": ["ck.pt", "d"], "layout eval": ["ck.pt"],
    "layout predict": ["ck.pt", "d"],
    "tokenizer eval": ["dvae", "tok.safetensors", "--data", "d"],
    "tokenizer encode": ["dvae", "tok.safetensors", "--data", "d"],
    "demo": [],
}


def _commands_with_out() -> set[str]:
    """The commands whose parser has an --out option (a positional ``out``, as tokenizer convert's, is not one)."""
    def walk(p, prefix: str) -> set[str]:
        found: set[str] = set()
        for a in p._actions:
            if a.dest == "out" and a.option_strings:
                found.add(prefix)
            for name, sub in (getattr(a, "choices", None) or {}).items() if a.nargs == "A..." else ():
                found |= walk(sub, f"{prefix} {name}".strip())
        return found

    return walk(build_parser(), "")


@pytest.mark.parametrize("full", sorted(_OUT_ARGV))
def test_an_empty_out_is_one_usage_error_for_every_command(full, tmp_path, monkeypatch, capsys):
    """``--out ''`` meant the default folder to eval / predict / visualize, the current folder or a config error
    elsewhere, and exit 1 to the demo: now every command refuses it the same way, naming the option (exit 2); and one of
    blanks only the same way (``--out "  "``: exit 1 from the demo before)."""
    monkeypatch.chdir(tmp_path)
    typed = next((s for s, ta in SHORT.items() if " ".join(ta) == full), full)
    for spelling in (["--out", ""], ["--out="], ["--out", "  "]):
        assert main([*typed.split(), *_OUT_ARGV[full], *spelling]) == 2
        blanks = " (blanks only)" if spelling[-1] == "  " else ""
        assert _err(capsys) == (f"beit {typed}: error: --out is empty{blanks}: give the path to write to, or omit "
                                f"--out for its default (see beit {typed} --help)")
    assert not list(tmp_path.iterdir())  # nothing written, no work started


def test_every_command_with_an_out_option_is_checked_for_an_empty_one():
    on_short = {" ".join(SHORT[c]) if c in SHORT else c for c in _commands_with_out()}
    assert on_short == set(_OUT_ARGV)  # tokenizer convert's positional out is not an option


def test_a_command_without_resume_is_not_told_to_resume(tmp_path) -> None:
    """Ctrl-C during the demo's pre-training ends in the trainer's account of the stop, without "resume with:
    beit demo ... --resume auto": ``beit demo`` has no --resume (that command would fail on it); run again, it
    starts over."""
    from beit.engine.trainer import TrainingInterrupted

    ckpt = tmp_path / "pretrain" / "step_0000048.pt"
    line = cli._interrupted_line(TrainingInterrupted(2, 48, ckpt), "beit demo", ["demo", "--out", str(tmp_path)])
    assert line == f"beit demo: interrupted by SIGINT after step 48; checkpoint of that step: {ckpt}"
    trained = cli._interrupted_line(TrainingInterrupted(2, 48, ckpt), "beit pretrain", ["pretrain", "-c", "x"],
                                    trains=True)
    assert trained.endswith("; resume with: beit pretrain -c x --resume auto")
