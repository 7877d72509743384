"""Peak dense matmul TFLOP/s per device, by the device kinds JAX reports, for MFU.

Keys are `jax.devices()[0].device_kind` as JAX reports it ("TPU v5 lite" is v5e, "TPU v5"
is v5p, "TPU v6 lite" is v6e / Trillium, "TPU7x" is Ironwood, whose two TensorCores per
chip JAX runs as two devices: half the chip's published 2,307 TFLOP/s each); NVIDIA kinds
are matched by the model in the name ("NVIDIA H100 80GB HBM3" is the SXM part). float32
figures are what a float32 matmul runs at with JAX's default precision: TF32 tensor cores
on NVIDIA (A100 and later), and single-pass bfloat16 on TPUs, so there it equals the
bfloat16 peak. NVIDIA publishes Blackwell's tensor-core peaks with sparsity (HGX B200:
BF16 36 and TF32 18 PFLOPS per 8 GPUs; GB200 NVL72: 360 and 180 PFLOPS per 72 GPUs); the
dense peaks here are half of those, per GPU.
"""

from __future__ import annotations

# device kind (exact) -> {dtype: dense peak TFLOP/s per device}
TPU_PEAKS: dict[str, dict[str, float]] = {
    "TPU v4": {"bfloat16": 275.0, "float32": 275.0},
    "TPU v5 lite": {"bfloat16": 197.0, "float32": 197.0},
    "TPU v5": {"bfloat16": 459.0, "float32": 459.0},
    "TPU v6 lite": {"bfloat16": 918.0, "float32": 918.0},
    "TPU7x": {"bfloat16": 1153.5, "float32": 1153.5},
}
# (substring of the device kind, {dtype: peak}); the first match wins, so more specific
# names (PCIe, NVL, GB200) come before the SXM default.
GPU_PEAKS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bfloat16": 756.5, "float16": 756.5, "float32": 378.0}),
    ("H100 NVL", {"bfloat16": 835.0, "float16": 835.0, "float32": 417.5}),
    ("H100", {"bfloat16": 989.4, "float16": 989.4, "float32": 494.7}),
    ("H200", {"bfloat16": 989.4, "float16": 989.4, "float32": 494.7}),
    ("GB200", {"bfloat16": 2500.0, "float16": 2500.0, "float32": 1250.0}),
    ("B200", {"bfloat16": 2250.0, "float16": 2250.0, "float32": 1125.0}),
    ("A100", {"bfloat16": 312.0, "float16": 312.0, "float32": 156.0}),
)


def peak_tflops(device_kind: str, dtype: str) -> float | None:
    """The device's dense peak for `dtype` matmuls, or None when the kind is not known."""
    peaks = TPU_PEAKS.get(device_kind)
    if peaks is None:
        peaks = next((p for name, p in GPU_PEAKS if name in device_kind), None)
    return None if peaks is None else peaks.get(dtype)
