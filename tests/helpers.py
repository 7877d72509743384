"""What test modules share: recipes shrunk to seconds, tiny data writers, the extras some
tests need. Test modules import from here, never from one another (whether one test
module can import another depends on pytest's import mode)."""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import subprocess
import sys

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from vit_jax import parallel
from vit_jax.config import base_config
from vit_jax.models import abstract_params
from vit_jax.parallel import make_mesh
from vit_jax.trainer import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now, for a test's coordinator."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_two_processes(script: str, *args: str) -> list[subprocess.CompletedProcess]:
    """`python -c script coordinator index *args` as processes 0 and 1 of one
    jax.distributed run, from the repository, both at once; each one's exit status and
    output once both have ended."""
    coordinator = f"localhost:{free_port()}"
    command = [sys.executable, "-c", script, coordinator]
    procs = [
        subprocess.Popen(
            [*command, str(i), *args],
            cwd=REPO,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [
        subprocess.CompletedProcess(p.args, p.returncode, out, err)
        for p, (out, err) in zip(procs, outputs, strict=True)
    ]


# The optional dependencies some tests need, by the marker those tests carry, with the
# command that installs them. Without them such a test is skipped, or fails under CI.
EXTRAS = {
    "interop": (
        ("torch", "torchvision", "timm", "transformers", "safetensors"),
        'pip install -e ".[test,interop]"',
    ),
    # TPU targets by default; `@pytest.mark.compile("jax_plugins.xla_cuda12")` for GPU ones.
    "compile": (("libtpu",), 'pip install -e ".[test,compile]" (published for x86-64 Linux)'),
}


def in_ci() -> bool:
    """Whether this is CI, where a test that cannot run is a failure, not a skip."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_extra(name: str, modules: tuple[str, ...], install: str) -> None:
    """Skips the calling test (or module) when `modules` are missing; fails it under CI."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if not missing:
        return
    message = f"needs the {name} extra ({', '.join(missing)} missing): {install}"
    if in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message, allow_module_level=True)


# `vit-train` paused before a given step until its stdin gets a line: see the script.
PAUSED_TRAIN = os.path.join(REPO, "tests", "paused_train.py")


def simulated_devices_env(count: int) -> dict[str, str]:
    """This process's environment with `count` simulated CPU devices instead of
    tests/conftest.py's 8, its other XLA flags kept."""
    flag = "--xla_force_host_platform_device_count="
    xla_flags = re.sub(re.escape(flag) + r"\d+", f"{flag}{count}", os.environ["XLA_FLAGS"])
    return os.environ | {"XLA_FLAGS": xla_flags}


def run_limited(
    limit: int, resource_name: str, command: list[str], devices: int | None = None
) -> subprocess.CompletedProcess:
    """`command` (its first item the interpreter) run from the repository under the rlimit
    `resource.<resource_name>` = `limit`, set by a process of its own that then becomes the
    command (no preexec_fn: a fork of the multithreaded test process must exec at once),
    on `devices` simulated CPU devices (None: as many as this process). Under a memory
    limit give it one: of several sharing the limit, those whose allocations succeeded
    would wait in the step's collectives for the one whose allocation failed."""
    set_limit = (
        f"import os, resource, sys; resource.setrlimit(resource.{resource_name}, "
        "(int(sys.argv[1]),) * 2); os.execv(sys.executable, [sys.executable, *sys.argv[2:]])"
    )
    return subprocess.run(
        [sys.executable, "-c", set_limit, str(limit), *command[1:]],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env=None if devices is None else simulated_devices_env(devices),
    )  # fmt: skip


def wait_until_paused(run: subprocess.Popen, step: int) -> bool:
    """Reads `run`'s stdout until PAUSED_TRAIN says it waits at `step`; False if it ended."""
    return any(line == f"paused at step {step}\n" for line in run.stdout)


def load_recipe(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """`configs/<name>` with its argument string, exactly as `--config` parses it."""
    from ml_collections import config_flags

    path = os.path.join(REPO, "configs", name) + (f":{arg}" if arg else "")
    return config_flags.config_flags._ConfigFileParser(name="config").parse(path)


# A 1-block, 32-wide ViT on 8 px digits: the main job's code path in seconds.
TINY = {
    "image_size": 8,
    "model.name": "Ti/4",
    "model.width": 32,
    "model.depth": 1,
    "model.mlp_dim": 64,
    "model.num_heads": 2,
    "eval_batch_size": 128,
    "transfer_guard": "disallow",  # An implicit host<->device copy in the loop fails a test.
}
# The recipe's few-shot probe off, as flattened config keys (or --config flags): it costs
# more than the tests' runs train, and only the tests that assert on it keep it.
NO_PROBE = {"fewshot.datasets": {}}


def config_flags(fields: dict) -> list[str]:
    """`--config.KEY=VALUE` arguments of flattened config fields, for a command line."""
    return [f"--config.{key}={value}" for key, value in fields.items()]


def small_local_config(data_root, **changes) -> ml_collections.ConfigDict:
    """The local recipe on `digits` at 8 px, shrunk to seconds, data in `data_root/tfds`."""
    config = load_recipe("local.py", "steps=12,dataset=digits,batch=32")
    config.data_dir = str(data_root / "tfds")
    config.update_from_flattened_dict(TINY | NO_PROBE)
    config.log_every = 4
    config.eval_every = 6
    config.checkpoint_every = 6
    config.update(changes)
    return config


# Trainer-level tests: a learnable 4-class task on 16 px images and a 2-block ViT.
QUADRANTS = 4
SGD = {"optim.name": "sgd", "optim.lr": 0.1}


def tiny_config(**changes) -> ml_collections.ConfigDict:
    """A 2-block, 32-wide ViT on 16 px images, batch 16; `changes` are flattened keys."""
    c = base_config()
    c.image_size = 16
    c.batch_size = 16
    c.eval_batch_size = 16
    c.model.name = "Ti/4"
    c.model.update(width=32, depth=2, mlp_dim=64, num_heads=4)
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 2
    c.optim.decay = "cosine"
    c.optim.weight_decay = 0.01
    c.update_from_flattened_dict(changes)
    return c


def synthetic_batch(seed=0, batch=16, size=16):
    """A learnable task: the label is the quadrant holding the brightest pixel block."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, QUADRANTS, batch)
    images = rng.integers(0, 64, (batch, size, size, 3), dtype=np.uint8)
    half = size // 2
    for i, label in enumerate(labels):
        r, c = divmod(int(label), 2)
        images[i, r * half : (r + 1) * half, c * half : (c + 1) * half] += 150
    return {"image": images, "label": labels.astype(np.int32)}


def run_steps(config, steps=3, seeds=None, devices=None, slices=None):
    """`steps` train steps on `synthetic_batch`es (seeds 0.. or `seeds`): trainer, state, losses."""
    mesh = make_mesh(config.mesh, config.dcn_mesh, devices, slices)
    trainer = Trainer(config, mesh, QUADRANTS, total_steps=max(steps, 20))
    state = trainer.init_state()
    losses = []
    for i in range(steps):
        batch = synthetic_batch(seed=i if seeds is None else seeds[i], batch=config.batch_size)
        state, metrics = trainer.train_step(
            state, parallel.to_global(batch, trainer.batch_sharding)
        )
        losses.append(float(metrics["train/loss"]))
    return trainer, state, losses


def bytes_on_device0(tree):
    """Bytes of `tree` on the first device: replicated arrays count whole, split ones in part."""
    device = jax.devices()[0]
    return sum(
        shard.data.nbytes
        for leaf in jax.tree.leaves(tree)
        for shard in leaf.addressable_shards
        if shard.device == device
    )


def data_config(data_dir: str | None, **overrides) -> ml_collections.ConfigDict:
    """A small digits input-pipeline config; `pp_*` keys override config.pp fields."""
    pp = dict(
        train_crop="resize",
        crop_area_min=0.05,
        shift_pixels=2,
        flip=False,
        randaugment_layers=0,
        randaugment_magnitude=10,
        eval_crop_fraction=1.0,
        antialias=False,
    )
    config = dict(
        dataset="digits",
        data_dir=data_dir,
        train_split="train[:60]",
        eval_split="test",
        train_examples_per_class=None,
        image_size=8,
        batch_size=6,
        eval_batch_size=12,
        shuffle_buffer=64,
        seed=0,
    )
    for key, value in overrides.items():
        if key.startswith("pp_"):
            pp[key.removeprefix("pp_")] = value
        else:
            config[key] = value
    return ml_collections.ConfigDict({**config, "pp": pp})


def write_image(path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def make_folder(root, layout: dict[str, dict[str, int]]) -> dict[int, tuple[str, str]]:
    """Constant-colour images, alternating gray PNG, RGB JPEG, RGB PNG, gray JPEG.

    Returns {grey level: (split, class)}; the level identifies each image after decoding.
    """
    where, level = {}, 10
    for split, classes in layout.items():
        for name, count in classes.items():
            for i in range(count):
                gray = np.full((9, 7), level, np.uint8)
                pixels = gray if i % 2 == 0 else np.stack([gray] * 3, axis=-1)
                ext = ".jpeg" if i % 4 in (1, 3) else ".png"
                write_image(root / split / name / f"img{i}{ext.upper() if i == 3 else ext}", pixels)
                where[level] = (split, name)
                level += 12
    return where


def random_params(model: nn.Module, image_shape=(32, 32), seed: int = 0) -> dict:
    """All parameters random: a fresh init has a zero head and class token that hide errors."""
    rng = np.random.default_rng(seed)
    shapes = nn.unbox(abstract_params(model, image_shape))
    return jax.tree.map(lambda s: rng.normal(0.0, 0.3, s.shape).astype(s.dtype), shapes)


def parse_predictions(stdout: str) -> dict[str, list[tuple[float, str]]]:
    """{path: [(probability, label), ...]} from vit-predict's output."""
    result, path = {}, None
    for line in stdout.splitlines():
        if line.startswith("  "):
            probability, label = line.split(maxsplit=1)
            result[path].append((float(probability), label))
        else:
            path = line
            result[path] = []
    return result


# The libraries a command must not import before it needs them (`--help`, user errors).
HEAVY = ("jax", "tensorflow", "keras", "flax", "orbax")

# Code for `python -c CODE NAME ARGS...`: runs console script NAME's entry point with ARGS in
# that interpreter; reports its exit status and which HEAVY libraries it imported, as JSON on
# the last line of stderr.
COMMAND_PROBE = f"""
import json, sys
from importlib.metadata import entry_points
name, *args = sys.argv[1:]
sys.argv = [name, *args]
(entry,) = entry_points(group="console_scripts", name=name)
try:
    status = entry.load()()
except SystemExit as e:
    status = e.code
heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)
print(json.dumps(dict(status=status, heavy=heavy)), file=sys.stderr)
"""


# Prepended to a subprocess's code: any import of TensorFlow fails, to show a path needs none.
BLOCK_TENSORFLOW = """
import importlib.abc, sys

class _NoTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            raise ImportError("TensorFlow is blocked in this test")

sys.meta_path.insert(0, _NoTensorFlow())
"""


def vit_forward_flops(image, patch, width, depth, mlp_dim, classes) -> int:
    """2 x multiply-adds of one image's matmuls through a class-token ViT, counted by hand."""
    patches = (image // patch) ** 2
    tokens = patches + 1
    embedding = 2 * patches * (patch * patch * 3) * width
    attention = 2 * tokens * width * (3 * width) + 2 * (2 * tokens * tokens * width)
    block = attention + 2 * tokens * width * width + 2 * (2 * tokens * width * mlp_dim)
    return embedding + depth * block + 2 * width * classes
