"""Figure computations against closed forms, and every vit-visualize command's PNG."""

import argparse
import json
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from helpers import BLOCK_TENSORFLOW, COMMAND_PROBE
from matplotlib.figure import Figure
from PIL import Image

from vit_jax import checkpoint
from vit_jax.insight import maps
from vit_jax.insight.cli import visualize_main
from vit_jax.models import create_model
from vit_jax.models.scan_layout import stack_blocks
from vit_jax.models.vit import sincos2d_posemb


def test_rollout_of_identity_attention_is_the_identity():
    """Identity attention mixes nothing: 0.5 I + 0.5 I = I at every layer, so the rollout is
    I; the class token's map over the patches is uniform (all zero) and the mean-pooled
    patches' map is uniform at 1 / patches."""
    depth, tokens, grid = 3, 1 + 9, (3, 3)
    eye = np.broadcast_to(np.eye(tokens), (depth, 2, 4, tokens, tokens))
    np.testing.assert_allclose(
        maps.attention_rollout(eye), np.broadcast_to(np.eye(tokens), (2, tokens, tokens))
    )
    cls_pool = np.zeros((2, tokens))
    cls_pool[:, 0] = 1.0
    np.testing.assert_allclose(maps.rollout_maps(maps.Attention(eye, cls_pool), grid), 0.0)
    gap_pool = np.zeros((2, tokens))
    gap_pool[:, 1:] = 1.0 / 9
    np.testing.assert_allclose(maps.rollout_maps(maps.Attention(eye, gap_pool), grid), 1.0 / 9)


def test_rollout_of_uniform_attention_has_its_closed_form():
    """With U the uniform matrix (U @ U = U): prod of (I + U) / 2 over L layers is
    2^-L I + (1 - 2^-L) U."""
    depth, tokens = 4, 7
    uniform = np.full((depth, 1, 2, tokens, tokens), 1.0 / tokens)
    expected = 2.0**-depth * np.eye(tokens) + (1 - 2.0**-depth) / tokens
    np.testing.assert_allclose(maps.attention_rollout(uniform)[0], expected, atol=1e-12)


def test_sincos_posemb_similarity_peaks_at_the_position_itself():
    similarity = maps.cosine_similarity(sincos2d_posemb(6, 6, 64)[0])
    np.testing.assert_array_equal(np.argmax(similarity, axis=1), np.arange(36))
    off_diagonal = similarity[~np.eye(36, dtype=bool)]
    assert np.allclose(np.diag(similarity), 1.0) and off_diagonal.max() < 1.0 - 1e-3


def test_local_attention_is_shorter_than_uniform():
    grid, tokens = (4, 4), 1 + 16
    distances = maps.patch_distances(grid, 7)
    local = np.zeros((tokens, tokens))
    local[1:, 1:] = distances <= 7.0  # Each patch attends to itself and its 4 neighbours.
    local[0, :] = 1.0
    local /= local.sum(-1, keepdims=True)
    uniform = np.full((tokens, tokens), 1.0 / tokens)
    as_layers = lambda a: np.broadcast_to(a, (2, 3, 2, tokens, tokens))  # noqa: E731
    near = maps.mean_attention_distance(as_layers(local), grid, 7)
    far = maps.mean_attention_distance(as_layers(uniform), grid, 7)
    assert near.shape == far.shape == (2, 2)
    assert np.all(near < far)
    # Uniform: the mean distance between two patch centres, by brute force.
    centres = [(7.0 * r, 7.0 * c) for r in range(4) for c in range(4)]
    mean_pair = np.mean([np.hypot(a[0] - b[0], a[1] - b[1]) for a in centres for b in centres])
    np.testing.assert_allclose(far, mean_pair, rtol=1e-6)  # float32, as on the device.


MODELS = {
    "plain": ("Ti/7", {}),
    "scanned": ("Ti/7", {"scan": True, "num_registers": 2}),
    "hybrid": ("R+Ti/2", {"pool": "gap"}),  # Stem /4, patch 1: 7x7 tokens at 28 px.
}


@pytest.fixture(
    scope="module",
    params=["plain", *(pytest.param(m, marks=pytest.mark.slow) for m in ("scanned", "hybrid"))],
)
def npz(request, tmp_path_factory):
    name, options = MODELS[request.param]
    options = dict(width=32, depth=2, mlp_dim=64, num_heads=2) | options
    model = create_model(name, num_classes=10, **options)
    params = model.init(jax.random.key(0), np.zeros((1, 28, 28, 3)), train=False)["params"]
    path = tmp_path_factory.mktemp(request.param) / "model.npz"
    checkpoint.save_npz(params, path)
    run = {"model": {"name": name, **options}, "image_size": 28, "num_classes": 10}
    path.with_suffix(".json").write_text(json.dumps(run))
    return str(path)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return [str(folder / "0.png"), str(folder / "1.png")]


def png_size(path):
    with Image.open(path) as image:
        return image.size


