"""Image-folder datasets (`folder:/path/to/root`) as a `Source`, for data that is not in tfds.

Layout: `root/<split>/<class>/<image>` with .jpg/.jpeg/.png files (any case), grayscale or
colour, e.g. `root/train/cat/001.jpg`, `root/test/dog/17.png`. Split names are the
subdirectory names, class names the sorted class directory names, which must be the same in
every split. The root may be local or on `gs://` (listed with `tf.io.gfile`).

Within a split, examples are ordered by a hash of their `class/file` path: a fixed,
listing-independent order that is not sorted by class, like the shuffled order tfds writes.
So `train[:10%]` is a random-looking 10% and a small shuffle buffer still mixes classes.

Which files are used comes from the folder's manifest (`folder_manifest.py`): every file is
decoded once, by one process, and files that are empty, not JPEG/PNG, truncated or corrupt
are left out of their split, each named with its reason in a warning at every start.
"""

import hashlib
import logging
from collections.abc import Callable

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vit_jax.data.folder_manifest import (
    IMAGE_EXTENSIONS,
    Images,
    manifest_path,
    validated_listing,
)
from vit_jax.data.source import SPLIT_FLAGS, DatasetInfo, Split

log = logging.getLogger(__name__)


def _hash_order(paths: list[str]) -> list[str]:
    return sorted(paths, key=lambda p: hashlib.md5(p.encode()).hexdigest())


class FolderSource:
    """Images in `root/<split>/<class>/` directories."""

    def __init__(
        self,
        root: str,
        manifest_dir: str | None = None,
        *,
        writer: bool = True,
        barrier: Callable[[], None] | None = None,
    ):
        """Opens `root` through its manifest (see `folder_manifest.validated_listing` for
        `manifest_dir`, `writer` and `barrier`).

        Raises:
          FileNotFoundError: no folder (or none named), no splits, or a class directory
            without images.
          ValueError: fewer than two classes, or splits with different class directories.
          FolderUnreadableError: a file that cannot be read, named.
        """
        if not root.strip():
            raise FileNotFoundError("folder: names no directory; give folder:/path/to/root.")
        self.root = root.rstrip("/")
        images, rejected = validated_listing(
            self.root, manifest_dir, writer=writer, barrier=barrier
        )
        splits = sorted(images)
        reference = "train" if "train" in splits else splits[0]
        class_names = tuple(sorted(images[reference]))
        if len(class_names) < 2:
            raise ValueError(
                f"Split {reference!r} of {self.root} has only the class directories "
                f"{list(class_names)}: a classifier needs two or more, one per class "
                f"({self.root}/{reference}/<class>/<image>)."
            )
        self._files: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for split in splits:
            classes = tuple(sorted(images[split]))
            if classes != class_names:
                raise ValueError(
                    f"Split {split!r} of {self.root} has classes that differ from split "
                    f"{reference!r}: missing {sorted(set(class_names) - set(classes))}, "
                    f"extra {sorted(set(classes) - set(class_names))}. Every split needs the "
                    "same class directories so labels mean the same thing."
                )
            if rejected[split]:
                log.warning(
                    "Skipping %d file(s) of %s/%s that are no usable images: %s%s. The "
                    "verdicts are kept in %s: delete it to check every file again.",
                    len(rejected[split]),
                    self.root,
                    split,
                    "; ".join(f"{p} ({why})" for p, why in list(rejected[split].items())[:20]),
                    "; ..." if len(rejected[split]) > 20 else "",
                    manifest_path(self.root, manifest_dir),
                )
            self._files[split] = self._split_files(split, images[split])
        self.info = DatasetInfo(
            num_classes=len(class_names),
            class_names=class_names,
            split_sizes={s: len(paths) for s, (paths, _) in self._files.items()},
            fingerprint=self._listing_digest(),
        )
        self._split_infos = {
            s: tfds.core.SplitInfo(name=s, shard_lengths=[n], num_bytes=0)
            for s, n in self.info.split_sizes.items()
        }

    def _listing_digest(self, chunk: int = 100_000) -> str:
        """A digest of every split's files and labels in their order (in chunks: a folder
        may hold millions)."""
        digest = hashlib.sha256()
        for split, (paths, labels) in sorted(self._files.items()):
            digest.update(f"{split} {len(paths)}".encode())
            for start in range(0, len(paths), chunk):
                digest.update(paths[start : start + chunk].tobytes())
            digest.update(labels.tobytes())
        return digest.hexdigest()[:12]

    def _split_files(self, split: str, classes: Images) -> tuple[np.ndarray, np.ndarray]:
        """(paths, int64 labels) of a split's images in their fixed order."""
        if not classes:
            raise FileNotFoundError(f"Split directory {self.root}/{split} has no class folders")
        empty = [name for name, files in classes.items() if not files]
        if empty:
            raise FileNotFoundError(
                f"Class directory {self.root}/{split}/{empty[0]} holds no "
                f"{'/'.join(IMAGE_EXTENSIONS)} images (files that are no images are skipped)"
            )
        ordered = _hash_order([f"{name}/{f}" for name, files in classes.items() for f in files])
        label_of = {name: i for i, name in enumerate(sorted(classes))}
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
                f"({self.root}/<split>/<class>/<image>). {SPLIT_FLAGS}"
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
