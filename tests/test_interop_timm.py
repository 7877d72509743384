"""timm <-> vit_jax, against the real timm: imports compute timm's logits, exports load into timm.

Random timm models are saved as timm saves them (safetensors of the state dict), imported
through `describe_checkpoint` + `load_pretrained`, and compared logit for logit; our
random models are exported with `vit-export` and loaded by timm's own loaders.
"""

from __future__ import annotations

import json
import logging

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import parse_predictions, random_params
from interop_support import (
    PIXELS,
    TIMM_TINY,
    TINY,
    assert_same_logits,
    import_model,
    our_logits,
    randomize,
    safetensors,
    timm,
    torch,
    torch_forward,
    write_run,
)
from PIL import Image
from timm.data import resolve_data_config
from timm.models import save_for_hf

from vit_jax import checkpoint, export, predict
from vit_jax.checkpoint.safetensors_file import read_safetensors
from vit_jax.config import base_config
from vit_jax.models import abstract_params, create_model, scale_images

pytestmark = pytest.mark.interop


def save_timm(module: torch.nn.Module, path) -> str:
    tensors = {k: v.contiguous() for k, v in module.state_dict().items()}
    safetensors.torch.save_file(tensors, str(path))
    return str(path)


def timm_vit(architecture: str = "vit_tiny_patch16_224", **kwargs) -> torch.nn.Module:
    options = TIMM_TINY | dict(num_heads=2, num_classes=10) | kwargs
    return randomize(lambda: timm.create_model(architecture, pretrained=False, **options))


# Each family timm builds that our model can express, and the fields it must map to.
IMPORTABLE = {
    "augreg_token": ({}, dict(pool="token", fc_norm=False)),
    "deit": ({"architecture": "deit_tiny_patch16_224"}, dict(pool="token", fc_norm=False)),
    "gap": (dict(class_token=False, global_pool="avg", fc_norm=False), dict(pool="gap")),
    "gap_fc_norm": (dict(class_token=False, global_pool="avg"), dict(pool="gap", fc_norm=True)),
    "map": (dict(class_token=False, global_pool="map"), dict(pool="map", fc_norm=False)),
    "no_qkv_bias": (dict(qkv_bias=False), dict(pool="token")),
    "registers_token": (
        dict(reg_tokens=4, no_embed_class=True),
        dict(pool="token", num_registers=4),
    ),
    "registers_gap": (
        dict(class_token=False, global_pool="avg", fc_norm=False, reg_tokens=4)
        | dict(no_embed_class=True),
        dict(pool="gap", num_registers=4),
    ),
    "registers_map": (
        dict(class_token=False, global_pool="map", reg_tokens=2, no_embed_class=True),
        dict(pool="map", num_registers=2),
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", IMPORTABLE)
def test_timm_models_import_with_timm_logits(family, tmp_path):
    kwargs, fields = IMPORTABLE[family]
    source = timm_vit(**kwargs)
    path = save_timm(source, tmp_path / "model.safetensors")

    described = checkpoint.describe_checkpoint(path)
    assert described.model | fields == described.model
    assert described.model["activation"] == "gelu_exact"
    assert set(checkpoint.WEIGHT_BOUND_FIELDS) <= described.model.keys()  # Fine-tuning's.
    assert (described.num_classes, described.image_size) == (10, 32)
    model, params = import_model(path)
    assert_same_logits(our_logits(model, params), torch_forward(source))

    # The activation matters: with the Google checkpoints' tanh GELU this comparison fails.
    tanh_model, _ = import_model(path, activation="gelu_tanh")
    with pytest.raises(AssertionError):
        assert_same_logits(our_logits(tanh_model, params), torch_forward(source))


def test_timm_import_follows_the_target_grid_head_and_scan(tmp_path):
    """The .npz rules: posemb resampled to the target grid, head reset for another class count."""
    path = save_timm(timm_vit(), tmp_path / "model.safetensors")
    _, params = import_model(path)
    wide, wide_params = import_model(path, num_classes=5, image_size=48)
    expected = checkpoint.resample_posemb(
        params["Transformer"]["posembed_input"]["pos_embedding"], (6, 6), num_prefix=1
    )
    np.testing.assert_array_equal(
        wide_params["Transformer"]["posembed_input"]["pos_embedding"], expected
    )
    assert not np.any(wide_params["head"]["kernel"]) and wide_params["head"]["kernel"].shape[1] == 5

    scanned, scanned_params = import_model(path, scan=True)
    model, params = import_model(path)
    np.testing.assert_allclose(
        our_logits(scanned, scanned_params), our_logits(model, params), atol=1e-5
    )


UNSUPPORTED = {
    "distilled": (
        dict(architecture="deit_tiny_distilled_patch16_224"),
        "distillation token",
    ),
    "layer_scale": (dict(init_values=1e-5), "LayerScale"),
    "qk_norm": (dict(qk_norm=True), "query/key normalisation"),
    "swiglu": (
        dict(mlp_layer=timm.layers.SwiGLUPacked, act_layer=torch.nn.SiLU, mlp_ratio=8.0),
        "SwiGLU",
    ),
    "pre_norm": (dict(pre_norm=True), "LayerNorm before the blocks"),
    "register_positions": (dict(reg_tokens=4), "register tokens position embeddings"),
}


@pytest.mark.parametrize("feature", UNSUPPORTED)
def test_timm_models_our_vit_cannot_express_are_refused(feature, tmp_path):
    kwargs, message = UNSUPPORTED[feature]
    path = save_timm(timm_vit(**kwargs), tmp_path / "model.safetensors")
    # Both ways in: what vit-predict and fine-tuning read a bare file with, and loading
    # into a model of one's own without describing the file first.
    target = abstract_params(create_model("Ti/8", num_classes=10, **TINY), 32)
    for read in (
        checkpoint.describe_checkpoint,
        lambda p: checkpoint.load_pretrained(p, init_params=target),
    ):
        with pytest.raises(ValueError, match=message):
            read(path)


def test_predict_runs_a_bare_timm_checkpoint(tmp_path, capsys):
    """No flags: size, classes, resolution and activation all come from the file."""
    source = randomize(
        lambda: timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=4
        )
    )
    path = save_timm(source, tmp_path / "model.safetensors")
    image_path = tmp_path / "image.png"
    pixels = np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image_path)

    assert predict.main(["--checkpoint", path, "--top_k", "4", str(image_path)]) == 0
    printed = parse_predictions(capsys.readouterr().out)[str(image_path)]
    image = predict.load_image(str(image_path), 32, 1.0)[None] / np.float32(127.5) - 1
    expected = torch.softmax(torch_forward(source, image), -1).numpy()[0]
    assert [label for _, label in printed] == [str(i) for i in np.argsort(-expected)]
    np.testing.assert_allclose([p for p, _ in printed], np.sort(expected)[::-1], atol=1e-4)


