"""The model's input contract: images cross the host-device link as uint8 and are scaled on it."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def scale_images(images: jax.Array) -> jax.Array:
    """uint8 0..255 -> float32 -1..1, the range the ViT checkpoints were trained on.

    Runs on the device: images cross the host-device link as uint8, a quarter of the bytes.
    Centred first, so 0 and 255 map exactly to -1 and 1.
    """
    return (images.astype(jnp.float32) - 127.5) / 127.5
