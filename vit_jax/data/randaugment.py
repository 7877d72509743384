"""RandAugment (Cubuk et al., 2019) on uint8 images, written with stateless TF ops.

Each of `num_layers` layers picks one of the 14 ops of the paper uniformly at random and
applies it at the shared `magnitude`. Magnitudes use the paper's linear scale: 10 is the
maximum AutoAugment used for each op and the scale extends to 30 (values past 10 extrapolate
linearly and are clipped where an op has a hard limit). At magnitude m, with s = m / 10:

| op | effect |
|---|---|
| rotate | +-30*s degrees |
| shear_x, shear_y | +-0.3*s shear about the image centre |
| translate_x, translate_y | +-0.45*s of the image width / height |
| color, contrast, brightness, sharpness | enhancement factor 1 +- 0.9*s (>= 0) |
| solarize | invert pixels >= 256 * (1 - s) |
| posterize | keep 8 - round(4*s) bits (>= 1) |
| identity, autocontrast, equalize | no magnitude |

Signs are drawn at random. Every op gets stronger as m grows (some reference implementations
weaken solarize and posterize instead). Geometric ops fill uncovered pixels with grey (128).
All randomness comes from the `seed` argument, so the result is a pure function of
(image, seed, num_layers, magnitude).
"""

import math
from collections.abc import Callable

import tensorflow as tf

FILL_VALUE = 128.0
MAX_MAGNITUDE = 30


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """PIL's ImageEnhance rule: factor 0 gives `degenerate`, 1 the image, >1 extrapolates."""
    degenerate = tf.cast(degenerate, tf.float32)
    out = degenerate + factor * (tf.cast(image, tf.float32) - degenerate)
    return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)


def _grayscale(image: tf.Tensor) -> tf.Tensor:
    return tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(image))


def _affine(image: tf.Tensor, matrix: tf.Tensor) -> tf.Tensor:
    """Warp with a 2x3 matrix mapping output (x, y, 1) to the input pixel it samples."""
    transform = tf.concat([tf.reshape(tf.cast(matrix, tf.float32), [6]), tf.zeros([2])], 0)
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.cast(image, tf.float32)[None],
        transforms=transform[None],
        output_shape=tf.shape(image)[:2],
        fill_value=FILL_VALUE,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )[0]
    return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)