@pytest.mark.slow
@pytest.mark.parametrize(
    "figure, extra, size",
    [
        ("rollout", [], (2 * 200 + 100, 2 * 200)),  # 2 images; input row + one model row.
        ("posemb", [], (600, 600)),
        ("distance", [], (600, 450)),
        ("filters", [], (700, 460)),
    ],
)
def test_each_figure_writes_a_png_of_the_expected_size(
    npz, image_files, tmp_path, figure, extra, size
):
    out = tmp_path / f"{figure}.png"
    argv = [figure, "--checkpoint", npz, "--out", str(out), *extra]
    if figure in ("rollout", "distance"):
        argv += image_files
    assert visualize_main(argv) == 0
    assert out.stat().st_size > 1000
    assert png_size(out) == size


def test_curves_from_a_workdir(tmp_path, cloud_storage, monkeypatch):
    lines = [
        {"step": 10, "train/loss": 2.0, "train/lr": 1e-3},
        {"step": 20, "train/loss": 1.0, "train/lr": 5e-4, "eval/top1": 0.5, "fewshot/d_5shot": 0.4},
    ]
    half_written = '{"step": 30, "train/lo'  # What a SIGKILL during a write leaves.
    chunk = tmp_path / "metrics" / "0000000010.jsonl"  # As vit-train writes them.
    chunk.parent.mkdir()
    chunk.write_text("".join(json.dumps(x) + "\n" for x in lines) + half_written)
    series = maps.metric_series(chunk.read_text().splitlines())
    np.testing.assert_array_equal(series["train/loss"][0], [10, 20])
    np.testing.assert_array_equal(series["fewshot/d_5shot"][1], [0.4])
    out = tmp_path / "curves.png"
    assert visualize_main(["curves", "--workdir", str(tmp_path), "--out", str(out)]) == 0
    assert png_size(out) == (1000, 700)
    assert visualize_main(["curves", "--workdir", str(tmp_path / "none"), "--out", str(out)]) == 2
    # On gs://, through its file system: it was written under ./gs:/ on the local disk.
    monkeypatch.chdir(tmp_path)
    out = "gs://bucket/figures/curves.png"
    assert visualize_main(["curves", "--workdir", str(tmp_path), "--out", out]) == 0
    assert png_size(cloud_storage / "bucket" / "figures" / "curves.png") == (1000, 700)
    assert not (tmp_path / "gs:").exists()


def test_patch_grid_counts_the_stem_and_leaves_out_registers():
    hybrid = create_model("R+Ti/4", num_classes=0, width=32, depth=1, mlp_dim=64, num_heads=2)
    assert maps.patch_grid(hybrid, 32) == (4, 4)  # Stem /4 (root conv + max-pool), patch 2.
    plain = create_model("Ti/7", num_classes=0, width=32, depth=1, mlp_dim=64, num_heads=2)
    assert maps.patch_grid(plain.clone(num_registers=3), 28) == (4, 4)


def small_model(name, **options):
    fields = dict(width=32, depth=2, mlp_dim=64, num_heads=2) | options
    return create_model(name, num_classes=0, **fields)


def model_params(model, size):
    images = np.zeros((1, size, size, 3))
    return nn.unbox(model.init(jax.random.key(0), images, train=False)["params"])


