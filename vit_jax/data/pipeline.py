"""Training and evaluation streams: host-local numpy batches for every process.

Datasets are named by `config.dataset`: a prepared tfds name (`data_dir` local, `gs://...`,
or None for the tfds default), an embedded offline dataset ("digits", "mnist5k", prepared
on first use), or an image folder "folder:/path/to/root" (see `folder.py`; `data_dir`, if
set, is where its manifest is kept).

Config fields read (an `ml_collections.ConfigDict`):

    dataset, data_dir            where the data is (above)
    train_split, eval_split      tfds split syntax, e.g. "train[:90%]", "test"
    train_examples_per_class     int | None: few-shot, keep the first N examples of each class
                                 of train_split in its stored order (deterministic)
    image_size                   output images are image_size x image_size
    batch_size, eval_batch_size  global batch sizes; each share yields batch // shares
    shuffle_buffer, seed         train shuffling and all train randomness
    pp.train_crop                "inception" (random resized crop, area pp.crop_area_min..1,
                                 aspect 3/4..4/3) | "shift" (resize, pad pp.shift_pixels,
                                 random crop back) | "resize"
    pp.crop_area_min, pp.shift_pixels
    pp.flip                      random horizontal flip
    pp.randaugment_layers        0 = off; pp.randaugment_magnitude on the paper's 0..30 scale
    pp.eval_crop_fraction        eval: the central square of this fraction of the shorter side
                                 (1.0 = plain resize to image_size x image_size)
    pp.antialias                 antialiased resizing (slower; off as in the original code)

Batches: "image" uint8 [B, H, W, 3] (grayscale becomes RGB), "label" int32 [B]; eval batches
add "mask" float32 [B]. Scaling to [-1, 1], one-hot targets and mixup (`pp.mixup_alpha`) run
on the device, inside the jitted step (`vit_jax.trainer`): a uint8 image is a quarter of the
bytes of a float32 one to move from host to device.

Host throughput: tf.data runs on a private thread pool sized to the host's cores, under a
RAM budget for autotuning; see `_as_numpy`. (Intra-op parallelism 1, often advised for
tf.data, is not set: in a process that also runs XLA's CPU collectives, as the tests with
simulated devices do, it stalls those collectives until XLA aborts.)

Shares: each global batch is loaded in P shares, one per process, except where processes
hold the same rows of the batch (tensor parallelism across hosts): those load the same
share (`parallel.batch_share` says which; every stream takes it).

Resumable training stream. Share p of P reads its own part of the train split
(`tfds.even_splits` semantics) and the stream is a pure function of (seed, p, P, step):
  * epoch e is the part shuffled with a seed derived from (seed, p, e), so position i of
    the infinite stream is example i % n of epoch i // n (n = part size);
  * example i is augmented with stateless ops seeded by (seed, p, i);
  * mixup of step s is seeded on the device by (seed, s).
`train_batches(config, start_step=s)` therefore starts at epoch (s * B) // n and drops the
first (s * B) % n records of it before decoding: resuming costs at most one epoch of record
reads and yields exactly the batches an uninterrupted run would have. Few-shot selection
reads the split's records up to the point where every class is full, on every start.

RandAugment applies to the training stream only; evaluation is deterministic.
"""

import functools
import os
from collections.abc import Callable, Iterator

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vit_jax import processes
from vit_jax.config import check_preprocessing
from vit_jax.data import preprocess
from vit_jax.data.folder import FolderSource
from vit_jax.data.randaugment import randaugment
from vit_jax.data.source import DatasetInfo, Source
from vit_jax.data.tfds_source import TfdsSource

FOLDER_PREFIX = "folder:"
Batch = dict[str, np.ndarray]


def folder_root(dataset: str) -> str | None:
    """The image folder a `folder:DIR` dataset names, without a trailing slash; None for a
    tfds name."""
    if not dataset.startswith(FOLDER_PREFIX):
        return None
    return dataset.removeprefix(FOLDER_PREFIX).rstrip("/")


@functools.cache
def open_source(dataset: str, data_dir: str | None) -> Source:
    """The dataset behind a config's `dataset`/`data_dir`, opened once per process.

    Cached because opening lists folders or reads tfds metadata, possibly on GCS. For an
    image folder, `data_dir` (if set) is where its manifest is kept; process 0 writes it
    and the others wait for it at a barrier, as they wait for process 0 to prepare an
    embedded dataset, so every process of a run opens the source.

    Raises:
      ValueError: a path given without `folder:` (and `FolderSource`'s and `TfdsSource`'s
        errors for what they cannot open).
    """
    barrier = processes.barrier if jax.process_count() > 1 else None
    if dataset.startswith(FOLDER_PREFIX):
        return FolderSource(
            dataset.removeprefix(FOLDER_PREFIX),
            data_dir,
            writer=jax.process_index() == 0,
            barrier=barrier,
        )
    if dataset.startswith(("/", "./", "../", "~")) or "://" in dataset:
        raise ValueError(
            f"Unknown dataset {dataset!r}: a path is no tfds name. An image folder is given as "
            f"'{FOLDER_PREFIX}{dataset}': its split folders (train/, test/) hold a folder of "
            "images per class."
        )
    return TfdsSource(dataset, data_dir, writer=jax.process_index() == 0, barrier=barrier)


