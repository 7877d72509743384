"""Device mesh, logical-axis rules and the shardings derived from them.

The model names its axes logically ("embed", "mlp", "heads", "activation_batch",
...). A config's `mesh` and `sharding_rules` map those names onto mesh axes, so
data parallelism, FSDP and tensor parallelism differ only in configuration.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

# Data parallelism: every parameter replicated, the batch split over all devices.
DATA_PARALLEL_RULES: tuple = (("activation_batch", ("data", "fsdp")),)
# FSDP: additionally every parameter split along its width ("embed") or conv channels.
FSDP_RULES: tuple = DATA_PARALLEL_RULES + (("embed", "fsdp"), ("conv_out", "fsdp"))
# Megatron-style tensor parallelism on top: MLP and heads split over "tensor".
TENSOR_PARALLEL_RULES: tuple = FSDP_RULES + (
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_heads", "tensor"),
)
NAMED_RULES = {"dp": DATA_PARALLEL_RULES, "fsdp": FSDP_RULES, "tp": TENSOR_PARALLEL_RULES}


def resolve_rules(rules: str | Rules) -> tuple:
    """Accepts a preset name ("dp", "fsdp", "tp") or an explicit list of (logical, mesh) pairs."""
    if isinstance(rules, str):
        if rules not in NAMED_RULES:
            raise ValueError(
                f"Unknown sharding_rules {rules!r}: use one of {sorted(NAMED_RULES)} or a list "
                "of (logical_axis, mesh_axis) pairs."
            )
        return NAMED_RULES[rules]
    return tuple((name, tuple(axis) if isinstance(axis, list) else axis) for name, axis in rules)


def device_slices(devices: Sequence[Any]) -> list[list[Any]]:
    """Devices grouped by what joins them with fast links, in a stable order.

    A TPU slice (devices share `slice_index`, linked by ICI); a GPU partition (devices
    share `partition_index`: those of one host, linked by NVLink, or of one multi-node
    NVLink domain such as a GB200 NVL72 rack; one process per GPU or per host alike); on
    other platforms (CPU) a process. Between groups runs the data-center network (DCN).
    """
    groups: dict[int, list[Any]] = collections.defaultdict(list)
    for device in devices:
        groups[_fast_link_group(device)].append(device)
    return [groups[k] for k in sorted(groups)]


def _fast_link_group(device: Any) -> int:
    if device.platform == "tpu":
        return getattr(device, "slice_index", 0)  # A single slice's devices may lack it.
    if device.platform == "gpu":
        coords = getattr(device, "coords", ())
        if len(coords) == 3:
            # Compile-only GPUs (`get_topology_desc`) report `partition_index` 0 whatever
            # their topology; their coords are (partition, process in it, GPU in process).
            return coords[0]
        # XLA gives each NVLink domain (NVML's fabric cluster) or else each host (its
        # boot id) a partition; the older name is `slice_index`.
        return getattr(device, "partition_index", getattr(device, "slice_index", 0))
    return device.process_index


def check_axis_sizes(axes: Mapping[str, int], field: str) -> None:
    """Refuses an axis size that is neither -1 nor a whole number of devices >= 1."""
    bad = [f"config.{field}.{name}={size}" for name, size in axes.items() if not _size_ok(size)]
    if bad:
        raise ValueError(
            f"{', '.join(bad)}: an axis size must be a whole number >= 1, or -1 for one axis "
            "to take what the others leave."
        )


def _size_ok(size: Any) -> bool:
    try:
        return size == int(size) and (size == -1 or size >= 1)
    except (TypeError, ValueError):
        return False


def _axis_sizes(axes: Mapping[str, int], total: int, field: str, unit: str) -> list[int]:
    """Sizes of `axes` (each -1 or >= 1: `check_axis_sizes`) with the one -1 replaced by
    what the others leave of `total`.

    Raises:
      ValueError: more than one -1, or sizes that do not multiply to `total`.
    """
    sizes = [int(size) for size in axes.values()]
    if sizes.count(-1) > 1:
        raise ValueError(f"config.{field} {dict(axes)}: at most one axis may be -1.")
    fixed = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if total % fixed:
            raise ValueError(
                f"config.{field} {dict(axes)}: {total} {unit} cannot be split into axes of "
                f"sizes {[s for s in sizes if s != -1]}; make {total} divisible by {fixed}."
            )
        sizes[sizes.index(-1)] = total // fixed
    if int(np.prod(sizes)) != total:
        raise ValueError(
            f"config.{field} {dict(zip(axes, sizes, strict=True))} needs {int(np.prod(sizes))} "
            f"{unit} but there are {total}; use -1 for one axis to take the rest."
        )
    return sizes


def make_mesh(
    ici: Mapping[str, int],
    dcn: Mapping[str, int] | None = None,
    devices: Sequence[Any] | None = None,
    slices: Sequence[Sequence[Any]] | None = None,
) -> Mesh:
    """The run's device mesh, over one or several TPU slices or GPU nodes.

    `ici` gives each axis's size inside one slice or node (e.g. `{"data": -1, "fsdp": 4,
    "tensor": 1}`), `dcn` how many slices or nodes it spans (default: "data" over all of
    them, so only the gradient reduction crosses the data-center network). An axis of the
    mesh has size `dcn * ici`, the slice-level index outermost, as MaxText and
    `mesh_utils.create_hybrid_device_mesh` lay it out. One axis of each may be -1: it takes
    what the others leave. `slices` groups `devices` explicitly (default: `device_slices`).

    Raises:
      ValueError: a size neither -1 nor >= 1, sizes that do not multiply to the devices
        there are, an axis of `dcn` the mesh does not have, or slices of unequal sizes.
    """
    devices = list(devices if devices is not None else jax.devices())
    groups = [list(g) for g in (slices if slices is not None else device_slices(devices))]
    names = list(ici)
    dcn = dict(dcn or {"data": -1})
    unknown = sorted(set(dcn) - set(names))
    if unknown:
        raise ValueError(f"config.dcn_mesh names axes {unknown} that config.mesh {names} lacks.")
    if len({len(g) for g in groups}) != 1:
        raise ValueError(
            f"Slices or nodes of unequal sizes {[len(g) for g in groups]}: a mesh needs the "
            "same number of devices in each."
        )
    check_axis_sizes(ici, "mesh")  # Here, not under the advice on splitting below.
    check_axis_sizes(dcn, "dcn_mesh")
    dcn_sizes = _axis_sizes(
        {name: dcn.get(name, 1) for name in names}, len(groups), "dcn_mesh", "slices or nodes"
    )
    try:
        ici_sizes = _axis_sizes(ici, len(groups[0]), "mesh", "devices per slice or node")
    except ValueError as e:
        if len(groups) == 1:
            raise
        raise ValueError(
            f"{e} The {len(groups)} slices or nodes have {len(groups[0])} devices each: size an "
            "axis that spans them in config.dcn_mesh (e.g. dcn_mesh.fsdp=2 for FSDP over 2)."
        ) from None
    per_slice = [
        mesh_utils.create_device_mesh(ici_sizes, group, allow_split_physical_axes=True)
        for group in groups
    ]
    # [slices..., devices...] -> interleave each axis's slice and in-slice index.
    array = np.stack(per_slice).reshape(dcn_sizes + ici_sizes)
    order = [i for axis in range(len(names)) for i in (axis, len(names) + axis)]
    array = array.transpose(order).reshape(
        [d * i for d, i in zip(dcn_sizes, ici_sizes, strict=True)]
    )
    return Mesh(array, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))


# The TPU compiler turns an all-gather that feeds a matmul into a windowed einsum: a loop of
# collective-permutes that keeps float32 partial sums the size of the matmul's output. For
# FSDP's gathered weights these made the forward pass need more memory than data parallelism's
# (1.2-1.9x for the eval step, docs/fsdp-on-tpu.md); a plain all-gather of the weights, which
# the scheduler overlaps with the layers before it, does not.
TPU_COMPILER_OPTIONS = {"xla_tpu_enable_windowed_einsum_for_all_gather": False}

# For a program that gathers every weight before its first layer (FSDP's unrolled step on one
# slice: Trainer), the all-gathers are also kept out of the compute fusions the TPU compiler
# would overlap them with. Such a fusion has several outputs, and the compiler's
# rematerialisation does not recompute those: at the edge of HBM FSDP's step kept what data
# parallelism's recomputed, and where HBM was to spare the overlap held up to 0.8 GB more
# (docs/fsdp-on-tpu.md). The gathers then run before the first layer, unhidden: the whole
# model's weights once per step, which the roofline estimate puts under 1% of B/16's step.
UP_FRONT_GATHER_OPTIONS = {"xla_tpu_enable_async_collective_fusion_fuse_all_gather": False}


def platform(mesh: Mesh) -> str:
    """The platform of `mesh`'s devices ("tpu", "gpu", "cpu"; real or a target's
    compile-only devices)."""
    return mesh.devices.flat[0].platform


def on_tpu(mesh: Mesh) -> bool:
    """Whether `mesh`'s devices are TPUs."""
    return platform(mesh) == "tpu"


def set_by_user(tpu_flag: str) -> bool:
    """Whether the user's TPU compiler flags (LIBTPU_INIT_ARGS) name `tpu_flag`: a user's
    setting wins over any vit_jax would pass."""
    return tpu_flag in os.environ.get("LIBTPU_INIT_ARGS", "")


def compiler_options(mesh: Mesh, gathers_up_front: bool = False) -> dict[str, Any] | None:
    """Options for compiling the run's programs on `mesh`'s devices (`jax.jit`'s).

    TPU_COMPILER_OPTIONS on a TPU, with UP_FRONT_GATHER_OPTIONS for programs that gather
    every weight before their first layer (`gathers_up_front`), except a flag the user sets
    (`set_by_user`); None elsewhere.
    """
    if not on_tpu(mesh):
        return None
    options = TPU_COMPILER_OPTIONS | (UP_FRONT_GATHER_OPTIONS if gathers_up_front else {})
    return {k: v for k, v in options.items() if not set_by_user(k)} or None


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Sharding of a batch's leading axis: wherever the rules send "activation_batch"."""
    spec = nn.logical_to_mesh_axes(("activation_batch",), rules)
    return NamedSharding(mesh, spec)


def batch_share(sharding: NamedSharding) -> tuple[int, int]:
    """(index, count): which share of each global batch this process loads, of how many.

    Each process loads its own share, except processes whose devices hold the same rows
    of the batch (a mesh axis the batch is not split over, such as tensor parallelism,
    spanning processes): they load the same share, with the same augmentation. This is
    what `data.train_batches` and `data.eval_batches` take as `share_index`/`share_count`.

    Raises:
      ValueError: a process holding some of another's rows but not all of them, which no
        share of the batch can feed.
    """
    size = sharding.mesh.devices.size  # Any length the batch axes divide.
    rows: dict[int, set] = collections.defaultdict(set)
    for device, index in sharding.devices_indices_map((size,)).items():
        rows[device.process_index].add(index[0].indices(size)[:2])
    shares = batch_shares(rows)
    mine = frozenset(rows[jax.process_index()])
    return shares.index(mine), len(shares)


def batch_shares(rows: Mapping[int, set]) -> list[frozenset]:
    """The distinct sets of batch rows that processes hold (`rows`: process -> (start,
    stop) ranges of its devices' rows), in row order.

    Raises:
      ValueError: naming two processes whose rows overlap without being the same.
    """
    shares = sorted({frozenset(r) for r in rows.values()}, key=min)
    for i, share in enumerate(shares):
        for other in shares[i + 1 :]:
            if share & other:
                a = min(p for p, r in rows.items() if frozenset(r) == share)
                b = min(p for p, r in rows.items() if frozenset(r) == other)
                raise ValueError(
                    f"Processes {a} and {b} hold some of the same batch rows but not all: "
                    "neither can load a share of each batch the other loads too. Keep the "
                    "mesh axes the batch is not split over (tensor) inside one process, or "
                    "within groups of processes that hold the same rows."
                )
    return shares


def batch_size_per_shard(
    global_batch: int, mesh: Mesh, rules: Rules, field: str = "batch_size"
) -> int:
    """Checks that a global batch is positive and splits evenly over the batch-sharding mesh
    axes.

    Raises:
      ValueError: naming `config.<field>` and the nearest sizes that split evenly.
    """
    axes = _axis_names(batch_sharding(mesh, rules).spec[0])
    shards = int(np.prod([mesh.shape[a] for a in axes]))
    if global_batch <= 0 or global_batch % shards:
        lower = max(global_batch // shards * shards, 0)
        nearest = " or ".join(str(n) for n in (lower, lower + shards) if n > 0)
        raise ValueError(
            f"config.{field}={global_batch} is not a positive multiple of the {shards} batch "
            f"shards of mesh axes {axes}; choose a multiple of {shards} (e.g. {nearest})."
        )
    return global_batch // shards


def logical_shardings(abstract_boxed: Any, mesh: Mesh, rules: Rules) -> Any:
    """Maps a tree of logically-annotated (boxed) abstract values onto mesh shardings.

    A dimension that does not divide evenly over its mesh axes (B/16's 12 heads over
    tensor=8) is replicated instead, so any model runs on any mesh; a WARNING names
    every parameter this happens to, once, with the mesh axes and the sizes.
    """
    replicated: dict[tuple, list[str]] = collections.defaultdict(list)

    def fit(path, logical_spec: PartitionSpec, value: Any) -> NamedSharding:
        logical_names = tuple(logical_spec) + (None,) * (value.ndim - len(logical_spec))
        dims = []
        for size, name, axes in zip(
            value.shape, logical_names, nn.logical_to_mesh_axes(logical_names, rules), strict=True
        ):
            names = _axis_names(axes)
            shards = int(np.prod([mesh.shape[a] for a in names]))
            if size % shards:
                replicated[(name, names, shards, size)].append(_path(path))
                axes = None
            dims.append(axes)
        return NamedSharding(mesh, PartitionSpec(*dims))

    shardings = jax.tree_util.tree_map_with_path(
        fit,
        nn.get_partition_spec(abstract_boxed),
        nn.unbox(abstract_boxed),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )
    for (name, axes, shards, size), paths in replicated.items():
        log.warning(
            "Not sharding the %r dimension (size %d) over mesh axis %s (%d devices): %d is not "
            "divisible by %d, so it is replicated on every device in %s. Choose a mesh axis "
            "size that divides %d to shard it.",
            name,
            size,
            "x".join(axes),
            shards,
            size,
            shards,
            ", ".join(paths),
            size,
        )
    return shardings


def gathered_shardings(abstract_boxed: Any, param_shardings: Any, batch: NamedSharding) -> Any:
    """Where each parameter is gathered to before the layer that uses it.

    A parameter's sharding without the mesh axes that also split the batch (`batch`, from
    `batch_sharding`): FSDP stores a weight split over those axes and computes with it whole
    (tensor-parallel splits stay). Stacked weights of a scanned encoder (logical axis
    "layers") keep their sharding: whole, the stack would hold every layer's weights at
    once; the compiler gathers one layer per iteration of the loop. Data parallelism's
    shardings come back unchanged. `Trainer` constrains the parameters to these on one TPU
    slice (why: its comment there).
    """
    batch_axes = set(_axis_names(batch.spec[0]))

    def gathered(logical_spec: PartitionSpec, sharding: NamedSharding) -> NamedSharding:
        if "layers" in tuple(logical_spec):
            return sharding
        dims = []
        for axes in sharding.spec:
            kept = tuple(a for a in _axis_names(axes) if a not in batch_axes)
            dims.append(kept[0] if len(kept) == 1 else kept or None)
        return NamedSharding(sharding.mesh, PartitionSpec(*dims))

    return jax.tree.map(
        gathered,
        nn.get_partition_spec(abstract_boxed),
        param_shardings,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def splits_over_batch(abstract_params: Any, param_shardings: Any, gathered: Any) -> bool:
    """Whether any parameter is stored split over a mesh axis that also splits the batch
    (FSDP of size > 1): its shard under `param_shardings` is smaller than under `gathered`
    (`gathered_shardings`). `abstract_params`: unboxed shapes, e.g. from `jax.eval_shape`."""
    return any(
        stored.shard_shape(p.shape) != whole.shard_shape(p.shape)
        for p, stored, whole in zip(
            jax.tree.leaves(abstract_params),
            jax.tree.leaves(param_shardings),
            jax.tree.leaves(gathered),
            strict=True,
        )
    )


def _axis_names(axes: str | Sequence[str] | None) -> tuple[str, ...]:
    return (axes,) if isinstance(axes, str) else tuple(axes or ())


def optimizer_shardings(abstract_opt_state: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Optimizer state follows its parameters' shardings; anything else is replicated.

    A state leaf belongs to a parameter when the parameter's key path ends its own
    path (Adam's `mu/Transformer/.../kernel`, momentum traces, masked or multi-transform
    sub-states alike) and the shapes agree.
    """
    by_path = {
        _keys(path): sharding
        for path, sharding in jax.tree_util.tree_leaves_with_path(
            param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding)
        )
    }
    replicated = NamedSharding(mesh, PartitionSpec())

    def follow(path, leaf):
        keys = _keys(path)
        for start in range(len(keys)):
            sharding = by_path.get(keys[start:])
            if sharding is not None and len(sharding.spec) <= len(leaf.shape):
                return sharding
        return replicated

    return jax.tree_util.tree_map_with_path(follow, abstract_opt_state)


def _path(path: tuple) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _keys(path: tuple) -> tuple:
    return tuple(jax.tree_util.keystr((k,), simple=True) for k in path)


def to_global(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Assembles every process's host-local batch into one global, sharded array per key.

    An intended transfer: allowed under `jax.transfer_guard("disallow")` (which counts JAX's
    multi-process assembly as implicit).
    """
    with jax.transfer_guard_host_to_device("allow"):
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def host_arrays(outputs: Any) -> Any:
    """`outputs` (a jitted function's arrays, or a tuple of them) as NumPy arrays, once
    computed: XLA's error (an allocation that failed) is raised here. NumPy reads a CPU
    array through the buffer protocol, where JAX aborts the process on an array whose
    computation failed (a failed check, no exception)."""
    outputs = jax.block_until_ready(outputs)
    return tuple(map(np.asarray, outputs)) if isinstance(outputs, tuple) else np.asarray(outputs)


def prefetch_to_devices(
    batches: Iterator[dict[str, np.ndarray]], sharding: NamedSharding, size: int = 2
) -> Iterator[dict[str, jax.Array]]:
    """Global arrays of `batches`, `size` of them already on their way to the devices.

    Transfers are asynchronous, so the next batch crosses to the devices while the
    current step runs instead of between steps.
    """
    queue: collections.deque = collections.deque()
    for batch in batches:
        queue.append(to_global(batch, sharding))
        if len(queue) == size:
            yield queue.popleft()
    yield from queue


class DispatchWindow:
    """Back-pressure: the host stays at most `ahead` dispatched steps ahead of the devices.

    Call `add(outputs)` after dispatching each step (a train step, an eval batch): it waits
    until the step `ahead` steps earlier has finished. Enough steps to keep an accelerator's
    queue full; few enough to bound the device memory their inputs hold, and on CPU to stay
    under XLA's limit of computations in flight, past which a multi-process collective
    deadlocks.
    """

    def __init__(self, ahead: int = 2):
        self.ahead = ahead
        self._in_flight: collections.deque = collections.deque()

    def add(self, outputs: Any) -> None:
        """Records a dispatched step's outputs (any pytree of arrays)."""
        self._in_flight.append(outputs)
        if len(self._in_flight) > self.ahead:
            jax.block_until_ready(self._in_flight.popleft())


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Makes `mesh` and `rules` current, so that a jitted function traced inside sees the
    model's `nn.with_logical_constraint` annotations as sharding constraints."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield
