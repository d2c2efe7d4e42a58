#!/usr/bin/env bash
# Issue [repro]: CIFAR-10 tokenizer -> BEiT pre-training -> fine-tune vs from scratch + linear probes,
# with only the package's own commands. Two stages, each under the GPU machine's 10-minute limit;
# stage A's tokenizer and (bf16) encoder come back through $OUT and are carried into stage B.
#   bash benchmarks/cifar10_repro.sh A <cifar_dir> <out_dir>
#   bash benchmarks/cifar10_repro.sh B <cifar_dir> <out_dir> <stageA_dir>
# <cifar_dir> holds the extracted train/ and test/ class folders (see ../shared/data/README.md).
# Knobs (env): PRE_EPOCHS, FT_EPOCHS, SCRATCH_EPOCHS (default FT_EPOCHS; give it the pre-training's time too for
# the equal-GPU-time arm), ARMS (both | pretrained | scratch: the arms fine-tuned; scratch also skips the
# pre-trained encoder's linear probe), PROBES (1; 0 skips stage B's linear probes),
# PRE_TIMEOUT / FT_TIMEOUT / SCRATCH_TIMEOUT (seconds; that run is stopped with SIGTERM, saves, and
# train.resume=auto continues it when the stage is run again: a stage split over several GPU calls), TOK_STEPS,
# WIDTH / HEADS (encoder width and heads, 12 blocks, 4-px patches: 192 / 3 = 5.4M parameters, 384 / 6 = 21M),
# LD (the pre-trained arm's layer decay: 0.75, what the rows before 2026-12-07 ran; 0.85 gave 93.16%, RESULTS 2),
# PRE_EXTRA / FT_EXTRA / TOK_EXTRA (more KEY=VALUE overrides), RUN (the run folder, runs/cifar10: one a concurrent arm). Every training command runs with train.resume=auto: re-running a stage cut by the 10-minute limit (same machine) continues it. An encoder
# over 15 MB comes back as encoder/model.safetensors.part-* (the 16-MB file limit) and is joined in stage B.
# Each stage writes at most 6 files to <out_dir> (the GPU machine returns 8): PNGs and metrics go in one .tgz.
set -euo pipefail
usage="usage: cifar10_repro.sh A <cifar_dir> <out_dir> | B <cifar_dir> <out_dir> <stageA_dir>"
[ $# -ge 3 ] || { echo "$usage" >&2; exit 2; }
stage=$1; data=$2; out=$3; prev=${4:-}
case "$stage" in A) ;; B) [ -n "$prev" ] || { echo "$usage" >&2; exit 2; } ;; *) echo "$usage" >&2; exit 2 ;; esac
case "${ARMS:-both}" in both|pretrained|scratch) ;; *) echo "ARMS=${ARMS}: both, pretrained or scratch" >&2; exit 2 ;; esac
run=${RUN:-runs/cifar10}
mkdir -p "$out" "$run"
t() { local s=$SECONDS rc=0; "$@" || rc=$?; echo "[time] $(( SECONDS - s ))s (exit $rc): $*"; return $rc; }
# a command under `timeout LIMIT` when LIMIT is set: SIGTERM makes beit save a checkpoint and exit 143, and
# train.resume=auto continues it when the stage is run again (same machine)
limited() { local lim=$1; shift; if [ -n "$lim" ]; then timeout "$lim" "$@"; else "$@"; fi; }
PRE_EPOCHS=${PRE_EPOCHS:-40}
FT_EPOCHS=${FT_EPOCHS:-30}
TOK_STEPS=${TOK_STEPS:-3000}
SCRATCH_EPOCHS=${SCRATCH_EPOCHS:-$FT_EPOCHS}
WIDTH=${WIDTH:-192}; HEADS=${HEADS:-3}
ENC=(model_overrides.embed_dim="$WIDTH" model_overrides.depth=12 model_overrides.num_heads="$HEADS" model_overrides.patch_size=4)
read -r -a PRE_X <<< "${PRE_EXTRA:-}"; read -r -a FT_X <<< "${FT_EXTRA:-}"; read -r -a TOK_X <<< "${TOK_EXTRA:-}"

