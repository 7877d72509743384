"""What a checkpoint says about the model that computes with its weights.

Weights alone do not say how a model computes with them: `describe_checkpoint` tells the
caller the model a checkpoint implies (its sizes and patch, and `WEIGHT_BOUND_FIELDS`:
activation, pooling, where the final norm sits, registers, position embedding), so the
model built for it computes what the source computed, and `model_init_changes` says which
fields of a configured model must change to start from it. A file is read once
(`read_weights`) when it is both described and loaded (`vit_jax.checkpoint.fit`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath
from flax import traverse_util

from vit_jax.checkpoint import hub
from vit_jax.checkpoint.npz import POSEMB, canonicalize, read_npz
from vit_jax.models.variants import SIZES, parse_variant

# Model fields that must follow the checkpoint for its weights to mean what they meant.
WEIGHT_BOUND_FIELDS = ("activation", "pool", "fc_norm", "num_registers", "posemb")
_SIZES = ("patch_size", "width", "depth", "mlp_dim", "num_heads")
# Every field of a model that starts from a checkpoint (`config.model_init`) and that the
# checkpoint fixes: its shapes and what its weights were trained to compute with. Training
# settings (dropout, dtype, scan, ...) and the representation layer, which fine-tuning
# drops as the paper does (a target without one), stay the config's.
ARCHITECTURE_FIELDS = ("name", *_SIZES, *WEIGHT_BOUND_FIELDS)
_BLOCK0 = "Transformer/encoderblock_0/"

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
    """Reads any checkpoint `load_pretrained` takes, for `describe_checkpoint` and loading.

    Raises:
      FileNotFoundError: nothing at `path`, in one line saying what is expected there.
      ValueError: a file in no layout we read, saying which layouts there are.
    """
    if not epath.Path(path).exists():
        raise FileNotFoundError(
            f"No checkpoint at {path}: expected a vit_jax workdir, an .npz or a .safetensors "
            "file (or a sharded checkpoint's .safetensors.index.json)."
        )
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


@dataclasses.dataclass(frozen=True)
class CheckpointDescription:
    """What a checkpoint's own files say about the model that computes with its weights.

    `model` holds `VisionTransformer` fields: `patch_size`, `width`, `depth`, `mlp_dim`,
    `num_heads` (absent when a hub file's fused heads leave it unknown), those of
    `WEIGHT_BOUND_FIELDS` the source states, `representation_size`, and `name` when the
    files state it or the sizes are a named plain ViT's. `num_classes` is 0 for a
    checkpoint without a head; `image_size` is the pretraining resolution of a plain ViT's
    position embedding, None when it cannot be told.
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
    model |= _sizes(params, weights)
    image_size = None
    plain = "conv_root/kernel" not in params
    if plain and POSEMB in params:
        num_prefix = int(model["pool"] == "token")
        side = int(np.sqrt(params[POSEMB].shape[1] - num_prefix))
        if side * side == params[POSEMB].shape[1] - num_prefix:
            image_size = side * model["patch_size"]
    if plain and "name" not in model:
        keys = [k for k in ("width", "depth", "mlp_dim", "num_heads") if k in model]
        names = [n for n, s in SIZES.items() if all(s[k] == model[k] for k in keys)]
        if len(names) == 1:
            model["name"] = f"{names[0]}/{model['patch_size']}"
    if "num_heads" not in model and "name" in model:
        model["num_heads"] = parse_variant(model["name"]).num_heads
    head = params.get("head/bias")
    return CheckpointDescription(
        source=weights.layout,
        model=model,
        num_classes=0 if head is None else head.shape[-1],
        image_size=image_size,
    )


def model_init_changes(model: Mapping[str, Any], source: Source) -> dict[str, Any]:
    """The fields of `model` (a config's `model` section) to change to start from `source`.

    Of `ARCHITECTURE_FIELDS`, those the checkpoint fixes that `model` gives otherwise: a
    recipe's or a user's other size, patch or pooling could not load these weights, and
    another activation would compute something else with them. The checkpoint's name, when
    its files state it or its sizes are a named ViT's, replaces the model's; a size is
    changed only where the model's (its own, or its name's when None) differs, to None when
    the name then says it. Each change is logged. Returns {field: value}; `model` is not
    modified.
    """
    weights = _weights(source)
    fixed = describe_checkpoint(weights).model
    name = fixed.get("name", model.get("name"))
    named = dataclasses.asdict(parse_variant(name)) if name else {}
    wanted = {key: fixed[key] for key in ARCHITECTURE_FIELDS if key in fixed}
    for key in set(_SIZES) & wanted.keys():
        own = model.get(key)
        if (named.get(key) if own is None else own) == wanted[key]:
            wanted[key] = own
        elif wanted[key] == named.get(key):
            wanted[key] = None
    changes = {key: value for key, value in wanted.items() if model.get(key) != value}
    for key, value in changes.items():
        logger.info("model.%s=%r (was %r), as %s states.", key, value, model.get(key), weights.path)
    return changes


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
    """Model fields the files state outright: our training runs, our exports' descriptions
    and hub layouts (whose own fields win) do."""
    saved = {}
    if kind == "run":
        from vit_jax.checkpoint import manager  # Orbax is needed only for directories.

        saved = manager.load_metadata(path).get("model", {})
    elif (description := description_path(path)).exists():
        saved = json.loads(description.read_text()).get("model", {})
    keys = (*WEIGHT_BOUND_FIELDS, "name", "num_heads")
    stated = {key: saved[key] for key in keys if saved.get(key) is not None}
    return stated | (hub.model_fields(path) if kind == "hub" else {})


def _sizes(params: dict[str, Any], weights: PretrainedWeights) -> dict[str, int]:
    """Patch, width, depth, MLP width and (unless fused) heads, from the arrays' shapes."""
    patch, width = params["embedding/kernel"].shape[0], params["embedding/kernel"].shape[-1]
    sizes = {
        "patch_size": patch,
        "width": width,
        "depth": sum(k.endswith("/LayerNorm_0/scale") and "encoderblock" in k for k in params),
        "mlp_dim": params[_BLOCK0 + "MlpBlock_0/Dense_0/bias"].shape[-1],
    }
    if not weights.fused_heads:  # (heads, head_dim, width)
        sizes["num_heads"] = params[_BLOCK0 + "MultiHeadDotProductAttention_0/out/kernel"].shape[0]
    return sizes


def _structural_fields(params: dict[str, Any]) -> dict[str, Any]:
    """What the presence of a few arrays tells: pooling, fc_norm, registers, posemb."""
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
