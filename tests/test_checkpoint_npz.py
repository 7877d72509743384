"""Checkpoint interchange: every published `.npz` layout, posemb resampling, head rules, export.

Each layout is produced by a small writer here, from a model of ours with random
parameters, so that loading it back must give the very same parameters and logits;
big_vision's come from files its own code wrote (tests/fixtures), with its logits.
"""

from __future__ import annotations

import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
from flax import traverse_util
from helpers import REPO, random_params
from reference_vit import vit_logits

from vit_jax.checkpoint.describe import (
    WEIGHT_BOUND_FIELDS,
    describe_checkpoint,
    description_path,
)
from vit_jax.checkpoint.fit import load_pretrained
from vit_jax.checkpoint.npz import detect_layout, read_npz, save_npz
from vit_jax.checkpoint.posemb import resample_posemb
from vit_jax.models import abstract_params, create_model, unstack_blocks

IMAGES = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
FIXTURES = os.path.join(REPO, "tests", "fixtures")
POSEMB = "Transformer/posembed_input/pos_embedding"
# Our (Linen) block module names -> the original release's (pre-Linen) ones.
PRE_LINEN = {
    "MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
    "LayerNorm_1": "LayerNorm_2",
    "MlpBlock_0": "MlpBlock_3",
}


def tiny(name: str = "Ti/16", **overrides) -> nn.Module:
    """A ViT small enough for CPU tests: width 32, 2 blocks, 8x8 patches (4x4 on 32x32)."""
    options = dict(num_classes=10, width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=8)
    return create_model(name, **(options | overrides))


@functools.cache
def _jitted_apply(model: nn.Module):
    return jax.jit(functools.partial(model.apply, train=False))


def logits(model: nn.Module, params, images=IMAGES) -> np.ndarray:
    return np.asarray(_jitted_apply(model)({"params": params}, images))


def flat(tree) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def assert_trees_equal(actual, expected) -> None:
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    actual = flat(actual)
    for key, value in flat(expected).items():
        np.testing.assert_array_equal(actual[key], value, err_msg=key)


def write_vit_release(params, path, *, names=PRE_LINEN, prefix="", old_groupnorm=False):
    """Original release / AugReg: pre-Linen block names, optionally (1, 1, 1, C) GroupNorm."""
    arrays = {}
    for key, value in flat(params).items():
        parts = key.split("/")
        if parts[0] == "Transformer" and parts[1].startswith("encoderblock_"):
            parts[2] = names.get(parts[2], parts[2])
        if old_groupnorm and len(parts) > 1 and parts[-2].startswith("gn"):
            value = value.reshape(1, 1, 1, -1)
        arrays[prefix + "/".join(parts)] = value
    np.savez(path, **arrays)


# --- Every layout loads back to the same parameters and logits. --------------------------


def test_original_release_layout(tmp_path):
    model = tiny(representation_size=16)
    params = random_params(model)
    path = tmp_path / "ViT-Ti_16.npz"
    write_vit_release(params, path)

    layout = detect_layout(read_npz(path))
    assert (layout.pre_linen, layout.prefix, layout.scanned) == (True, "", False)
    loaded = load_pretrained(path, init_params=abstract_params(model, 32))
    assert_trees_equal(loaded, params)
    np.testing.assert_array_equal(logits(model, loaded), logits(model, params))


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, overrides",
    [
        # AugReg's R+Ti/16: root convolution only, no representation layer.
        ("R+Ti/16", dict(patch_size=4)),
        # The original R50+ViT-B/16 (two short stages here), with a representation layer.
        ("R50+B/16", dict(patch_size=1, resnet_stages=(1, 1), representation_size=16)),
    ],
    ids=["augreg-R+Ti", "original-R50"],
)
def test_hybrid_with_old_groupnorm_shapes(tmp_path, name, overrides):
    model = tiny(name, depth=1, **overrides)
    params = random_params(model)
    path = tmp_path / "hybrid.npz"
    write_vit_release(params, path, old_groupnorm=True)
    assert read_npz(path)["gn_root/scale"].shape == (1, 1, 1, 64)

    layout = detect_layout(read_npz(path))
    assert layout.old_groupnorm and layout.pre_linen
    loaded = load_pretrained(path, init_params=abstract_params(model, 32))
    assert_trees_equal(loaded, params)
    np.testing.assert_array_equal(logits(model, loaded), logits(model, params))


