"""Meshes over one or several TPU slices / GPU nodes: layout, errors, and training on them."""

from types import SimpleNamespace

import jax
import numpy as np
import pytest
from helpers import SGD, run_steps, tiny_config

from vit_jax.parallel import (
    _axis_sizes,
    batch_sharding,
    batch_share,
    batch_shares,
    check_axis_sizes,
    device_slices,
    make_mesh,
    resolve_rules,
)

AXES = {"data": -1, "fsdp": 1, "tensor": 1}


def _two_slices():
    devices = jax.devices()
    return [devices[:4], devices[4:]]


def test_one_slice_is_the_plain_mesh():
    mesh = make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_data_spans_the_slices_and_fsdp_stays_inside_each():
    slices = _two_slices()
    mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, {"data": -1}, slices=slices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    slice_of = {d.id: i for i, group in enumerate(slices) for d in group}
    for row in range(2):  # Every FSDP group lies in one slice; the data axis crosses them.
        assert {slice_of[d.id] for d in mesh.devices[row, :, 0]} == {row}


def test_data_inside_and_across_slices_puts_the_slice_index_outermost():
    slices = _two_slices()
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 1}, {"data": 2}, slices=slices)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    slice_of = {d.id: i for i, group in enumerate(slices) for d in group}
    assert [slice_of[mesh.devices[i, 0, 0].id] for i in range(4)] == [0, 0, 1, 1]


def test_fsdp_over_slices_when_asked():
    mesh = make_mesh(
        {"data": 1, "fsdp": 4, "tensor": 1}, {"data": 1, "fsdp": 2}, slices=_two_slices()
    )
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}


@pytest.mark.parametrize(
    "ici, dcn, slices, message",
    [
        (AXES | {"fsdp": 8}, {"data": -1}, "two", r"4 devices per slice or node cannot be split"
         r".*The 2 slices or nodes have 4 devices each: size an axis that spans them in "
         r"config.dcn_mesh"),
        (AXES, {"data": 3}, "two", r"config.dcn_mesh .* needs 3 slices or nodes but there are 2"),
        (AXES, {"pipeline": 2}, "two", r"config.dcn_mesh names axes \['pipeline'\]"),
        (AXES, None, "uneven", r"unequal sizes \[3, 5\]"),
    ],
)  # fmt: skip
def test_meshes_that_cannot_be_built_say_why(ici, dcn, slices, message):
    devices = jax.devices()
    groups = _two_slices() if slices == "two" else [devices[:3], devices[3:]]
    with pytest.raises(ValueError, match=message):
        make_mesh(ici, dcn, slices=groups)


@pytest.mark.parametrize(
    "ici, dcn, slices, named",
    [
        (AXES | {"fsdp": 0}, None, 1, "config.mesh.fsdp=0"),
        (AXES | {"tensor": -2}, None, 1, "config.mesh.tensor=-2"),
        (AXES | {"fsdp": 0}, None, 2, "config.mesh.fsdp=0"),  # Not the advice on slices.
        (AXES | {"data": 0, "fsdp": -1}, None, 2, "config.mesh.data=0"),
        (AXES, {"data": 0}, 2, "config.dcn_mesh.data=0"),
        (AXES, {"data": -1, "fsdp": -4}, 2, "config.dcn_mesh.fsdp=-4"),
    ],
)  # fmt: skip
def test_an_axis_size_neither_minus_one_nor_positive_is_refused_by_its_field(
    ici, dcn, slices, named
):
    groups = _two_slices() if slices == 2 else [jax.devices()]
    with pytest.raises(ValueError) as refused:
        make_mesh(ici, dcn, slices=groups)
    allowed = "an axis size must be a whole number >= 1, or -1 for one axis to take what"
    assert str(refused.value).startswith(f"{named}: {allowed}"), refused.value


def test_axis_sizes_name_every_size_they_refuse():
    with pytest.raises(ValueError, match=r"^config.mesh.fsdp=0, config.mesh.tensor=-1\.5: "):
        check_axis_sizes({"data": -1, "fsdp": 0, "tensor": -1.5}, "mesh")
    assert _axis_sizes({"data": -1, "fsdp": 2, "tensor": 2.0}, 8, "mesh", "devices") == [2, 2, 2]


