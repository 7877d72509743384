"""Times the real sharded train step and the forward pass of a recipe on synthetic data.

Synthetic batches have the shapes and dtypes the input pipeline produces (uint8 images,
integer labels), so the timed program is exactly the one training runs, scaling and
one-hot on the device included. No TensorFlow is imported.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from vit_jax import parallel
from vit_jax.peaks import peak_tflops
from vit_jax.trainer import Trainer, compiled_memory

# Classes of the datasets the recipes name; others need --num_classes.
NUM_CLASSES = {
    "imagenet21k": 21843, "imagenet2012": 1000, "jft": 18291, "cifar10": 10,
    "cifar100": 100, "oxford_iiit_pet": 37, "oxford_flowers102": 102, "mnist5k": 10,
    "digits": 10,
}  # fmt: skip


def num_classes_of(config: ml_collections.ConfigDict, given: int | None) -> int:
    """The head's classes in a program of `config` compiled or timed without its data:
    `given` (--num_classes), else its dataset's. `vit-bench train` and `compile` share it,
    so that the program timed on a device is the one predicted for it.

    Raises:
      ValueError: neither is known (an image folder, a dataset not in NUM_CLASSES).
    """
    if given:
        return given
    if config.dataset in NUM_CLASSES:
        return NUM_CLASSES[config.dataset]
    raise ValueError(f"Pass --num_classes: the class count of {config.dataset!r} is not known.")


def _synthetic_batch(
    config: ml_collections.ConfigDict, batch_size: int, num_classes: int, eval_mask: bool
) -> dict:
    rng = np.random.default_rng(0)
    size = config.image_size
    batch = {
        "image": rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8),
        "label": rng.integers(0, num_classes, batch_size).astype(np.int32),
    }
    if eval_mask:
        batch["mask"] = np.ones(batch_size, np.float32)
    return batch


def _time(run: Callable[[], Any], steps: int, name: str, profile_dir: str | None) -> float:
    """Seconds per call after one warm-up call, waiting for the device each time round.

    With `profile_dir`, the timed calls are traced there (`jax.profiler`: TensorBoard's
    profile plugin and Perfetto), each annotated as step `name` (`StepTraceAnnotation`).
    """
    jax.block_until_ready(run())
    trace = contextlib.nullcontext()
    if profile_dir:
        trace = jax.profiler.trace(profile_dir, create_perfetto_trace=True)
    with trace:
        start = time.perf_counter()
        for step in range(steps):
            with jax.profiler.StepTraceAnnotation(name, step_num=step):
                out = run()
        jax.block_until_ready(out)
        seconds = time.perf_counter() - start
    return seconds / steps


def benchmark_steps(
    config: ml_collections.ConfigDict,
    mode: str,
    steps: int,
    peak: float | None = None,
    profile_dir: str | None = None,
    num_classes: int | None = None,
) -> dict[str, Any]:
    """Figures of `mode` "train" (one optimizer step) or "infer" (forward at eval batch);
    with `profile_dir`, a profiler trace of the timed steps there. The head has
    `num_classes_of(config, num_classes)` classes."""
    if mode not in ("train", "infer"):
        raise ValueError(f"mode={mode!r}: choose 'train' or 'infer'.")
    classes = num_classes_of(config, num_classes)
    # A schedule long enough for the recipe's warmup; the timed steps don't depend on it.
    total_steps = config.optim.warmup_steps + steps + 10
    mesh = parallel.make_mesh(config.mesh, config.dcn_mesh)
    trainer = Trainer(config, mesh, num_classes=classes, total_steps=total_steps)
    batch_size = config.batch_size if mode == "train" else config.eval_batch_size
    batch = parallel.to_global(
        _synthetic_batch(config, batch_size, classes, eval_mask=mode == "infer"),
        trainer.batch_sharding,
    )
    if mode == "train":
        holder = {"state": trainer.init_state()}
        start = time.perf_counter()
        compiled = trainer.compile_train_step(holder["state"], batch)

        def run():
            holder["state"], metrics = compiled(holder["state"], batch)
            return metrics
    else:
        params = trainer.init_params()  # No optimizer state: it would count in the peak.
        start = time.perf_counter()
        compiled = trainer.compile_eval_step(params, batch)

        def run():
            return compiled(params, batch)

    compile_s = time.perf_counter() - start
    model_flops = trainer.model_flops(
        trainer.abstract_state().params, batch_size, train=mode == "train"
    )
    # XLA's count is one device's share and includes recomputation (hardware FLOPs); it
    # sees a scanned loop's body once, and GPUs do not report it.
    xla_flops = (compiled.cost_analysis() or {}).get("flops")
    memory = compiled_memory(compiled) or {}
    step_s = _time(run, steps, mode, profile_dir)
    device = jax.devices()[0]
    dtype = str(config.model.dtype)
    peak = peak or peak_tflops(device.device_kind, dtype)
    tflops = model_flops / jax.device_count() / step_s / 1e12
    figures = {
        "mode": mode,
        "model": config.model.name,
        "image_size": config.image_size,
        "batch_size": batch_size,
        "num_classes": classes,
        "dtype": dtype,
        "attention_impl": config.model.attention_impl,
        "scan": bool(config.model.scan),
        "remat_policy": config.model.remat_policy,
        "mesh": dict(trainer.mesh.shape),
        "sharding_rules": config.sharding_rules,
        "device_kind": device.device_kind,
        "num_devices": jax.device_count(),
        "jax_version": jax.__version__,
        "compile_s": compile_s,
        "step_s": step_s,
        "img_per_s": batch_size / step_s,
        "model_flops_per_step": model_flops,
        "tflops_per_device": tflops,
        "xla_tflops_per_device": None if xla_flops is None else xla_flops / step_s / 1e12,
        "peak_tflops_per_device": peak,
        "mfu": tflops / peak if peak else None,
        "peak_bytes_per_device": memory.get("total_bytes", float("nan")),
    }
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        figures["device_peak_bytes_in_use"] = stats["peak_bytes_in_use"]
    return figures
