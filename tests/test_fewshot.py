"""Few-shot linear evaluation: the ridge solver, the protocol, and sharded feature extraction."""

import functools
import json

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from vit_jax import checkpoint, data, parallel
from vit_jax.config import base_config
from vit_jax.evaluators import fewshot
from vit_jax.insight.cli import fewshot_main
from vit_jax.models import abstract_params, create_model, scale_images
from vit_jax.preemption import StopRequests


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    """The digits dataset, prepared once: tfds prints while it prepares."""
    path = str(tmp_path_factory.mktemp("tfds"))
    data.pipeline.open_source("digits", path)
    return path


def direct_ridge(x, y, l2):
    """argmin |[x 1] theta - y|^2 + l2 |w|^2 by the normal equations of the augmented system."""
    xa = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    penalty = l2 * np.eye(xa.shape[1])
    penalty[-1, -1] = 0.0  # The bias is not penalised.
    theta = np.linalg.solve(xa.T @ xa + penalty, xa.T @ y)
    return theta[:-1], theta[-1]


@pytest.mark.parametrize("n, d", [(12, 40), (60, 8)])  # Dual and primal forms.
@pytest.mark.parametrize("l2", [1e-3, 1.0, 50.0])
def test_ridge_matches_a_direct_solve(n, d, l2):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, d)) * 3 + 1
    y = rng.normal(size=(n, 4))
    w, b = fewshot.ridge_regression(x, y, l2)
    w_ref, b_ref = direct_ridge(x, y, l2)
    np.testing.assert_allclose(w, w_ref, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(b, b_ref, rtol=1e-7, atol=1e-9)


def test_ridge_refuses_no_regularisation():
    with pytest.raises(ValueError, match="l2 must be positive"):
        fewshot.ridge_regression(np.ones((3, 2)), np.ones((3, 1)), 0.0)


def separable(num_classes, per_class, dim, rng):
    """Class k at centre 10 * e_k plus unit noise: separable by a wide margin."""
    labels = rng.permutation(np.repeat(np.arange(num_classes), per_class))
    centres = 10.0 * np.eye(num_classes, dim)
    return centres[labels] + rng.normal(size=(len(labels), dim)), labels


def test_separable_features_give_full_accuracy():
    rng = np.random.default_rng(1)
    train_x, train_y = separable(7, 40, 32, rng)
    test_x, test_y = separable(7, 20, 32, rng)
    accuracies = fewshot.fewshot_accuracies(
        train_x, train_y, test_x, test_y, shots=(1, 5, 10), holdout_per_class=5, num_classes=7
    )
    assert accuracies == {1: 1.0, 5: 1.0, 10: 1.0}


def test_random_features_are_at_chance():
    rng = np.random.default_rng(2)
    train_x, test_x = rng.normal(size=(500, 16)), rng.normal(size=(2000, 16))
    train_y, test_y = np.repeat(np.arange(10), 50), rng.integers(0, 10, 2000)
    accuracies = fewshot.fewshot_accuracies(
        train_x, train_y, test_x, test_y, shots=(5,), holdout_per_class=5, num_classes=10
    )
    assert 0.05 < accuracies[5] < 0.15


def test_each_shot_counts_accuracy_is_the_same_whichever_other_counts_are_asked():
    """The held-out images that choose the L2 strength come first and are the same for every
    shot count, so `fewshot/<name>_5shot` of one run compares with another run's that asked
    other shot counts (before, the held-out images followed the largest count asked)."""
    rng = np.random.default_rng(3)
    train_x, train_y = separable(5, 40, 16, rng)
    test_x, test_y = separable(5, 40, 16, rng)
    train_x += 8.0 * rng.normal(size=train_x.shape)  # Overlapping classes: the L2 matters.
    test_x += 8.0 * rng.normal(size=test_x.shape)
    probe = functools.partial(
        fewshot.fewshot_accuracies, train_x, train_y, test_x, test_y, holdout_per_class=5,
        num_classes=5,
    )  # fmt: skip
    together = probe(shots=(1, 2, 5, 10, 25))
    assert together == {n: probe(shots=(n,))[n] for n in together}
    assert 0.3 < together[25] < 0.95, together  # Neither chance nor separable.


def test_ranks_count_the_earlier_examples_of_each_class():
    """The held-out examples rank below holdout_per_class, the n shots from there on."""
    labels = np.array([2, 0, 2, 1, 0, 0, 2, 1, 1, 0])
    np.testing.assert_array_equal(
        fewshot.per_class_ranks(labels, 3), [0, 0, 1, 0, 1, 2, 2, 1, 2, 3]
    )


def test_too_few_images_per_class_is_a_clear_error():
    x, y = np.ones((6, 2)), np.array([0, 0, 0, 1, 1, 1])
    with pytest.raises(ValueError, match="needs 4 of every class"):
        fewshot.fewshot_accuracies(x, y, x, y, shots=(3,), holdout_per_class=1, num_classes=2)


def eval_config(data_dir, split, batch_size):
    config = base_config()
    config.update(dataset="digits", data_dir=data_dir, eval_split=split, eval_batch_size=batch_size)
    config.image_size = 8
    config.pp.eval_crop_fraction = 1.0
    return config


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 3, 4])
def test_every_example_counted_once_over_processes(data_dir, processes):
    """Simulated processes: every step's global batch is the processes' batches stacked, in
    any device order; `split_order` recovers the split, each example once, in order."""
    reference = eval_config(data_dir, "test", 364)
    expected = next(data.eval_batches(reference, share_index=0, share_count=1))
    config = eval_config(data_dir, "test", 48)
    num_batches = data.num_eval_batches(config, processes)
    streams = [
        list(
            fewshot.numbered_batches(
                data.eval_batches(config, share_index=p, share_count=processes),
                p,
                num_batches,
            )
        )
        for p in range(processes)
    ]
    assert all(len(s) == num_batches for s in streams)
    device_order = list(reversed(range(processes)))  # Global rows need not follow processes.
    rows = {
        key: np.concatenate([streams[p][b][key] for b in range(num_batches) for p in device_order])
        for key in ("image", "label", "mask", "index")
    }
    order = fewshot.split_order(rows["index"], rows["mask"])
    assert len(order) == 364 == len(set(order.tolist()))
    np.testing.assert_array_equal(rows["image"][order], expected["image"])
    np.testing.assert_array_equal(rows["label"][order], expected["label"])


