"""Per-example image ops for tf.data, each a pure function of its inputs and a stateless seed.

Randomness only ever comes from a `seed` argument (a shape-[2] integer tensor) fed to
TensorFlow's stateless random ops, so an example's augmentation depends on nothing but the
seed the pipeline derives for it: that is what makes the training stream resumable bit for
bit.

Speed: a JPEG is never decoded whole when only a crop of it is used. The crop window is
chosen from the header (`tf.image.extract_jpeg_shape`), then `tf.io.decode_and_crop_jpeg`
decodes just that window, and when the window is at least twice the output size in both
directions the decoder also downscales in the DCT domain (`ratio` 2, 4 or 8) so that far
fewer pixels are produced at all. Other formats (PNG, ...) are decoded whole, then cropped.
The crop is resized once, straight to the output size, in float, flipped, and rounded to
uint8 once; images leave the host as uint8 (scaling to [-1, 1] happens on the device).
Per-example work is kept to few, cheap ops: in tf.data each op on a small tensor has a
fixed cost comparable to the arithmetic itself.

Resizing is bilinear without antialiasing by default, as in the original ViT input pipeline
and big_vision's `inception_crop`/`resize`: with antialiasing the pipeline runs at 0.43x
its throughput on 224 px crops of ImageNet-sized photos (docs/performance.md).
"""

import tensorflow as tf

INCEPTION_ASPECT_RANGE = (3 / 4, 4 / 3)
DCT_RATIOS = (1, 2, 4, 8)  # decode_and_crop_jpeg's downscaling factors.


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
    """JPEG/PNG/... bytes -> uint8 [H, W, 3]; grayscale and alpha images become plain RGB."""
    return tf.io.decode_image(encoded, channels=3, expand_animations=False)


def to_uint8(image: tf.Tensor) -> tf.Tensor:
    """Float pixels (0..255 scale) -> uint8, rounded and saturated; uint8 passes through."""
    if image.dtype == tf.uint8:
        return image
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def resize(
    image: tf.Tensor, height: int | tf.Tensor, width: int | tf.Tensor, antialias: bool = False
) -> tf.Tensor:
    """Bilinear resize to height x width, returned as uint8."""
    resized = tf.image.resize(image, [height, width], method="bilinear", antialias=antialias)
    return to_uint8(resized)


def _decode_window_jpeg(encoded: tf.Tensor, window: tf.Tensor, min_size: int) -> tf.Tensor:
    """Decodes only `window` [y, x, h, w] of a JPEG, DCT-downscaled while it stays >= min_size.

    The largest ratio r in 1, 2, 4, 8 with h / r >= min_size and w / r >= min_size is used,
    so the final resize still downsamples (never upsamples) from what the decoder produced.
    The window snaps to the r x r DCT grid (origin and size rounded down to multiples of r):
    a shift and scale of the view by less than one output pixel.
    """
    shortest = tf.minimum(window[2], window[3])
    # How many of the ratios 2, 4, 8 fit: the index of the ratio in (1, 2, 4, 8).
    larger = tf.constant(DCT_RATIOS[1:], tf.int32) * min_size
    index = tf.reduce_sum(tf.cast(shortest >= larger, tf.int32))

    def decode_at(ratio: int):
        def fn() -> tf.Tensor:
            scaled = window // ratio
            scaled = tf.concat([scaled[:2], tf.maximum(scaled[2:], 1)], axis=0)
            return tf.io.decode_and_crop_jpeg(encoded, scaled, channels=3, ratio=ratio)

        return fn

    return tf.switch_case(index, [decode_at(ratio) for ratio in DCT_RATIOS])


def decode_and_crop(encoded: tf.Tensor, window_fn, out_size: int) -> tf.Tensor:
    """Decodes the window `window_fn(image_shape)` returns ([y, x, h, w]) of an encoded image.

    JPEGs decode only the window (see module docstring); other formats decode whole and slice.
    """

    def jpeg() -> tf.Tensor:
        window = window_fn(tf.image.extract_jpeg_shape(encoded))
        return _decode_window_jpeg(encoded, window, out_size)

    def other() -> tf.Tensor:
        image = decode_image(encoded)
        window = window_fn(tf.shape(image))
        return tf.slice(image, [window[0], window[1], 0], [window[2], window[3], 3])

    return tf.cond(tf.io.is_jpeg(encoded), jpeg, other)


def decode_and_inception_crop(
    encoded: tf.Tensor, seed: tf.Tensor, size: int, area_min: float, antialias: bool = False
) -> tf.Tensor:
    """Random crop of `area_min`..100% of the area and aspect 3/4..4/3, resized to size x size.

    Returns float32 pixels (0..255 scale): callers flip, then round to uint8 once.
    """

    def window(shape: tf.Tensor) -> tf.Tensor:
        begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
            shape,
            bounding_boxes=tf.zeros([1, 0, 4]),
            seed=seed,
            min_object_covered=0.0,
            aspect_ratio_range=INCEPTION_ASPECT_RANGE,
            area_range=(area_min, 1.0),
            max_attempts=10,
            use_image_if_no_bounding_boxes=True,
        )
        return tf.concat([begin[:2], crop_size[:2]], axis=0)

    crop = decode_and_crop(encoded, window, size)
    return tf.image.resize(crop, [size, size], method="bilinear", antialias=antialias)


def decode_and_central_crop(
    encoded: tf.Tensor, size: int, crop_fraction: float, antialias: bool = False
) -> tf.Tensor:
    """Evaluation view: the central square of `crop_fraction` of the shorter side, to size x size.

    This is 'resize the shorter side to size / crop_fraction, keep the central size x size'
    with the crop taken first, so a JPEG decodes only the pixels it keeps. crop_fraction 1.0
    resizes the whole image to size x size instead (aspect not kept), the usual ViT
    fine-tuning evaluation; 0.875 is the classic ImageNet 'resize 256, crop 224'.
    """

    def window(shape: tf.Tensor) -> tf.Tensor:
        height, width = shape[0], shape[1]
        if crop_fraction == 1.0:
            return tf.stack([0, 0, height, width])
        side = tf.cast(
            tf.round(tf.cast(tf.minimum(height, width), tf.float32) * crop_fraction), tf.int32
        )
        side = tf.maximum(side, 1)
        return tf.stack([(height - side) // 2, (width - side) // 2, side, side])

    image = resize(decode_and_crop(encoded, window, size), size, size, antialias)
    return tf.ensure_shape(image, [size, size, 3])


def decode_and_resize(encoded: tf.Tensor, size: int, antialias: bool = False) -> tf.Tensor:
    """The whole image resized to size x size (aspect not kept)."""
    return decode_and_central_crop(encoded, size, 1.0, antialias)


def random_shift(image: tf.Tensor, seed: tf.Tensor, size: int, pixels: int) -> tf.Tensor:
    """Zero-pad a size x size uint8 image by `pixels` on every side, crop size x size back.

    The classic small-image augmentation (CIFAR-style): shifts content by up to `pixels`.
    """
    padded = tf.pad(image, [[pixels, pixels], [pixels, pixels], [0, 0]])
    return tf.image.stateless_random_crop(padded, [size, size, 3], seed=seed)


def random_flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Left-right flip with probability 1/2 (only the chosen branch runs)."""
    flip = tf.random.stateless_uniform([], seed) < 0.5
    return tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)
