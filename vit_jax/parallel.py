"""Device mesh, logical-axis rules and the shardings derived from them.

The model names its axes logically ("embed", "mlp", "heads", "activation_batch",
...). A config's `mesh` and `sharding_rules` map those names onto mesh axes, so
data parallelism, FSDP and tensor parallelism differ only in configuration.
"""

from __future__ import annotations

import collections
import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
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


def make_mesh(axes: Sequence[tuple[str, int]], devices: Sequence[Any] | None = None) -> Mesh:
    """Builds a named mesh, e.g. `(("data", -1), ("fsdp", 1), ("tensor", 1))`.

    One axis may be -1: it takes all devices the others leave.
    """
    devices = list(devices if devices is not None else jax.devices())
    names = [name for name, _ in axes]
    sizes = [int(size) for _, size in axes]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh {list(axes)}: at most one axis may be -1.")
    fixed = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % fixed:
            raise ValueError(
                f"mesh {list(axes)}: {len(devices)} devices cannot be split into axes of "
                f"sizes {[s for s in sizes if s != -1]}; make {len(devices)} divisible by {fixed}."
            )
        sizes[sizes.index(-1)] = len(devices) // fixed
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(names, sizes, strict=True))} needs {int(np.prod(sizes))} devices "
            f"but {len(devices)} are available; use -1 for one axis to take the rest."
        )
    auto = (jax.sharding.AxisType.Auto,) * len(names)
    return jax.make_mesh(sizes, names, axis_types=auto, devices=devices)


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Sharding of a batch's leading axis: wherever the rules send "activation_batch"."""
    spec = nn.logical_to_mesh_axes(("activation_batch",), rules)
    return NamedSharding(mesh, spec)


def batch_size_per_shard(global_batch: int, mesh: Mesh, rules: Rules) -> int:
    """Checks that a global batch splits evenly over the batch-sharding mesh axes."""
    axes = batch_sharding(mesh, rules).spec[0]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    shards = int(np.prod([mesh.shape[a] for a in axes]))
    if global_batch % shards:
        raise ValueError(
            f"batch size {global_batch} is not divisible by the {shards} batch shards of mesh "
            f"axes {axes}; choose a multiple of {shards}."
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
            names = (axes,) if isinstance(axes, str) else tuple(axes or ())
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
    """Assembles every process's host-local batch into one global, sharded array per key."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


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


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Makes `mesh` and `rules` current, so that a jitted function traced inside sees the
    model's `nn.with_logical_constraint` annotations as sharding constraints."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield
