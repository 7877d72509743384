"""Data, FSDP and tensor parallelism: the same training, parameters split as the rules ask."""

import logging

import jax
import numpy as np
import pytest
from helpers import SGD, bytes_on_device0, run_steps, small_local_config, tiny_config

from vit_jax.metrics import read_records
from vit_jax.parallel import make_mesh, splits_over_batch
from vit_jax.train import Trainer, train_and_evaluate

# A plain ViT and a hybrid (root block and one bottleneck stage on 16 px: 4x4 tokens).
MODELS = {
    "plain": {},
    "hybrid": dict(name="R+Ti/8", patch_size=1, resnet_stages=(1,)),
}
MESHES = {
    "tensor": (dict(data=2, fsdp=1, tensor=4), "tp"),
    "data x fsdp x tensor": (dict(data=2, fsdp=2, tensor=2), "tp"),
}


def _config(model="plain", scan=False, mesh=None, rules="dp", **model_changes):
    config = tiny_config(sharding_rules=rules, **SGD)
    config.model.update(MODELS[model] | model_changes, scan=scan)
    if mesh:
        config.mesh.update(mesh)
    return config


@pytest.mark.parametrize(
    "model, scan",
    [
        ("plain", False),
        pytest.param("plain", True, marks=pytest.mark.slow),
        # The ResNet stem runs before the blocks, never scanned: one hybrid case.
        pytest.param("hybrid", False, marks=pytest.mark.slow),
    ],
    ids=["plain-unrolled", "plain-scanned", "hybrid-unrolled"],
)
def test_tensor_parallel_loss_curves_equal_data_parallel(model, scan):
    # SGD keeps updates linear in the gradients; what differs between meshes is only the
    # float32 summation order of split matmuls and all-reduces (~1e-7 relative per op).
    _, dp, dp_losses = run_steps(_config(model, scan), steps=3)
    for name, (mesh, rules) in MESHES.items():
        trainer, state, losses = run_steps(_config(model, scan, mesh, rules), steps=3)
        np.testing.assert_allclose(losses, dp_losses, rtol=1e-5, err_msg=name)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5),
            state.params,
            dp.params,
        )
        # Really tensor-parallel: the MLP's hidden units are split over "tensor".
        block = state.params["Transformer"]["encoderblock" if scan else "encoderblock_0"]
        assert "tensor" in block["MlpBlock_0"]["Dense_0"]["kernel"].sharding.spec
    assert dp_losses[-1] < dp_losses[0]  # The curves being compared do move.


@pytest.mark.slow
@pytest.mark.parametrize(
    "model, changes",
    [("plain", dict(pool="map", representation_size=32)), ("hybrid", dict(pool="gap"))],
    ids=["map-head-and-representation", "hybrid"],
)
def test_fsdp_splits_every_weight_matrix_head_included(model, changes):
    config = _config(model, mesh=dict(data=1, fsdp=8), rules="fsdp", **changes)
    config.optim.name = "adamw"
    # 1,000 classes: the head is a large part of this tiny model; leaving it whole would show.
    trainer = Trainer(
        config, make_mesh(config.mesh, config.dcn_mesh), num_classes=1000, total_steps=20
    )
    state = trainer.init_state()

    unsplit = [
        jax.tree_util.keystr(path)
        for path, leaf in jax.tree_util.tree_leaves_with_path(state.params)
        if path[-1].key != "bias" and leaf.ndim >= 2 and "fsdp" not in leaf.sharding.spec
    ]
    assert not unsplit, f"weights left whole under FSDP: {unsplit}"
    assert state.params["head"]["kernel"].sharding.spec[0] == "fsdp"
    for tree in (state.params, state.opt_state):
        leaves = jax.tree.leaves(tree)
        total = sum(x.nbytes for x in leaves)
        whole = sum(x.nbytes for x in leaves if x.sharding.is_fully_replicated)
        # Only biases without a width axis (head, MLP, attention) and step counts stay
        # whole: 2% here, where the 1,000-class head alone is half the model.
        assert whole < 0.03 * total
        assert bytes_on_device0(tree) <= (total - whole) / 8 + whole
    params_total = sum(x.nbytes for x in jax.tree.leaves(state.params))
    assert state.params["head"]["kernel"].nbytes > 0.2 * params_total
    assert sum(x.nbytes for x in jax.tree.leaves(state.opt_state)) > 1.9 * params_total


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_weights_are_gathered_over_fsdp_only_and_a_scanned_stack_a_layer_at_a_time(scan):
    config = _config(scan=scan, mesh=dict(data=2, fsdp=2, tensor=2), rules="tp")
    mesh = make_mesh(config.mesh, config.dcn_mesh)
    trainer = Trainer(config, mesh, num_classes=4, total_steps=20)
    stored, used = trainer.param_shardings, trainer.gathered_shardings
    block = "encoderblock" if scan else "encoderblock_0"
    for path, sharding in jax.tree_util.tree_leaves_with_path(stored):
        name = jax.tree_util.keystr(path)
        gathered = _at(used, [key.key for key in path])
        if scan and f"'{block}'" in name:
            # The whole stack gathered would hold every layer at once: the compiler
            # gathers one layer per iteration of the loop instead.
            assert gathered == sharding, name
        else:
            # FSDP's split undone, tensor parallelism's kept: the layout matmuls run in.
            spec = [None if axes == "fsdp" else axes for axes in sharding.spec]
            assert list(gathered.spec) == spec, name
    mlp_in = ("Transformer", block, "MlpBlock_0", "Dense_0", "kernel")
    assert "fsdp" in _at(stored, mlp_in).spec and "tensor" in _at(used, mlp_in).spec
    assert _at(stored, ("head", "kernel")).spec[0] == "fsdp"
    assert _at(used, ("head", "kernel")).spec[0] is None

    dp = _config(scan=scan, mesh=dict(data=8))
    trainer = Trainer(dp, make_mesh(dp.mesh, dp.dcn_mesh), num_classes=4, total_steps=20)
    assert trainer.gathered_shardings == trainer.param_shardings