def test_linen_names_under_optimizer_prefix(tmp_path):
    model = tiny(pool="gap")
    params = random_params(model)
    path = tmp_path / "linen.npz"
    write_vit_release(params, path, names={}, prefix="opt/target/")

    layout = detect_layout(read_npz(path))
    assert (layout.pre_linen, layout.prefix) == (False, "opt/target/")
    loaded = load_pretrained(path, init_params=abstract_params(model, 32))
    assert_trees_equal(loaded, params)


@pytest.mark.slow
@pytest.mark.parametrize("target_scanned", [False, True])
@pytest.mark.parametrize(
    "case, pool, file_scanned, prefix",
    [
        ("map_scan_bf16", "map", True, "params/"),
        ("tok_scan_bf16", "token", True, "params/"),
        ("gap_img_f32", "gap", False, "params/img/"),  # A two-tower model's image tower.
    ],
)
def test_big_vision_checkpoints_compute_big_vision_logits(
    case, pool, file_scanned, prefix, target_scanned
):
    """Files written by big_vision's own model and flattening (tests/fixtures/make_*.py)."""
    path = os.path.join(FIXTURES, f"big_vision_{case}.npz")
    layout = detect_layout(read_npz(path))
    bfloat16 = case.endswith("bf16")
    assert (layout.prefix, layout.scanned, layout.bfloat16) == (prefix, file_scanned, bfloat16)
    assert layout.top_level_posemb and str(layout).startswith("big_vision")
    # Fine-tuning reads the structure under the prefix, its positions under their own name.
    structure = dict(pool=pool, fc_norm=False, num_registers=0, posemb="learn")
    described = describe_checkpoint(path).model
    assert {key: described[key] for key in structure} == structure
    target = create_model(
        "Ti/4", num_classes=3, width=8, depth=2, mlp_dim=16, num_heads=2, pool=pool,
        scan=target_scanned,
    )  # fmt: skip
    loaded = load_pretrained(path, init_params=abstract_params(target, (8, 8)))
    expected = np.load(os.path.join(FIXTURES, "big_vision_logits.npz"))
    computed = logits(target, loaded, expected["images"])
    np.testing.assert_allclose(computed, expected[case], rtol=1e-5, atol=1e-5)


# --- Position embedding resampling. --------------------------------------------------------


