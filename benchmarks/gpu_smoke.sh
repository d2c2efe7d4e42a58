#!/usr/bin/env bash
# Issue 15 [scale], proof on ONE GPU: the whole user flow with the shipped presets and train.compile=true,
# cut to a few dozen steps each (only steps, warmup, logging/eval cadence and workers are overridden):
#   tokenizer train -> pretrain (that tokenizer; again from the JPEG files) -> finetune (from the pre-trained
#   model; again from the JPEG files) -> evaluate -> predict
#   -> linprobe -> visualize -> segment train (+ eval: sliding window, then multi-scale + flip; predict overlays)
#   -> layout train DocBank (+ eval, predict) -> layout train PubLayNet (Mask R-CNN)
# Each stage's output goes to OUT/<stage>.log; each stage is checked for its output files; a stage whose
# inputs failed is skipped; the end prints (and writes OUT/summary.txt, OUT/summary.json) a table of
# stage / exit / seconds / key metric. Exit status: 0 only if every stage passed.
#
#   bash benchmarks/prepare_gpu_data.sh .carry/data                    # on the CPU machine, once
#   bash benchmarks/gpu_smoke.sh .carry/data /tmp/smoke                 # on the GPU machine (~5-7 min on an H200)
#   PACK=$OUT/gpu_smoke.tgz bash benchmarks/gpu_smoke.sh .carry/data /tmp/smoke   # + logs/JSON/PNGs in one tgz
#   BEIT_SMOKE_CPU=1 bash benchmarks/gpu_smoke.sh .carry/data /tmp/smoke_cpu      # tiny models, CPU, ~9 min
#   STAGES="layout_docbank layout_eval layout_predict layout_publaynet" bash ...   # a subset (e.g. a second call)
#   ATTN=cudnn_bias bash ...     # every BEiT training stage on that attention path (model_overrides.attn_impl);
#                                # the eval / predict / visualize stages run what the checkpoint's config saved
#
# Needs: python3 with torch, torchvision, timm, omegaconf, pycocotools (layout), tensorboard, matplotlib;
# beit is run from this checkout (PYTHONPATH=src), not installed. Knobs: the variables below (env wins).
set -euo pipefail
export PYTHONUNBUFFERED=1

