#!/usr/bin/env bash
# Issue [proof]: one device call of a CIFAR-10 fine-tuning run that spans several calls on one warm GPU machine.
# Installs the carried wheels (what the GPU image lacks: omegaconf and antlr4), extracts the carried CIFAR-10 tars
# into /tmp/cifar once (a warm machine keeps it), then runs benchmarks/cifar10_sweep.sh with its LIMIT set so the
# whole call ends within SECONDS_LEFT; the same command in the next call continues the run (train.resume=auto, the
# run lives in runs/sweep of the machine's checkout). Each call copies the arm's log, metrics and config to $OUT.
#
#   SECONDS_LEFT=590 EPOCHS=290 bash benchmarks/cifar10_call.sh \
#       "scratch_lr5e-4_nomix train.batch_size=512 train.lr=5e-4 mixup=0.0 cutmix=0.0"    # then again, same words
#
# An arm held to a GPU-time budget (an equal-time arm): ARM_SECONDS=<the arm's seconds over all its calls>. The
# first call's EPOCHS is a guess of the pace; each call records its seconds, the epoch it reached, the seconds an
# epoch took and its start-up cost (imports, decode, compile) in <run>/calls.tsv, and every later call re-plans the
# schedule's length from them (train.epochs = epochs done + the epochs the arm's remaining seconds hold, less a
# start-up per call still needed; the warm-up stays pinned) and stops training when the arm's seconds are spent.
# The cosine's learning rate then steps once at the resume, as the log's `lr` shows; the arm's GPU time is the sum
# of calls.tsv's seconds.
#
# Carry (device tool): .whl (omegaconf-2.3.0 and antlr4_python3_runtime-4.9.3 wheels) and .gl/{train,test}.tar.gz
# (copies of ../shared/data/cifar10/*.tar.gz). One arm per call: arms sharing the GPU slow each other (RESULTS 2).
set -euo pipefail
start=$SECONDS
left=${SECONDS_LEFT:-}
out=${OUT:-}
[ -n "$out" ] || { echo "cifar10_call.sh: OUT is not set: the folder whose files come back" >&2; exit 2; }
[ $# -ge 1 ] || { echo "usage: SECONDS_LEFT=S EPOCHS=E [ARM_SECONDS=A] cifar10_call.sh 'NAME KEY=VALUE ...'" >&2; exit 2; }
[ $# -eq 1 ] || { echo "cifar10_call.sh: one arm per call" >&2; exit 2; }
read -r -a words <<< "$1"
name=${words[0]:-}
# the numbers and the name checked before the install and the extraction (a device call's minutes): SECONDS_LEFT=590s
# failed after them in bash's arithmetic ("value too great for base"), ARM_SECONDS=1628s in a traceback of the plan
whole() {  # NAME VALUE: 1 to 999999 (more overflows nothing here, but is no call's seconds or epochs)
  [[ "$2" =~ ^[1-9][0-9]{0,5}$ ]] || { echo "cifar10_call.sh: $1 is '$2': not a whole number from 1 to 999999" >&2
                                      exit 2; }
}
whole SECONDS_LEFT "$left"
[ -z "${EPOCHS:-}" ] || whole EPOCHS "$EPOCHS"
if [ -n "${ARM_SECONDS:-}" ]; then
  whole ARM_SECONDS "$ARM_SECONDS"
  [ -n "${EPOCHS:-}" ] || { echo "cifar10_call.sh: ARM_SECONDS needs EPOCHS (the first call's schedule length)" >&2
                            exit 2; }
fi
# not . or .. (the run folder would be runs/sweep itself, or runs/)
[[ "$name" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || {
  echo "cifar10_call.sh: arm name '$name': letters, digits, . _ - (a letter or digit first)" >&2; exit 2; }
run=${RUN:-runs/sweep}/$name
margin=15  # the SIGTERM checkpoint, the table, the copies (MARGIN in cifar10_call_plan.py)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
if [ ! -f /tmp/cifar/.done ]; then
  rm -rf /tmp/cifar && mkdir -p /tmp/cifar/train /tmp/cifar/test
  tar xzf .gl/train.tar.gz -C /tmp/cifar/train && tar xzf .gl/test.tar.gz -C /tmp/cifar/test
  touch /tmp/cifar/.done
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt" || true
git rev-parse --short HEAD 2>/dev/null | tee -a "$out/gpu.txt" || true

spec=$1
budget=$left
if [ -n "${ARM_SECONDS:-}" ]; then
  # re-plan from the earlier calls: prints "<epochs> <warmup> <this call's seconds>" or fails naming why
  plan=$(python3 benchmarks/cifar10_call_plan.py "$run" "$ARM_SECONDS" "$left" \
         "${EPOCHS:?EPOCHS: the schedule length of the first call}")
  read -r epochs warm budget <<< "$plan"
  export EPOCHS=$epochs
  # the pinned warm-up replaces the arm's own train.warmup_epochs word (one value in the log's resume hint)
  # (any blank before and after it: read -a splits the words on tabs too, and ' [^ ]*' took a tab and the next word)
  drop='s/[[:space:]]+train\.warmup_epochs=[^[:space:]]*//g'
  [ "$warm" = "-" ] || spec="$(sed -E "$drop" <<< "$spec") train.warmup_epochs=$warm"
fi
limit=$(( budget - (SECONDS - start) - margin ))
[ "$limit" -gt 20 ] || { echo "cifar10_call.sh: only ${limit}s left for training" >&2; exit 1; }
echo "[call] $(date -u +%FT%TZ) arm $name, EPOCHS=${EPOCHS:-100}, training limit ${limit}s (setup $(( SECONDS - start ))s)"
t0=$SECONDS
LIMIT=$limit bash benchmarks/cifar10_sweep.sh /tmp/cifar "$out" "$spec" || true
grep -E "epoch|top1|stopped|finished|resume" "$out/log_$name" | tail -n 5 || true
if [ -n "${ARM_SECONDS:-}" ]; then  # this call's seconds (all of it: setup counts), epoch reached, pace, start-up
  python3 benchmarks/cifar10_call_plan.py --record "$run" "$out/log_$name" "$(( SECONDS - start + 2 ))" \
      "$(( t0 - start ))" | tee -a "$out/plan.txt" || true
  cp "$run/calls.tsv" "$out/calls.tsv" || true
fi
for f in metrics.jsonl config.yaml; do [ -f "$run/$f" ] && cp "$run/$f" "$out/${name}_$f"; done
ls "$run"/*.png >/dev/null 2>&1 && tar czf "$out/${name}_png.tgz" -C "$run" $(cd "$run" && ls ./*.png)
echo "[call] $(date -u +%FT%TZ) done in $(( SECONDS - start ))s"
