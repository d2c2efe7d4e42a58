"""[shape] every task package the same shape: lazy ``__init__``, old import paths kept, files alike."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
TASKS = ("classify", "pretrain", "segmentation", "layout", "tokenizer")

# Every public name each task module defined before the packages were split into config / model / data /
# train (beit 0.x, commit cdaaf96): each must stay importable from its package, ``beit.tasks.<pkg>``.
OLD_NAMES: dict[str, list[str]] = {
    "classify.evaluate": ["ClassificationMeter", "TRAIN_CKPT_FORMAT", "build_preprocess", "evaluate_checkpoint",
                          "evaluate_model", "load_classifier", "make_eval_fn", "predict_folder",
                          "save_confusion_png", "write_report"],
    "classify.finetune": ["DataConfig", "FinetuneConfig", "SHAPE_FIELDS", "build_datasets", "build_device_train",
                          "build_model", "build_train_transform", "check_num_classes", "check_overrides_fit",
                          "finetune", "is_preset", "make_step_fn", "scaled_train_config", "source_config"],
    "classify.linprobe": ["LinprobeConfig", "ProbeHeads", "build_encoder", "extract_features", "linprobe",
                          "parse_blocks"],
    "pretrain.train": ["IMAGENET_MEAN", "IMAGENET_STD", "PretrainConfig", "PretrainDataConfig", "PretrainModelConfig",
                       "PretrainTokenizerConfig", "SHAPE_KEYS", "build_dataset", "build_device_data", "build_model",
                       "build_tokenizer", "make_step_fn", "mim_panel", "model_config", "model_overrides", "pretrain",
                       "shard_urls", "validate"],
    "segmentation.data": ["ADE20K_CLASSES", "BadSampleError", "CAMVID_CLASSES", "SegEvalTransform",
                          "SegTrainTransform", "SegmentationDataset", "collate_eval", "folder_pairs", "list_pairs",
                          "load_class_names", "photometric_distortion", "read_mask"],
    "segmentation.infer": ["colorize", "inference", "make_palette", "overlay", "save_overlay", "slide_logits",
                           "whole_logits"],
    "segmentation.metrics": ["ConfusionMatrix", "format_table", "metrics_from_confusion"],
    "segmentation.model": ["BeitSegmenter", "ConvBNReLU", "FCNHead", "FeaturePyramid", "PPM", "UperHead",
                           "default_out_indices", "segmentation_loss"],
    "segmentation.train": ["IMAGENET_MEAN_255", "IMAGENET_STD_255", "SHAPE_KEYS", "SegDataConfig", "SegModelConfig",
                           "SegTestConfig", "SegmentConfig", "build_backbone", "build_datasets", "build_model",
                           "class_names", "config_from_checkpoint", "evaluate", "load_segmenter", "make_eval_fn",
                           "make_step_fn", "predict", "train", "write_overlays"],
    "layout.data": ["CROP_RESIZE", "CocoLayoutDataset", "DIT_MIN_SIZES", "LayoutDataError", "RepeatedDataset",
                    "collate", "split_image_ids", "write_synthetic_pages"],
    "layout.evaluate": ["PUBLAYNET_REFERENCE", "REFERENCES", "evaluate_coco", "evaluate_model", "format_table",
                        "predictions_to_coco", "run_inference"],
    "layout.model": ["BeitPyramidBackbone", "DetectorConfig", "LayoutDetector", "build_detector",
                     "default_out_indices"],
    "layout.predict": ["IMAGE_SUFFIXES", "draw_detections", "find_pages", "predict_pages"],
    "layout.train": ["LayoutConfig", "LayoutDataConfig", "build_datasets", "build_val_dataset", "config_from_dict",
                     "load_detector", "make_eval_fn", "make_visualize_fn", "step_fn", "train"],
    "tokenizer.train": ["TokenizerTrainConfig", "build_datasets", "evaluate_tokenizer", "main", "train_tokenizer",
                        "write_recon_grid"],
}
SPLIT_AWAY = {"classify.finetune"}


@pytest.mark.parametrize("old", sorted(OLD_NAMES))
def test_every_old_name_is_importable_from_its_package(old: str) -> None:
    pkg_name, _, module = old.partition(".")
    pkg = importlib.import_module(f"beit.tasks.{pkg_name}")
    # classify/finetune.py was split into config / model / data / train: ``classify.finetune`` is the function
    old_module = None if old in SPLIT_AWAY else importlib.import_module(f"beit.tasks.{old}")
    for name in OLD_NAMES[old]:
        value = getattr(pkg, name)
        if old_module is not None and hasattr(old_module, name):
            assert getattr(old_module, name) is value, f"beit.tasks.{old}.{name} is not beit.tasks.{pkg_name}.{name}"
    with pytest.raises(AttributeError, match=f"module 'beit.tasks.{pkg_name}' has no attribute 'no_such_name'"):
        _ = pkg.no_such_name


@pytest.mark.parametrize("pkg", TASKS)
def test_the_package_table_names_real_objects(pkg: str) -> None:
    """Each package's ``__all__`` equals its lazy table, and each entry is found in the module it names."""
    mod = importlib.import_module(f"beit.tasks.{pkg}")
    assert sorted(mod.__all__) == sorted(mod._WHERE), pkg
    for name, where in mod._WHERE.items():
        assert name in vars(importlib.import_module(f"beit.tasks.{pkg}.{where}")), f"{pkg}.{where} lacks {name}"


