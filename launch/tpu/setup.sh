#!/usr/bin/env bash
# Install maxprune (and JAX for TPU) on every worker of a TPU VM slice.
set -euo pipefail
source "$(dirname "$0")/common.sh"
REPO=$(cd "$(dirname "$0")/../.." && pwd)

usage() {
  cat <<USAGE
Usage: launch/tpu/setup.sh --name NAME --zone ZONE --project PROJECT (--wheel FILE | --git URL) [options]

On every worker: a virtualenv ~/maxprune-venv with maxprune and jax[tpu], the configs
under ~/maxprune/configs (where launch/tpu/run.sh starts commands), ~/maxprune-logs,
and optionally Cloud Storage buckets mounted with gcsfuse at /gcs/BUCKET.

  --wheel FILE         copy this wheel (python -m build --wheel) to every worker and install it;
                       the local configs/ are copied beside it
  --configs DIR        configs to copy with --wheel (default: $REPO/configs)
  --git URL            clone URL into ~/maxprune on every worker and install it
  --ref REF            branch, tag or commit to check out with --git
  --extras LIST        pip extras, e.g. eval (default: none)
  --jax-version V      jax[tpu]==V (default: 0.10.2)
  --python PYTHON      interpreter for the venv, apt-installed if missing (default: python3.11;
                       maxprune needs >= 3.11, the TPU VM images ship 3.10)
  --bucket BUCKET      mount gs://BUCKET at /gcs/BUCKET with gcsfuse (repeatable); run.sh
                       passes gs://BUCKET/... paths to maxprune as /gcs/BUCKET/...
$COMMON_HELP
USAGE
}

WHEEL='' GIT='' REF='' EXTRAS='' JAX_VERSION=0.10.2 PYTHON=python3.11 CONFIGS=$REPO/configs
BUCKETS=()
flags() {
  if common_flag "$@"; then TAKEN=2; return; fi
  case $1 in
    --wheel) has_value "$@"; WHEEL=$2; TAKEN=2 ;;
    --configs) has_value "$@"; CONFIGS=$2; TAKEN=2 ;;
    --git) has_value "$@"; GIT=$2; TAKEN=2 ;;
    --ref) has_value "$@"; REF=$2; TAKEN=2 ;;
    --extras) has_value "$@"; EXTRAS=$2; TAKEN=2 ;;
    --jax-version) has_value "$@"; JAX_VERSION=$2; TAKEN=2 ;;
    --python) has_value "$@"; PYTHON=$2; TAKEN=2 ;;
    --bucket) has_value "$@"; BUCKETS+=("${2#gs://}"); TAKEN=2 ;;
  esac
}
parse_flags flags "$@"
need_common
[[ -n $WHEEL || -n $GIT ]] || die "--wheel FILE or --git URL is required"
[[ -n $WHEEL && -n $GIT ]] && die "give --wheel or --git, not both"
[[ -n $REF && -z $GIT ]] && die "--ref needs --git"
if [[ -n $WHEEL ]]; then
  [[ -f $WHEEL && $WHEEL == *.whl ]] || die "--wheel $WHEEL is not a wheel file"
  [[ -d $CONFIGS ]] || die "--configs $CONFIGS is not a directory"
fi
require_gcloud

where=(--zone "$ZONE" --project "$PROJECT" --worker all)
pip='~/maxprune-venv/bin/pip'  # ~ expands on the worker
extras=${EXTRAS:+[$EXTRAS]}

# 1. venv, log dir, buckets
py=$(quote "$PYTHON")
prepare="set -euo pipefail; mkdir -p ~/maxprune-logs"
prepare+="; if ! $py -c 'import ensurepip' 2>/dev/null; then sudo apt-get update -qq && sudo apt-get install -y -qq $py $py-venv; fi"
prepare+="; $py -m venv ~/maxprune-venv; $pip install -q -U pip"
if [[ -n $WHEEL ]]; then prepare+="; mkdir -p ~/maxprune"; fi
if ((${#BUCKETS[@]})); then
  prepare+="; if ! command -v gcsfuse >/dev/null; then"
  prepare+=" curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null;"
  prepare+=" echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null;"
  prepare+=" sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse; fi"
  for bucket in "${BUCKETS[@]}"; do
    mnt=$(quote "/gcs/$bucket")
    prepare+="; if ! mountpoint -q $mnt; then sudo mkdir -p $mnt && sudo chown \$USER $mnt && gcsfuse --implicit-dirs $(quote "$bucket") $mnt; fi"
  done
fi
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${where[@]}" --command "$prepare"

# 2. maxprune itself (`~/` stays unquoted so the worker's shell expands it)
jax=$(quote "jax[tpu]==$JAX_VERSION")
if [[ -n $WHEEL ]]; then
  run gcloud compute tpus tpu-vm scp "$WHEEL" "$TPU_NAME:maxprune/" "${where[@]}"
  run gcloud compute tpus tpu-vm scp --recurse "$CONFIGS" "$TPU_NAME:maxprune/" "${where[@]}"
  install="set -euo pipefail; $pip install -q ~/maxprune/$(quote "$(basename "$WHEEL")$extras") $jax"
else
  install="set -euo pipefail; rm -rf ~/maxprune; git clone -q $(quote "$GIT") ~/maxprune"
  if [[ -n $REF ]]; then install+="; git -C ~/maxprune checkout -q $(quote "$REF")"; fi
  install+="; $pip install -q ~/$(quote "maxprune$extras") $jax"
fi
install+="; ~/maxprune-venv/bin/maxprune --version"
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${where[@]}" --command "$install"
