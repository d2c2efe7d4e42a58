#!/usr/bin/env bash
# Issue 15 [scale]: the user commands under torchrun on N GPUs, shipped presets, train.compile=true, to the end
# (final export written), then FSDP2 resume on another number of GPUs. Exit 0 only if every run passed.
#
#   bash benchmarks/gpu_torchrun_check.sh .carry/data $OUT/torchrun [NGPU]     # data: prepare_gpu_data.sh
#
# Runs (each ~30 steps on the CIFAR cut, one log per run in OUT):
#   tokenizer      a small dVAE, 1 GPU (the tokenizer the pre-training runs use)
#   pretrain_ddp   torchrun N: pretrain_cifar10_small, DDP + compile
#   pretrain_fsdp  torchrun N: the same with train.distributed=fsdp (sharded checkpoints, gathered export)
#   resume_fsdp_1  1 GPU: continue the FSDP run from its sharded checkpoint to more steps (N -> 1 ranks)
#   finetune_ddp   torchrun N: finetune_cifar10_small from the DDP pre-training, DDP + compile
# ONLY="tokenizer pretrain_ddp" runs just those; STEPS, COMPILE, EXTRA (more key=value) are knobs.
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
DATA=$(cd "${1:?usage: gpu_torchrun_check.sh DATA OUT [NGPU]}" && pwd)
OUT=${2:?usage: gpu_torchrun_check.sh DATA OUT [NGPU]}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
export PYTHONPATH=$REPO/src${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
N=${3:-$("$PY" -c "import torch; print(torch.cuda.device_count())")}
STEPS=${STEPS:-30}
CIFAR=$DATA/cifar10
RUNS=$OUT/runs
COMMON=("train.compile=${COMPILE:-true}" train.num_workers=6 train.log_every=5 train.warmup_steps=3 ${EXTRA:-})  # EXTRA: more key=value
declare -a SUMMARY
run() {  # run NAME CMD...: log to OUT/NAME.log, record exit and seconds (ONLY="a b": just those runs)
  local name=$1; shift
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then SUMMARY+=("$(printf '%-16s skipped' "$name")"); return 0; fi
  local t0=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  SUMMARY+=("$(printf '%-16s exit %-3s %4ss' "$name" "$rc" "$(( SECONDS - t0 ))")")
  echo "== $name: exit $rc in $(( SECONDS - t0 ))s"; tail -n 3 "$OUT/$name.log"
  return $rc
}
TR=(torchrun --standalone --nproc_per_node "$N" -m beit)
ok=0
run tokenizer "$PY" -m beit tokenizer train -c tokenizer_cifar10 "data_dir=$CIFAR/train" \
  "train.output_dir=$RUNS/tok" train.max_steps=20 train.warmup_steps=2 "train.compile=${COMPILE:-true}" train.num_workers=6 || ok=1
run pretrain_ddp "${TR[@]}" pretrain -c pretrain_cifar10_small "data.path=$CIFAR/train" \
  "tokenizer.path=$RUNS/tok/dvae.safetensors" --out "$RUNS/pt_ddp" "train.max_steps=$STEPS" "${COMMON[@]}" || ok=1
want() { [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]; }
want pretrain_ddp && { [ -f "$RUNS/pt_ddp/final/model.safetensors" ] || { echo "pretrain_ddp: no final/model.safetensors"; ok=1; }; }
run pretrain_fsdp "${TR[@]}" pretrain -c pretrain_cifar10_small "data.path=$CIFAR/train" \
  "tokenizer.path=$RUNS/tok/dvae.safetensors" --out "$RUNS/pt_fsdp" "train.max_steps=$STEPS" \
  train.distributed=fsdp train.ckpt_every=10 "${COMMON[@]}" || ok=1
want pretrain_fsdp && { [ -f "$RUNS/pt_fsdp/final/model.safetensors" ] || { echo "pretrain_fsdp: no final/model.safetensors"; ok=1; }; }
ls "$RUNS/pt_fsdp" > "$OUT/pt_fsdp_files.txt" 2>&1
run resume_fsdp_1 "$PY" -m beit pretrain -c pretrain_cifar10_small "data.path=$CIFAR/train" \
  "tokenizer.path=$RUNS/tok/dvae.safetensors" --out "$RUNS/pt_fsdp" --resume auto \
  "train.max_steps=$(( STEPS + 10 ))" "${COMMON[@]}" || ok=1
run finetune_ddp "${TR[@]}" finetune -c finetune_cifar10_small "model=$RUNS/pt_ddp/final" \
  "data.train_dir=$CIFAR/train" "data.val_dir=$CIFAR/test" --out "$RUNS/ft_ddp" "train.max_steps=$STEPS" \
  "${COMMON[@]}" || ok=1
want finetune_ddp && { [ -f "$RUNS/ft_ddp/model/model.safetensors" ] || { echo "finetune_ddp: no model/model.safetensors"; ok=1; }; }
printf '%s\n' "${SUMMARY[@]}" | tee "$OUT/summary.txt"
grep -h '"split": "train"' "$RUNS"/*/metrics.jsonl 2>/dev/null | tail -n 3
exit $ok
