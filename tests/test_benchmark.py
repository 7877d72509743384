"""The benchmark command prints every figure the README's table records."""

import re
import subprocess
import sys

from test_main import REPO


def test_benchmark_prints_its_figures():
    result = subprocess.run(
        [sys.executable, "-m", "vit_jax.benchmark", "--model", "Ti/16", "--image_size", "32",
         "--batch_size", "8", "--steps", "2", "--peak_tflops", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    figures = dict(re.findall(r"^(\w+) ([\d.]+)", result.stdout, flags=re.M))
    assert set(figures) >= {"compile_s", "step_s", "img_per_s", "tflops_per_device", "mfu",
                            "peak_bytes_per_device"}  # fmt: skip
    step_s, img_per_s = float(figures["step_s"]), float(figures["img_per_s"])
    assert step_s > 0 and abs(img_per_s - 8 / step_s) < 0.01 * img_per_s + 0.1
    # 1 TFLOP/s peak: MFU is the measured TFLOP/s itself.
    assert abs(float(figures["mfu"]) - float(figures["tflops_per_device"])) < 0.01
    assert float(figures["peak_bytes_per_device"]) > 0
