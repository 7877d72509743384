"""Fits a checkpoint's weights into the parameter tree of a (fine-tuning) target model.

The target decides: what fits is loaded, the classification head is reset when it
cannot serve the target, the position embedding follows the target's patch grid,
and anything else that differs is an error naming every offending parameter, since
a silently partial load trains a model that is quietly worse. Which target computes
what the source computed is `vit_jax.checkpoint.describe`'s to say.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from vit_jax.checkpoint.describe import PretrainedWeights, Source, read_weights
from vit_jax.checkpoint.npz import POSEMB
from vit_jax.checkpoint.posemb import infer_grid, resample_posemb
from vit_jax.models import stack_blocks

_ATTENTION_OUT = re.compile(r"MultiHeadDotProductAttention_0/out/kernel$")
_ATTENTION = re.compile(r"MultiHeadDotProductAttention_0/(query|key|value|out)/(kernel|bias)$")

logger = logging.getLogger(__name__)


def load_pretrained(
    source: Source,
    *,
    init_params: Any,
    grid: tuple[int, int] | None = None,
    source_grid: tuple[int, int] | None = None,
    posemb_method: str = "bilinear",
    reset_head: bool = False,
) -> Any:
    """Returns the checkpoint `source` as parameters for the model of `init_params`.

    Args:
      source: the path of an `.npz` file in any published layout (see
        `vit_jax.checkpoint.npz`), of a `.safetensors` file in timm's or transformers' ViT
        layout (see `vit_jax.checkpoint.hub`), local or `gs://`, or of an Orbax checkpoint
        directory of our own training runs; or what `read_weights` read from one. Build the
        target with `describe_checkpoint(source).model`'s fields, or it may compute
        something else with the same weights.
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
    weights = source if isinstance(source, PretrainedWeights) else read_weights(source)
    path, layout, params = weights.path, weights.layout, weights.params
    target_tree = nn.unbox(init_params)
    target = traverse_util.flatten_dict(target_tree, sep="/")
    logger.info("Loading %s (%s).", path, layout)
    if weights.fused_heads:
        heads = [spec.shape[-3] for key, spec in target.items() if _ATTENTION_OUT.search(key)]
        params = _split_heads(params, heads[0] if heads else 1)

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


def _split_heads(params: dict[str, np.ndarray], num_heads: int) -> dict[str, np.ndarray]:
    """Attention arrays of one fused head (`PretrainedWeights.fused_heads`) as `num_heads`.

    A view: the fused head's columns are the heads' side by side.
    """

    def split(key: str, value: np.ndarray) -> np.ndarray:
        match = _ATTENTION.search(key)
        if match is None or match.groups() == ("out", "bias"):
            return value
        width = value.shape[-1]
        if width % num_heads:
            return value  # Not the target's width: `_check_fits` reports it.
        if match[1] == "out":  # (1, width, width) -> (heads, head_dim, width)
            return value.reshape(num_heads, -1, width)
        return value.reshape(*value.shape[:-2], num_heads, width // num_heads)

    return {key: split(key, value) for key, value in params.items()}


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
