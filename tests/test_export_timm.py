"""`vit-export --help`'s lines that load an export into timm, run exactly as printed with the
real timm on models of several sizes; the format follows --out's extension."""

import json

import numpy as np
import pytest
from helpers import random_params
from interop_support import assert_same_logits, our_logits, torch_forward

from vit_jax import checkpoint, export
from vit_jax.models import create_model

# (our model's dimensions and fields, image size, classes): none of them the size of timm's
# vit_base_patch16_224, whose name the printed lines use: the .json's arguments set the size.
SIZES = {
    "token_tanh": (dict(width=32, depth=2, num_heads=2, mlp_dim=128, patch_size=8), 32, 10),
    "gap_fc_norm_exact": (
        dict(
            width=48,
            depth=3,
            num_heads=3,
            mlp_dim=96,
            patch_size=4,
            pool="gap",
            fc_norm=True,
            activation="gelu_exact",
        ),
        16,
        7,
    ),
    "map_registers": (
        dict(width=24, depth=1, num_heads=4, mlp_dim=72, patch_size=8, pool="map", num_registers=2),
        24,
        5,
    ),
}


def write_run(workdir, fields: dict, image_size: int, num_classes: int):
    """A vit-train workdir of a random model; the model and its parameters."""
    model = create_model("Ti/8", num_classes=num_classes, **fields)
    params = random_params(model, (image_size, image_size))
    checkpointer = checkpoint.Checkpointer(str(workdir), keep=1, async_save=False)
    metadata = {
        "class_names": [str(i) for i in range(num_classes)],
        "model": {"name": "Ti/8", **fields},
        "num_classes": num_classes,
        "image_size": image_size,
        "dataset": "synthetic",
    }
    checkpointer.save(1, {"step": 1, "params": params}, metadata)
    checkpointer.close()
    return model, params


def printed_timm_lines(capsys) -> tuple[str, str]:
    """The Python block `vit-export --help` prints, and its line for --format timm_npz."""
    with pytest.raises(SystemExit) as done:
        export.main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    block = text.split("    import json", 1)[1].split("\n\n", 1)[0]
    code = "import json" + "\n".join(line.removeprefix("    ") for line in block.split("\n"))
    npz_line = text.split("the last line is `", 1)[1].split("`", 1)[0]
    return code, npz_line


@pytest.mark.slow
@pytest.mark.parametrize("size", SIZES)
def test_help_lines_load_an_export_of_any_size_into_timm(size, tmp_path, capsys):
    fields, image_size, num_classes = SIZES[size]
    model, params = write_run(tmp_path / "run", fields, image_size, num_classes)
    out = tmp_path / "model.safetensors"
    assert export.main(["--workdir", str(tmp_path / "run"), "--out", str(out)]) == 0
    code, _ = printed_timm_lines(capsys)

    namespace = {}
    exec(
        code.replace("model.json", str(tmp_path / "model.json")).replace(
            "model.safetensors", str(out)
        ),
        namespace,
    )
    images = np.random.default_rng(1).uniform(-1, 1, (2, image_size, image_size, 3))
    images = images.astype(np.float32)
    assert_same_logits(our_logits(model, params, images), torch_forward(namespace["model"], images))


def test_help_line_for_timm_npz_and_a_class_count_mismatch(tmp_path, capsys):
    fields, image_size, num_classes = SIZES["token_tanh"]
    model, params = write_run(tmp_path / "run", fields, image_size, num_classes)
    workdir = str(tmp_path / "run")
    npz = tmp_path / "model.npz"
    assert export.main(["--workdir", workdir, "--out", str(npz), "--format", "timm_npz"]) == 0
    code, npz_line = printed_timm_lines(capsys)
    lines = code.replace("model.json", str(tmp_path / "model.json")).splitlines()
    namespace = {}
    exec("\n".join([*lines[:-1], npz_line.replace("model.npz", str(npz))]), namespace)
    images = np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    assert_same_logits(our_logits(model, params, images), torch_forward(namespace["model"], images))

    # Another class count is refused by load_state_dict, never a random head. (Beside
    # model.npz, model.safetensors would take its model.json: another folder.)
    out = tmp_path / "safetensors" / "model.safetensors"
    assert export.main(["--workdir", workdir, "--out", str(out)]) == 0
    args = json.loads(out.with_suffix(".json").read_text())["timm_model_args"]
    assert args["num_classes"] == num_classes
    namespace = {}
    mismatched = code.replace("model.json", str(out.with_suffix(".json"))).replace(
        "model.safetensors", str(out)
    )
    mismatched = mismatched.replace("**args)", "**(args | {'num_classes': 3}))")
    with pytest.raises(RuntimeError, match="size mismatch for head"):
        exec(mismatched, namespace)


def test_the_extension_chooses_the_format_or_contradicts_it(tmp_path, capsys):
    fields, image_size, num_classes = SIZES["token_tanh"]
    write_run(tmp_path / "run", fields, image_size, num_classes)
    workdir = str(tmp_path / "run")
    for name, expected in [("a.safetensors", "timm_safetensors"), ("b.npz", "npz")]:
        assert export.main(["--workdir", workdir, "--out", str(tmp_path / name)]) == 0
        described = json.loads((tmp_path / name).with_suffix(".json").read_text())
        assert ("timm_model_args" in described) == (expected == "timm_safetensors")
    assert (tmp_path / "a.safetensors").read_bytes()[8:9] == b"{"  # A safetensors header.
    assert (tmp_path / "b.npz").read_bytes()[:2] == b"PK"  # A zip: numpy's .npz.
    capsys.readouterr()

    a_json = (tmp_path / "a.json").read_text()
    for argv, message in [
        (["--out", str(tmp_path / "c.npz"), "--format", "timm_safetensors"], "ends in .npz"),
        (["--out", str(tmp_path / "d.bin")], "names no format"),
        # a.json describes a.safetensors: an a.npz would take it over.
        (["--out", str(tmp_path / "a.npz")], f"{tmp_path / 'a.json'} describes "),
    ]:
        assert export.main(["--workdir", workdir, *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "a.json").read_text() == a_json and not (tmp_path / "a.npz").exists()
    assert export.main(["--workdir", workdir, "--out", str(tmp_path / "a.safetensors")]) == 0
    assert not (tmp_path / "c.npz").exists() and not (tmp_path / "d.bin").exists()
