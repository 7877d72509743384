"""Every command's --help (its own flags with their defaults, status 0, nothing heavy imported)
and user errors (one line on stderr, status 2, no traceback), as real processes."""

import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
from helpers import COMMAND_PROBE, REPO, free_port

from vit_jax import cli, export

# Command line -> what its help must list: (flag or subcommand, default shown with it).
HELP = {
    "vit-train": [
        ("--config.KEY=VALUE", None),
        ("--workdir", None),
        ("--heartbeat_timeout", "100"),
        ("--initialization_timeout", "300"),
    ],
    "vit-predict": [("--checkpoint", None), ("--top_k", "5"), ("--batch_size", "32")],
    "vit-export": [("--workdir", None), ("--out", None), ("timm_safetensors", None)],
    "vit-fewshot": [("--dataset", None), ("--shots", "1,5,10,25"), ("--holdout_per_class", "5")],
    "vit-visualize": [(figure, None) for figure in ("rollout", "posemb", "distance", "filters")],
    "vit-visualize distance": [("--num_images", "128"), ("--batch_size", "32"), ("--out", None)],
    "vit-bench": [(mode, None) for mode in ("train", "infer", "input", "photos", "compile")]
    + [("--steps", "10"), ("--count", "1000")],
}


def script(name: str) -> str:
    return os.path.join(os.path.dirname(sys.executable), name)


