"""ViT and hybrid ResNet+ViT models, built by name with `create_model`."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from vit_jax.models.inputs import scale_images
from vit_jax.models.scan_layout import stack_blocks, unstack_blocks
from vit_jax.models.variants import Variant, parse_variant
from vit_jax.models.vit import VisionTransformer

__all__ = [
    "COMPUTE_DTYPES",
    "VisionTransformer",
    "Variant",
    "abstract_params",
    "build_model",
    "compute_dtype",
    "create_model",
    "parse_variant",
    "runnable_on",
    "scale_images",
    "stack_blocks",
    "unstack_blocks",
]

log = logging.getLogger(__name__)

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


COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def compute_dtype(name: str, platform: str | None = None) -> jnp.dtype:
    """The dtype `model.dtype` names, in which activations are computed (parameters stay
    float32): one of `COMPUTE_DTYPES`, or "float64" when JAX runs with 64-bit types.
    `platform`: where it will run ("tpu", "gpu", "cpu"; None: not checked).

    Raises:
      ValueError: a name that is none of these. JAX without `JAX_ENABLE_X64=1` would
        compute a float64 model in float32, so that is refused too, and so is float16 on
        a TPU, whose compiler has no float16 matmul, and on a CPU, whose backend has none
        that sums in float32 (`jax.nn.dot_product_attention`'s).
    """
    choices = f"choose one of {', '.join(COMPUTE_DTYPES)}"
    try:
        dtype = jnp.dtype(name)
    except TypeError:
        raise ValueError(f"model.dtype={name!r} is not a dtype: {choices}.") from None
    if dtype.name == "float16" and platform == "tpu":
        raise ValueError(
            "model.dtype='float16': XLA's TPU compiler has no float16 matmul; TPUs compute "
            "in bfloat16 (--config.model.dtype=bfloat16)."
        )
    if dtype.name == "float16" and platform == "cpu":
        raise ValueError(
            "model.dtype='float16': XLA's CPU backend has no float16 matmul that sums in "
            "float32, as attention's does; on a CPU compute in float32 or bfloat16 "
            "(--config.model.dtype=float32)."
        )
    if dtype.name in COMPUTE_DTYPES or (dtype.name == "float64" and jax.config.jax_enable_x64):
        return dtype
    if dtype.name == "float64":
        raise ValueError(
            "model.dtype='float64' needs 64-bit JAX (JAX_ENABLE_X64=1 in the environment): "
            f"without it JAX computes in float32. Set it, or {choices}."
        )
    raise ValueError(f"model.dtype={name!r} cannot compute a ViT: {choices}.")


def build_model(
    model: Mapping[str, Any], num_classes: int, platform: str | None = None
) -> VisionTransformer:
    """The model a config's `model` section describes: `name` plus every other field as an
    override (`create_model`), `dtype` given by its name (`compute_dtype`, for `platform`).

    Raises:
      ValueError: what `compute_dtype` refuses, or cuDNN attention on a TPU or a CPU.
    """
    overrides = dict(model)
    name = overrides.pop("name", None)
    overrides["dtype"] = compute_dtype(overrides.get("dtype", "float32"), platform)
    if _cudnn_elsewhere(overrides, platform):
        raise ValueError(
            "model.attention_impl='cudnn' is cuDNN's fused attention, which runs on NVIDIA "
            f"GPUs only; on a {platform.upper()} use XLA's (--config.model.attention_impl=xla)."
        )
    return create_model(name, num_classes=num_classes, **overrides)


def _cudnn_elsewhere(model: Mapping[str, Any], platform: str | None) -> bool:
    return model.get("attention_impl") == "cudnn" and platform in ("tpu", "cpu")


def runnable_on(model: Mapping[str, Any], platform: str) -> dict[str, Any]:
    """A trained model's `model` section with what `platform` cannot run replaced, to run
    it for inference there: a compute dtype the platform lacks (float16 on a TPU or a CPU,
    float64 without 64-bit JAX) by float32, the parameters' own dtype; cuDNN attention
    by XLA's, the same function. Each replacement is logged as a warning.

    Raises:
      ValueError: a `dtype` that is no compute dtype anywhere (`compute_dtype`).
    """
    model, replaced = dict(model), []
    dtype = model.get("dtype", "float32")
    if dtype in ("float16", "float64"):
        try:
            compute_dtype(dtype, platform)
        except ValueError:
            model["dtype"] = "float32"
            replaced.append(f"dtype {dtype} by float32")
    compute_dtype(model.get("dtype", "float32"))
    if _cudnn_elsewhere(model, platform):
        model["attention_impl"] = "xla"
        replaced.append("cuDNN attention by XLA's")
    if replaced:
        log.warning(
            "A %s cannot run this model as it was trained: replaced its %s.",
            platform.upper(), " and ".join(replaced),
        )  # fmt: skip
    return model


def abstract_params(model: VisionTransformer, image_size: int | tuple[int, int]) -> Any:
    """Shapes, dtypes and logical axes (boxed) of `model`'s parameters; nothing computed.

    `image_size`: pixels of a square image, or (height, width).
    """
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    images = jnp.zeros((1, height, width, 3))
    return jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))["params"]
