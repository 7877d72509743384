"""The persistent compilation cache: a restarted run loads its programs from the workdir."""

import os

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.compilation_cache import compilation_cache

from vit_jax.config import base_config
from vit_jax.workdir import use_compilation_cache


@pytest.fixture
def jax_cache_setting():
    """Restores JAX's cache directory (the test session's own) after the test."""
    before = jax.config.jax_compilation_cache_dir
    yield
    jax.config.update("jax_compilation_cache_dir", before)
    compilation_cache.reset_cache()


def test_the_cache_lives_in_the_workdir_and_holds_the_compiled_programs(
    tmp_path, jax_cache_setting
):
    jax.config.update("jax_compilation_cache_dir", None)
    config = base_config()
    where = use_compilation_cache(config, str(tmp_path))
    assert where == str(tmp_path / "compilation_cache")
    jax.jit(lambda x: jnp.tanh(x) * 3.0).lower(jnp.zeros(7)).compile()
    assert any(name.startswith("jit_") for name in os.listdir(where))


def test_a_cache_jax_already_has_or_an_empty_setting_is_kept(tmp_path, jax_cache_setting):
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "shared"))
    config = base_config()
    assert use_compilation_cache(config, str(tmp_path / "run")) == str(tmp_path / "shared")
    config.compilation_cache_dir = ""
    jax.config.update("jax_compilation_cache_dir", None)
    assert use_compilation_cache(config, str(tmp_path / "run")) is None
    config.compilation_cache_dir = str(tmp_path / "mine")
    assert use_compilation_cache(config, str(tmp_path / "run")) == str(tmp_path / "mine")
