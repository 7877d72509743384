"""Train-state checkpoints (Orbax) and interchange with published `.npz` and hub checkpoints."""

from vit_jax.checkpoint.describe import (
    ARCHITECTURE_FIELDS,
    WEIGHT_BOUND_FIELDS,
    CheckpointDescription,
    PretrainedWeights,
    describe_checkpoint,
    description_path,
    model_init_changes,
    read_weights,
)
from vit_jax.checkpoint.fit import load_pretrained
from vit_jax.checkpoint.loading import load_model, run_description
from vit_jax.checkpoint.manager import Checkpointer, load_metadata, load_params
from vit_jax.checkpoint.npz import save_npz
from vit_jax.checkpoint.posemb import resample_posemb

__all__ = [
    "ARCHITECTURE_FIELDS",
    "WEIGHT_BOUND_FIELDS",
    "CheckpointDescription",
    "Checkpointer",
    "PretrainedWeights",
    "describe_checkpoint",
    "description_path",
    "load_metadata",
    "load_model",
    "load_params",
    "load_pretrained",
    "model_init_changes",
    "read_weights",
    "resample_posemb",
    "run_description",
    "save_npz",
]
