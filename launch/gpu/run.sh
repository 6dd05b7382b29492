#!/usr/bin/env bash
# Run a maxprune command on one host's GPUs (one JAX process drives them all).
set -euo pipefail
# shellcheck source=launch/lib.sh
source "$(dirname "$0")/../lib.sh"

usage() {
  cat <<USAGE
Usage: launch/gpu/run.sh [--gpus N] [--mem-fraction F] [--dry-run] -- MAXPRUNE_ARGS...

Runs \`maxprune MAXPRUNE_ARGS...\` with the environment a single-host GPU run wants: the
first N GPUs visible (default: all), XLA's GPU memory pool at fraction F of each GPU
(default 0.90) and XLA's latency-hiding scheduler on (overlaps collectives with compute
across the N GPUs). The mesh is the config's (default: FSDP over all GPUs). Needs
\`pip install "jax[cuda12]==<jax version>"\` after maxprune.

  --gpus N             use GPUs 0..N-1 (sets CUDA_VISIBLE_DEVICES)
  --mem-fraction F     XLA_PYTHON_CLIENT_MEM_FRACTION (default: 0.90)
  --dry-run            print the command and run nothing
  -h, --help           this help

Example:
  launch/gpu/run.sh --gpus 8 -- train runs/S50 --config configs/train/paper.py:scratch \\
    --config.data.train=/data/dclm-8192/train
USAGE
}

GPUS='' MEM_FRACTION=0.90
flags() {
  case $1 in
    --gpus) has_value "$@"; GPUS=$2; TAKEN=2 ;;
    --mem-fraction) has_value "$@"; MEM_FRACTION=$2; TAKEN=2 ;;
  esac
}
TAKES_COMMAND=1 UNKNOWN_HINT="; put the maxprune command after --" parse_flags flags "$@"; set -- "${ARGS[@]}"
(($#)) || die "no maxprune command given; e.g. -- train RUN_DIR --config FILE.py"
[[ -z $GPUS || $GPUS =~ ^[1-9][0-9]*$ ]] || die "--gpus '$GPUS' must be a positive integer"
[[ $MEM_FRACTION =~ ^(0?\.[0-9]+|1(\.0*)?)$ ]] || die "--mem-fraction '$MEM_FRACTION' must be in (0, 1]"

envs=(env "XLA_PYTHON_CLIENT_MEM_FRACTION=$MEM_FRACTION"
  "XLA_FLAGS=${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_enable_latency_hiding_scheduler=true")
if [[ -n $GPUS ]]; then
  envs+=("CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((GPUS - 1)))")
fi
run "${envs[@]}" "${MAXPRUNE:-maxprune}" "$@"
