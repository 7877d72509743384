#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (v4/v5e/v5p pods included): the same command on every worker.
#
#   launch/tpu_vm.sh TPU_NAME ZONE "--config configs/pretrain.py:variant=B/16 --workdir gs://BUCKET/run"
#
# Every host reads its own shard of the data; jax.distributed detects the slice by itself.
# Data and workdir should live on GCS (data_dir=gs://..., --workdir gs://...).
set -euo pipefail
TPU_NAME=${1:?TPU VM name}
ZONE=${2:?zone}
ARGS=${3:?vit-train arguments in one quoted string}
REPO=${REPO:?set REPO to the git URL of your vit_jax clone}

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e
  [ -d vit_jax ] || git clone $REPO vit_jax
  cd vit_jax && git pull --ff-only
  python3 -m venv .venv && . .venv/bin/activate
  pip install -q -e . 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
  vit-train --distributed $ARGS
"
