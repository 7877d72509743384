"""What the pipeline needs from a dataset, whatever stores it (tfds or an image folder).

A source hands out *records*: small dicts `{"image": tf.string, "label": tf.int64}` in a fixed
order, where "image" is still encoded bytes (tfds) or a file path (folders). Shuffling and
resume-skipping happen on records, so they stay cheap; `read` turns a record into encoded
bytes, which the pipeline decodes only for examples that are actually used (and, for JPEGs,
only the part of the image that is kept).
"""

import dataclasses
from typing import Protocol

import tensorflow as tf
import tensorflow_datasets as tfds

Split = tfds.typing.SplitArg  # "train", "train[:90%]", tfds.even_splits(...)[i], ...
# Where a split is named, for a message about a split the dataset lacks.
SPLIT_FLAGS = (
    "Name one of its splits with --config.train_split or --config.eval_split (vit-train; a "
    "few-shot dataset's in --config.fewshot.datasets), --train_split and --test_split "
    "(vit-fewshot) or --split (vit-visualize)."
)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a trainer must know before it sees data: head size, names, split sizes, and a
    `fingerprint` of the records the splits hold, which two copies of a dataset share only
    when they hold the same records in the same order (tfds: `name[/config]/version`; an
    image folder: a digest of its splits' ordered files and labels)."""

    num_classes: int
    class_names: tuple[str, ...]
    split_sizes: dict[str, int]
    fingerprint: str


class Source(Protocol):
    """A dataset readable by split, in tfds split syntax ("train[:90%]", even_splits, ...)."""

    info: DatasetInfo

    def num_examples(self, split: Split) -> int:
        """Number of examples `records(split)` yields."""
        ...

    def records(self, split: Split) -> tf.data.Dataset:
        """The split's records in a fixed, deterministic order."""
        ...

    def read(self, record: dict[str, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
        """(encoded image bytes, int64 label) of one record; usable inside tf.data.

        Images stay encoded so the pipeline can decode only the crop it keeps.
        """
        ...