if [ "$stage" = A ]; then
  t python3 -m beit tokenizer train -c tokenizer_cifar10 data_dir="$data/train" \
      train.output_dir="$run"/tokenizer train.max_steps="$TOK_STEPS" train.warmup_steps=$(( TOK_STEPS / 20 + 1 )) \
      train.num_workers=14 train.resume=auto "${TOK_X[@]}"
  cp "$run"/tokenizer/dvae.safetensors "$out/"
  rc=0; t limited "${PRE_TIMEOUT:-}" python3 -m beit pretrain -c pretrain_cifar10_small data.path="$data/train" \
      tokenizer.path="$run"/tokenizer/dvae.safetensors train.output_dir="$run"/pretrain train.epochs="$PRE_EPOCHS" \
      train.warmup_epochs=$(( PRE_EPOCHS / 10 )) train.num_workers=14 train.image_every=100000 train.resume=auto \
      model.embed_dim="$WIDTH" model.num_heads="$HEADS" "${PRE_X[@]}" || rc=$?
  if [ $rc -ne 0 ]; then echo "stage A: pre-training stopped (exit $rc); run stage A again to continue it"; exit $rc; fi
  python3 -m beit convert "$run"/pretrain/final "$out/encoder" --dtype bf16
  if [ "$(stat -c %s "$out/encoder/model.safetensors")" -gt 15000000 ]; then
    split -b 15000000 "$out/encoder/model.safetensors" "$out/encoder/model.safetensors.part-" && rm "$out/encoder/model.safetensors"
  fi
  # one archive for the rest: the GPU machine returns at most 8 files (dvae + config + 3 parts + this)
  tar czf "$out/stageA_metrics.tgz" "$run"/tokenizer/tokenizer_metrics.json "$run"/tokenizer/metrics.jsonl \
      "$run"/tokenizer/recon_grid.png "$run"/pretrain/metrics.jsonl "$run"/pretrain/config.yaml \
      "$run"/pretrain/mim_panel.png "$run"/pretrain/curves.png
elif [ "$stage" = B ]; then
  if [ ! -f "$prev/encoder/model.safetensors" ] && compgen -G "$prev/encoder/model.safetensors.part-*" > /dev/null; then
    mkdir -p "$run"/encoder && cp "$prev/encoder/"*.json "$run"/encoder/ && cat "$prev/encoder/model.safetensors.part-"* > "$run"/encoder/model.safetensors
    prev=$run
  fi
  common=(data.train_dir="$data/train" data.val_dir="$data/test" train.num_workers=14 train.compile=true train.resume=auto)
  [ "${ARMS:-both}" = scratch ] || t limited "${FT_TIMEOUT:-}" python3 -m beit finetune -c finetune_cifar10_small \
      model="$prev/encoder" model_overrides={} train.output_dir="$run"/ft_pretrained "${common[@]}" train.lr=2e-3 \
      train.layer_decay="${LD:-0.75}" train.epochs="$FT_EPOCHS" train.warmup_epochs=$(( FT_EPOCHS / 10 )) "${FT_X[@]}" || true
  # SCRATCH_LD=1.0: no layer decay for a randomly initialised encoder (a fairer scratch baseline)
  [ "${ARMS:-both}" = pretrained ] || t limited "${SCRATCH_TIMEOUT:-}" python3 -m beit finetune \
      -c finetune_cifar10_small model=beit_tiny_patch16_224 "${ENC[@]}" \
      train.output_dir="$run"/ft_scratch "${common[@]}" train.lr=2e-3 train.layer_decay="${SCRATCH_LD:-0.75}" \
      train.epochs="$SCRATCH_EPOCHS" train.warmup_epochs=$(( SCRATCH_EPOCHS / 10 )) "${FT_X[@]}" || true
  [ "${PROBES:-1}" = 0 ] || [ "${ARMS:-both}" = scratch ] || t python3 -m beit linprobe -c linprobe_base model="$prev/encoder" img_size=32 layers=all \
      data.train_dir="$data/train" data.val_dir="$data/test" data.in_memory=true train.output_dir="$run"/lp_pretrained \
      train.epochs=20 train.num_workers=14 || true
  [ "${PROBES:-1}" = 0 ] || t python3 -m beit linprobe -c linprobe_base model=beit_tiny_patch16_224 \
      "model_overrides={patch_size: 4, embed_dim: $WIDTH, depth: 12, num_heads: $HEADS}" img_size=32 layers=all \
      data.train_dir="$data/train" data.val_dir="$data/test" data.in_memory=true train.output_dir="$run"/lp_scratch \
      train.epochs=20 train.num_workers=14 || true
  shopt -s nullglob  # what the arms that ran wrote (a path with spaces stays one word)
  results=("$run"/ft_*/eval "$run"/ft_*/metrics.jsonl "$run"/ft_*/config.yaml "$run"/ft_*/curves.png \
      "$run"/lp_*/linprobe.json "$run"/lp_*/config.yaml)
  tar czf "$out/stageB_results.tgz" "${results[@]}"
fi
