"""Times the real input pipeline of a recipe alone: host images per second."""

from __future__ import annotations

import time
from typing import Any

import ml_collections

from vit_jax import data


def benchmark_input(
    config: ml_collections.ConfigDict, batches: int, warmup: int = 5, split: str = "train"
) -> dict[str, Any]:
    """img/s of `data.train_batches` (or `eval_batches`) after `warmup` batches."""
    if split == "train":
        stream = data.train_batches(config, share_index=0, share_count=1)
        batch_size = config.batch_size
    elif split == "eval":
        stream = data.eval_batches(config, share_index=0, share_count=1)
        batch_size = config.eval_batch_size
        batches = min(batches, data.num_eval_batches(config, 1) - warmup)
        if batches < 1:
            raise ValueError(
                f"The eval split {config.eval_split!r} has too few batches of {batch_size} to "
                f"time after {warmup} warm-up batches; use a larger split or smaller batch."
            )
    else:
        raise ValueError(f"split={split!r}: choose 'train' or 'eval'.")
    for _ in range(warmup):
        next(stream)
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    seconds = time.perf_counter() - start
    cores = data.pipeline.host_cores()
    img_per_s = batches * batch_size / seconds
    return {
        "mode": "input",
        "split": split,
        "dataset": config.dataset,
        "image_size": config.image_size,
        "batch_size": batch_size,
        "train_crop": config.pp.train_crop,
        "antialias": bool(config.pp.antialias),
        "batches": batches,
        "host_cores": cores,
        "img_per_s": img_per_s,
        "img_per_s_per_core": img_per_s / cores,
    }