@pytest.mark.slow
@pytest.mark.parametrize("pool, registers, prefix", [("token", 1, 2), ("gap", 2, 2), ("map", 1, 1)])
def test_attention_weights_are_distributions_and_pooling_weighs_what_the_model_pools(
    pool, registers, prefix
):
    """Rows of every layer sum to 1; the pooled weights are one-hot on the class token, uniform
    over the patches, or the MAP probe's (a distribution over the patches); never on a register."""
    model = small_model("Ti/7", pool=pool, num_registers=registers)
    images = np.random.default_rng(0).integers(0, 255, (3, 28, 28, 3), dtype=np.uint8)
    attention = maps.attention_fn(model)(model_params(model, 28), images)
    tokens = prefix + 16
    assert attention.layers.shape == (2, 3, 2, tokens, tokens)
    np.testing.assert_allclose(attention.layers.sum(-1), 1.0, rtol=1e-5)
    assert attention.pooled.shape == (3, tokens)
    np.testing.assert_allclose(attention.pooled.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(attention.pooled[:, pool == "token" : prefix], 0.0)
    if pool == "token":
        np.testing.assert_array_equal(attention.pooled[:, 0], 1.0)
    elif pool == "gap":
        np.testing.assert_allclose(attention.pooled[:, prefix:], 1.0 / 16)
    else:  # The probe's softmax: positive on every patch, and not uniform for random weights.
        assert np.all(attention.pooled[:, prefix:] > 0)
        assert np.ptp(attention.pooled[:, prefix:]) > 1e-4


@pytest.mark.slow
def test_scanned_and_unrolled_models_give_the_same_attention():
    unrolled = small_model("Ti/7", num_registers=2)
    params = model_params(unrolled, 28)
    images = np.random.default_rng(1).integers(0, 255, (2, 28, 28, 3), dtype=np.uint8)
    expected = maps.attention_fn(unrolled)(params, images)
    scanned = maps.attention_fn(unrolled.clone(scan=True))(stack_blocks(params), images)
    np.testing.assert_allclose(scanned.layers, expected.layers, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(scanned.pooled, expected.pooled)


def test_attention_distance_on_the_device_equals_a_brute_force_on_the_weights():
    """Only [depth, heads] leaves the device; it is the float64 loop over the model's weights."""
    model = small_model("Ti/7", num_registers=1)
    params = model_params(model, 28)
    images = np.random.default_rng(2).integers(0, 255, (3, 28, 28, 3), dtype=np.uint8)
    layers = maps.attention_fn(model)(params, images).layers.astype(np.float64)
    centres = [(7.0 * r, 7.0 * c) for r in range(4) for c in range(4)]
    expected = np.zeros((2, 2))  # Mean over 3 images x 16 patch queries: / 48.
    for layer, image, head in np.ndindex(2, 3, 2):
        weights = layers[layer, image, head, 2:, 2:]  # Patches: after the class token, register.
        for q, (qy, qx) in enumerate(centres):
            row = weights[q] / weights[q].sum()
            pairs = zip(row, centres, strict=True)
            expected[layer, head] += sum(w * np.hypot(qy - y, qx - x) for w, (y, x) in pairs) / 48
    distance = maps.attention_distance_fn(model, (4, 4), 7)(params, images)
    assert distance.shape == (2, 2)
    np.testing.assert_allclose(distance, expected, rtol=1e-5)


@pytest.mark.slow
def test_hybrid_filters_are_the_kernel_the_stem_convolves_with():
    """The root convolution's output equals the input convolved with `pixel_filters`."""
    model = small_model("R+Ti/4", pool="gap")
    params = model_params(model, 32)
    images = np.random.default_rng(2).normal(size=(2, 32, 32, 3)).astype(np.float32)
    _, state = model.apply(
        {"params": params}, images, train=False, capture_intermediates=True, mutable=True
    )
    expected = state["intermediates"]["conv_root"]["__call__"][0]
    filters, what = maps.pixel_filters(model, params)
    assert what == "ResNet root filters"
    kernel = filters.astype(np.float32)
    layout = ("NHWC", "HWIO", "NHWC")
    out = jax.lax.conv_general_dilated(images, kernel, (2, 2), "SAME", dimension_numbers=layout)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_principal_components_of_a_rank_two_filter_bank():
    """Filters mixing two orthonormal patterns: two components explain all the variance and
    span exactly those patterns."""
    rng = np.random.default_rng(3)
    patterns = np.linalg.qr(rng.normal(size=(4 * 4 * 3, 2)))[0].T  # Two orthonormal rows.
    coefficients = rng.normal(size=(50, 2)) * [3.0, 1.0]
    filters = (coefficients @ patterns).T.reshape(4, 4, 3, 50)
    components, explained = maps.principal_components(filters, 3)
    assert components.shape == (3, 4, 4, 3)
    np.testing.assert_allclose(explained[:2].sum(), 1.0, atol=1e-12)
    assert explained[0] > explained[1]
    flat = components[:2].reshape(2, -1)
    np.testing.assert_allclose(flat @ flat.T, np.eye(2), atol=1e-12)
    # Each component lies in the patterns' span: projecting onto it keeps its whole norm.
    np.testing.assert_allclose(np.linalg.norm(flat @ patterns.T, axis=-1), 1.0, atol=1e-12)


def test_named_images_that_cannot_be_read_are_named_and_the_rest_drawn(tmp_path, capsys):
    """A missing or damaged file named on the command line was a TensorFlow traceback."""
    from vit_jax.insight.figures import _images

    Image.fromarray(np.zeros((9, 7, 3), np.uint8)).save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_text("not an image")
    args = argparse.Namespace(images=[str(tmp_path / n) for n in ("bad.png", "good.png",
                              "gone.png")], dataset=None, num_images=6)  # fmt: skip
    images = _images(args, {"image_size": 8})
    assert images.shape == (1, 8, 8, 3)
    err = capsys.readouterr().err
    assert f"vit-visualize: cannot read {tmp_path / 'bad.png'}: Unknown image file format" in err
    assert f"vit-visualize: cannot read {tmp_path / 'gone.png'}: " in err
    args.images = [str(tmp_path / "bad.png")]
    with pytest.raises(ValueError, match="^None of the images named could be read: "):
        _images(args, {"image_size": 8})


def test_an_output_name_no_format_matches_is_refused_before_jax_or_tensorflow_loads(tmp_path):
    """The refusal comes at once: with TensorFlow's import blocked, as the figures would
    need it, the command still ends in its one line (status 2) and neither library loaded."""
    command = ["curves", "--workdir", ".", "--out", "curves.txt"]
    code = BLOCK_TENSORFLOW + COMMAND_PROBE
    result = subprocess.run(
        [sys.executable, "-c", code, "vit-visualize", *command],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]  # The probe got the command's status.
    *said, report = result.stderr.strip().splitlines()
    assert json.loads(report) == {"status": 2, "heavy": []}, result.stderr[-3000:]
    assert said == [
        "vit-visualize: --out curves.txt: name an image file, e.g. figure.png; the formats are "
        + ", ".join(sorted(Figure().canvas.get_supported_filetypes()))
        + "."
    ]
