"""Input pipeline: tfds / image-folder datasets to host-local numpy batches.

TensorFlow here only reads and augments data on the CPU. It is hidden from every GPU before
any TF op runs, so it never reserves accelerator memory that JAX needs.
"""

import tensorflow as tf

try:
    tf.config.set_visible_devices([], "GPU")
except RuntimeError as e:  # TF already initialised its devices: it may hold GPU memory.
    raise RuntimeError(
        "TensorFlow was initialised before vit_jax.data was imported, so it can no longer be "
        "kept off the GPUs; import vit_jax.data before running any TensorFlow op."
    ) from e

# Importing `embedded` registers "digits" and "mnist5k" with tfds.
from vit_jax.data.embedded import EMBEDDED_DATASETS  # noqa: E402
from vit_jax.data.pipeline import (  # noqa: E402
    eval_batches,
    folder_root,
    get_dataset_info,
    num_eval_batches,
    num_train_examples,
    short_classes,
    train_batches,
)
from vit_jax.data.source import DatasetInfo  # noqa: E402

__all__ = [
    "EMBEDDED_DATASETS",
    "DatasetInfo",
    "eval_batches",
    "folder_root",
    "get_dataset_info",
    "num_eval_batches",
    "num_train_examples",
    "short_classes",
    "train_batches",
]