@pytest.mark.parametrize(
    "mesh, fsdp",
    [(dict(data=2, fsdp=2, tensor=2), True), (dict(data=4, fsdp=1, tensor=2), False),
     (dict(data=8), False)],
)  # fmt: skip
def test_fsdp_is_told_by_the_shards_not_by_the_rules(mesh, fsdp):
    """What the Trainer builds FSDP's TPU step by: a parameter stored split over an axis
    that also splits the batch. An FSDP axis of size 1 in the specs is not FSDP."""
    config = _config(mesh=mesh, rules="tp")
    mesh = make_mesh(config.mesh, config.dcn_mesh)
    trainer = Trainer(config, mesh, num_classes=4, total_steps=20)
    params = trainer.abstract_state().params
    assert splits_over_batch(params, trainer.param_shardings, trainer.gathered_shardings) is fsdp


def _at(tree, keys):
    for key in keys:
        tree = tree[key]
    return tree


def test_unshardable_parameters_are_named_once_in_a_warning(caplog):
    # B/16's problem in small: 12 heads over tensor=8.
    config = _config(mesh=dict(data=1, fsdp=1, tensor=8), rules="tp", width=48, num_heads=12)
    with caplog.at_level(logging.WARNING, logger="vit_jax.parallel"):
        trainer = Trainer(
            config, make_mesh(config.mesh, config.dcn_mesh), num_classes=4, total_steps=20
        )
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    (message,) = warnings
    assert "'heads' dimension (size 12) over mesh axis tensor (8 devices)" in message
    named = message.split(" in ", 1)[1].split(". ", 1)[0].split(", ")
    attention = "Transformer/encoderblock_{}/MultiHeadDotProductAttention_0/{}"
    expected = [
        attention.format(block, f"{part}/{kind}")
        for block in (0, 1)
        for part, kind in [(p, k) for p in ("query", "key", "value") for k in ("kernel", "bias")]
        + [("out", "kernel")]
    ]
    assert sorted(named) == sorted(expected)
    block = trainer.param_shardings["Transformer"]["encoderblock_0"]
    assert "tensor" not in block["MultiHeadDotProductAttention_0"]["query"]["kernel"].spec
    assert block["MlpBlock_0"]["Dense_0"]["kernel"].spec[1] == "tensor"  # what divides is split


def _train_end_to_end(tmp_path, rules, mesh=None):
    config = small_local_config(tmp_path, total_steps=4, log_every=1, eval_every=4)
    config.sharding_rules = rules
    if mesh:
        config.mesh.update(mesh)
    train_and_evaluate(config, str(tmp_path / "run"))
    return read_records(str(tmp_path / "run"))


@pytest.fixture(scope="module")
def data_parallel_metrics(tmp_path_factory):
    return _train_end_to_end(tmp_path_factory.mktemp("dp"), "dp")


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [dict(data=2, fsdp=1, tensor=4), dict(data=1, fsdp=1, tensor=8)])
def test_training_end_to_end_on_a_tensor_mesh_equals_data_parallel(
    tmp_path, mesh, data_parallel_metrics
):
    metrics = _train_end_to_end(tmp_path, "tp", mesh)
    losses = [m["train/loss"] for m in metrics if "train/loss" in m]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert 0.0 <= metrics[-1]["eval/top1"] <= 1.0
    # The recipe's own pipeline, optimizer and evaluation: the same numbers as data parallel.
    dp_losses = [m["train/loss"] for m in data_parallel_metrics if "train/loss" in m]
    np.testing.assert_allclose(losses, dp_losses, rtol=1e-5)
    assert metrics[-1]["eval/top1"] == pytest.approx(
        data_parallel_metrics[-1]["eval/top1"], abs=1e-6
    )
    assert metrics[-1]["eval/loss"] == pytest.approx(
        data_parallel_metrics[-1]["eval/loss"], rel=1e-5
    )
