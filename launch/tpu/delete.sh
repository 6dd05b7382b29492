#!/usr/bin/env bash
# Delete a TPU VM slice (or its queued resource).
set -euo pipefail
source "$(dirname "$0")/common.sh"

usage() {
  cat <<USAGE
Usage: launch/tpu/delete.sh --name NAME --zone ZONE --project PROJECT [--queued]

Deletes the slice without asking. Checkpoints and data on gs:// stay; the workers'
local disks (~/maxprune-logs) go: fetch logs first with logs.sh --fetch.

  --queued             it was created as a queued resource (deletes the resource and its VM)
$COMMON_HELP
USAGE
}

QUEUED=0
flags() {
  if common_flag "$@"; then TAKEN=2; return; fi
  case $1 in
    --queued) QUEUED=1; TAKEN=1 ;;
  esac
}
parse_flags flags "$@"
need_common
require_gcloud
where=(--zone "$ZONE" --project "$PROJECT" --quiet)
if ((QUEUED)); then
  run gcloud compute tpus queued-resources delete "$TPU_NAME" "${where[@]}" --force
else
  run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${where[@]}"
fi
