"""The numbers behind the paper's figures (ViT paper, Fig. 6 and 7), from a model and its params.

Everything here returns numpy arrays and draws nothing (`plots` draws). Token layout: the
patch tokens are always the last `h * w` tokens of the sequence; whatever precedes them
(the class token, register tokens) is a prefix that the figures leave out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.metrics import parse_record
from vit_jax.models import VisionTransformer, scale_images
from vit_jax.models.resnet import standardize
from vit_jax.models.vit import sincos2d_posemb
from vit_jax.parallel import host_arrays


class Attention(NamedTuple):
    """Attention weights of one batch of images.

    layers: [depth, batch, heads, tokens, tokens], rows are queries and sum to 1.
    pooled: [batch, tokens], how the pooled representation weighs the last layer's tokens
      (one-hot on the class token, uniform over patches for "gap", the MAP probe's
      attention averaged over heads for "map").
    """

    layers: np.ndarray
    pooled: np.ndarray


def patch_grid(model: VisionTransformer, image_size: int) -> tuple[int, int]:
    """(rows, columns) of patch tokens for square images of `image_size` pixels.

    Read from the token count the model computes (shapes only, nothing is run), so any
    stem and any prefix (class token, registers) is accounted for as the model does.
    """
    images = jnp.zeros((1, image_size, image_size, 3))

    def intermediates():
        variables = model.init(jax.random.key(0), images, train=False)
        return model.apply(variables, images, train=False, mutable=["intermediates"])[1]

    encoder = jax.eval_shape(intermediates)["intermediates"]["Transformer"]
    block = encoder["encoderblock"] if model.scan else encoder["encoderblock_0"]
    tokens = block["out"][0].shape[-2]
    side = math.isqrt(tokens - int(model.pool == "token") - model.num_registers)
    return side, side


def attention_fn(model: VisionTransformer) -> Callable[[Any, jax.Array], Attention]:
    """A jitted `(params, uint8 images) -> Attention`: scanned or not, plain or hybrid."""
    jitted = jax.jit(_attention(model))
    return lambda params, images: Attention(*host_arrays(jitted(params, images)))


def attention_distance_fn(
    model: VisionTransformer, grid: tuple[int, int], patch_pixels: int
) -> Callable[[Any, jax.Array], np.ndarray]:
    """A jitted `(params, uint8 images) -> [depth, heads]` `mean_attention_distance`.

    Computed on the device: only the [depth, heads] figure leaves it, not the attention
    weights (hundreds of MB per image for a large model at high resolution).
    """
    attention = _attention(model)

    def distance(params: Any, images: jax.Array) -> jax.Array:
        return mean_attention_distance(attention(params, images)[0], grid, patch_pixels)

    jitted = jax.jit(distance)
    return lambda params, images: host_arrays(jitted(params, images))


def _attention(model: VisionTransformer) -> Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]:
    """`(params, uint8 images) -> (layers, pooled)` of `Attention`, to be jitted.

    The weights are what the model sows into `intermediates` (the explicit attention path).
    Rematerialisation is switched off: it only matters for training.
    """
    model = model.clone(num_classes=0, remat_policy="none")

    def collect(params: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        _, state = model.apply(
            {"params": params}, scale_images(images), train=False, mutable=["intermediates"]
        )
        encoder = state["intermediates"]["Transformer"]
        if model.scan:
            layers = encoder["encoderblock"]["MultiHeadDotProductAttention_0"]
            layers = layers["attention_weights"][0]
        else:
            layers = jnp.stack(
                [
                    encoder[f"encoderblock_{i}"]["MultiHeadDotProductAttention_0"][
                        "attention_weights"
                    ][0]
                    for i in range(model.depth)
                ]
            )
        layers = layers.astype(jnp.float32)
        batch, tokens = layers.shape[1], layers.shape[-1]
        if model.pool == "token":
            pooled = jnp.zeros((batch, tokens)).at[:, 0].set(1.0)
        elif model.pool == "map":  # The probe attends over the patch tokens only.
            probe = state["intermediates"]["MAPHead_0"]["MultiHeadDotProductAttention_0"]
            probe = probe["attention_weights"][0].astype(jnp.float32).mean(axis=1)[:, 0]
            pooled = jnp.zeros((batch, tokens)).at[:, tokens - probe.shape[-1] :].set(probe)
        else:
            patches = tokens - model.num_registers
            pooled = jnp.zeros((batch, tokens)).at[:, tokens - patches :].set(1.0 / patches)
        return layers, pooled

    return collect


def attention_rollout(layers: np.ndarray) -> np.ndarray:
    """Attention rollout (Abnar & Zuidema, 2020): [depth, batch, heads, T, T] -> [batch, T, T].

    Heads are averaged, the residual connection is accounted for as 0.5 * A + 0.5 * I
    (rows renormalised), and the layers are multiplied from the first to the last, so row
    q says how much of each input token flows into output token q.
    """
    depth, batch, _, tokens, _ = layers.shape
    eye = np.eye(tokens)
    rollout = np.broadcast_to(eye, (batch, tokens, tokens))
    for layer in layers.astype(np.float64).mean(axis=2):
        mixed = 0.5 * layer + 0.5 * eye
        mixed /= mixed.sum(axis=-1, keepdims=True)
        rollout = mixed @ rollout
    return rollout


def rollout_maps(attention: Attention, grid: tuple[int, int]) -> np.ndarray:
    """[batch, h, w]: the rollout from the pooled representation to every patch.

    The prefix tokens (class token, registers) are left out; the map is not renormalised,
    so its sum is the share of the representation that comes from the patches.
    """
    rollout = attention_rollout(attention.layers)
    pooled = np.einsum("bt,btk->bk", attention.pooled.astype(np.float64), rollout)
    patches = grid[0] * grid[1]
    return pooled[:, -patches:].reshape(-1, *grid)


def patch_distances(grid: tuple[int, int], patch_pixels: int) -> np.ndarray:
    """[N, N] Euclidean distances in pixels between the centres of the N patches."""
    rows, cols = np.divmod(np.arange(grid[0] * grid[1]), grid[1])
    centres = np.stack([rows, cols], axis=-1) * float(patch_pixels)
    return np.linalg.norm(centres[:, None] - centres[None], axis=-1)


def mean_attention_distance(
    layers: jax.Array, grid: tuple[int, int], patch_pixels: int
) -> jax.Array:
    """[depth, heads]: the pixel distance a head integrates information over (paper Fig. 7).

    `layers`: attention weights [depth, batch, heads, T, T] (numpy or jax, float32). For
    every patch query, the attention-weighted mean distance to the patch keys (the weights
    renormalised over patches, so attention parked on the prefix tokens does not count as
    short-range), averaged over queries and images.
    """
    patches = grid[0] * grid[1]
    weights = jnp.asarray(layers, jnp.float32)[..., -patches:, -patches:]
    weights = weights / weights.sum(axis=-1, keepdims=True)
    distances = jnp.asarray(patch_distances(grid, patch_pixels), jnp.float32)
    distance = jnp.einsum("lbhqk,qk->lbhq", weights, distances, precision=jax.lax.Precision.HIGHEST)
    return distance.mean(axis=(1, 3))


def patch_position_embeddings(
    model: VisionTransformer, params: Any, grid: tuple[int, int]
) -> np.ndarray:
    """[h * w, width]: the position embedding of every patch (prefix tokens left out)."""
    if model.posemb == "sincos2d":
        return sincos2d_posemb(*grid, model.width)[0]
    posemb = np.asarray(params["Transformer"]["posembed_input"]["pos_embedding"])[0]
    return posemb[-grid[0] * grid[1] :]


def cosine_similarity(vectors: np.ndarray) -> np.ndarray:
    """[N, N] cosine similarity of every row with every row."""
    vectors = np.asarray(vectors, np.float64)
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)
    return unit @ unit.T


def pixel_filters(model: VisionTransformer, params: Any) -> tuple[np.ndarray, str]:
    """The first filters that see RGB pixels, [k, k, 3, filters], and what they are.

    A plain ViT's patch embedding; for a hybrid, the ResNet root convolution, standardised
    per filter as the model applies it.
    """
    if model.resnet_stages is None:
        return np.asarray(params["embedding"]["kernel"], np.float64), "patch-embedding filters"
    kernel = np.asarray(params["conv_root"]["kernel"], np.float64)
    return standardize(kernel), "ResNet root filters"


def principal_components(filters: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The top `count` principal components of a filter bank [k, k, c, n] over its n filters.

    Returns the components as [count, k, k, c] and the share of variance each explains.
    """
    k1, k2, channels, n = filters.shape
    samples = filters.reshape(-1, n).T  # One row per filter.
    samples = samples - samples.mean(axis=0)
    _, singular, vt = np.linalg.svd(samples, full_matrices=False)
    explained = singular**2 / max(float(np.sum(singular**2)), 1e-30)
    count = min(count, vt.shape[0])
    return vt[:count].reshape(count, k1, k2, channels), explained[:count]


def metric_series(lines: Iterable[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """metrics.jsonl lines -> {metric: (steps, values)}, each metric where it was logged.

    A line a killed run left half-written is passed over, as a resume would drop it.
    """
    series: dict[str, tuple[list, list]] = {}
    for record in filter(None, map(parse_record, lines)):
        for name, value in record.items():
            if name != "step":
                steps, values = series.setdefault(name, ([], []))
                steps.append(record["step"])
                values.append(value)
    return {name: (np.asarray(s), np.asarray(v)) for name, (s, v) in series.items()}
