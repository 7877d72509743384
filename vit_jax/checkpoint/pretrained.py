"""Loads a pretrained checkpoint into the parameter tree of a (fine-tuning) target model.

The target decides: what fits is loaded, the classification head is reset when it
cannot serve the target, the position embedding follows the target's patch grid,
and anything else that differs is an error naming every offending parameter, since
a silently partial load trains a model that is quietly worse.

Weights alone do not say how a model computes with them: `describe_checkpoint` tells the
caller the model fields a checkpoint implies (`WEIGHT_BOUND_FIELDS`: activation, pooling,
where the final norm sits, registers), so the model built for it computes what the source
computed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from etils import epath
from flax import traverse_util

from vit_jax.checkpoint import hub
from vit_jax.checkpoint.npz import POSEMB, canonicalize, read_npz
from vit_jax.checkpoint.posemb import infer_grid, resample_posemb
from vit_jax.models import stack_blocks
from vit_jax.models.variants import SIZES

# Model fields that must follow the checkpoint for its weights to mean what they meant:
# fine-tuning (`model_init`) takes them from `weight_bound_fields`.
WEIGHT_BOUND_FIELDS = ("activation", "pool", "fc_norm", "num_registers")
_ATTENTION_OUT = re.compile(r"MultiHeadDotProductAttention_0/out/kernel$")

logger = logging.getLogger(__name__)


def load_pretrained(
    path: str | os.PathLike,
    *,
    init_params: Any,
    grid: tuple[int, int] | None = None,
    source_grid: tuple[int, int] | None = None,
    posemb_method: str = "bilinear",
    reset_head: bool = False,
) -> Any:
    """Returns the checkpoint at `path` as parameters for the model of `init_params`.

    Args:
      path: an `.npz` file in any published layout (see `vit_jax.checkpoint.npz`), a
        `.safetensors` file in timm's or transformers' ViT layout (see
        `vit_jax.checkpoint.hub`), local or `gs://`, or an Orbax checkpoint directory of
        our own training runs. Build the target with `describe_checkpoint(path).model`'s
        fields, or it may compute something else with the same weights.
      init_params: `model.init(...)["params"]` of the target model, boxed or not, or its
        `jax.eval_shape`: only its structure, shapes and dtypes are used.
      grid: the target's patch grid (height, width); needed only when its number of
        patches is not a square, e.g. `(image_h // patch, image_w // patch)`.
      source_grid: the checkpoint's patch grid, when that one is not a square.
      posemb_method: "bilinear" (the original fine-tuning recipe) or "bicubic".
      reset_head: always start from a zero-initialised head, as the paper's fine-tuning
        does, even when the checkpoint's head has the target's shape.

    The head is replaced by a zero-initialised one, as our models initialise it, when
    its shape differs (another class count) or the representation layer it was
    trained on is dropped. `pre_logits` is kept when the target has one and dropped
    when it has none. Returns numpy arrays in the tree structure, shapes and dtypes
    of the unboxed `init_params` (scanned if the target is scanned).
    """
    target_tree = nn.unbox(init_params)
    target = traverse_util.flatten_dict(target_tree, sep="/")
    heads = [spec.shape[-3] for key, spec in target.items() if _ATTENTION_OUT.search(key)]
    params, layout = _read(path, num_heads=heads[0] if heads else 1)
    logger.info("Loading %s (%s).", path, layout)

    if "encoderblock" in target_tree.get("Transformer", {}) and any(
        key.startswith("Transformer/encoderblock_") for key in params
    ):
        nested = stack_blocks(traverse_util.unflatten_dict(params, sep="/"))
        params = traverse_util.flatten_dict(nested, sep="/")
    params = {
        key: np.asarray(value, dtype=target[key].dtype) if key in target else value
        for key, value in params.items()
    }
    params = _fit_head(params, target, reset_head)
    if POSEMB in params and POSEMB in target:
        params[POSEMB] = _fit_posemb(
            params[POSEMB],
            target[POSEMB].shape,
            num_prefix=int("cls" in params),
            target_has_prefix="cls" in target,
            grid=grid,
            source_grid=source_grid,
            method=posemb_method,
        )
    _check_fits(params, target, path, layout)
    return jax.tree_util.tree_map_with_path(
        lambda key_path, _: params[jax.tree_util.keystr(key_path, simple=True, separator="/")],
        target_tree,
    )


@dataclasses.dataclass(frozen=True)
class CheckpointDescription:
    """What a checkpoint's own files say about the model that computes with its weights.

    `model` holds `VisionTransformer` fields: those of `WEIGHT_BOUND_FIELDS` the source
    states, `representation_size`, and `name` when the sizes match a named plain ViT.
    `num_classes` is 0 for a checkpoint without a head; `image_size` is the pretraining
    resolution of a plain ViT's position embedding, None when it cannot be told.
    """

    source: str
    model: dict[str, Any]
    num_classes: int
    image_size: int | None


def describe_checkpoint(path: str | os.PathLike) -> CheckpointDescription:
    """Reads `path` (any format `load_pretrained` takes) and describes its model.

    An `.npz` does not record its activation: `model` then has none, and the Google
    releases' "gelu_tanh" (our default) applies unless a run description says otherwise.
    """
    params, source = _read(path, num_heads=1)
    model = dict(_stated_fields(path))
    model.setdefault("pool", _pool(params))
    model.setdefault("fc_norm", "fc_norm/scale" in params)
    model.setdefault("num_registers", params["registers"].shape[1] if "registers" in params else 0)
    representation = params.get("pre_logits/bias")
    model["representation_size"] = None if representation is None else representation.shape[-1]
    image_size = None
    if "conv_root/kernel" not in params and POSEMB in params:
        patch, width = params["embedding/kernel"].shape[0], params["embedding/kernel"].shape[-1]
        num_prefix = int(model["pool"] == "token")
        side = int(np.sqrt(params[POSEMB].shape[1] - num_prefix))
        if side * side == params[POSEMB].shape[1] - num_prefix:
            image_size = side * patch
        sizes = {
            "width": width,
            "depth": sum(k.endswith("/LayerNorm_0/scale") and "encoderblock" in k for k in params),
            "mlp_dim": params["Transformer/encoderblock_0/MlpBlock_0/Dense_0/bias"].shape[-1],
        }
        names = [n for n, s in SIZES.items() if {k: s[k] for k in sizes} == sizes]
        if len(names) == 1:
            model.setdefault("name", f"{names[0]}/{patch}")
    head = params.get("head/bias")
    return CheckpointDescription(
        source=str(source),
        model=model,
        num_classes=0 if head is None else head.shape[-1],
        image_size=image_size,
    )


def weight_bound_fields(path: str | os.PathLike) -> dict[str, Any]:
    """The `WEIGHT_BOUND_FIELDS` a checkpoint states, without reading its arrays.

    What a fine-tuning run starting from `path` (`config.model_init`) must build its model
    with: hub files state them (header and `config.json`), workdirs in their metadata. An
    `.npz` states none: its structure is checked when loading, and its activation is the
    config's (Google's files use the default "gelu_tanh").
    """
    stated = _stated_fields(path)
    return {key: stated[key] for key in WEIGHT_BOUND_FIELDS if key in stated}


def _stated_fields(path: str | os.PathLike) -> dict[str, Any]:
    """Model fields the file states outright: hub layouts and our training runs do."""
    if hub.is_safetensors(path):
        return hub.model_fields(path)
    if epath.Path(path).is_dir():
        from vit_jax.checkpoint import manager  # Orbax is needed only for directories.

        saved = manager.load_metadata(path).get("model", {})
        return {key: saved[key] for key in (*WEIGHT_BOUND_FIELDS, "name") if key in saved}
    return {}


def _pool(params: dict[str, np.ndarray]) -> str:
    if "cls" in params:
        return "token"
    return "map" if "MAPHead_0/probe" in params else "gap"


def _read(path: str | os.PathLike, num_heads: int) -> tuple[dict[str, np.ndarray], Any]:
    """Flat '/'-joined arrays of our unrolled tree from any format, and a name of the layout.

    `num_heads` shapes the attention kernels of formats that fuse the heads (hub layouts).
    """
    if hub.is_safetensors(path):
        return hub.read_params(path, num_heads)
    if epath.Path(path).is_dir():
        from vit_jax.checkpoint import manager  # Orbax is needed only for directories.

        flat = traverse_util.flatten_dict(manager.load_params(path), sep="/")
        params, _ = canonicalize(flat)
        return params, "vit_jax training run"
    return canonicalize(read_npz(path))


def _module(flat: dict[str, Any], name: str) -> dict[str, Any]:
    return {key: value for key, value in flat.items() if key.startswith(name + "/")}


def _fit_head(
    params: dict[str, np.ndarray], target: dict[str, Any], reset_head: bool
) -> dict[str, np.ndarray]:
    """Drops `pre_logits`/`head` the target lacks; resets a head that cannot serve it."""
    params = dict(params)
    dropped_representation = bool(_module(params, "pre_logits")) and not _module(
        target, "pre_logits"
    )
    for name in ("pre_logits", "head"):
        if not _module(target, name):
            for key in _module(params, name):
                logger.info("Dropping %s %s: the target model has none.", key, params[key].shape)
                del params[key]
    target_head = _module(target, "head")
    reset = (
        reset_head
        or dropped_representation
        or any(
            key not in params or params[key].shape != spec.shape
            for key, spec in target_head.items()
        )
    )
    if target_head and reset:
        logger.info(
            "Replacing the head with a zero-initialised one of %d classes.",
            target_head["head/bias"].shape[-1],
        )
        for key, spec in target_head.items():
            params[key] = np.zeros(spec.shape, spec.dtype)
    return params


def _fit_posemb(
    posemb: np.ndarray,
    target_shape: tuple[int, ...],
    *,
    num_prefix: int,
    target_has_prefix: bool,
    grid: tuple[int, int] | None,
    source_grid: tuple[int, int] | None,
    method: str,
) -> np.ndarray:
    """Resamples the embedding onto the target grid; leaves what cannot match to the check."""
    if posemb.shape == tuple(target_shape):
        return posemb
    if target_has_prefix != bool(num_prefix) or posemb.shape[-1] != target_shape[-1]:
        return posemb  # Another architecture: `_check_fits` reports it with the rest.
    new_grid = infer_grid(target_shape[1] - num_prefix, grid, argument="grid")
    old_grid = infer_grid(posemb.shape[1] - num_prefix, source_grid, argument="source_grid")
    logger.info(
        "Resampling the position embedding from grid %s to %s (%s).", old_grid, new_grid, method
    )
    return resample_posemb(
        posemb, new_grid, num_prefix=num_prefix, method=method, old_grid=old_grid
    )


def _check_fits(
    params: dict[str, np.ndarray], target: dict[str, Any], path: Any, layout: Any
) -> None:
    """Raises, listing every parameter that is missing, unexpected or of another shape."""
    problems = [
        f"  missing from the checkpoint: {key} {tuple(spec.shape)}"
        for key, spec in sorted(target.items())
        if key not in params
    ]
    problems += [
        f"  not in the model: {key} {value.shape}"
        for key, value in sorted(params.items())
        if key not in target
    ]
    problems += [
        f"  shape differs: {key}: checkpoint {params[key].shape}, model {tuple(spec.shape)}"
        for key, spec in sorted(target.items())
        if key in params and params[key].shape != tuple(spec.shape)
    ]
    if problems:
        raise ValueError(
            f"The checkpoint {path} ({layout}) does not fit the model:\n"
            + "\n".join(problems)
            + "\nBuild the model with the checkpoint's architecture (size, patch size, "
            "pool, posemb, representation_size, fc_norm, hybrid stem): "
            "vit_jax.checkpoint.describe_checkpoint tells what the file implies."
        )
