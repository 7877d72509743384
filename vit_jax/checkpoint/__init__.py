"""Train-state checkpoints (Orbax) and interchange with published `.npz` and hub checkpoints."""

from vit_jax.checkpoint.manager import Checkpointer, load_metadata, load_params
from vit_jax.checkpoint.npz import save_npz
from vit_jax.checkpoint.posemb import resample_posemb
from vit_jax.checkpoint.pretrained import (
    WEIGHT_BOUND_FIELDS,
    CheckpointDescription,
    PretrainedWeights,
    describe_checkpoint,
    description_path,
    load_pretrained,
    read_weights,
    weight_bound_fields,
)

__all__ = [
    "WEIGHT_BOUND_FIELDS",
    "CheckpointDescription",
    "Checkpointer",
    "PretrainedWeights",
    "describe_checkpoint",
    "description_path",
    "load_metadata",
    "load_params",
    "load_pretrained",
    "read_weights",
    "resample_posemb",
    "save_npz",
    "weight_bound_fields",
]
