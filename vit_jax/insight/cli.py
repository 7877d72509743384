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
Images come from the files or folders named, or from --dataset: a tfds name, "digits",
"mnist5k", or "folder:DIR" (DIR/SPLIT/<class>/..., or any folder of images). Paths are
relative to where the command is typed, or gs:// URLs. The figures' code
(`vit_jax.insight.figures`) is imported after parsing, so --help answers at once.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from vit_jax import cli


def _add_checkpoint_flags(parser: argparse.ArgumentParser, multiple: bool = False) -> None:
    if multiple:
        parser.add_argument(
            "--checkpoint",
            action="append",
            required=True,
            type=cli.absolute_path,
            help="Repeat to compare models.",
        )
        parser.add_argument("--label", action="append", help="Row label per --checkpoint.")
    else:
        parser.add_argument(
            "--checkpoint",
            required=True,
            type=cli.absolute_path,
            help="A vit-train workdir or .npz.",
        )
    parser.add_argument("--model", help="Model name, e.g. B/16 (bare .npz only).")
    parser.add_argument("--image_size", type=cli.positive_int, help="Input resolution in pixels.")


def _add_data_dir_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data_dir", type=cli.absolute_path, help="tfds data_dir (default: tfds' own)."
    )


def _add_dataset_flags(parser: argparse.ArgumentParser, count: int) -> None:
    parser.add_argument(
        "--dataset",
        type=cli.absolute_dataset,
        help='tfds name, "digits", "mnist5k" or "folder:DIR".',
    )
    parser.add_argument("--split", default="test", help="Split the images come from.")
    parser.add_argument("--num_images", type=cli.positive_int, default=count, help="Images to use.")
    _add_data_dir_flag(parser)


def _parse_shots(text: str) -> tuple[int, ...]:
    try:
        shots = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        shots = ()
    if not shots or min(shots) < 1 or len(set(shots)) < len(shots):
        raise argparse.ArgumentTypeError(
            f"--shots {text!r}: expected positive integers, each once: 1,5,10"
        )
    return shots


def fewshot_main(argv: Sequence[str] | None = None) -> int:
    """`vit-fewshot`: few-shot linear accuracy of a checkpoint's frozen features."""
    parser = cli.ArgumentParser(
        "vit-fewshot", "Few-shot linear accuracy of a checkpoint's frozen features."
    )
    _add_checkpoint_flags(parser)
    parser.add_argument(
        "--dataset",
        required=True,
        type=cli.absolute_dataset,
        help='tfds name, "digits", "folder:DIR".',
    )
    parser.add_argument("--train_split", default="train", help="Where the shots come from.")
    parser.add_argument("--test_split", default="test", help="Where accuracy is measured.")
    parser.add_argument("--shots", type=_parse_shots, default=(1, 5, 10, 25), help="e.g. 1,5,10")
    parser.add_argument(
        "--holdout_per_class", type=cli.positive_int, default=5, help="Picks the L2 strength."
    )
    parser.add_argument(
        "--batch_size", type=cli.positive_int, default=256, help="Images per forward pass."
    )
    _add_data_dir_flag(parser)
    args = parser.parse_args(argv)
    lever = f"a smaller --batch_size (now {args.batch_size})"
    return cli.run("vit-fewshot", lambda: _fewshot(args), memory_lever=lever)


def _fewshot(args: argparse.Namespace) -> int:
    from jax.sharding import NamedSharding, PartitionSpec

    from vit_jax import parallel
    from vit_jax.evaluators.fewshot import FewShotEvaluator
    from vit_jax.insight.loading import eval_config, load_features_model
    from vit_jax.preemption import StopRequests

    model, params, run = load_features_model(
        args.checkpoint, model=args.model, image_size=args.image_size
    )
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
    results = evaluator.run(params, StopRequests())
    for metric, accuracy in results.items():
        print(f"{metric}  {accuracy:.4f}")
    return 0


def visualize_main(argv: Sequence[str] | None = None) -> int:
    """`vit-visualize FIGURE ...`: one image of the paper's figures or a run's curves."""
    parser = cli.ArgumentParser(
        "vit-visualize", "The ViT paper's figures for a checkpoint, as PNG (or PDF, SVG, ...)."
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
    distance.add_argument(
        "--batch_size", type=cli.positive_int, default=32, help="Images per forward pass."
    )
    filters = figures.add_parser("filters", help="Embedding-filter components (Fig. 7).")
    _add_checkpoint_flags(filters)
    filters.add_argument("--count", type=cli.positive_int, default=28, help="Components to draw.")
    curves = figures.add_parser("curves", help="Loss, accuracy, lr, few-shot of a workdir.")
    curves.add_argument(
        "--workdir", required=True, type=cli.absolute_path, help="A vit-train workdir."
    )
    for sub in (rollout, posemb, distance, filters, curves):
        sub.add_argument(
            "--out", required=True, help="The image file to write: .png, .pdf, .svg, ..."
        )
    args = parser.parse_args(argv)

    def draw() -> int:
        from vit_jax.insight import plots

        # Before JAX and TensorFlow are loaded, and the checkpoint and the data read.
        plots.check_path(args.out)
        from vit_jax.insight.figures import DRAW

        DRAW[args.figure](args)
        print(f"Wrote {args.out}.")
        return 0

    # The figures that run the model: rollout on all its images at once, distance in batches.
    lever = None
    if args.figure == "rollout":
        lever = f"fewer images (--num_images, now {args.num_images}, or fewer files named)"
    elif args.figure == "distance":
        lever = f"a smaller --batch_size (now {args.batch_size})"
    return cli.run("vit-visualize", draw, memory_lever=lever)