def test_packages_and_the_cli_import_no_trainer() -> None:
    """``import beit.tasks.<each>`` and ``beit.cli`` (what ``beit --help`` reads) leave the engine's trainer out."""
    code = ("import sys\n"
            f"for name in {['beit.cli', *(f'beit.tasks.{t}' for t in TASKS)]!r}:\n"
            "    __import__(name)\n"
            "print(sorted(m for m in sys.modules if m in ('beit.engine.trainer', 'beit.engine')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_beit_help_loads_no_torch_and_the_root_names_still_resolve() -> None:
    """``beit --help`` (the parser) imports neither torch nor timm: the root package's names are lazy (PEP 562);
    ``beit.load_model`` etc. still resolve, to the same objects as their rooms'."""
    code = ("import sys\n"
            "from beit.cli import build_parser\n"
            "build_parser().format_help()\n"
            "print(sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules))\n"
            "import beit, beit.interop, beit.models\n"
            "assert beit.load_model is beit.interop.load_model and beit.Beit is beit.models.Beit\n"
            "assert set(beit.__all__) <= set(dir(beit))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize(("pkg", "name"), [("segmentation", "train"), ("layout", "train"), ("classify", "linprobe")])
def test_a_function_keeps_its_name_next_to_its_module(pkg: str, name: str) -> None:
    """``beit.tasks.<pkg>.<name>`` is the function even after its module of the same name was imported."""
    module = importlib.import_module(f"beit.tasks.{pkg}.{name}")  # binds the submodule: must not hide the function
    value = getattr(importlib.import_module(f"beit.tasks.{pkg}"), name)
    assert callable(value) and not isinstance(value, type(module)) and value is getattr(module, name)


def test_wants_device_path_names_the_key() -> None:
    """One reading of ``data.device`` for classify and pretrain: the data room's ValueError as a ConfigError."""
    from beit.engine.config import ConfigError
    from beit.tasks.device_data import wants_device_path

    assert wants_device_path("auto", "cpu") is False and wants_device_path("cpu", "cuda") is False
    with pytest.raises(ConfigError) as err:
        wants_device_path("tpu", "cpu")
    assert str(err.value) == "config key 'data.device': must be auto | cpu | gpu | batched, got 'tpu'"


@pytest.mark.parametrize(("run", "message"), [
    ("finetune", "config key 'model': is not set: a preset name (from scratch) or a checkpoint to fine-tune"),
    ("linprobe", "config key 'model': is not set: the checkpoint to probe"),
])
def test_fine_tuning_and_probing_start_alike(tmp_path: Path, run: str, message: str) -> None:
    """One start for ``finetune`` and ``linprobe`` (classify.train.begin_run): validate, log, refuse a missing model."""
    from beit.engine.config import ConfigError, TrainConfig
    from beit.tasks import classify

    schema = classify.FinetuneConfig if run == "finetune" else classify.LinprobeConfig
    cfg = schema(model="", train=TrainConfig(output_dir=str(tmp_path / "run"), layer_decay=1.0))
    with pytest.raises(ConfigError) as err:
        getattr(classify, run)(cfg)
    assert str(err.value) == message


def _task_configs() -> dict[str, object]:
    """A default config of every task that trains through the engine, by the kind ``checkpoint_task`` names."""
    from beit.tasks import classify, layout, pretrain, segmentation, tokenizer

    return {"classification": classify.FinetuneConfig(model="beit_tiny_patch16_224"),
            "linear probing": classify.LinprobeConfig(model="runs/pt/final"),
            "pre-training": pretrain.PretrainConfig(), "segmentation": segmentation.SegmentConfig(),
            "layout detection": layout.LayoutConfig(),
            "dVAE tokenizer": tokenizer.TokenizerTrainConfig(data_dir="imgs")}


def test_checkpoint_task_reads_every_tasks_stored_config(tmp_path: Path) -> None:
    """One reading of "which task wrote this checkpoint" for every task: from the run config it stores (as the
    trainer stores it, ``to_dict``); a checkpoint of another task is one line naming both tasks, the same
    TaskMismatchError a resume of another task's checkpoint raises (one check, ``check_checkpoint_task``)."""
    from beit.engine.checkpoint import FORMAT, save_checkpoint
    from beit.engine.config import to_dict
    from beit.engine.rundir import TaskMismatchError
    from beit.tasks.backbone_config import TASK_KINDS, checkpoint_task, stored_task, task_config_from_checkpoint
    from beit.tasks.segmentation import SegmentConfig

    configs = _task_configs()
    assert sorted(configs) == sorted(TASK_KINDS)
    for kind, cfg in configs.items():
        assert checkpoint_task(to_dict(cfg)) == kind
    assert checkpoint_task({}) is None and checkpoint_task(None) is None and checkpoint_task({"x": 1}) is None
    path = tmp_path / "last.pt"
    save_checkpoint({"format": FORMAT, "version": 1, "model": {}, "config": to_dict(configs["pre-training"])}, path)
    with pytest.raises(TaskMismatchError) as err:
        task_config_from_checkpoint(SegmentConfig, "segmentation", path)
    assert str(err.value) == (f"{path} is a pre-training checkpoint, not a segmentation one: beit finetune takes it as "
                              "model=..., beit visualize shows its predictions")
    # the task a checkpoint records wins over its config's shape; a name this reading does not know is ignored
    save_checkpoint({"format": FORMAT, "version": 1, "model": {}, "config": {}, "task": "classification"}, path)
    with pytest.raises(TaskMismatchError, match="is a classification checkpoint, not a segmentation one: beit "
                                                "evaluate and beit predict take it$"):
        task_config_from_checkpoint(SegmentConfig, "segmentation", path)
    save_checkpoint({"format": FORMAT, "version": 1, "model": {}, "task": "segmentation (v9)",
                     "config": to_dict(SegmentConfig())}, path)
    assert stored_task({"task": "segmentation (v9)", "config": to_dict(SegmentConfig())}) == "segmentation"
    assert stored_task({"task": "layout detection", "config": to_dict(SegmentConfig())}) == "layout detection"
    assert stored_task({"task": "?"}) is None and stored_task({}) is None
    cfg = task_config_from_checkpoint(SegmentConfig, "segmentation", path)[0]
    assert cfg.test.window(cfg.data.crop_size) == (512, 341)  # the stored config read back: its defaults
