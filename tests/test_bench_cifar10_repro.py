"""benchmarks/cifar10_repro.sh: its two stages with a stand-in ``python3`` (the commands it would run, recorded)."""

from __future__ import annotations

import subprocess
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# stand-in for `python3 -m beit ...`: records its arguments (one a line, a command a block) and writes the files the
# script copies, converts and archives afterwards
FAKE_PYTHON = """#!/usr/bin/env bash
{ echo "== $3"; printf '%s\\n' "$@"; } >> "$FAKE_LOG"
d=
for a in "$@"; do case "$a" in train.output_dir=*) d=${a#train.output_dir=} ;; esac; done
case "$3" in
  tokenizer) mkdir -p "$d"; touch "$d/dvae.safetensors" "$d/tokenizer_metrics.json" "$d/metrics.jsonl" "$d/recon_grid.png" ;;
  pretrain) mkdir -p "$d/final"; touch "$d/metrics.jsonl" "$d/config.yaml" "$d/mim_panel.png" "$d/curves.png" ;;
  convert) mkdir -p "$5"; head -c 100 /dev/zero > "$5/model.safetensors"; touch "$5/config.json" ;;
  finetune) mkdir -p "$d/eval"; touch "$d/metrics.jsonl" "$d/config.yaml" "$d/curves.png" ;;
  linprobe) mkdir -p "$d"; touch "$d/linprobe.json" "$d/config.yaml" ;;
esac
"""


def _commands(log: Path) -> list[list[str]]:
    blocks = log.read_text().split("== ")[1:]
    return [b.splitlines() for b in blocks]


