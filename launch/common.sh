# shellcheck shell=bash
# shellcheck disable=SC2034 # PREEMPTED, TRAIN_COMMAND, STATUS, GPU_MEMORY: for the sourcing scripts.
# Shared by the launch scripts (sourced, not run): arguments, --dry-run, waiting for a run.
#
# Every script takes: RECIPE WORKDIR [more vit-train flags...], and --dry-run anywhere.
# With --dry-run, every command is printed (shell-quoted, one per line, ready to paste)
# instead of run. The scripts do not change directory: a relative WORKDIR, data_dir or
# model_init is relative to where the script was started, as for vit-train itself, and a
# RECIPE that is not there is looked up in this repository (configs/... works anywhere).

# vit-train's exit status after SIGTERM, SIGINT or a preemption notice, once its checkpoint
# is saved (vit_jax/preemption.py): rerun the same command to resume.
readonly PREEMPTED=75
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

DRY_RUN=0
TRAIN_COMMAND=()
STATUS=0

usage() {
  echo "$0: $1" >&2
  echo "usage: $0 RECIPE WORKDIR [vit-train flags...] [--dry-run]" >&2
  echo "  e.g. $0 configs/pretrain.py:variant=B/16 /data/runs/b16 --config.batch_size=1024" >&2
  exit 2
}

parse_args() {
  local arg positional=()
  for arg in "$@"; do
    if [ "$arg" = --dry-run ]; then
      DRY_RUN=1
    else
      positional+=("$arg")
    fi
  done
  [ ${#positional[@]} -ge 2 ] || usage "RECIPE and WORKDIR are required"
  for arg in "${positional[@]:0:2}"; do
    case $arg in -*) usage "RECIPE and WORKDIR come first; got the flag $arg" ;; esac
  done
  TRAIN_COMMAND=(vit-train --config "$(recipe_path "${positional[0]}")" --workdir
    "${positional[1]}" "${positional[@]:2}")
}

# The recipe FILE[:ARGS] as typed when FILE is there (or the run happens in a clone of
# this repository elsewhere: RECIPE_IN_CLONE=1), else this repository's FILE.
recipe_path() {
  local file=${1%%:*}
  if [ "${RECIPE_IN_CLONE:-0}" = 1 ] || [ -e "$file" ] || [ ! -e "$REPO_ROOT/$file" ]; then
    echo "$1"
  else
    echo "$REPO_ROOT/$1"
  fi
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

# Replaces this shell with a command (so that signals reach it directly), or prints the
# command under --dry-run: without `exec`, which would end the shell it is pasted into.
run_in_place() {
  if [ "$DRY_RUN" = 1 ]; then
    quote "$@"
  else
    exec "$@"
  fi
}

# The GPU scripts' environment for vit-train: XLA takes 90% of each GPU's memory up front
# (JAX's default is 75%) unless the environment names a share. JAX refuses its
# XLA_CLIENT_MEM_FRACTION together with the older XLA_PYTHON_CLIENT_MEM_FRACTION, so a
# user's own, either one, is left to reach vit-train alone.
GPU_MEMORY=()
[ -n "${XLA_CLIENT_MEM_FRACTION:-}${XLA_PYTHON_CLIENT_MEM_FRACTION:-}" ] ||
  GPU_MEMORY=(XLA_CLIENT_MEM_FRACTION=0.9)

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
