"""The validated listing of an image folder (its manifest), checked once and shared.

An image folder is checked by decoding every file in full, once: a file that is empty,
not a JPEG/PNG, truncated or corrupt is rejected with its reason and never reaches the
input pipeline, so training cannot die hours in (and again at the same step after every
resume) on a file no message names. The verdicts are kept as a JSON manifest,
`vit_jax_manifest.json` in the dataset root, or `vit_jax_manifest_<hash of root>.json` in
`config.data_dir` when it is set (a root that is read-only). Only process 0 lists the
folder, checks what the manifest does not know yet and rewrites it if anything changed;
the other processes wait at a barrier and read it. So all processes use one listing,
and a later run's start-up costs one directory listing plus one file read.

A long first check saves its verdicts so far every minute, so a check cut short (a
preempted start on a large bucket) goes on from them at the next start. A changed folder is
noticed by its listing: files added are checked, files removed are dropped, and the manifest
is rewritten. A file whose content changes under the same name
is not noticed (telling would need a read per file): delete the manifest to check again.

A file that cannot be read at all (a broken link, a storage error) stops the check with its
name instead of being rejected: whether a read error recurs is not the content's to say.
"""

import concurrent.futures
import hashlib
import json
import logging
import os
import stat
import time
from collections.abc import Callable

import tensorflow as tf

from vit_jax.cli import error_line

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
MANIFEST_FORMAT = 1
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")  # JPEG, PNG: how each file starts.
_CHECK_THREADS = 32  # Reads dominate on gs://; decoding releases the GIL.
_CHECK_CHUNK = 1024  # Files decoded between two looks at the clock.
_SAVE_EVERY_S = 60.0  # How often a long check saves its verdicts so far.

log = logging.getLogger(__name__)


class FolderUnreadableError(OSError):
    """A folder's file that cannot be read, or its manifest that cannot be written: the
    run stops, naming it (every process must see the same images)."""


# split -> class -> sorted file names; the files of one split: "class/file" -> reason.
Images = dict[str, dict[str, list[str]]]
Rejected = dict[str, dict[str, str]]


def manifest_path(root: str, manifest_dir: str | None = None) -> str:
    """Where the manifest of the folder `root` is kept: in it, or in `manifest_dir`."""
    if manifest_dir is None:
        return f"{root}/vit_jax_manifest.json"
    digest = hashlib.md5(root.encode()).hexdigest()[:12]
    return f"{manifest_dir.rstrip('/')}/vit_jax_manifest_{digest}.json"


def undecodable(path: str) -> str | None:
    """Why the image file at `path` cannot be used (empty, not JPEG/PNG, does not decode, a
    pipe or device).

    Decodes the whole image with the decoder the pipeline uses, so a file that passes also
    decodes there, whatever crop is taken of it.

    Raises:
      FolderUnreadableError: the file cannot be read, naming it.
    """
    if "://" not in path and os.path.exists(path) and _is_special(os.stat(path).st_mode):
        return "not a regular file: a pipe, socket or device, whose read may never end"
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            encoded = f.read()
    except (OSError, tf.errors.OpError) as e:
        reason = str(getattr(e, "message", e)).splitlines()[0]
        raise FolderUnreadableError(
            f"Cannot read {path} ({reason}). Every process of a run must see the same images: "
            "fix or remove the file, or retry if the storage had a passing error."
        ) from e
    if not encoded.startswith(_SIGNATURES):
        return "empty file" if not encoded else "not a JPEG or PNG file"
    try:
        tf.io.decode_image(encoded, channels=3, expand_animations=False)
    except tf.errors.InvalidArgumentError as e:
        return f"does not decode: {error_line(e)}"
    return None


def _is_special(mode: int) -> bool:
    return any(f(mode) for f in (stat.S_ISFIFO, stat.S_ISSOCK, stat.S_ISCHR, stat.S_ISBLK))


