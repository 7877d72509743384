# shellcheck shell=bash
# shellcheck disable=SC2034 # PREEMPTED, TRAIN_COMMAND, STATUS are for the sourcing scripts.
# Shared by the launch scripts (sourced, not run): arguments, --dry-run, waiting for a run.
#
# Every script takes: [--dry-run] RECIPE WORKDIR [more vit-train flags...]
# With --dry-run, every command is printed (shell-quoted, one per line) instead of run.

# vit-train's exit status after SIGTERM, SIGINT or a preemption notice, once its checkpoint
# is saved (vit_jax/preemption.py): rerun the same command to resume.
readonly PREEMPTED=75

DRY_RUN=0
TRAIN_COMMAND=()
STATUS=0

usage() {
  echo "usage: $0 [--dry-run] RECIPE WORKDIR [vit-train flags...]" >&2
  echo "  e.g. $0 configs/pretrain.py:variant=B/16 /data/runs/b16 --config.batch_size=1024" >&2
  exit 2
}

parse_args() {
  if [ "${1:-}" = "--dry-run" ]; then
    DRY_RUN=1
    shift
  fi
  [ $# -ge 2 ] || usage
  TRAIN_COMMAND=(vit-train --config "$1" --workdir "$2" "${@:3}")
}

# Shell-quotes its arguments readably: bare words when safe, else in single quotes.
quote() {
  local word words=()
  for word in "$@"; do
    if [[ $word =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      words+=("$word")
    else
      words+=("'${word//\'/\'\\\'\'}'")
    fi
  done
  echo "${words[*]}"
}

# Runs a command, or prints it (quoted) under --dry-run.
run() {
  if [ "$DRY_RUN" = 1 ]; then
    quote "$@"
  else
    "$@"
  fi
}

# Runs a command in the background and waits for it, also through SIGTERM/SIGINT sent to
# this shell (which are for the command: it saves and exits), and sets STATUS to its exit.
run_to_the_end() {
  STATUS=0
  if [ "$DRY_RUN" = 1 ]; then
    run "$@"
    return
  fi
  trap 'echo "$0: signal received; waiting for the run to save its checkpoint" >&2' TERM INT
  "$@" &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    wait "$pid" || true # Returns early when a trapped signal arrives.
  done
  wait "$pid" || STATUS=$? # Bash keeps the finished job's status.
  trap - TERM INT
}