DATA=${1:?usage: gpu_smoke.sh DATA OUT   (DATA from benchmarks/prepare_gpu_data.sh)}
OUT=${2:?usage: gpu_smoke.sh DATA OUT}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$OUT"
DATA=$(cd "$DATA" && pwd)
OUT=$(cd "$OUT" && pwd)
cd "$REPO"
export PYTHONPATH=$REPO/src${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
BEIT=("$PY" -m beit)

# ---- presets: names of the presets shipped in the package (`beit configs`), or YAML paths
CFG_TOKENIZER=${CFG_TOKENIZER:-tokenizer_cifar10}
CFG_PRETRAIN=${CFG_PRETRAIN:-pretrain_cifar10_small}
CFG_FINETUNE=${CFG_FINETUNE:-finetune_cifar10_small}
CFG_LINPROBE=${CFG_LINPROBE:-linprobe_base}
CFG_SEGMENT=${CFG_SEGMENT:-segment_camvid}
CFG_LAYOUT_DOCBANK=${CFG_LAYOUT_DOCBANK:-layout_docbank}
CFG_LAYOUT_PUBLAYNET=${CFG_LAYOUT_PUBLAYNET:-layout_publaynet_base}
# every command takes -c/--config
SEG_CONFIG_FLAG=${SEG_CONFIG_FLAG:--c}
LAYOUT_CONFIG_FLAG=${LAYOUT_CONFIG_FLAG:--c}

RUNS=${RUNS:-$OUT/runs}            # checkpoints (large; PACK leaves .pt / .safetensors out)
# the user flow first (cheap), then the BEiT-B segmentation and layout runs (from scratch: no dependency on the
# flow, so STAGES can split the script over two GPU calls if one is too short)
STAGES=${STAGES:-tokenizer pretrain pretrain_files finetune finetune_files evaluate predict linprobe visualize segment segment_eval segment_eval_ms segment_predict layout_docbank layout_eval layout_predict layout_publaynet}
# seconds: stages not started by then are reported as "budget", and one stage is stopped after STAGE_TIMEOUT,
# so that a GPU call (600 s at most) still ends with the summary; no limits in CPU mode
BUDGET=${BUDGET:-$([ "${BEIT_SMOKE_CPU:-0}" = 1 ] && echo 100000 || echo 450)}
STAGE_TIMEOUT=${STAGE_TIMEOUT:-$([ "${BEIT_SMOKE_CPU:-0}" = 1 ] && echo 100000 || echo 150)}
CPU=${BEIT_SMOKE_CPU:-0}
if [ "$CPU" = 1 ]; then
  COMPILE=${COMPILE:-false}        # inductor on 2 shared cores takes minutes: COMPILE=true to try it
  WORKERS=${WORKERS:-0}
  TOK_STEPS=${TOK_STEPS:-3}; PRE_STEPS=${PRE_STEPS:-3}; FT_STEPS=${FT_STEPS:-3}; LP_EPOCHS=${LP_EPOCHS:-2}
  SEG_STEPS=${SEG_STEPS:-2}; LAYOUT_STEPS=${LAYOUT_STEPS:-2}
  BATCH=${BATCH:-32}
  TINY_TOK=(model.vocab_size=64 model.hidden=16 model.num_res_blocks=1 model.codebook_dim=16 "train.batch_size=$BATCH")
  TINY_PRE=(model.embed_dim=32 model.depth=2 model.num_heads=2 data.max_images=512 "train.batch_size=$BATCH")
  TINY_FT=("train.batch_size=$BATCH" data.eval_batch_size=200)
  TINY_LP=(extract_batch_size=200)
  TINY_SEG=(model.embed_dim=32 model.depth=2 model.num_heads=2 model.channels=16 model.aux_channels=8
            train.batch_size=2 data.crop_size=64 "data.img_scale=[80,60]" "data.test_scale=[80,60]"
            test.crop=64 test.stride=48 test.max_images=2 data.repeat=1)
  TINY_LAYOUT=("model.backbone_overrides={embed_dim: 32, depth: 2, num_heads: 2}" model.fpn_channels=32
               model.box_head_dim=64 model.mask_head_dim=16 train.batch_size=2 "data.min_sizes=[128]"
               data.max_size=192 model.min_size_test=128 model.max_size_test=192 eval_workers=0)
  SEG_MS=${SEG_MS:-"[0.75,1.0]"}
else
  COMPILE=${COMPILE:-true}
  WORKERS=${WORKERS:-8}
  TOK_STEPS=${TOK_STEPS:-40}; PRE_STEPS=${PRE_STEPS:-40}; FT_STEPS=${FT_STEPS:-40}; LP_EPOCHS=${LP_EPOCHS:-10}
  SEG_STEPS=${SEG_STEPS:-24}; LAYOUT_STEPS=${LAYOUT_STEPS:-24}
  TINY_TOK=(); TINY_PRE=(); TINY_FT=(); TINY_LP=(); TINY_SEG=(); TINY_LAYOUT=()
  SEG_MS=${SEG_MS:-"[0.75,1.0,1.25]"}
fi
C=("train.compile=$COMPILE")
# ATTN=cudnn_bias (or fused_bias, eager, ...): every training stage with a BEiT encoder runs that attention path
# (checked before the first stage); the stages that load a checkpoint run the attn_impl its config saved
M=(); [ -n "${ATTN:-}" ] && M=("model_overrides.attn_impl=$ATTN")
[ -n "${COMPILE_SCOPE:-}" ] && C+=("train.compile_scope=$COMPILE_SCOPE")   # blocks | model; unset: the preset's
W="train.num_workers=$WORKERS"
warm() { echo "train.warmup_steps=$(( $1 / 8 + 1 ))"; }   # the presets' warmup is longer than the cut run
images() { echo "train.image_every=$(( $1 / 2 > 0 ? $1 / 2 : 1 ))"; }   # one picture mid-run

CIFAR=$DATA/cifar10
TOK=$RUNS/tokenizer PRE=$RUNS/pretrain FT=$RUNS/finetune LP=$RUNS/linprobe
SEG=$RUNS/segment LAYD=$RUNS/layout_docbank LAYP=$RUNS/layout_publaynet

for d in "$CIFAR/train" "$CIFAR/test" "$DATA/CamVid" "$DATA/docbank" "$DATA/publaynet"; do
  [ -d "$d" ] || { echo "gpu_smoke: $d not found: run benchmarks/prepare_gpu_data.sh DATA first" >&2; exit 1; }
done
mkdir -p "$RUNS"
"$PY" - <<'PY' 2>&1 | tee "$OUT/env.log"
import platform, torch, torchvision
print(f"python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}")
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (no CUDA)")
for m in ("timm", "omegaconf", "pycocotools", "safetensors", "tensorboard", "matplotlib"):
    try:
        print(f"{m} {getattr(__import__(m), '__version__', 'ok')}")
    except ImportError as e:
        print(f"MISSING {m}: {e}")
PY
if [ "$CPU" != 1 ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_smoke: no CUDA device (set BEIT_SMOKE_CPU=1 for the tiny CPU run)" >&2; exit 1
fi
# a bad ATTN fails here, once, not in every BEiT stage after the tokenizer has run
if [ -n "${ATTN:-}" ] && ! "$PY" - "$ATTN" <<'PY'
import sys
from beit.models.attention import ATTENTION_IMPLS
sys.exit(0 if sys.argv[1] in ATTENTION_IMPLS else f"gpu_smoke: ATTN={sys.argv[1]!r} is not an attention implementation; "
         f"choose from {sorted(ATTENTION_IMPLS)}")
PY
then exit 2; fi

# ---------------------------------------------------------------------------------------------- stages
NAMES=(); RCS=(); SECS=(); METRICS=()
declare -A STATUS=()

# metric KIND FILE [KEY...]: the key figure of a stage, as text (never fails)
metric() {
  "$PY" - "$@" <<'PY' 2>/dev/null || echo "-"
import json, math, sys
kind, path, keys = sys.argv[1], sys.argv[2], sys.argv[3:]
def fmt(k, v):
    return f"{k} {v:.4g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else f"{k} {v}"
if kind == "jsonl":  # last eval row with one of keys, else last train row; + the last train img/s
    rows = [json.loads(l) for l in open(path) if l.strip()]
    ev = [r for r in rows if r.get("split") == "eval" and any(k in r for k in keys)]
    tr = [r for r in rows if r.get("split") == "train"]
    src = ev[-1] if ev else (tr[-1] if tr else {})
    parts = [fmt(k, src[k]) for k in keys if k in src][:2]
    if tr and "img_per_s" in tr[-1]:
        parts.append(f"{tr[-1]['img_per_s']:.0f} img/s")
    print(", ".join(parts) or "-")
elif kind == "json":
    d = json.load(open(path))
    print(", ".join(fmt(k, d[k]) for k in keys if k in d) or "-")
elif kind == "lines":
    print(f"{sum(1 for _ in open(path)) - 1} rows")
elif kind == "file":
    import os
    print(f"{os.path.getsize(path) / 1024:.0f} KiB")
PY
}

# stage NAME "DEPENDS" "OUTPUTS (globs)" "METRIC ARGS" -- CMD...
stage() {
  local name=$1 deps=$2 outputs=$3 margs=$4; shift 5
  case " $STAGES " in *" $name "*) ;; *) return 0 ;; esac
  local d rc=0 t0=$SECONDS m="-" log="$OUT/$name.log"
  if [ "$SECONDS" -ge "$BUDGET" ]; then
    echo "== $name: not started, past the ${BUDGET}s budget" | tee "$log"
    NAMES+=("$name"); RCS+=("budget"); SECS+=(0); METRICS+=("not run"); STATUS[$name]=skip
    return 0
  fi
  for d in $deps; do
    if [ "${STATUS[$d]:-not run}" = failed ] || [ "${STATUS[$d]:-not run}" = skip ]; then  # not run: reuse RUNS
      echo "== $name: skipped ($d did not pass)" | tee "$log"
      NAMES+=("$name"); RCS+=("skip"); SECS+=(0); METRICS+=("needs $d"); STATUS[$name]=skip
      return 0
    fi
  done
  echo "== $name: $*" | tee "$log"
  set +e
  timeout "$STAGE_TIMEOUT" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  [ "$rc" = 124 ] && echo "== $name: stopped after STAGE_TIMEOUT=${STAGE_TIMEOUT}s" | tee -a "$log"
  set -e
  local o
  for o in $outputs; do
    if ! compgen -G "$o" >/dev/null; then
      echo "== $name: missing output $o" | tee -a "$log"
      [ "$rc" = 0 ] && rc=missing
    fi
  done
  # shellcheck disable=SC2086
  [ "$rc" = 0 ] && [ -n "$margs" ] && m=$(metric $margs)
  NAMES+=("$name"); RCS+=("$rc"); SECS+=($(( SECONDS - t0 ))); METRICS+=("$m")
  STATUS[$name]=$([ "$rc" = 0 ] && echo ok || echo failed)
  echo "== $name: exit $rc in $(( SECONDS - t0 ))s${m:+ ($m)}" | tee -a "$log"
}

