"""Config: YAML + dotted overrides into nested dataclass schemas; bad input fails naming the key."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from beit.engine.config import ConfigError, TrainConfig, load_config, save_config, to_dict


@dataclass
class ModelCfg:
    depth: int = 12
    name: str = "beit_base_patch16_224"

    def validate(self) -> None:
        if self.depth < 1:
            raise ConfigError("depth", f"must be >= 1, got {self.depth}")


@dataclass
class PretrainCfg:
    train: TrainConfig = field(default_factory=lambda: TrainConfig(betas=(0.9, 0.98), lr=1.5e-3))
    model: ModelCfg = field(default_factory=ModelCfg)


def test_defaults_yaml_and_overrides(tmp_path):
    yaml = tmp_path / "run.yaml"
    yaml.write_text("train:\n  epochs: 5\n  lr: 2.0e-3\nmodel:\n  depth: 6\n")
    cfg = load_config(PretrainCfg, yaml, ["train.lr=3e-4", "--model.name=tiny", "train.max_steps=null",
                                          "train.clip_grad=3.0", "train.betas=[0.9,0.95]"])
    assert isinstance(cfg, PretrainCfg) and isinstance(cfg.train, TrainConfig)
    assert cfg.train.epochs == 5 and cfg.model.depth == 6  # from the file
    assert cfg.train.lr == 3e-4 and cfg.model.name == "tiny"  # overrides win over the file
    assert cfg.train.max_steps is None and cfg.train.clip_grad == 3.0
    assert tuple(cfg.train.betas) == (0.9, 0.95)
    assert load_config(PretrainCfg).train.betas == (0.9, 0.98)  # task-specific defaults kept


def test_instance_schema_and_roundtrip(tmp_path):
    cfg = load_config(TrainConfig(epochs=7), None, ["seed=3"])
    assert cfg.epochs == 7 and cfg.seed == 3
    save_config(load_config(PretrainCfg, None, ["model.depth=2"]), tmp_path / "config.yaml")
    again = load_config(PretrainCfg, tmp_path / "config.yaml")
    assert again.model.depth == 2 and again.train.betas == (0.9, 0.98)
    assert list(to_dict(again)["train"]["betas"]) == [0.9, 0.98]
    assert "betas:\n  - 0.9\n  - 0.98" in (tmp_path / "config.yaml").read_text()


@pytest.mark.parametrize("override,key", [
    (["train.lrr=1e-3"], "train.lrr"),                 # unknown key
    (["modle.depth=3"], "modle"),                      # unknown section
    (["train.lr=fast"], "train.lr"),                   # wrong type
    (["model.depth=1.5"], "model.depth"),              # float into int
    (["train.betas=[0.9,0.98,0.5]"], "train.betas"),   # wrong length
    (["train.lr=-1"], "train.lr"),                     # bad value
    (["train.schedule=linear"], "train.schedule"),
    (["train.precision=fp16"], "train.precision"),
    (["train.layer_decay=1.5"], "train.layer_decay"),
    (["train.max_steps=10", "train.warmup_steps=20"], "train.warmup_steps"),  # warmup longer than training
    (["train.epochs=2", "train.warmup_epochs=3"], "train.warmup_epochs"),
    (["model.depth=0"], "model.depth"),                # a task's own validate()
    (["train.lr"], "train.lr"),                        # not key=value
])
def test_bad_input_names_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(PretrainCfg, None, override)
    assert info.value.key == key
    assert f"'{key}'" in str(info.value)


def test_bad_yaml_key_and_missing_file(tmp_path):
    yaml = tmp_path / "run.yaml"
    yaml.write_text("train:\n  epoch: 5\n")
    with pytest.raises(ConfigError, match="train.epoch"):
        load_config(PretrainCfg, yaml)
    with pytest.raises(ConfigError, match="not found"):
        load_config(PretrainCfg, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"'train\.betas': '\{a: 1\}': another kind of value"):  # was a TypeError
        load_config(PretrainCfg, None, ["train.betas={a: 1}"])
    with pytest.raises(ConfigError, match=r"'train\.betas': a list is expected here, e\.g\. train\.betas=\[a,b\]"):
        load_config(PretrainCfg, None, ["train.betas=0.9"])
    (tmp_path / "map.yaml").write_text("train:\n  betas: {a: 1}\n")
    with pytest.raises(ConfigError, match=r"map\.yaml: a key holds another kind of value"):
        load_config(PretrainCfg, tmp_path / "map.yaml")
    ckpt = tmp_path / "last.pt"  # -c and the checkpoint mixed up: was a bare 'utf-8' codec error
    ckpt.write_bytes(b"PK\x03\x04" + bytes(range(128, 256)) * 4)
    with pytest.raises(ConfigError, match=r"last\.pt: not a YAML config \(binary data"):
        load_config(PretrainCfg, ckpt)
    (tmp_path / "u16.yaml").write_text("train:\n  epochs: 5\n", encoding="utf-16")  # Windows editors' "Unicode"
    with pytest.raises(ConfigError, match=r"u16\.yaml: a UTF-16 text file; save it as UTF-8"):
        load_config(PretrainCfg, tmp_path / "u16.yaml")


def test_warmup_epochs_that_are_already_longer_than_max_steps_fail_at_load():
    """An epoch is at least one step: warmup_epochs=20 (a preset's) with train.max_steps=10 cannot run, and was
    refused only by the trainer, after the data was read. Now when the config is loaded; a warmup that only the
    data's size makes too long is the engine's check_schedule (tested with the tasks)."""
    with pytest.raises(ConfigError) as info:
        load_config(PretrainCfg, None, ["train.max_steps=10", "train.warmup_epochs=20"])
    assert str(info.value) == ("config key 'train.warmup_epochs': warmup (20.0 epochs, at least 20 steps) must be "
                               "shorter than max_steps (10): lower train.warmup_epochs, or set train.warmup_steps")
    load_config(PretrainCfg, None, ["train.max_steps=10", "train.warmup_epochs=20", "train.warmup_steps=5"])
    load_config(PretrainCfg, None, ["train.max_steps=30", "train.warmup_epochs=20"])  # may fit: the data says


def test_an_empty_override_is_empty_text_for_a_text_key_and_named_elsewhere():
    """`data.val_ann=` said "Incompatible value 'None' for field of type 'str'": YAML reads an empty value as null,
    which a text key does not take. For a text key it is now the empty text, a key that takes null still gets null,
    and any other key's message says the value is empty."""
    cfg = load_config(PretrainCfg, None, ["model.name=", "train.max_steps=", "train.resume="])
    assert cfg.model.name == "" and cfg.train.max_steps is None and cfg.train.resume == ""
    with pytest.raises(ConfigError, match=r"^config key 'model\.depth': an empty value \(read as null\), which it does "
                                          r"not take: give a value \(model\.depth=\.\.\.\)"):
        load_config(PretrainCfg, None, ["model.depth="])
    with pytest.raises(ConfigError, match=r"'train\.betas': an empty value"):
        load_config(PretrainCfg, None, ["train.betas="])


def test_errors_with_their_own_init_survive_pickle() -> None:
    """An error raised in another process (a ProcessPoolExecutor worker: ``beit demo``'s second lane) comes back
    as the same error: pickle rebuilt these with their message alone and failed, which broke that pool instead and
    hid the error."""
    import pickle
    from pathlib import Path

    from beit.engine.trainer import TrainingDivergedError, TrainingInterrupted

    for error in (ConfigError("train.lr", "must be > 0, got -1"), ConfigError("", "a message"),
                  TrainingInterrupted(15, 40, Path("run/step_0000040.pt")),
                  TrainingInterrupted(2, 41, Path("run/step_0000040.pt"), 40, at_once=True),
                  TrainingDivergedError(7, {"loss": float("inf")}, None, reason="its update")):
        again = pickle.loads(pickle.dumps(error))
        assert type(again) is type(error) and again.args == error.args and str(again) == str(error)
        assert vars(again) == vars(error)
