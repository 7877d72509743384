"""`vit-visualize`'s figures, each drawn from its parsed command line (see `vit_jax.insight.cli`).

Imported once the command line is parsed: the figures need JAX, TensorFlow and matplotlib.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from collections.abc import Callable

import jax
import numpy as np
import tensorflow as tf

from vit_jax import metrics
from vit_jax.insight import maps, plots
from vit_jax.insight.loading import dataset_images, load_features_model
from vit_jax.predict import find_images, readable_images


def _load(args: argparse.Namespace, path: str | None = None) -> tuple:
    """`load_features_model` of `path` (default: --checkpoint) with the checkpoint flags."""
    path = args.checkpoint if path is None else path
    return load_features_model(path, model=args.model, image_size=args.image_size)


def _images(args: argparse.Namespace, run: dict) -> np.ndarray:
    """uint8 images: every file named, else the first --num_images of --dataset.

    A `folder:DIR` without the split's folder (DIR/test/<class>/...) is read as image
    files in any layout. Fewer images than --num_images are all used, with a note.
    """
    size, fraction = run["image_size"], run.get("eval_crop_fraction", 1.0)
    files, count = args.images, None
    if not files and args.dataset and args.dataset.startswith("folder:"):
        folder = args.dataset.removeprefix("folder:")
        if not tf.io.gfile.isdir(f"{folder}/{args.split}"):
            files, count = [folder], args.num_images
    if files:
        paths = list(itertools.islice(find_images(files), count))
        if not paths:
            raise ValueError(f"No .jpg, .jpeg or .png files in {', '.join(files)}.")
        loaded = [image for _, image in readable_images(paths, size, fraction, "vit-visualize")]
        if not loaded:
            raise ValueError(f"None of the images named could be read: {', '.join(paths)}.")
        images = np.stack(loaded)
    elif args.dataset:
        images = dataset_images(run, args.dataset, args.split, args.num_images, args.data_dir)
    else:
        raise ValueError("Name image files, or a --dataset to take --num_images images from.")
    if not args.images and len(images) < args.num_images:
        print(
            f"vit-visualize: {args.dataset} has {len(images)} images, fewer than "
            f"--num_images {args.num_images}: drawing from all {len(images)}.",
            file=sys.stderr,
        )
    return images


def _rollout(args: argparse.Namespace) -> None:
    labels = args.label or [os.path.basename(c.rstrip("/")) for c in args.checkpoint]
    if len(labels) != len(args.checkpoint):
        raise ValueError(f"Got {len(labels)} --label for {len(args.checkpoint)} --checkpoint.")
    images, rows = None, []
    for path in args.checkpoint:
        model, params, run = _load(args, path)
        if images is None:
            images = _images(args, run)
        elif images.shape[1] != run["image_size"]:
            raise ValueError(
                f"{path} takes {run['image_size']} px images, the first checkpoint "
                f"{images.shape[1]} px: pass --image_size to compare them at one size."
            )
        attention = maps.attention_fn(model)(params, images)
        rows.append(maps.rollout_maps(attention, maps.patch_grid(model, run["image_size"])))
    plots.plot_rollout(images, rows, labels, args.out)


def _posemb(args: argparse.Namespace) -> None:
    model, params, run = _load(args)
    grid = maps.patch_grid(model, run["image_size"])
    similarity = maps.cosine_similarity(maps.patch_position_embeddings(model, params, grid))
    plots.plot_posemb_similarity(similarity, grid, args.out)


def _distance(args: argparse.Namespace) -> None:
    model, params, run = _load(args)
    images, size = _images(args, run), run["image_size"]
    grid = maps.patch_grid(model, size)
    pixels = size // grid[0]  # A patch's side in input pixels, a hybrid stem's stride included.
    distance = maps.attention_distance_fn(model, grid, pixels)
    params = jax.device_put(params)  # Once, not with every chunk.
    distances = [
        distance(params, chunk) * len(chunk)
        for chunk in np.array_split(images, -(-len(images) // args.batch_size))
    ]
    plots.plot_attention_distance(np.sum(distances, axis=0) / len(images), size, args.out)


def _filters(args: argparse.Namespace) -> None:
    model, params, _ = _load(args)
    filters, what = maps.pixel_filters(model, params)
    components, explained = maps.principal_components(filters, args.count)
    plots.plot_filter_components(components, explained, what, args.out)


def _curves(args: argparse.Namespace) -> None:
    series = maps.metric_series(metrics.read_lines(args.workdir))
    if not series:
        raise ValueError(f"{args.workdir} holds no metrics yet.")
    plots.plot_training_curves(series, f"Training curves of {args.workdir}", args.out)


DRAW: dict[str, Callable[[argparse.Namespace], None]] = {
    "rollout": _rollout,
    "posemb": _posemb,
    "distance": _distance,
    "filters": _filters,
    "curves": _curves,
}
