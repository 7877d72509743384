"""Image-folder datasets (`folder:/path/to/root`) as a `Source`, for data that is not in tfds.

Layout: `root/<split>/<class>/<image>` with .jpg/.jpeg/.png files (any case), grayscale or
colour, e.g. `root/train/cat/001.jpg`, `root/test/dog/17.png`. Split names are the
subdirectory names, class names the sorted class directory names, which must be the same in
every split. The root may be local or on `gs://` (listed with `tf.io.gfile`).

Within a split, examples are ordered by a hash of their `class/file` path: a fixed,
listing-independent order that is not sorted by class, like the shuffled order tfds writes.
So `train[:10%]` is a random-looking 10% and a small shuffle buffer still mixes classes.
The listing is read once per process when the source is opened; files that are empty or
not JPEG/PNG inside are skipped then, with a warning naming each. A file that cannot be read
at all (a broken link, a storage error) stops the opening with its name instead: skipping it
on the process that met the error would give the processes of one run different splits.
"""

import concurrent.futures
import hashlib
import logging
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vit_jax.data.source import DatasetInfo, Split

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")  # JPEG, PNG: how each file starts.

log = logging.getLogger(__name__)


def _not_an_image(path: str) -> str | None:
    """Why `path` cannot be an image (empty, not JPEG/PNG), or None.

    Reads 8 bytes: cheap enough for every file at start-up, and it catches the files that
    would otherwise stop training hours later with a decode error. A read error is raised,
    naming the file: whether it recurs is not the content's to say.
    """
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            head = f.read(8)
    except (OSError, tf.errors.OpError) as e:
        reason = str(getattr(e, "message", e)).splitlines()[0]
        raise OSError(
            f"Cannot read {path} ({reason}). Every process of a run must see the same images: "
            "fix or remove the file, or retry if the storage had a passing error."
        ) from e
    if not head.startswith(_SIGNATURES):
        return "empty file" if not head else "not a JPEG or PNG file"
    return None


def _subdirs(path: str) -> list[str]:
    names = (name.rstrip("/") for name in tf.io.gfile.listdir(path))
    return sorted(n for n in names if not n.startswith(".") and tf.io.gfile.isdir(f"{path}/{n}"))


def _hash_order(paths: list[str]) -> list[str]:
    return sorted(paths, key=lambda p: hashlib.md5(p.encode()).hexdigest())


class FolderSource:
    """Images in `root/<split>/<class>/` directories."""

    def __init__(self, root: str):
        self.root = root.rstrip("/")
        layout = f"expected {self.root}/<split>/<class>/<image>.jpg|.jpeg|.png"
        if not tf.io.gfile.isdir(self.root):
            raise FileNotFoundError(f"Image-folder root {self.root!r} is not a directory; {layout}")
        splits = _subdirs(self.root)
        if not splits:
            raise FileNotFoundError(f"{self.root} has no split subdirectories; {layout}")
        reference = "train" if "train" in splits else splits[0]
        class_names = tuple(_subdirs(f"{self.root}/{reference}"))
        self._files: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for split in splits:
            classes = tuple(_subdirs(f"{self.root}/{split}"))
            if classes != class_names:
                raise ValueError(
                    f"Split {split!r} of {self.root} has classes that differ from split "
                    f"{reference!r}: missing {sorted(set(class_names) - set(classes))}, "
                    f"extra {sorted(set(classes) - set(class_names))}. Every split needs the "
                    "same class directories so labels mean the same thing."
                )
            self._files[split] = self._list_split(split, classes)
        self.info = DatasetInfo(
            num_classes=len(class_names),
            class_names=class_names,
            split_sizes={s: len(paths) for s, (paths, _) in self._files.items()},
        )
        self._split_infos = {
            s: tfds.core.SplitInfo(name=s, shard_lengths=[n], num_bytes=0)
            for s, n in self.info.split_sizes.items()
        }

    def _list_split(self, split: str, classes: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        if not classes:
            raise FileNotFoundError(f"Split directory {self.root}/{split} has no class folders")
        relative = []
        for name in classes:
            relative += [
                f"{name}/{f}"
                for f in tf.io.gfile.listdir(f"{self.root}/{split}/{name}")
                if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS
            ]
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            reasons = list(pool.map(_not_an_image, (f"{self.root}/{split}/{p}" for p in relative)))
        skipped = [(p, why) for p, why in zip(relative, reasons, strict=True) if why]
        if skipped:
            log.warning(
                "Skipping %d file(s) of %s/%s that are no images: %s",
                len(skipped),
                self.root,
                split,
                "; ".join(f"{p} ({why})" for p, why in skipped[:20]),
            )
        relative = [p for p, why in zip(relative, reasons, strict=True) if not why]
        empty = sorted(set(classes) - {p.split("/", 1)[0] for p in relative})
        if empty:
            raise FileNotFoundError(
                f"Class directory {self.root}/{split}/{empty[0]} holds no "
                f"{'/'.join(IMAGE_EXTENSIONS)} images (empty and non-image files are skipped)"
            )
        ordered = _hash_order(relative)
        label_of = {name: i for i, name in enumerate(classes)}
        paths = np.array([f"{self.root}/{split}/{p}" for p in ordered])
        labels = np.array([label_of[p.split("/", 1)[0]] for p in ordered], np.int64)
        return paths, labels

    def _ranges(self, split: Split) -> list[tuple[str, int, int]]:
        """(split name, start, stop) pieces of a tfds-syntax split, resolved by tfds itself."""
        try:
            pieces = tfds.core.ReadInstruction.from_spec(split).to_absolute(self._split_infos)
        except (ValueError, KeyError) as e:
            raise ValueError(
                f"Cannot read image folder {self.root}: {e} Its splits are its subdirectories "
                f"({self.root}/<split>/<class>/<image>)."
            ) from e
        return [
            (
                p.splitname,
                p.from_ or 0,
                self.info.split_sizes[p.splitname] if p.to is None else p.to,
            )
            for p in pieces
        ]

    def num_examples(self, split: Split) -> int:
        return sum(stop - start for _, start, stop in self._ranges(split))

    def records(self, split: Split) -> tf.data.Dataset:
        paths, labels = zip(
            *((self._files[s][0][a:b], self._files[s][1][a:b]) for s, a, b in self._ranges(split)),
            strict=True,
        )
        return tf.data.Dataset.from_tensor_slices(
            {"image": np.concatenate(paths), "label": np.concatenate(labels)}
        )

    def read(self, record: dict[str, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
        return tf.io.read_file(record["image"]), record["label"]
