#!/usr/bin/env bash
# Issue [proof] (tokenizer part): codebook use vs reconstruction of the dVAE tokenizer, one `beit tokenizer
# train` per arm, only the regulariser changed: model.kl_weight (KL(q || uniform) at every position) and
# model.usage_weight (KL(batch-mean q || uniform): even use of the codebook, positions left sharp).
# Prints one row per arm: held-out PSNR, codebook perplexity (of the vocabulary), codes used.
#
#   bash benchmarks/tokenizer_usage.sh DATA_DIR OUT [ARMS]                 # ARMS: "name:kl:usage ..."
#   SIZE=small bash benchmarks/tokenizer_usage.sh .carry/data/cifar10/train /tmp/tokexp    # 2-core CPU, ~3 min an arm
#   SIZE=preset bash benchmarks/tokenizer_usage.sh /tmp/cifar/train $OUT/tok                # GPU: tokenizer_cifar10 as shipped
#
# SIZE=small: vocabulary 512, width 64, 1 residual block, STEPS (500) steps of 64 images, no compile (a CPU proxy);
# SIZE=preset: the shipped tokenizer_cifar10 preset (vocabulary 1024, width 128, 2 blocks) for STEPS steps.
# Arms run one after another (PARALLEL=2 runs two at a time, one thread each, for a 2-core machine).
set -euo pipefail
DATA=${1:?usage: tokenizer_usage.sh DATA_DIR OUT [ARMS]}
OUT=${2:?usage: tokenizer_usage.sh DATA_DIR OUT [ARMS]}
ARMS=${3:-"base:0:0 kl0.03:0.03:0 usage0.01:0:0.01 usage0.1:0:0.1"}
SIZE=${SIZE:-small}
STEPS=${STEPS:-$([ "$SIZE" = small ] && echo 500 || echo 3000)}
PARALLEL=${PARALLEL:-1}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
if [ "$SIZE" = small ]; then
  ARGS=(model.vocab_size=512 model.hidden=64 model.num_res_blocks=1 model.codebook_dim=64
        model.temperature_anneal_steps=$STEPS train.max_steps=$STEPS train.batch_size=64 train.num_workers=0
        train.warmup_steps=25 train.compile=false val_fraction=0.1)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
  ARGS=(train.max_steps=$STEPS model.temperature_anneal_steps=$STEPS train.warmup_steps=$(( STEPS / 20 + 1 ))
        "train.num_workers=${WORKERS:-14}")
fi
run_arm() {  # name kl usage (a rerun into the same OUT replaces the arm; a failed arm leaves no stale row)
  local t0=$SECONDS
  rm -f "$OUT/$1/tokenizer_metrics.json"
  "$PY" -m beit tokenizer train -c tokenizer_cifar10 data_dir="$DATA" "${ARGS[@]}" model.kl_weight="$2" \
      model.usage_weight="$3" train.log_every=100 train.image_every=0 train.ckpt_every=1000000 \
      train.output_dir="$OUT/$1" train.overwrite=true > "$OUT/$1.log" 2>&1 || echo "arm $1 failed (see $OUT/$1.log)" >&2
  echo "$(( SECONDS - t0 ))" > "$OUT/$1.seconds"
}
n=0
for arm in $ARMS; do
  IFS=: read -r name kl usage <<< "$arm"
  run_arm "$name" "$kl" "$usage" &
  n=$(( n + 1 ))
  if [ $(( n % PARALLEL )) -eq 0 ]; then wait; fi
done
wait
"$PY" - "$OUT" $ARMS <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print(f"{'arm':12s} {'kl':>6s} {'usage':>6s} {'PSNR dB':>8s} {'perplexity':>11s} {'of vocab':>9s} {'used':>6s} {'s':>5s}")
for arm in sys.argv[2:]:
    name, kl, usage = arm.split(":")
    f = out / name / "tokenizer_metrics.json"
    if not f.is_file():
        print(f"{name:12s} {kl:>6s} {usage:>6s}  (no metrics: see {out / (name + '.log')})")
        continue
    m = json.loads(f.read_text())
    secs = (out / f"{name}.seconds").read_text().strip() if (out / f"{name}.seconds").is_file() else "?"
    vocab = int(m["heldout_used_codes"] + m["heldout_dead_codes"])
    print(f"{name:12s} {kl:>6s} {usage:>6s} {m['heldout_psnr']:8.2f} {m['heldout_perplexity']:11.1f} "
          f"{100 * m['heldout_perplexity'] / vocab:8.1f}% {int(m['heldout_used_codes']):6d} {secs:>5s}")
PY
