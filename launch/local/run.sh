#!/usr/bin/env bash
# Run a command as K JAX processes on this machine (CPU, fake devices): multi-host code, tested locally.
set -euo pipefail
# shellcheck source=launch/lib.sh
source "$(dirname "$0")/../lib.sh"

usage() {
  cat <<USAGE
Usage: launch/local/run.sh [--processes K] [--devices D] [--port PORT] [--log-dir DIR] [--timeout S] [--dry-run] -- COMMAND...

Starts K copies of COMMAND (e.g. \`maxprune train RUN --config ...\`) on this machine, each
a JAX process on the CPU with D fake devices (XLA_FLAGS), joined into one job by
MAXPRUNE_COORDINATOR=127.0.0.1:PORT, MAXPRUNE_NUM_PROCESSES=K and MAXPRUNE_PROCESS_ID.
Process 0's output streams here; every process's output is in DIR/process-I.log.
When one process fails the others are stopped; the exit status is the first failure's.

  --processes K        processes (default: 2)
  --devices D          fake CPU devices per process (default: 2)
  --port PORT          coordinator port (default: a free one)
  --log-dir DIR        where the logs go (default: a new temporary directory)
  --timeout S          MAXPRUNE_INIT_TIMEOUT: seconds to wait for the coordinator (default: 60)
  --dry-run            print each process's command, one per line, and run nothing
  -h, --help           this help
USAGE
}

PROCESSES=2 DEVICES=2 PORT='' LOG_DIR='' TIMEOUT=60
flags() {
  case $1 in
    --processes) has_value "$@"; PROCESSES=$2; TAKEN=2 ;;
    --devices) has_value "$@"; DEVICES=$2; TAKEN=2 ;;
    --port) has_value "$@"; PORT=$2; TAKEN=2 ;;
    --log-dir) has_value "$@"; LOG_DIR=$2; TAKEN=2 ;;
    --timeout) has_value "$@"; TIMEOUT=$2; TAKEN=2 ;;
  esac
}
TAKES_COMMAND=1 UNKNOWN_HINT="; put the command after --" parse_flags flags "$@"; set -- "${ARGS[@]}"
(($#)) || die "no command given; e.g. -- maxprune train RUN_DIR --config FILE.py"
for pair in "--processes:$PROCESSES" "--devices:$DEVICES" "--timeout:$TIMEOUT" "--port:${PORT:-1}"; do
  [[ ${pair#*:} =~ ^[1-9][0-9]*$ ]] || die "${pair%%:*} '${pair#*:}' must be a positive integer"
done
if [[ -z $PORT ]]; then
  PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi

# Each process's XLA_FLAGS: the caller's, minus any device count, plus ours.
xla_flags=$(printf '%s' "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g; s/  +/ /g; s/^ | $//g')
xla_flags="${xla_flags:+$xla_flags }--xla_force_host_platform_device_count=$DEVICES"
env_for() {
  printf '%s\0' env JAX_PLATFORMS=cpu "XLA_FLAGS=$xla_flags" "MAXPRUNE_COORDINATOR=127.0.0.1:$PORT" \
    "MAXPRUNE_NUM_PROCESSES=$PROCESSES" "MAXPRUNE_PROCESS_ID=$1" "MAXPRUNE_INIT_TIMEOUT=$TIMEOUT"
}

if ((DRY_RUN)); then
  for ((i = 0; i < PROCESSES; i++)); do
    mapfile -d '' -t prefix < <(env_for "$i")
    quote_cmd "${prefix[@]}" "$@"
  done
  exit 0
fi

LOG_DIR=${LOG_DIR:-$(mktemp -d -t maxprune-local.XXXXXX)}
mkdir -p "$LOG_DIR"
pids=()
stop_all() {
  local pid
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap 'stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM
for ((i = 0; i < PROCESSES; i++)); do
  mapfile -d '' -t prefix < <(env_for "$i")
  "${prefix[@]}" "$@" >"$LOG_DIR/process-$i.log" 2>&1 &
  pids+=($!)
done
tail -n +1 -f --pid "${pids[0]}" "$LOG_DIR/process-0.log" &
tailer=$!

status=0 failed=''
running=("${pids[@]}")
while ((${#running[@]})); do
  code=0
  wait -n -p done_pid "${running[@]}" || code=$?
  for i in "${!running[@]}"; do [[ ${running[$i]} == "$done_pid" ]] && unset 'running[i]'; done
  if ((code != 0 && status == 0)); then
    status=$code
    for i in "${!pids[@]}"; do [[ ${pids[$i]} == "$done_pid" ]] && failed=$i; done
    stop_all
  fi
done
wait "$tailer" 2>/dev/null || true
if ((status != 0)); then
  if [[ $failed != 0 ]]; then
    printf '%s: process %s failed (exit %s); the end of its log:\n' "$PROG" "$failed" "$status" >&2
    tail -n 20 "$LOG_DIR/process-$failed.log" >&2
  fi
  printf '%s: process %s failed with exit status %s; logs in %s\n' "$PROG" "$failed" "$status" "$LOG_DIR" >&2
fi
exit "$status"
