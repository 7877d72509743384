"""What pyproject.toml installs on each platform users run vit_jax on.

The package must install wherever its dependencies publish builds: TensorFlow (tf.data)
publishes its CPU build, `tensorflow-cpu`, for x86-64 Linux and Windows only, and its one
build, `tensorflow`, for those and for Apple-silicon macOS and ARM Linux (2.21.0 wheel
tags: tensorflow-cpu manylinux_2_27_x86_64, win_amd64; tensorflow also macosx_12_0_arm64,
manylinux_2_27_aarch64). Checked against PyPI with `uv pip compile pyproject.toml --extra
data --python-platform aarch64-apple-darwin` (and aarch64-manylinux_2_28,
x86_64-manylinux_2_31, x86_64-pc-windows-msvc); here, the markers that choose them.
"""

from __future__ import annotations

import os
import tomllib

import pytest
from helpers import REPO
from packaging.markers import default_environment
from packaging.requirements import Requirement

PLATFORMS = {
    "x86-64 Linux": dict(sys_platform="linux", platform_system="Linux", platform_machine="x86_64"),
    "Windows": dict(sys_platform="win32", platform_system="Windows", platform_machine="AMD64"),
    "Apple-silicon macOS": dict(
        sys_platform="darwin", platform_system="Darwin", platform_machine="arm64"
    ),
    "ARM Linux": dict(sys_platform="linux", platform_system="Linux", platform_machine="aarch64"),
}
TENSORFLOW_BUILDS = {  # Where PyPI has wheels of each (see above).
    "tensorflow-cpu": {"x86-64 Linux", "Windows"},
    "tensorflow": set(PLATFORMS),
}


def _project() -> dict:
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def _installed(requirements: list[str], platform: str) -> set[str]:
    environment = default_environment() | PLATFORMS[platform]
    chosen = (Requirement(r) for r in requirements)
    return {r.name for r in chosen if r.marker is None or r.marker.evaluate(environment)}


@pytest.mark.parametrize("platform", PLATFORMS)
def test_each_platform_gets_one_tensorflow_build_published_for_it(platform):
    """The CPU build where it is published (no GPU support to load beside JAX's), the one
    build elsewhere: before, `pip install -e ".[data]"` found no TensorFlow on a Mac."""
    builds = _installed(_project()["dependencies"], platform) & set(TENSORFLOW_BUILDS)
    assert len(builds) == 1, builds
    (build,) = builds
    assert platform in TENSORFLOW_BUILDS[build]
    assert (build == "tensorflow-cpu") == (platform in TENSORFLOW_BUILDS["tensorflow-cpu"])


@pytest.mark.parametrize(
    ("platform", "compilers"),
    [
        ("x86-64 Linux", {"vit_jax", "jax-cuda12-plugin", "nvidia-cuda-nvcc-cu12"}),
        ("ARM Linux", {"jax-cuda12-plugin", "nvidia-cuda-nvcc-cu12"}),  # No libtpu for ARM.
        ("Apple-silicon macOS", set()),
    ],
)
def test_the_compile_extra_brings_the_compilers_published_for_the_platform(platform, compilers):
    """libtpu (through vit_jax[tpu]) is published for x86-64 Linux, the CUDA plugin and ptxas
    for Linux: the test command's extras install everywhere, and the tests that need a
    compiler the platform lacks are skipped there (never under CI)."""
    assert _installed(_project()["optional-dependencies"]["compile"], platform) == compilers
