"""Fine-tuning the main job's own model on one's own images, as the README's second journey.

The fine-tune recipe at its local size (`local=true`) starts from the main job's workdir or
from what vit-export made of it, and builds the model the checkpoint holds, whatever
model the recipe names: the architecture comes from the checkpoint.
"""

import json
import logging
import os

import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from helpers import load_recipe, make_folder, small_local_config

from vit_jax import checkpoint, export
from vit_jax.checkpoint.posemb import resample_posemb
from vit_jax.train import train_and_evaluate

# The main job's architecture at test size (helpers.TINY): not a named size.
ARCHITECTURE = dict(name="Ti/4", width=32, depth=1, mlp_dim=64, num_heads=2)
FINETUNE_STEPS = 3
POSEMB = "Transformer/posembed_input/pos_embedding"
# One worker runs the module, so its main job below is trained once, not once per worker.
pytestmark = pytest.mark.xdist_group("finetune_main_model")


@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
    """A finished main-job workdir (the local recipe, shrunk to seconds)."""
    root = tmp_path_factory.mktemp("main_job")
    workdir = str(root / "run")
    train_and_evaluate(small_local_config(root, total_steps=6), workdir)
    return workdir


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """An image folder of one's own: two classes, train and test splits."""
    root = tmp_path_factory.mktemp("images")
    make_folder(root, {"train": {"cat": 6, "dog": 6}, "test": {"cat": 3, "dog": 3}})
    return f"folder:{root}"


def _source(main_job, kind, tmp_path):
    """The main job's model as fine-tuning is given it: its workdir, or an export of it."""
    if kind == "workdir":
        return main_job
    out = tmp_path / ("model.safetensors" if kind == "safetensors" else "model.npz")
    file_format = "timm_safetensors" if kind == "safetensors" else "npz"
    assert export.main(["--workdir", main_job, "--out", str(out), "--format", file_format]) == 0
    if kind == "bare npz":
        os.remove(checkpoint.description_path(out))
    return str(out)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["workdir", "npz", "safetensors", "bare npz"])
def test_finetune_recipe_fine_tunes_the_main_jobs_model_on_an_image_folder(
    main_job, images, kind, tmp_path
):
    source = _source(main_job, kind, tmp_path)
    config = load_recipe(
        "finetune.py", f"dataset={images},model_init={source},local=true,steps={FINETUNE_STEPS}"
    )
    assert config.model.name == "Ti/7"  # What the recipe names; the checkpoint overrides it.
    # Learning rate 0: the run's parameters stay those it started from, so the test can
    # compare them with the main job's (the README's journey shows what it learns).
    config.optim.lr = 0.0
    workdir = tmp_path / "finetuned"
    final = train_and_evaluate(config, str(workdir))

    assert 0.0 <= final["eval/top1"] <= 1.0
    saved = checkpoint.load_metadata(str(workdir))
    model = {key: saved["model"][key] for key in ("patch_size", *ARCHITECTURE)}
    if kind == "bare npz":  # No file names the model: the recipe's name, sizes from weights.
        assert model == ARCHITECTURE | {"name": "Ti/7", "patch_size": 4}
    else:
        assert model == ARCHITECTURE | {"patch_size": None}
    assert config.model.width is None  # The config given is left as it was.

    # Every pretrained parameter was loaded; the position embedding resampled from the
    # main job's 2x2 grid (8 px) to the 7x7 grid of 28 px; the head a zero one of 2 classes,
    # as the paper's fine-tuning starts.
    pretrained = flatten_dict(checkpoint.load_params(main_job), sep="/")
    tuned = flatten_dict(checkpoint.load_params(str(workdir)), sep="/")
    assert tuned.keys() == pretrained.keys()
    posemb = pretrained.pop(POSEMB)
    np.testing.assert_allclose(
        tuned.pop(POSEMB), resample_posemb(posemb, (7, 7), num_prefix=1), rtol=1e-6, atol=1e-7
    )
    assert not np.any(tuned.pop("head/kernel")) and tuned.pop("head/bias").shape == (2,)
    for key in pretrained.keys() - {"head/kernel", "head/bias"}:
        np.testing.assert_array_equal(tuned[key], pretrained[key], err_msg=key)


def test_describe_tells_the_main_jobs_whole_architecture(main_job):
    """Enough to build the model again: the sizes besides the name they differ from."""
    model = checkpoint.describe_checkpoint(main_job).model
    assert {key: model[key] for key in ("patch_size", *ARCHITECTURE)} == ARCHITECTURE | {
        "patch_size": 4
    }


