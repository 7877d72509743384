"""Image ops: RandAugment against PIL, magnitude semantics, crops and stateless determinism."""

from collections.abc import Callable

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from vit_jax.data import preprocess, randaugment

RNG = np.random.default_rng(0)
IMAGE = RNG.integers(0, 256, (16, 20, 3), dtype=np.uint8)
IMAGE[..., 1] //= 3  # Channels with different ranges exercise per-channel ops.


def seed(i: int) -> tf.Tensor:
    return tf.constant([i, 17], tf.int64)


def enhance(kind: type) -> Callable[[Image.Image, float], Image.Image]:
    return lambda image, factor: kind(image).enhance(factor)


# PIL truncates where we round, and its grey weights are integer approximations: the
# enhance ops may differ by a grey level or two.
@pytest.mark.parametrize(
    "name, reference, args, tolerance",
    [
        ("equalize", ImageOps.equalize, (), 0),
        ("autocontrast", ImageOps.autocontrast, (), 1),
        ("posterize", ImageOps.posterize, (3,), 0),
        ("solarize", ImageOps.solarize, (100,), 0),
        ("color", enhance(ImageEnhance.Color), (0.3,), 2),
        ("contrast", enhance(ImageEnhance.Contrast), (1.6,), 2),
        ("brightness", enhance(ImageEnhance.Brightness), (0.4,), 1),
        ("sharpness", enhance(ImageEnhance.Sharpness), (1.8,), 1),
    ],
)
def test_pixel_ops_match_pil(name, reference, args, tolerance):
    ours = getattr(randaugment, name)(tf.constant(IMAGE), *args).numpy()
    diff = np.abs(ours.astype(int) - np.asarray(reference(Image.fromarray(IMAGE), *args)))
    assert diff.max() <= tolerance


def test_geometric_ops_move_pixels_as_documented():
    x = tf.constant(IMAGE)
    # Translating by 0.1 of the width moves content 2 pixels right and fills with grey.
    moved = randaugment.translate_x(x, tf.constant(0.1)).numpy()
    np.testing.assert_array_equal(moved[:, 2:], IMAGE[:, :-2])
    assert (moved[:, :2] == 128).all()
    square = IMAGE[:15, :15]
    turned = randaugment.rotate(tf.constant(square), tf.constant(90.0)).numpy()
    np.testing.assert_array_equal(turned, np.rot90(square, -1))
    for op in (randaugment.rotate, randaugment.shear_x, randaugment.shear_y):
        np.testing.assert_array_equal(op(x, tf.constant(0.0)).numpy(), IMAGE)


def test_randaugment_magnitude_zero_only_applies_parameter_free_ops():
    x = tf.constant(IMAGE)
    allowed = [IMAGE, randaugment.autocontrast(x).numpy(), randaugment.equalize(x).numpy()]
    for i in range(20):
        out = randaugment.randaugment(x, seed(i), num_layers=1, magnitude=0).numpy()
        assert any(np.array_equal(out, a) for a in allowed)


def test_randaugment_is_a_pure_function_of_the_seed():
    x = tf.constant(IMAGE)
    outs = [randaugment.randaugment(x, seed(i), 2, 10).numpy() for i in range(8)]
    np.testing.assert_array_equal(outs[0], randaugment.randaugment(x, seed(0), 2, 10).numpy())
    assert len({o.tobytes() for o in outs}) > 4
    assert all(o.shape == IMAGE.shape and o.dtype == np.uint8 for o in outs)
    with pytest.raises(ValueError, match="magnitude must be in 0..30"):
        randaugment.randaugment(x, seed(0), 2, 31)


def smooth_photo(height: int, width: int) -> np.ndarray:
    """A smooth colour gradient: JPEG keeps it within a few grey levels."""
    y, x = np.mgrid[:height, :width]
    channels = [x / width, y / height, (x + y) / (width + height)]
    return np.round(np.stack(channels, -1) * 200 + 20).astype(np.uint8)