def tiny_model(**overrides):
    fields = dict(width=32, depth=1, mlp_dim=64, num_heads=2) | overrides
    return create_model("Ti/4", num_classes=10, **fields)


def init_params(model, seed=0):
    params = model.init(jax.random.key(seed), np.zeros((1, 8, 8, 3)), train=False)["params"]
    return jax.tree.map(np.asarray, nn.unbox(params))


def plain_accuracies(model, params, data_dir, shots, holdout_per_class=5):
    """The protocol on features computed on one device from whole unpadded splits."""
    features_model = model.clone(num_classes=0)

    def features(split, size):
        batch = next(
            data.eval_batches(eval_config(data_dir, split, size), share_index=0, share_count=1)
        )
        x = features_model.apply({"params": params}, scale_images(batch["image"]), train=False)
        return np.asarray(x, np.float64), batch["label"].astype(np.int64)

    return fewshot.fewshot_accuracies(
        *features("train", 1433),
        *features("test", 364),
        shots=shots,
        holdout_per_class=holdout_per_class,
        num_classes=10,
    )


@pytest.mark.slow
def test_evaluator_on_a_mesh_matches_single_device_features(data_dir):
    """8 devices, padded batches: the same accuracies as features computed plainly."""
    model = tiny_model()
    config = eval_config(data_dir, "test", 64)
    config.fewshot.datasets = ml_collections.ConfigDict({"digits": ("digits", "train", "test")})
    config.fewshot.shots = (1, 5)
    mesh = parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    rules = parallel.resolve_rules("dp")
    shardings = parallel.logical_shardings(abstract_params(model, 8), mesh, rules)
    params = init_params(model)
    evaluator = fewshot.FewShotEvaluator(config, model, mesh, rules, shardings)
    metrics = evaluator.run(params, StopRequests())

    expected = plain_accuracies(model, params, data_dir, (1, 5))
    assert set(metrics) == {"fewshot/digits_1shot", "fewshot/digits_5shot"}
    # Sharded and plain features differ in float rounding only: at most one test image flips.
    assert metrics["fewshot/digits_1shot"] == pytest.approx(expected[1], abs=1 / 364 + 1e-9)
    assert metrics["fewshot/digits_5shot"] == pytest.approx(expected[5], abs=1 / 364 + 1e-9)
    assert metrics["fewshot/digits_5shot"] > 0.3  # Random features of 8x8 digits: far above 10%.


@pytest.mark.slow
def test_fewshot_command_on_an_exported_npz(data_dir, tmp_path, capsys):
    model = tiny_model()
    params = init_params(model, seed=1)
    path = tmp_path / "model.npz"
    checkpoint.save_npz(params, path)
    argv = ["--checkpoint", str(path), "--dataset", "digits", "--shots", "1,10"]
    argv += ["--data_dir", data_dir, "--batch_size", "64"]

    run = {"model": {"name": "Ti/4", "width": 32, "depth": 1, "mlp_dim": 64, "num_heads": 2}}
    run |= {"image_size": 8, "num_classes": 10, "eval_crop_fraction": 1.0}
    path.with_suffix(".json").write_text(json.dumps(run))
    assert fewshot_main(argv) == 0
    printed = dict(line.split() for line in capsys.readouterr().out.splitlines())
    expected = plain_accuracies(model, params, data_dir, (1, 10))
    assert set(printed) == {"fewshot/digits_1shot", "fewshot/digits_10shot"}
    assert float(printed["fewshot/digits_1shot"]) == pytest.approx(expected[1], abs=1.5 / 364)
    assert float(printed["fewshot/digits_10shot"]) == pytest.approx(expected[10], abs=1.5 / 364)


def test_bad_fewshot_config_is_a_clear_error():
    config = base_config()
    config.fewshot.datasets = ml_collections.ConfigDict({"digits": "digits"})
    with pytest.raises(ValueError, match=r"\(dataset, train_split, test_split\)"):
        fewshot.dataset_entries(config)
    config.fewshot.datasets = ml_collections.ConfigDict({"digits": ("digits", "train", "test")})
    config.fewshot.shots = (0, 5)
    with pytest.raises(ValueError, match="positive integers"):
        fewshot.dataset_entries(config)
