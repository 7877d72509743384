"""Per-example image ops for tf.data, each a pure function of its inputs and a stateless seed.

Randomness only ever comes from a `seed` argument (a shape-[2] integer tensor) fed to
TensorFlow's stateless random ops, so an example's augmentation depends on nothing but the
seed the pipeline derives for it: that is what makes the training stream resumable bit for
bit. Images travel as uint8 HxWx3 until `normalize`, so RandAugment and the crops see the
value range they were designed for.
"""

import tensorflow as tf

INCEPTION_ASPECT_RANGE = (3 / 4, 4 / 3)


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
    """JPEG/PNG/... bytes -> uint8 [H, W, 3]; grayscale and alpha images become plain RGB."""
    return tf.io.decode_image(encoded, channels=3, expand_animations=False)


def _to_uint8(image: tf.Tensor) -> tf.Tensor:
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def resize(image: tf.Tensor, height: int | tf.Tensor, width: int | tf.Tensor) -> tf.Tensor:
    """Bilinear resize with antialiasing (so downscaling does not alias), staying uint8."""
    return _to_uint8(tf.image.resize(image, [height, width], method="bilinear", antialias=True))


def inception_crop(image: tf.Tensor, seed: tf.Tensor, size: int, area_min: float) -> tf.Tensor:
    """Random crop of `area_min`..100% of the area and aspect 3/4..4/3, resized to size x size."""
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image),
        bounding_boxes=tf.zeros([1, 0, 4]),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=INCEPTION_ASPECT_RANGE,
        area_range=(area_min, 1.0),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    return resize(tf.slice(image, begin, crop_size), size, size)


def random_shift(image: tf.Tensor, seed: tf.Tensor, size: int, pixels: int) -> tf.Tensor:
    """Resize to size x size, zero-pad `pixels` on every side, crop size x size back at random.

    The classic small-image augmentation (CIFAR-style): shifts content by up to `pixels`.
    """
    padded = tf.pad(resize(image, size, size), [[pixels, pixels], [pixels, pixels], [0, 0]])
    return tf.image.stateless_random_crop(padded, [size, size, 3], seed=seed)


def random_flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Left-right flip with probability 1/2."""
    return tf.image.stateless_random_flip_left_right(image, seed=seed)


def central_crop(image: tf.Tensor, size: int, crop_fraction: float) -> tf.Tensor:
    """Evaluation view: shorter side to size / crop_fraction, then the central size x size.

    crop_fraction 1.0 resizes the whole image to size x size instead (aspect not kept), the
    usual ViT fine-tuning evaluation; e.g. 0.875 is the classic ImageNet 'resize 256, crop 224'.
    """
    if crop_fraction == 1.0:
        return resize(image, size, size)
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = size / crop_fraction / tf.reduce_min(shape)
    new_shape = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), size)
    image = resize(image, new_shape[0], new_shape[1])
    top, left = (new_shape[0] - size) // 2, (new_shape[1] - size) // 2
    return tf.ensure_shape(tf.slice(image, [top, left, 0], [size, size, 3]), [size, size, 3])


def normalize(image: tf.Tensor) -> tf.Tensor:
    """uint8 0..255 -> float32 -1..1, the range the ViT checkpoints were trained on."""
    return tf.cast(image, tf.float32) / 127.5 - 1.0


def mixup(batch: dict[str, tf.Tensor], seed: tf.Tensor, alpha: float) -> dict[str, tf.Tensor]:
    """Mix a batch with itself rolled by one: one ratio ~ Beta(alpha, alpha) per batch.

    As in the mixup paper, images and one-hot labels get the same convex weights, so the
    labels stay a probability distribution.
    """
    k1, k2 = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    g1 = tf.random.stateless_gamma([], seed=k1, alpha=alpha)
    g2 = tf.random.stateless_gamma([], seed=k2, alpha=alpha)
    ratio = tf.math.divide_no_nan(g1, g1 + g2)

    def mix(x: tf.Tensor) -> tf.Tensor:
        return ratio * x + (1.0 - ratio) * tf.roll(x, shift=1, axis=0)

    return {**batch, "image": mix(batch["image"]), "labels": mix(batch["labels"])}
