"""A folder of ImageNet-like JPEG photos, made offline from scikit-image's sample photos.

Input-pipeline speed depends on what is decoded: these are 500x375 (or 375x500) JPEGs of
real scenes at quality 90, like a typical ImageNet image, laid out as an image folder
(`root/train/<class>/<n>.jpg`) that `folder:root` reads. Random crops, flips and
orientations of the colour photos that ship in scikit-image's wheel, seeded: the same
folder on every machine.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
from etils import epath
from PIL import Image

SOURCE_PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "ihc.png",
)
SIZE = (500, 375)  # width, height of a landscape photo.


def _source_dir() -> str:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "Making benchmark photos needs scikit-image's sample photos: "
            'pip install -e ".[bench]" (or pip install scikit-image).'
        )
    return os.path.join(spec.submodule_search_locations[0], "data")


def make_photo_folder(
    root: str,
    count: int = 1000,
    num_classes: int = 10,
    seed: int = 0,
    size: tuple[int, int] = SIZE,
) -> str:
    """Writes `count` JPEGs of `size` (width, height; a quarter of them turned to portrait)
    under `root/train/<class>/` (local or `gs://`); returns the `folder:` dataset name."""
    if count < num_classes:
        raise ValueError(f"count={count} must be at least num_classes={num_classes}.")
    rng = np.random.default_rng(seed)
    sources = [
        Image.open(os.path.join(_source_dir(), name)).convert("RGB") for name in SOURCE_PHOTOS
    ]
    for i in range(count):
        photo = sources[i % len(sources)]
        portrait = rng.random() < 0.25
        width, height = size[::-1] if portrait else size
        # A random window of 50..100% of the photo's side at the output's aspect ratio.
        scale = rng.uniform(0.5, 1.0) * min(photo.width / width, photo.height / height)
        w, h = int(width * scale), int(height * scale)
        left = int(rng.integers(0, photo.width - w + 1))
        top = int(rng.integers(0, photo.height - h + 1))
        image = photo.crop((left, top, left + w, top + h)).resize((width, height), Image.BICUBIC)
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        folder = epath.Path(root) / "train" / f"class{i % num_classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / f"{i:05d}.jpg").open("wb") as f:
            image.save(f, format="JPEG", quality=90)
    return f"folder:{root}"
