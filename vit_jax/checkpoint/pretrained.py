"""Loads a pretrained checkpoint into the parameter tree of a (fine-tuning) target model.

The target decides: what fits is loaded, the classification head is reset when it
cannot serve the target, the position embedding follows the target's patch grid,
and anything else that differs is an error naming every offending parameter, since
a silently partial load trains a model that is quietly worse.

Weights alone do not say how a model computes with them: `describe_checkpoint` tells the
caller the model fields a checkpoint implies (`WEIGHT_BOUND_FIELDS`: activation, pooling,
where the final norm sits, registers, position embedding), so the model built for it
computes what the source computed. A file is read once (`read_weights`) when it is both
described and loaded.
"""

from __future__ import annotations

import dataclasses
import json
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
from vit_jax.checkpoint.npz import POSEMB, canonicalize, read_npz, read_npz_model_arrays
from vit_jax.checkpoint.posemb import infer_grid, resample_posemb
from vit_jax.models import stack_blocks
from vit_jax.models.variants import SIZES

# Model fields that must follow the checkpoint for its weights to mean what they meant:
# fine-tuning (`model_init`) takes them from `weight_bound_fields`.
WEIGHT_BOUND_FIELDS = ("activation", "pool", "fc_norm", "num_registers", "posemb")
# The arrays whose presence (and, for registers, shape) fixes the structural fields.
_STRUCTURE_ARRAYS = ("cls", "registers", "MAPHead_0/probe", "fc_norm/scale", POSEMB)
_ATTENTION_OUT = re.compile(r"MultiHeadDotProductAttention_0/out/kernel$")
_ATTENTION = re.compile(r"MultiHeadDotProductAttention_0/(query|key|value|out)/(kernel|bias)$")

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PretrainedWeights:
    """A checkpoint's arrays in our unrolled tree, read once, and what its files state.

    `fused_heads`: the format does not record the number of attention heads (hub layouts),
    so each attention array holds one head of the full width until a model is chosen.
    """

    path: str
    params: dict[str, np.ndarray]  # '/'-joined keys of our unrolled tree.
    layout: str  # The format and its conventions, for messages.
    stated: dict[str, Any]  # Model fields the files state outright (see `_stated_fields`).
    fused_heads: bool


Source = str | os.PathLike | PretrainedWeights


def read_weights(path: str | os.PathLike) -> PretrainedWeights:
    """Reads any checkpoint `load_pretrained` takes, for `describe_checkpoint` and loading."""
    kind = _kind(path)
    if kind == "hub":
        params, layout = hub.read_params(path)
    elif kind == "run":
        from vit_jax.checkpoint import manager  # Orbax is needed only for directories.

        params, _ = canonicalize(traverse_util.flatten_dict(manager.load_params(path), sep="/"))
        layout = "vit_jax training run"
    else:
        params, npz_layout = canonicalize(read_npz(path))
        layout = str(npz_layout)
    return PretrainedWeights(
        path=str(path),
        params=params,
        layout=layout,
        stated=_stated_fields(path, kind),
        fused_heads=kind == "hub",
    )


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
    weights = _weights(source)
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


def describe_checkpoint(source: Source) -> CheckpointDescription:
    """Describes the model of `source` (anything `load_pretrained` takes).

    An `.npz` does not record its activation: `model` then has none, and the Google
    releases' "gelu_tanh" (our default) applies unless the description vit-export wrote
    beside it says otherwise.
    """
    weights = _weights(source)
    params = weights.params
    model = _structural_fields(params) | weights.stated
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
        source=weights.layout,
        model=model,
        num_classes=0 if head is None else head.shape[-1],
        image_size=image_size,
    )


def weight_bound_fields(path: str | os.PathLike) -> dict[str, Any]:
    """The `WEIGHT_BOUND_FIELDS` of a checkpoint, without reading its blocks' arrays.

    What a fine-tuning run starting from `path` (`config.model_init`) must build its model
    with: hub files state them (header and `config.json`), workdirs in their metadata,
    files from vit-export in the description beside them. A bare `.npz` shows its
    structure in a few small arrays and states no activation (the config's applies;
    Google's files use the default "gelu_tanh").
    """
    kind = _kind(path)
    stated = _stated_fields(path, kind)
    if kind == "npz":
        stated = _structural_fields(read_npz_model_arrays(path, _STRUCTURE_ARRAYS)) | stated
    return {key: stated[key] for key in WEIGHT_BOUND_FIELDS if key in stated}


def description_path(weights_path: str | os.PathLike) -> epath.Path:
    """Where vit-export describes the file it wrote (class names, model, ...): `.json` beside it."""
    path = epath.Path(weights_path)
    if path.suffix in (".npz", hub.SUFFIX):
        return path.with_suffix(".json")
    return epath.Path(f"{path}.json")


def _weights(source: Source) -> PretrainedWeights:
    return source if isinstance(source, PretrainedWeights) else read_weights(source)


def _kind(path: str | os.PathLike) -> str:
    """ "hub" (a `.safetensors`), "run" (a vit-train workdir) or "npz" (any other file)."""
    if hub.is_safetensors(path):
        return "hub"
    return "run" if epath.Path(path).is_dir() else "npz"


def _stated_fields(path: str | os.PathLike, kind: str) -> dict[str, Any]:
    """Model fields the files state outright: hub layouts, our training runs and exports do."""
    if kind == "hub":
        return hub.model_fields(path)
    if kind == "run":
        from vit_jax.checkpoint import manager  # Orbax is needed only for directories.

        saved = manager.load_metadata(path).get("model", {})
    elif (description := description_path(path)).exists():
        saved = json.loads(description.read_text()).get("model", {})
    else:
        return {}
    return {key: saved[key] for key in (*WEIGHT_BOUND_FIELDS, "name") if key in saved}


def _structural_fields(params: dict[str, Any]) -> dict[str, Any]:
    """The fields the presence of `_STRUCTURE_ARRAYS` tells: pooling, fc_norm, registers, posemb."""
    if "cls" in params:
        pool = "token"
    else:
        pool = "map" if "MAPHead_0/probe" in params else "gap"
    return {
        "pool": pool,
        "fc_norm": "fc_norm/scale" in params,
        "num_registers": params["registers"].shape[1] if "registers" in params else 0,
        # Without a stored table the positions are the fixed 2-D sin-cos ones.
        "posemb": "learn" if POSEMB in params else "sincos2d",
    }


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
