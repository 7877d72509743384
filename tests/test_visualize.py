"""Figure computations against closed forms, and every vit-visualize command's PNG."""

import json

import jax
import numpy as np
import pytest
from PIL import Image

from vit_jax import checkpoint
from vit_jax.insight import maps
from vit_jax.insight.cli import visualize_main
from vit_jax.models import create_model
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
    np.testing.assert_allclose(far, mean_pair)


MODELS = {
    "plain": ("Ti/7", {}),
    "scanned": ("Ti/7", {"scan": True, "num_registers": 2}),
    "hybrid": ("R+Ti/4", {"pool": "gap"}),
}


@pytest.fixture(scope="module", params=list(MODELS))
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


def test_curves_from_a_workdir(tmp_path):
    lines = [
        {"step": 10, "train/loss": 2.0, "train/lr": 1e-3},
        {"step": 20, "train/loss": 1.0, "train/lr": 5e-4, "eval/top1": 0.5, "fewshot/d_5shot": 0.4},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    series = maps.metric_series((tmp_path / "metrics.jsonl").read_text().splitlines())
    np.testing.assert_array_equal(series["train/loss"][0], [10, 20])
    np.testing.assert_array_equal(series["fewshot/d_5shot"][1], [0.4])
    out = tmp_path / "curves.png"
    assert visualize_main(["curves", "--workdir", str(tmp_path), "--out", str(out)]) == 0
    assert png_size(out) == (1000, 700)
    assert visualize_main(["curves", "--workdir", str(tmp_path / "none"), "--out", str(out)]) == 2


def test_patch_grid_counts_the_stem_and_leaves_out_registers():
    hybrid = create_model("R+Ti/4", num_classes=0, width=32, depth=1, mlp_dim=64, num_heads=2)
    assert maps.patch_grid(hybrid, 32) == (4, 4)  # Stem /4 (root conv + max-pool), patch 2.
    plain = create_model("Ti/7", num_classes=0, width=32, depth=1, mlp_dim=64, num_heads=2)
    assert maps.patch_grid(plain.clone(num_registers=3), 28) == (4, 4)
