#!/usr/bin/env bash
# Issue [proof], tokenizer part: what the tokenizer's codebook use does downstream. Two arms of the whole CIFAR-10 flow
# (benchmarks/cifar10_repro.sh stages A and B: tokenizer -> MIM pre-training -> fine-tuning of the pre-trained
# encoder), differing only in the tokenizer's model.usage_weight (old: 0, new: 0.003), run side by side on one GPU.
#   bash benchmarks/tokenizer_downstream.sh <cifar_dir> <out_dir> [seed]
# <cifar_dir> holds the extracted train/ and test/ class folders. The seed goes to pre-training and fine-tuning (the
# tokenizers keep their preset seed). Knobs (env): PRE_EPOCHS (20), FT_EPOCHS (15), LIMIT (seconds for both arms; unset:
# none), TOK_STEPS, PRE_EXTRA / FT_EXTRA (more KEY=VALUE overrides of both arms, after the seed). Each arm's log is
# <out_dir>/log_old, log_new; the tokenizers' held-out figures and each arm's last fine-tuning eval are printed at the end.
# The runs live in runs/tok_s<seed>_{old,new} under the current folder and resume (train.resume=auto): the same command
# again continues a cut run; delete those folders to start over.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: tokenizer_downstream.sh <cifar_dir> <out_dir> [seed]" >&2; exit 2; }
data=$1; out=$2; seed=${3:-0}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
arm() {  # name usage_weight; the paths come in the environment (here, data, out, seed), never inside code text
  export RUN=runs/tok_s${seed}_$1 TOK_EXTRA="model.usage_weight=$2" PRE_EPOCHS=${PRE_EPOCHS:-20} \
    FT_EPOCHS=${FT_EPOCHS:-15} ARMS=pretrained PROBES=0 PRE_EXTRA="train.seed=$seed ${PRE_EXTRA:-}" \
    FT_EXTRA="train.seed=$seed ${FT_EXTRA:-}"
  bash "$here/cifar10_repro.sh" A "$data" "$out/A_$1" && bash "$here/cifar10_repro.sh" B "$data" "$out/B_$1" "$out/A_$1"
}
limit=()
[ -n "${LIMIT:-}" ] && limit=(timeout "$LIMIT")
export here data out seed
( "${limit[@]}" bash -c "$(declare -f arm); arm old 0" > "$out/log_old" 2>&1 ) &
sleep 5  # the second arm's compile a little behind the first's
( "${limit[@]}" bash -c "$(declare -f arm); arm new 0.003" > "$out/log_new" 2>&1 ) &
rc=0; wait %1 || rc=$?; wait %2 || rc=$?
for a in old new; do
  echo "== $a: $(grep -E '^heldout_(psnr|perplexity):' "$out/log_$a" | tr '\n' ' ')"
  grep -E "eval step [0-9]+ ep [0-9]+:" "$out/log_$a" | tail -1 || true  # none: that arm stopped before (see rc)
done
exit $rc