def _centre(image: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    hw = tf.cast(tf.shape(image)[:2], tf.float32)
    return (hw[1] - 1.0) / 2.0, (hw[0] - 1.0) / 2.0


def rotate(image: tf.Tensor, degrees: tf.Tensor) -> tf.Tensor:
    """Rotate about the image centre."""
    cx, cy = _centre(image)
    c, s = tf.cos(degrees * math.pi / 180.0), tf.sin(degrees * math.pi / 180.0)
    return _affine(image, [[c, s, cx - c * cx - s * cy], [-s, c, cy + s * cx - c * cy]])


def shear_x(image: tf.Tensor, amount: tf.Tensor) -> tf.Tensor:
    _, cy = _centre(image)
    return _affine(image, [[1.0, amount, -amount * cy], [0.0, 1.0, 0.0]])


def shear_y(image: tf.Tensor, amount: tf.Tensor) -> tf.Tensor:
    cx, _ = _centre(image)
    return _affine(image, [[1.0, 0.0, 0.0], [amount, 1.0, -amount * cx]])


def translate_x(image: tf.Tensor, fraction: tf.Tensor) -> tf.Tensor:
    width = tf.cast(tf.shape(image)[1], tf.float32)
    return _affine(image, [[1.0, 0.0, -fraction * width], [0.0, 1.0, 0.0]])


def translate_y(image: tf.Tensor, fraction: tf.Tensor) -> tf.Tensor:
    height = tf.cast(tf.shape(image)[0], tf.float32)
    return _affine(image, [[1.0, 0.0, 0.0], [0.0, 1.0, -fraction * height]])


def autocontrast(image: tf.Tensor) -> tf.Tensor:
    """Stretch each channel to the full 0..255 range (constant channels are left alone)."""
    x = tf.cast(image, tf.float32)
    lo = tf.reduce_min(x, axis=[0, 1], keepdims=True)
    hi = tf.reduce_max(x, axis=[0, 1], keepdims=True)
    scale = tf.where(hi > lo, 255.0 / tf.maximum(hi - lo, 1.0), 1.0)
    offset = tf.where(hi > lo, lo, 0.0)
    return tf.cast(tf.clip_by_value(tf.round((x - offset) * scale), 0.0, 255.0), tf.uint8)


def _equalize_channel(channel: tf.Tensor) -> tf.Tensor:
    """PIL's histogram equalisation of one uint8 channel."""
    values = tf.cast(channel, tf.int32)
    hist = tf.math.bincount(tf.reshape(values, [-1]), minlength=256, maxlength=256)
    last_count = tf.gather(hist, tf.reduce_max(tf.where(hist > 0)))
    step = (tf.reduce_sum(hist) - last_count) // 255
    lut = (tf.cumsum(hist, exclusive=True) + step // 2) // tf.maximum(step, 1)
    lut = tf.cast(tf.clip_by_value(lut, 0, 255), tf.uint8)
    return tf.where(step > 0, tf.gather(lut, values), channel)


def equalize(image: tf.Tensor) -> tf.Tensor:
    return tf.stack([_equalize_channel(image[..., c]) for c in range(3)], axis=-1)


def solarize(image: tf.Tensor, threshold: tf.Tensor) -> tf.Tensor:
    """Invert every pixel at or above `threshold`."""
    return tf.where(tf.cast(image, tf.float32) >= threshold, 255 - image, image)


def posterize(image: tf.Tensor, bits: int) -> tf.Tensor:
    shift = 8 - bits
    return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)


def color(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    return _blend(_grayscale(image), image, factor)


def contrast(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    mean = tf.round(tf.reduce_mean(tf.cast(tf.image.rgb_to_grayscale(image), tf.float32)))
    return _blend(tf.fill(tf.shape(image), mean), image, factor)


def brightness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    return _blend(tf.zeros_like(image), image, factor)


def sharpness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """Blend with PIL's SMOOTH-filtered image; the one-pixel border stays unfiltered."""
    kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    x = tf.cast(image, tf.float32)[None]
    smooth = tf.nn.depthwise_conv2d(x, kernel, strides=[1, 1, 1, 1], padding="VALID")[0]
    smooth = tf.pad(tf.round(smooth), [[1, 1], [1, 1], [0, 0]])
    interior = tf.pad(tf.ones(tf.shape(smooth) - [2, 2, 0], tf.bool), [[1, 1], [1, 1], [0, 0]])
    return _blend(tf.where(interior, smooth, x[0]), image, factor)


def _ops(strength: float) -> list[Callable[[tf.Tensor, tf.Tensor], tf.Tensor]]:
    """The op table at s = magnitude / 10; each op takes (image, random sign +-1)."""

    def factor(sign: tf.Tensor) -> tf.Tensor:
        return tf.maximum(1.0 + sign * 0.9 * strength, 0.0)

    return [
        lambda x, sign: x,
        lambda x, sign: autocontrast(x),
        lambda x, sign: equalize(x),
        lambda x, sign: rotate(x, sign * 30.0 * strength),
        lambda x, sign: solarize(x, 256.0 * max(1.0 - strength, 0.0)),
        lambda x, sign: color(x, factor(sign)),
        lambda x, sign: posterize(x, max(8 - round(4 * strength), 1)),
        lambda x, sign: contrast(x, factor(sign)),
        lambda x, sign: brightness(x, factor(sign)),
        lambda x, sign: sharpness(x, factor(sign)),
        lambda x, sign: shear_x(x, sign * 0.3 * strength),
        lambda x, sign: shear_y(x, sign * 0.3 * strength),
        lambda x, sign: translate_x(x, sign * 0.45 * strength),
        lambda x, sign: translate_y(x, sign * 0.45 * strength),
    ]


def randaugment(image: tf.Tensor, seed: tf.Tensor, num_layers: int, magnitude: int) -> tf.Tensor:
    """Apply `num_layers` ops drawn uniformly (with replacement) at `magnitude` (0..30)."""
    if not 0 <= magnitude <= MAX_MAGNITUDE:
        raise ValueError(f"RandAugment magnitude must be in 0..{MAX_MAGNITUDE}, got {magnitude}")
    ops = _ops(magnitude / 10.0)
    layer_seeds = tf.random.experimental.stateless_split(seed, num_layers)

    # A loop rather than a Python unroll: the 14-way switch is traced once, not per layer.
    def layer(i: tf.Tensor, image: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        op_seed, sign_seed = tf.unstack(tf.random.experimental.stateless_split(layer_seeds[i], 2))
        index = tf.random.stateless_uniform([], op_seed, 0, len(ops), dtype=tf.int32)
        sign = tf.where(tf.random.stateless_uniform([], sign_seed) < 0.5, -1.0, 1.0)
        out = tf.switch_case(index, [lambda op=op: op(image, sign) for op in ops])
        return i + 1, tf.ensure_shape(out, image.shape)

    return tf.while_loop(lambda i, _: i < num_layers, layer, (0, image))[1]
