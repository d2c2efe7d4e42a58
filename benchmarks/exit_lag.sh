#!/bin/bash
# How long a `beit` run lingers after its last line (RESULTS.md section 9, third session; pytorch issue 81794:
# persistent DataLoader workers with pin_memory were joined 5 s each by torch's exit hook).
#
#   bash benchmarks/exit_lag.sh DATA OUT TAG MAXS [ENV=VALUE ...]
#
# Runs `beit tokenizer train -c tokenizer_cifar10` (20 steps, 8 workers, compile on) on DATA/cifar10/train
# (+ the overrides in ARGS) with the extra environment, writes OUT/TAG.log and prints "TAG rc R after S s (main returned at M)". If the
# process is still alive 8 s after main() returned (or at MAXS), its Python stacks (SIGUSR1 -> faulthandler)
# and its children go to the log and it is killed (rc 137).
set -uo pipefail
data=$1; out=$2; tag=$3; maxs=$4; shift 4
mkdir -p "$out"
env "$@" python3 -c "
import faulthandler, signal, sys, time
faulthandler.register(signal.SIGUSR1, all_threads=True)
from beit.cli import main
sys.argv = ['beit', 'tokenizer', 'train', '-c', 'tokenizer_cifar10', 'data_dir=$data/cifar10/train',
            'train.output_dir=/tmp/exit_lag_$tag', 'train.max_steps=20', 'train.warmup_steps=3', 'train.log_every=5',
            'train.image_every=10', 'train.num_workers=8', 'train.compile=true', 'train.overwrite=true']
sys.argv += '${ARGS:-}'.split()  # overrides, e.g. ARGS='train.compile=false' for a CPU try
rc = main(); print('MAIN RETURNED', rc, time.time(), flush=True); sys.exit(rc)
" > "$out/$tag.log" 2>&1 &
pid=$!
t0=$(date +%s); seen=""
while kill -0 $pid 2>/dev/null; do
  sleep 1; now=$(date +%s)
  if [ -z "$seen" ] && grep -q "MAIN RETURNED" "$out/$tag.log"; then seen=$now; fi
  if { [ -n "$seen" ] && [ $((now - seen)) -ge 8 ]; } || [ $((now - t0)) -ge "$maxs" ]; then
    echo "== $tag ALIVE at $((now - t0)) s; stacks:" >> "$out/$tag.log"
    ps -o pid,ppid,stat,wchan:32,etimes,cmd --ppid $pid >> "$out/$tag.log" 2>&1
    kill -USR1 $pid; sleep 2
    for c in $(pgrep -P $pid); do kill -USR1 "$c" 2>/dev/null; done; sleep 1
    kill -9 -- $pid $(pgrep -P $pid) 2>/dev/null; break
  fi
done
wait $pid 2>/dev/null; rc=$?
echo "== $tag rc $rc after $(( $(date +%s) - t0 )) s (main returned at ${seen:+$((seen - t0))})" | tee -a "$out/$tag.log"
