"""ViT and hybrid ResNet+ViT models, built by name with `create_model`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from vit_jax.models.inputs import scale_images
from vit_jax.models.scan_layout import stack_blocks, unstack_blocks
from vit_jax.models.variants import Variant, parse_variant
from vit_jax.models.vit import VisionTransformer

__all__ = [
    "VisionTransformer",
    "Variant",
    "abstract_params",
    "build_model",
    "create_model",
    "parse_variant",
    "scale_images",
    "stack_blocks",
    "unstack_blocks",
]

_OVERRIDABLE = {f.name for f in dataclasses.fields(VisionTransformer)} - {"parent", "name"}
_ARCHITECTURE = ("patch_size", "width", "depth", "mlp_dim", "num_heads")


def create_model(name: str | None, *, num_classes: int, **overrides) -> VisionTransformer:
    """Builds a named variant, e.g. `create_model("B/16", num_classes=10, pool="gap")`.

    `overrides` set any `VisionTransformer` field (pool, posemb, representation_size,
    dropout, stochastic_depth, dtype, scan, remat_policy, attention_impl, ...),
    including the architecture fields decoded from the name; one that is None keeps the
    name's value (or the field's default). Without a name (None), they give the
    architecture of a plain ViT: patch_size, width, depth, mlp_dim, num_heads.

    Raises:
      TypeError: an unknown option, or no name and some architecture field missing.
    """
    overrides = {key: value for key, value in overrides.items() if value is not None}
    unknown = set(overrides) - _OVERRIDABLE
    if unknown:
        raise TypeError(
            f"Unknown model option(s) {sorted(unknown)} for {name!r}; "
            f"valid options: {sorted(_OVERRIDABLE - {'num_classes'})}."
        )
    named = dataclasses.asdict(parse_variant(name)) if name else {}
    missing = [f for f in _ARCHITECTURE if f not in named and f not in overrides]
    if missing:
        raise TypeError(
            f"A model without a name needs {', '.join(missing)} too: give a name such as "
            "'B/16' (model.name), or every one of " + ", ".join(_ARCHITECTURE) + "."
        )
    return VisionTransformer(num_classes=num_classes, **(named | overrides))


def build_model(model: Mapping[str, Any], num_classes: int) -> VisionTransformer:
    """The model a config's `model` section describes: `name` plus every other field as an
    override (`create_model`), `dtype` given by its name ("float32", "bfloat16")."""
    overrides = dict(model)
    name = overrides.pop("name", None)
    overrides["dtype"] = jnp.dtype(overrides.get("dtype", "float32"))
    return create_model(name, num_classes=num_classes, **overrides)


def abstract_params(model: VisionTransformer, image_size: int | tuple[int, int]) -> Any:
    """Shapes, dtypes and logical axes (boxed) of `model`'s parameters; nothing computed.

    `image_size`: pixels of a square image, or (height, width).
    """
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    images = jnp.zeros((1, height, width, 3))
    return jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))["params"]
