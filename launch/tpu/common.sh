# shellcheck shell=bash
# Shared by launch/tpu/*.sh (sourced): the slice's name, zone and project, and what an
# accelerator type implies. Flags override the MAXPRUNE_* environment variables.

# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

TPU_NAME=${MAXPRUNE_TPU_NAME:-}
ZONE=${MAXPRUNE_TPU_ZONE:-}
PROJECT=${MAXPRUNE_GCP_PROJECT:-}
ACCELERATOR=${MAXPRUNE_TPU_TYPE:-}

COMMON_HELP="  --name NAME          TPU VM / queued resource name   (env MAXPRUNE_TPU_NAME)
  --zone ZONE          e.g. us-central2-b                (env MAXPRUNE_TPU_ZONE)
  --project PROJECT    Google Cloud project              (env MAXPRUNE_GCP_PROJECT)
  --dry-run            print the commands, one per line, and run nothing
  -h, --help           this help"

# common_flag FLAG VALUE: set a shared flag; returns 1 if FLAG is not one.
common_flag() {
  case $1 in
    --name) has_value "$@"; TPU_NAME=$2 ;;
    --zone) has_value "$@"; ZONE=$2 ;;
    --project) has_value "$@"; PROJECT=$2 ;;
    *) return 1 ;;
  esac
}

need_common() {
  need "$TPU_NAME" "--name (or MAXPRUNE_TPU_NAME)"
  need "$ZONE" "--zone (or MAXPRUNE_TPU_ZONE)"
  need "$PROJECT" "--project (or MAXPRUNE_GCP_PROJECT)"
}

# gcloud_type TYPE: the name gcloud knows (v5e-N is v5litepod-N); dies on an unknown type.
gcloud_type() {
  case $1 in
    v4-[0-9]* | v5p-[0-9]* | v5litepod-[0-9]* | v6e-[0-9]*) printf '%s' "$1" ;;
    v5e-[0-9]*) printf 'v5litepod-%s' "${1#v5e-}" ;;
    *) die "unknown accelerator type '$1'; use v4-N, v5p-N, v5e-N (v5litepod-N) or v6e-N, e.g. v4-256" ;;
  esac
}

# default_runtime TYPE: the TPU VM software version for that generation.
default_runtime() {
  case $1 in
    v4-*) printf 'tpu-ubuntu2204-base' ;;
    v5p-*) printf 'v2-alpha-tpuv5' ;;
    v5litepod-* | v5e-*) printf 'v2-alpha-tpuv5-lite' ;;
    v6e-*) printf 'v2-alpha-tpuv6e' ;;
  esac
}

# num_hosts TYPE: TPU VM workers of a slice (v4/v5p count TensorCores, 2 per chip, 4 chips
# per host; v5e/v6e count chips, up to 8 on one host, else 4 per host).
num_hosts() {
  local n=${1##*-}
  case $1 in
    v4-* | v5p-*) n=$((n / 8)) ;;
    *) if ((n <= 8)); then n=1; else n=$((n / 4)); fi ;;
  esac
  printf '%s' $((n < 1 ? 1 : n))
}
