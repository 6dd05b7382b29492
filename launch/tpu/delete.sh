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
mapfile -d '' -t argv < <(split_eq "$@"); set -- "${argv[@]}"
while (($#)); do
  if common_flag "$@"; then shift 2; continue; fi
  case $1 in
    --queued) QUEUED=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done
need_common
require_gcloud
where=(--zone "$ZONE" --project "$PROJECT" --quiet)
if ((QUEUED)); then
  run gcloud compute tpus queued-resources delete "$TPU_NAME" "${where[@]}" --force
else
  run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${where[@]}"
fi
