"""vit-predict and vit-export on a tiny trained run: output, preprocessing, round trip; the
inference commands' line for a forward pass that does not fit in device memory."""

import json
import os
import sys

import jax
import ml_collections
import numpy as np
import pytest
from helpers import (
    parse_predictions,
    random_params,
    run_limited,
    small_local_config,
)
from PIL import Image

from vit_jax import checkpoint, data, export, predict
from vit_jax.data.embedded import load_digits_arrays
from vit_jax.models import build_model, create_model, scale_images
from vit_jax.train import train_and_evaluate

# One worker runs the module, so its shared runs below are made once, not once per worker.
pytestmark = pytest.mark.xdist_group("cli")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 12-step digits run whose evaluation centre-crops (not plain resize)."""
    root = tmp_path_factory.mktemp("cli")
    config = small_local_config(root, eval_every=12)
    config.pp.eval_crop_fraction = 0.75
    workdir = str(root / "run")
    train_and_evaluate(config, workdir)
    return workdir, config


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Digits as non-square grayscale PNGs and RGB JPEGs in `test/<class>/` folders."""
    root = tmp_path_factory.mktemp("images")
    pixels, labels = load_digits_arrays()
    for i in range(6):
        folder = root / "test" / str(labels[i])
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(pixels[i]).resize((12, 9) if i % 2 else (9, 14))
        if i % 3 == 2:
            image.convert("RGB").save(folder / f"{i}.jpg", quality=95)
        else:
            image.save(folder / f"{i}.png")
    (root / "test" / "notes.txt").write_text("not an image, not listed")
    return root


