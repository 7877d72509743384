"""Hugging Face hub weights (`.safetensors`, or a sharded checkpoint's
`.safetensors.index.json`) in timm's or transformers' ViT layout.

The layout is recognised from the tensor names. Besides the weights, a hub checkpoint
implies how the model computes (timm and transformers use PyTorch's exact GELU, timm's
average-pooled models normalise after pooling, ...): `model_fields` says so in our
model's terms. Files that vit-export wrote carry those fields in their metadata, which
then wins, so a re-import is exact whatever the activation.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import numpy as np
from etils import epath

from vit_jax.checkpoint import input_normalization, timm_layout, transformers_layout
from vit_jax.checkpoint.safetensors_file import INDEX_SUFFIX, read_header, read_safetensors

SUFFIX = ".safetensors"
# Metadata key under which vit-export records the model fields of the exported model.
MODEL_METADATA = "vit_jax.model"
_HUB_CONFIG = "config.json"  # Saved beside the weights by timm and transformers.
# Saved beside transformers' weights on the hub: how images become the model's input.
_PREPROCESSOR_CONFIG = "preprocessor_config.json"

logger = logging.getLogger(__name__)


def is_safetensors(path: str | os.PathLike) -> bool:
    """A `.safetensors` file, or the index of a sharded checkpoint of such files."""
    return str(path).endswith((SUFFIX, INDEX_SUFFIX))


def read_params(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], str]:
    """The file's weights as our unrolled tree ('/'-joined), and the name of its layout.

    Attention heads are fused into one (the file does not record how many there are).
    An input normalisation other than ours that the files beside it state (ImageNet's mean
    and std, for DeiT, MAE, DINO, ...) is folded into the patch embedding, so the weights
    take [-1, 1] images as every vit_jax model does (`input_normalization`).
    """
    arrays, metadata = read_safetensors(path)
    if timm_layout.is_timm(arrays):
        params, layout = timm_layout.from_timm(arrays), "timm ViT layout"
    elif transformers_layout.is_transformers(arrays):
        params, layout = transformers_layout.from_transformers(arrays), "transformers ViT layout"
    else:
        raise ValueError(_unknown_layout(path, arrays))
    if MODEL_METADATA in metadata:  # vit-export's: our models' normalisation.
        return params, layout
    stated = input_normalization.stated_normalization(
        str(epath.Path(path).parent), _hub_config(path), _beside(path, _PREPROCESSOR_CONFIG)
    )
    if stated is None:
        logger.warning(
            "%s: no file beside it says how its inputs were normalised (timm's config.json, "
            "transformers' preprocessor_config.json), so pixels are scaled to [-1, 1] as for "
            "Google's and AugReg's weights. DeiT, MAE and DINO weights were trained on "
            "ImageNet's mean and std: download that file with the weights.",
            path,
        )
    elif not input_normalization.is_inception(*stated):
        params = input_normalization.fold_into_patch_embedding(params, *stated)
        mean, std = (", ".join(f"{v:.4g}" for v in values) for values in stated)
        layout += (
            f", trained on pixels normalised with mean ({mean}) and std ({std}): folded into "
            "the patch embedding, which takes [-1, 1] images as vit_jax models do"
        )
    return params, layout


def model_fields(path: str | os.PathLike) -> dict[str, Any]:
    """The `VisionTransformer` fields with which our model computes what the source did.

    Reads only the file's header (and the hub `config.json` beside it, if any).
    """
    entries, metadata = read_header(path)
    if MODEL_METADATA in metadata:
        return json.loads(metadata[MODEL_METADATA])
    if timm_layout.is_timm(entries):
        return timm_layout.model_fields(entries, _hub_config(path))
    if transformers_layout.is_transformers(entries):
        return transformers_layout.model_fields(_hub_config(path).get("hidden_act"))
    raise ValueError(_unknown_layout(path, entries))


def described_run(path: str | os.PathLike, num_classes: int) -> dict[str, Any]:
    """What the hub `config.json` beside `path` says of the run that evaluates it, read
    once: `class_names`, when it names each of the head's `num_classes` outputs (see
    `_class_names`), and `eval_crop_fraction`, timm's central crop (`pretrained_cfg.crop_pct`:
    0.9 keeps the central 90% of the shorter side, as "resize to size / 0.9, crop size"
    does) when it states one of that mode."""
    config = _hub_config(path)
    described: dict[str, Any] = {}
    names = _class_names(config)
    if names is not None and len(names) == num_classes:
        described["class_names"] = names
    pretrained = config.get("pretrained_cfg", {})
    if pretrained.get("crop_mode", "center") == "center" and "crop_pct" in pretrained:
        if 0.0 < (fraction := float(pretrained["crop_pct"])) <= 1.0:
            described["eval_crop_fraction"] = fraction
    return described


def _class_names(config: dict[str, Any]) -> list[str] | None:
    """What a hub `config.json` names its head's outputs, in order: transformers'
    `id2label`, or timm's `label_names` (ImageNet's synsets, say) with the
    `label_descriptions` it gives them ("tench, Tinca tinca"); None when it names none."""
    timm_names = config.get("label_names", config.get("pretrained_cfg", {}).get("label_names"))
    if "id2label" in config:
        labels = config["id2label"]
    elif timm_names:
        described = config.get("label_descriptions") or {}
        named = timm_names if isinstance(timm_names, dict) else dict(enumerate(timm_names))
        labels = {i: described.get(name, name) for i, name in named.items()}
    else:
        return None
    labels = {int(i): str(name) for i, name in labels.items()}
    return (
        [labels[i] for i in range(len(labels))] if set(labels) == set(range(len(labels))) else None
    )


def _hub_config(path: str | os.PathLike) -> dict[str, Any]:
    return _beside(path, _HUB_CONFIG) or {}


def _beside(path: str | os.PathLike, name: str) -> dict[str, Any] | None:
    """The JSON file `name` in the folder of `path`; None when there is none."""
    config = epath.Path(path).parent / name
    return json.loads(config.read_text()) if config.exists() else None


def _unknown_layout(path: str | os.PathLike, keys: Any) -> str:
    return (
        f"{path} is neither in timm's ViT layout (patch_embed.proj, blocks.N...) nor in "
        f"transformers' (vit.embeddings..., vit.encoder.layer.N...); its first tensors are "
        f"{sorted(keys)[:8]}."
    )
