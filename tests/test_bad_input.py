"""Mistakes a user can make, each refused with an error that says what to do, and leaving
no trace: one table, one row per mistake.

Elsewhere: a second run in a locked workdir and changed trajectory fields
(test_fault_workdir.py), half-written metrics lines and replayed TensorBoard steps
(test_fault_workdir.py), damaged checkpoints (test_fault.py).
"""

import contextlib
import functools
import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
from helpers import data_config, load_recipe, make_folder, small_local_config

from vit_jax import data, export, predict
from vit_jax.parallel import make_mesh
from vit_jax.train import train_and_evaluate
from vit_jax.trainer import Trainer


class Case(NamedTuple):
    action: Callable[[Path], object]
    error: type[Exception]
    message: str  # A regular expression the error's message must match.
    setup: Callable[[Path], None] | None = None  # Before the workdir snapshot.


class CommandFailed(Exception):
    """A command-line entry point returned non-zero; the message is its stderr."""


def _command(main, *argv: str) -> None:
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            status = main(list(argv))
        except SystemExit as e:  # argparse errors.
            status = e.code
    if status:
        raise CommandFailed(f"status {status}: {stderr.getvalue()}")


def _train(tmp_path, **changes) -> None:
    train_and_evaluate(small_local_config(tmp_path, **changes), str(tmp_path / "run"))


def _train_flat(tmp_path, **flat_changes) -> None:
    config = small_local_config(tmp_path)
    config.update_from_flattened_dict(flat_changes)
    train_and_evaluate(config, str(tmp_path / "run"))


def _trainer(tmp_path, **flat_changes) -> None:
    config = small_local_config(tmp_path)
    config.update_from_flattened_dict(flat_changes)
    Trainer(config, make_mesh(config.mesh, config.dcn_mesh), num_classes=10, total_steps=12)


def _prepared_digits(tmp_path) -> None:
    data.get_dataset_info("digits", str(tmp_path / "tfds"))


def _numeric_folders(tmp_path) -> None:
    for name in ("0", "1", "7"):  # e.g. class folders of an image dataset.
        os.makedirs(tmp_path / "images" / name)


def _prepare_digits(tmp_path) -> None:
    data.get_dataset_info("digits", small_local_config(tmp_path).data_dir)