def get_dataset_info(dataset: str, data_dir: str | None) -> DatasetInfo:
    """Class count, class names and split sizes, e.g. to size the model head."""
    return open_source(dataset, data_dir).info


def _check_share(share_index: int, share_count: int) -> None:
    if not 0 <= share_index < share_count:
        raise ValueError(f"share_index {share_index} is not in [0, share_count={share_count})")


def _local_batch_size(global_batch: int, share_count: int, field: str) -> int:
    if global_batch <= 0 or global_batch % share_count:
        raise ValueError(
            f"config.{field}={global_batch} must be a positive multiple of the number of "
            f"shares processes load it in ({share_count}): every share is the same size."
        )
    return global_batch // share_count


# Autotuning may use this much host RAM for buffers (prefetch, parallel map outputs).
AUTOTUNE_RAM_BUDGET_BYTES = 4 * 2**30


def host_cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine's total)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _unconverted(fn: Callable) -> Callable:
    """`fn` traced for `Dataset.map` as written, without AutoGraph's rewrite of its Python.

    The per-example ops branch and loop on tensors through `tf.cond`, `tf.switch_case` and
    `tf.while_loop` (preprocess.py, randaugment.py); their Python `if`s read config values.
    AutoGraph has nothing to convert there, and parsing and rewriting their source cost
    1-2 s of CPU per stream opened (with RandAugment, 2 s of a tiny run's 3 s to its first
    batch)."""
    return tf.autograph.experimental.do_not_convert(fn)


def _as_numpy(ds: tf.data.Dataset) -> Iterator[Batch]:
    options = tf.data.Options()
    options.deterministic = True  # Needed for the bit-exact resume.
    options.threading.private_threadpool_size = host_cores()
    options.autotune.ram_budget = AUTOTUNE_RAM_BUDGET_BYTES
    return ds.prefetch(tf.data.AUTOTUNE).with_options(options).as_numpy_iterator()


