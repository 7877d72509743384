"""Few-shot linear evaluation of frozen features, as the ViT paper judges pretraining.

For each dataset and shot count n (`config.fewshot`, see `vit_jax/config.py`):

  * features: the model's pooled pre-logits output (the model built with `num_classes=0`)
    of every image of the train and test splits, preprocessed as evaluation is; computed
    once per evaluation and shared by all shot counts;
  * held-out set: the first `holdout_per_class` images of every class in the train split's
    stored order; it only picks the L2 strength, and is the same for every shot count;
  * train set: the next n images of every class, so it never overlaps the held-out set,
    and the n-shot result does not depend on which other shot counts are asked;
  * a closed-form ridge regression from the features to {-1, 1}^K targets for every L2
    strength of `L2_GRID`; the one with the best held-out accuracy (ties: the strongest)
    is used;
  * top-1 accuracy of the argmax prediction over the whole test split.

Features are computed like evaluation: every process reads its share of a split through
`vit_jax.data.eval_batches` (padded and masked), the model runs sharded over the mesh, and
the features come back replicated, so every process solves the same small regression.
All features of the train split are computed: slice it (`"train[:50000]"`) for large
datasets, keeping enough images of every class for the largest shot count plus the
held-out images.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vit_jax import data, parallel
from vit_jax.agreement import check_processes_read_the_same_data
from vit_jax.data.pipeline import open_source
from vit_jax.metrics import fewshot_metric
from vit_jax.models import scale_images
from vit_jax.preemption import StopRequests

# L2 strengths tried, relative to the mean squared norm of the centred train features, so
# one grid serves features of any scale.
L2_GRID = tuple(float(r) for r in 10.0 ** np.arange(-4.0, 3.0))


def ridge_regression(x: np.ndarray, y: np.ndarray, l2: float) -> tuple[np.ndarray, np.ndarray]:
    """Weights and bias minimising |x w + b - y|^2 + l2 |w|^2 (the bias is not penalised).

    Solved in closed form on centred data, in the primal (d x d) or the dual (n x n)
    form, whichever is smaller: few-shot sets usually have far fewer rows than features.
    """
    if l2 <= 0:
        raise ValueError(f"l2 must be positive, got {l2}.")
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc, yc = x - x_mean, y - y_mean
    n, d = xc.shape
    if n < d:
        w = xc.T @ np.linalg.solve(xc @ xc.T + l2 * np.eye(n), yc)
    else:
        w = np.linalg.solve(xc.T @ xc + l2 * np.eye(d), xc.T @ yc)
    return w, y_mean - x_mean @ w


def per_class_ranks(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """For every example, how many examples of its class come before it."""
    ranks = np.zeros(len(labels), np.int64)
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        ranks[members] = np.arange(len(members))
    return ranks


def fewshot_accuracies(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    shots: Sequence[int],
    holdout_per_class: int,
    num_classes: int,
) -> dict[int, float]:
    """Test accuracy of the ridge probe trained on `n` examples per class, for each n in `shots`.

    `train_x`/`train_y` are features and integer labels in the train split's stored order:
    the first `holdout_per_class` of each class choose the L2 strength, the next `n` train
    the probe (module docstring).
    """
    ranks = per_class_ranks(train_y, num_classes)
    needed = max(shots) + holdout_per_class
    counts = np.bincount(train_y, minlength=num_classes)
    if counts.min() < needed:
        raise too_few_per_class(np.flatnonzero(counts < needed).tolist(), shots, holdout_per_class)
    held_out = ranks < holdout_per_class
    targets = 2.0 * np.eye(num_classes)[train_y] - 1.0

    def accuracy(w_b: tuple[np.ndarray, np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
        w, b = w_b
        return float(np.mean(np.argmax(x @ w + b, axis=-1) == y))

    results = {}
    for n in shots:
        chosen = (ranks >= holdout_per_class) & (ranks < holdout_per_class + n)
        x = train_x[chosen]
        scale = float(np.mean(np.sum((x - x.mean(0)) ** 2, axis=-1))) or 1.0
        fits = [ridge_regression(x, targets[chosen], r * scale) for r in L2_GRID]
        held = [accuracy(f, train_x[held_out], train_y[held_out]) for f in fits]
        best = len(held) - 1 - int(np.argmax(held[::-1]))  # Ties: the strongest L2.
        results[n] = accuracy(fits[best], test_x, test_y)
    return results


def too_few_per_class(
    short: Sequence[Any], shots: Sequence[int], holdout_per_class: int
) -> ValueError:
    """The error for a few-shot train split lacking images of the classes `short`."""
    needed = max(shots) + holdout_per_class
    return ValueError(
        f"The few-shot train split has fewer than {needed} images of classes {list(short)[:10]}"
        f" but needs {needed} of every class (largest shot count {max(shots)} plus "
        f"holdout_per_class {holdout_per_class}); use a larger train split, fewer shots or "
        "fewer held-out images."
    )


def split_order(index: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Rows of gathered eval batches that hold real examples, in the split's order.

    `index` numbers every row as (share, position in that share's stream), which
    `even_splits` maps to consecutive parts of the split; padding rows have mask 0.
    """
    real = np.flatnonzero(mask > 0)
    return real[np.argsort(index[real], kind="stable")]


