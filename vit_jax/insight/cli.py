"""`vit-fewshot` and `vit-visualize`: the few-shot probe and the paper's figures for a checkpoint.

    vit-fewshot --checkpoint /tmp/vit_local --dataset digits --shots 1,5,10,25
    vit-visualize rollout --checkpoint /tmp/vit_local --dataset mnist5k --out rollout.png
    vit-visualize posemb --checkpoint ViT-B_16.npz --model B/16 --image_size 224 --out pe.png
    vit-visualize distance --checkpoint /tmp/vit_local --dataset mnist5k --out distance.png
    vit-visualize filters --checkpoint /tmp/vit_local --out filters.png
    vit-visualize curves --workdir /tmp/vit_local --out curves.png

A checkpoint is a vit-train workdir, an `.npz` exported by vit-export, or any `.npz` with
--model and --image_size (see `vit_jax.insight.loading`). `rollout` takes several
--checkpoint flags (e.g. without and with registers) and draws one row per checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import jax
import numpy as np
import tensorflow as tf
from jax.sharding import NamedSharding, PartitionSpec

from vit_jax import parallel
from vit_jax.insight import maps, plots
from vit_jax.insight.fewshot import FewShotEvaluator
from vit_jax.insight.loading import dataset_images, eval_config, load_features_model
from vit_jax.metrics import METRICS_FILE
from vit_jax.predict import find_images, load_image


def _add_checkpoint_flags(parser: argparse.ArgumentParser, multiple: bool = False) -> None:
    if multiple:
        parser.add_argument(
            "--checkpoint", action="append", required=True, help="Repeat to compare models."
        )
        parser.add_argument("--label", action="append", help="Row label per --checkpoint.")
    else:
        parser.add_argument("--checkpoint", required=True, help="A vit-train workdir or .npz.")
    parser.add_argument("--model", help="Model name, e.g. B/16 (bare .npz only).")
    parser.add_argument("--image_size", type=int, help="Input resolution in pixels.")


def _load(args: argparse.Namespace, path: str | None = None) -> tuple:
    """`load_features_model` of `path` (default: --checkpoint) with the checkpoint flags."""
    path = args.checkpoint if path is None else path
    return load_features_model(path, model=args.model, image_size=args.image_size)


def _add_dataset_flags(parser: argparse.ArgumentParser, count: int) -> None:
    parser.add_argument("--dataset", help='tfds name, "digits", "mnist5k" or "folder:/path".')
    parser.add_argument("--split", default="test", help="Split the images come from.")
    parser.add_argument("--num_images", type=int, default=count, help="Images to use.")
    parser.add_argument("--data_dir", help="tfds data_dir (default: tfds' own).")


def _parse_shots(text: str) -> tuple[int, ...]:
    try:
        shots = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        shots = ()
    if not shots or min(shots) < 1:
        raise argparse.ArgumentTypeError(f"--shots {text!r}: expected positive integers: 1,5,10")
    return shots


def fewshot_main(argv: Sequence[str] | None = None) -> int:
    """`vit-fewshot`: few-shot linear accuracy of a checkpoint's frozen features."""
    parser = argparse.ArgumentParser(
        prog="vit-fewshot", description="Few-shot linear accuracy of a checkpoint's features."
    )
    _add_checkpoint_flags(parser)
    parser.add_argument("--dataset", required=True, help='tfds name, "digits", "folder:/path".')
    parser.add_argument("--train_split", default="train", help="Where the shots come from.")
    parser.add_argument("--test_split", default="test", help="Where accuracy is measured.")
    parser.add_argument("--shots", type=_parse_shots, default=(1, 5, 10, 25), help="e.g. 1,5,10")
    parser.add_argument("--holdout_per_class", type=int, default=5, help="Picks the L2 strength.")
    parser.add_argument("--batch_size", type=int, default=256, help="Images per forward pass.")
    parser.add_argument("--data_dir", help="tfds data_dir (default: tfds' own).")
    args = parser.parse_args(argv)
    try:
        model, params, run = _load(args)
        config = eval_config(run, args.dataset, args.test_split, args.batch_size, args.data_dir)
        name = args.dataset.rstrip("/").rsplit("/", 1)[-1]
        config.fewshot.datasets = {name: (args.dataset, args.train_split, args.test_split)}
        config.fewshot.shots = args.shots
        config.fewshot.holdout_per_class = args.holdout_per_class
        # The config's default, data parallel: parameters replicated, the batch split over
        # all devices.
        mesh = parallel.make_mesh(config.mesh, config.dcn_mesh)
        replicated = NamedSharding(mesh, PartitionSpec())
        rules = parallel.resolve_rules(config.sharding_rules)
        evaluator = FewShotEvaluator(config, model, mesh, rules, replicated)
        results = evaluator.evaluate(params)
    except (ValueError, FileNotFoundError) as e:
        print(f"vit-fewshot: {e}", file=sys.stderr)
        return 2
    for metric, accuracy in results.items():
        print(f"{metric}  {accuracy:.4f}")
    return 0


