# shellcheck shell=bash
# Shared helpers for the launch scripts (sourced, not run).
#
# Every script: `--help`; `--dry-run` prints the exact commands it would run, one per
# line, shell-quoted the way Python's shlex.quote does; user mistakes print one line
# `SCRIPT: error: ...` and exit 2.

PROG=${PROG:-$(basename "$0")}
DRY_RUN=0

die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit 2
}

# quote ARG: ARG as one shell word (shlex.quote rules: bare if safe, else single-quoted).
quote() {
  local s=$1
  if [[ $s =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\"\'\"\'}"
  fi
}

# quote_cmd ARG...: one line, every word quoted.
quote_cmd() {
  local words=() word
  for word in "$@"; do words+=("$(quote "$word")"); done
  printf '%s\n' "${words[*]}"
}

# run CMD...: print it (dry run) or run it.
run() {
  if ((DRY_RUN)); then quote_cmd "$@"; else "$@"; fi
}

# need VALUE WHAT: die unless VALUE is set; WHAT names the flag and env variable.
need() {
  [[ -n $1 ]] || die "$2 is required"
}

require_gcloud() {
  ((DRY_RUN)) || command -v gcloud >/dev/null 2>&1 ||
    die "gcloud not found on PATH; install the Google Cloud SDK (https://cloud.google.com/sdk/docs/install) or use --dry-run"
}

# split_eq ARG...: prints each --flag=value before a bare `--` as two NUL-separated words.
# Use: mapfile -d '' -t args < <(split_eq "$@"); set -- "${args[@]}"
split_eq() {
  local a rest=0
  for a in "$@"; do
    if ((rest)) || [[ $a == -- ]]; then rest=1; printf '%s\0' "$a"
    elif [[ $a == --*=* ]]; then printf '%s\0%s\0' "${a%%=*}" "${a#*=}"
    else printf '%s\0' "$a"
    fi
  done
}

# has_value FLAG [NEXT...]: die unless FLAG is followed by a value (use: has_value "$@"; X=$2).
has_value() {
  [[ $# -ge 2 && $2 != --* ]] || die "$1 needs a value"
}

# parse_flags HANDLER ARG...: the option loop of every launcher. Each --flag=value is split first;
# then, per argument, HANDLER "$@" handles the script's own flags, setting TAKEN to the words it
# used (1 or 2) and leaving it 0 for one it does not know. --dry-run and -h/--help are handled
# here. With TAKES_COMMAND=1 the words after `--` are left in ARGS; any other argument is an error,
# UNKNOWN_HINT added to its message.
parse_flags() {
  local handler=$1 argv
  shift
  mapfile -d '' -t argv < <(split_eq "$@"); set -- "${argv[@]}"
  ARGS=()
  while (($#)); do
    TAKEN=0
    "$handler" "$@"
    if ((TAKEN)); then shift "$TAKEN"; continue; fi
    case $1 in
      --dry-run) DRY_RUN=1 ;;
      -h | --help) usage; exit 0 ;;
      *)
        if [[ $1 == -- ]] && ((${TAKES_COMMAND:-0})); then shift; ARGS=("$@"); return; fi
        die "unknown argument '$1'${UNKNOWN_HINT:-} (see --help)" ;;
    esac
    shift
  done
}