# Our models exported for timm: (model fields, --format).
EXPORTABLE = {
    "token_tanh_npz": (dict(pool="token"), "timm_npz"),
    "token_exact_safetensors": (dict(pool="token", activation="gelu_exact"), "timm_safetensors"),
    "gap_npz": (dict(pool="gap"), "timm_npz"),
    "gap_fc_norm_safetensors": (
        dict(pool="gap", fc_norm=True, activation="gelu_exact"),
        "timm_safetensors",
    ),
    "map_npz": (dict(pool="map"), "timm_npz"),
    "map_safetensors": (dict(pool="map", activation="gelu_exact"), "timm_safetensors"),
    "registers_token_safetensors": (dict(num_registers=2), "timm_safetensors"),
    "registers_gap_safetensors": (
        dict(pool="gap", fc_norm=True, num_registers=3, activation="gelu_exact"),
        "timm_safetensors",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", EXPORTABLE)
def test_exports_load_into_timm_with_our_logits(case, tmp_path):
    fields, file_format = EXPORTABLE[case]
    model = create_model("Ti/8", num_classes=10, **TINY, **fields)
    params = random_params(model)
    workdir = write_run(tmp_path / "run", fields, params, num_classes=10)
    suffix = ".npz" if file_format == "timm_npz" else ".safetensors"
    out = tmp_path / f"export{suffix}"
    assert export.main(["--workdir", workdir, "--out", str(out), "--format", file_format]) == 0

    args = json.loads(out.with_suffix(".json").read_text())["timm_model_args"]
    options = TIMM_TINY | dict(num_classes=10) | args
    target = timm.create_model("vit_tiny_patch16_224", pretrained=False, **options).eval()
    if file_format == "timm_npz":
        target.load_pretrained(str(out))
    else:
        target.load_state_dict(safetensors.torch.load_file(str(out)), strict=True)
    assert_same_logits(our_logits(model, params), torch_forward(target))
    # timm's data config gives it our pixels, whatever ViT name builds it (not DeiT's).
    for name in ("vit_tiny_patch16_224", "deit_tiny_patch16_224"):
        data = resolve_data_config({}, model=timm.create_model(name, pretrained=False, **options))
        assert [tuple(data[key]) for key in ("mean", "std")] == [(0.5, 0.5, 0.5)] * 2

    # And back: the file and its description rebuild the same model here.
    reimported, reloaded = import_model(out, **fields)
    assert_same_logits(our_logits(reimported, reloaded), our_logits(model, params))
    if file_format == "timm_safetensors":  # Alone, its metadata says what timm's layout lacks.
        out.with_suffix(".json").unlink()
        alone, alone_params, _ = checkpoint.load_model(str(out))
        assert alone.num_heads == model.num_heads == 2  # Not Ti's 3, nor unknown.
        assert_same_logits(our_logits(alone, alone_params), our_logits(model, params))


@pytest.mark.parametrize(
    ("fields", "file_format", "message", "instead"),
    [
        (dict(representation_size=16), "timm_npz", "representation layer", "--format npz"),
        (dict(representation_size=16), "timm_safetensors", "representation layer", "--format npz"),
        (dict(pool="gap", fc_norm=True), "timm_npz", "fc_norm", "--format timm_safetensors"),
        (dict(num_registers=2), "timm_npz", "register tokens", "--format timm_safetensors"),
        (dict(posemb="sincos2d"), "timm_safetensors", "sincos2d", "--format npz"),
    ],
)
def test_exports_timm_would_misread_are_refused(fields, file_format, message, instead, tmp_path):
    model = create_model("Ti/8", num_classes=10, **TINY, **fields)
    params = random_params(model)
    workdir = write_run(tmp_path / "run", fields, params, num_classes=10)
    out = tmp_path / "export.bin"
    assert export.main(["--workdir", workdir, "--out", str(out), "--format", file_format]) == 2
    assert not out.exists() and not (tmp_path / "export.bin.json").exists()
    with pytest.raises(ValueError, match=message) as refused:
        export.export(workdir, out, file_format)
    assert instead in str(refused.value)
    # The original layout keeps every model of ours.
    assert export.main(["--workdir", workdir, "--out", str(tmp_path / "ours.npz")]) == 0
    loaded = checkpoint.load_pretrained(tmp_path / "ours.npz", init_params=params)
    np.testing.assert_array_equal(our_logits(model, loaded), our_logits(model, params))


def test_bfloat16_hub_files_read_exactly(tmp_path):
    """Hub files are often bfloat16, which `safetensors.numpy` cannot read; ours can."""
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in timm_vit().state_dict().items()}
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    arrays, _ = read_safetensors(path)
    assert sorted(arrays) == sorted(tensors)
    for name, tensor in tensors.items():
        assert arrays[name].dtype == jnp.bfloat16
        np.testing.assert_array_equal(arrays[name].astype(np.float32), tensor.float().numpy())


@pytest.mark.parametrize(
    ("architecture", "activation"),
    [("vit_base_patch32_siglip_256", "gelu_tanh"), ("vit_base_patch16_siglip_224", "gelu_exact")],
)
def test_saved_architecture_selects_the_activation(architecture, activation, tmp_path):
    """Some SigLIP definitions use `act_layer="gelu_tanh"`, others not: config.json says which."""
    source = timm_vit(architecture, num_heads=2)
    save_for_hf(source, str(tmp_path), safe_serialization=True)
    path = str(tmp_path / "model.safetensors")
    described = checkpoint.describe_checkpoint(path).model
    assert {key: described[key] for key in checkpoint.WEIGHT_BOUND_FIELDS} == dict(
        activation=activation, pool="map", fc_norm=False, num_registers=0, posemb="learn"
    )
    model, params = import_model(path)
    assert_same_logits(our_logits(model, params), torch_forward(source))


@pytest.mark.parametrize(
    ("architecture", "num_classes"),
    [("deit_tiny_patch16_224", 10), ("vit_base_patch16_224.mae", 0)],
    ids=["deit", "mae_features"],
)
def test_weights_trained_on_imagenets_mean_and_std_take_our_pixels(
    architecture, num_classes, tmp_path
):
    """DeiT's and MAE's weights were trained on pixels normalised with ImageNet's mean and
    std, which the config.json timm saves beside them states: imported, they take pixels
    as `scale_images` gives them to every vit_jax model and compute what timm computes on
    the same pixels normalised as timm's data config says."""
    source = timm_vit(architecture, num_classes=num_classes)
    save_for_hf(source, str(tmp_path), safe_serialization=True)
    data = resolve_data_config({}, model=source)
    mean, std = np.asarray(data["mean"]), np.asarray(data["std"])
    assert not np.allclose(mean, 0.5)  # What the test is about: not our normalisation.
    theirs = torch_forward(source, ((PIXELS / 255 - mean) / std).astype(np.float32))

    path = tmp_path / "model.safetensors"
    assert "mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225): folded" in (
        checkpoint.describe_checkpoint(path).source
    )
    model, params = import_model(path)
    assert_same_logits(our_logits(model, params, np.asarray(scale_images(PIXELS))), theirs)


def test_average_pooling_beside_a_class_token_is_refused(tmp_path):
    """Only the saved config.json tells this model from a token-pooled one: it is read."""
    save_for_hf(timm_vit(global_pool="avg"), str(tmp_path), safe_serialization=True)
    with pytest.raises(ValueError, match="global_pool='avg' beside a class token"):
        checkpoint.describe_checkpoint(tmp_path / "model.safetensors")


def test_fine_tuning_from_a_timm_file_builds_the_model_timm_trained(tmp_path):
    """`model_init` of a hub file changes the fields its weights fix (exact GELU, pooling),
    leaving the config given alone."""
    source = timm_vit(class_token=False, global_pool="avg")  # gap + fc_norm, exact GELU
    config = base_config()
    config.model.update(name="Ti/8", **TINY)
    config.model_init = save_timm(source, tmp_path / "model.safetensors")
    assert (config.model.activation, config.model.pool) == ("gelu_tanh", "token")
    changes = checkpoint.model_init_changes(config.model, config.model_init)
    assert changes == dict(activation="gelu_exact", pool="gap", fc_norm=True)
    assert (config.model.activation, config.model.pool) == ("gelu_tanh", "token")


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("name", ["pytorch_model.bin", "mae_pretrain_vit_base.pth"])
def test_a_pytorch_pickle_is_refused_pointing_to_safetensors(tmp_path, name, zipped):
    """MAE's, DINO's and DeiT's official releases are torch.save files: refused as such (a
    zip of a pickle read as an .npz said 'Expected the ViT patch embedding ... found none'),
    with where to find the weights that say their input normalisation."""
    path = tmp_path / name
    torch.save({"model": timm_vit().state_dict()}, str(path), _use_new_zipfile_serialization=zipped)
    with pytest.raises(ValueError, match=r"is a PyTorch pickle \(torch\.save\)") as refused:
        checkpoint.read_weights(path)
    assert "hf download timm/vit_base_patch16_224.mae model.safetensors config.json" in str(
        refused.value
    )


def test_predict_names_the_classes_and_crops_as_the_saved_config_says(tmp_path, capsys):
    """timm saves ImageNet-style label names (synsets) and their descriptions in config.json,
    and the central crop it evaluates with (`crop_pct`): `vit-predict` on the bare file
    prints the descriptions, in the head's order, of the image cropped so."""
    synsets = [f"n0{i}" for i in range(4)]
    descriptions = {name: f"class {name}, described" for name in synsets}
    source = randomize(
        lambda: timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=4
        )
    )  # Ti/16's sizes: the file names no model, and these are a named one.
    save_for_hf(
        source,
        str(tmp_path),
        model_config={"label_names": synsets, "label_descriptions": descriptions},
        safe_serialization=True,
    )
    crop = source.pretrained_cfg["crop_pct"]
    assert crop == 0.9  # vit_tiny_patch16_224's: the test is about a crop other than ours.
    image_path = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 50, 3), np.uint8)).save(
        image_path
    )
    path = str(tmp_path / "model.safetensors")
    assert predict.main(["--checkpoint", path, "--top_k", "4", str(image_path)]) == 0
    printed = parse_predictions(capsys.readouterr().out)[str(image_path)]
    image = predict.load_image(str(image_path), 32, crop)[None] / np.float32(127.5) - 1
    expected = torch.softmax(torch_forward(source, image), -1).numpy()[0]
    np.testing.assert_allclose([p for p, _ in printed], np.sort(expected)[::-1], atol=1e-4)
    order = np.argsort(-expected)
    assert [label for _, label in printed] == [descriptions[synsets[i]] for i in order]


def test_a_file_whose_normalisation_nothing_states_is_read_with_a_warning(tmp_path, caplog):
    """A model.safetensors downloaded without its config.json: taken as Google's [-1, 1],
    saying so and what to download; with the config.json timm saves, nothing is said."""
    source = timm_vit("deit_tiny_patch16_224")
    (tmp_path / "bare").mkdir()
    bare = save_timm(source, tmp_path / "bare" / "model.safetensors")
    save_for_hf(source, str(tmp_path / "saved"), safe_serialization=True)
    with caplog.at_level(logging.WARNING, logger="vit_jax.checkpoint.hub"):
        checkpoint.read_weights(bare)
        checkpoint.read_weights(tmp_path / "saved" / "model.safetensors")
    (warning,) = caplog.messages
    assert warning.startswith(f"{bare}: no file beside it says how its inputs were normalised")
    assert warning.endswith("download that file with the weights.")
