#!/usr/bin/env bash
# Create a TPU VM slice (or a queued resource for one).
set -euo pipefail
source "$(dirname "$0")/common.sh"

usage() {
  cat <<USAGE
Usage: launch/tpu/create.sh --name NAME --zone ZONE --project PROJECT --type TYPE [options]

Create a TPU VM slice, directly or as a queued resource (the way to get large slices
and spot capacity). Then install maxprune with launch/tpu/setup.sh.

  --type TYPE          accelerator type: v4-8 ... v4-4096, v5p-8 ..., v5e-N / v5litepod-N,
                       v6e-N                              (env MAXPRUNE_TPU_TYPE)
  --runtime VERSION    TPU VM software version (default by generation: v4 tpu-ubuntu2204-base,
                       v5p v2-alpha-tpuv5, v5e v2-alpha-tpuv5-lite, v6e v2-alpha-tpuv6e)
                                                          (env MAXPRUNE_TPU_RUNTIME)
  --queued             create a queued resource instead of the VM directly
  --spot               spot capacity (preemptible)
  --reserved           use the project's reservation (queued resources only)
  --wait               queued: poll until the resource is ACTIVE
$COMMON_HELP
USAGE
}

RUNTIME=${MAXPRUNE_TPU_RUNTIME:-}
QUEUED=0 SPOT=0 RESERVED=0 WAIT=0
flags() {
  if common_flag "$@"; then TAKEN=2; return; fi
  case $1 in
    --type) has_value "$@"; ACCELERATOR=$2; TAKEN=2 ;;
    --runtime) has_value "$@"; RUNTIME=$2; TAKEN=2 ;;
    --queued) QUEUED=1; TAKEN=1 ;;
    --spot) SPOT=1; TAKEN=1 ;;
    --reserved) RESERVED=1; TAKEN=1 ;;
    --wait) WAIT=1; TAKEN=1 ;;
  esac
}
parse_flags flags "$@"
need_common
need "$ACCELERATOR" "--type (or MAXPRUNE_TPU_TYPE)"
TYPE=$(gcloud_type "$ACCELERATOR")
RUNTIME=${RUNTIME:-$(default_runtime "$TYPE")}
((SPOT && RESERVED)) && die "--spot and --reserved exclude each other"
((RESERVED && !QUEUED)) && die "--reserved needs --queued"
((WAIT && !QUEUED)) && die "--wait needs --queued (a direct create already waits)"
require_gcloud

where=(--zone "$ZONE" --project "$PROJECT")
capacity=()
((SPOT)) && capacity=(--spot)
((RESERVED)) && capacity=(--reserved)
if ((QUEUED)); then
  run gcloud compute tpus queued-resources create "$TPU_NAME" --node-id "$TPU_NAME" "${where[@]}" \
    --accelerator-type "$TYPE" --runtime-version "$RUNTIME" "${capacity[@]}"
  if ((WAIT)); then
    describe=(gcloud compute tpus queued-resources describe "$TPU_NAME" "${where[@]}" --format 'value(state.state)')
    if ((DRY_RUN)); then
      quote_cmd "${describe[@]}"
    else
      until [[ $("${describe[@]}") == ACTIVE ]]; do sleep 30; done
    fi
  fi
else
  run gcloud compute tpus tpu-vm create "$TPU_NAME" "${where[@]}" \
    --accelerator-type "$TYPE" --version "$RUNTIME" "${capacity[@]}"
fi
