"""What users rent, by the names they rent it under, as compile-only devices and figures.

TPU slices go by Cloud TPU accelerator type (`v5e-16` = `v5litepod-16`, `v5p-128`,
`v6e-64`, `tpu7x-128`; the number counts chips for v5e/v6e and TensorCores, two per chip,
for v5p and TPU7x), `--slices N` for multi-slice. GPU nodes go by
`<kind>x<gpus per node>[x<nodes>]` (`h100x8`, `h200x8`, `b200x8`, `a100x8`, `h100x8x4`), a
node being one NVLink domain: one host, or a GB200 NVL72 rack (`gb200x72`: 18 hosts of 4
GPUs). `topology_devices` gives JAX's compile-only devices of the target (libtpu for TPUs,
the CUDA plugin with our target description for GPUs): `jit(...).lower(...).compile()` on
them runs the real compiler, no device needed.

Device figures are per JAX device (a TPU chip, a GPU; half a TPU7x chip, whose two
TensorCores JAX runs as two devices), one direction of traffic, from the vendors'
published specifications: Cloud TPU's system-architecture pages for v5e, v5p, v6e and TPU7x
(Ironwood, https://cloud.google.com/tpu/docs/tpu7x, per chip: 7,380 GB/s of HBM, 1,200 GB/s
of ICI both ways, 100 Gb/s of DCN); NVIDIA's H100, H200 and A100 SXM datasheets, its HGX
B200 specifications and its GB200 NVL72 specifications (NVLink: half the quoted
bidirectional figure). A TPU device's memory is the HBM libtpu's compiler gives a program
on it, as its refusals name it: v5e 15.75 GiB, v5p 95.74, v6e 31.25, TPU7x 94.75 (half the
chip's 192 GiB, less what the runtime keeps); a GPU's is what `nvidia-smi` reports as its
total (B200: 183,359 MiB; GB200: 189,471 MiB). Data-center
network (DCN) bandwidth per TPU chip is Google's, from the same pages: "TPU v5p"
(https://cloud.google.com/tpu/docs/v5p) gives it per chip, "Data center network (DCN)
bandwidth per chip (Gbps) 50": 6.25 GB/s. "TPU v5e"
(https://cloud.google.com/tpu/docs/v5e) and "TPU v6e" (https://cloud.google.com/tpu/docs/v6e)
give it per host of 8 chips and per Pod of 256: v5e "Per-host NIC configuration 2 x 100
Gbps NIC", "Data center network bandwidth per Pod 6.4 Tbps", both 25 Gb/s per chip
(3.125 GB/s); v6e "4 x 200 Gbps NIC", "25.6 Tbps", both 100 Gb/s per chip (12.5 GB/s).
The pages name no direction for it; a NIC's rate is each direction's. GPU nodes are taken
as one 400 Gb/s (A100: 200 Gb/s) InfiniBand adapter per GPU, as in DGX and HGX systems
and in DGX GB200 (four ConnectX-7 adapters per compute tray of 4 GPUs).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.resources
import os
import re
from typing import NamedTuple

GIB = 1024**3

# The share of a GPU's memory JAX takes unless the environment says otherwise.
JAX_GPU_MEMORY_FRACTION = 0.75


@dataclasses.dataclass(frozen=True)
class Device:
    """Figures of one device kind: `kind` is what `jax.Device.device_kind` reports."""

    kind: str
    memory_bytes: int  # What a program may use on one device.
    hbm_bytes_per_s: float
    ici_bytes_per_s: float  # Inside a slice or node (ICI, NVLink).
    dcn_bytes_per_s: float  # Between slices or nodes.


class TpuFamily(NamedTuple):
    """What a Cloud TPU accelerator type's family says: its topology prefix, how many units
    of the type's count make a chip (TensorCores for v5p and TPU7x, else chips), whether
    its slices are 3D tori (4-chip cubes and up) or 2D, and the figures per JAX device."""

    prefix: str
    units_per_chip: int
    torus_3d: bool
    device: Device


_V5E = TpuFamily("v5e", 1, False, Device("TPU v5 lite", int(15.75 * GIB), 819e9, 200e9, 3.125e9))
TPUS = {
    "v5e": _V5E,
    "v5litepod": _V5E,
    "v5p": TpuFamily("v5p", 2, True, Device("TPU v5", int(95.74 * GIB), 2765e9, 600e9, 6.25e9)),
    "v6e": TpuFamily(
        "v6e", 1, False, Device("TPU v6 lite", int(31.25 * GIB), 1640e9, 448e9, 12.5e9)
    ),
    "tpu7x": TpuFamily("tpu7x", 2, True, Device("TPU7x", int(94.75 * GIB), 3690e9, 300e9, 6.25e9)),
}
# name -> figures, memory_bytes all of the GPU's (a target takes JAX's share of it:
# gpu_memory_fraction); the target description ships as gpu_targets/<name>.txtpb.
GPUS = {
    "h100": Device("NVIDIA H100 80GB HBM3", 85520809984, 3.35e12, 450e9, 50e9),
    "h200": Device("NVIDIA H200", 150754820096, 4.8e12, 450e9, 50e9),
    "b200": Device("NVIDIA B200", 192265846784, 8e12, 900e9, 50e9),
    "a100": Device("NVIDIA A100-SXM4-80GB", 85899345920, 2.039e12, 300e9, 25e9),
    "gb200": Device("NVIDIA GB200", 198675808256, 8e12, 900e9, 50e9),
}
# Kinds whose NVLink domain spans hosts: name -> (GPUs per host, most GPUs per domain). A
# GB200 NVL72 rack joins 18 compute trays (hosts) of 4 GPUs; elsewhere (HGX, DGX) one host
# is one NVLink domain.
MULTI_HOST_NVLINK = {"gb200": (4, 72)}
# Two-dimensional slices (v5e, v6e) by chip count.
TORUS_2D = {
    1: "1x1",
    4: "2x2",
    8: "2x4",
    16: "4x4",
    32: "4x8",
    64: "8x8",
    128: "8x16",
    256: "16x16",
}


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    platform: str  # "tpu" | "cuda"
    # As `get_topology_desc` takes it; for GPUs <nodes>x<hosts per node>x<GPUs per host>, a
    # node being one NVLink domain (a partition, `parallel.device_slices`), a host a process.
    topology: str
    slices: int  # TPU slices, or GPU nodes.
    device: Device


class UnknownTargetError(ValueError):
    """A target name that is not one of the known TPU or GPU families."""


class CompilerMissingError(RuntimeError):
    """The compiler of the target's platform is not installed (or cannot load)."""


