"""Which devices JAX runs on: the CPU where there is no accelerator, and never the CPU
unannounced where there is one.

- `skip_absent_accelerators` (every command, before JAX loads): on a Linux machine with
  neither a GPU nor a TPU, JAX runs on the CPU without first asking the `compile` extra's
  plugins (libtpu, CUDA) for devices, which would log tracebacks before it fell back.
- `check_cpu_fallback` (vit-train, `vit-bench train` and `infer`, once JAX is up): on a
  machine with a TPU or an NVIDIA GPU, JAX falls back to the CPU with one warning among
  the logs when it cannot use the device: no TPU or CUDA support installed (`pip install
  jax` without its `tpu` or `cuda12` extra), another process holding the TPU (an earlier
  run still alive, a notebook; JAX's warning then says libtpu "is not installed"), CUDA
  libraries or a driver the plugin cannot load. A run would go on hundreds of times
  slower, on every host of a pod. On a TPU machine these commands stop instead, with
  JAX's reason and what to do; on a GPU machine, which may be a workstation running a
  small recipe on its CPU on purpose, they say the same as a warning. `JAX_PLATFORMS=cpu`
  asks for the CPU and silences both.
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import logging
import os
import pkgutil
import re
import sys
from collections.abc import Mapping

logger = logging.getLogger(__name__)

# The JAX plugins whose devices `accelerator_present` finds (NVIDIA's); libtpu is JAX's own
# TPU backend, no plugin, and TPU chips are found too.
_KNOWN_PLUGINS = frozenset({"xla_cuda12", "xla_cuda13"})
# Device nodes that only a TPU (v4: /dev/accel*, v5e and later: VFIO groups) or an NVIDIA
# GPU gives a machine, by JAX's platform name.
_DEVICES = {
    "tpu": ("a TPU", ("dev/accel*", "dev/vfio/[0-9]*")),
    "cuda": ("an NVIDIA GPU", ("dev/nvidia[0-9]*",)),
}
# Those, and nodes a GPU may be behind: a container's /dev/nvidiactl, WSL's /dev/dxg (which
# any GPU under WSL gives, an NVIDIA one or not); and TPU chips' PCI vendor.
_ACCELERATOR_NODES = (
    *(pattern for _, patterns in _DEVICES.values() for pattern in patterns),
    "dev/nvidiactl",
    "dev/dxg",
)
_GOOGLE_PCI_VENDOR = "0x1ae0"


def accelerator_present(root: str = "/") -> bool:
    """Whether the machine whose file system is at `root` may have a GPU or TPU: a device
    node of either, or any PCI device of Google's (TPU chips, and Google Cloud's virtual
    NICs: on a CPU VM there, a false yes, which costs only the plugins' messages)."""
    if any(glob.glob(os.path.join(root, pattern)) for pattern in _ACCELERATOR_NODES):
        return True
    for vendor in glob.glob(os.path.join(root, "sys/bus/pci/devices/*/vendor")):
        with open(vendor) as f:
            if f.read().strip() == _GOOGLE_PCI_VENDOR:
                return True
    return False


def _jax_plugins() -> set[str]:
    """The names of the plugins JAX loads: its `jax_plugins` entry points and the modules of
    the `jax_plugins` namespace package (found without importing them)."""
    names = {e.name for e in importlib.metadata.entry_points(group="jax_plugins")}
    spec = importlib.util.find_spec("jax_plugins")
    if spec is not None and spec.submodule_search_locations:
        names |= {m.name for m in pkgutil.iter_modules(spec.submodule_search_locations)}
    return names


def skip_absent_accelerators() -> None:
    """Sets JAX_PLATFORMS=cpu, before JAX loads, on a Linux machine with neither a GPU nor a
    TPU when no JAX plugin but the CUDA ones is installed: JAX would fall back to the CPU
    anyway, after the `compile` extra's plugins had looked for their devices and logged a
    traceback ("Unable to load CUDA") and libtpu's errors. A JAX_PLATFORMS the user set is
    kept, and so is JAX's own choice wherever an accelerator or another plugin may be."""
    if (
        os.environ.get("JAX_PLATFORMS")
        or not sys.platform.startswith("linux")
        or not _jax_plugins() <= _KNOWN_PLUGINS
        or accelerator_present()
    ):
        return
    os.environ["JAX_PLATFORMS"] = "cpu"


_SUPPORT = {
    "tpu": '"jax[tpu]" (pip install -e ".[tpu]")',
    "cuda": '"jax[cuda12]" (pip install -e ".[gpu]")',
}


class CpuFallbackError(Exception):
    """JAX runs on the CPU of a machine with a TPU; the message says why and what to do."""


def check_cpu_fallback(root: str = "/", environ: Mapping[str, str] = os.environ) -> None:
    """Refuses a run on the CPU that JAX fell back to on a TPU machine (a TPU VM is never
    rented for its CPU); warns of it on a machine with an NVIDIA GPU, which may be a
    workstation running a CPU-sized recipe (the README's main job) on purpose. `root`: the
    machine's file system; `environ`: where `JAX_PLATFORMS` would ask for the CPU.

    Raises:
      CpuFallbackError: on a TPU machine, with JAX's reason and what to do.
    """
    found = _cpu_fallback(root, environ)
    if found is None:
        return
    platform, reason = found
    if platform == "tpu":
        raise CpuFallbackError(reason)
    logger.warning("%s", reason[0].upper() + reason[1:])


def _cpu_fallback(
    root: str = "/", environ: Mapping[str, str] = os.environ
) -> tuple[str, str] | None:
    """JAX's platform for the device of the machine whose file system is at `root` ("tpu" or
    "cuda"), and why JAX runs on its CPU instead, with JAX's own reason and what to do;
    None where JAX runs on an accelerator, where the machine has neither, or where
    `JAX_PLATFORMS` in `environ` chose the platforms. Call once JAX may initialise its
    backends.
    """
    import jax

    if environ.get("JAX_PLATFORMS") or jax.default_backend() != "cpu":
        return None
    nodes = {
        platform: sorted(
            node for pattern in patterns for node in glob.glob(os.path.join(root, pattern))
        )
        for platform, (_, patterns) in _DEVICES.items()
    }
    platform = next((platform for platform, found in nodes.items() if found), None)
    if platform is None:
        return None
    device, patterns = _DEVICES[platform]
    try:
        jax.devices(platform)
    except RuntimeError as e:
        reason = re.sub(r"\.*\s*Available backends are \[.*\]\s*$", "", str(e)).rstrip(".")
    else:
        return None  # JAX has the device and chose the CPU as asked (jax_default_device).
    # libtpu's refusals while another process has the TPU: "The TPU is already in use by
    # process with pid N", an error on its multi-process lock file, "Device or resource busy".
    if any(word in reason.lower() for word in ("in use", "lockfile", "busy")):
        advice = (
            f"Another process holds the {device.split(' ', 1)[1]}: stop it (`sudo lsof -w "
            f"{' '.join(patterns).replace('dev/', '/dev/')}` names it) and rerun"
        )
    else:
        advice = (
            f"Install JAX's support for it, {_SUPPORT[platform]}, at the version of the "
            "installed jax, on every host"
        )
    return platform, (
        f"this machine has {device} ({', '.join(nodes[platform][:2])}), but JAX runs on the CPU: "
        f"{reason}. {advice}; or set JAX_PLATFORMS=cpu to run on the CPU on purpose."
    )
