"""Vision Transformer (Dosovitskiy et al., 2020) as Flax Linen modules.

The parameter tree keeps the names of the published checkpoints (`embedding`,
`cls`, `Transformer/posembed_input/pos_embedding`, `Transformer/encoderblock_{i}`,
`Transformer/encoder_norm`, `pre_logits`, `head`) so that they load by name.
Every parameter carries logical axis names and the residual stream carries
logical activation constraints: sharding is chosen by rules outside the model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models.resnet import resnet_stem, stem_stride

Dtype = Any

POOLS = ("token", "gap", "map")
# Google's checkpoints were trained with Flax's tanh approximation of GELU; timm's and
# transformers' with the exact (erf) GELU of PyTorch's `nn.GELU`.
ACTIVATIONS = {
    "gelu_tanh": functools.partial(nn.gelu, approximate=True),
    "gelu_exact": functools.partial(nn.gelu, approximate=False),
}
POSEMBS = ("learn", "sincos2d")
ATTENTION_IMPLS = ("xla", "cudnn")
# What a block keeps for its backward pass; the rest is recomputed there. `None`: the block is
# not rematerialised. "selective" recomputes only the attention's scores, softmax and
# weighted sum, so their [batch, heads, tokens, tokens] float32 probabilities are not kept:
# selective activation recomputation (Korthikanti et al. 2022, "Reducing Activation
# Recomputation in Large Transformer Models", section 4.2).
REMAT_POLICIES = {
    "none": None,
    "selective": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

RESIDUAL_AXES = ("activation_batch", "activation_length", "activation_embed")


def _dense_init(axes: Sequence[str | None]):
    return nn.with_logical_partitioning(nn.initializers.xavier_uniform(), axes)


def _layer_norm(name: str, dtype: Dtype) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=1e-6,
        dtype=dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
        name=name,
    )


class MlpBlock(nn.Module):
    """Dense -> GELU -> Dropout -> Dense -> Dropout."""

    mlp_dim: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    activation: str = "gelu_tanh"

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        width = x.shape[-1]
        # Tiny non-zero biases, as in the published models.
        bias_init = nn.initializers.normal(stddev=1e-6)
        x = nn.Dense(
            self.mlp_dim,
            dtype=self.dtype,
            kernel_init=_dense_init(("embed", "mlp")),
            bias_init=nn.with_logical_partitioning(bias_init, ("mlp",)),
            name="Dense_0",
        )(x)
        x = nn.with_logical_constraint(
            x, ("activation_batch", "activation_length", "activation_mlp")
        )
        x = ACTIVATIONS[self.activation](x)
        x = nn.Dropout(self.dropout)(x, deterministic=not train)
        x = nn.Dense(
            width,
            dtype=self.dtype,
            kernel_init=_dense_init(("mlp", "embed")),
            bias_init=nn.with_logical_partitioning(bias_init, ("embed",)),
            name="Dense_1",
        )(x)
        return nn.Dropout(self.dropout)(x, deterministic=not train)


def _xavier_over_flat_dims(num_in_dims: int):
    """Xavier-uniform with fans over the flattened input and output dims (as `DenseGeneral`)."""

    def init(key, shape, dtype=jnp.float32):
        flat = (int(np.prod(shape[:num_in_dims])), int(np.prod(shape[num_in_dims:])))
        return nn.initializers.xavier_uniform()(key, flat, dtype).reshape(shape)

    return init


class HeadsDense(nn.Module):
    """Dense over the last `num_in_dims` input dims into `features`: the q/k/v/out projections.

    Kernels are created in their final multi-dim shape, so the logical axis names
    apply to the array as stored (and as the published checkpoints store it).
    """

    features: tuple[int, ...]
    num_in_dims: int
    kernel_axes: tuple[str | None, ...]
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        in_shape = x.shape[x.ndim - self.num_in_dims :]
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(
                _xavier_over_flat_dims(self.num_in_dims), self.kernel_axes
            ),
            in_shape + self.features,
        )
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(
                nn.initializers.zeros, self.kernel_axes[self.num_in_dims :]
            ),
            self.features,
        )
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return jnp.tensordot(x, kernel, axes=self.num_in_dims) + bias


def _attend_explicit(q, k, v, dropout_rng, *, rate: float, dtype: Dtype):
    """Softmax attention with its weights (bhqk) returned and dropout on them at `rate`.

    A pure function, mask included (`nn.Dropout` is a module), so that `jax.checkpoint`
    can recompute it in the backward pass.
    """
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    weights = jax.nn.softmax(logits.astype(jnp.float32)).astype(dtype)
    kept = weights
    if dropout_rng is not None:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - rate, weights.shape)
        kept = jnp.where(keep, weights / (1.0 - rate), 0.0).astype(dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", kept, v), weights


def _attend_fused(q, k, v, dropout_rng, *, implementation: str):
    del dropout_rng  # the fused path runs only without attention dropout
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation), None


class MultiHeadDotProductAttention(nn.Module):
    """Multi-head attention with the published `query/key/value/out` layout.

    The fast path is `jax.nn.dot_product_attention` (`xla` or `cudnn`). The
    explicit softmax path runs when attention dropout is active or when the
    caller collects `intermediates`, since only it has the weights. `recompute`
    keeps only q, k and v for the backward pass, which computes the weights again
    (remat policy "selective").
    """

    num_heads: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    implementation: str = "xla"
    recompute: bool = False

    @nn.compact
    def __call__(self, q_in: jnp.ndarray, kv_in: jnp.ndarray, train: bool) -> jnp.ndarray:
        width = q_in.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}.")
        head_dim = width // self.num_heads

        def project(name: str, x: jnp.ndarray) -> jnp.ndarray:
            return HeadsDense(
                (self.num_heads, head_dim), 1, ("embed", "heads", "kv"), self.dtype, name=name
            )(x)

        q, k, v = project("query", q_in), project("key", kv_in), project("value", kv_in)
        heads_axes = ("activation_batch", "activation_length", "activation_heads", None)
        q, k, v = (nn.with_logical_constraint(t, heads_axes) for t in (q, k, v))

        explicit = (train and self.dropout > 0.0) or self.is_mutable_collection("intermediates")
        if explicit:
            rate = self.dropout if train else 0.0
            dropout_rng = self.make_rng("dropout") if rate > 0.0 else None
            attend = functools.partial(_attend_explicit, rate=rate, dtype=self.dtype)
        else:
            dropout_rng = None
            attend = functools.partial(_attend_fused, implementation=self.implementation)
        # cuDNN's fused attention recomputes the probabilities in its backward pass itself.
        if self.recompute and (explicit or self.implementation == "xla"):
            attend = jax.checkpoint(attend)
        out, weights = attend(q, k, v, dropout_rng)
        if explicit:
            self.sow("intermediates", "attention_weights", weights)
        return HeadsDense((width,), 2, ("heads", "kv", "embed"), self.dtype, name="out")(out)


class DropPath(nn.Module):
    """Stochastic depth: drops a whole residual branch per example, rescaling the rest."""

    @nn.compact
    def __call__(self, x: jnp.ndarray, rate: float | jnp.ndarray, train: bool) -> jnp.ndarray:
        if not train or (isinstance(rate, (int, float)) and rate == 0.0):
            return x
        keep_prob = 1.0 - rate
        mask_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        keep = jax.random.bernoulli(self.make_rng("dropout"), keep_prob, mask_shape)
        return jnp.where(keep, x / keep_prob, 0.0).astype(x.dtype)


def _in_order(fn: Callable[[nn.Module, Any], Any]) -> Callable[[nn.Module, Any], Any]:
    """`fn(module, x)` whose backward pass hands `x`'s gradient on only together with
    `module`'s parameter gradients (one optimization barrier over both), so the layers
    before `module` start their backward pass after its weight-gradient matmuls, as each
    iteration of a scanned loop does. The gradients are the same, to float32 rounding."""

    def forward(module, x):
        return nn.vjp(fn, module, x)

    def backward(vjp_fn, y_t):
        return jax.lax.optimization_barrier(vjp_fn(y_t))

    return nn.custom_vjp(fn, forward_fn=forward, backward_fn=backward)


def _maybe_in_order(ordered: bool, fn, module: nn.Module, x):
    return _in_order(fn)(module, x) if ordered else fn(module, x)


def _run_block(block: nn.Module, x, drop_path, train):
    return block(x, drop_path, train)


# Unrolled blocks, and the attention and MLP layers inside each, finish their parameter
# gradients before the layers below start their backward pass (`ordered_backward`). Left
# free, XLA's GPU compiler moved a data-parallel step's weight-gradient matmuls to the end
# of the backward pass and kept every block's recomputed activations live until then: B/16
# with full remat at 256 images per GPU on 8 H100s needed 19.3 GiB per GPU, 4.9 GiB with
# blocks in order (5.2 GiB scanned). The TPU compiler ran FSDP's weight-gradient matmuls
# late in the same way: B/16 at depth 2 on two v5e-4 slices (float32, 256 images per chip)
# needed 7.60 GB, 6.59 with blocks in order and 5.80 with their layers in order too, against
# data parallelism's 6.43; there the barriers made a data-parallel step need more
# (docs/fsdp-on-tpu.md "Across slices: the ordered backward").


class Encoder1DBlock(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    mlp_dim: int
    num_heads: int
    dropout: float = 0.0
    attention_dropout: float = 0.0
    dtype: Dtype = jnp.float32
    attention_impl: str = "xla"
    activation: str = "gelu_tanh"
    recompute_attention: bool = False
    # The attention and (with `ordered_mlp`) the MLP layer each finish their parameter
    # gradients before the layers below start their backward pass (`_in_order`).
    ordered_backward: bool = False
    ordered_mlp: bool = True

    @nn.compact
    def __call__(self, x: jnp.ndarray, drop_path: float | jnp.ndarray, train: bool):
        """Returns `(x, None)` so the same block serves `nn.scan` and a plain loop."""
        x = nn.with_logical_constraint(x, RESIDUAL_AXES)
        y = _layer_norm("LayerNorm_0", self.dtype)(x)
        attention = MultiHeadDotProductAttention(
            self.num_heads,
            self.attention_dropout,
            self.dtype,
            self.attention_impl,
            self.recompute_attention,
            name="MultiHeadDotProductAttention_0",
        )
        y = _maybe_in_order(self.ordered_backward, lambda m, y: m(y, y, train), attention, y)
        y = nn.Dropout(self.dropout)(y, deterministic=not train)
        x = x + DropPath()(y, drop_path, train)

        y = _layer_norm("LayerNorm_1", self.dtype)(x)
        mlp = MlpBlock(self.mlp_dim, self.dropout, self.dtype, self.activation, name="MlpBlock_0")
        ordered = self.ordered_backward and self.ordered_mlp
        y = _maybe_in_order(ordered, lambda m, y: m(y, train), mlp, y)
        x = x + DropPath()(y, drop_path, train)
        x = nn.with_logical_constraint(x, RESIDUAL_AXES)
        self.sow("intermediates", "out", x)
        return x, None


def sincos2d_posemb(height: int, width: int, dim: int, temperature: float = 10_000.0) -> np.ndarray:
    """Fixed 2D sine-cosine position embedding of shape (1, height*width, dim)."""
    if dim % 4:
        raise ValueError(f"posemb='sincos2d' needs a width divisible by 4, got {dim}.")
    y, x = np.mgrid[:height, :width]
    omega = 1.0 / temperature ** (np.arange(dim // 4) / (dim // 4 - 1 if dim > 4 else 1))
    y = y.reshape(-1)[:, None] * omega[None, :]
    x = x.reshape(-1)[:, None] * omega[None, :]
    pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
    return pe[None].astype(np.float32)


class AddPositionEmbs(nn.Module):
    """Adds learned or sincos2d position embeddings (prefix tokens: learned, or zero for sincos)."""

    posemb: str
    grid: tuple[int, int]
    num_prefix: int

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        length, width = x.shape[1], x.shape[2]
        if self.posemb == "learn":
            pe = self.param(
                "pos_embedding",
                nn.with_logical_partitioning(
                    nn.initializers.normal(stddev=0.02), (None, None, "embed")
                ),
                (1, length, width),
            )
        else:
            pe = jnp.asarray(sincos2d_posemb(*self.grid, width))
            pe = jnp.pad(pe, ((0, 0), (self.num_prefix, 0), (0, 0)))
        return x + pe.astype(x.dtype)


class Encoder(nn.Module):
    """Position embedding, `depth` blocks (unrolled or scanned) and the final norm.

    `final_norm=False` leaves the norm to the model, which applies it after pooling (`fc_norm`).
    """

    depth: int
    mlp_dim: int
    num_heads: int
    posemb: str = "learn"
    dropout: float = 0.0
    attention_dropout: float = 0.0
    stochastic_depth: float = 0.0
    dtype: Dtype = jnp.float32
    attention_impl: str = "xla"
    scan: bool = False
    remat_policy: str = "none"
    ordered_backward: bool = True
    ordered_mlp: bool = True
    activation: str = "gelu_tanh"
    final_norm: bool = True

    @nn.compact
    def __call__(
        self,
        x: jnp.ndarray,
        grid: tuple[int, int],
        num_prefix: int,
        train: bool,
        registers: jnp.ndarray | None = None,
    ):
        """`x` is [cls?, patches]; `registers` (n, R, D) go after the class token, unembedded."""
        x = AddPositionEmbs(self.posemb, grid, num_prefix, name="posembed_input")(x)
        if registers is not None:
            x = jnp.concatenate([x[:, :num_prefix], registers, x[:, num_prefix:]], axis=1)
        x = nn.Dropout(self.dropout)(x, deterministic=not train)

        block = Encoder1DBlock
        remat = REMAT_POLICIES[self.remat_policy]
        if remat is not None:
            # Arguments: self=0, x=1, drop_path=2, train=3.
            block = nn.remat(
                block,
                prevent_cse=not self.scan,
                static_argnums=(3,),
                policy=remat,
            )
        block_kwargs = dict(
            mlp_dim=self.mlp_dim,
            num_heads=self.num_heads,
            dropout=self.dropout,
            attention_dropout=self.attention_dropout,
            dtype=self.dtype,
            attention_impl=self.attention_impl,
            activation=self.activation,
            recompute_attention=self.remat_policy == "selective",
            # A scanned loop runs each block's backward pass in order already. Inside a
            # rematerialised block only the block is ordered: flax's custom_vjp under
            # nn.remat leaks the dropout key's tracer.
            ordered_backward=self.ordered_backward and not self.scan and remat is None,
            ordered_mlp=self.ordered_mlp,
        )
        # Stochastic depth grows linearly from 0 at the first block to its maximum at the last.
        rates = np.linspace(0.0, self.stochastic_depth, self.depth)
        if self.scan:
            scanned = nn.scan(
                block,
                variable_axes={"params": 0, "intermediates": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast),
                length=self.depth,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, _ = scanned(name="encoderblock", **block_kwargs)(x, jnp.asarray(rates), train)
        else:
            for i in range(self.depth):
                layer = block(name=f"encoderblock_{i}", **block_kwargs)
                run = functools.partial(_run_block, drop_path=float(rates[i]), train=train)
                x, _ = _maybe_in_order(self.ordered_backward, run, layer, x)
        return _layer_norm("encoder_norm", self.dtype)(x) if self.final_norm else x


class MAPHead(nn.Module):
    """Multihead attention pooling: a learned probe attends over all tokens."""

    mlp_dim: int
    num_heads: int
    dtype: Dtype = jnp.float32
    attention_impl: str = "xla"
    activation: str = "gelu_tanh"

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        width = x.shape[-1]
        probe = self.param("probe", _dense_init((None, None, "embed")), (1, 1, width))
        probe = jnp.tile(probe, (x.shape[0], 1, 1)).astype(x.dtype)
        y = MultiHeadDotProductAttention(
            self.num_heads,
            dtype=self.dtype,
            implementation=self.attention_impl,
            name="MultiHeadDotProductAttention_0",
        )(probe, x, train)
        z = _layer_norm("LayerNorm_0", self.dtype)(y)
        mlp = MlpBlock(self.mlp_dim, 0.0, self.dtype, self.activation, name="MlpBlock_0")
        y = y + mlp(z, train)
        return y[:, 0]


class VisionTransformer(nn.Module):
    """ViT classifier; `create_model("B/16", num_classes=...)` builds the named variants.

    Call with NHWC float images in [-1, 1]: `model.apply(variables, images, train=False)`.
    With `num_classes=0` it returns the pooled (pre-logits) features instead of logits.
    `activation` and `fc_norm` let the model compute what timm's and transformers'
    ViTs compute: `fc_norm=True` moves the final LayerNorm after the pooling (parameter
    `fc_norm` instead of `Transformer/encoder_norm`), as timm's average-pooled models do.
    """

    num_classes: int
    patch_size: int
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    resnet_stages: tuple[int, ...] | None = None
    num_registers: int = 0
    pool: str = "token"
    posemb: str = "learn"
    representation_size: int | None = None
    head_bias_init: float = 0.0
    dropout: float = 0.0
    attention_dropout: float = 0.0
    stochastic_depth: float = 0.0
    dtype: Dtype = jnp.float32
    attention_impl: str = "xla"
    scan: bool = False
    remat_policy: str = "none"
    # Unrolled blocks finish their parameter gradients before the block below starts
    # and, without block remat, their attention and MLP layers too (`_in_order`); on TPUs
    # the Trainer keeps it for FSDP only.
    ordered_backward: bool = True
    # With `ordered_backward`, the MLP layers too. On one TPU slice, where FSDP's weights
    # are gathered where used, the MLP's barrier raised the backward pass's peak: one
    # bfloat16 B/16 block at 2,048 images per v5e chip needed 17.22 GB with it, 15.97
    # without, against data parallelism's 16.03 (HBM 16.91), so the Trainer turns it off
    # there. Across slices the layers' order is what brought FSDP below data parallelism
    # (docs/fsdp-on-tpu.md).
    ordered_mlp: bool = True
    # Materialises the pooled features ([n, width]) behind an optimisation barrier. Without
    # it the TPU compiler fused the final norm's recomputation of them into the next layer's
    # weight-gradient matmul, which then kept two residual-stream-sized inputs of the norm
    # live until late in the backward pass: with FSDP's weights gathered where used, B/16 at
    # depth 2 and 256 images per chip needed 0.9 GB more. The Trainer turns it on on one TPU
    # slice and for FSDP across slices (with the ordered backward there: 5.80 GB against
    # 6.11); for data parallelism across slices and on GPUs it cost more than it saved.
    pooled_barrier: bool = False
    activation: str = "gelu_tanh"
    fc_norm: bool = False

    def __post_init__(self):
        for field, value, choices in (
            ("pool", self.pool, POOLS),
            ("posemb", self.posemb, POSEMBS),
            ("attention_impl", self.attention_impl, ATTENTION_IMPLS),
            ("remat_policy", self.remat_policy, tuple(REMAT_POLICIES)),
            ("activation", self.activation, tuple(ACTIVATIONS)),
        ):
            if value not in choices:
                raise ValueError(f"{field}={value!r} is not supported: choose one of {choices}.")
        for field in ("patch_size", "width", "mlp_dim", "num_heads"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field}={getattr(self, field)} must be at least 1.")
        if self.representation_size is not None and self.representation_size < 1:
            raise ValueError(
                f"representation_size={self.representation_size} must be at least 1, or None "
                "for no pre-logits layer."
            )
        if self.depth < 0:
            raise ValueError(f"depth={self.depth} must be >= 0 (0: no encoder block).")
        if not isinstance(self.num_registers, int) or self.num_registers < 0:
            raise ValueError(
                f"num_registers={self.num_registers!r} must be a non-negative integer "
                "(0 turns registers off)."
            )
        for field in ("dropout", "attention_dropout", "stochastic_depth"):
            rate = getattr(self, field)
            if not 0.0 <= rate < 1.0:
                raise ValueError(
                    f"{field}={rate}: must be in [0, 1), the fraction dropped (at 1 nothing "
                    "is kept, and what is kept is rescaled by 1/0)."
                )
        if self.attention_impl == "cudnn" and jnp.dtype(self.dtype) not in (
            jnp.bfloat16,
            jnp.float16,
        ):
            raise ValueError(
                "attention_impl='cudnn' needs dtype=bfloat16 or float16 "
                f"(got {jnp.dtype(self.dtype).name}); use attention_impl='xla' for float32."
            )
        super().__post_init__()

    @property
    def pixels_per_token(self) -> int:
        """Side in pixels of the square one token covers: the patch, times a hybrid stem's
        stride."""
        if self.resnet_stages is None:
            return self.patch_size
        return self.patch_size * stem_stride(self.resnet_stages)

    def check_image_size(self, image_size: int | tuple[int, int]) -> None:
        """Refuses an image side that `pixels_per_token` does not divide.

        The patch embedding is a VALID convolution with the patch as its stride: it would
        drop the last `size % patch` rows and columns without a word (a hybrid stem pads
        them instead), and a run would report the accuracy of a model that never saw them.
        Entry points call this before they build or write anything; `__call__` again.

        Args:
          image_size: the side of square images in pixels, or (height, width).

        Raises:
          ValueError: naming the size, the pixels per token and the nearest sizes that fit.
        """
        step = self.pixels_per_token
        if self.resnet_stages is None:
            per_token = f"the patch size, {step} px"
        else:
            stride = stem_stride(self.resnet_stages)
            per_token = (
                f"{step} px, the hybrid stem's stride {stride} times the patch size "
                f"{self.patch_size}"
            )
        sides = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        for side in sides:
            if side <= 0:
                raise ValueError(
                    f"Image size {side} px: an image is at least one token, {per_token}."
                )
            if side % step:
                lower = side // step * step
                nearest = " or ".join(str(n) for n in (lower, lower + step) if n > 0)
                raise ValueError(
                    f"Image size {side} px is not a multiple of {per_token}: the tokens would "
                    f"not tile the image and its last {side - lower} px would be lost or "
                    f"padded. Use image size {nearest}."
                )

    @nn.compact
    def __call__(self, images: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        if images.ndim != 4:
            raise ValueError(f"Expected NHWC images, got an array of shape {images.shape}.")
        self.check_image_size(images.shape[1:3])
        x = images.astype(self.dtype)
        if self.resnet_stages is not None:
            x = resnet_stem(x, self.resnet_stages, self.dtype)
        x = nn.Conv(
            self.width,
            kernel_size=(self.patch_size, self.patch_size),
            strides=(self.patch_size, self.patch_size),
            padding="VALID",
            dtype=self.dtype,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), (None, None, None, "embed")
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
            name="embedding",
        )(x)
        n, h, w, c = x.shape
        x = jnp.reshape(x, (n, h * w, c))

        num_prefix = 0
        if self.pool == "token":
            cls = self.param(
                "cls",
                nn.with_logical_partitioning(nn.initializers.zeros, (None, None, "embed")),
                (1, 1, c),
            )
            x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), (n, 1, 1)), x], axis=1)
            num_prefix = 1
        registers = None
        if self.num_registers:
            # Registers (Darcet et al., 2023): scratch tokens without a position. Unlike
            # the zero-initialised class token they need random init: identical registers
            # would receive identical updates and never become different from each other.
            registers = self.param(
                "registers",
                nn.with_logical_partitioning(
                    nn.initializers.normal(stddev=0.02), (None, None, "embed")
                ),
                (1, self.num_registers, c),
            )
            registers = jnp.tile(registers.astype(x.dtype), (n, 1, 1))
        tokens = x.shape[1] + self.num_registers
        if self.attention_impl == "cudnn" and train and tokens % 2:
            # cuDNN's fused attention refuses odd sequence lengths in training, deep inside
            # JAX ("Unsupported sequence length Q 197, KV 197").
            raise ValueError(
                f"attention_impl='cudnn' trains only on an even number of tokens; this model "
                f"has {tokens} ({x.shape[1] - num_prefix} patches + {num_prefix} class token"
                f" + {self.num_registers} registers). Add a register token (num_registers="
                f"{self.num_registers + 1}) or use attention_impl='xla'."
            )

        x = Encoder(
            depth=self.depth,
            mlp_dim=self.mlp_dim,
            num_heads=self.num_heads,
            posemb=self.posemb,
            dropout=self.dropout,
            attention_dropout=self.attention_dropout,
            stochastic_depth=self.stochastic_depth,
            dtype=self.dtype,
            attention_impl=self.attention_impl,
            scan=self.scan,
            remat_policy=self.remat_policy,
            ordered_backward=self.ordered_backward,
            ordered_mlp=self.ordered_mlp,
            activation=self.activation,
            final_norm=not self.fc_norm,
            name="Transformer",
        )(x, (h, w), num_prefix, train, registers)

        # Pooling sees the class token or the patch tokens, never the registers.
        patches = x[:, num_prefix + self.num_registers :]
        if self.pool == "token":
            x = x[:, 0]
        elif self.pool == "gap":
            x = jnp.mean(patches, axis=1)
        else:
            x = MAPHead(
                self.mlp_dim,
                self.num_heads,
                self.dtype,
                self.attention_impl,
                self.activation,
                name="MAPHead_0",
            )(patches, train)
        if self.pooled_barrier:
            x = jax.lax.optimization_barrier(x)
        if self.fc_norm:
            x = _layer_norm("fc_norm", self.dtype)(x)

        if self.representation_size is not None:
            x = nn.Dense(
                self.representation_size,
                dtype=self.dtype,
                kernel_init=_dense_init(("embed", None)),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
                name="pre_logits",
            )(x)
            x = nn.tanh(x)
        self.sow("intermediates", "pre_logits", x)
        if not self.num_classes:
            return x.astype(jnp.float32)

        x = nn.Dense(
            self.num_classes,
            dtype=self.dtype,
            # The input axis is "embed" (also after `pre_logits`) so that FSDP splits the
            # head like every other width: an i21k head is 16.8M parameters.
            kernel_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed", "classes")),
            bias_init=nn.with_logical_partitioning(
                nn.initializers.constant(self.head_bias_init), ("classes",)
            ),
            name="head",
        )(x)
        return x.astype(jnp.float32)
