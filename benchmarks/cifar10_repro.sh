#!/usr/bin/env bash
# Issue [repro]: CIFAR-10 tokenizer -> BEiT pre-training -> fine-tune vs from scratch + linear probes,
# with only the package's own commands. Two stages, each under the GPU machine's 10-minute limit;
# stage A's tokenizer and (bf16) encoder come back through $OUT and are carried into stage B.
#   bash benchmarks/cifar10_repro.sh A <cifar_dir> <out_dir>
#   bash benchmarks/cifar10_repro.sh B <cifar_dir> <out_dir> <stageA_dir>
# <cifar_dir> holds the extracted train/ and test/ class folders (see ../shared/data/README.md).
set -euo pipefail
stage=$1; data=$2; out=$3; prev=${4:-}
run=runs/cifar10
mkdir -p "$out" "$run"
t() { local s=$SECONDS; "$@"; echo "[time] $(( SECONDS - s ))s: $*"; }
PRE_EPOCHS=${PRE_EPOCHS:-40}
FT_EPOCHS=${FT_EPOCHS:-30}
TOK_STEPS=${TOK_STEPS:-3000}
ENC="model_overrides.embed_dim=192 model_overrides.depth=12 model_overrides.num_heads=3 model_overrides.patch_size=4"

if [ "$stage" = A ]; then
  t python3 -m beit tokenizer train -c tokenizer_cifar10 data_dir="$data/train" \
      train.output_dir=$run/tokenizer train.max_steps=$TOK_STEPS train.warmup_steps=$(( TOK_STEPS / 20 + 1 )) train.num_workers=14
  cp $run/tokenizer/dvae.safetensors $run/tokenizer/recon_grid.png "$out/"
  t python3 -m beit pretrain -c pretrain_cifar10_small data.path="$data/train" \
      tokenizer.path=$run/tokenizer/dvae.safetensors train.output_dir=$run/pretrain train.epochs=$PRE_EPOCHS \
      train.warmup_epochs=$(( PRE_EPOCHS / 10 )) train.num_workers=14 train.image_every=100000
  python3 -m beit convert $run/pretrain/final "$out/encoder" --dtype bf16
  cp $run/pretrain/mim_panel.png "$out/mim_panel.png"; cp $run/pretrain/curves.png "$out/pretrain_curves.png"
  tar czf "$out/stageA_metrics.tgz" $run/tokenizer/tokenizer_metrics.json $run/tokenizer/metrics.jsonl \
      $run/pretrain/metrics.jsonl $run/pretrain/config.yaml
elif [ "$stage" = B ]; then
  common="data.train_dir=$data/train data.val_dir=$data/test train.epochs=$FT_EPOCHS train.warmup_epochs=$(( FT_EPOCHS / 10 )) \
          train.num_workers=14 train.compile=true"
  [ "${ARMS:-both}" = scratch ] || t python3 -m beit finetune -c finetune_cifar10_small \
      model="$prev/encoder" model_overrides={} train.output_dir=$run/ft_pretrained $common train.lr=2e-3 \
      train.layer_decay=0.75
  # SCRATCH_LD=1.0: no layer decay for a randomly initialised encoder (a fairer scratch baseline)
  [ "${ARMS:-both}" = pretrained ] || t timeout ${SCRATCH_TIMEOUT:-100000} python3 -m beit finetune \
      -c finetune_cifar10_small model=beit_tiny_patch16_224 $ENC \
      train.output_dir=$run/ft_scratch $common train.lr=2e-3 train.layer_decay=${SCRATCH_LD:-0.75} || true
  for arm in pretrained scratch; do cp $run/ft_$arm/curves.png "$out/ft_${arm}_curves.png" || true; done
  t python3 -m beit linprobe -c linprobe_base model="$prev/encoder" img_size=32 layers=all \
      data.train_dir=$data/train data.val_dir=$data/test data.in_memory=true train.output_dir=$run/lp_pretrained \
      train.epochs=20 train.num_workers=14 || true
  t python3 -m beit linprobe -c linprobe_base model=beit_tiny_patch16_224 \
      "model_overrides={patch_size: 4, embed_dim: 192, depth: 12, num_heads: 3}" img_size=32 layers=all \
      data.train_dir=$data/train data.val_dir=$data/test data.in_memory=true train.output_dir=$run/lp_scratch \
      train.epochs=20 train.num_workers=14 || true
  tar czf "$out/stageB_results.tgz" $(ls -d $run/ft_*/eval $run/ft_*/metrics.jsonl $run/ft_*/config.yaml \
      $run/lp_*/linprobe.json $run/lp_*/config.yaml 2>/dev/null)
fi