def encode(image: np.ndarray, fmt: str) -> tf.Tensor:
    if fmt == "jpeg":
        return tf.io.encode_jpeg(tf.constant(image), quality=95)
    return tf.io.encode_png(tf.constant(image))


def full_decode_crop_resize(image: np.ndarray, window: tuple, size: int) -> np.ndarray:
    """Reference: the whole image decoded, then sliced, then one float bilinear resize."""
    y, x, h, w = window
    crop = tf.constant(image[y : y + h, x : x + w])
    return preprocess.resize(crop, size, size).numpy()


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_inception_crop_with_full_area_is_a_resize(fmt):
    photo = smooth_photo(40, 40)
    encoded = encode(photo, fmt)
    want = full_decode_crop_resize(photo, (0, 0, 40, 40), 8)
    for i in range(5):
        crop = preprocess.decode_and_inception_crop(encoded, seed(i), size=8, area_min=1.0)
        assert crop.dtype == tf.float32 and crop.shape == (8, 8, 3)
        crop = preprocess.to_uint8(crop)
        # PNG is lossless: exact. JPEG: its compression error only.
        assert np.abs(crop.numpy().astype(int) - want).max() <= (0 if fmt == "png" else 3)
    crops = {
        preprocess.decode_and_inception_crop(encoded, seed(i), 8, 0.05).numpy().tobytes()
        for i in range(5)
    }
    assert len(crops) == 5


@pytest.mark.parametrize(
    "window, ratio", [((0, 0, 120, 160), 4), ((10, 30, 64, 70), 4), ((50, 60, 33, 40), 2)]
)
def test_jpeg_window_decode_matches_full_decode(window, ratio):
    """Decoding only the window, DCT-downscaled by the largest ratio that keeps it >= 2x the
    output, gives the view of the window snapped to that ratio's grid."""
    photo = smooth_photo(120, 160)
    size = 16
    decoded = preprocess.decode_and_crop(encode(photo, "jpeg"), lambda _: tf.constant(window), size)
    assert decoded.shape[:2] == (window[2] // ratio, window[3] // ratio)
    got = preprocess.resize(decoded, size, size).numpy().astype(int)
    snapped = tuple(v // ratio * ratio for v in window)
    want = full_decode_crop_resize(photo, snapped, size)
    assert np.abs(got - want).mean() < 1.0 and np.abs(got - want).max() <= 3


def test_central_crop_decodes_the_central_square():
    photo = RNG.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    view = preprocess.decode_and_central_crop(encode(photo, "png"), 6, crop_fraction=0.5)
    np.testing.assert_array_equal(view.numpy(), photo[3:9, 5:11])  # side 12 * 0.5 = 6, centred
    whole = preprocess.decode_and_central_crop(encode(photo, "png"), 6, crop_fraction=1.0)
    np.testing.assert_array_equal(whole.numpy(), preprocess.resize(tf.constant(photo), 6, 6))


def test_random_shift_is_a_shifted_window_of_the_zero_padded_image():
    padded = np.pad(IMAGE[:10, :10], [(2, 2), (2, 2), (0, 0)])
    offsets = set()
    for i in range(30):
        out = preprocess.random_shift(tf.constant(IMAGE[:10, :10]), seed(i), 10, 2).numpy()
        match = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if np.array_equal(out, padded[dy : dy + 10, dx : dx + 10])
        ]
        assert len(match) == 1
        offsets.add(match[0])
    assert len(offsets) > 10


def test_random_flip_flips_half_the_time():
    flipped = [
        np.array_equal(preprocess.random_flip(tf.constant(IMAGE), seed(i)).numpy(), IMAGE[:, ::-1])
        for i in range(40)
    ]
    assert 10 < sum(flipped) < 30


def test_decode_gives_rgb_for_grayscale_png():
    gray = IMAGE[..., 0]
    encoded = tf.io.encode_png(tf.constant(gray[..., None]))
    np.testing.assert_array_equal(
        preprocess.decode_image(encoded).numpy(), np.stack([gray] * 3, -1)
    )
