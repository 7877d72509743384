"""`vit-predict`: the top-k classes of image files under a trained ViT.

    vit-predict --checkpoint /tmp/vit_local --top_k 3 digit.png more_digits/
    vit-predict --checkpoint ViT-B_16.npz --model B/16 --num_classes 1000 --image_size 384 cat.jpg

The checkpoint is a vit-train workdir (its latest step), a file with the `.json` that
vit-export writes next to it, or a bare published file: an `.npz` in any Google layout
(the i21k ones with their representation layer too) or a `.safetensors` in timm's or
transformers' ViT layout (a sharded one: its `.safetensors.index.json`). A bare file's
class count, pooling, representation layer, activation and, for plain ViTs, size and
resolution are read from its weights; pass --model (hybrids), --image_size (hybrids)
when it cannot tell, and classes are printed as indices. These flags also override what
the run says (e.g. --image_size, with the position embedding resampled). Images are
preprocessed as evaluation does (vit_jax.data.preprocess: decode to RGB, resize /
central crop by the run's `pp.eval_crop_fraction`, values in [-1, 1]). Folders are
searched recursively for .jpg/.jpeg/.png files. A file that cannot be read is reported
on stderr and the others are still classified; the exit code is non-zero only when no
image could be classified.

Output, per image: its path, then one line per class, most probable first:

    digits/7.png
      0.9912  7
      0.0041  1
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from vit_jax import cli

# JAX, TensorFlow and the model library are imported where they are used, after the command
# line is parsed: `vit-predict --help` and its usage errors answer at once.
if TYPE_CHECKING:
    from vit_jax.models import VisionTransformer

T = TypeVar("T")


def classifier(
    model: VisionTransformer, params: Any, run: dict[str, Any]
) -> Callable[[np.ndarray], np.ndarray]:
    """A function from a batch of preprocessed images to class probabilities.

    Probabilities are softmax, or per-class sigmoids for runs trained with sigmoid_xent.
    """
    if not np.any(params["head"]["kernel"]):
        raise ValueError(
            "The classification head loaded is all zeros, so every image would get the same "
            "probabilities: the checkpoint's head has another class count, or the model "
            "lacks its representation layer. Check --model and --num_classes."
        )
    import jax

    from vit_jax.models import scale_images
    from vit_jax.parallel import host_arrays

    squash = jax.nn.sigmoid if run.get("loss") == "sigmoid_xent" else jax.nn.softmax
    apply = jax.jit(lambda p, x: squash(model.apply({"params": p}, scale_images(x), train=False)))
    return lambda images: host_arrays(apply(params, images))


def find_images(paths: Sequence[str]) -> Iterator[str]:
    """Files named directly, and every .jpg/.jpeg/.png under named folders: each folder's
    files in sorted order, then its subfolders'. A folder that cannot be listed is named on
    stderr and skipped, as an unreadable file is; a link back to a folder seen is not
    followed again."""
    import tensorflow as tf

    from vit_jax.data.folder import IMAGE_EXTENSIONS

    seen = set()

    def walk(folder: str) -> Iterator[str]:
        real = folder if "://" in folder else os.path.realpath(folder)
        if real in seen:
            return
        seen.add(real)
        try:
            names = sorted(name.rstrip("/") for name in tf.io.gfile.listdir(folder))
        except tf.errors.OpError as e:
            print(f"vit-predict: cannot list {cli.error_line(e)}", file=sys.stderr)  # Named.
            return
        children = [os.path.join(folder, name) for name in names]
        folders = [child for child in children if tf.io.gfile.isdir(child)]
        for child in children:
            if child not in folders and os.path.splitext(child)[1].lower() in IMAGE_EXTENSIONS:
                yield child
        for child in folders:
            yield from walk(child)

    for path in paths:
        if tf.io.gfile.isdir(path):
            yield from walk(path)
        else:
            yield path


def load_image(path: str, size: int, crop_fraction: float) -> np.ndarray:
    """One image file as the evaluation pipeline feeds it to the model: uint8 [size, size, 3]."""
    import tensorflow as tf

    from vit_jax.data import preprocess

    encoded = tf.io.read_file(path)
    return preprocess.decode_and_central_crop(encoded, size, crop_fraction).numpy()


def readable_images(
    paths: Iterable[str], size: int, crop_fraction: float, prog: str
) -> Iterator[tuple[str, np.ndarray]]:
    """(path, `load_image`) of each file that reads as an image; each other one (missing,
    unreadable, no image) is named on stderr as `prog: cannot read PATH: why` and skipped."""
    import tensorflow as tf

    for path in paths:
        try:
            yield path, load_image(path, size, crop_fraction)
        except (OSError, tf.errors.OpError) as e:
            print(f"{prog}: cannot read {path}: {cli.error_line(e)}", file=sys.stderr)


def _batches(files: Iterator[T], batch_size: int) -> Iterator[list[T]]:
    batch = []
    for path in files:
        batch.append(path)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser("vit-predict", __doc__)
    parser.add_argument("images", nargs="+", help="Image files or folders.")
    parser.add_argument(
        "--checkpoint",
        required=True,
        type=cli.absolute_path,
        help="A vit-train workdir, an .npz or a .safetensors, or a sharded checkpoint's "
        ".safetensors.index.json (local or gs://).",
    )
    parser.add_argument(
        "--top_k", type=cli.positive_int, default=5, help="Classes printed per image."
    )
    parser.add_argument("--model", help="Model name, e.g. B/16 (bare files only).")
    parser.add_argument("--num_classes", type=cli.positive_int, help="Head size (bare files only).")
    parser.add_argument("--image_size", type=cli.positive_int, help="Input resolution in pixels.")
    parser.add_argument(
        "--batch_size", type=cli.positive_int, default=32, help="Images per forward pass."
    )
    args = parser.parse_args(argv)
    lever = f"a smaller --batch_size (now {args.batch_size})"
    return cli.run("vit-predict", lambda: _predict(args), memory_lever=lever)


def _predict(args: argparse.Namespace) -> int:
    """Prints the top classes of every image named; 1 when none could be classified."""
    from vit_jax import checkpoint

    model, params, run = checkpoint.load_model(
        args.checkpoint,
        model=args.model,
        num_classes=args.num_classes,
        image_size=args.image_size,
    )
    classify = classifier(model, params, run)
    names = run.get("class_names") or [str(i) for i in range(run["num_classes"])]
    size, crop_fraction = run["image_size"], run.get("eval_crop_fraction", 1.0)
    top_k = min(args.top_k, run["num_classes"])
    classified = 0
    found = readable_images(find_images(args.images), size, crop_fraction, "vit-predict")
    for batch in _batches(found, args.batch_size):
        images = np.zeros((args.batch_size, size, size, 3), np.uint8)  # One compiled shape.
        readable = [path for path, _ in batch]
        images[: len(batch)] = [image for _, image in batch]
        for path, probs in zip(readable, classify(images), strict=False):
            print(path)
            for i in np.argsort(-probs, kind="stable")[:top_k]:
                print(f"  {probs[i]:.4f}  {names[i]}")
        sys.stdout.flush()
        classified += len(readable)
    if not classified:
        print("vit-predict: no image could be classified.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
