"""Which devices JAX runs on: `vit_jax.accelerators`, on device-node trees written under a
temporary root and, for the TPU another process holds, the real libtpu."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from vit_jax import accelerators


def _machine(root, files: dict[str, str]) -> str:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return str(root)


@pytest.mark.parametrize(
    "files, present",
    [
        ({}, False),
        ({"dev/vfio/vfio": ""}, False),  # VFIO's control node alone: no device assigned.
        ({"sys/bus/pci/devices/0000:00:04.0/vendor": "0x1af4\n"}, False),  # A virtio disk.
        ({"dev/nvidia0": ""}, True),
        ({"dev/nvidiactl": ""}, True),  # A container's.
        ({"dev/dxg": ""}, True),  # A GPU under WSL.
        ({"dev/accel0": ""}, True),  # TPU v4.
        ({"dev/vfio/0": ""}, True),  # TPU v5e and later.
        ({"sys/bus/pci/devices/0000:00:05.0/vendor": "0x1ae0\n"}, True),  # Google's.
    ],
)
def test_an_accelerator_may_be_present_where_a_device_node_or_a_google_pci_device_is(
    tmp_path, files, present
):
    """Where this says no, commands run JAX on the CPU without asking the plugins: it must
    never say no on a machine with a GPU or TPU."""
    assert accelerators.accelerator_present(_machine(tmp_path, files)) is present


@pytest.mark.parametrize("node", ["dev/accel0", "dev/vfio/0"])  # TPU v4; v5e and later.
def test_a_run_on_the_cpu_of_a_tpu_machine_is_refused_with_jaxs_reason(tmp_path, node):
    """This process's JAX has the CPU alone, as a `pip install jax` without its TPU extra
    has: on a TPU machine the run stops, naming the device, JAX's reason and the install."""
    with pytest.raises(accelerators.CpuFallbackError) as refused:
        accelerators.check_cpu_fallback(_machine(tmp_path, {node: ""}), environ={})
    reason = str(refused.value)
    assert reason.startswith(f"this machine has a TPU ({tmp_path / node}), but JAX runs on ")
    assert "Unknown backend tpu" in reason and "Available backends" not in reason
    assert 'pip install -e ".[tpu]"' in reason
    assert reason.endswith("or set JAX_PLATFORMS=cpu to run on the CPU on purpose.")


def test_a_run_on_the_cpu_of_a_gpu_machine_is_warned_of(tmp_path, caplog):
    """A machine with an NVIDIA GPU may be a workstation running a CPU-sized recipe (the
    README's main job) on purpose: the same reason, as a warning."""
    with caplog.at_level(logging.WARNING, logger="vit_jax.accelerators"):
        accelerators.check_cpu_fallback(_machine(tmp_path, {"dev/nvidia0": ""}), environ={})
    (warning,) = caplog.messages
    assert warning.startswith(f"This machine has an NVIDIA GPU ({tmp_path}/dev/nvidia0), but JAX")
    assert "Unknown backend cuda" in warning and 'pip install -e ".[gpu]"' in warning


@pytest.mark.parametrize(
    "files, environ",
    [
        ({}, {}),
        ({"dev/dxg": ""}, {}),  # WSL: any GPU gives it, and JAX has no backend for most.
        ({"dev/vfio/vfio": ""}, {}),  # VFIO's control node alone: no device assigned.
        ({"sys/bus/pci/devices/0000:00:05.0/vendor": "0x1ae0\n"}, {}),  # A Google Cloud NIC.
        ({"dev/accel0": ""}, {"JAX_PLATFORMS": "cpu"}),  # The CPU asked for.
        ({"dev/nvidia0": ""}, {"JAX_PLATFORMS": "cpu"}),
    ],
)
def test_the_cpu_is_not_refused_without_a_device_or_when_asked_for(
    tmp_path, caplog, files, environ
):
    with caplog.at_level(logging.WARNING, logger="vit_jax.accelerators"):
        accelerators.check_cpu_fallback(_machine(tmp_path, files), environ=environ)
    assert not caplog.messages


@pytest.mark.compile  # The extra that brings libtpu.
def test_a_tpu_another_process_holds_is_named_as_such(tmp_path):
    """libtpu does not load while another process holds its lock (an earlier run still
    alive, a notebook); JAX then runs on the CPU, warning only that a TPU "may be present
    ... or libtpu is not installed". The real libtpu of the `compile` extra, its lock held
    by a real process."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, time; f = open('/tmp/libtpu_lockfile', 'a'); "
         "fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB); print('held', flush=True); "
         "time.sleep(300)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "held\n"
        root = _machine(tmp_path, {"dev/accel0": ""})
        ask = f"from vit_jax import accelerators; accelerators.check_cpu_fallback({root!r})"
        unset = ("JAX_PLATFORMS", "ALLOW_MULTIPLE_LIBTPU_LOAD")
        answer = subprocess.run(
            [sys.executable, "-c", ask],
            env={k: v for k, v in os.environ.items() if k not in unset},
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        holder.kill()
        holder.wait()
    refusal = answer.stderr.strip().splitlines()[-1]
    assert refusal.startswith("vit_jax.accelerators.CpuFallbackError: this machine has a TPU (")
    assert "lockfile" in refusal and "Another process holds the TPU" in refusal, answer.stderr