stage tokenizer "" "$TOK/dvae.safetensors $TOK/metrics.jsonl $TOK/recon_grid.png $TOK/tokenizer_metrics.json" \
  "json $TOK/tokenizer_metrics.json heldout_psnr heldout_perplexity" -- \
  "${BEIT[@]}" tokenizer train -c "$CFG_TOKENIZER" "data_dir=$CIFAR/train" "train.output_dir=$TOK" \
  "train.max_steps=$TOK_STEPS" "$(warm "$TOK_STEPS")" train.log_every=5 "$(images "$TOK_STEPS")" "$W" "${C[@]}" \
  "${TINY_TOK[@]}"

stage pretrain "tokenizer" "$PRE/final/model.safetensors $PRE/final/config.json $PRE/metrics.jsonl $PRE/last.pt $PRE/mim_panel.png $PRE/curves.png $PRE/images/*.png" \
  "jsonl $PRE/metrics.jsonl loss mim_acc" -- \
  "${BEIT[@]}" pretrain -c "$CFG_PRETRAIN" "data.path=$CIFAR/train" "tokenizer.path=$TOK/dvae.safetensors" \
  "train.output_dir=$PRE" "train.max_steps=$PRE_STEPS" "$(warm "$PRE_STEPS")" train.log_every=5 \
  "$(images "$PRE_STEPS")" "$W" "${C[@]}" "${M[@]}" "${TINY_PRE[@]}"

