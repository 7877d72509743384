"""Relative paths, as a user types them, through every command: real processes whose working
directory is a fresh folder, a run interrupted and resumed, then predictions and an export."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from helpers import NO_PROBE, REPO, TINY, config_flags, parse_predictions, write_image

from vit_jax import cli
from vit_jax.data.embedded import load_digits_arrays
from vit_jax.preemption import PREEMPTED_EXIT_STATUS

RECIPE = f"{REPO}/configs/local.py:steps=12,dataset=digits,batch=32"
SETTINGS = TINY | NO_PROBE | {"log_every": 1, "eval_every": 12, "checkpoint_every": 6}


def command(name: str, *args: str) -> list[str]:
    """A console script of this environment, as a user runs it."""
    return [os.path.join(os.path.dirname(sys.executable), name), *args]


def train(cwd) -> subprocess.Popen:
    """vit-train with a relative workdir and data_dir (digits prepared there on first use)."""
    return subprocess.Popen(
        command(
            "vit-train", "--config", RECIPE, "--workdir", "runs/digits",
            "--config.data_dir=data/tfds",
            *config_flags(SETTINGS),
        ),
        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def finish(process: subprocess.Popen) -> str:
    """The rest of its stderr; nothing went to stdout (tfds's preparation messages did)."""
    stdout, stderr = process.communicate(timeout=600)
    assert "Traceback" not in stderr and not stdout, (stdout, stderr[-3000:])
    return stderr


def run(cwd, name: str, *args: str) -> subprocess.CompletedProcess:
    """A command run to its end; it must succeed."""
    result = subprocess.run(
        command(name, *args), cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_relative_paths_through_train_resume_predict_and_export(tmp_path):
    pixels, labels = load_digits_arrays()
    for i in range(4):
        write_image(tmp_path / "photos" / str(labels[i]) / f"{i}.png", pixels[i])

    interrupted, lines = train(tmp_path), []
    for line in interrupted.stderr:
        lines.append(line)
        if "step 2/" in line:
            break
    interrupted.send_signal(signal.SIGTERM)
    stderr = "".join(lines) + finish(interrupted)
    assert interrupted.returncode == PREEMPTED_EXIT_STATUS, stderr[-3000:]
    prepared = tmp_path / "data" / "tfds" / "digits" / "1.0.0"
    assert "Preparing the embedded dataset 'digits' once, offline" in stderr
    assert f"as tfds records in {prepared}." in stderr
    assert "Downloading" not in stderr and "dataset_info.json" not in stderr  # tfds's words.
    workdir = tmp_path / "runs" / "digits"
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir())
    assert len(saved) == 1 and saved[0] < 12  # The checkpoint of the interrupted step.

    resumed = train(tmp_path)
    stderr = finish(resumed)
    assert resumed.returncode == 0 and f"Resumed from step {saved[0]}." in stderr, stderr[-3000:]
    assert "Preparing" not in stderr  # Once.
    config = json.loads((workdir / "config.json").read_text())
    assert config["data_dir"] == str(tmp_path / "data" / "tfds")  # Saved absolute.
    assert (tmp_path / "data" / "tfds").is_dir() and not (tmp_path / "tfds").exists()

    from_workdir = parse_predictions(
        run(tmp_path, "vit-predict", "--checkpoint", "runs/digits", "photos").stdout
    )
    assert sorted(from_workdir) == sorted(f"photos/{labels[i]}/{i}.png" for i in range(4))

    run(tmp_path, "vit-export", "--workdir", "runs/digits", "--out", "exports/digits.npz")
    assert (tmp_path / "exports" / "digits.npz").is_file()
    assert (tmp_path / "exports" / "digits.json").is_file()
    from_export = parse_predictions(
        run(tmp_path, "vit-predict", "--checkpoint", "exports/digits.npz", "photos").stdout
    )
    assert from_export.keys() == from_workdir.keys()
    for path, top in from_workdir.items():
        assert [label for _, label in top] == [label for _, label in from_export[path]]
        np.testing.assert_allclose([p for p, _ in top], [p for p, _ in from_export[path]])

    # A folder of images in any layout (no split folder) and fewer images than the default.
    distance = ["distance", "--checkpoint", "runs/digits", "--dataset", "folder:photos"]
    drawn = run(tmp_path, "vit-visualize", *distance, "--out", "figs/distance.png")
    assert "has 4 images, fewer than --num_images 128: drawing from all 4." in drawn.stderr
    assert (tmp_path / "figs" / "distance.png").is_file()


def test_absolute_path_leaves_urls_and_resolves_the_rest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cli.absolute_path("gs://bucket/run") == "gs://bucket/run"
    assert cli.absolute_path("runs/a/../b") == str(tmp_path / "runs" / "b")
    assert cli.absolute_path("~/runs") == str(tmp_path / "home" / "runs")
    assert cli.absolute_path("/abs/x") == "/abs/x"
    assert cli.absolute_dataset("folder:photos") == f"folder:{tmp_path / 'photos'}"
    assert cli.absolute_dataset("folder:gs://b/photos") == "folder:gs://b/photos"
    assert cli.absolute_dataset("mnist5k") == "mnist5k"
    assert cli.absolute_dataset("imagenet2012:5.1.0") == "imagenet2012:5.1.0"
