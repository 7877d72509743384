#!/usr/bin/env bash
# Train on all GPUs of one machine: a single process drives every local device.
#
#   launch/gpu_single_node.sh --config configs/pretrain.py:variant=B/16 --workdir /data/runs/b16
#
# Install once with: pip install -e ".[gpu]"   (CUDA 12 wheels of jax)
set -euo pipefail
cd "$(dirname "$0")/.."
# Let XLA take most of the GPU memory up front; TensorFlow is kept off the GPUs by vit_jax.data.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
exec vit-train "$@"