# the same run from the JPEG folder instead of memory: the device path with JPEGs decoded in the loader's workers
stage pretrain_files "tokenizer" "$RUNS/pretrain_files/final/model.safetensors $RUNS/pretrain_files/metrics.jsonl" \
  "jsonl $RUNS/pretrain_files/metrics.jsonl loss mim_acc" -- \
  "${BEIT[@]}" pretrain -c "$CFG_PRETRAIN" "data.path=$CIFAR/train" data.in_memory=false \
  "tokenizer.path=$TOK/dvae.safetensors" "train.output_dir=$RUNS/pretrain_files" "train.max_steps=$PRE_STEPS" \
  "$(warm "$PRE_STEPS")" train.log_every=5 "$W" "${C[@]}" "${M[@]}" "${TINY_PRE[@]}"

stage finetune "pretrain" "$FT/model/model.safetensors $FT/model/config.json $FT/metrics.jsonl $FT/eval/metrics.json $FT/best.pt" \
  "jsonl $FT/metrics.jsonl top1 loss" -- \
  "${BEIT[@]}" finetune -c "$CFG_FINETUNE" "model=$PRE/final" "data.train_dir=$CIFAR/train" \
  "data.val_dir=$CIFAR/test" "train.output_dir=$FT" "train.max_steps=$FT_STEPS" "$(warm "$FT_STEPS")" \
  train.log_every=5 "$W" "${C[@]}" "${M[@]}" "${TINY_FT[@]}"