def numbered_batches(
    batches: Iterable[dict[str, np.ndarray]], share_index: int, num_batches: int
) -> Iterator[dict[str, np.ndarray]]:
    """Adds "index" = share_index * rows_per_share + row number in this share's stream."""
    position = 0
    for batch in batches:
        size = len(batch["mask"])
        base = share_index * num_batches * size + position
        yield {**batch, "index": np.arange(base, base + size, dtype=np.int32)}
        position += size


def dataset_entries(config: ml_collections.ConfigDict) -> dict[str, tuple[str, str, str]]:
    """`config.fewshot.datasets` checked: metric name -> (dataset, train split, test split)."""
    entries = {}
    for name, entry in config.fewshot.datasets.items():
        if not (isinstance(entry, (tuple, list)) and len(entry) == 3):
            raise ValueError(
                f"config.fewshot.datasets[{name!r}] = {entry!r}: expected a tuple "
                '(dataset, train_split, test_split), e.g. ("digits", "train", "test").'
            )
        entries[name] = tuple(str(e) for e in entry)
    shots = tuple(config.fewshot.shots)
    if not shots or any(int(n) != n or n < 1 for n in shots):
        raise ValueError(f"config.fewshot.shots={shots}: expected positive integers, e.g. (1, 5).")
    if config.fewshot.holdout_per_class < 1:
        raise ValueError(
            f"config.fewshot.holdout_per_class={config.fewshot.holdout_per_class}: at least one "
            "held-out image per class is needed to choose the L2 strength."
        )
    return entries