def _first_per_class(
    source: Source, split: str, per_class: int
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Records of the first `per_class` examples of every class in the split's order, and the
    names of the classes of which the split has fewer.

    Reads undecoded records only, and stops as soon as every class is full.
    """
    counts = np.zeros(source.info.num_classes, np.int64)
    kept = []
    for record in source.records(split).as_numpy_iterator():
        if counts[record["label"]] < per_class:
            counts[record["label"]] += 1
            kept.append(record)
            if counts.min() == per_class:
                break
    records = {
        "image": np.array([r["image"] for r in kept], dtype=object),
        "label": np.array([r["label"] for r in kept], np.int64),
    }
    short = [source.info.class_names[c] for c in np.flatnonzero(counts < per_class)]
    return records, short


def short_classes(dataset: str, data_dir: str | None, split: str, per_class: int) -> list[str]:
    """Names of the classes with fewer than `per_class` examples in `split` of `dataset`.

    Reads the split's undecoded records until every class has `per_class` of them: for a
    balanced split, about `per_class` times the class count.
    """
    return _first_per_class(open_source(dataset, data_dir), split, per_class)[1]


def _train_shard(
    source: Source, config: ml_collections.ConfigDict, share_index: int, share_count: int
) -> tuple[tf.data.Dataset, int]:
    """The share's train records in their fixed order, and how many there are."""
    per_class = config.train_examples_per_class
    if per_class is None:
        split = tfds.even_splits(config.train_split, share_count)[share_index]
        records, size = source.records(split), source.num_examples(split)
    else:
        kept, short = _first_per_class(source, config.train_split, per_class)
        if short:
            raise ValueError(
                f"config.train_examples_per_class={per_class}, but split "
                f"{config.train_split!r} has fewer examples of classes {short}"
            )
        mine = np.array_split(np.arange(len(kept["label"])), share_count)[share_index]
        records = tf.data.Dataset.from_tensor_slices({k: v[mine] for k, v in kept.items()})
        size = len(mine)
    if size == 0:
        raise ValueError(
            f"Share {share_index} of {share_count} got no examples of train split "
            f"{config.train_split!r}; use a larger split or fewer processes."
        )
    return records, size


def _train_example_fn(
    source: Source, config: ml_collections.ConfigDict
) -> Callable[[dict[str, tf.Tensor], tf.Tensor], dict[str, tf.Tensor]]:
    pp, size = config.pp, config.image_size
    check_preprocessing(pp)
    crop, area_min, shift, flip = pp.train_crop, pp.crop_area_min, pp.shift_pixels, pp.flip
    ra_layers, ra_magnitude = pp.randaugment_layers, pp.randaugment_magnitude
    antialias = pp.antialias

    def example(record: dict[str, tf.Tensor], seed: tf.Tensor) -> dict[str, tf.Tensor]:
        encoded, label = source.read(record)
        crop_seed, flip_seed, ra_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
        if crop == "inception":
            image = preprocess.decode_and_inception_crop(
                encoded, crop_seed, size, area_min, antialias
            )
        else:
            image = preprocess.decode_and_resize(encoded, size, antialias)
            if crop == "shift":
                image = preprocess.random_shift(image, crop_seed, size, shift)
        if flip:
            image = preprocess.random_flip(image, flip_seed)
        image = preprocess.to_uint8(image)  # Once, after the float ops; a no-op on uint8.
        if ra_layers:
            image = randaugment(image, ra_seed, ra_layers, ra_magnitude)
        return {"image": image, "label": tf.cast(label, tf.int32)}

    return example


def train_batches(
    config: ml_collections.ConfigDict,
    *,
    start_step: int = 0,
    share_index: int,
    share_count: int,
) -> Iterator[Batch]:
    """Endless augmented batches of one share of the train split, starting at `start_step`.

    Yields {"image": uint8 [B, H, W, 3], "label": int32 [B]} with B = batch_size // share_count;
    batch s is the same whatever `start_step` the stream began at (see module docstring).
    The share is `parallel.batch_share`'s (one process alone: 0 of 1).
    """
    _check_share(share_index, share_count)
    local_batch = _local_batch_size(config.batch_size, share_count, "batch_size")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    source = open_source(config.dataset, config.data_dir)
    records, size = _train_shard(source, config, share_index, share_count)
    example = _train_example_fn(source, config)
    base = tf.constant([config.seed, share_index], tf.int64)
    shuffle_key, example_key = tf.unstack(tf.random.experimental.stateless_split(base, 2))
    fold_in = tf.random.experimental.stateless_fold_in
    buffer = max(1, min(config.shuffle_buffer, size))

    def epoch(index: tf.Tensor) -> tf.data.Dataset:
        seed = tf.random.stateless_uniform(
            [], fold_in(shuffle_key, index), minval=None, maxval=None, dtype=tf.int64
        )
        return records.shuffle(buffer, seed=seed)

    first = start_step * local_batch
    ds = tf.data.Dataset.counter(first // size).flat_map(epoch).skip(first % size)
    ds = ds.enumerate(first).map(
        _unconverted(lambda i, record: example(record, fold_in(example_key, i))),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    return _as_numpy(ds.batch(local_batch, drop_remainder=True))


def num_train_examples(config: ml_collections.ConfigDict) -> int:
    """Examples in one epoch over all processes: the train split, or N per class (few-shot)."""
    source = open_source(config.dataset, config.data_dir)
    if config.train_examples_per_class is not None:
        return config.train_examples_per_class * source.info.num_classes
    return source.num_examples(config.train_split)


def num_eval_batches(config: ml_collections.ConfigDict, share_count: int) -> int:
    """Batches every share of `eval_batches` yields (the same for all of them)."""
    local_batch = _local_batch_size(config.eval_batch_size, share_count, "eval_batch_size")
    source = open_source(config.dataset, config.data_dir)
    # The whole split first: an unknown or empty one is named as the config gives it, not
    # as one share of it.
    if not source.num_examples(config.eval_split):
        raise ValueError(f"Eval split {config.eval_split!r} of {config.dataset!r} is empty")
    shards = tfds.even_splits(config.eval_split, share_count)
    return -(-max(source.num_examples(s) for s in shards) // local_batch)


def eval_batches(
    config: ml_collections.ConfigDict,
    *,
    share_index: int,
    share_count: int,
) -> Iterator[Batch]:
    """One share of the eval split, once, padded to `num_eval_batches` batches.

    Yields {"image", "label", "mask"}; mask is 1 for real examples and 0 for padding. All
    shares together cover the split exactly once, and each yields the same number of
    batches, as building global arrays needs every process at every step. The share is
    `parallel.batch_share`'s (one process alone: 0 of 1).
    """
    _check_share(share_index, share_count)
    local_batch = _local_batch_size(config.eval_batch_size, share_count, "eval_batch_size")
    num_batches = num_eval_batches(config, share_count)
    source = open_source(config.dataset, config.data_dir)
    split = tfds.even_splits(config.eval_split, share_count)[share_index]
    check_preprocessing(config.pp)
    size, fraction = config.image_size, config.pp.eval_crop_fraction
    antialias = config.pp.antialias

    def example(record: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        encoded, label = source.read(record)
        image = preprocess.decode_and_central_crop(encoded, size, fraction, antialias)
        return {"image": image, "label": tf.cast(label, tf.int32), "mask": 1.0}

    padding = {
        "image": tf.zeros([size, size, 3], tf.uint8),
        "label": tf.constant(0, tf.int32),
        "mask": tf.constant(0.0),
    }
    num_padding = num_batches * local_batch - source.num_examples(split)
    ds = source.records(split).map(_unconverted(example), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat(num_padding))
    return _as_numpy(ds.batch(local_batch))