stage finetune_files "pretrain" "$RUNS/finetune_files/model/model.safetensors $RUNS/finetune_files/metrics.jsonl" \
  "jsonl $RUNS/finetune_files/metrics.jsonl top1 loss" -- \
  "${BEIT[@]}" finetune -c "$CFG_FINETUNE" "model=$PRE/final" "data.train_dir=$CIFAR/train" data.in_memory=false \
  "data.val_dir=$CIFAR/test" "train.output_dir=$RUNS/finetune_files" "train.max_steps=$FT_STEPS" \
  "$(warm "$FT_STEPS")" train.log_every=5 "$W" "${C[@]}" "${M[@]}" "${TINY_FT[@]}"

stage evaluate "finetune" "$RUNS/evaluate/metrics.json $RUNS/evaluate/per_class.csv" "json $RUNS/evaluate/metrics.json top1 top5" -- \
  "${BEIT[@]}" evaluate "$FT/model" --data "$CIFAR/test" --out "$RUNS/evaluate" --num-workers "$WORKERS"

stage predict "finetune" "$RUNS/predictions.csv" "lines $RUNS/predictions.csv" -- \
  "${BEIT[@]}" predict "$FT/model" "$CIFAR/test/airplane" --out "$RUNS/predictions.csv" --num-workers "$WORKERS"

stage linprobe "pretrain" "$LP/linprobe.json" "json $LP/linprobe.json best_block best_top1" -- \
  "${BEIT[@]}" linprobe -c "$CFG_LINPROBE" "model=$PRE/final" img_size=32 layers=all \
  "data.train_dir=$CIFAR/train" "data.val_dir=$CIFAR/test" "train.output_dir=$LP" "train.epochs=$LP_EPOCHS" \
  "extract_num_workers=$WORKERS" train.log_every=5 "${C[@]}" "${M[@]}" "${TINY_LP[@]}"

stage visualize "pretrain" "$RUNS/mim_panel.png" "file $RUNS/mim_panel.png" -- \
  "${BEIT[@]}" visualize "$PRE/last.pt" --out "$RUNS/mim_panel.png"

stage segment "" "$SEG/last.pt $SEG/metrics.jsonl $SEG/curves.png" "jsonl $SEG/metrics.jsonl mIoU aAcc" -- \
  "${BEIT[@]}" segment train "$SEG_CONFIG_FLAG" "$CFG_SEGMENT" "data.root=$DATA/CamVid" "train.output_dir=$SEG" \
  "train.max_steps=$SEG_STEPS" "$(warm "$SEG_STEPS")" train.log_every=5 "$W" "${C[@]}" "${M[@]}" "${TINY_SEG[@]}"

stage segment_eval "segment" "$RUNS/segment_eval/metrics.json" "json $RUNS/segment_eval/metrics.json mIoU aAcc" -- \
  "${BEIT[@]}" segment eval --ckpt "$SEG/last.pt" --output "$RUNS/segment_eval" test.mode=slide

stage segment_eval_ms "segment" "$RUNS/segment_eval_ms/metrics.json" "json $RUNS/segment_eval_ms/metrics.json mIoU aAcc" -- \
  "${BEIT[@]}" segment eval --ckpt "$SEG/last.pt" --output "$RUNS/segment_eval_ms" test.mode=slide \
  "test.scales=$SEG_MS" test.flip=true

