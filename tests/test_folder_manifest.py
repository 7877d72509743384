"""Image folders: every file is decoded once and the verdicts are kept in a manifest that
later starts (and the other processes) read instead of the files. A file that does not
decode is named and left out, in any split, so a run finishes; a changed folder is noticed."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import REPO, run_two_processes, small_local_config, write_image

from vit_jax.data import folder_manifest
from vit_jax.data.folder import FolderSource
from vit_jax.data.pipeline import open_source
from vit_jax.train import train_and_evaluate


def make_photos(root, per_class: int = 12) -> None:
    """train/{a,b} and test/{a,b}, `per_class` 20x20 noise JPEGs each (a few hundred bytes)."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in ("a", "b"):
            for i in range(per_class):
                pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
                write_image(root / split / name / f"{i:02d}.jpg", pixels)


def cut_in_half(path) -> None:
    encoded = path.read_bytes()
    path.write_bytes(encoded[: len(encoded) // 2])


@pytest.fixture
def count_checks(monkeypatch):
    """The paths `undecodable` is asked about, in a list."""
    checked = []
    check = folder_manifest.undecodable

    def counting(path):
        checked.append(path)
        return check(path)

    monkeypatch.setattr(folder_manifest, "undecodable", counting)
    return checked


def test_undecodable_names_what_is_wrong_with_a_file(tmp_path):
    make_photos(tmp_path, per_class=1)
    good = tmp_path / "train" / "a" / "00.jpg"
    png = tmp_path / "p.png"
    write_image(png, np.full((20, 20), 7, np.uint8))
    assert folder_manifest.undecodable(str(good)) is None
    assert folder_manifest.undecodable(str(png)) is None
    cut_in_half(good)
    cut_in_half(png)
    assert folder_manifest.undecodable(str(good)).startswith("does not decode: ")
    assert folder_manifest.undecodable(str(png)).startswith("does not decode: ")
    html = tmp_path / "page.jpg"
    html.write_text("<html>Not found</html>")
    assert folder_manifest.undecodable(str(html)) == "not a JPEG or PNG file"
    os.mkfifo(tmp_path / "pipe.jpg")  # Its read would wait for a writer for ever.
    assert folder_manifest.undecodable(str(tmp_path / "pipe.jpg")).startswith(
        "not a regular file: a pipe"
    )


@pytest.mark.slow
@pytest.mark.parametrize("split", ["train", "test"])
def test_a_truncated_jpeg_is_named_and_skipped_and_the_run_finishes(tmp_path, split, caplog):
    """The file used to stop training at its turn (train) or every evaluation (test), at the
    same step again after each resume, with a TensorFlow error naming no file."""
    root = tmp_path / "photos"
    make_photos(root)
    cut_in_half(root / split / "a" / "05.jpg")
    config = small_local_config(
        tmp_path, dataset=f"folder:{root}", data_dir=None, train_split="train", eval_split="test"
    )
    with caplog.at_level("WARNING", logger="vit_jax"):
        metrics = train_and_evaluate(config, str(tmp_path / "run"))
    assert (
        f"Skipping 1 file(s) of {root}/{split} that are no usable images: a/05.jpg (does not decode"
        in caplog.text
    )
    sizes = open_source(config.dataset, None).info.split_sizes
    assert sizes == {"train": 24, "test": 24} | {split: 23}
    evaluated = {k: v for k, v in metrics.items() if k.startswith("eval/")}
    assert evaluated and all(np.isfinite(v) for v in evaluated.values())  # It completed.


def test_the_manifest_is_written_once_and_reused(tmp_path, count_checks):
    make_photos(tmp_path, per_class=3)
    cut_in_half(tmp_path / "test" / "b" / "01.jpg")
    first = FolderSource(str(tmp_path))
    assert len(count_checks) == 12  # Every file decoded once.
    manifest = tmp_path / "vit_jax_manifest.json"
    written = manifest.read_bytes()
    assert json.loads(written)["rejected"] == {
        "test": {"b/01.jpg": json.loads(written)["rejected"]["test"]["b/01.jpg"]},
        "train": {},
    }
    os.utime(manifest, (0, 0))
    again = FolderSource(str(tmp_path))
    assert len(count_checks) == 12  # Nothing decoded again,
    assert manifest.stat().st_mtime == 0 and manifest.read_bytes() == written  # nor rewritten.
    assert again.info == first.info
    assert first.info.split_sizes == {"train": 6, "test": 5}
    for split in ("train", "test"):
        assert (
            again.records(split).as_numpy_iterator().next()
            == first.records(split).as_numpy_iterator().next()
        )


# A first check, slowed to 0.05 s a file, that saves its verdicts every 16 files.
SLOW_CHECK = """
import sys, time
from vit_jax.data import folder_manifest
from vit_jax.data.folder import FolderSource
check = folder_manifest.undecodable
folder_manifest.undecodable = lambda path: time.sleep(0.05) or check(path)
folder_manifest._CHECK_THREADS, folder_manifest._CHECK_CHUNK = 4, 16
folder_manifest._SAVE_EVERY_S = 0
FolderSource(sys.argv[1])
"""


def test_a_check_killed_midway_resumes_from_its_verdicts_so_far(tmp_path, count_checks):
    """A preempted first start on a large bucket (SIGKILL after the grace period) lost
    the whole check: the manifest was written only at the end."""
    make_photos(tmp_path, per_class=40)  # 160 files: 2 s at 4 x 0.05 s a file.
    cut_in_half(tmp_path / "train" / "a" / "00.jpg")
    manifest = tmp_path / "vit_jax_manifest.json"
    check = subprocess.Popen([sys.executable, "-c", SLOW_CHECK, str(tmp_path)])
    try:
        while not manifest.exists() and check.poll() is None:
            time.sleep(0.01)
        check.send_signal(signal.SIGKILL)
    finally:
        check.wait(timeout=60)
    assert check.returncode == -signal.SIGKILL, "the check ended before it was killed"
    saved = json.loads(manifest.read_text())
    known = sum(map(len, saved["rejected"].values())) + sum(
        len(files) for split in saved["images"].values() for files in split.values()
    )
    assert 16 <= known < 160
    source = FolderSource(str(tmp_path))  # The next start checks the rest alone.
    assert len(count_checks) == 160 - known
    assert source.info.split_sizes == {"train": 79, "test": 80}  # The damaged one left out.


def test_entries_of_class_folders_that_are_no_images_are_named(tmp_path, caplog):
    """Another format or a subfolder of more images was left out without a word."""
    make_photos(tmp_path, per_class=2)
    (tmp_path / "train" / "a" / "x.webp").write_bytes(b"RIFF")
    write_image(tmp_path / "train" / "b" / "more" / "00.jpg", np.zeros((4, 4, 3), np.uint8))
    (tmp_path / "train" / "b" / ".DS_Store").write_bytes(b"")
    with caplog.at_level("WARNING", logger="vit_jax"):
        assert FolderSource(str(tmp_path)).info.split_sizes == {"train": 4, "test": 4}
    assert (
        f"Image folder {tmp_path}: ignoring 2 entries of class folders that are no "
        ".jpg/.jpeg/.png file (another format, or a subfolder: images are read from "
        f"{tmp_path}/<split>/<class>/ alone): train/a/x.webp, train/b/more"
    ) in caplog.text


@pytest.mark.parametrize("text", ["null", "[]", '"x"', '{"format": 1, "root": "ROOT"}'])
def test_a_manifest_of_another_shape_is_checked_again(tmp_path, count_checks, text):
    """JSON that is no manifest this code wrote (a hand edit, another tool) was a traceback."""
    make_photos(tmp_path, per_class=2)
    (tmp_path / "vit_jax_manifest.json").write_text(text.replace("ROOT", str(tmp_path)))
    assert FolderSource(str(tmp_path)).info.split_sizes == {"train": 4, "test": 4}
    assert len(count_checks) == 8
    assert json.loads((tmp_path / "vit_jax_manifest.json").read_text())["format"] == 1


def test_a_changed_folder_is_noticed(tmp_path, count_checks):
    make_photos(tmp_path, per_class=3)
    FolderSource(str(tmp_path))
    count_checks.clear()
    write_image(tmp_path / "train" / "b" / "new.jpg", np.zeros((20, 20, 3), np.uint8))
    added = FolderSource(str(tmp_path))
    assert count_checks == [f"{tmp_path}/train/b/new.jpg"]  # Only the new file is decoded.
    assert added.info.split_sizes == {"train": 7, "test": 6}
    os.remove(tmp_path / "test" / "a" / "00.jpg")
    removed = FolderSource(str(tmp_path))
    assert len(count_checks) == 1
    assert removed.info.split_sizes == {"train": 7, "test": 5}
    paths = {
        p.decode() for p in removed.records("test").map(lambda r: r["image"]).as_numpy_iterator()
    }
    assert f"{tmp_path}/test/a/00.jpg" not in paths and len(paths) == 5
    manifest = json.loads((tmp_path / "vit_jax_manifest.json").read_text())
    assert manifest["images"]["test"]["a"] == ["01.jpg", "02.jpg"]
    assert "new.jpg" in manifest["images"]["train"]["b"]


def test_other_processes_read_the_manifest_after_the_barrier(tmp_path, monkeypatch):
    make_photos(tmp_path / "photos", per_class=2)
    root, kept = str(tmp_path / "photos"), str(tmp_path / "manifests")  # data_dir: kept.
    passed = []
    with pytest.raises(
        FileNotFoundError, match=f"Process 0 left no manifest of image folder {root}"
    ):
        FolderSource(root, kept, writer=False, barrier=lambda: passed.append("other"))
    writer = FolderSource(root, kept, writer=True, barrier=lambda: passed.append("writer"))
    assert sorted(os.listdir(root)) == ["test", "train"]  # The dataset stays as it was.
    assert os.listdir(kept) == [os.path.basename(folder_manifest.manifest_path(root, kept))]

    def no_listing(_):
        raise AssertionError("only the writer lists the folder")

    monkeypatch.setattr(folder_manifest, "list_folder", no_listing)
    other = FolderSource(root, kept, writer=False, barrier=lambda: passed.append("other"))
    assert other.info == writer.info and other.info.split_sizes == {"train": 4, "test": 4}
    assert passed == ["other", "writer", "other"]


def test_a_writer_that_cannot_write_the_manifest(tmp_path, monkeypatch, caplog):
    """Several processes need it: an error saying where to put it; one process carries on."""
    make_photos(tmp_path, per_class=1)

    def read_only(path, *_):
        raise PermissionError(f"{path}: read-only file system")

    monkeypatch.setattr(folder_manifest, "_write", read_only)
    with pytest.raises(OSError, match=r"Cannot write the manifest .* Set config\.data_dir"):
        FolderSource(str(tmp_path), writer=True, barrier=lambda: None)
    with caplog.at_level("WARNING", logger="vit_jax"):
        single = FolderSource(str(tmp_path))
    assert "the next run checks the folder again" in caplog.text
    assert single.info.split_sizes == {"train": 2, "test": 2}


@pytest.mark.slow
def _broken_link(photos) -> None:
    os.symlink(photos / "gone.jpg", photos / "train" / "a" / "link.jpg")


def _unlistable_class(photos) -> None:
    os.chmod(photos / "train" / "b", 0)


def _name_not_utf8(photos) -> None:
    folder = os.fsencode(photos / "train" / "a")
    os.rename(folder + b"/00.jpg", folder + b"/caf\xe9.jpg")  # Latin-1, as old archives have.


@pytest.mark.parametrize(
    "damage, message",
    [
        (_broken_link, r"Cannot read .*/link\.jpg \("),
        (_unlistable_class, r"Cannot list .*/photos/train/b \(.*ermission denied"),
        (_name_not_utf8, r"photos/train/a holds a file or folder name that is not UTF-8"),
    ],
)
def test_a_file_that_cannot_be_read_stops_vit_train_in_one_line(tmp_path, damage, message):
    """A broken link, a folder that cannot be listed or a name that is not UTF-8 is not a
    damaged image: skipping it on one process could give the processes different splits,
    so the run stops naming it (status 1, no traceback)."""
    make_photos(tmp_path / "photos", per_class=2)
    damage(tmp_path / "photos")
    command = [
        os.path.join(os.path.dirname(sys.executable), "vit-train"),
        "--config", f"{REPO}/configs/local.py:dataset=folder:photos", "--workdir", "run",
    ]  # fmt: skip
    if os.geteuid() == 0:  # Root reads any folder: without the capabilities that allow it.
        caps = "-dac_override,-dac_read_search"
        command = ["setpriv", "--bounding-set", caps, "--inh-caps", caps, *command]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    os.chmod(tmp_path / "photos" / "train" / "b", 0o755)  # For pytest's clean-up.
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("vit-train:")]
    assert re.search(message, line), line


@pytest.mark.slow
def test_an_image_changed_since_the_manifest_stops_vit_train_saying_what_to_do(tmp_path):
    """The manifest keeps verdicts by name: a file replaced by one that does not decode
    ended the run in a TensorFlow traceback that named no file and no remedy."""
    make_photos(tmp_path / "photos", per_class=4)
    FolderSource(str(tmp_path / "photos"))  # The manifest: every file decodes.
    for path in (tmp_path / "photos" / "train").rglob("*.jpg"):
        path.write_bytes(b"garbage")
    result = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "vit-train"),
         "--config", f"{REPO}/configs/local.py:steps=2,batch=8,dataset=folder:photos",
         "--config.fewshot.datasets={}", "--workdir", "run"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("vit-train:")]
    assert line == (
        f"vit-train: a file of the image folder {tmp_path}/photos no longer reads as an image "
        "(Unknown image file format. One of JPEG, JPEG XL, PNG, GIF, BMP, WebP required.): it "
        f"changed since {tmp_path}/photos/vit_jax_manifest.json was written. Delete the "
        "manifest so that the next start checks every file again, then rerun the same command "
        "to resume."
    ), line