def _listdir(path: str) -> list[str]:
    """The names in the directory `path`.

    Raises:
      FolderUnreadableError: it cannot be listed (permissions, storage), or it holds a
        name that is not UTF-8, naming it.
    """
    try:
        return tf.io.gfile.listdir(path)
    except UnicodeDecodeError as e:
        name = e.object[max(0, e.start - 20) : e.end + 20]
        raise FolderUnreadableError(
            f"{path} holds a file or folder name that is not UTF-8 (...{name!r}...): rename "
            "it (e.g. convmv -f latin1 -t utf8 -r --notest DIR)."
        ) from None
    except tf.errors.OpError as e:
        raise FolderUnreadableError(
            f"Cannot list {path} ({error_line(e)}). Every process of a run must "
            "see the same images: make it readable, or retry if the storage had a passing error."
        ) from None


def _subdirs(path: str) -> list[str]:
    names = (name.rstrip("/") for name in _listdir(path))
    return sorted(n for n in names if not n.startswith(".") and tf.io.gfile.isdir(f"{path}/{n}"))


def _require_directory(root: str) -> str:
    """The layout an image folder must have, once `root` is found to be a directory.

    Raises:
      FileNotFoundError: `root` is no directory.
    """
    layout = f"expected {root}/<split>/<class>/<image>.jpg|.jpeg|.png"
    if not tf.io.gfile.isdir(root):
        raise FileNotFoundError(f"Image-folder root {root!r} is not a directory; {layout}")
    return layout


def list_folder(root: str) -> Images:
    """Image files by extension (any case) under `root/<split>/<class>/`, unchecked; other
    entries of the class folders (another format, a subfolder) are named in a warning.

    Raises:
      FileNotFoundError: `root` is no directory or has no split subdirectories.
      FolderUnreadableError: a directory that cannot be listed (`_listdir`).
    """
    layout = _require_directory(root)
    splits = _subdirs(root)
    if not splits:
        raise FileNotFoundError(f"{root} has no split subdirectories; {layout}")
    images: Images = {split: {} for split in splits}
    ignored = []
    for split in splits:
        for name in _subdirs(f"{root}/{split}"):
            entries = [entry.rstrip("/") for entry in _listdir(f"{root}/{split}/{name}")]
            images[split][name] = sorted(
                e for e in entries if os.path.splitext(e)[1].lower() in IMAGE_EXTENSIONS
            )
            ignored += [
                f"{split}/{name}/{e}"
                for e in sorted(entries)
                if os.path.splitext(e)[1].lower() not in IMAGE_EXTENSIONS and e[:1] != "."
            ]
    if ignored:
        log.warning(
            "Image folder %s: ignoring %d entries of class folders that are no .jpg/.jpeg/.png "
            "file (another format, or a subfolder: images are read from %s/<split>/<class>/ "
            "alone): %s%s",
            root, len(ignored), root, ", ".join(ignored[:10]), ", ..." if ignored[10:] else "",
        )  # fmt: skip
    return images


def _read(path: str, root: str) -> tuple[Images, Rejected] | None:
    """The manifest at `path` if it is one of this format for `root`, else None."""
    try:
        with tf.io.gfile.GFile(path, "r") as f:
            manifest = json.load(f)
    except (OSError, tf.errors.OpError, ValueError):
        return None
    if not isinstance(manifest, dict):
        return None
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("root") != root:
        return None
    images, rejected = manifest.get("images"), manifest.get("rejected")
    if not (isinstance(images, dict) and isinstance(rejected, dict)):
        return None  # Not one this code wrote: checked again.
    return images, rejected


def _write(path: str, root: str, images: Images, rejected: Rejected) -> None:
    """Replaces the manifest in one step, so a reader never sees half of it."""
    manifest = {"format": MANIFEST_FORMAT, "root": root, "images": images, "rejected": rejected}
    tf.io.gfile.makedirs(os.path.dirname(path))
    partial = f"{path}.partial-{os.getpid()}"
    with tf.io.gfile.GFile(partial, "w") as f:
        json.dump(manifest, f, separators=(",", ":"))
    tf.io.gfile.rename(partial, path, overwrite=True)