def known_targets() -> str:
    tpus = ", ".join(f"{f}-N" for f in TPUS)
    return (
        f"TPU slices {tpus} (e.g. v5e-16, v5p-128, v6e-64, tpu7x-128; with --slices N for "
        "multi-slice); "
        f"GPU nodes {', '.join(f'{g}xG[xNODES]' for g in GPUS)} (e.g. h100x8, h100x8x4; "
        "a GB200 node is an NVL72 rack's NVLink domain: gb200x72, two racks gb200x72x2)"
    )


def _torus_3d(family: str, chips: int) -> str:
    """v5p and TPU7x slice shapes: from 2x2x1, double the last of the smallest dimensions."""
    dims = [2, 2, 1]
    while dims[0] * dims[1] * dims[2] < chips:
        smallest = min(dims)
        dims[max(i for i, d in enumerate(dims) if d == smallest)] *= 2
    if dims[0] * dims[1] * dims[2] != chips:
        raise UnknownTargetError(f"No {family} slice has {chips} chips: use a power of two >= 4.")
    return "x".join(map(str, dims))


def gpu_memory_fraction() -> float:
    """The share of each GPU's memory a run's programs may use, as JAX reads it:
    XLA_CLIENT_MEM_FRACTION or the older XLA_PYTHON_CLIENT_MEM_FRACTION where set (the GPU
    launch scripts give vit-train 0.9), else JAX's default 0.75.

    Raises:
      ValueError: a value that is not a number in (0, 1].
    """
    for name in ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION"):
        if value := os.environ.get(name):
            break
    else:
        return JAX_GPU_MEMORY_FRACTION
    try:
        fraction = float(value)
    except ValueError:
        fraction = 0.0
    if not 0 < fraction <= 1:
        raise ValueError(
            f"{name}={value}: the share of a GPU's memory JAX takes, a number in (0, 1] such "
            "as 0.9."
        )
    return fraction


