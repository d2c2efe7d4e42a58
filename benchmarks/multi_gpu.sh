#!/usr/bin/env bash
# Issue 15 [scale], proof on 2 GPUs, in ONE command: BEiT-B/16 pre-training (MIM, DALL-E-architecture tokenizer
# in the loop) and fine-tuning throughput on the real engine (benchmarks/multi_gpu.py), 1 GPU vs N GPUs under
# torchrun, DDP and FSDP2, compile on, GPU-resident synthetic data. Prints one table (mode / GPUs / img/s /
# scaling = img/s(N) / img/s(1)) and writes OUT/multi_gpu.json, OUT/multi_gpu.txt and OUT/multi_gpu_logs.tgz.
#
#   bash benchmarks/multi_gpu.sh $OUT                      # on the 2-GPU machine (~5-7 min)
#   GPUS="1 2 4" bash benchmarks/multi_gpu.sh $OUT         # any number of GPUs (one host)
#   BEIT_SMOKE_CPU=1 bash benchmarks/multi_gpu.sh /tmp/mg  # tiny models on CPU, 2 gloo processes, no compile
#
# Knobs (env): GPUS, TASKS, MODES, STEPS, BATCH, LOG_EVERY, WARMUP_WINDOWS, COMPILE, RUN_TIMEOUT, WORK,
# BUDGET, PRESET_PRETRAIN, PRESET_FINETUNE (paths or preset names), EXTRA (more key=value overrides for every run).
set -euo pipefail
export PYTHONUNBUFFERED=1
# required on the lent H200 machines (NVLink multicast off), harmless elsewhere
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

OUT=${1:-${OUT:?usage: multi_gpu.sh OUT}}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$REPO"
export PYTHONPATH=$REPO/src${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}

PRESET_PRETRAIN=${PRESET_PRETRAIN:-pretrain_base}
PRESET_FINETUNE=${PRESET_FINETUNE:-finetune_base}
TASKS=${TASKS:-pretrain finetune}
MODES=${MODES:-ddp fsdp}
CPU=${BEIT_SMOKE_CPU:-0}
if [ "$CPU" = 1 ]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  GPUS=${GPUS:-1 2}; STEPS=${STEPS:-8}; BATCH=${BATCH:-4}; LOG_EVERY=${LOG_EVERY:-2}
  WARMUP_WINDOWS=${WARMUP_WINDOWS:-1}; COMPILE=${COMPILE:-false}; RUN_TIMEOUT=${RUN_TIMEOUT:-300}
  TINY=(--tiny --bank 16)
else
  NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
  [ "$NGPU" -ge 1 ] || { echo "multi_gpu: no CUDA device (BEIT_SMOKE_CPU=1 for the CPU run)" >&2; exit 1; }
  GPUS=${GPUS:-1 $NGPU}; STEPS=${STEPS:-100}; BATCH=${BATCH:-128}; LOG_EVERY=${LOG_EVERY:-10}
  WARMUP_WINDOWS=${WARMUP_WINDOWS:-3}; COMPILE=${COMPILE:-true}; RUN_TIMEOUT=${RUN_TIMEOUT:-150}
  TINY=()
fi
BUDGET=${BUDGET:-430}   # seconds: runs not started by then are reported as skipped (a GPU call allows 600)
WORK=${WORK:-/tmp/beit_multi_gpu}
rm -rf "$WORK"; mkdir -p "$WORK/runs" "$WORK/logs"

t_all=$SECONDS
for task in $TASKS; do
  preset=$PRESET_PRETRAIN; [ "$task" = finetune ] && preset=$PRESET_FINETUNE
  for n in $GPUS; do
    modes=$MODES; [ "$n" = 1 ] && modes=single   # one process: no wrapper, the baseline of both modes
    for mode in $modes; do
      name=${task}_${mode}_${n}
      if [ $(( SECONDS - t_all )) -ge "$BUDGET" ]; then
        echo "== $name: not started, past the ${BUDGET}s budget"
        printf '{"task": "%s", "mode": "%s", "gpus": %s, "img_per_s": null, "error": "not run: past the %ss budget"}\n' \
          "$task" "$mode" "$n" "$BUDGET" > "$WORK/runs/$name.json"
        continue
      fi
      echo "== $name"
      set +e
      # shellcheck disable=SC2086
      timeout "$RUN_TIMEOUT" "$PY" -m torch.distributed.run --standalone --nproc_per_node "$n" \
        benchmarks/multi_gpu.py run --task "$task" --mode "$([ "$mode" = single ] && echo ddp || echo "$mode")" \
        --preset "$preset" --steps "$STEPS" --batch "$BATCH" --log-every "$LOG_EVERY" \
        --warmup-windows "$WARMUP_WINDOWS" --compile "$COMPILE" --work "$WORK/scratch" "${TINY[@]}" \
        --out "$WORK/runs/$name.json" ${EXTRA:-} 2>&1 | tee "$WORK/logs/$name.log"
      rc=${PIPESTATUS[0]}
      set -e
      if [ "$rc" != 0 ]; then
        echo "== $name: exit $rc (log: $WORK/logs/$name.log)"
        # the last Python exception line of any rank (not torchrun's own ChildFailedError)
        err=$(sed 's/^\[rank[0-9]*\]: //' "$WORK/logs/$name.log" | grep -E '^[A-Za-z_.]*(Error|Exception|Interrupt)[A-Za-z]*: ' \
              | grep -v ChildFailedError | tail -1 | cut -c1-300 || true)
        [ "$rc" = 124 ] && err="timed out after ${RUN_TIMEOUT}s${err:+; $err}"
        "$PY" - "$WORK/runs/$name.json" "$task" "$mode" "$n" "$rc" "$err" <<'PY'
import json, os, sys
path, task, mode, n, rc, err = sys.argv[1:]
old = json.load(open(path)) if os.path.exists(path) else {}
old.update(task=task, mode=mode, gpus=int(n), error=f"exit {rc}: {old.get('error') or err}")
old.setdefault("img_per_s", None)
json.dump(old, open(path, "w"), indent=1)
PY
      fi
    done
  done
done

echo
set +e
"$PY" benchmarks/multi_gpu.py report "$WORK/runs" --json "$OUT/multi_gpu.json" | tee "$OUT/multi_gpu.txt"
rc=${PIPESTATUS[0]}
set -e
echo "total $(( SECONDS - t_all ))s"
tar czf "$OUT/multi_gpu_logs.tgz" -C "$WORK" runs logs
exit "$rc"
