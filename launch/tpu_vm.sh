#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (v4, v5e, v5p, v6e, TPU7x; any size): create the slice
# with a queued resource, install vit_jax on every worker, run the same vit-train on all of
# them with their logs streamed here, then delete the slice. If the slice is preempted
# (vit-train exits 75 after saving, or the slice is gone, while installing too), a new one
# is created and the run resumes.
#
#   export TPU_NAME=vit ZONE=us-central1-a ACCELERATOR_TYPE=v5litepod-16 \
#          RUNTIME_VERSION=v2-alpha-tpuv5-lite REPO=https://github.com/you/vit_jax.git
#   launch/tpu_vm.sh configs/pretrain.py:variant=B/16 gs://bucket/runs/b16 [--config.k=v ...]
#   launch/tpu_vm.sh configs/local.py gs://bucket/runs/smoke --dry-run      # print, don't run
#
# Optional: BRANCH (default main), SPOT=1 (spot capacity), MAX_ATTEMPTS (default 10),
# NUM_SLICES=N for a multi-slice run (N slices of ACCELERATOR_TYPE joined by the data-center
# network; config.dcn_mesh puts data parallelism across them), CHECK_FIT=1 to compile the
# recipe for the target here first (vit-bench compile, the compile extra; v5e, v5p, v6e,
# TPU7x) and stop if it does not fit. LIBTPU_INIT_ARGS, when set, reaches vit-train on every
# worker: the TPU compiler flags the fit check compiled with are the ones the slice runs with,
# and the workers install the libtpu release it compiled with (the tpu extra).
# The workdir and any data_dir must be on GCS: every worker writes there and a new slice
# starts with empty disks; RECIPE is a path inside the repository clone on the workers.
# jax.distributed detects the slice by itself (--distributed).
set -euo pipefail
RECIPE_IN_CLONE=1 # vit-train runs in each worker's clone of the repository.
# shellcheck source=launch/common.sh
. "$(dirname "$0")/common.sh"
parse_args "$@"
case ${TRAIN_COMMAND[4]} in
  /* | *://*) ;;
  *) usage "WORKDIR ${TRAIN_COMMAND[4]} is relative: the workers need a gs:// one" ;;
esac
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${ACCELERATOR_TYPE:?set ACCELERATOR_TYPE}"
: "${RUNTIME_VERSION:?set RUNTIME_VERSION}" "${REPO:?set REPO to the git URL of vit_jax}"
BRANCH=${BRANCH:-main}
NUM_SLICES=${NUM_SLICES:-1}
QUEUED=${TPU_NAME}-queued
TPUS=(gcloud compute tpus)
SPOT_FLAG=()
[ "${SPOT:-0}" = 0 ] || SPOT_FLAG=(--spot)

INSTALL="set -e; [ -d vit_jax ] || git clone -q $(quote "$REPO") vit_jax; cd vit_jax; \
git fetch -q origin $(quote "$BRANCH"); git checkout -q FETCH_HEAD; \
python3 -m venv .venv; . .venv/bin/activate; pip install -q -e '.[tpu]'"
# One id for every slice of this run: a slice that died holding the workdir's lock is
# recognised by the next one (vit_jax/workdir.py) as an earlier try of the same run.
RUN_ID=${TPU_NAME}-$(date -u +%Y%m%dT%H%M%S)
TRAIN_ENV=(VIT_RUN_ID="$RUN_ID")
[ -z "${LIBTPU_INIT_ARGS:-}" ] || TRAIN_ENV+=(LIBTPU_INIT_ARGS="$LIBTPU_INIT_ARGS")

# What each worker runs for try $1; it keeps vit-train's exit status for worker 0 to report.
train_on_workers() {
  on_workers all "cd vit_jax && . .venv/bin/activate && \
$(quote env "${TRAIN_ENV[@]}" VIT_RUN_ATTEMPT="$1" "${TRAIN_COMMAND[@]}") --distributed; \
echo \$? > ~/vit_train_status"
}

# Worker $1 ("all" or an index) of every slice; the status is read from slice 0's worker 0.
on_workers() {
  if [ "$NUM_SLICES" = 1 ]; then
    run "${TPUS[@]}" tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker="$1" --command "$2"
  else
    local node=all
    [ "$1" = all ] || node=0
    run "${TPUS[@]}" queued-resources ssh "$QUEUED" --zone "$ZONE" --node="$node" \
      --worker="$1" --command "$2"
  fi
}

DESCRIBE=("${TPUS[@]}" queued-resources describe "$QUEUED" --zone "$ZONE"
  --format='value(state.state)')

wait_until_active() {
  if [ "$DRY_RUN" = 1 ]; then
    run "${DESCRIBE[@]}"
    return
  fi
  local state failures=0 # gcloud failing now and then is no reason to give the slice up.
  while true; do
    if state=$("${DESCRIBE[@]}"); then
      failures=0
      case $state in
        ACTIVE) return 0 ;;
        FAILED | SUSPENDED) echo "$0: queued resource $QUEUED is $state" >&2 && return 1 ;;
      esac
    elif [ $((failures += 1)) -ge 10 ]; then
      echo "$0: could not read the state of $QUEUED 10 times in a row" >&2 && return 1
    fi
    sleep 30
  done
}

# vit-train's exit status on worker 0; none (the slice is gone) counts as preempted.
read_status() {
  if [ "$DRY_RUN" = 1 ]; then
    on_workers 0 "cat ~/vit_train_status"
  else
    STATUS=$(on_workers 0 "cat ~/vit_train_status" 2>/dev/null) || STATUS=$PREEMPTED
  fi
}

# shellcheck disable=SC2120 # The EXIT trap passes --async; shellcheck does not read traps.
delete_slice() {
  run "${TPUS[@]}" queued-resources delete "$QUEUED" --zone "$ZONE" --force --quiet "$@"
}

# One slice by its name, or NUM_SLICES of them named TPU_NAME-0, TPU_NAME-1, ...
NODES=(--node-id "$TPU_NAME")
[ "$NUM_SLICES" = 1 ] || NODES=(--node-count "$NUM_SLICES" --node-prefix "$TPU_NAME")

# The recipe's flags among vit-train's (--config.k=v, or --config.k v): what the fit check
# compiles. vit-train's own flags (--heartbeat_timeout, ...) mean nothing to vit-bench.
recipe_flags() {
  local arg value_next=0
  for arg in "$@"; do
    if [ "$value_next" = 1 ] && [[ $arg != --* ]]; then
      echo "$arg"
    fi
    value_next=0
    case $arg in
      --config.*=*) echo "$arg" ;;
      --config.*) echo "$arg" && value_next=1 ;;
    esac
  done
}

if [ "${CHECK_FIT:-0}" = 1 ]; then # Exit status 3: it does not fit; nothing is created.
  mapfile -t FIT_FLAGS < <(recipe_flags "${TRAIN_COMMAND[@]:5}")
  # Compiled here: the recipe as vit-train would find it here, not in the workers' clone.
  run vit-bench compile --target "$ACCELERATOR_TYPE" --slices "$NUM_SLICES" \
    --config "$(RECIPE_IN_CLONE=0 recipe_path "${TRAIN_COMMAND[2]}")" "${FIT_FLAGS[@]}"
fi

trap 'if [ "$DRY_RUN" = 0 ]; then delete_slice --async; fi' EXIT # Never leave a slice billing.
for attempt in $(seq "${MAX_ATTEMPTS:-10}"); do
  run "${TPUS[@]}" queued-resources create "$QUEUED" "${NODES[@]}" --zone "$ZONE" \
    --accelerator-type "$ACCELERATOR_TYPE" --runtime-version "$RUNTIME_VERSION" "${SPOT_FLAG[@]}"
  wait_until_active
  if ! on_workers all "$INSTALL"; then # On a slice still ACTIVE: for good (REPO, BRANCH).
    state=$("${DESCRIBE[@]}" 2>/dev/null) || state="unknown (gcloud could not read it)"
    [ "$state" != ACTIVE ] || { echo "$0: installing vit_jax failed on $QUEUED" >&2 && exit 1; }
    echo "$0: attempt $attempt lost the slice ($state) while installing; creating a new one" >&2
    delete_slice
    continue
  fi
  train_on_workers "$attempt" || true # The status that matters is vit-train's, read next.
  read_status
  delete_slice # Waits until it is gone: the next try reuses its name.
  if [ "$DRY_RUN" = 1 ]; then
    echo "# when vit-train exits $PREEMPTED or the slice is gone: the commands above again"
    exit 0
  fi
  case $STATUS in
    0) trap - EXIT && exit 0 ;;
    "$PREEMPTED") echo "$0: attempt $attempt preempted; creating a new slice to resume" >&2 ;;
    *) echo "$0: vit-train failed with status $STATUS" >&2 && trap - EXIT && exit "$STATUS" ;;
  esac
done
echo "$0: still preempted after ${MAX_ATTEMPTS:-10} attempts" >&2
exit "$PREEMPTED"