def parse_target(name: str, slices: int = 1) -> Target:
    """`v5e-16`, `v5p-128`, `h100x8x4`, ... -> a `Target`. A GPU target's memory per device
    is the share a run takes (`gpu_memory_fraction`).

    Raises:
      UnknownTargetError: naming the known families and sizes.
      ValueError: an XLA_PYTHON_CLIENT_MEM_FRACTION that is not a share of memory.
    """
    if slices < 1:
        raise UnknownTargetError(f"--slices {slices}: must be >= 1.")
    tpu = re.fullmatch(rf"({'|'.join(TPUS)})-(\d+)", name)
    if tpu:
        prefix, per_chip, torus_3d, device = TPUS[tpu.group(1)]
        count = int(tpu.group(2))
        if count % per_chip:
            raise UnknownTargetError(
                f"{name}: {tpu.group(1)} counts TensorCores, two per chip ({prefix}-8 is 4 chips)."
            )
        chips = count // per_chip
        if torus_3d:
            shape = _torus_3d(prefix, chips)
        elif chips in TORUS_2D:
            shape = TORUS_2D[chips]
        else:
            raise UnknownTargetError(f"{name}: {prefix} slices have {sorted(TORUS_2D)} chips.")
        return Target(name, "tpu", f"{prefix}:{shape}", slices, device)
    if re.fullmatch(r"v4-\d+", name):
        raise UnknownTargetError(
            f"{name}: not offered. libtpu's compile-only v4 devices are single TensorCores, "
            "while JAX on a v4 slice runs one device per chip (both cores as one, megacore): "
            "the program compiled would not be the one that runs. Known: " + known_targets()
        )
    gpu = re.fullmatch(rf"({'|'.join(GPUS)})x(\d+)(?:x(\d+))?", name)
    if gpu:
        if slices != 1:
            raise UnknownTargetError(
                f"{name}: give GPU nodes in the name (h100x8x4), not --slices."
            )
        gpus, nodes = int(gpu.group(2)), int(gpu.group(3) or 1)
        if gpus < 1 or nodes < 1:
            raise UnknownTargetError(
                f"{name}: a node has at least one GPU, a target at least one node. "
                f"Known: {known_targets()}."
            )
        kind = gpu.group(1)
        per_host, most = MULTI_HOST_NVLINK.get(kind, (gpus, gpus))
        if gpus % per_host or gpus > most:
            raise UnknownTargetError(
                f"{name}: a {kind} node (one NVLink domain) is whole hosts of {per_host} GPUs, "
                f"at most {most}: {kind}x{per_host} ... {kind}x{most}."
            )
        device = GPUS[kind]
        share = dataclasses.replace(
            device, memory_bytes=int(device.memory_bytes * gpu_memory_fraction())
        )
        return Target(name, "cuda", f"{nodes}x{gpus // per_host}x{per_host}", nodes, share)
    raise UnknownTargetError(f"Unknown target {name!r}. Known: {known_targets()}.")


def gpu_target_config(target: Target) -> str:
    """The GpuTargetConfigProto text shipped for the target's GPU kind."""
    kind = target.name.split("x")[0]
    return (
        importlib.resources.files("vit_jax.bench") / "gpu_targets" / f"{kind}.txtpb"
    ).read_text()


def topology_devices(target: Target) -> list:
    """Compile-only devices of `target` (needs libtpu, or the CUDA plugin and ptxas).

    Raises:
      RuntimeError: saying which package to install when the compiler is missing.
    """
    from jax.experimental import topologies

    # Compile-only: no chip is opened, so processes (a sweep's workers, tests) may share
    # libtpu, and libtpu need not look for the VM's TPU (it warns at length when it can't).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if target.platform == "tpu":
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", target.name.replace("v5e-", "v5litepod-"))
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    try:
        if target.platform == "tpu":
            topology = topologies.get_topology_desc(
                topology_name=target.topology, platform="tpu", num_slices=target.slices
            )
        else:
            topology = topologies.get_topology_desc(
                platform="cuda", target_config=gpu_target_config(target), topology=target.topology
            )
    except Exception as e:  # The plugins raise several kinds; all mean "not usable here".
        needed = "libtpu" if target.platform == "tpu" else "the CUDA plugin and ptxas"
        raise CompilerMissingError(
            f"Cannot compile for {target.name}: {needed} must be installed (pip install "
            f"'vit_jax[compile]'). The plugin said: {type(e).__name__}: {e}"
        ) from e
    return list(topology.devices)


def compiler_version(target: Target) -> str:
    """The compiler that compiles for `target`, as "<package> <version>", or the library
    `TPU_LIBRARY_PATH` names when that is not the installed libtpu (importing libtpu sets
    it to its own). Memory and collectives change between compiler releases
    (docs/fsdp-on-tpu.md, "A newer compiler is not the fix"), so a plan holds for the
    release it was compiled with."""
    if target.platform != "tpu":
        return f"jax-cuda12-pjrt {importlib.metadata.version('jax-cuda12-pjrt')}"
    chosen = os.environ.get("TPU_LIBRARY_PATH")
    try:
        import libtpu
    except ImportError:
        return chosen or "libtpu, not installed"
    if chosen and os.path.realpath(chosen) != os.path.realpath(libtpu.get_library_path()):
        return chosen
    return f"libtpu {libtpu.__version__}"
