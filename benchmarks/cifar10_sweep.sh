#!/usr/bin/env bash
# Issue [proof]: fine-tuning recipes on CIFAR-10 side by side on one GPU (e.g. tuning the from-scratch arm), each a
# `beit finetune -c finetune_cifar10_small` run with its own overrides; a table of the arms' top-1 at the end.
#   bash benchmarks/cifar10_sweep.sh <cifar_dir> <out_dir> 'NAME KEY=VALUE ...' ['NAME KEY=VALUE ...' ...]
# e.g. EPOCHS=60 bash benchmarks/cifar10_sweep.sh /tmp/cifar $OUT 'lr1e-3 train.lr=1e-3' 'lr2e-3 train.lr=2e-3'
# <cifar_dir> holds the extracted train/ and test/ class folders. Every arm starts from the preset (from scratch: the
# BEiT-Tiny widths, 4-px patches) plus: no layer decay (train.layer_decay=1.0: every block is random), EPOCHS (100) with
# a tenth of them warmup, compile on, data in memory, and ENC (default: the 21M encoder of RESULTS 2, 384 wide, 6 heads;
# ENC= for the preset's 5.4M). An arm's own KEY=VALUE words come last and win; a model=<encoder dir> word fine-tunes a
# pre-trained encoder instead. LIMIT (seconds, each arm): the run is stopped with SIGTERM, saves a checkpoint, and the
# same command run again (same machine: the runs live in RUN, default runs/sweep) continues it (train.resume=auto).
# Logs: <out_dir>/log_NAME; the table: <out_dir>/sweep.tsv (name, epochs done, last top-1, best top-1, median img/s).
set -euo pipefail
[ $# -ge 3 ] || { echo "usage: cifar10_sweep.sh <cifar_dir> <out_dir> 'NAME KEY=VALUE ...' [...]" >&2; exit 2; }
data=$1; out=$2; shift 2
run=${RUN:-runs/sweep}
EPOCHS=${EPOCHS:-100}
read -r -a enc <<< "${ENC-model_overrides.embed_dim=384 model_overrides.num_heads=6}"
names=()
for spec in "$@"; do  # every arm checked before any starts
  read -r -a words <<< "$spec"
  name=${words[0]:-}
  [[ "$name" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || {  # not . or .. (the run folder would be $run itself, or above)
    echo "arm name '$name': letters, digits, . _ - (a letter or digit first)" >&2; exit 2; }
  for n in "${names[@]}"; do [ "$n" != "$name" ] || { echo "arm name '$name' given twice" >&2; exit 2; }; done
  names+=("$name")
done
mkdir -p "$out" "$run"
for spec in "$@"; do
  read -r -a words <<< "$spec"
  name=${words[0]}
  lim=(); [ -n "${LIMIT:-}" ] && lim=(timeout "$LIMIT")
  ( "${lim[@]}" python3 -m beit finetune -c finetune_cifar10_small data.train_dir="$data/train" data.val_dir="$data/test" \
      train.output_dir="$run/$name" train.compile=true train.resume=auto train.layer_decay=1.0 train.epochs="$EPOCHS" \
      train.warmup_epochs=$(( EPOCHS / 10 )) "${enc[@]}" "${words[@]:1}" > "$out/log_$name" 2>&1 \
    && echo "[sweep] $name finished" >> "$out/log_$name" \
    || echo "[sweep] $name stopped (exit $?)" >> "$out/log_$name" ) &
  sleep 3  # the compiles a little apart
done
wait
printf "name\tepochs\tlast_top1\tbest_top1\tmedian_img_s\n" > "$out/sweep.tsv"
for name in "${names[@]}"; do
  python3 - "$run/$name/metrics.jsonl" "$name" >> "$out/sweep.tsv" <<'PY'
import json, statistics, sys
path, name = sys.argv[1], sys.argv[2]
try:
    rows = [json.loads(line) for line in open(path)]
except OSError:
    rows = []
evals = [r for r in rows if r.get("split") == "eval" and "top1" in r]
ips = [r["img_per_s"] for r in rows if r.get("split") == "train" and "img_per_s" in r]
last = f"{evals[-1]['top1']:.2f}" if evals else "-"
best = f"{max(r['top1'] for r in evals):.2f}" if evals else "-"
epochs = evals[-1].get("epoch", "-") if evals else "-"
print(f"{name}\t{epochs}\t{last}\t{best}\t{statistics.median(ips):.0f}" if ips else f"{name}\t{epochs}\t{last}\t{best}\t-")
PY
done
if command -v column >/dev/null; then column -t -s $'\t' "$out/sweep.tsv"; else cat "$out/sweep.tsv"; fi  # no column(1) on the GPU machine
