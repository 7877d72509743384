"""An image size that the pixels per token (the patch, times a hybrid stem's stride) do not
divide is refused at every entry point, naming both sizes and the nearest ones that fit,
before anything is written: otherwise the patch embedding silently drops the last rows and
columns (a third of a 34 px image with 7 px patches)."""

import contextlib
import io
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from helpers import small_local_config

from vit_jax import checkpoint, data, predict
from vit_jax.models import create_model
from vit_jax.train import train_and_evaluate

TINY_REFUSAL = (
    r"Image size 10 px is not a multiple of the patch size, 4 px: the tokens would not tile "
    r"the image and its last 2 px would be lost or padded\. Use image size 8 or 12\."
)


@pytest.mark.parametrize(
    "name, size, message",
    [
        (
            "Ti/7",
            34,
            r"34 px is not a multiple of the patch size, 7 px: .* last 6 px .* 28 or 35\.",
        ),
        ("Ti/16", 8, r"8 px is not a multiple of the patch size, 16 px: .* last 8 px .* size 16\."),
        (
            "R50+B/16",
            200,
            r"200 px is not a multiple of 16 px, the hybrid stem's stride 16 times the patch "
            r"size 1: .* 192 or 208\.",
        ),
        (
            "R26+S/32",
            240,
            r"240 px is not a multiple of 32 px, the hybrid stem's stride 32 times the patch "
            r"size 1: .* 224 or 256\.",
        ),
        (
            "R+Ti/16",
            100,
            r"100 px is not a multiple of 32 px, the hybrid stem's stride 4 times the patch "
            r"size 8: .* 96 or 128\.",
        ),
    ],
)
def test_model_refuses_a_size_its_tokens_do_not_tile(name, size, message):
    model = create_model(name, num_classes=3)
    with pytest.raises(ValueError, match=rf"^Image size {message}$"):
        model.check_image_size(size)
    with pytest.raises(ValueError, match=rf"^Image size {message}"):  # JAX appends a note.
        model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)


def test_model_refuses_an_image_of_no_pixels():
    with pytest.raises(ValueError, match=r"^Image size 0 px: an image is at least one token, th"):
        create_model("Ti/7", num_classes=3).check_image_size(0)


def test_model_refuses_either_side_of_a_non_square_image():
    model = create_model("Ti/16", num_classes=3)
    with pytest.raises(ValueError, match=r"Image size 200 px .* 16 px: .* 192 or 208\."):
        model.apply({}, jnp.zeros((1, 224, 200, 3)), train=False)
    create_model("Ti/16", num_classes=3).check_image_size((224, 192))


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, step", [("Ti/16", 16), ("R+Ti/16", 32), ("R26+S/32", 32), ("R50+B/16", 16)]
)
def test_pixels_per_token_is_what_the_model_tiles_the_image_with(name, step):
    """At 2 x 3 tokens' worth of pixels, the model holds 6 position embeddings (+ cls)."""
    model = create_model(name, num_classes=3)
    assert model.pixels_per_token == step
    images = jnp.zeros((1, 2 * step, 3 * step, 3))
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))["params"]
    posemb = params["Transformer"]["posembed_input"]["pos_embedding"]
    assert nn.unbox(posemb).shape[1] == 2 * 3 + 1


def _tiny_npz(root) -> str:
    """A bare .npz of the tiny 4 px-patch model of `small_local_config` (8 px images)."""
    model = create_model("Ti/4", num_classes=10, width=32, depth=1, mlp_dim=64, num_heads=2)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)["params"]
    path = str(root / "tiny.npz")
    checkpoint.save_npz(nn.unbox(params), path)
    return path


def _files(root) -> list:
    return sorted(os.walk(root))


def test_vit_train_refuses_before_anything_is_written(tmp_path):
    data.get_dataset_info("digits", small_local_config(tmp_path).data_dir)  # Prepared first.
    before = _files(tmp_path)
    with pytest.raises(ValueError, match=TINY_REFUSAL):
        train_and_evaluate(small_local_config(tmp_path, image_size=10), str(tmp_path / "run"))
    assert _files(tmp_path) == before


@pytest.mark.slow
def test_fine_tuning_from_a_checkpoint_refuses_before_anything_is_written(tmp_path):
    data.get_dataset_info("digits", small_local_config(tmp_path).data_dir)
    config = small_local_config(tmp_path, image_size=10)
    config.model_init = _tiny_npz(tmp_path)
    before = _files(tmp_path)
    with pytest.raises(ValueError, match=TINY_REFUSAL):
        train_and_evaluate(config, str(tmp_path / "run"))
    assert _files(tmp_path) == before


def test_vit_predict_refuses_an_image_size_option_the_patch_does_not_divide(tmp_path):
    path = _tiny_npz(tmp_path)
    argv = ["--checkpoint", path, "--model", "Ti/4", "--num_classes", "10"]
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        status = predict.main([*argv, "--image_size", "10", str(tmp_path / "cat.png")])
    assert status == 2
    assert re.fullmatch(f"vit-predict: {TINY_REFUSAL}\n", stderr.getvalue())  # One line.