def softmax_of_eval_pipeline(config, folder, params) -> dict[str, np.ndarray]:
    """Class probabilities of the folder's images as `vit-train` evaluation feeds them."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.dataset, config.eval_split = f"folder:{folder}", "test"
    source = data.pipeline.open_source(config.dataset, None)
    paths = [record["image"].decode() for record in source.records("test").as_numpy_iterator()]
    model = build_model(config.model, num_classes=10)
    batch = next(data.eval_batches(config, share_index=0, share_count=1))
    images = scale_images(batch["image"])
    probs = jax.nn.softmax(model.apply({"params": params}, images, train=False))
    return dict(zip(paths, np.asarray(probs), strict=False))


@pytest.mark.slow
def test_predict_matches_evaluation_and_orders_top_k(run, images, capsys):
    workdir, config = run
    folder = str(images)
    assert predict.main(["--checkpoint", workdir, "--top_k", "3", folder]) == 0
    printed = parse_predictions(capsys.readouterr().out)

    expected = softmax_of_eval_pipeline(config, folder, checkpoint.load_params(workdir))
    assert sorted(printed) == sorted(expected) and len(printed) == 6
    assert list(printed) == sorted(printed)  # Folders are walked in sorted order.
    for path, top in printed.items():
        probs = [p for p, _ in top]
        assert len(top) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1.0
        best = np.argsort(-expected[path], kind="stable")[:3]
        assert [label for _, label in top] == [str(i) for i in best]
        np.testing.assert_allclose(probs, expected[path][best], atol=1e-4)


def test_predict_preprocessing_is_the_evaluation_pipeline(run, images):
    _, config = run
    config = ml_collections.ConfigDict(config.to_dict())
    config.dataset, config.eval_split = f"folder:{images}", "test"
    source = data.pipeline.open_source(config.dataset, None)
    records = list(source.records("test").as_numpy_iterator())
    expected = next(data.eval_batches(config, share_index=0, share_count=1))["image"]
    assert len(records) == 6
    for record, image in zip(records, expected, strict=False):
        path = record["image"].decode()
        np.testing.assert_array_equal(predict.load_image(path, config.image_size, 0.75), image)


def test_predict_reports_unreadable_files_and_goes_on(run, images, tmp_path, capsys):
    workdir, _ = run
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    good = str(images / "test" / "0" / "0.png")
    missing = str(tmp_path / "missing.jpg")
    args = ["--checkpoint", workdir, "--top_k", "20"]
    assert predict.main([*args, str(broken), good, missing]) == 0
    out, err = capsys.readouterr()
    printed = parse_predictions(out)
    assert list(printed) == [good] and len(printed[good]) == 10  # top_k capped at 10.
    assert f"cannot read {broken}" in err and f"cannot read {missing}" in err
    assert "function_node" not in err  # TensorFlow's op names are stripped.

    assert predict.main([*args, str(broken)]) == 1
    assert "no image could be classified" in capsys.readouterr().err


# Forward passes of the tiny model too large for 12 GiB: 128 images at 256 px (4,097 tokens)
# need 17 GB of attention weights, one at 1024 px (65,537 tokens) 34 GB.
BATCH = ["--image_size", "256", "--batch_size", "128"]
DIGITS = ["--dataset", "digits", "--data_dir", "{tfds}"]
TOO_LARGE = {
    "predict": ("vit_jax.predict:main", [*BATCH, "{test}"], "a smaller --batch_size (now 128)"),
    "fewshot": (
        "vit_jax.insight.cli:fewshot_main",
        [*BATCH, *DIGITS, "--shots", "1"],
        "a smaller --batch_size (now 128)",
    ),
    "distance": (
        "vit_jax.insight.cli:visualize_main",
        ["distance", *BATCH, *DIGITS, "--num_images", "128", "--out", "{tmp}/d.png"],
        "a smaller --batch_size (now 128)",
    ),
    "rollout": (
        "vit_jax.insight.cli:visualize_main",
        ["rollout", "--image_size", "1024", "{test}/0", "--out", "{tmp}/r.png"],
        "fewer images (--num_images, now 6, or fewer files named)",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", TOO_LARGE)
def test_a_forward_pass_the_device_memory_cannot_hold_ends_in_one_line_naming_the_lever(
    run, images, tmp_path, case
):
    """Beyond 12 GiB of address space (RLIMIT_AS fails XLA's CPU allocation with the
    RESOURCE_EXHAUSTED a GPU gives), status 1 and one line. Before: a traceback."""
    workdir, config = run
    entry, args, lever = TOO_LARGE[case]
    module, function = entry.split(":")
    where = {"test": images / "test", "tfds": config.data_dir, "tmp": tmp_path}
    command = [
        sys.executable, "-c", f"import sys, {module} as m; sys.exit(m.{function}())",
        *[arg.format(**where) for arg in args], "--checkpoint", workdir,
    ]  # fmt: skip
    limited = run_limited(12 * 2**30, "RLIMIT_AS", command, devices=1)
    assert limited.returncode == 1, limited.stderr[-3000:]
    assert "Traceback" not in limited.stderr, limited.stderr[-3000:]
    (line,) = [x for x in limited.stderr.splitlines() if "does not fit" in x]
    prog = "vit-" + ("visualize" if entry.endswith("visualize_main") else case)
    assert line.startswith(
        f"{prog}: the forward pass does not fit in device memory (RESOURCE_EXHAUSTED: "
    ), line
    assert line.endswith(f"To fit: {lever}."), line


def test_predict_finds_each_image_of_a_folder_once_in_order(tmp_path):
    """A link back up the tree used to print its images again, 41 times over."""
    pixels = np.zeros((4, 4), np.uint8)
    for name in ("b.png", "a.JPG", "sub/c.jpeg", "sub/deeper/d.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(tmp_path / name, format="PNG")
    (tmp_path / "notes.txt").write_text("")
    os.symlink(tmp_path, tmp_path / "sub" / "up")
    found = [os.path.relpath(p, tmp_path) for p in predict.find_images([str(tmp_path)])]
    assert found == ["a.JPG", "b.png", "sub/c.jpeg", "sub/deeper/d.png"]


def test_export_to_gs_and_back(run, cloud_storage, capsys):
    """vit-export writes to Cloud Storage, and a gs:// export loads back (epath's mock of
    it); a folder there is refused as a local one is (it was written over as a file)."""
    workdir, _ = run
    (cloud_storage / "bucket" / "exports").mkdir(parents=True)
    assert export.main(["--workdir", workdir, "--out", "gs://bucket/exports"]) == 2
    assert capsys.readouterr().err == (
        "vit-export: --out gs://bucket/exports is a directory: name the file, e.g. "
        "gs://bucket/exports/model.npz.\n"
    )
    assert export.main(["--workdir", workdir, "--out", "gs://bucket/exports/run.npz"]) == 0
    assert (cloud_storage / "bucket" / "exports" / "run.json").exists()
    params = checkpoint.load_params(workdir)
    loaded = checkpoint.load_pretrained("gs://bucket/exports/run.npz", init_params=params)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_export_round_trip(run, images, tmp_path, capsys):
    workdir, config = run
    out = tmp_path / "exported" / "run.npz"
    assert export.main(["--workdir", workdir, "--out", str(out)]) == 0
    params = checkpoint.load_params(workdir)
    loaded = checkpoint.load_pretrained(out, init_params=params)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
    model = build_model(config.model, num_classes=10)
    x = np.random.default_rng(0).uniform(-1, 1, (4, 8, 8, 3)).astype(np.float32)
    np.testing.assert_array_equal(
        model.apply({"params": loaded}, x, train=False),
        model.apply({"params": params}, x, train=False),
    )
    description = json.loads(out.with_suffix(".json").read_text())
    assert description == checkpoint.load_metadata(workdir) | {
        "eval_crop_fraction": 0.75,
        "loss": "softmax_xent",
    }

    # The .npz and its description predict exactly what the workdir predicts.
    capsys.readouterr()
    folder = str(images)
    predict.main(["--checkpoint", workdir, folder])
    from_workdir = capsys.readouterr().out
    predict.main(["--checkpoint", str(out), folder])
    assert capsys.readouterr().out == from_workdir

    # Trained in float16 with cuDNN attention (on a GPU), it predicts on this CPU in float32
    # with XLA's attention: parameters are float32 whatever the compute dtype.
    description["model"] |= {"dtype": "float16", "attention_impl": "cudnn"}
    out.with_suffix(".json").write_text(json.dumps(description))
    assert predict.main(["--checkpoint", str(out), folder]) == 0
    assert capsys.readouterr().out == from_workdir


@pytest.mark.slow
@pytest.mark.parametrize(
    "options",
    [
        dict(representation_size=16),  # An i21k-style file: a representation layer.
        dict(width=32, depth=2, mlp_dim=64, num_heads=2),  # No named size.
    ],
)
def test_bare_npz_is_described_by_its_weights(options, images, tmp_path, capsys):
    """A published file: no flags, nothing silently dropped, whatever its size."""
    model = create_model("Ti/8", num_classes=3, **options)
    params = random_params(model, image_shape=(8, 8))
    path = str(tmp_path / "bare.npz")
    checkpoint.save_npz(params, path)
    image = str(images / "test" / "1" / "1.png")

    assert predict.main(["--checkpoint", path, image]) == 0
    top = parse_predictions(capsys.readouterr().out)[image]
    pixels = scale_images(predict.load_image(image, 8, 1.0)[None])
    logits = model.apply({"params": params}, pixels, train=False)
    expected = np.asarray(jax.nn.softmax(logits))[0]
    assert [label for _, label in top] == [str(i) for i in np.argsort(-expected)]
    np.testing.assert_allclose([p for p, _ in top], np.sort(expected)[::-1], atol=1e-4)

    # Another class count would reset the head: every image would get 1/5 per class.
    assert predict.main(["--checkpoint", path, "--num_classes", "5", image]) == 2
    assert "all zeros" in capsys.readouterr().err