def test_size_overrides_are_config_fields_the_checkpoint_settles(main_job, images):
    """`--config.model.width=32`-style overrides exist in every recipe; one the checkpoint
    agrees with is kept, one it contradicts changed to the checkpoint's."""
    config = load_recipe("finetune.py", f"dataset={images},model_init={main_job},local=true")
    config.update_from_flattened_dict({"model.width": 32, "model.depth": 5})
    changes = checkpoint.model_init_changes(config.model, main_job)
    assert changes == dict(name="Ti/4", depth=1, mlp_dim=64, num_heads=2)


@pytest.mark.parametrize(
    "problem, error, message",
    [
        # A model the checkpoint cannot fill: a representation layer it lacks.
        ("representation", ValueError, "missing from the checkpoint: pre_logits/bias"),
        ("missing", FileNotFoundError, "No checkpoint at .*: expected a vit_jax workdir"),
    ],
)
def test_a_failed_start_leaves_no_workdir(main_job, images, tmp_path, problem, error, message):
    """A start refused for its model_init writes nothing."""
    source = main_job if problem == "representation" else str(tmp_path / "no_such_run")
    config = load_recipe("finetune.py", f"dataset={images},model_init={source},local=true")
    if problem == "representation":
        config.model.representation_size = 16
    workdir = tmp_path / "finetuned"
    with pytest.raises(error, match=message):
        train_and_evaluate(config, str(workdir))
    assert not workdir.exists()


@pytest.mark.slow
def test_a_fine_tuning_run_resumes_under_the_config_it_was_given(main_job, images, tmp_path):
    """The architecture taken from model_init is taken again on restart: the resume check
    sees the run's own config, and the model keeps its shapes."""
    config = load_recipe(
        "finetune.py", f"dataset={images},model_init={main_job},local=true,steps=2"
    )
    workdir = str(tmp_path / "finetuned")
    first = train_and_evaluate(config, workdir)
    assert train_and_evaluate(config, workdir) == first  # A finished run: evaluated again.


@pytest.mark.slow
def test_a_workdir_from_before_the_size_fields_resumes(tmp_path):
    """Older code saved no `model.patch_size`: a field left None is no change."""
    workdir = tmp_path / "run"
    config = small_local_config(tmp_path, total_steps=4)
    train_and_evaluate(config, str(workdir))
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["model"].pop("patch_size") is None
    (workdir / "config.json").write_text(json.dumps(saved))
    train_and_evaluate(config, str(workdir))  # No ConfigChangedError.


@pytest.mark.slow
def test_a_fine_tuning_run_resumes_without_reading_its_model_init_again(
    main_job, images, tmp_path, caplog
):
    """A restart resumes from the run's own checkpoints with the architecture it saved and
    never reads the pretrained file again (before: read on every restart, on every host),
    so it resumes when the file is unreadable or gone (a preempted VM's local disk).
    Without a checkpoint to resume, its absence is still an error, before anything is
    written."""
    caplog.set_level(logging.INFO, logger="vit_jax.train")
    source = _source(main_job, "npz", tmp_path)
    recipe = f"dataset={images},model_init={source},local=true"
    workdir = str(tmp_path / "finetuned")
    first = train_and_evaluate(load_recipe("finetune.py", f"{recipe},steps=2"), workdir)
    with open(source, "wb") as f:  # Before: ValueError, a file in no layout read_weights reads.
        f.write(b"not an npz")
    config = load_recipe("finetune.py", f"{recipe},steps=3")
    config.allow_config_change = "total_steps"
    train_and_evaluate(config, workdir)
    assert (
        f"Resuming {workdir} from its checkpoints, with the architecture it saved: " in caplog.text
    )
    os.remove(source)
    config = load_recipe("finetune.py", f"{recipe},steps=4")
    config.allow_config_change = "total_steps"
    final = train_and_evaluate(config, workdir)
    assert checkpoint.load_metadata(workdir)["model"]["width"] == ARCHITECTURE["width"]
    assert final.keys() == first.keys() and (tmp_path / "finetuned/checkpoints/4").is_dir()
    with pytest.raises(FileNotFoundError, match="No checkpoint at .*model.npz"):
        train_and_evaluate(config, str(tmp_path / "fresh"))
    assert not (tmp_path / "fresh").exists()
