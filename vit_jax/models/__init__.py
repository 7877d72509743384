"""ViT and hybrid ResNet+ViT models, built by name with `create_model`."""

from __future__ import annotations

import dataclasses

from vit_jax.models.scan_layout import stack_blocks, unstack_blocks
from vit_jax.models.variants import Variant, parse_variant
from vit_jax.models.vit import VisionTransformer

__all__ = [
    "VisionTransformer",
    "Variant",
    "create_model",
    "parse_variant",
    "stack_blocks",
    "unstack_blocks",
]

_OVERRIDABLE = {f.name for f in dataclasses.fields(VisionTransformer)} - {"parent", "name"}


def create_model(name: str, *, num_classes: int, **overrides) -> VisionTransformer:
    """Builds a named variant, e.g. `create_model("B/16", num_classes=10, pool="gap")`.

    `overrides` set any `VisionTransformer` field (pool, posemb, representation_size,
    dropout, stochastic_depth, dtype, scan, remat_policy, attention_impl, ...),
    including the architecture fields decoded from the name.
    """
    unknown = set(overrides) - _OVERRIDABLE
    if unknown:
        raise TypeError(
            f"Unknown model option(s) {sorted(unknown)} for {name!r}; "
            f"valid options: {sorted(_OVERRIDABLE - {'num_classes'})}."
        )
    fields = dataclasses.asdict(parse_variant(name)) | overrides
    return VisionTransformer(num_classes=num_classes, **fields)
