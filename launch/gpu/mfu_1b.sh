#!/usr/bin/env bash
# MFU of a ~1 B Llama train step in bf16 on one GPU: one command for when a GPU host is at hand.
set -euo pipefail
# shellcheck source=launch/lib.sh
source "$(dirname "$0")/../lib.sh"
REPO=$(cd "$(dirname "$0")/../.." && pwd)

usage() {
  cat <<USAGE
Usage: launch/gpu/mfu_1b.sh [--out DIR] [--all] [--dry-run] [-- EXTRA_MAXPRUNE_ARGS...]

Runs \`maxprune bench step\` for the llama-1b preset (16 layers, hidden 2048, FFN 8192,
32/8 heads, vocab 128256, tied embeddings; 1.24 B parameters) on GPU 0: bf16 compute,
cuDNN flash attention, batch 8 x seq 2048, no remat; writes DIR/bench_step.{md,json}
with step time, tokens/s and MFU against the GPU's data-sheet bf16 peak (H100/H200:
989 TFLOP/s dense). Extra arguments after -- override, e.g.
-- --config.train.global_batch=16 --config.model.remat=dots_with_no_batch_dims_saveable

  --out DIR            report directory (default: bench/mfu_1b)
  --all                also every pruned shape of Table 1 (the Table 9 comparison)
  --dry-run            print the command and run nothing
  -h, --help           this help
USAGE
}

OUT=bench/mfu_1b ALL=0
flags() {
  case $1 in
    --out) has_value "$@"; OUT=$2; TAKEN=2 ;;
    --all) ALL=1; TAKEN=1 ;;
  esac
}
TAKES_COMMAND=1 parse_flags flags "$@"; set -- "${ARGS[@]}"
variants=(--variants base)
((ALL)) && variants=()
dry=()
((DRY_RUN)) && dry=(--dry-run)
"$REPO/launch/gpu/run.sh" --gpus 1 "${dry[@]}" -- bench step \
  --config "$REPO/configs/model/llama_1b.py" --config.model.dtype=bfloat16 --config.model.attention=cudnn \
  --config.model.remat=none --config.train.global_batch=8 --seq-len 2048 --steps 10 --warmup 3 \
  "${variants[@]}" --out "$OUT" "$@"
