#!/usr/bin/env bash
# Follow a job's log on one worker, or fetch every worker's log.
set -euo pipefail
source "$(dirname "$0")/common.sh"

usage() {
  cat <<USAGE
Usage: launch/tpu/logs.sh --name NAME --zone ZONE --project PROJECT --job JOB [--worker W | --fetch DIR --type TYPE]

Without --fetch: follow ~/maxprune-logs/JOB.log on one worker (default 0: the process
that writes metrics, checkpoints' metadata and the progress bar) until interrupted.
With --fetch: copy every worker's log to DIR/JOB/worker-W.log.

  --job JOB            the job name given to run.sh
  --worker W           worker to follow (default: 0)
  --fetch DIR          fetch all workers' logs into DIR/JOB/
  --type TYPE          accelerator type, to know the number of workers (env MAXPRUNE_TPU_TYPE)
  --workers N          number of workers (instead of --type)
$COMMON_HELP
USAGE
}

JOB='' WORKER=0 FETCH='' WORKERS=''
flags() {
  if common_flag "$@"; then TAKEN=2; return; fi
  case $1 in
    --job) has_value "$@"; JOB=$2; TAKEN=2 ;;
    --worker) has_value "$@"; WORKER=$2; TAKEN=2 ;;
    --fetch) has_value "$@"; FETCH=$2; TAKEN=2 ;;
    --type) has_value "$@"; ACCELERATOR=$2; TAKEN=2 ;;
    --workers) has_value "$@"; WORKERS=$2; TAKEN=2 ;;
  esac
}
parse_flags flags "$@"
need_common
need "$JOB" "--job"
[[ $WORKER =~ ^[0-9]+$ ]] || die "--worker '$WORKER' must be a worker number"
where=(--zone "$ZONE" --project "$PROJECT")
log="~/maxprune-logs/$JOB.log"  # ~ expands on the worker
if [[ -z $FETCH ]]; then
  require_gcloud
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${where[@]}" --worker "$WORKER" --command "tail -n +1 -F $log"
  exit 0
fi
if [[ -z $WORKERS ]]; then
  need "$ACCELERATOR" "--type (or MAXPRUNE_TPU_TYPE) or --workers, to fetch every worker's log"
  WORKERS=$(num_hosts "$(gcloud_type "$ACCELERATOR")")
fi
[[ $WORKERS =~ ^[1-9][0-9]*$ ]] || die "--workers '$WORKERS' must be a positive number"
require_gcloud
run mkdir -p "$FETCH/$JOB"
for ((w = 0; w < WORKERS; w++)); do
  run gcloud compute tpus tpu-vm scp "$TPU_NAME:maxprune-logs/$JOB.log" "$FETCH/$JOB/worker-$w.log" "${where[@]}" --worker "$w"
done
