"""A model and its parameters from any checkpoint we read, and images to show it.

Checkpoints are what `vit-predict` takes: a vit-train workdir, an `.npz` exported with
vit-export, or any other `.npz` with the model name and image size given. The model is
built without its head (`num_classes=0`): the figures and the few-shot probe need the
features, never the logits.
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from vit_jax import data
from vit_jax.checkpoint import load_model
from vit_jax.config import base_config
from vit_jax.models import VisionTransformer


def load_features_model(
    path: str, *, model: str | None = None, image_size: int | None = None
) -> tuple[VisionTransformer, Any, dict[str, Any]]:
    """(model without head, its parameters as numpy arrays, the run description) of `path`.

    `model` (a name such as "B/16") and `image_size` override what the checkpoint says;
    a bare `.npz` needs both. The position embedding follows `image_size`.
    """
    return load_model(path, model=model, image_size=image_size, num_classes=0)


def eval_config(
    run: dict[str, Any], dataset: str, split: str, batch_size: int, data_dir: str | None = None
) -> ml_collections.ConfigDict:
    """The evaluation config that reads `split` of `dataset` as the run's evaluation did."""
    config = base_config()
    config.update(
        dataset=dataset,
        data_dir=data_dir,
        eval_split=split,
        eval_batch_size=batch_size,
        image_size=run["image_size"],
    )
    config.pp.eval_crop_fraction = run.get("eval_crop_fraction", 1.0)
    return config


def dataset_images(
    run: dict[str, Any], dataset: str, split: str, count: int, data_dir: str | None = None
) -> np.ndarray:
    """The first `count` images of a split, preprocessed as evaluation: uint8 [count, H, W, 3]."""
    if count < 1:
        raise ValueError(f"Asked for {count} images; ask for at least one.")
    config = eval_config(run, dataset, f"{split}[:{count}]", count, data_dir)
    batch = next(data.eval_batches(config, share_index=0, share_count=1))
    return batch["image"][batch["mask"] > 0]
