#!/usr/bin/env bash
# Stopping and resuming on a GPU, as users do it: a compiled CUDA pre-training run (shipped preset, JPEG folder,
# loader workers) is sent SIGTERM mid-run (what SLURM / Kubernetes / timeout(1) send), must exit 143 with the
# one-line "interrupted ... resume with ..." message and a checkpoint of the step it finished; the same command
# with train.resume=auto must then run to max_steps and exit 0. Then the same under `torchrun --nproc_per_node 1`
# (torchrun passes the signal on to its rank), and a Ctrl-C (SIGINT, exit 130) of the in-memory preset.
#
#   bash benchmarks/gpu_stop_resume.sh DATA TOKENIZER OUT     # DATA from prepare_gpu_data.sh; TOKENIZER a
#                                                             # dvae.safetensors (e.g. gpu_smoke's RUNS/tokenizer)
# Prints one PASS/FAIL line per case and exits 0 only if every case passed. Knobs: STEPS (default 300),
# KILL_AFTER (train rows seen before the signal, default 3), WORKERS (8), CASES ("plain torchrun sigint"),
# COMPILE (true), EXTRA (more key=value overrides).
set -uo pipefail
export PYTHONUNBUFFERED=1
DATA=${1:?usage: gpu_stop_resume.sh DATA TOKENIZER OUT}
TOKEN=${2:?usage: gpu_stop_resume.sh DATA TOKENIZER OUT}
OUT=${3:?usage: gpu_stop_resume.sh DATA TOKENIZER OUT}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH=$REPO/src${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
STEPS=${STEPS:-300}; KILL_AFTER=${KILL_AFTER:-3}; WORKERS=${WORKERS:-8}
CASES=${CASES:-plain torchrun sigint}
COMPILE=${COMPILE:-true}
read -r -a EXTRA <<<"${EXTRA:-}"   # more overrides, e.g. a tiny model for a CPU try of this script
mkdir -p "$OUT"
FAILS=0

train_rows() {  # number of train rows in a metrics.jsonl (0 if none yet)
  [ -f "$1" ] && grep -c '"split": *"train"' "$1" || echo 0
}
last_step() {
  "$PY" -c "import json,sys; r=[json.loads(l) for l in open(sys.argv[1]) if l.strip()]; \
print(max(x.get('step', 0) for x in r))" "$1" 2>/dev/null || echo -1
}

# case NAME SIGNAL EXPECTED_RC LAUNCH... -- ARGS: run, signal after KILL_AFTER train rows, check, resume, check
run_case() {
  local name=$1 sig=$2 want=$3; shift 3
  local launch=() args=()
  while [ "$1" != -- ]; do launch+=("$1"); shift; done; shift; args=("$@")
  local dir=$OUT/$name log=$OUT/$name.log
  rm -rf "$dir"
  echo "== $name: ${launch[*]} ${args[*]} train.output_dir=$dir" | tee "$log"
  local t0=$SECONDS
  setsid "${launch[@]}" "${args[@]}" "train.output_dir=$dir" >>"$log" 2>&1 &
  local pid=$! waited=0
  while kill -0 "$pid" 2>/dev/null && [ "$(train_rows "$dir/metrics.jsonl")" -lt "$KILL_AFTER" ]; do
    sleep 1; waited=$((waited + 1))
    [ "$waited" -gt 240 ] && break
  done
  local before; before=$(last_step "$dir/metrics.jsonl")
  # the signal as a scheduler sends it: to the whole process group (torchrun, ranks, loader workers)
  kill -"$sig" -- -"$pid" 2>/dev/null
  local ts=$SECONDS
  wait "$pid"; local rc=$?
  local stop_s=$((SECONDS - ts)) line
  line=$(grep -E "interrupted by|stopped at once" "$log" | tail -1)
  echo "   signal $sig after step >= $before (${waited}s); exit $rc in ${stop_s}s; line: ${line:-none}" | tee -a "$log"
  local ok=1
  if [ "$want" = nonzero ]; then [ "$rc" != 0 ]; else [ "$rc" = "$want" ]; fi ||
    { echo "   FAIL: exit $rc, expected $want" | tee -a "$log"; ok=0; }
  [ -n "$line" ] || { echo "   FAIL: no interrupted line" | tee -a "$log"; ok=0; }
  [ -f "$dir/last.pt" ] || { echo "   FAIL: no last.pt" | tee -a "$log"; ok=0; }
  echo "== $name resume: train.resume=auto" | tee -a "$log"
  "${launch[@]}" "${args[@]}" "train.output_dir=$dir" train.resume=auto >"$log.resume" 2>&1; rc=$?
  cat "$log.resume" >>"$log"
  local end; end=$(last_step "$dir/metrics.jsonl")
  echo "   resume exit $rc, last logged step $end of $STEPS, $((SECONDS - t0))s in all" | tee -a "$log"
  [ "$rc" = 0 ] || { echo "   FAIL: resume exit $rc" | tee -a "$log"; ok=0; }
  [ "$end" = "$STEPS" ] || { echo "   FAIL: resume ended at step $end" | tee -a "$log"; ok=0; }
  local stopped; stopped=$(echo "$line" | sed -nE 's/.*after step ([0-9]+).*/\1/p')
  [ -n "$stopped" ] && [ "$stopped" -ge "$before" ] && grep -q "resumed from .* at step $stopped" "$log.resume" ||
    { echo "   FAIL: the resume did not start at the stopped step (${stopped:-?}, logged before: $before)" |
      tee -a "$log"; ok=0; }
  if [ "$ok" = 1 ]; then echo "PASS $name"; else echo "FAIL $name"; FAILS=$((FAILS + 1)); fi
}

COMMON=(pretrain -c pretrain_cifar10_small "data.path=$DATA/cifar10/train" "tokenizer.path=$TOKEN"
        "train.max_steps=$STEPS" train.warmup_steps=10 train.log_every=5 "train.num_workers=$WORKERS"
        "train.compile=$COMPILE" train.ckpt_every=1000 "${EXTRA[@]}")
DFL_INT='import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execvp(sys.argv[1], sys.argv[1:])'
for c in $CASES; do
  case $c in
    plain) run_case plain TERM 143 "$PY" -m beit -- "${COMMON[@]}" data.in_memory=false ;;
    # torchrun's own exit code is its own (README: it reports the rank's 143 as a failure); the rank's line counts
    torchrun) run_case torchrun TERM nonzero "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 -m beit -- \
                "${COMMON[@]}" data.in_memory=false ;;
    # a background job of a script starts with SIGINT ignored (as under nohup, which beit respects): undo that
    sigint) run_case sigint INT 130 "$PY" -c "$DFL_INT" "$PY" -m beit -- "${COMMON[@]}" ;;
  esac
done
echo "gpu_stop_resume: $FAILS failed"
exit $((FAILS > 0))