# One process of a two-process run opening a folder: what it decoded and what it sees.
OPEN_FOLDER = """
import json, sys
import jax
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from vit_jax.data import folder_manifest
from vit_jax.data.pipeline import open_source
decoded = []
check = folder_manifest.undecodable
folder_manifest.undecodable = lambda path: decoded.append(path) or check(path)
source = open_source("folder:" + sys.argv[3], None)
records = source.records("test").map(lambda r: r["image"]).as_numpy_iterator()
print(json.dumps({
    "sizes": source.info.split_sizes,
    "decoded": len(decoded),
    "test": [p.decode() for p in records],
}))
"""


@pytest.mark.slow
def test_two_processes_share_one_check_and_see_the_same_splits(tmp_path):
    make_photos(tmp_path, per_class=3)
    cut_in_half(tmp_path / "test" / "b" / "02.jpg")
    runs = run_two_processes(OPEN_FOLDER, str(tmp_path))
    assert [r.returncode for r in runs] == [0, 0], [r.stderr[-3000:] for r in runs]
    first, second = (json.loads(r.stdout.splitlines()[-1]) for r in runs)
    assert first["decoded"] == 12 and second["decoded"] == 0  # Process 0 checked for both.
    assert first["sizes"] == second["sizes"] == {"train": 6, "test": 5}
    assert first["test"] == second["test"] and f"{tmp_path}/test/b/02.jpg" not in first["test"]
    assert "Skipping 1 file(s)" in runs[1].stderr  # Every process names the file.