CASES = {
    # Step intervals and counts.
    **{
        f"{field}=0": Case(
            functools.partial(_train, **{field: 0}),
            ValueError,
            rf"config\.{field}=0: must be a whole number >= 1",
        )
        for field in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints")
    },
    "fewshot.every=0 with a probe on": Case(
        lambda p: _train(
            p, fewshot={"every": 0, "datasets": {"digits": ("digits", "train", "test")}}
        ),
        ValueError,
        r"config\.fewshot\.every=0: must be a whole number >= 1",
    ),
    "few-shot train split too small for the shots": Case(
        lambda p: _train(
            p,
            fewshot={"shots": (10,), "datasets": {"digits": ("digits", "train[:60]", "test")}},
        ),
        ValueError,
        r"fewer than 15 images of classes \[.*\] but needs 15 of every class \(largest shot "
        r"count 10 plus holdout_per_class 5\)",
        setup=_prepare_digits,  # Its preparation writes files; the refusal must write none.
    ),
    **{
        f"few-shot {which} split the dataset lacks (a traceback from tfds)": Case(
            lambda p, splits=splits: _train(
                p, fewshot={"datasets": {"digits": ("digits", *splits)}}
            ),
            ValueError,
            r"^Cannot read split 'nosuch' of tfds dataset 'digits': Unknown split 'nosuch'",
            setup=_prepare_digits,
        )
        for which, splits in [("train", ("nosuch", "test")), ("test", ("train", "nosuch"))]
    },
    # Commands.
    "vit-predict --batch_size 0": Case(
        lambda p: _command(predict.main, "--checkpoint", str(p), "--batch_size", "0", "a.png"),
        CommandFailed,
        r"(?s)status 2: .*argument --batch_size: 0 is not a positive integer",
    ),
    "vit-export --workdir typo": Case(
        lambda p: _command(export.main, "--workdir", str(p / "typo"), "--out", str(p / "o.npz")),
        CommandFailed,
        r"status 2: vit-export: '.*/typo' is not a directory: expected a vit_jax workdir",
    ),
    "vit-export of numeric non-checkpoint folders": Case(
        lambda p: _command(export.main, "--workdir", str(p / "images"), "--out", str(p / "o.npz")),
        CommandFailed,
        r"No checkpoint found in '.*/images' \(its numeric folders \[0, 1, 7\] hold no 'state'\)",
        setup=_numeric_folders,
    ),
    # Parallelism.
    "mesh larger than the devices": Case(
        lambda p: _trainer(p, **{"mesh.data": 16}),
        ValueError,
        r"config.mesh .* needs 16 devices per slice or node but there are 8",
    ),
    "mesh axes not dividing the devices": Case(
        lambda p: _trainer(p, **{"mesh.data": -1, "mesh.fsdp": 3}),
        ValueError,
        r"8 devices per slice or node cannot be split into axes of sizes \[3, 1\]",
    ),
    "batch not divisible by the devices": Case(
        lambda p: _trainer(p, batch_size=36),
        ValueError,
        r"config.batch_size=36 is not a positive multiple of the 8 batch shards.*choose a "
        r"multiple of 8 \(e.g. 32 or 40\)",
    ),
    "cuDNN attention on a CPU": Case(
        lambda p: _trainer(p, **{"model.attention_impl": "cudnn", "model.dtype": "bfloat16"}),
        ValueError,
        r"model.attention_impl='cudnn' is cuDNN's fused attention, which runs on NVIDIA GPUs "
        r"only; on a CPU use XLA's",
    ),
    "batch of no images": Case(
        lambda p: _trainer(p, batch_size=0),
        ValueError,
        r"config.batch_size=0 is not a positive multiple of the 8 batch shards.*\(e.g. 8\)",
    ),
    "eval batch not divisible by the devices": Case(
        lambda p: _trainer(p, eval_batch_size=20),
        ValueError,
        r"config.eval_batch_size=20 is not a positive multiple of the 8 batch shards",
    ),
    "batch not divisible by accum_steps": Case(
        lambda p: _trainer(p, accum_steps=3),
        ValueError,
        r"batch_size 32 must be divisible by accum_steps \(3\)",
    ),
    "micro-batch smaller than the devices": Case(
        lambda p: _trainer(p, accum_steps=8),
        ValueError,
        r"config.batch_size/accum_steps=4 is not a positive multiple of the 8 batch shards",
    ),
    # Recipes and model options.
    "unknown recipe argument": Case(
        lambda p: load_recipe("local.py", "stepz=3"),
        ValueError,
        r"Bad recipe argument 'stepz=3': expected key=value with key in \['batch', 'dataset'",
    ),
    "recipe argument of the wrong type": Case(
        lambda p: load_recipe("local.py", "steps=many"),
        ValueError,
        r"steps='many': expected an integer",
    ),
    "stochastic_depth=1 (always NaN)": Case(
        lambda p: _trainer(p, **{"model.stochastic_depth": 1.0}),
        ValueError,
        r"stochastic_depth=1.0: must be in \[0, 1\)",
    ),
    "dropout above 1 (trained on zeros)": Case(
        lambda p: _trainer(p, **{"model.dropout": 1.5}),
        ValueError,
        r"^dropout=1.5: must be in \[0, 1\), the fraction dropped",
    ),
    "negative attention dropout": Case(
        lambda p: _trainer(p, **{"model.attention_dropout": -0.1}),
        ValueError,
        r"^attention_dropout=-0.1: must be in \[0, 1\)",
    ),
    "no accumulation step (ZeroDivisionError)": Case(
        lambda p: _trainer(p, accum_steps=0),
        ValueError,
        r"^accum_steps=0 must be at least 1",
    ),
    "negative learning rate (trained uphill)": Case(
        lambda p: _trainer(p, **{"optim.lr": -0.001}),
        ValueError,
        r"^optim.lr=-0.001 must be >= 0",
    ),
    "negative clipping norm": Case(
        lambda p: _trainer(p, **{"optim.grad_clip_norm": -1.0}),
        ValueError,
        r"^optim.grad_clip_norm=-1.0 must be >= 0",
    ),
    "Adam's b2 of 1": Case(
        lambda p: _trainer(p, **{"optim.b2": 1.0}),
        ValueError,
        r"^optim.b2=1.0 must be in \[0, 1\)",
    ),
    "label smoothing above 1": Case(
        lambda p: _trainer(p, label_smoothing=2.0),
        ValueError,
        r"^config.label_smoothing must be in \[0, 1\) \(0 = off\), got 2.0",
    ),
    "zero width (traceback)": Case(
        lambda p: _trainer(p, **{"model.width": 0}),
        ValueError,
        r"^width=0 must be at least 1",
    ),
    "run of negative length": Case(
        lambda p: _train_flat(p, total_steps=-5),
        ValueError,
        r"^config.total_steps=-5 must be >= 1",  # Was a message about the warmup.
    ),
    "few-shot subset of no example per class (after the workdir was made)": Case(
        lambda p: _train_flat(p, train_examples_per_class=0),
        ValueError,
        r"^config.train_examples_per_class=0 must be >= 1",
    ),
    "compilation cache in a file (JAX warned at each compile and ran without)": Case(
        lambda p: _train_flat(p, compilation_cache_dir=__file__),
        ValueError,
        r"^config.compilation_cache_dir='.*' is a file: name a directory, 'workdir'",
    ),
    "workdir inside the image folder (its files became a split at the next start)": Case(
        lambda p: train_and_evaluate(
            small_local_config(p, dataset=f"folder:{p / 'images'}"), str(p / "images" / "run")
        ),
        ValueError,
        r"The workdir .*/images/run is inside the image folder .*/images: its files would be",
    ),
    "unknown transfer guard (traceback)": Case(
        lambda p: _train_flat(p, transfer_guard="strict"),
        ValueError,
        r"^config.transfer_guard='strict': choose one of \('allow', 'log', 'disallow'",
    ),
    "frozen parameters by a pattern that is no regular expression": Case(
        lambda p: _trainer(p, **{"optim.frozen": "Transformer/(encoderblock"}),
        ValueError,
        r"^optim.frozen='Transformer/\(encoderblock' is not a regular expression: missing \)",
    ),
    "zero-wide pre-logits": Case(
        lambda p: _trainer(p, **{"model.representation_size": 0}),
        ValueError,
        r"^representation_size=0 must be at least 1, or None",
    ),
    "a text file as the checkpoint to start from (NumPy's pickle message)": Case(
        lambda p: _train(p, model_init=str(p / "weights.txt")),
        ValueError,
        r"weights.txt is not an .npz archive: a checkpoint is an .npz or .safetensors file",
        setup=lambda p: (p / "weights.txt").write_text("see the README"),
    ),
    # The dataset is prepared before: the workdir is what must stay untouched.
    "unknown train split (tfds traceback)": Case(
        lambda p: _train(p, train_split="training"),
        ValueError,
        r"^Cannot read split 'training' of tfds dataset 'digits': Unknown split 'training'",
        setup=_prepared_digits,
    ),
    "unknown eval split (was refused at the first evaluation, in a workdir made)": Case(
        lambda p: _train(p, eval_split="validation"),
        ValueError,
        r"^Cannot read split 'validation' of tfds dataset 'digits': Unknown split .* Name one "
        r"of its splits with --config.train_split or --config.eval_split",
        setup=_prepared_digits,
    ),
    # Preprocessing, refused before the data is prepared or the workdir made.
    "negative shift (TensorFlow traceback)": Case(
        lambda p: _train_flat(p, **{"pp.shift_pixels": -1}),
        ValueError,
        r"^config.pp.shift_pixels must be >= 0, got -1",
    ),
    "inception crop area above 1": Case(
        lambda p: _train_flat(p, **{"pp.train_crop": "inception", "pp.crop_area_min": 2.0}),
        ValueError,
        r"^config.pp.crop_area_min must be in \(0, 1\], the smallest fraction",
    ),
    "unknown train crop": Case(
        lambda p: _train_flat(p, **{"pp.train_crop": "center"}),
        ValueError,
        r"^config.pp.train_crop='center'; expected one of",
    ),
    "unknown loss, refused before the first step": Case(
        lambda p: _trainer(p, loss="ce"),
        ValueError,
        r"^loss='ce': choose one of \('softmax_xent', 'sigmoid_xent'\)",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_a_clear_error_and_leaves_no_trace(tmp_path, case):
    action, error, message, setup = CASES[case]
    if setup:
        setup(tmp_path)
    before = sorted(os.walk(tmp_path))
    with pytest.raises(error, match=message):
        action(tmp_path)
    assert sorted(os.walk(tmp_path)) == before  # e.g. `vit-export --workdir typo` made no dir.


def test_folder_files_that_are_no_images_are_skipped_and_reported(tmp_path, caplog):
    make_folder(tmp_path, {"train": {"cat": 3, "dog": 2}, "test": {"cat": 1, "dog": 1}})
    (tmp_path / "train" / "cat" / "empty.jpg").write_bytes(b"")
    (tmp_path / "train" / "dog" / "page.png").write_text("<html>Not found</html>")
    dataset = f"folder:{tmp_path}"
    with caplog.at_level("WARNING", logger="vit_jax"):
        info = data.get_dataset_info(dataset, None)
    assert info.split_sizes == {"train": 5, "test": 2}  # The images, all of them.
    assert "Skipping 2 file(s)" in caplog.text
    assert "cat/empty.jpg (empty file)" in caplog.text
    assert "dog/page.png (not a JPEG or PNG file)" in caplog.text
    # The rest decode: the whole split passes through the pipeline.
    config = data_config(None, dataset=dataset, eval_split="train", image_size=7, eval_batch_size=4)
    batches = list(data.eval_batches(config, share_index=0, share_count=1))
    assert sum(int(b["mask"].sum()) for b in batches) == 5


def test_folder_file_that_cannot_be_read_stops_the_opening_with_its_name(tmp_path):
    """A read error is not skipped: on another process the same file may read fine."""
    make_folder(tmp_path, {"train": {"cat": 2, "dog": 2}})
    broken = tmp_path / "train" / "dog" / "moved.jpg"
    broken.symlink_to(tmp_path / "elsewhere.jpg")  # Listed, but opening it fails.
    with pytest.raises(OSError, match=f"Cannot read {broken} .*fix or remove the file"):
        data.get_dataset_info(f"folder:{tmp_path}", None)