@pytest.mark.parametrize("command", HELP)
def test_help_lists_the_command_s_own_flags_with_defaults_and_imports_nothing_heavy(command):
    name, *subcommand = command.split()
    result = subprocess.run(
        [sys.executable, "-c", COMMAND_PROBE, name, *subcommand, "--help"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    report = json.loads(result.stderr.strip().splitlines()[-1])
    assert report == {"status": 0, "heavy": []}, result.stderr
    text = result.stdout
    for flag, default in HELP[command]:
        assert flag in text, (flag, text)
        if default is not None:  # On the flag's own entry, before the next flag.
            entry = text[text.index(f"\n  {flag}") + 1 :].split("\n  -", 1)[0]
            assert f"(default: {default})" in entry, (flag, entry)
    assert "absl" not in text and "--helpfull" not in text  # Only the command's own flags.


def ours(stderr: str) -> list[str]:
    """stderr without native libraries' log lines (a CUDA plugin on a machine with no GPU)."""
    native = r"^([IWEF]\d{4} |WARNING: All log messages before absl::InitializeLog)"
    return [line for line in stderr.splitlines() if line.strip() and not re.match(native, line)]


RECIPE = f"{REPO}/configs/local.py"
TRAIN = ("vit-train", "--config", RECIPE, "--workdir", "{tmp}/run")
FINETUNE = f"{REPO}/configs/finetune.py:dataset=digits,local=true"
# A command line with one mistake ({tmp}: the test's directory, its working directory) -> what
# the one line on stderr must say.
USER_ERRORS = {
    "config key typo": (
        (*TRAIN, "--config.optim.lrr=1"),
        "--config.optim.lrr: the recipe has no field 'lrr'. Did you mean \"lr\"",
    ),
    "bad config value": ((*TRAIN, "--config.optim.lr=fast"), "--config.optim.lr=fast"),
    "bad recipe argument": (
        ("vit-train", "--config", f"{RECIPE}:stepz=3", "--workdir", "w"),
        "Bad recipe argument 'stepz=3'",
    ),
    "missing recipe": (
        ("vit-train", "--config", "configs/nope.py", "--workdir", "w"),
        "--config: cannot load the recipe: [Errno 2] No such file or directory",
    ),
    "missing recipe with an override": (
        ("vit-train", "--config", "configs/nope.py", "--workdir", "w", "--config.seed=1"),
        "--config: cannot load the recipe: [Errno 2] No such file or directory",
    ),
    "workdir is a file": (
        ("vit-train", "--config", RECIPE, "--workdir", "a_file"),
        "--workdir {tmp}/a_file is a file",
    ),
    "workdir under a file": (
        ("vit-train", "--config", RECIPE, "--workdir", "a_file/run"),
        "--workdir {tmp}/a_file/run lies under {tmp}/a_file, a file: name a new or existing",
    ),
    "bench trace under a file": (
        ("vit-bench", "train", "--config", RECIPE, "--profile", "a_file/trace"),
        "--profile a_file/trace lies under a_file, a file: name a new or existing directory.",
    ),
    "mesh axis of size 0": (
        ("vit-bench", "train", "--config", RECIPE, "--config.mesh.fsdp=0"),
        "config.mesh.fsdp=0: an axis size must be a whole number >= 1, or -1",
    ),
    "unknown flag": ((*TRAIN, "--stepz=3"), "Unknown command line flag 'stepz'"),
    "None for a field that needs a value": (
        (*TRAIN, "--config.batch_size=None"),
        "--config.batch_size=None: batch_size needs a value (None is for the fields whose",
    ),
    "None for a field the recipe lacks": (
        (*TRAIN, "--config.model.representation_sise=None"),
        "--config.model.representation_sise: the recipe has no field 'representation_sise'.",
    ),
    # An unset shell variable: the run went into the current directory.
    "empty workdir": (
        ("vit-train", "--config", RECIPE, "--workdir", ""),
        "--workdir is empty: for the current directory, give '.'.",
    ),
    "export, empty workdir": (
        ("vit-export", "--workdir", "", "--out", "x.npz"),
        "argument --workdir: an empty path: for the current directory, give '.'",
    ),
    # Multi-process flags, refused before JAX loads (tracebacks, an abort, or ignored before).
    "process count without a coordinator": (
        (*TRAIN, "--num_processes", "2", "--process_id", "0"),
        "--num_processes and --process_id take effect only with --coordinator_address",
    ),
    "process id beyond the count": (
        (*TRAIN, "--coordinator_address=localhost:1", "--num_processes=2", "--process_id=2"),
        "--process_id 2 is not below --num_processes 2: processes are numbered from 0.",
    ),
    "coordinator without a port": (
        (*TRAIN, "--coordinator_address", "localhost", "--process_id", "0"),
        "--coordinator_address 'localhost': expected HOST:PORT of process 0",
    ),
    "distributed run that JAX cannot place": (
        (*TRAIN, "--distributed"),
        "jax.distributed.initialize: coordinator_address should be defined. Pass "
        "--coordinator_address, --num_processes and --process_id, or start the run where JAX",
    ),
    # Processes that do not meet: JAX aborted each after 300 s saying "another task died".
    "a coordinator nothing answers at": (
        (
            *TRAIN,
            "--coordinator_address=localhost:1",
            "--num_processes=2",
            "--process_id=1",
            "--initialization_timeout=2",
        ),
        "vit-train: Nothing answered at --coordinator_address localhost:1 within 2 s: process 0 "
        "serves the run's coordination service there once it starts.",
    ),  # fmt: skip
    "a process that never connects": (
        (
            *TRAIN,
            f"--coordinator_address=localhost:{free_port()}",
            "--num_processes=2",
            "--process_id=0",
            "--initialization_timeout=2",
        ),
        "within 2 s (--num_processes 2). Start every process, each with its own --process_id",
    ),  # fmt: skip
    "no heartbeat": ((*TRAIN, "--heartbeat_timeout", "0"), "flag --heartbeat_timeout=0: 0 is"),
    "no process": ((*TRAIN, "--num_processes", "0"), "flag --num_processes=0: 0 is not a"),
    "stray argument": ((*TRAIN, "run2"), "unexpected arguments ['run2']"),
    "predict, missing checkpoint": (
        ("vit-predict", "--checkpoint", "none", "x.png"),
        "{tmp}/none",
    ),
    "predict, bad flag value": (
        ("vit-predict", "--checkpoint", "run", "--top_k", "many", "x.png"),
        "argument --top_k: invalid int value: 'many'",
    ),
    # Counts and sizes below 1 (tracebacks, or one class printed for --top_k 0).
    **{
        f"{command} {flag} {value}": (
            (*command.split(), *rest, flag, value),
            f"argument {flag}: {value} is not a positive integer",
        )
        for command, rest in [
            ("vit-predict", ("--checkpoint", "run", "x.png")),
            ("vit-fewshot", ("--checkpoint", "run", "--dataset", "digits")),
            ("vit-visualize distance", ("--checkpoint", "run", "--out", "d.png")),
        ]
        for flag, value in [("--image_size", "-7"), ("--batch_size", "0")]
    },
    "predict, no class printed": (
        ("vit-predict", "--checkpoint", "run", "--top_k", "0", "x.png"),
        "argument --top_k: 0 is not a positive integer",
    ),
    "predict, a head of no class": (
        ("vit-predict", "--checkpoint", "run", "--num_classes", "0", "x.png"),
        "argument --num_classes: 0 is not a positive integer",
    ),
    "visualize, no filter drawn": (
        ("vit-visualize", "filters", "--checkpoint", "run", "--count", "-5", "--out", "f.png"),
        "argument --count: -5 is not a positive integer",
    ),
    "export, workdir missing": (
        ("vit-export", "--workdir", "none", "--out", "x.npz"),
        "'{tmp}/none' is not a directory: expected a vit_jax workdir",
    ),
    "export, format and extension disagree": (
        ("vit-export", "--workdir", "w", "--out", "x.npz", "--format", "timm_safetensors"),
        "--format timm_safetensors writes a .safetensors file, but --out ends in .npz",
    ),
    "fewshot, bad shots": (
        ("vit-fewshot", "--checkpoint", "w", "--dataset", "digits", "--shots", "0"),
        "--shots '0': expected positive integers",
    ),
    "fewshot, a shot count twice": (
        ("vit-fewshot", "--checkpoint", "w", "--dataset", "digits", "--shots", "1,5,1"),
        "--shots '1,5,1': expected positive integers, each once",
    ),
    "export to a directory": (
        ("vit-export", "--workdir", "w", "--out", "."),
        "--out {tmp} is a directory: name the file, e.g. {tmp}/model.npz.",
    ),
    "visualize, not a workdir": (
        ("vit-visualize", "curves", "--workdir", ".", "--out", "c.png"),
        "{tmp}",
    ),
    "visualize, a file that is no image": (
        ("vit-visualize", "curves", "--workdir", ".", "--out", "curves.txt"),
        "--out curves.txt: name an image file, e.g. figure.png; the formats are ",
    ),
    "bench, no mode": (("vit-bench", "--steps", "3"), "Usage: vit-bench {{train|"),
    "bench, no timed step": (
        ("vit-bench", "train", "--config", RECIPE, "--steps", "0"),
        "flag --steps=0: 0 is not a positive integer",
    ),
    "bench, no timed batch": (
        ("vit-bench", "input", "--config", RECIPE, "--batches", "0"),
        "flag --batches=0: 0 is not a positive integer",
    ),
    "bench, a trace into a file": (
        ("vit-bench", "train", "--config", RECIPE, "--profile", "a_file"),
        "--profile a_file is a file: name a new or existing directory.",
    ),
    "bench, photos into a file": (
        ("vit-bench", "photos", "--out", "a_file"),
        "--out a_file is a file: name a new or existing directory.",
    ),
    "bench, no peak": (
        ("vit-bench", "train", "--config", RECIPE, "--peak_tflops", "0"),
        "flag --peak_tflops=0.0: must be > 0 (TFLOP/s per device)",
    ),
    "bench, a head of no class": (
        ("vit-bench", "compile", "--target", "h100x1", "--config", RECIPE, "--num_classes", "0"),
        "flag --num_classes=0: 0 is not a positive integer",
    ),
    "bench, a head of classes no one named": (
        ("vit-bench", "train", "--config", RECIPE, "--config.dataset=folder:{tmp}/photos"),
        "Pass --num_classes: the class count of 'folder:{tmp}/photos' is not known.",
    ),
    # Paths TensorFlow's file I/O refuses (tracebacks before). No network here: a bucket's
    # host does not resolve (where it does, the bucket is not found: the path is named too).
    "train, a model_init on a file system TensorFlow lacks": (
        (*TRAIN[:2], f"{FINETUNE},model_init=s3://vit-models/ViT-B_16.npz", *TRAIN[3:]),
        "vit-train: File system scheme 's3' not implemented (file: "
        "'s3://vit-models/ViT-B_16.npz'). Check the path; on gs:// also that the bucket",
    ),
    "train, a model_init in a bucket out of reach": (
        (*TRAIN[:2], f"{FINETUNE},model_init=gs://no-such-bucket-vit/ViT-B_16.npz", *TRAIN[3:]),
        "gs://no-such-bucket-vit/ViT-B_16.npz",
    ),
    "train, a data_dir in a bucket out of reach": (
        (*TRAIN, "--config.dataset=cifar10", "--config.data_dir=gs://no-such-bucket-vit/tfds"),
        "gs://no-such-bucket-vit/tfds",
    ),
    "predict, a checkpoint on a file system TensorFlow lacks": (
        ("vit-predict", "--checkpoint", "s3://vit-models/run", "x.png"),
        "vit-predict: File system scheme 's3' not implemented",
    ),
}


# These load a model or a checkpoint library before the mistake shows: full suite only.
NEEDS_JAX = (
    "distributed run that JAX cannot place",
    "a coordinator nothing answers at",
    "a process that never connects",
    "predict, missing checkpoint",
    "visualize, not a workdir",
    "bench, a head of classes no one named",
    "train, a model_init on a file system TensorFlow lacks",
    "train, a model_init in a bucket out of reach",
    "train, a data_dir in a bucket out of reach",
    "predict, a checkpoint on a file system TensorFlow lacks",
)


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=pytest.mark.slow) if c in NEEDS_JAX else c for c in USER_ERRORS],
)
def test_a_user_error_is_one_line_and_status_2(case, tmp_path):
    (tmp_path / "a_file").write_text("")
    (name, *args), message = USER_ERRORS[case]
    args = [arg.format(tmp=tmp_path) for arg in args]
    result = subprocess.run(
        [script(name), *args], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    # vit-train's start line (processes and devices, timed) precedes what it finds later.
    (line,) = [line for line in ours(result.stderr) if not re.match(r"\d\d:\d\d:\d\d ", line)]
    assert re.match(rf"{name}( \w+)?: ", line), line  # The command (and its subcommand).
    assert message.format(tmp=tmp_path) in line, line
    assert not (tmp_path / "run").exists()  # Refused before anything was written.


# A command whose main prints the recipe's fields that its arguments name, as JSON.
SHOW_FIELDS = """
import json, sys
from ml_collections import config_flags
from vit_jax import cli
CONFIG = config_flags.DEFINE_config_file("config", None, "", lock_config=True)
def main(argv):
    config = CONFIG.value
    print(json.dumps([config.model.representation_size, config.model_init, config.batch_size]))
cli.run_with_flags("show", "", main)
"""


@pytest.mark.parametrize(
    "overrides, fields",
    [
        # An int field a recipe set, a str field (ml_collections read "None" as a string).
        (["--config.model.representation_size=None", "--config.model_init=None"], [None, None]),
        (["--config.model.representation_size=None", "--config.model.representation_size=8"],
         [8, None]),
        (["--config.model.representation_size=8", "--config.model.representation_size=None"],
         [None, None]),
    ],
)  # fmt: skip
def test_none_gives_a_field_whose_default_is_none_that_default_again(overrides, fields):
    recipe = f"{REPO}/configs/pretrain.py:variant=B/16"
    command = [sys.executable, "-c", SHOW_FIELDS, "--config", recipe, *overrides]
    result = subprocess.run(
        [*command, "--config.batch_size=64"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [*fields, 64]


@pytest.mark.slow
def test_a_coordinator_port_another_program_holds_is_refused_in_one_line(tmp_path):
    """JAX's coordination service could not bind the port (gRPC: "Failed to add port to
    server") and process 0 crashed with SIGSEGV."""
    with socket.create_server(("localhost", 0)) as taken:
        port = taken.getsockname()[1]
        command = [script(TRAIN[0]), *TRAIN[1:4], str(tmp_path / "run")]
        result = subprocess.run(
            [*command, f"--coordinator_address=localhost:{port}", "--num_processes=2",
             "--process_id=0"],
            cwd=tmp_path, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert ours(result.stderr) == [
        f"vit-train: --coordinator_address localhost:{port}: port {port} on this host (process "
        "0's, where the coordination service listens) is taken by another program, perhaps an "
        f"earlier run still going (`ss -ltnp 'sport = :{port}'` names it). Stop it, or start "
        "every process of the run with another port."
    ]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_command_loads_tensorflow_without_keras(tmp_path):
    """TensorFlow imports Keras as it loads, matplotlib and scikit-learn with it (1.8 s of a
    command's start on a 2-core CPU), unless told otherwise (cli.skip_keras)."""
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    # Refused once the data is opened, after TensorFlow loaded.
    command = [*TRAIN, "--config.dataset=no_such_dataset"]
    result = subprocess.run(
        [sys.executable, "-c", COMMAND_PROBE, *(arg.format(tmp=tmp_path) for arg in command)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    report = json.loads(result.stderr.strip().splitlines()[-1])
    assert report["status"] == 2 and "tensorflow" in report["heavy"], result.stderr[-3000:]
    assert "keras" not in report["heavy"], report


# The command's process as COMMAND_PROBE runs it, reading how many objects the garbage
# collector holds frozen once every atexit handler of the command has run. (atexit runs its handlers
# last-registered first: this one, registered before the command starts, runs after the
# command's.)
FREEZE_PROBE = f"""
import atexit, gc, json, sys
atexit.register(lambda: print(json.dumps(dict(frozen=gc.get_freeze_count())), file=sys.stderr))
{COMMAND_PROBE}
"""


@pytest.mark.slow
def test_a_command_leaves_its_objects_to_the_os_at_exit(tmp_path):
    """Interpreter finalization's full collections walked the ~400,000 objects TensorFlow
    and JAX load once more after the command's work was done (0.7 s of a tiny run's 12 s on
    2 cores); frozen, they are not walked (cli.skip_garbage_collection_at_exit)."""
    command = [*TRAIN, "--config.dataset=no_such_dataset"]  # Refused after TensorFlow loaded.
    result = subprocess.run(
        [sys.executable, "-c", FREEZE_PROBE, *(arg.format(tmp=tmp_path) for arg in command)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    *_, command_report, exit_report = result.stderr.strip().splitlines()
    assert json.loads(command_report)["status"] == 2, result.stderr[-3000:]
    assert json.loads(exit_report)["frozen"] > 100_000, exit_report


@pytest.mark.parametrize(
    "dtype, message",
    [
        ("float64", "model.dtype='float64' needs 64-bit JAX (JAX_ENABLE_X64=1 in the environment)"),
        ("float16", "model.dtype='float16': XLA's CPU backend has no float16 matmul that sums"),
    ],
)
def test_a_model_dtype_the_run_would_not_compute_in_is_refused_before_anything_is_written(
    tmp_path, dtype, message
):
    """float64 without 64-bit JAX used to train in float32 while the run said float64;
    float16 on a CPU used to fail in JAX's attention once the workdir was written."""
    command = (*TRAIN, f"--config.model.dtype={dtype}")
    result = subprocess.run(
        [script(command[0]), *(arg.format(tmp=tmp_path) for arg in command[1:])],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert ours(result.stderr)[-1].startswith(f"vit-train: {message}")
    assert not (tmp_path / "run").exists()


def test_only_errors_vit_jax_raises_are_user_errors(capsys):
    """A ValueError from inside a library (here NumPy) is a bug: its traceback stays."""

    def refused_by_us():
        export.choose_format("model.bin")  # Raised by vit_jax, with its message.

    assert cli.run("vit-export", refused_by_us) == 2
    assert capsys.readouterr().err.startswith("vit-export: --out model.bin: its extension")

    def library_bug():
        np.zeros(3).reshape(2, 2)

    with pytest.raises(ValueError, match="cannot reshape"):
        cli.run("vit-export", library_bug)


def test_only_tensorflows_file_io_errors_on_a_path_are_user_errors(capsys):
    """A path TensorFlow's file I/O refuses is the user's to fix, also when a library raises
    its own error from it (as tfds does for a `data_dir`); TensorFlow's other errors (here
    an op's) are bugs and keep their traceback."""
    import tensorflow as tf

    def unknown_scheme():
        tf.io.gfile.exists("s3://vit-models/ViT-B_16.npz")

    assert cli.run("vit-train", unknown_scheme) == 2
    assert capsys.readouterr().err.startswith(
        "vit-train: File system scheme 's3' not implemented (file: "
        "'s3://vit-models/ViT-B_16.npz'). Check the path;"
    )

    def wrapped():
        try:
            unknown_scheme()
        except tf.errors.OpError as e:
            raise RuntimeError("Failed to construct dataset 'x'") from e

    assert cli.run("vit-train", wrapped) == 2
    assert capsys.readouterr().err.startswith("vit-train: Failed to construct dataset 'x'. ")

    def op_error():
        tf.reshape(tf.zeros(3), (2, 2))

    with pytest.raises(tf.errors.InvalidArgumentError):
        cli.run("vit-train", op_error)