@pytest.mark.parametrize("num_prefix", [0, 1])
@pytest.mark.parametrize(
    "old, new", [((7, 7), (12, 12)), ((12, 12), (5, 5)), ((4, 6), (7, 5)), ((6, 4), (3, 8))]
)
def test_bilinear_matches_scipy_zoom(old, new, num_prefix):
    rng = np.random.default_rng(1)
    posemb = rng.normal(size=(1, num_prefix + old[0] * old[1], 16)).astype(np.float32)
    square = old[0] == old[1]
    out = resample_posemb(posemb, new, num_prefix=num_prefix, old_grid=None if square else old)

    table = posemb[0, num_prefix:].reshape(*old, 16)
    zoom = (new[0] / old[0], new[1] / old[1], 1)
    expected = scipy.ndimage.zoom(table, zoom, order=1).reshape(1, -1, 16)
    assert out.shape == (1, num_prefix + new[0] * new[1], 16) and out.dtype == np.float32
    np.testing.assert_allclose(out[:, num_prefix:], expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(out[:, :num_prefix], posemb[:, :num_prefix])


def test_bicubic_differs_but_is_close_on_smooth_embeddings():
    def smooth(size):  # A smooth function of the corner-aligned position in [0, 1]^2.
        y, x = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
        phases = np.arange(8)[None, None, :]
        return np.sin(2.0 * y[..., None] + 3.0 * x[..., None] + phases).reshape(1, -1, 8)

    cls = np.full((1, 1, 8), 7.0)
    posemb = np.concatenate([cls, smooth(8)], axis=1)
    truth = smooth(14).reshape(14, 14, 8)
    bilinear = resample_posemb(posemb, (14, 14), num_prefix=1)
    bicubic = resample_posemb(posemb, (14, 14), num_prefix=1, method="bicubic")

    assert 1e-3 < np.abs(bicubic - bilinear).max() < 0.05
    errors = {
        name: np.abs(out[0, 1:].reshape(14, 14, 8) - truth)
        for name, out in (("bilinear", bilinear), ("bicubic", bicubic))
    }
    assert max(error.max() for error in errors.values()) < 0.05
    # Away from the replicated edges the cubic kernel is an order of magnitude closer.
    interior = {name: error[2:-2, 2:-2].max() for name, error in errors.items()}
    assert interior["bicubic"] < interior["bilinear"] / 10
    np.testing.assert_array_equal(bicubic[:, :1], cls)


@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
def test_resampling_to_the_same_grid_is_the_identity(method):
    posemb = np.random.default_rng(2).normal(size=(1, 1 + 24, 8)).astype(np.float32)
    out = resample_posemb(posemb, (4, 6), num_prefix=1, method=method, old_grid=(4, 6))
    np.testing.assert_array_equal(out, posemb)


@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
def test_load_resamples_posemb_for_a_higher_resolution(tmp_path, method):
    model = tiny()
    params = random_params(model)
    path = tmp_path / "ckpt.npz"
    save_npz(params, path)

    target = abstract_params(model, (48, 48))  # 4x4 -> 6x6 patches.
    loaded = load_pretrained(path, init_params=target, posemb_method=method)
    posemb = params["Transformer"]["posembed_input"]["pos_embedding"]
    expected = resample_posemb(posemb, (6, 6), num_prefix=1, method=method)
    loaded = flat(loaded)
    np.testing.assert_array_equal(loaded[POSEMB], expected)
    if method == "bilinear":  # The original fine-tuning code's numbers.
        zoomed = scipy.ndimage.zoom(posemb[0, 1:].reshape(4, 4, 32), (1.5, 1.5, 1), order=1)
        np.testing.assert_allclose(loaded[POSEMB][0, 1:], zoomed.reshape(36, 32), atol=1e-7)
    for key, value in flat(params).items():
        if key != POSEMB:
            np.testing.assert_array_equal(loaded[key], value, err_msg=key)


def test_load_non_square_grids(tmp_path):
    model = tiny(pool="gap")
    params = random_params(model)
    path = tmp_path / "square.npz"
    save_npz(params, path)
    posemb = params["Transformer"]["posembed_input"]["pos_embedding"][0].reshape(4, 4, 32)

    wide = abstract_params(model, (32, 48))  # 4x6 patches: 24 is no square.
    with pytest.raises(ValueError, match=r"24 patch positions.*pass grid=\(height, width\)"):
        load_pretrained(path, init_params=wide)
    loaded = load_pretrained(path, init_params=wide, grid=(4, 6))
    zoomed = scipy.ndimage.zoom(posemb, (1, 1.5, 1), order=1)
    np.testing.assert_allclose(flat(loaded)[POSEMB][0], zoomed.reshape(24, 32), atol=1e-7)

    wide_path = tmp_path / "wide.npz"
    save_npz(loaded, wide_path)
    square = abstract_params(model, (48, 48))
    with pytest.raises(ValueError, match="pass source_grid="):
        load_pretrained(wide_path, init_params=square)
    back = load_pretrained(wide_path, init_params=square, source_grid=(4, 6))
    zoomed = scipy.ndimage.zoom(flat(loaded)[POSEMB][0].reshape(4, 6, 32), (1.5, 1, 1), order=1)
    np.testing.assert_allclose(flat(back)[POSEMB][0], zoomed.reshape(36, 32), atol=1e-7)


# --- Head and representation layer. -------------------------------------------------------


def test_head_reset_for_another_class_count(tmp_path):
    params = random_params(tiny())
    path = tmp_path / "ckpt.npz"
    save_npz(params, path)

    # Unboxed jax arrays this time (the other tests pass boxed shapes).
    init = jax.tree.map(jnp.asarray, random_params(tiny(num_classes=5)))
    loaded = load_pretrained(path, init_params=init)
    assert jax.tree.structure(loaded) == jax.tree.structure(init)
    np.testing.assert_array_equal(loaded["head"]["kernel"], np.zeros((32, 5), np.float32))
    np.testing.assert_array_equal(loaded["head"]["bias"], np.zeros(5, np.float32))
    del loaded["head"], params["head"]
    assert_trees_equal(loaded, params)


def test_head_reset_on_request_for_the_same_class_count(tmp_path):
    params = random_params(tiny())
    path = tmp_path / "ckpt.npz"
    save_npz(params, path)
    kept = load_pretrained(path, init_params=params)
    assert_trees_equal(kept["head"], params["head"])
    reset = load_pretrained(path, init_params=params, reset_head=True)
    assert not reset["head"]["kernel"].any() and not reset["head"]["bias"].any()
    del reset["head"], params["head"]
    assert_trees_equal(reset, params)


@pytest.mark.parametrize(
    "representation_size, num_classes, keeps_head",
    [(None, 10, False), (16, 10, True), (16, 5, False)],
)
def test_representation_layer_follows_the_target(
    tmp_path, representation_size, num_classes, keeps_head
):
    source = tiny(representation_size=16)
    params = random_params(source)
    path = tmp_path / "i21k.npz"
    save_npz(params, path)

    target = tiny(representation_size=representation_size, num_classes=num_classes)
    loaded = load_pretrained(path, init_params=abstract_params(target, 32))
    assert ("pre_logits" in loaded) == (representation_size is not None)
    if representation_size:
        assert_trees_equal(loaded["pre_logits"], params["pre_logits"])
    if keeps_head:
        assert_trees_equal(loaded["head"], params["head"])
        np.testing.assert_array_equal(logits(target, loaded), logits(source, params))
    else:  # A head trained on other features or classes: zero-initialised.
        in_features = representation_size or 32
        assert not loaded["head"]["kernel"].any() and not loaded["head"]["bias"].any()
        assert loaded["head"]["kernel"].shape == (in_features, num_classes)
    assert_trees_equal(loaded["Transformer"], params["Transformer"])


@pytest.mark.parametrize(
    "target, expected",
    [
        (
            dict(width=48),
            [
                "shape differs: embedding/kernel: checkpoint (8, 8, 3, 32), model (8, 8, 3, 48)",
                "shape differs: Transformer/encoderblock_1/MlpBlock_0/Dense_1/kernel: "
                "checkpoint (64, 32), model (64, 48)",
            ],
        ),
        (
            dict(depth=3),
            ["missing from the checkpoint: Transformer/encoderblock_2/LayerNorm_0/scale (32,)"],
        ),
        (
            dict(pool="gap"),
            [
                "not in the model: cls (1, 1, 32)",
                f"shape differs: {POSEMB}: checkpoint (1, 17, 32), model (1, 16, 32)",
            ],
        ),
    ],
)
def test_mismatch_lists_keys_and_shapes(tmp_path, target, expected):
    path = tmp_path / "ckpt.npz"
    save_npz(random_params(tiny()), path)
    with pytest.raises(ValueError, match="does not fit the model") as error:
        load_pretrained(path, init_params=abstract_params(tiny(**target), 32))
    message = str(error.value)
    assert "original ViT/AugReg layout" in message
    for line in expected:
        assert line in message


def test_loading_never_unpickles(tmp_path):
    path = tmp_path / "pickled.npz"
    np.savez(path, **{"embedding/kernel": np.array([{"code": "runs"}], dtype=object)})
    with pytest.raises(ValueError, match="allow_pickle=False"):
        load_pretrained(path, init_params=abstract_params(tiny(), 32))


def test_a_damaged_npz_is_named_as_such(tmp_path):
    """An interrupted download, or flipped bytes: zipfile's BadZipFile was a traceback."""
    model = tiny()
    whole = tmp_path / "whole.npz"
    save_npz(random_params(model), whole)
    encoded = bytearray(whole.read_bytes())
    (tmp_path / "cut.npz").write_bytes(encoded[: len(encoded) // 2])
    encoded[len(encoded) // 3 : len(encoded) // 3 + 64] = bytes(64)  # Inside an array's data.
    (tmp_path / "flipped.npz").write_bytes(encoded)
    for name, reason in [("cut", "File is not a zip file"), ("flipped", "Bad CRC-32 for file")]:
        with pytest.raises(ValueError, match=rf"{name}.npz is a damaged .npz archive \({reason}"):
            load_pretrained(tmp_path / f"{name}.npz", init_params=abstract_params(model, 32))


# --- Export. ------------------------------------------------------------------------------


def test_export_writes_the_original_layout_and_round_trips(tmp_path):
    model = tiny(representation_size=16)
    params = random_params(model)
    path = tmp_path / "export"  # No suffix: the file is written exactly there.
    save_npz(params, path)

    arrays = read_npz(path)
    assert {value.dtype for value in arrays.values()} == {np.dtype(np.float32)}
    block_modules = {k.split("/")[2] for k in arrays if k.startswith("Transformer/encoderblock_")}
    assert block_modules == {
        "LayerNorm_0",
        "MultiHeadDotProductAttention_1",
        "LayerNorm_2",
        "MlpBlock_3",
    }
    assert arrays[POSEMB].shape == (1, 17, 32) and "pre_logits/kernel" in arrays

    loaded = load_pretrained(path, init_params=abstract_params(model, 32))
    assert_trees_equal(loaded, params)
    np.testing.assert_array_equal(logits(model, loaded), logits(model, params))


def test_export_of_scanned_bfloat16_params_round_trips(tmp_path):
    model = tiny(pool="map", scan=True)
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), random_params(model))
    path = tmp_path / "scanned.npz"
    save_npz(params, path)

    arrays = read_npz(path)
    assert "Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel" in arrays
    assert {value.dtype for value in arrays.values()} == {np.dtype(np.float32)}
    as_float32 = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    loaded = load_pretrained(path, init_params=abstract_params(model, 32))
    assert_trees_equal(loaded, as_float32)
    np.testing.assert_array_equal(logits(model, loaded), logits(model, as_float32))
    unrolled = load_pretrained(path, init_params=abstract_params(tiny(pool="map"), 32))
    assert_trees_equal(unrolled, unstack_blocks(as_float32))


@pytest.mark.parametrize("overrides", [dict(representation_size=16), dict(pool="gap")])
def test_flax_model_matches_the_reference_on_the_exported_file(tmp_path, overrides):
    model = tiny(**overrides)
    params = random_params(model, seed=3)
    path = tmp_path / "export.npz"
    save_npz(params, path)

    expected = vit_logits(read_npz(path), IMAGES)
    assert np.abs(expected).max() > 0.1  # Non-trivial logits.
    np.testing.assert_allclose(logits(model, params), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(pool="token", fc_norm=False, num_registers=0, posemb="learn"),
        dict(pool="gap", fc_norm=True, num_registers=0, posemb="learn"),
        dict(pool="map", fc_norm=False, num_registers=2, posemb="learn"),
        dict(pool="token", fc_norm=False, num_registers=1, posemb="learn", representation_size=16),
        dict(pool="gap", fc_norm=False, num_registers=0, posemb="sincos2d"),  # big_vision's
    ],
)
def test_describe_and_fine_tuning_read_the_architecture_from_an_npz(tmp_path, overrides):
    """What vit-predict builds a bare file's model from, and what `model_init` sets.

    Both come from the file's arrays; an .npz states no activation.
    """
    model = tiny(**overrides)
    path = tmp_path / "model.npz"
    save_npz(random_params(model), path)
    described = describe_checkpoint(path)
    # Every size, and no `name`: width 32 is no named size.
    sizes = dict(patch_size=8, width=32, depth=2, mlp_dim=64, num_heads=2)
    assert described.model == {"representation_size": None} | sizes | overrides
    learned = overrides["posemb"] == "learn"
    assert (described.num_classes, described.image_size) == (10, 32 if learned else None)
    assert "original ViT/AugReg layout" in described.source


def test_fine_tuning_takes_the_exported_description_over_the_npz(tmp_path):
    """vit-export's `.json` beside an `.npz` states the activation the arrays cannot."""
    path = tmp_path / "model.npz"
    save_npz(random_params(tiny(pool="gap", activation="gelu_exact")), path)
    assert describe_checkpoint(path).model["pool"] == "gap"
    assert "activation" not in describe_checkpoint(path).model
    model = {"name": "Ti/16", "pool": "gap", "activation": "gelu_exact", "width": 32}
    description_path(path).write_text(json.dumps({"model": model}))
    described = describe_checkpoint(path).model
    assert {key: described[key] for key in WEIGHT_BOUND_FIELDS} == {
        "pool": "gap",
        "activation": "gelu_exact",
        "fc_norm": False,
        "num_registers": 0,
        "posemb": "learn",
    }