def _images(args: argparse.Namespace, run: dict) -> np.ndarray:
    """uint8 images: the files named, else the first --num_images of --dataset."""
    size, fraction = run["image_size"], run.get("eval_crop_fraction", 1.0)
    if args.images:
        return np.stack([load_image(path, size, fraction) for path in find_images(args.images)])
    if not args.dataset:
        raise ValueError("Name image files, or a --dataset to take --num_images images from.")
    return dataset_images(run, args.dataset, args.split, args.num_images, args.data_dir)


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
    path = os.path.join(args.workdir, METRICS_FILE)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"No {METRICS_FILE} in {args.workdir}: is it a vit-train workdir?")
    with tf.io.gfile.GFile(path) as f:
        series = maps.metric_series(f)
    if not series:
        raise ValueError(f"{path} holds no metrics yet.")
    plots.plot_training_curves(series, f"Training curves of {args.workdir}", args.out)


def visualize_main(argv: Sequence[str] | None = None) -> int:
    """`vit-visualize FIGURE ...`: one PNG of the paper's figures or a run's curves."""
    parser = argparse.ArgumentParser(
        prog="vit-visualize", description="The ViT paper's figures for a checkpoint, as PNG."
    )
    figures = parser.add_subparsers(dest="figure", required=True)
    rollout = figures.add_parser("rollout", help="Attention rollout over images (Fig. 6).")
    _add_checkpoint_flags(rollout, multiple=True)
    rollout.add_argument("images", nargs="*", help="Image files or folders.")
    _add_dataset_flags(rollout, count=6)
    posemb = figures.add_parser("posemb", help="Position-embedding similarity (Fig. 7).")
    _add_checkpoint_flags(posemb)
    distance = figures.add_parser("distance", help="Mean attention distance (Fig. 7).")
    _add_checkpoint_flags(distance)
    distance.add_argument("images", nargs="*", help="Image files or folders.")
    _add_dataset_flags(distance, count=128)
    distance.add_argument("--batch_size", type=int, default=32, help="Images per forward pass.")
    filters = figures.add_parser("filters", help="Embedding-filter components (Fig. 7).")
    _add_checkpoint_flags(filters)
    filters.add_argument("--count", type=int, default=28, help="Components to draw.")
    curves = figures.add_parser("curves", help="Loss, accuracy, lr, few-shot of a workdir.")
    curves.add_argument("--workdir", required=True, help="A vit-train workdir.")
    for sub in (rollout, posemb, distance, filters, curves):
        sub.add_argument("--out", required=True, help="The PNG file to write.")
    args = parser.parse_args(argv)
    draw = {
        "rollout": _rollout,
        "posemb": _posemb,
        "distance": _distance,
        "filters": _filters,
        "curves": _curves,
    }
    try:
        draw[args.figure](args)
    except (ValueError, FileNotFoundError) as e:
        print(f"vit-visualize: {e}", file=sys.stderr)
        return 2
    print(f"Wrote {args.out}.")
    return 0