def test_devices_group_by_process_without_slice_index():
    # CPU devices have no slice_index: one process is one group.
    assert device_slices(jax.devices()) == [jax.devices()]


@pytest.mark.compile("jax_plugins.xla_cuda12")
@pytest.mark.parametrize(
    "topology, groups",
    [("4x1x8", [8] * 4),  # Four 8-GPU nodes, one process each (vit-bench's h100x8x4).
     ("1x8x1", [8]),  # One node, one process per GPU (SLURM's default for JAX).
     ("2x18x4", [72] * 2)],  # Two GB200 NVL72 racks: 18 hosts of 4 GPUs share NVLink.
)  # fmt: skip
def test_gpus_group_by_nvlink_partition_whatever_the_processes(topology, groups):
    from jax.experimental import topologies

    from vit_jax.bench.targets import gpu_target_config, parse_target

    config = gpu_target_config(parse_target("h100x8"))
    devices = topologies.get_topology_desc(
        platform="cuda", target_config=config, topology=topology
    ).devices
    found = device_slices(devices)
    assert [len(g) for g in found] == groups
    assert [d.id for g in found for d in g] == sorted(d.id for d in devices)


def test_running_gpus_group_by_the_partition_xla_gave_them():
    """As XLA describes running GPUs: `partition_index` per host (boot id) or NVLink
    domain, coords the GPU's ordinal in its process; older releases name it `slice_index`."""

    def gpu(id, process, partition, name="partition_index"):
        return SimpleNamespace(
            id=id, platform="gpu", process_index=process, coords=[id % 2], **{name: partition}
        )

    # Two hosts of 4 GPUs, one process per pair of GPUs.
    devices = [gpu(i, i // 2, i // 4) for i in range(8)]
    assert device_slices(devices) == [devices[:4], devices[4:]]
    older = [gpu(i, i // 2, i // 4, name="slice_index") for i in range(8)]
    assert device_slices(older) == [older[:4], older[4:]]


@pytest.mark.slow
def test_training_over_two_slices_follows_the_data_parallel_loss_curve():
    config = tiny_config(batch_size=16, **SGD)
    _, _, single = run_steps(config, steps=4)
    config.mesh.update(data=1, fsdp=-1)
    config.sharding_rules = "fsdp"
    _, state, multi = run_steps(config, steps=4, slices=_two_slices())
    np.testing.assert_allclose(multi, single, rtol=2e-5)
    kernel = state.params["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"]
    assert tuple(kernel.sharding.spec) == ("fsdp", None)
    assert dict(kernel.sharding.mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}


@pytest.mark.compile
@pytest.mark.parametrize("tensor, shares", [(1, 16), (2, 16), (4, 8)])
def test_hosts_that_hold_the_same_batch_rows_load_the_same_share(tensor, shares):
    """A v6e-64 (16 hosts of 4 chips): a tensor axis of 4 spans two hosts, which then hold
    the same rows of each batch; each pair loads one share."""
    from vit_jax.bench.targets import parse_target, topology_devices

    devices = topology_devices(parse_target("v6e-64"))
    mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": tensor}, devices=devices)
    assert batch_share(batch_sharding(mesh, resolve_rules("tp"))) == (0, shares)


def test_processes_that_hold_overlapping_batch_rows_are_refused_naming_them():
    paired = {0: {(0, 4)}, 1: {(0, 4)}, 2: {(4, 8)}, 3: {(4, 8)}}
    assert batch_shares(paired) == [frozenset({(0, 4)}), frozenset({(4, 8)})]
    overlapping = {0: {(0, 4), (4, 8)}, 1: {(4, 8), (8, 12)}, 2: {(0, 4), (4, 8)}}
    with pytest.raises(ValueError, match=r"^Processes 0 and 1 hold some of the same batch rows"):
        batch_shares(overlapping)
