#!/usr/bin/env bash
# Train on all GPUs of one machine: a single process drives every local device.
#
#   launch/gpu_single_node.sh configs/pretrain.py:variant=B/16 /data/runs/b16 [--config.k=v ...]
#   launch/gpu_single_node.sh configs/local.py /tmp/vit_local --dry-run      # print, don't run
#
# Install once with: pip install -e ".[gpu]"   (CUDA 12 wheels of jax)
# vit-train replaces this shell (exec), so SIGTERM (a preempted VM shutting down, docker
# stop, systemctl stop) and Ctrl-C reach it directly: it finishes the step, saves a
# checkpoint and exits 75, meaning "run the same command again to resume".
set -euo pipefail
# shellcheck source=launch/common.sh
. "$(dirname "$0")/common.sh"
parse_args "$@"
# TensorFlow is kept off the GPUs by vit_jax.data; XLA takes GPU_MEMORY's share (common.sh).
run_in_place env "${GPU_MEMORY[@]}" "${TRAIN_COMMAND[@]}"
