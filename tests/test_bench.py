"""`vit-bench`: every figure present and consistent, real device kinds, no TensorFlow needed."""

import json
import os
import subprocess
import sys

import pytest
from helpers import BLOCK_TENSORFLOW, REPO, run_limited, vit_forward_flops
from PIL import Image

from vit_jax.bench.photos import make_photo_folder
from vit_jax.peaks import peak_tflops

TINY = ["--config", os.path.join(REPO, "configs", "local.py"), "--config.batch_size=16",
        "--config.eval_batch_size=16", "--steps", "2"]  # fmt: skip
STEP_FIELDS = {
    "mode", "model", "image_size", "batch_size", "num_classes", "dtype", "attention_impl", "scan",
    "remat_policy", "mesh", "sharding_rules", "device_kind", "num_devices", "jax_version",
    "compile_s", "step_s", "img_per_s", "tflops_per_device", "peak_tflops_per_device", "mfu",
    "peak_bytes_per_device",
}  # fmt: skip


def bench(*args: str, prelude: str = "") -> dict:
    code = prelude + (
        "import sys\nfrom vit_jax.bench.cli import main\n"
        f"sys.argv = ['vit-bench', *{list(args)!r}, '--json']\nmain()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


# Every call of the compiled step sleeps this long; only the first (the warm-up) runs it.
SLEEP_S = 0.5
SLEEPING_STEPS = f"""
import time
from vit_jax.trainer import Trainer

class _Sleeping:
    def __init__(self, compiled):
        self.compiled, self.out = compiled, None
    def __getattr__(self, name):
        return getattr(self.compiled, name)
    def __call__(self, *args):
        if self.out is None:
            self.out = self.compiled(*args)
        time.sleep({SLEEP_S})
        return self.out

for _name in ("compile_train_step", "compile_eval_step"):
    def _sleeping(self, *args, _compile=getattr(Trainer, _name)):
        return _Sleeping(_compile(self, *args))
    setattr(Trainer, _name, _sleeping)
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode, head, classes", [("train", [], 10), ("infer", ["--num_classes", "1000"], 1000)]
)
def test_step_figures_match_a_known_step_time_and_a_hand_count(mode, head, classes):
    """The head is the recipe's dataset's (mnist5k: 10 classes), as in `vit-bench compile`'s
    program of the same flags, or --num_classes."""
    figures = bench(
        mode, *TINY, *head, "--peak_tflops", "1", prelude=BLOCK_TENSORFLOW + SLEEPING_STEPS
    )
    assert set(figures) >= STEP_FIELDS
    assert figures["mode"] == mode and figures["batch_size"] == 16
    assert figures["num_classes"] == classes
    assert figures["num_devices"] == 8 and figures["device_kind"] == "cpu"
    # Each timed step took SLEEP_S and nothing else: warm-up and compilation left out.
    assert SLEEP_S <= figures["step_s"] < SLEEP_S + 0.1
    assert 16 / (SLEEP_S + 0.1) < figures["img_per_s"] <= 16 / SLEEP_S
    # configs/local.py: Ti/7 at 28 px (16 patches), width 64, 4 blocks, MLP 256. Training
    # counts the backward pass as twice the forward.
    flops = 16 * vit_forward_flops(28, 7, 64, 4, 256, classes) * (3 if mode == "train" else 1)
    assert figures["model_flops_per_step"] == flops
    per_device = flops / 8 / figures["step_s"] / 1e12
    assert figures["tflops_per_device"] == pytest.approx(per_device, rel=1e-6)
    # A 1 TFLOP/s peak makes MFU the measured TFLOP/s itself.
    assert figures["mfu"] == pytest.approx(figures["tflops_per_device"], rel=1e-6)
    assert figures["peak_bytes_per_device"] > 0 and figures["compile_s"] > 0


@pytest.mark.slow
def test_train_runs_tensor_parallel_meshes():
    figures = bench(
        "train", *TINY, "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
        "--config.sharding_rules=tp",
    )  # fmt: skip
    assert figures["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    assert figures["sharding_rules"] == "tp" and figures["img_per_s"] > 0
    assert figures["mfu"] is None  # The CPU has no known peak: said, not guessed.


@pytest.mark.parametrize(
    "kind, dtype, peak",
    [
        ("TPU v4", "bfloat16", 275.0),
        ("TPU v5 lite", "bfloat16", 197.0),  # v5e
        ("TPU v5", "bfloat16", 459.0),  # v5p: must not match "TPU v5 lite"
        ("TPU v6 lite", "bfloat16", 918.0),  # v6e
        ("NVIDIA H100 80GB HBM3", "bfloat16", 989.4),  # SXM
        ("NVIDIA H100 80GB HBM3", "float32", 494.7),  # TF32, JAX's default for float32
        ("NVIDIA H100 PCIe", "bfloat16", 756.5),
        ("NVIDIA H200", "bfloat16", 989.4),
        ("NVIDIA B200", "bfloat16", 2250.0),
        ("NVIDIA B200", "float32", 1125.0),
        ("NVIDIA GB200", "bfloat16", 2500.0),  # Must not match "B200".
        ("NVIDIA A100-SXM4-80GB", "bfloat16", 312.0),
        ("NVIDIA A100-SXM4-40GB", "float32", 156.0),
    ],
)
def test_peak_table_matches_reported_device_kinds(kind, dtype, peak):
    assert peak_tflops(kind, dtype) == peak


@pytest.mark.parametrize(
    "kind, dtype",
    [
        ("cpu", "float32"),
        ("TPU v99 imaginary", "bfloat16"),  # A kind no table can know yet.
        ("NVIDIA Q9000", "bfloat16"),
        ("TPU v4", "int4"),  # A known kind, a dtype without a published peak.
        ("NVIDIA H100 80GB HBM3", "float64"),
    ],
)
def test_unknown_kinds_and_dtypes_have_no_peak(kind, dtype):
    assert peak_tflops(kind, dtype) is None  # Said, not guessed: MFU is left out.


def test_input_figures_on_a_photo_folder(tmp_path, cloud_storage, monkeypatch):
    dataset = make_photo_folder(str(tmp_path / "photos"), count=24, num_classes=3)
    sizes = {Image.open(p).size for p in (tmp_path / "photos" / "train").rglob("*.jpg")}
    assert sizes <= {(500, 375), (375, 500)} and len(sizes) == 2
    assert len(list((tmp_path / "photos" / "train").rglob("*.jpg"))) == 24
    # On gs://, through its file system: they were written under ./gs:/ on the local disk.
    monkeypatch.chdir(tmp_path)
    assert make_photo_folder("gs://bucket/photos", count=3, num_classes=3) == (
        "folder:gs://bucket/photos"
    )
    assert len(list((cloud_storage / "bucket" / "photos" / "train").rglob("*.jpg"))) == 3
    assert not (tmp_path / "gs:").exists()
    figures = bench(
        "input", "--config", os.path.join(REPO, "configs", "pretrain.py"),
        f"--config.dataset={dataset}", "--config.train_split=train", "--config.batch_size=8",
        "--config.shuffle_buffer=24", "--batches", "3",
    )  # fmt: skip
    assert figures["mode"] == "input" and figures["batch_size"] == 8
    assert figures["image_size"] == 224 and figures["train_crop"] == "inception"
    assert figures["img_per_s_per_core"] == pytest.approx(
        figures["img_per_s"] / figures["host_cores"], rel=1e-6
    )


@pytest.mark.slow
def test_a_step_that_does_not_fit_ends_with_status_3_saying_what_to_change():
    """As `vit-bench compile` ends for a setting that does not fit, so do `train` and
    `infer` on the devices at hand: here the CPU's memory, held under an address-space
    limit (RLIMIT_AS) below the step's 17 GiB, fails XLA's allocation with the
    RESOURCE_EXHAUSTED a GPU gives."""
    command = [
        sys.executable, "-m", "vit_jax.bench.cli", "train",
        "--config", f"{REPO}/configs/local.py:batch=32768", "--steps", "2",
    ]  # fmt: skip
    result = run_limited(12 * 2**30, "RLIMIT_AS", command, devices=1)
    assert result.returncode == 3, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stdout == ""
    assert result.stderr.splitlines()[-1].startswith(
        "vit-bench: the train step does not fit in device memory (RESOURCE_EXHAUSTED: Out of "
        "memory allocating "
    )
    assert "--config.optim.mu_dtype=bfloat16; `vit-bench compile --target TARGET --sweep`" in (
        result.stderr
    )