def _validate(
    root: str,
    listed: Images,
    known: tuple[Images, Rejected] | None,
    save: Callable[[Images, Rejected], None],
) -> tuple[Images, Rejected, int, int]:
    """`listed` split into (images, rejected), decoding only the files `known` lacks.

    While a long check runs, the verdicts so far are passed to `save` every
    `_SAVE_EVERY_S` seconds: a check cut short (a preempted first start on a large bucket)
    resumes from them instead of from the start.

    Returns (images, rejected, files checked now, files of `known` no longer listed).
    """
    verdicts: dict[str, str | None] = {}  # "split/class/file" -> reason, or None: an image.
    if known is not None:
        for split, classes in known[0].items():
            for name, files in classes.items():
                verdicts |= {f"{split}/{name}/{f}": None for f in files}
        for split, reasons in known[1].items():
            verdicts |= {f"{split}/{p}": why for p, why in reasons.items()}
    wanted = {
        f"{s}/{c}/{f}": (s, c, f) for s, cs in listed.items() for c, fs in cs.items() for f in fs
    }
    new = [p for p in wanted if p not in verdicts]
    dropped = len(verdicts.keys() - wanted.keys())
    if new:
        log.info("Image folder %s: decoding %d file(s) new to its manifest, once.", root, len(new))
    saved_at = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(_CHECK_THREADS) as pool:
        for start in range(0, len(new), _CHECK_CHUNK):
            chunk = new[start : start + _CHECK_CHUNK]
            reasons = pool.map(undecodable, (f"{root}/{p}" for p in chunk))
            verdicts |= zip(chunk, reasons, strict=True)
            if start + _CHECK_CHUNK < len(new) and time.monotonic() - saved_at >= _SAVE_EVERY_S:
                save(*_split_verdicts(listed, wanted, verdicts))
                saved_at = time.monotonic()
    return (*_split_verdicts(listed, wanted, verdicts), len(new), dropped)


def _split_verdicts(
    listed: Images, wanted: dict[str, tuple[str, str, str]], verdicts: dict[str, str | None]
) -> tuple[Images, Rejected]:
    """The files of `wanted` that have a verdict, as (images, rejected)."""
    images: Images = {s: {c: [] for c in cs} for s, cs in listed.items()}
    rejected: Rejected = {s: {} for s in listed}
    for key, (split, name, file) in wanted.items():
        if key not in verdicts:
            continue
        if verdicts[key]:
            rejected[split][f"{name}/{file}"] = verdicts[key]
        else:
            images[split][name].append(file)
    return images, rejected


def validated_listing(
    root: str,
    manifest_dir: str | None = None,
    *,
    writer: bool = True,
    barrier: Callable[[], None] | None = None,
) -> tuple[Images, Rejected]:
    """The folder's usable images and its rejected files with their reasons.

    The `writer` (process 0) lists `root`, checks the files its manifest lacks and writes
    the manifest when anything changed; then every process passes `barrier` (None: one
    process), and the others read what the writer wrote.

    Raises:
      FileNotFoundError: no folder at `root`, no splits, or (not the writer) no manifest.
      FolderUnreadableError: a file cannot be read, or the writer of a multi-process run
        cannot write the manifest.
    """
    path = manifest_path(root, manifest_dir)
    if writer:
        known = _read(path, root)
        listed = list_folder(root)

        def save_so_far(images: Images, rejected: Rejected) -> None:
            try:
                _write(path, root, images, rejected)
            except (OSError, tf.errors.OpError):
                pass  # The complete manifest's write names the problem.

        images, rejected, checked, dropped = _validate(root, listed, known, save_so_far)
        if known != (images, rejected):
            log.info(
                "Image folder %s: %d file(s) checked, %d gone since the manifest; writing %s.",
                root,
                checked,
                dropped,
                path,
            )
            try:
                _write(path, root, images, rejected)
            except (OSError, tf.errors.OpError) as e:
                if barrier is not None:
                    raise FolderUnreadableError(
                        f"Cannot write the manifest of image folder {root} to {path} ({e}); "
                        "the other processes read it from there. Set config.data_dir to a "
                        "writable directory (local or gs://) to keep it there instead."
                    ) from e
                log.warning("Cannot write %s (%s): the next run checks the folder again.", path, e)
    else:  # It reads the images the writer lists: a host without them fails at start-up.
        _require_directory(root)
    if barrier is not None:
        barrier()
    if not writer:
        manifest = _read(path, root)
        if manifest is None:
            raise FileNotFoundError(
                f"Process 0 left no manifest of image folder {root} at {path}: the other "
                "processes read it where process 0 writes it, so that place must be one "
                "storage for all: the folder itself (config.data_dir unset), or a data_dir "
                "every process shares (e.g. on gs://)."
            )
        images, rejected = manifest
    return images, rejected
