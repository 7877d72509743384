"""Training-step benchmark: compile seconds, step time, img/s, MFU and peak memory.

    python -m vit_jax.benchmark --model B/16 --batch_size 256 --dtype bfloat16
    python -m vit_jax.benchmark --model Ti/16 --image_size 64 --batch_size 32 --steps 5

Runs the real sharded `train_step` (AdamW, clipping, donation) on synthetic images over
all local devices. MFU divides the step's FLOPs (XLA's cost analysis of the compiled step)
by the measured time and by `--peak_tflops` per device (defaults known for TPU/GPU kinds).
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import app, flags

from vit_jax import parallel
from vit_jax.config import base_config
from vit_jax.trainer import Trainer

# Dense bf16 peak TFLOP/s per device, for MFU.
PEAK_TFLOPS = {
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
    "TPU v4": 275.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v6e": 918.0,
}

_MODEL = flags.DEFINE_string("model", "B/16", "Model name, e.g. B/16, R50+B/16.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Square image size.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Global batch size.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Compute dtype: float32 or bfloat16.")
_ATTENTION = flags.DEFINE_string("attention_impl", "xla", "xla or cudnn.")
_REMAT = flags.DEFINE_string("remat_policy", "none", "none, full, dots, dots_no_batch.")
_SCAN = flags.DEFINE_bool("scan", False, "Scan over blocks.")
_RULES = flags.DEFINE_string("sharding_rules", "dp", "dp, fsdp or tp.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps after the warm-up step.")
_PEAK = flags.DEFINE_float("peak_tflops", None, "Peak TFLOP/s per device (default: table).")


def _peak_tflops(kind: str) -> float | None:
    if _PEAK.value:
        return _PEAK.value
    return next((v for k, v in PEAK_TFLOPS.items() if k in kind), None)


def _main(argv: list[str]) -> None:
    del argv
    config = base_config()
    config.model.update(
        name=_MODEL.value,
        dtype=_DTYPE.value,
        attention_impl=_ATTENTION.value,
        remat_policy=_REMAT.value,
        scan=_SCAN.value,
    )
    config.image_size, config.batch_size, config.eval_batch_size = (
        _IMAGE_SIZE.value,
        _BATCH.value,
        _BATCH.value,
    )
    config.optim.warmup_steps = 1
    config.sharding_rules = _RULES.value
    if _RULES.value != "dp":
        config.mesh.update(data=1, fsdp=-1)
    trainer = Trainer(config, num_classes=1000, total_steps=_STEPS.value + 10)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.uniform(-1, 1, (_BATCH.value, _IMAGE_SIZE.value, _IMAGE_SIZE.value, 3)),
        "labels": np.eye(1000, dtype=np.float32)[rng.integers(0, 1000, _BATCH.value)],
    }
    batch["image"] = batch["image"].astype(np.float32)
    batch = parallel.to_global(batch, trainer.batch_sharding)
    state = trainer.init_state()

    start = time.perf_counter()
    compiled = trainer.compile_train_step(state, batch)
    compile_s = time.perf_counter() - start
    flops = compiled.cost_analysis().get("flops", float("nan"))
    memory = compiled.memory_analysis()

    state, metrics = compiled(state, batch)  # Warm-up.
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(_STEPS.value):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - start) / _STEPS.value

    devices = jax.devices()
    kind = devices[0].device_kind
    peak = _peak_tflops(kind)
    # cost_analysis counts one device's share of the partitioned program.
    mfu = flops / step_s / (peak * 1e12) if peak else float("nan")
    peak_bytes = (
        memory.temp_size_in_bytes
        + memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        if memory is not None
        else float("nan")
    )
    print(
        f"model {_MODEL.value} | {_IMAGE_SIZE.value}px | batch {_BATCH.value} | "
        f"{_DTYPE.value} | {len(devices)} x {kind}"
    )
    print(f"compile_s {compile_s:.1f}")
    print(f"step_s {step_s:.4f}")
    print(f"img_per_s {_BATCH.value / step_s:.1f}")
    print(f"tflops_per_device {flops / step_s / 1e12:.2f}")
    print(f"mfu {mfu:.3f}" + ("" if peak else " (unknown peak: pass --peak_tflops)"))
    print(f"peak_bytes_per_device {peak_bytes / 2**30:.3f} GiB")


def main() -> None:
    app.run(_main)


if __name__ == "__main__":
    main()
