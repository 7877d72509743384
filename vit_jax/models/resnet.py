"""ResNetV2 stem (weight-standardised convolutions + GroupNorm) of the hybrid ViTs.

Module names follow the published R50+ViT checkpoints: `conv_root`, `gn_root`,
`block{i}/unit{j}/{conv,gn}{1,2,3}` and `conv_proj`/`gn_proj` on projections.
Every numerical detail is the published models' (the original vit_jax and
big_vision): kernels standardised as `(w - mean) / (std + 1e-5)`, GroupNorm with 32
groups and epsilon 1e-6, "SAME" padding for the convolutions and the max-pool, and
the stride of a bottleneck unit on its 3x3 convolution and its projection.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any

_CONV_AXES = (None, None, None, "conv_out")


def _conv_init():
    return nn.with_logical_partitioning(nn.initializers.lecun_normal(), _CONV_AXES)


def standardize(kernel):
    """A [k, k, in, out] kernel standardised per output filter (numpy or JAX arrays).

    The epsilon is added to the standard deviation, not to the variance: that is
    the published models' formula, and with `sqrt(var + eps)` instead their
    checkpoints compute logits off by ~1e-4 relative.
    """
    centred = kernel - kernel.mean(axis=(0, 1, 2), keepdims=True)
    return centred / (centred.std(axis=(0, 1, 2), keepdims=True) + 1e-5)


class StdConv(nn.Conv):
    """Convolution whose kernel is standardised per output filter (`standardize`)."""

    def param(self, name: str, *args, **kwargs):
        param = super().param(name, *args, **kwargs)
        return standardize(param) if name == "kernel" else param


def _group_norm(name: str, dtype: Dtype, zero_scale: bool = False) -> nn.GroupNorm:
    scale_init = nn.initializers.zeros if zero_scale else nn.initializers.ones
    return nn.GroupNorm(
        num_groups=32,
        epsilon=1e-6,
        dtype=dtype,
        scale_init=nn.with_logical_partitioning(scale_init, ("conv_out",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
        name=name,
    )


def _std_conv(features: int, kernel: int, strides: int, name: str, dtype: Dtype) -> StdConv:
    return StdConv(
        features=features,
        kernel_size=(kernel, kernel),
        strides=(strides, strides),
        use_bias=False,
        dtype=dtype,
        kernel_init=_conv_init(),
        name=name,
    )


class BottleneckUnit(nn.Module):
    """Bottleneck residual unit: 1x1 -> 3x3 (strided) -> 1x1 with 4x expansion."""

    features: int
    strides: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        out_features = 4 * self.features
        residual = x
        if x.shape[-1] != out_features or self.strides != 1:
            residual = _std_conv(out_features, 1, self.strides, "conv_proj", self.dtype)(x)
            residual = _group_norm("gn_proj", self.dtype)(residual)
        y = _std_conv(self.features, 1, 1, "conv1", self.dtype)(x)
        y = nn.relu(_group_norm("gn1", self.dtype)(y))
        y = _std_conv(self.features, 3, self.strides, "conv2", self.dtype)(y)
        y = nn.relu(_group_norm("gn2", self.dtype)(y))
        y = _std_conv(out_features, 1, 1, "conv3", self.dtype)(y)
        # Zero-initialised last norm: every unit starts as the identity.
        y = _group_norm("gn3", self.dtype, zero_scale=True)(y)
        return nn.relu(residual + y)


class ResNetStage(nn.Module):
    """`depth` bottleneck units; the first one carries the stage's stride."""

    depth: int
    features: int
    first_stride: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        for i in range(self.depth):
            strides = self.first_stride if i == 0 else 1
            x = BottleneckUnit(self.features, strides, self.dtype, name=f"unit{i + 1}")(x)
        return x


def stem_stride(stages: tuple[int, ...]) -> int:
    """How many pixels of the input one position of `resnet_stem`'s output steps over.

    The root block halves twice (4); every stage after the first halves once more.
    """
    return 4 * 2 ** max(len(stages) - 1, 0)


def resnet_stem(
    x: jnp.ndarray, stages: tuple[int, ...], dtype: Dtype, width: int = 64
) -> jnp.ndarray:
    """Applies the hybrid stem inside the calling module's scope.

    Called from `VisionTransformer.__call__` so that the stem's parameters sit at
    the top level of the tree, where the published checkpoints keep them. The root
    block (7x7 stride-2 convolution, GroupNorm, ReLU, 3x3 stride-2 max-pool) always
    runs, so even with no stages ("R+Ti/16") the stem downsamples by 4.
    """
    x = _std_conv(width, 7, 2, "conv_root", dtype)(x)
    x = nn.relu(_group_norm("gn_root", dtype)(x))
    x = nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding="SAME")
    for i, depth in enumerate(stages):
        x = ResNetStage(
            depth,
            width * 2**i,
            first_stride=1 if i == 0 else 2,
            dtype=dtype,
            name=f"block{i + 1}",
        )(x)
    return x