SEG_IMAGES=$(ls "$DATA"/CamVid/val/*.jpg | head -4)
# shellcheck disable=SC2086
stage segment_predict "segment" "$RUNS/segment_predict/*.png" "" -- \
  "${BEIT[@]}" segment predict --ckpt "$SEG/last.pt" --input $SEG_IMAGES --output "$RUNS/segment_predict"

LAYOUT_COMMON=("train.max_steps=$LAYOUT_STEPS" "$(warm "$LAYOUT_STEPS")" train.log_every=5 train.eval_every=1 "$W" "${C[@]}" "${M[@]}")
stage layout_docbank "" "$LAYD/last.pt $LAYD/metrics.jsonl $LAYD/ap_table.txt" "jsonl $LAYD/metrics.jsonl bbox/AP bbox/AP50" -- \
  "${BEIT[@]}" layout train "$LAYOUT_CONFIG_FLAG" "$CFG_LAYOUT_DOCBANK" "data.train_ann=$DATA/docbank/annotations.json" \
  "train.output_dir=$LAYD" data.repeat=3 "${LAYOUT_COMMON[@]}" "${TINY_LAYOUT[@]}"

stage layout_eval "layout_docbank" "$RUNS/layout_eval/metrics.json" "json $RUNS/layout_eval/metrics.json bbox/AP bbox/AP50" -- \
  "${BEIT[@]}" layout eval --ckpt "$LAYD/last.pt" --out "$RUNS/layout_eval"

DOC_PAGES=$(ls "$DATA"/docbank/images/*.jpg | head -3)
# shellcheck disable=SC2086
stage layout_predict "layout_docbank" "$RUNS/layout_predict/results.json $RUNS/layout_predict/*.png" "" -- \
  "${BEIT[@]}" layout predict --ckpt "$LAYD/last.pt" --out "$RUNS/layout_predict" $DOC_PAGES

stage layout_publaynet "" "$LAYP/last.pt $LAYP/metrics.jsonl $LAYP/ap_table.txt" "jsonl $LAYP/metrics.jsonl segm/AP bbox/AP" -- \
  "${BEIT[@]}" layout train "$LAYOUT_CONFIG_FLAG" "$CFG_LAYOUT_PUBLAYNET" \
  "data.train_ann=$DATA/publaynet/train.json" "data.train_images=$DATA/publaynet/train" \
  "data.val_ann=$DATA/publaynet/val.json" "data.val_images=$DATA/publaynet/val" \
  "train.output_dir=$LAYP" "${LAYOUT_COMMON[@]}" "${TINY_LAYOUT[@]}"

# ---------------------------------------------------------------------------------------------- summary
failed=0
for rc in "${RCS[@]}"; do [ "$rc" = 0 ] || failed=$(( failed + 1 )); done
{
  echo "gpu_smoke $(date -u +%Y-%m-%dT%H:%M:%SZ) $(head -2 "$OUT/env.log" | tr '\n' ' ') compile=$COMPILE cpu_mode=$CPU attn=${ATTN:-preset}"
  printf '%-18s %-8s %7s  %s\n' stage exit seconds "key metric"
  for i in "${!NAMES[@]}"; do
    printf '%-18s %-8s %7s  %s\n' "${NAMES[$i]}" "${RCS[$i]}" "${SECS[$i]}" "${METRICS[$i]}"
  done
  echo "total ${SECONDS}s; ${failed} stage(s) failed or skipped"
} | tee "$OUT/summary.txt"
"$PY" - "$OUT/summary.json" "${#NAMES[@]}" "${NAMES[@]}" "${RCS[@]}" "${SECS[@]}" "${METRICS[@]}" <<'PY'
import json, sys
path, n = sys.argv[1], int(sys.argv[2])
v = sys.argv[3:]
rows = [dict(stage=v[i], exit=v[n + i], seconds=int(v[2 * n + i]), metric=v[3 * n + i]) for i in range(n)]
json.dump(rows, open(path, "w"), indent=1)
PY
if [ -n "${PACK:-}" ]; then  # logs, metrics and pictures (no checkpoints) in one file, for $OUT of a GPU call
  (cd "$OUT" && find . -type f \( -name '*.log' -o -name '*.json' -o -name '*.jsonl' -o -name '*.txt' \
     -o -name '*.csv' -o -name '*.yaml' -o -name '*.png' \) -print0 | tar czf "$PACK" --null -T -)
  echo "packed $(du -h "$PACK" | cut -f1) into $PACK"
fi
[ "$failed" = 0 ]
