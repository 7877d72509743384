"""Every test sees 8 simulated CPU devices; TensorFlow never sees an accelerator and loads
without Keras; compiled programs are shared through JAX's persistent cache; a test that needs
a missing extra is skipped, or fails under CI."""

import os
import shutil
import sys
import tempfile

import pytest

# Simulated devices share the host's cores: on a loaded machine one of them can reach a
# collective long after the others, past XLA's 40 s CPU default that aborts the process.
# Compiling is most of the suite's time (XLA's backend compile: 404 of 517 s in the model,
# train-step and sharding tests). XLA:CPU's older LLVM IR fusion emitters compile the same
# sharded programs (the same collectives; fused differently) faster than its MLIR ones:
# four tests of sharded training in 66 and 71 s against 95 and 92 s, runs interleaved.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8"
    + " --xla_cpu_collective_call_terminate_timeout_seconds=900"
    + " --xla_cpu_collective_call_warn_stuck_timeout_seconds=300"
    + " --xla_cpu_use_fusion_emitters=false"
).strip()
if not os.environ.get("JAX_PLATFORMS"):  # Unset or empty (JAX reads both as "all").
    os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# The tests compile the same tiny programs many times over: in each new Trainer, in every
# `vit-train` subprocess. JAX's persistent cache (inherited by subprocesses through the
# environment) compiles each once per session; set JAX_COMPILATION_CACHE_DIR to keep it
# across sessions. Cached programs are the ones XLA compiled, so no result changes.
_SESSION_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _SESSION_CACHE = tempfile.mkdtemp(prefix="vit_jax_tests_jit_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _SESSION_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# The tests' models are tiny: optimising their machine code costs more time than it saves
# (Flax's example tests do the same). It lowers the backend's (LLVM's) optimisation level;
# sharding, collectives and results are the same programs'.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# TensorFlow loads without Keras here too, as in the commands (vit_jax.cli.skip_keras): the
# tests' own processes and helper scripts import it outside a command.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

# The interop extra's torch build brings triton (a GPU kernel compiler), which crashes the
# process when loaded after TensorFlow; torch on CPU never needs it, so it is kept out.
sys.modules.setdefault("triton", None)

from helpers import EXTRAS, require_extra  # noqa: E402  (after the environment is set)


@pytest.fixture
def cloud_storage(tmp_path, monkeypatch):
    """A local folder that stands for Cloud Storage: what epath reads and writes at
    gs://BUCKET/PATH lies at FOLDER/BUCKET/PATH; local paths stay local. (epath's own test
    mock, which it bypasses for TensorFlow's file system wherever TensorFlow is installed.)"""
    from etils.epath import gpath, testing

    folder = tmp_path / "cloud_storage"

    def local(path) -> str:
        path = os.fspath(path)
        return str(folder / path.removeprefix("gs://")) if path.startswith("gs://") else path

    def on_local(original, path, *args, **kwargs):
        return original(local(path), *args, **kwargs)

    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
    names = ("open", "exists", "isdir", "listdir", "glob", "makedirs", "mkdir", "stat")
    with testing.mock_epath(**dict.fromkeys(names, on_local)):
        yield folder


def pytest_runtest_setup(item):
    for name, (modules, install) in EXTRAS.items():
        marker = item.get_closest_marker(name)
        if marker is not None:
            require_extra(name, marker.args or modules, install)


def pytest_unconfigure(config):
    if _SESSION_CACHE is not None:
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)