def test_both_stages_pass_paths_with_spaces_whole_and_archive_their_results(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python3"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    data, out_a, out_b, run = (tmp_path / n for n in ("data 'dir", "stage A", "stage B", "run dir"))
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "FAKE_LOG": str(tmp_path / "log"), "RUN": str(run),
           "WIDTH": "384", "HEADS": "6", "PRE_EXTRA": "train.batch_size=512", "FT_EPOCHS": "10"}
    script = str(REPO / "benchmarks" / "cifar10_repro.sh")
    a = subprocess.run(["bash", script, "A", str(data), str(out_a)], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=60)
    assert a.returncode == 0, a.stderr
    assert (out_a / "dvae.safetensors").is_file() and (out_a / "encoder" / "model.safetensors").is_file()
    with tarfile.open(out_a / "stageA_metrics.tgz") as t:
        assert sum(n.endswith("mim_panel.png") for n in t.getnames()) == 1
    b = subprocess.run(["bash", script, "B", str(data), str(out_b), str(out_a)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60)
    assert b.returncode == 0, b.stderr
    # each command named by what it runs, and the scratch arm's runs (random init) apart from the pre-trained ones
    cmds = {c[0] + ("_scratch" if any(w.endswith(("/ft_scratch", "/lp_scratch")) for w in c) else ""): c
            for c in _commands(tmp_path / "log")}
    assert sorted(cmds) == ["convert", "finetune", "finetune_scratch", "linprobe", "linprobe_scratch", "pretrain",
                            "tokenizer"]
    assert f"model={out_a}/encoder" in cmds["linprobe"] and f"data.train_dir={data}/train" in cmds["linprobe"]
    assert "model_overrides={patch_size: 4, embed_dim: 384, depth: 12, num_heads: 6}" in cmds["linprobe_scratch"]
    assert f"data.path={data}/train" in cmds["pretrain"] and "train.batch_size=512" in cmds["pretrain"]
    assert f"tokenizer.path={run}/tokenizer/dvae.safetensors" in cmds["pretrain"]
    assert "model.embed_dim=384" in cmds["pretrain"] and "train.epochs=40" in cmds["pretrain"]
    ft, scratch = cmds["finetune"], cmds["finetune_scratch"]
    assert f"model={out_a}/encoder" in ft and f"data.val_dir={data}/test" in ft and "train.epochs=10" in ft
    assert f"train.output_dir={run}/ft_scratch" in scratch and "model_overrides.embed_dim=384" in scratch
    assert "model_overrides.num_heads=6" in scratch and "train.warmup_epochs=1" in scratch
    with tarfile.open(out_b / "stageB_results.tgz") as t:
        names = t.getnames()
    assert any(n.endswith("ft_scratch/curves.png") for n in names) and any(n.endswith("linprobe.json") for n in names)


def test_equal_time_plan_records_each_call_and_fits_the_schedule_to_the_seconds_left(tmp_path):
    """benchmarks/cifar10_call_plan.py (cifar10_call.sh ARM_SECONDS): a call's pace and start-up come from its log's
    eval lines; the next call's train.epochs is what the arm's remaining seconds hold, with the warm-up pinned; a
    spent arm or a finished run is refused."""
    import sys

    plan = [sys.executable, str(REPO / "benchmarks" / "cifar10_call_plan.py")]
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("train:\n  epochs: 275\n  warmup_epochs: 27.0\n")
    first = subprocess.run([*plan, str(run), "1171", "590", "275"], capture_output=True, text=True, check=True)
    assert first.stdout.split() == ["275", "-", "590"]  # no call yet: the guess, this call's seconds
    # call 1: 100 epochs, an eval every 5 s from 00:01:30 (across no midnight), 590 s in all
    log = tmp_path / "log"
    log.write_text("".join(f"00:{(90 + 5 * e) // 60:02d}:{(90 + 5 * e) % 60:02d} eval step {97 * e} ep {e}: loss 1, "
                           "top1 50\n" for e in range(1, 101)))
    rec = subprocess.run([*plan, "--record", str(run), str(log), "590", "3"], capture_output=True, text=True,
                         check=True)
    assert "epoch 0 -> 100, 5.00 s an epoch, start-up 90 s" in rec.stdout
    assert (run / "calls.tsv").read_text() == "590\t100\t5.000\t90\n"
    second = subprocess.run([*plan, str(run), "1171", "590", "275"], capture_output=True, text=True, check=True)
    # 581 s left in one call, a resumed start-up of 45 s (half the cold one) and the 15-s margin: 104 more epochs
    assert second.stdout.split() == ["204", "27.0", "581"]
    (run / "calls.tsv").write_text("590\t100\t5.000\t90\n590\t204\t5.000\t60\n")
    spent = subprocess.run([*plan, str(run), "1171", "590", "275"], capture_output=True, text=True)
    assert spent.returncode == 1 and "are spent" in spent.stderr
    (run / "config.yaml").write_text("train:\n  epochs: 204\n  warmup_epochs: 27.0\n")
    done = subprocess.run([*plan, str(run), "3000", "590", "275"], capture_output=True, text=True)
    assert done.returncode == 1 and "has finished its 204 epochs" in done.stderr


def test_equal_time_plan_counts_a_call_whose_log_has_no_two_evals(tmp_path):
    """cifar10_call.sh records each call with `|| true`: a call that crashed or stopped before two evals was refused
    ('no pace to record') and its seconds never reached calls.tsv, so the arm ran over ARM_SECONDS (the next call
    planned as if they were never spent, or as the first call again)."""
    import sys

    plan = [sys.executable, str(REPO / "benchmarks" / "cifar10_call_plan.py")]
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("train:\n  epochs: 275\n  warmup_epochs: 27.0\n")
    (tmp_path / "none").write_text("Traceback (most recent call last):\n")
    subprocess.run([*plan, "--record", str(run), str(tmp_path / "none"), "300", "3"], check=True, capture_output=True)
    assert (run / "calls.tsv").read_text() == "300\t0\t0.000\t0\n"
    again = subprocess.run([*plan, str(run), "1171", "590", "275"], capture_output=True, text=True, check=True)
    assert again.stdout.split() == ["275", "-", "590"]  # still the first guess, the 300 s counted
    log = tmp_path / "log"
    clock = [(86390 + 5 * e) % 86400 for e in range(1, 101)]  # an eval every 5 s from 23:59:55, across midnight
    log.write_text("".join(f"{t // 3600:02d}:{t // 60 % 60:02d}:{t % 60:02d} eval step {e} ep {e}: top1 1\n"
                           for e, t in zip(range(1, 101), clock)))
    subprocess.run([*plan, "--record", str(run), str(log), "590", "3"], check=True, capture_output=True)
    (tmp_path / "one").write_text("23:00:00 eval step 1 ep 101: top1 1\n")  # one eval, then the call died
    subprocess.run([*plan, "--record", str(run), str(tmp_path / "one"), "60", "3"], check=True, capture_output=True)
    assert (run / "calls.tsv").read_text().splitlines()[1:] == ["590\t100\t5.000\t90", "60\t101\t0.000\t0"]
    last = subprocess.run([*plan, str(run), "1500", "590", "275"], capture_output=True, text=True, check=True)
    # 550 s left in one call, with the pace and start-up (90 s) of the last call that measured them: 89 more epochs
    assert last.stdout.split() == ["190", "27.0", "550"]


@pytest.mark.parametrize("args,named", [
    (["1628s", "590", "275"], "ARM_SECONDS is '1628s'"), (["-1628", "590", "275"], "ARM_SECONDS is '-1628'"),
    (["nan", "590", "275"], "ARM_SECONDS is 'nan'"), (["1628", "abc", "275"], "CALL_SECONDS is 'abc'"),
    (["1628", "590", "-5"], "FIRST_EPOCHS is '-5'"), (["1628", "590", "2.5"], "FIRST_EPOCHS is '2.5'"),
    (["1_628", "590", "275"], "ARM_SECONDS is '1_628'"), (["1628", "590", "2_75"], "FIRST_EPOCHS is '2_75'"),
    (["--record", "LOG", "59x", "3"], "CALL_SECONDS is '59x'"), (["--record", "LOG", "590", "-3"],
                                                                  "SETUP_SECONDS is '-3'"),
])
def test_equal_time_plan_names_a_bad_argument_in_one_line(tmp_path, args, named):
    """ARM_SECONDS=1628s (or a seconds-left / epochs argument not a number) ended the plan in a ValueError
    traceback; a negative one was taken (a negative call length printed for cifar10_call.sh, or -5 epochs)."""
    import sys

    (tmp_path / "LOG").write_text("")
    if args[0] == "--record":
        args = ["--record", str(tmp_path / "run"), str(tmp_path / "LOG"), *args[2:]]
    else:
        args = [str(tmp_path / "run"), *args]
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "cifar10_call_plan.py"), *args],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and named in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "calls.tsv").exists()