class FewShotEvaluator:
    """Few-shot linear accuracy of a model's frozen features on `config.fewshot.datasets`.

    Needs the model and the mesh, rules and parameter shardings (a tree, or one sharding for
    every parameter) it trains under; reads `image_size`, `eval_batch_size`, `data_dir`,
    `pp.eval_crop_fraction` and `fewshot.every` from `config`.
    """

    name = "fewshot"

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        model: nn.Module,
        mesh: Mesh,
        rules: Any,
        param_shardings: Any,
    ):
        self.config = config
        self.every = int(config.fewshot.every)
        self.entries = dataset_entries(config)
        self.shots = tuple(int(n) for n in config.fewshot.shots)
        # Checked now: a wrong dataset or split name, or a train split too small for the shots,
        # stops the run at start-up, not at the first probe hours later.
        holdout = config.fewshot.holdout_per_class
        needed = max(self.shots) + holdout
        self.num_classes = {}
        for name, (dataset, train_split, test_split) in self.entries.items():
            info = data.get_dataset_info(dataset, config.data_dir)
            check_processes_read_the_same_data(dataset, info)
            self.num_classes[name] = info.num_classes
            for split in (train_split, test_split):  # An unknown split, named as given.
                open_source(dataset, config.data_dir).num_examples(split)
            if short := data.short_classes(dataset, config.data_dir, train_split, needed):
                raise too_few_per_class(short, self.shots, holdout)
        self.features_model = model.clone(num_classes=0)
        self.mesh, self.rules, self.param_shardings = mesh, rules, param_shardings
        self.batch_sharding = parallel.batch_sharding(mesh, rules)
        self.batch_share = parallel.batch_share(self.batch_sharding)
        parallel.batch_size_per_shard(config.eval_batch_size, mesh, rules)
        self._embed = jax.jit(
            self._embed_batch,
            in_shardings=(param_shardings, self.batch_sharding),
            out_shardings=NamedSharding(mesh, PartitionSpec()),
            compiler_options=parallel.compiler_options(mesh),
        )

    def _embed_batch(self, params: Any, batch: dict) -> dict:
        images = scale_images(batch["image"])
        features = self.features_model.apply({"params": params}, images, train=False)
        return {"features": features} | {k: batch[k] for k in ("label", "mask", "index")}

    def split_config(self, dataset: str, split: str) -> ml_collections.ConfigDict:
        """The evaluation config that reads `split` of `dataset` at this model's resolution."""
        config = self.config.copy_and_resolve_references()
        config.dataset, config.eval_split = dataset, split
        return config

    def features(
        self, params: Any, dataset: str, split: str, stop: StopRequests
    ) -> tuple[np.ndarray, np.ndarray]:
        """Features and integer labels of the whole split, in its order, on every process.

        Raises `StopRequested` when a stop is requested before the split is done.
        """
        config = self.split_config(dataset, split)
        share_index, share_count = self.batch_share
        batches = numbered_batches(
            data.eval_batches(config, share_index=share_index, share_count=share_count),
            share_index,
            data.num_eval_batches(config, share_count),
        )
        gathered = []
        with parallel.activate(self.mesh, self.rules):
            for batch in stop.watch(parallel.prefetch_to_devices(batches, self.batch_sharding)):
                gathered.append(jax.device_get(self._embed(params, batch)))
        rows = {key: np.concatenate([g[key] for g in gathered]) for key in gathered[0]}
        order = split_order(rows["index"], rows["mask"])
        return rows["features"][order].astype(np.float64), rows["label"][order].astype(np.int64)

    def run(self, params: Any, stop: StopRequests) -> dict[str, float]:
        """`fewshot/<name>_<n>shot` accuracies for every configured dataset and shot count.

        Raises `StopRequested` when a stop is requested before the last feature is computed.
        """
        # Placed once (a no-op for the train state's params): host arrays passed to the jitted
        # step would be copied to every device again for every batch.
        params = jax.device_put(params, self.param_shardings)
        metrics = {}
        for name, (dataset, train_split, test_split) in self.entries.items():
            train_x, train_y = self.features(params, dataset, train_split, stop)
            test_x, test_y = self.features(params, dataset, test_split, stop)
            accuracies = fewshot_accuracies(
                train_x,
                train_y,
                test_x,
                test_y,
                shots=self.shots,
                holdout_per_class=self.config.fewshot.holdout_per_class,
                num_classes=self.num_classes[name],
            )
            metrics |= {fewshot_metric(name, n): acc for n, acc in accuracies.items()}
        return metrics


def build(config: ml_collections.ConfigDict, trainer: Any) -> FewShotEvaluator | None:
    """The probe under the trainer's model, mesh and shardings; None without datasets."""
    if not config.fewshot.datasets:
        return None
    return FewShotEvaluator(
        config, trainer.model, trainer.mesh, trainer.rules, trainer.param_shardings
    )
