#!/usr/bin/env bash
# Run one maxprune command on every worker of a TPU VM slice, as one multi-host JAX job.
set -euo pipefail
source "$(dirname "$0")/common.sh"

usage() {
  cat <<USAGE
Usage: launch/tpu/run.sh --name NAME --zone ZONE --project PROJECT --job JOB [options] -- MAXPRUNE_ARGS...

Runs \`maxprune MAXPRUNE_ARGS...\` on all workers at once (gcloud ... ssh --worker all), in
~/maxprune, with MAXPRUNE_DISTRIBUTED=1 so every process joins the one JAX job (JAX
finds the coordinator from the TPU metadata). Each worker appends its output to
~/maxprune-logs/JOB.log; launch/tpu/logs.sh follows or fetches it.

  --job JOB            job name: the log file's name
  --env NAME=VALUE     extra environment for maxprune, e.g. LIBTPU_INIT_ARGS=... (repeatable)
  --detach             start in the background (nohup) and return; follow with logs.sh
  --gcs-mount DIR      pass gs://BUCKET/PATH arguments as DIR/BUCKET/PATH, where setup.sh
                       --bucket mounted them (default: /gcs; '' passes gs:// paths unchanged)
  --kill-stale         first kill processes still holding the TPU (a crashed earlier run)
$COMMON_HELP

Example:
  launch/tpu/run.sh --name pod --zone us-central2-b --project my-proj --job pretrain -- \\
    train gs://my-bkt/runs/P200B --config configs/train/paper.py:pretrain \\
    --config.data.train=gs://my-bkt/data/dclm-8192/train
USAGE
}

JOB='' DETACH=0 KILL=0 GCS_MOUNT=/gcs
ENVS=()
flags() {
  if common_flag "$@"; then TAKEN=2; return; fi
  case $1 in
    --job) has_value "$@"; JOB=$2; TAKEN=2 ;;
    --env) has_value "$@"; ENVS+=("$2"); TAKEN=2 ;;
    --detach) DETACH=1; TAKEN=1 ;;
    --gcs-mount) [[ $# -ge 2 ]] || die "--gcs-mount needs a value"; GCS_MOUNT=$2; TAKEN=2 ;;
    --kill-stale) KILL=1; TAKEN=1 ;;
  esac
}
TAKES_COMMAND=1 UNKNOWN_HINT="; put the maxprune command after --" parse_flags flags "$@"; set -- "${ARGS[@]}"
need_common
need "$JOB" "--job"
[[ $JOB =~ ^[A-Za-z0-9_.-]+$ ]] || die "--job '$JOB' may hold only letters, digits, '_', '.' and '-'"
(($#)) || die "no maxprune command given; e.g. -- train RUN_DIR --config FILE.py"
for kv in "${ENVS[@]}"; do
  [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env '$kv' is not NAME=VALUE"
done
require_gcloud

words=()
for arg in "$@"; do
  [[ -n $GCS_MOUNT ]] && arg=${arg//gs:\/\//${GCS_MOUNT%/}/}
  words+=("$(quote "$arg")")
done
log="~/maxprune-logs/$JOB.log"  # ~ expands on the worker
exports="export MAXPRUNE_DISTRIBUTED=1"
for kv in "${ENVS[@]}"; do exports+=" ${kv%%=*}=$(quote "${kv#*=}")"; done
remote="set -euo pipefail; mkdir -p ~/maxprune-logs; cd ~/maxprune; $exports"
((KILL)) && remote+="; sudo fuser -k -s /dev/accel* /dev/vfio/* || true; sudo rm -f /tmp/libtpu_lockfile"
if ((DETACH)); then
  remote+="; nohup ~/maxprune-venv/bin/maxprune ${words[*]} >>$log 2>&1 </dev/null &"
else
  remote+="; ~/maxprune-venv/bin/maxprune ${words[*]} 2>&1 | tee -a $log"
fi
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --project "$PROJECT" --worker all --command "$remote"
