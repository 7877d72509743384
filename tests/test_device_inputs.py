"""What the host no longer does: scaling, one-hot and mixup run on the device, without TF."""

import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from helpers import BLOCK_TENSORFLOW

from vit_jax.config import base_config
from vit_jax.models import scale_images
from vit_jax.parallel import make_mesh
from vit_jax.trainer import Trainer, mixup

NUM_CLASSES = 5


def tiny_trainer(**changes) -> Trainer:
    c = base_config()
    c.image_size, c.batch_size, c.eval_batch_size = 8, 16, 16
    c.model.name = "Ti/4"
    c.model.update(width=16, depth=1, mlp_dim=32, num_heads=2)
    c.optim.warmup_steps = 1
    c.update_from_flattened_dict(changes)
    return Trainer(c, make_mesh(c.mesh, c.dcn_mesh), NUM_CLASSES, total_steps=10)


def host_batch(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8),
        "label": rng.integers(0, NUM_CLASSES, 16).astype(np.int32),
    }


def host_scaled(images: np.ndarray) -> np.ndarray:
    """What the host computed before: float32(x) / 127.5 - 1 (tf.cast then float32 arithmetic)."""
    return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def test_scaling_equals_the_former_host_normalisation_for_every_pixel_value():
    pixels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    got = np.asarray(jax.jit(scale_images)(pixels))
    # XLA divides by a constant as a multiplication by its reciprocal, so the device may differ
    # from the host's division by one float32 rounding step (1.2e-7); exact at both ends.
    np.testing.assert_allclose(got, host_scaled(pixels), rtol=0, atol=np.finfo(np.float32).eps)
    assert got.dtype == np.float32 and got.min() == -1.0 and got.max() == 1.0


def test_prepared_batch_is_scaled_images_and_one_hot_targets():
    trainer = tiny_trainer()
    batch = host_batch()
    prepared = jax.jit(trainer.prepare_batch)(batch, 3)
    eps = np.finfo(np.float32).eps
    np.testing.assert_allclose(prepared["image"], host_scaled(batch["image"]), rtol=0, atol=eps)
    np.testing.assert_array_equal(prepared["labels"], np.eye(NUM_CLASSES)[batch["label"]])


@pytest.mark.slow
def test_mixup_mixes_images_and_targets_with_one_ratio_from_seed_and_step():
    trainer = tiny_trainer(**{"pp.mixup_alpha": 1.0})
    batch = host_batch()
    prepare = jax.jit(trainer.prepare_batch)
    images = host_scaled(batch["image"])
    targets = np.eye(NUM_CLASSES)[batch["label"]]
    ratios = []
    for step in range(4):
        mixed = prepare(batch, step)
        row = np.flatnonzero(batch["label"] != np.roll(batch["label"], 1))[0]
        ratio = float(mixed["labels"][row, batch["label"][row]])
        np.testing.assert_allclose(
            mixed["labels"], ratio * targets + (1 - ratio) * np.roll(targets, 1, 0), atol=1e-6
        )
        np.testing.assert_allclose(
            mixed["image"], ratio * images + (1 - ratio) * np.roll(images, 1, 0), atol=1e-6
        )
        np.testing.assert_allclose(mixed["labels"].sum(1), 1.0, rtol=1e-6)
        # A pure function of (seed, step): the same step gives the same mix.
        np.testing.assert_array_equal(prepare(batch, step)["image"], mixed["image"])
        ratios.append(ratio)
    assert len(set(np.round(ratios, 6))) == 4  # A new ratio every step.
    other_seed = tiny_trainer(**{"pp.mixup_alpha": 1.0, "seed": 1})
    assert not np.allclose(
        jax.jit(other_seed.prepare_batch)(batch, 0)["image"], prepare(batch, 0)["image"]
    )


def test_mixup_function_uses_the_beta_ratio_on_images_and_targets():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    y = np.eye(3, dtype=np.float32)
    rng = jax.random.key(5)
    ratio = float(jax.random.beta(rng, 0.4, 0.4))
    mx, my = mixup(rng, x, y, 0.4)
    np.testing.assert_allclose(mx, ratio * x + (1 - ratio) * np.roll(x, 1, 0), rtol=1e-6)
    np.testing.assert_allclose(my, ratio * y + (1 - ratio) * np.roll(y, 1, 0), rtol=1e-6)


def test_negative_mixup_alpha_is_refused():
    with pytest.raises(ValueError, match="mixup_alpha must be >= 0"):
        tiny_trainer(**{"pp.mixup_alpha": -0.1})


def run_without_tensorflow(code: str) -> subprocess.CompletedProcess:
    script = BLOCK_TENSORFLOW + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_model_and_steps_run_without_tensorflow():
    result = run_without_tensorflow(
        """
        import numpy as np
        from vit_jax import parallel
        from vit_jax.config import base_config
        from vit_jax.parallel import make_mesh
        from vit_jax.trainer import Trainer

        c = base_config()
        c.image_size, c.batch_size, c.eval_batch_size = 8, 8, 8
        c.model.name = "Ti/4"
        c.model.update(width=16, depth=1, mlp_dim=32, num_heads=2)
        c.optim.warmup_steps = 1
        trainer = Trainer(c, make_mesh(c.mesh, c.dcn_mesh), 3, total_steps=4)
        state = trainer.init_state()
        images = np.zeros((8, 8, 8, 3), np.uint8)
        labels = np.arange(8, dtype=np.int32) % 3
        batch = parallel.to_global({"image": images, "label": labels}, trainer.batch_sharding)
        state, metrics = trainer.train_step(state, batch)
        ev = dict(image=images, label=labels, mask=np.ones(8, np.float32))
        sums = trainer.eval_step(state.params, parallel.to_global(ev, trainer.batch_sharding))
        assert int(sums["count"]) == 8, sums
        assert "tensorflow" not in sys.modules
        print("loss", float(metrics["train/loss"]))
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loss" in result.stdout
    # The blocker itself works: importing the input pipeline fails.
    blocked = run_without_tensorflow("import vit_jax.data")
    assert blocked.returncode != 0 and "TensorFlow is blocked" in blocked.stderr