def test_equal_time_plan_records_a_call_whose_log_and_run_were_never_written(tmp_path):
    """A call whose arm never started (the sweep refused it) has no log and no run folder: --record ended in a
    FileNotFoundError traceback, cifar10_call.sh's `|| true` went on, and the call's seconds were never counted."""
    import sys

    run = tmp_path / "runs" / "arm"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "cifar10_call_plan.py"), "--record", str(run),
                        str(tmp_path / "log_arm"), "120", "100"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (run / "calls.tsv").read_text() == "120\t0\t0.000\t0\n"


@pytest.mark.parametrize("env,named", [({"SECONDS_LEFT": "590s"}, "SECONDS_LEFT is '590s'"),
                                       ({"SECONDS_LEFT": "-5"}, "SECONDS_LEFT is '-5'"),
                                       ({"EPOCHS": "abc"}, "EPOCHS is 'abc'"),
                                       ({"ARM_SECONDS": "1628s"}, "ARM_SECONDS is '1628s'"),
                                       ({"ARM_SECONDS": "0"}, "ARM_SECONDS is '0'"),
                                       ({"SECONDS_LEFT": ""}, "SECONDS_LEFT is ''"),
                                       ({"SECONDS_LEFT": "99999999999999999999"}, "from 1 to 999999"),
                                       ({"OUT": ""}, "OUT is not set"),
                                       ({"ARM_SECONDS": "1628", "EPOCHS": ""}, "ARM_SECONDS needs EPOCHS"),
                                       ({"SPEC": ". train.lr=5e-4"}, "arm name '.'"),
                                       ({"SPEC": ".. train.lr=5e-4"}, "arm name '..'")])
def test_a_device_call_refuses_a_bad_number_before_its_setup(tmp_path, env, named):
    """cifar10_call.sh took SECONDS_LEFT / EPOCHS / ARM_SECONDS unchecked: the wheels installed and CIFAR-10
    extracted (a device call's minutes), then bash's arithmetic or the plan failed. Now one line, exit 2, nothing run;
    likewise an unset OUT or SECONDS_LEFT (bash's own message, exit 1), ARM_SECONDS without EPOCHS (refused after the
    setup), an arm named '.' or '..'.
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python3"
    fake.write_text('#!/usr/bin/env bash\necho "$@" >> "$FAKE_LOG"\n')
    fake.chmod(0o755)
    base = {"PATH": f"{bin_dir}:/usr/bin:/bin", "FAKE_LOG": str(tmp_path / "log"), "OUT": str(tmp_path),
            "SECONDS_LEFT": "590", "EPOCHS": "275"}
    env = {**base, **env}
    spec = env.pop("SPEC", "arm train.lr=5e-4")  # '.' / '..' made the run folder runs/sweep itself, or runs/
    r = subprocess.run(["bash", str(REPO / "benchmarks" / "cifar10_call.sh"), spec], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and named in r.stderr, r.stderr
    assert not (tmp_path / "log").exists()  # no pip install, no plan
