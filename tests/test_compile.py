"""`vit-bench compile`: the real train step compiled for TPU slices and GPU nodes this
machine does not have (libtpu and the CUDA plugin's compile-only devices)."""

import functools
import importlib.metadata
import json
import os
import re
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import BLOCK_TENSORFLOW, REPO, config_flags

from vit_jax import parallel
from vit_jax.bench import hlo, sweep
from vit_jax.bench.compile import (
    REMAT_TARGET_FLAG,
    abstract_batch,
    compile_recipe,
    summarize,
    target_compiler_options,
    target_trainer,
    topology_devices,
)
from vit_jax.bench.sweep import (
    REMAT_POLICIES,
    Setting,
    Space,
    meshes,
    search_mesh,
    search_space,
)
from vit_jax.bench.targets import (
    GPUS,
    TPUS,
    UnknownTargetError,
    compiler_version,
    gpu_target_config,
    parse_target,
)
from vit_jax.config import base_config
from vit_jax.peaks import peak_tflops
from vit_jax.train import out_of_device_memory
from vit_jax.trainer import compiled_memory, device_memory_refusal

TPU = pytest.mark.compile
GPU = pytest.mark.compile("jax_plugins.xla_cuda12")
WIDTH, DEPTH, MLP, HEADS, PATCH, IMAGE, CLASSES = 64, 2, 128, 4, 8, 32, 10
# The width of the tiny model whose train state FSDP and data parallelism are compared on:
# wide enough that parameters and optimizer state outweigh what the compiler reserves for
# its own bookkeeping. At width 64 a v5e's HBM temporaries were mostly 16 KiB slots of
# asynchronous copies into on-chip memory (data parallelism's step on two slices 11.7 MB at
# batch 64 and 8.3 MB at batch 1024): they measure the schedule, not the tensors.
STATE_WIDTH = 256


def tiny(rules="dp", **changes):
    c = base_config()
    c.dataset, c.image_size, c.batch_size, c.eval_batch_size = "digits", IMAGE, 64, 64
    c.model.name = f"Ti/{PATCH}"
    c.model.update(width=WIDTH, depth=DEPTH, mlp_dim=MLP, num_heads=HEADS)
    c.optim.warmup_steps = 10
    c.sharding_rules = rules
    if rules == "fsdp":
        c.mesh.update(data=1, fsdp=-1)
    c.update_from_flattened_dict(changes)
    return c


# Tests that share a cached compile (`figures`): `--dist loadgroup`
# (pyproject.toml) runs a group in one worker process.
ONE_SLICE_GROUP = pytest.mark.xdist_group("tiny_one_v5e4")
TWO_SLICES_GROUP = pytest.mark.xdist_group("tiny_two_v5e4")
GPU_NODE_GROUP = pytest.mark.xdist_group("tiny_h100x8")


@functools.cache
def figures(target: str, slices: int, rules: str) -> dict:
    wide = {"model.width": STATE_WIDTH, "model.mlp_dim": 4 * STATE_WIDTH}
    return compile_recipe(tiny(rules, **wide), parse_target(target, slices))


def hand_count_forward(batch: int, width: int) -> int:
    """Matmul FLOPs of the tiny ViT's forward pass (MLP 4x `width`), written out from its
    architecture."""
    patches = (IMAGE // PATCH) ** 2
    tokens = patches + 1
    embedding = 2 * patches * (PATCH * PATCH * 3) * width
    attention = 2 * tokens * width * 3 * width + 2 * 2 * tokens * tokens * width
    attention += 2 * tokens * width * width  # Output projection.
    mlp = 2 * 2 * tokens * width * 4 * width
    head = 2 * width * CLASSES
    return batch * (embedding + DEPTH * (attention + mlp) + head)


@pytest.mark.slow
@pytest.mark.parametrize(
    "target, slices",
    [pytest.param("v5e-4", 1, marks=[TPU, ONE_SLICE_GROUP]),
     pytest.param("v5e-4", 2, marks=[TPU, TWO_SLICES_GROUP]),
     pytest.param("h100x8", 1, marks=[GPU, GPU_NODE_GROUP])],
)  # fmt: skip
def test_fsdp_splits_the_train_state_and_never_needs_more_than_data_parallel(target, slices):
    dp, fsdp = figures(target, slices, "dp"), figures(target, slices, "fsdp")
    shards = fsdp["mesh"]["fsdp"]
    assert shards == (8 if target == "h100x8" else 4)
    for part in ("param_bytes", "optimizer_bytes"):
        # Within a few %: FSDP splits each tensor's "embed" dimension; the attention and
        # MLP biases have none and stay whole: 0.7% over a quarter of this tiny model's state
        # on 4 devices, 1.5% over an eighth on 8.
        assert fsdp[part] == pytest.approx(dp[part] / shards, rel=0.02), part
    assert dp["fits"] and fsdp["fits"]
    assert fsdp["total_bytes"] <= dp["total_bytes"]
    assert dp["compiler"] == compiler_version(parse_target(target, slices))
    assert dp["model_flops_per_step"] == 3 * hand_count_forward(64, STATE_WIDTH)
    # The backward needs no gradient of the input image: exactly one patch-embedding
    # matmul less than 3x the forward.
    embedding_input_grad = 2 * 64 * (IMAGE // PATCH) ** 2 * PATCH * PATCH * 3 * STATE_WIDTH
    assert dp["hardware_flops_per_step"] == dp["model_flops_per_step"] - embedding_input_grad


@pytest.mark.slow
@GPU
@GPU_NODE_GROUP
def test_candidates_that_share_an_eval_step_take_its_figures_from_one_compile():
    """Remat and accumulation change only the train step: compiled with them, the eval step
    is the program compiled before (the same digest of its lowered text), and its figures
    are that compile's. Scanned blocks are another program, compiled anew."""
    first = figures("h100x8", 1, "dp")
    known = {first["eval_program"]: {"eval_total_bytes": first["eval_total_bytes"]}}
    wide = {"model.width": STATE_WIDTH, "model.mlp_dim": 4 * STATE_WIDTH}
    config = tiny("dp", **wide, **{"model.remat_policy": "full", "accum_steps": 2})
    target = parse_target("h100x8")
    served = compile_recipe(config, target, eval_programs=known)
    assert served["eval_program"] == first["eval_program"] and served["eval_compile_s"] is None
    assert served["eval_total_bytes"] == first["eval_total_bytes"] > 0
    assert served["fits"] and served["total_bytes"] != first["total_bytes"]  # Its own train step.
    scanned = compile_recipe(
        tiny("dp", **wide, **{"model.scan": True}), target, eval_programs=known
    )
    assert scanned["eval_program"] != first["eval_program"] and scanned["eval_compile_s"] > 0
    assert scanned["eval_total_bytes"] > 0


@pytest.mark.parametrize(
    "target, slices",
    [
        pytest.param("v5e-4", 2, marks=[TPU, pytest.mark.slow, TWO_SLICES_GROUP]),
        pytest.param("h100x4x2", 1, marks=GPU),
    ],
)
def test_across_slices_only_the_gradient_reduction_travels(target, slices):
    """Data parallelism over the slices (or nodes), FSDP inside: the one collective on the
    slow network is the all-reduce of each device's gradient shard."""
    f = figures(target, slices, "fsdp")
    assert f["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    crossing = {kind for kind, c in f["collectives"].items() if c["cross_slice_bytes"]}
    assert crossing == {"all-reduce"}
    assert f["collectives"]["all-gather"]["bytes"] > 0  # FSDP's gathers stay inside.
    # Inside each slice the compiler reduce-scatters gradients (an all-reduce fused with the
    # slice each device keeps): counted as the shards they leave, not as whole gradients.
    assert 0 < f["collectives"]["reduce-scatter"]["bytes"] <= f["param_bytes"]
    # Each device sends its shard of the float32 gradient, and little else.
    cross = f["collectives"]["all-reduce"]["cross_slice_bytes"]
    assert f["param_bytes"] <= cross <= 8 * f["param_bytes"]


def step_memory(
    config,
    target: str,
    per_device: int,
    slices: int = 1,
    step: str = "train",
    num_classes: int | None = None,
) -> dict[str, int]:
    """`compiled_memory` of `config`'s train or eval step alone (none of `compile_recipe`'s
    other figures) at `per_device` images per device on `slices` of `target`."""
    slices_of_target = parse_target(target, slices)
    trainer = target_trainer(config, slices_of_target, num_classes)
    size = trainer.mesh.devices.size * per_device
    batch = abstract_batch(config, trainer, size, eval_mask=step == "eval")
    state = trainer.abstract_state()
    options = target_compiler_options(slices_of_target)
    if step == "eval":
        compiled = trainer.compile_eval_step(state.params, batch, options)
    else:
        compiled = trainer.compile_train_step(state, batch, options)
    return compiled_memory(compiled)


def step_bytes(
    rules: str,
    step: str,
    per_chip: int,
    slices: int = 1,
    num_classes: int = 1000,
    target: str = "v5e-4",
    **model,
) -> int:
    """Device bytes of ViT-B/16's train or eval step (one block unless `model` says
    otherwise) on `slices` of `target` (FSDP inside each)."""
    config = base_config()
    config.model.depth, config.optim.warmup_steps, config.sharding_rules = 1, 10, rules
    config.model.update(model)
    if rules == "fsdp":
        config.mesh.update(data=1, fsdp=-1)
    return step_memory(config, target, per_chip, slices, step, num_classes)["total_bytes"]


@TPU
def test_fsdps_forward_pass_needs_no_more_memory_than_data_parallels_at_vit_b_width():
    """Left to itself the TPU compiler turns FSDP's weight all-gathers into windowed einsums
    whose float32 partial sums need 1.6x data parallelism's memory here (319 against 205 MB);
    parallel.TPU_COMPILER_OPTIONS turns them off (182 MB)."""
    assert step_bytes("fsdp", "eval", 64) <= step_bytes("dp", "eval", 64)


@TPU
@pytest.mark.slow
def test_fsdps_unrolled_step_on_one_slice_needs_no_more_than_data_parallels_at_vit_b_width():
    """Two bfloat16 ViT-B blocks at 1,024 images per chip on one v5e-4 slice: data
    parallelism's step needs 14.09 GB, FSDP's 13.99, through three of the Trainer's TPU
    measures for FSDP; without any one of them FSDP needed more:
    - the weights gathered where they are used, each gradient reduced whole
      (parallel.gathered_shardings): 15.21 without. Left to place FSDP's gathers and
      reductions, the TPU compiler kept copies of the blocks' inputs for its reduce-scatter
      windowed einsums.
    - the MLP layers unordered on one slice (`ordered_mlp`, models/vit.py): 14.58 ordered,
      one more buffer the size of the layer's activations live at the backward pass's peak.
      One block at 2,048 images per chip, where data parallelism's step fits a chip's HBM
      as written (16.03 of 16.91 GB), FSDP's did not (17.22).
    - the weight all-gathers kept out of compute fusions (parallel.UP_FRONT_GATHER_OPTIONS):
      14.38 fused. One block at 256 images per chip: 2.74 against 2.40."""
    two_blocks = {"dtype": "bfloat16", "depth": 2}
    fsdp = step_bytes("fsdp", "train", 1024, **two_blocks)
    assert fsdp <= step_bytes("dp", "train", 1024, **two_blocks)


@TPU
@pytest.mark.slow
def test_fsdps_train_step_across_slices_needs_no_more_than_data_parallels_at_vit_b_width():
    """A float32 ViT-B block with the pretraining recipe's pre-logits and 21,843-class head
    at 256 images per chip on two v5e-4 slices. Left to schedule FSDP's step, the TPU
    compiler ran weight-gradient matmuls late and kept backward intermediates live through
    the layers below: 5.23 GB against data parallelism's 4.44. With the block's attention
    and MLP layer each finishing its weight gradients first (ordered backward,
    models/vit.py), 3.72 GB (two blocks: 5.61 against 6.43)."""
    recipe = {"representation_size": 768}
    fsdp = step_bytes("fsdp", "train", 256, slices=2, num_classes=21843, **recipe)
    assert fsdp <= step_bytes("dp", "train", 256, slices=2, num_classes=21843, **recipe)


@GPU
def test_selective_remat_leaves_the_attention_weights_out_of_the_compiled_train_step():
    """Two bfloat16 ViT-B blocks at 64 images per GPU of an 8-GPU node: the first block's
    float32 attention weights, [64, 12, 197, 197] per GPU, are not kept through the second
    block (1.63 GB with remat none, 1.26 GB with selective). Without the barrier
    `jax.checkpoint` puts before the recomputation, XLA merged it back into the forward
    pass: 1.63 GB (on a v5e-4, 1.05 against 0.96 GB; merged at 256 images per chip, 4.45
    against 3.82)."""
    weights = 64 * 12 * 197 * 197 * 4
    two_blocks = {"dtype": "bfloat16", "depth": 2, "target": "h100x8"}
    kept = step_bytes("dp", "train", 64, **two_blocks)
    recomputed = step_bytes("dp", "train", 64, remat_policy="selective", **two_blocks)
    assert kept - recomputed >= weights // 2, (kept, recomputed, weights)


@GPU
def test_unrolled_blocks_with_remat_need_no_more_than_scanned_ones_on_a_gpu_node():
    """Data parallelism on 8 GPUs, four blocks with full remat: without the barrier that
    finishes each block's parameter gradients first (models/vit.py) the unrolled step
    kept every block's recomputed activations and needed 1.55x the scanned step's
    temporaries (77 against 50 MB); with it, 47 MB."""
    sizes = {"model.depth": 4, "model.width": 256, "model.mlp_dim": 1024}
    temp_bytes = {
        scan: step_memory(
            tiny(**sizes, **{"model.scan": scan, "model.remat_policy": "full"}), "h100x8", 64
        )["temp_bytes"]
        for scan in (False, True)
    }
    assert temp_bytes[False] <= 1.1 * temp_bytes[True]


@TPU
def test_tpu_compiler_options_yield_to_the_users_libtpu_flags(monkeypatch):
    mesh = parallel.make_mesh({"data": -1}, None, topology_devices(parse_target("v5e-4")))
    monkeypatch.delenv("LIBTPU_INIT_ARGS", raising=False)
    assert parallel.compiler_options(mesh) == parallel.TPU_COMPILER_OPTIONS
    up_front = parallel.TPU_COMPILER_OPTIONS | parallel.UP_FRONT_GATHER_OPTIONS
    assert parallel.compiler_options(mesh, gathers_up_front=True) == up_front
    monkeypatch.setenv("LIBTPU_INIT_ARGS", "--xla_tpu_enable_windowed_einsum_for_all_gather=true")
    assert parallel.compiler_options(mesh) is None
    assert parallel.compiler_options(mesh, gathers_up_front=True) == (
        parallel.UP_FRONT_GATHER_OPTIONS
    )
    fused = "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true"
    monkeypatch.setenv("LIBTPU_INIT_ARGS", fused)
    kept = parallel.compiler_options(mesh, gathers_up_front=True)
    assert kept == parallel.TPU_COMPILER_OPTIONS
    assert parallel.compiler_options(parallel.make_mesh({"data": -1})) is None  # CPU devices.


@TPU
def test_only_fsdps_unrolled_programs_on_one_slice_keep_weight_gathers_out_of_fusions():
    """Scanned, the blocks' weights are gathered in the loop, one layer at a time: there
    the compiler's overlap of each gather with the layer before it stays."""

    def options(slices=1, **changes):
        target = parse_target("v5e-4", slices)
        return target_trainer(tiny(**changes), target).compiler_options

    up_front = parallel.TPU_COMPILER_OPTIONS | parallel.UP_FRONT_GATHER_OPTIONS
    assert options(rules="fsdp") == up_front
    assert options(rules="fsdp", **{"model.scan": True}) == parallel.TPU_COMPILER_OPTIONS
    assert options(rules="dp") == parallel.TPU_COMPILER_OPTIONS
    assert options(slices=2, rules="fsdp") == parallel.TPU_COMPILER_OPTIONS


# Parameters and Adam's moments of ~18 GiB (2 blocks of width 8192): beyond a v5e chip.
HUGE = {"model.width": 8192, "model.depth": 2, "model.mlp_dim": 32768, "model.num_heads": 8}


@TPU
def test_a_setting_that_cannot_fit_reports_the_compilers_refusal():
    config = tiny(batch_size=8, eval_batch_size=8, **HUGE)
    f = compile_recipe(config, parse_target("v5e-4"))
    assert f["fits"] is False
    assert "RESOURCE_EXHAUSTED: Ran out of memory on HBM" in f["compiler_message"]
    assert f["param_bytes"] + f["optimizer_bytes"] > 15.75 * 2**30
    assert summarize(f).startswith("does not fit: the compiler ran out of 15.75 GiB per device")


@TPU
def test_vit_train_says_what_to_change_when_the_tpu_compiler_runs_out_of_hbm():
    """The error vit-train's first step meets on a TPU slice the step does not fit: the TPU
    compiler's own, as `Trainer.compile_train_step` raises it there."""
    config = tiny(batch_size=8, eval_batch_size=8, **HUGE)
    trainer = target_trainer(config, parse_target("v5e-4"))
    batch = abstract_batch(config, trainer, 8, eval_mask=False)
    with pytest.raises(jax.errors.JaxRuntimeError) as refusal:
        trainer.compile_train_step(trainer.abstract_state(), batch)
    error = out_of_device_memory(refusal.value, [100, 200])
    assert str(error).startswith(
        "A program of the run does not fit in device memory (RESOURCE_EXHAUSTED: Ran out of "
        "memory on HBM"
    )
    assert "--config.sharding_rules=fsdp" in str(error)
    assert "The checkpoints saved are intact (newest: step 200)" in str(error)


# The GPU's out-of-memory errors as XLA words them (the first with the buffer report its
# allocator appends), and gRPC's RESOURCE_EXHAUSTED, which is no memory of a device.
GPU_OUT_OF_MEMORY = (
    "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 4770354232 bytes.\n"
    "BufferAssignment OOM Debugging.\nBufferAssignment stats:\n"
    "             parameter allocation:  372.76MiB\n"
)


@pytest.mark.parametrize(
    "message, first",
    [
        (GPU_OUT_OF_MEMORY, GPU_OUT_OF_MEMORY.splitlines()[0].rstrip(".")),
        ("RESOURCE_EXHAUSTED: Failed to allocate request for 2.99GiB (3206250496B) on device "
         "ordinal 0", "RESOURCE_EXHAUSTED: Failed to allocate request for 2.99GiB"),
        ("RESOURCE_EXHAUSTED: Received message larger than max (5242880 vs. 4194304)", None),
    ],
)  # fmt: skip
def test_out_of_device_memory_is_told_from_other_exhausted_resources(message, first, caplog):
    if first is None:
        assert device_memory_refusal(RuntimeError(message)) is None
        return
    with caplog.at_level("WARNING", logger="vit_jax"):
        error = out_of_device_memory(RuntimeError(message), [])
    assert str(error).startswith(f"A program of the run does not fit in device memory ({first}")
    assert str(error).endswith("No checkpoint of this run was saved yet.")
    report = [r.getMessage() for r in caplog.records if r.getMessage().startswith("XLA's report")]
    assert report == (
        ["XLA's report:\n" + message.partition("\n")[2].strip()] if "\n" in message else []
    )


@pytest.mark.slow
@TPU
@ONE_SLICE_GROUP
def test_a_step_that_fits_only_as_the_compiler_recomputes_says_what_it_needs_as_written():
    # 40,000 images of 65 tokens at width 256 on 4 chips: about 17 GiB per chip as written,
    # beyond a v5e's 15.75; the compiler recomputes until it fits.
    wide = {"model.name": "Ti/4", "model.width": 256, "model.mlp_dim": 1024}
    f = compile_recipe(tiny(batch_size=40_000, **wide), parse_target("v5e-4"))
    assert f["fits"] is True and f["compiler_recomputes"] is True
    assert f["total_bytes"] <= f["device_memory_bytes"] < f["as_written_total_bytes"]
    needs = f["as_written_total_bytes"] / 2**30
    said = f"only as the compiler recomputes parts of it: as written the step needs {needs:.2f}"
    assert said in summarize(f)
    small = figures("v5e-4", 1, "dp")  # Far from the edge: the program as written.
    assert small["compiler_recomputes"] is False
    assert small["as_written_total_bytes"] == small["total_bytes"]
    assert "recomputes" not in summarize(small)


@pytest.mark.slow
@TPU
def test_a_step_refused_as_written_counts_its_arguments_once():
    """A tiny ViT under a head of millions of classes on a v5e-4: the parameters and Adam's
    state are most of what a chip holds, and the step's one large temporary is the head's
    float32 gradient (at 3M classes, compiled as written: 3.10 GB of temporaries, 3.09 GB of
    parameters). At 4.2M classes the compiler refuses the step as written, naming 16.11 GiB
    of "HLO temporaries": 17.30 GB, the arguments and that gradient. Added to the arguments
    again, the figure read 30.27 GB."""
    wide = {"model.width": 256, "model.mlp_dim": 1024}
    target = parse_target("v5e-4")
    fits = compile_recipe(tiny(batch_size=16, **wide), target, num_classes=3_000_000)
    assert fits["as_written_total_bytes"] == fits["total_bytes"]
    assert fits["tpu_compiler_accepts"] is True
    assert fits["temp_bytes"] == pytest.approx(fits["param_bytes"], rel=0.05)
    f = compile_recipe(tiny(batch_size=16, **wide), target, num_classes=4_200_000)
    assert f["fits"] is False and "HLO temporaries" in f["compiler_message"]
    assert f["tpu_compiler_accepts"] is False
    arguments = f["param_bytes"] + f["optimizer_bytes"] + f["batch_bytes"]
    assert f["as_written_total_bytes"] == pytest.approx(arguments + f["param_bytes"], rel=0.02)


@pytest.mark.slow
@GPU
def test_vit_bench_compile_exits_3_with_fits_false_when_the_memory_is_short(tmp_path):
    # TensorFlow blocked: compiling a recipe never needs the input pipeline.
    run_cli = BLOCK_TENSORFLOW + "\nfrom vit_jax.bench.cli import main\nmain()"
    command = [
        sys.executable, "-c", run_cli, "compile", "--target", "h100x8", "--json",
        "--config", f"{REPO}/configs/local.py", "--config.batch_size=8",
        "--config.eval_batch_size=8", *config_flags(HUGE),
        "--config.model.depth=6",  # ~54 GiB of state: beyond JAX's 75% of an H100's 80 GB.
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 3, result.stderr[-3000:]
    f = json.loads(result.stdout)
    assert f["fits"] is False and f["total_bytes"] > f["device_memory_bytes"]
    assert f["tpu_compiler_accepts"] is None  # A GPU's compiler does not check the memory.
    assert "Traceback" not in result.stderr
    assert summarize(f).startswith("does not fit: train step ")


@pytest.mark.slow
@GPU
def test_vit_bench_compile_takes_the_peak_its_hint_asks_for(tmp_path):
    """peaks.py has no peak for a dtype such as float64 on an H100: the figures say to pass
    --peak_tflops, and with it the compile has its estimate at that peak. (A GPU target: its
    float64 step compiles in 10 s, where the TPU compiler's float64 took 114 s in the suite.)"""
    run_cli = BLOCK_TENSORFLOW + "\nfrom vit_jax.bench.cli import main\nmain()"
    command = [
        sys.executable, "-c", run_cli, "compile", "--target", "h100x1",
        "--config", f"{REPO}/configs/local.py", "--config.batch_size=8",
        "--config.eval_batch_size=8", "--config.model.depth=1", "--config.model.dtype=float64",
    ]  # fmt: skip
    # With 64-bit JAX, as float64 computes in float64 only there (`compute_dtype`).
    env = os.environ | {"JAX_ENABLE_X64": "1"}
    run = functools.partial(subprocess.run, capture_output=True, text=True, timeout=600, env=env)
    without = run(command, cwd=tmp_path)
    assert without.returncode == 0, without.stderr[-3000:]
    assert "pass --peak_tflops" in without.stdout and "estimate_step_s" not in without.stdout
    given = run([*command, "--peak_tflops=197", "--json"], cwd=tmp_path)
    assert given.returncode == 0, given.stderr[-3000:]
    f = json.loads(given.stdout)
    assert f["peak_tflops_per_device"] == 197 and f["estimate_img_per_s"] > 0


def test_the_summary_gives_gib_per_device_the_estimate_and_what_to_change():
    gib = 2**30
    f = {
        "device_memory_bytes": 16 * gib, "param_bytes": gib // 4, "optimizer_bytes": gib // 2,
        "batch_bytes": 0, "temp_bytes": 3 * gib, "total_bytes": 4 * gib,
        "eval_total_bytes": gib, "fits": True, "estimate_step_s": 0.5,
        "estimate_img_per_s": 12345.6, "estimate_mfu": 0.456, "estimate_bound": "compute",
    }  # fmt: skip
    assert summarize(f) == (
        "fits: train step 4.00 of 16.00 GiB per device (parameters 0.25, optimizer state "
        "0.50, batch 0.00, temporaries 3.00), eval step 1.00 GiB; estimated 12,346 img/s, "
        "MFU 45.6%, bound by compute (kernels at peak FLOP/s and HBM bandwidth: a real step "
        "runs slower)"
    )
    unknown_peak = {k: v for k, v in f.items() if not k.startswith("estimate")}
    assert summarize(unknown_peak).endswith(
        "no estimate: the device's peak FLOP/s is not known (pass --peak_tflops)"
    )
    short = f | {"fits": False, "total_bytes": 20 * gib, "eval_total_bytes": None}
    assert summarize(short).startswith("does not fit: train step 20.00 of 16.00 GiB")
    assert "eval step does not fit; " in summarize(short) and "--sweep" in summarize(short)
    # Above HBM by memory_analysis() though the TPU compiler accepted the step: both said.
    accepted = short | {"tpu_compiler_accepts": True, "headroom_bytes": -4 * gib}
    assert "; the TPU compiler accepted this train step (under HBM by its own count)" in (
        summarize(accepted)
    )
    assert summarize(accepted).startswith("does not fit: train step 20.00 of 16.00 GiB")
    assert "accepted" not in summarize(accepted | {"tpu_compiler_accepts": None})


@TPU
def test_a_users_own_rematerialisation_target_is_kept(monkeypatch):
    target = parse_target("v5e-4")
    topology_devices(target)  # libtpu loaded before the variable: other tests keep 95%.
    monkeypatch.setenv("LIBTPU_INIT_ARGS", f"--{REMAT_TARGET_FLAG}=80")
    f = compile_recipe(tiny(), target)
    assert f["fits"] is True and f["as_written_total_bytes"] is None
    assert f["compiler_recomputes"] is False


def test_the_ranking_marks_a_fit_by_recomputation_and_a_step_only_the_compiler_accepts(capsys):
    from absl import flags

    from vit_jax.bench import cli

    flags.FLAGS(["vit-bench"])  # --json off: the table.
    gib = 2**30
    plain = {
        "fits": True, "total_bytes": 10 * gib, "estimate_img_per_s": 900.0,
        "estimate_mfu": 0.4, "estimate_bound": "compute", "compiler_recomputes": False,
    }  # fmt: skip
    ranked = [
        plain | {"setting": Setting("dp", 1, 1, "none", 1, scan=False), "flags": "--a",
                 "total_bytes": 15 * gib, "estimate_img_per_s": 1000.0,
                 "compiler_recomputes": True},
        plain | {"setting": Setting("fsdp", 4, 1, "full", 1), "flags": "--b"},
    ]  # fmt: skip
    # Above HBM by memory_analysis() though the TPU compiler accepted it (docs/fsdp-on-tpu.md).
    accepted = plain | {
        "setting": Setting("fsdp", 4, 1, "none", 1, scan=False),
        "flags": "--c",
        "fits": False,
        "tpu_compiler_accepts": True,
        "headroom_bytes": -gib,
    }
    cli._show_ranking([*ranked, accepted])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[7] for line in lines[1:4]] == ["true*", "true", "false?"]
    assert lines[4].startswith("* fits only as the compiler recomputes parts of the step")
    assert lines[5].startswith("? above HBM by memory_analysis(), though the TPU compiler")
    cli._show_ranking(ranked[1:])
    assert not any(line[0] in "*?" for line in capsys.readouterr().out.splitlines())


@pytest.mark.slow
@GPU
def test_vit_bench_compile_sweeps_from_a_plain_shell(tmp_path):
    """A field given on the command line keeps its value, and the flags of the best
    reproduce its figures.

    No JAX_PLATFORMS set, as users run it: the sweep's worker processes must still keep off
    the local backends, or the CUDA plugin refuses a machine without a GPU. A persistent
    cache in the environment gets none of the compile-only programs (they cannot be loaded
    back: JAX warns on reading them). (The table the sweep prints without --json:
    test_a_sweep_records_a_compile_that_fails_or_whose_worker_dies_and_goes_on; its search
    of scanned, then unrolled blocks: test_a_mesh_search_compiles_every_policy_from_...)"""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "cache")
    command = [
        sys.executable, "-m", "vit_jax.bench.cli", "compile", "--target", "h100x1",
        "--config", f"{REPO}/configs/local.py", "--config.batch_size=2",
        "--config.eval_batch_size=8", "--config.model.depth=1",
    ]  # fmt: skip
    run = functools.partial(
        subprocess.run, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env
    )
    result = run([*command, "--config.model.scan=true", "--sweep", "--json"])
    assert result.returncode == 0, result.stderr[-3000:]
    # What it searches came first, then each candidate's outcome as it was compiled: one
    # GPU's one mesh (which meshes a node gets: test_sweep_candidates_...), scanned blocks
    # only, at every policy (all fit), and no more accumulation than fitting needs there,
    # though the step is bound by HBM traffic.
    keeps = "sweep keeps --config.model.scan=true: 1 mesh(es) (dp), scanned blocks,"
    assert result.stderr.count(keeps) == 1, result.stderr[-3000:]
    ranked = json.loads(result.stdout)
    settings = sorted((f["remat_policy"], f["scan"], f["accum_steps"]) for f in ranked)
    assert settings == sorted((p, True, 1) for p in REMAT_POLICIES), settings
    assert all(f["fits"] for f in ranked) and ranked[0]["estimate_bound"] == "memory", ranked
    progress = [line for line in result.stderr.splitlines() if line.startswith("compiled ")]
    assert len(progress) == len(ranked) and all(": fits: " in line for line in progress)
    speeds = [f["estimate_img_per_s"] for f in ranked]
    assert speeds == sorted(speeds, reverse=True)
    # Their eval step, the same program for every policy, is compiled for the first and
    # its figures serve the others.
    assert len({f["eval_program"] for f in ranked}) == 1
    assert sum(f["eval_compile_s"] is not None for f in ranked) == 1, ranked
    assert len({f["eval_total_bytes"] for f in ranked}) == 1
    flags = ranked[0]["flags"].split()
    assert {"--config.sharding_rules=dp", "--config.model.scan=true"} <= set(flags), flags
    again = run([*command, *flags, "--json"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["estimate_img_per_s"] == pytest.approx(speeds[0], abs=0.5)
    cached = list((tmp_path / "cache").glob("*step*")) if (tmp_path / "cache").exists() else []
    assert not cached and "persistent compilation cache" not in result.stderr, cached


@pytest.mark.compile("libtpu", "jax_plugins.xla_cuda12")
def test_the_figures_name_the_compiler_they_hold_for(monkeypatch):
    monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
    libtpu_version = importlib.metadata.version("libtpu")
    assert compiler_version(parse_target("v5e-4")) == f"libtpu {libtpu_version}"
    pjrt = importlib.metadata.version("jax-cuda12-pjrt")
    assert compiler_version(parse_target("h100x8")) == f"jax-cuda12-pjrt {pjrt}"
    # Importing libtpu points TPU_LIBRARY_PATH at itself: that is still the release.
    import libtpu

    monkeypatch.setenv("TPU_LIBRARY_PATH", libtpu.get_library_path())
    assert compiler_version(parse_target("v5e-4")) == f"libtpu {libtpu_version}"
    monkeypatch.setenv("TPU_LIBRARY_PATH", "/opt/libtpu/libtpu.so")
    assert compiler_version(parse_target("v5e-4")) == "/opt/libtpu/libtpu.so"


def test_targets_by_the_names_users_rent():
    assert parse_target("v5e-256").topology == "v5e:16x16"
    assert parse_target("v5litepod-16").topology == "v5e:4x4"
    assert parse_target("v5p-128").topology == "v5p:4x4x4"  # 128 TensorCores, 64 chips.
    assert parse_target("v6e-64", slices=4).slices == 4
    assert parse_target("tpu7x-128").topology == "tpu7x:4x4x4"  # 128 TensorCores, 64 chips.
    h100 = parse_target("h100x8x4")
    assert (h100.topology, h100.slices, h100.platform) == ("4x1x8", 4, "cuda")
    # A GB200 NVL72 rack is one NVLink domain of 18 hosts (compute trays) of 4 GPUs.
    assert parse_target("gb200x72x2").topology == "2x18x4"
    assert parse_target("gb200x8").topology == "1x2x4"


def test_a_gpu_target_holds_the_share_of_memory_jax_takes_in_the_run(monkeypatch):
    """JAX's default 75% of each GPU (nvidia-smi's 81,559 MiB on an H100), or the share the
    environment gives the run: the GPU launch scripts give vit-train 90%."""
    for name in ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION"):
        monkeypatch.delenv(name, raising=False)
    whole = 81559 * 2**20
    assert parse_target("h100x8").device.memory_bytes == int(0.75 * whole)
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.8")
    assert parse_target("h100x8").device.memory_bytes == int(0.8 * whole)
    monkeypatch.setenv("XLA_CLIENT_MEM_FRACTION", "0.9")  # JAX's name now, read first.
    assert parse_target("h100x8x4").device.memory_bytes == int(0.9 * whole)
    monkeypatch.setenv("XLA_CLIENT_MEM_FRACTION", "90%")
    with pytest.raises(ValueError, match=r"XLA_CLIENT_MEM_FRACTION=90%: .* number in \(0, 1\]"):
        parse_target("h100x8")


# FP32 (non-tensor) peak TFLOP/s as NVIDIA publishes it, at the boost clock: "NVIDIA A100
# Tensor Core GPU" datasheet (A100 80GB SXM, FP32 19.5 TFLOPS); "NVIDIA H100 Tensor Core
# GPU" datasheet (H100 SXM, FP32 67 teraFLOPS); NVIDIA H200 product page,
# https://www.nvidia.com/en-us/data-center/h200/ (H200 SXM, FP32 67 TFLOPS); NVIDIA HGX
# page, https://www.nvidia.com/en-us/data-center/hgx/ (HGX B200, FP32 600 TFLOPS per 8 GPUs);
# NVIDIA Blackwell architecture technical brief (GB200 at 1,200 W, FP32 90 TFLOPS).
PUBLISHED_FP32_TFLOPS = {"a100": 19.5, "h100": 67.0, "h200": 67.0, "b200": 75.0, "gb200": 90.0}


@GPU
@pytest.mark.parametrize("kind", sorted(GPUS))
def test_each_gpu_targets_devices_report_the_kind_its_figures_and_peak_are_under(kind):
    """The shipped description parses, and the compile-only devices report the device kind
    a run on that GPU reports: the one `targets.GPUS` and `peaks.py` know it by."""
    devices = topology_devices(parse_target(f"{kind}x8"))
    assert {d.device_kind for d in devices} == {GPUS[kind].kind}
    assert peak_tflops(GPUS[kind].kind, "bfloat16") is not None


@TPU
@pytest.mark.parametrize("family", sorted(TPUS))
def test_each_tpu_targets_devices_report_the_kind_and_the_hbm_its_figures_hold(family):
    """The compile-only devices of a 4-chip slice report the device kind `targets.TPUS` and
    `peaks.py` know them by, one device per chip but on TPU7x, whose two TensorCores JAX
    runs as two devices; and the HBM a device offers is the compiler's own: its refusal of
    a program twice that size names it ("exceeds available HBM (94.75G)", in GiB)."""
    device = TPUS[family].device
    devices = topology_devices(parse_target(f"{family}-{4 * TPUS[family].units_per_chip}"))
    assert {d.device_kind for d in devices} == {device.kind}
    assert len(devices) == (8 if family == "tpu7x" else 4)
    assert peak_tflops(device.kind, "bfloat16") is not None
    one = jax.sharding.SingleDeviceSharding(devices[0])
    hbm_sized = jax.ShapeDtypeStruct((device.memory_bytes // 4,), np.float32, sharding=one)
    with pytest.raises(Exception, match="exceeds available HBM") as refusal:
        jax.jit(lambda x: x + 1, out_shardings=one).lower(hbm_sized).compile()  # In and out.
    available = re.search(r"exceeds available HBM \(([\d.]+)G\)", str(refusal.value))
    assert device.memory_bytes / 2**30 == pytest.approx(float(available.group(1)), abs=0.005)


@GPU
def test_fsdp_over_a_gb200_nvlink_domain_spans_its_hosts_and_crosses_no_network():
    """Two GB200 compute trays of one NVL72 rack (`gb200x8`: 2 hosts of 4 GPUs): FSDP spans
    all 8 GPUs, over NVLink, so no collective counts as crossing nodes. Grouped by process,
    as before, the trays were two nodes: FSDP over 4, gradients reduced across them."""
    result = figures("gb200x8", 1, "fsdp")
    assert result["fits"] and result["device_kind"] == "NVIDIA GB200"
    assert result["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert result["collectives"]["all-gather"]["bytes"] > 0
    assert all(c["cross_slice_bytes"] == 0 for c in result["collectives"].values())


@GPU
@GPU_NODE_GROUP
def test_a_b200_node_compiles_the_h100_nodes_program_and_estimates_it_by_its_own_figures():
    """B200 is compute capability 10.0, the one GPU kind no other test compiles for: XLA
    writes `.target sm_100a` PTX for it (seen with --xla_dump_to) and ptxas, from CUDA 12.8
    on, assembles it. The sharded step needs the bytes per device it needs on an H100 node
    (the same to the byte, jax 0.10.2), and its estimate is at least twice the H100 node's:
    each figure the roofline reads is (dense peak 2.27x, HBM 2.39x, NVLink 2x)."""
    b200, h100 = figures("b200x8", 1, "dp"), figures("h100x8", 1, "dp")
    assert b200["fits"] and b200["device_kind"] == "NVIDIA B200"
    assert b200["total_bytes"] == pytest.approx(h100["total_bytes"], rel=0.02)
    assert b200["peak_tflops_per_device"] == 1125.0  # TF32: JAX's float32 matmuls.
    assert b200["estimate_img_per_s"] >= 2 * h100["estimate_img_per_s"]


@pytest.mark.parametrize("kind", sorted(GPUS))
def test_each_gpu_target_reaches_the_devices_published_fp32_peak(kind):
    """SMs x FP32 units per SM x 2 (a fused multiply-add) x the boost clock is the FP32 peak
    NVIDIA publishes: XLA's GPU cost model reads these fields of the target description."""
    text = gpu_target_config(parse_target(f"{kind}x8"))

    def field(name: str) -> float:
        return float(re.search(rf"^\s*{name}: ([\d.]+)$", text, re.MULTILINE).group(1))

    tflops = field("core_count") * field("fpus_per_core") * 2 * field("clock_rate_ghz") / 1e3
    assert tflops == pytest.approx(PUBLISHED_FP32_TFLOPS[kind], rel=0.02)


@pytest.mark.parametrize(
    "family, published_bits_per_s",
    [
        # Cloud TPU's system-architecture pages (vit_jax/bench/targets.py): v5p per chip,
        # v5e and v6e per 256-chip Pod (6.4 and 25.6 Tbps; 2 x 100 and 4 x 200 Gbps NICs
        # per host of 8 chips), TPU7x per chip, shared by its two devices.
        ("v5p", 50e9),
        ("v5e", 6.4e12 / 256),
        ("v5litepod", 2 * 100e9 / 8),
        ("v6e", 25.6e12 / 256),
        ("tpu7x", 100e9 / 2),
    ],
)
def test_tpu_dcn_bandwidth_per_device_is_googles(family, published_bits_per_s):
    target = parse_target(f"{family}-{4 * TPUS[family].units_per_chip}", slices=2)
    assert target.device.dcn_bytes_per_s == pytest.approx(published_bits_per_s / 8)


@pytest.mark.parametrize(
    "name",
    ["v9-8", "v5e-12", "h100", "tpu", "v4-32", "v5e-0", "v5p-0", "tpu7x-12", "tpu7x-7", "h100x0",
     "h100x8x0", "gb200x6", "gb200x76"],
)  # fmt: skip
def test_an_unknown_target_names_the_known_ones(name):
    with pytest.raises(UnknownTargetError) as error:
        parse_target(name)
    assert (
        "v5e-16" in str(error.value)
        or "chips" in str(error.value)
        or "gb200x72" in str(error.value)
    )
    if name == "v4-32":  # Compile-only v4 devices are TensorCores, not what JAX runs on.
        assert "megacore" in str(error.value)
    if name in ("v9-8", "tpu"):
        assert "h100x8x4" in str(error.value) and "v6e-64" in str(error.value)


@pytest.mark.parametrize(
    "line, groups",
    [
        ("replica_groups={{0,2},{1,3}}", [[0, 2], [1, 3]]),
        ("replica_groups=[2,2]<=[4]", [[0, 1], [2, 3]]),
        ("replica_groups=[2,2]<=[2,2]T(1,0)", [[0, 2], [1, 3]]),
        # XLA's mesh form: devices laid out [2,4] transposed to the mesh [4,2]; groups run
        # along 'axis_0', one per index of 'axis_1'.
        ("replica_groups=mesh['axis_0'=4,'axis_1'=2], device_ids=([2,4]T(1,0)) {'axis_0'}",
         [[0, 1, 2, 3], [4, 5, 6, 7]]),
        ("replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_1'}", [[0, 1], [2, 3], [4, 5], [6, 7]]),
    ],
)  # fmt: skip
def test_replica_groups_in_every_form(line, groups):
    assert hlo._groups(line, 4) == groups


def test_collectives_in_a_loop_count_once_per_iteration():
    text = "\n".join([
        "%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {",
        "  %ar = f32[8]{0} all-reduce(f32[8]{0} %x), replica_groups={{0,1},{2,3}}, to_apply=%add",
        "}",
        "ENTRY %main (a: f32[8]) -> f32[8] {",
        '  %w = (s32[], f32[8]) while(%t), condition=%cond, body=%body, '
        'backend_config={"known_trip_count":{"n":"12"}}',
        "  %ag = f32[4,8]{1,0} all-gather(f32[1,8]{1,0} %y), replica_groups=[1,4]<=[4]",
        "}",
    ])  # fmt: skip
    found = {c.kind: c for c in hlo.collectives(text, [0, 0, 1, 1])}
    assert (found["all-reduce"].executions, found["all-reduce"].bytes) == (12, 32)
    assert not found["all-reduce"].cross_slice  # {0,1} and {2,3} each lie in one slice.
    assert (found["all-gather"].executions, found["all-gather"].bytes) == (1, 128)
    assert found["all-gather"].cross_slice
    assert np.isclose(hlo.bytes_sent(found["all-gather"]), 0.75 * 128)


def test_an_all_reduce_fused_with_the_slice_each_device_keeps_is_a_reduce_scatter():
    """The TPU compiler's reduce-scatter kernel: an all-reduce and a dynamic slice of it in
    one fusion (the full sum never reaches HBM). Unfused, the full sum is written, and it
    stays an all-reduce."""
    text = "\n".join([
        "%all-reduce-scatter (input: f32[8,16]) -> f32[2,16] {",
        "  %input = f32[8,16]{1,0} parameter(0)",
        "  %ar = f32[8,16]{1,0} all-reduce(%input), replica_groups={{0,1,2,3}}, to_apply=%add",
        "  %id = u32[] partition-id()",
        "  %two = u32[] constant(2)",
        "  %at = u32[] multiply(%id, %two)",
        "  %zero = u32[] constant(0)",
        "  ROOT %ds = f32[2,16]{1,0} dynamic-slice(%ar, %at, %zero), dynamic_slice_sizes={2,16}",
        "}",
        "ENTRY %main (a: f32[8,16], b: f32[8,16]) -> (f32[2,16], f32[2,16]) {",
        "  %a = f32[8,16]{1,0} parameter(0)",
        "  %b = f32[8,16]{1,0} parameter(1)",
        "  %rs = f32[2,16]{1,0} fusion(%a), kind=kCustom, calls=%all-reduce-scatter",
        "  %full = f32[8,16]{1,0} all-reduce(%b), replica_groups={{0,1,2,3}}, to_apply=%add",
        "  %c = u32[] constant(0)",
        "  %kept = f32[2,16]{1,0} dynamic-slice(%full, %c, %c), dynamic_slice_sizes={2,16}",
        "  ROOT %t = (f32[2,16], f32[2,16]) tuple(%rs, %kept)",
        "}",
    ])  # fmt: skip
    found = {c.kind: c for c in hlo.collectives(text, [0, 0, 0, 0])}
    assert (found["reduce-scatter"].bytes, found["reduce-scatter"].group_size) == (128, 4)
    assert found["all-reduce"].bytes == 512


def test_an_async_collective_counts_its_result_without_the_operands_its_start_holds():
    """The GPU compiler's asynchronous form: a start whose result holds the operands (named
    without their types) beside the result."""
    text = "\n".join([
        "ENTRY %main (x: f32[8,16], y: f32[2,16]) -> (f32[2,16], f32[8,16]) {",
        "  %x = f32[8,16]{1,0} parameter(0)",
        "  %y = f32[2,16]{1,0} parameter(1)",
        "  %rs = ((f32[8,16]{1,0}), f32[2,16]{1,0}) reduce-scatter-start(%x), "
        "replica_groups={{0,1,2,3}}, dimensions={0}, to_apply=%add",
        "  %ag = (f32[2,16]{1,0}, f32[8,16]{1,0}) all-gather-start(%y), "
        "replica_groups={{0,1,2,3}}, dimensions={0}",
        "}",
    ])  # fmt: skip
    found = {c.kind: c.bytes for c in hlo.collectives(text, [0, 0, 0, 0])}
    assert found == {"reduce-scatter": 128, "all-gather": 512}


def test_an_all_reduce_sends_what_its_reduce_scatter_and_all_gather_send():
    """Ring algorithms: a reduce-scatter to one n-th of a buffer sends n - 1 such parts, an
    all-gather of the buffer (n - 1) / n of it, and an all-reduce is the two in turn."""

    def sent(kind, size):
        return hlo.bytes_sent(hlo.Collective(kind, size, 4, False, 1))

    assert sent("reduce-scatter", 256) == 3 * 256
    assert sent("all-reduce", 1024) == sent("reduce-scatter", 256) + sent("all-gather", 1024)


def test_a_loop_without_a_known_trip_count_runs_as_often_as_its_condition_says():
    """The TPU compiler's form: no known_trip_count; the condition is `counter < 6`, the
    counter starting at 2."""
    text = "\n".join([
        "%cond (p: (s32[], f32[8])) -> pred[] {",
        "  %p = (s32[], f32[8]) parameter(0)",
        "  %i = s32[] get-tuple-element(%p), index=0",
        "  %n = s32[] constant(6)",
        "  ROOT %lt = pred[] compare(%i, %n), direction=LT",
        "}",
        "%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {",
        "  %ar = f32[8]{0} all-reduce(f32[8]{0} %x), replica_groups={{0,1,2,3}}, to_apply=%add",
        "}",
        "ENTRY %main (a: f32[8]) -> f32[8] {",
        "  %a = f32[8]{0} parameter(0)",
        "  %start = s32[] constant(2)",
        "  %t = (s32[], f32[8]) tuple(%start, %a)",
        "  %w = (s32[], f32[8]) while(%t), condition=%cond, body=%body",
        "}",
    ])  # fmt: skip
    (found,) = hlo.collectives(text, [0, 0, 0, 0])
    assert found.executions == 4


def test_arrays_in_a_tpus_on_chip_memory_move_no_hbm_bytes():
    """A 1 KB prefetch into VMEM (memory space S(1)) reads HBM once; an add of the
    prefetched copy to itself reads nothing from HBM and writes its 1 KB result there; an
    asynchronous 1 KB slice of a 10 KB buffer into VMEM reads the slice."""
    text = "\n".join([
        "%async_slice (p: f32[10,256]) -> f32[1,256] {",
        "  %p = f32[10,256]{1,0} parameter(0)",
        "  ROOT %s = f32[1,256]{1,0:S(1)} slice(%p), slice={[0:1], [0:256]}",
        "}",
        "ENTRY %main (a: f32[256], b: f32[10,256]) -> f32[256] {",
        "  %a = f32[256]{0} parameter(0)",
        "  %b = f32[10,256]{1,0} parameter(1)",
        "  %cs = (f32[256]{0}, f32[256]{0:S(1)}, u32[]{:S(2)}) copy-start(%a)",
        "  %cd = f32[256]{0:S(1)} copy-done(%cs)",
        "  %ss = ((f32[10,256]{1,0}), f32[1,256]{1,0:S(1)}, s32[]{:S(2)}) async-start(%b), "
        "calls=%async_slice",
        "  %sd = f32[1,256]{1,0:S(1)} async-done(%ss)",
        "  ROOT %n = f32[256]{0} add(%cd, %cd)",
        "}",
    ])  # fmt: skip
    assert hlo.kernel_bytes(text) == 1024 + 1024 + 1024


def test_a_multi_output_fusion_updates_in_place_and_slices_inside_a_nested_fusion():
    """The TPU compiler's forms: one kernel saves two activations into stacked [10,256]
    buffers (a root tuple of dynamic-update-slices) and reads a stacked buffer through a
    fusion nested in it: it moves its slices and updates, not the stacks."""
    text = "\n".join([
        "%inner (q: f32[10,256], j: s32[]) -> f32[1,256] {",
        "  %q = f32[10,256]{1,0} parameter(0)",
        "  %j = s32[] parameter(1)",
        "  ROOT %s = f32[1,256]{1,0} dynamic-slice(%q, %j, %j), dynamic_slice_sizes={1,256}",
        "}",
        "%outer (p0: f32[10,256], p1: f32[10,256], p2: f32[10,256], i: s32[]) -> "
        "(f32[10,256], f32[10,256]) {",
        "  %p0 = f32[10,256]{1,0} parameter(0)",
        "  %p1 = f32[10,256]{1,0} parameter(1)",
        "  %p2 = f32[10,256]{1,0} parameter(2)",
        "  %i = s32[] parameter(3)",
        "  %x = f32[1,256]{1,0} fusion(%p2, %i), kind=kLoop, calls=%inner",
        "  %y = f32[1,256]{1,0} negate(%x)",
        "  %u0 = f32[10,256]{1,0} dynamic-update-slice(%p0, %x, %i, %i)",
        "  %u1 = f32[10,256]{1,0} dynamic-update-slice(%p1, %y, %i, %i)",
        "  ROOT %t = (f32[10,256]{1,0}, f32[10,256]{1,0}) tuple(%u0, %u1)",
        "}",
        "ENTRY %main (a: f32[10,256], b: f32[10,256], c: f32[10,256], i: s32[]) -> f32[10,256] {",
        "  %a = f32[10,256]{1,0} parameter(0)",
        "  %b = f32[10,256]{1,0} parameter(1)",
        "  %c = f32[10,256]{1,0} parameter(2)",
        "  %i = s32[] parameter(3)",
        "  %f = (f32[10,256]{1,0}, f32[10,256]{1,0}) fusion(%a, %b, %c, %i), kind=kLoop, "
        "calls=%outer",
        "}",
    ])  # fmt: skip
    # The slice of c read, the index read, two 1 KB updates written.
    assert hlo.kernel_bytes(text) == 1024 + 4 + 2 * 1024


def _gpu_loop(fusion: list[str], operands: str, result: str) -> str:
    """A scanned loop of 4 iterations, as the GPU compiler writes it, that runs one fusion
    kernel on the loop's values (0: the counter, 1: a bf16[4,2,8,3,16] stack, 2: a
    bf16[6,8,16] activation)."""
    loop = "(s32[], bf16[4,2,8,3,16], bf16[6,8,16])"
    return "\n".join([
        *fusion,
        f"%body (p: {loop}) -> {loop} {{",
        f"  %p = {loop} parameter(0)",
        "  %i = s32[] get-tuple-element(%p), index=0",
        "  %stack = bf16[4,2,8,3,16]{2,4,3,1,0} get-tuple-element(%p), index=1",
        "  %x = bf16[6,8,16]{2,1,0} get-tuple-element(%p), index=2",
        f"  %f = {result} fusion({operands}), kind=kLoop, calls=%fused",
        f"  ROOT %t = {loop} tuple(%i, %stack, %x)",
        "}",
        f"ENTRY %main (a: {loop}) -> {loop} {{",
        f"  %a = {loop} parameter(0)",
        f"  ROOT %w = {loop} while(%a), condition=%cond, body=%body, "
        'backend_config={"known_trip_count":{"n":"4"}}',
        "}",
    ])  # fmt: skip


def test_a_dynamic_update_slice_through_a_bitcast_of_its_buffer_updates_in_place():
    """The GPU compiler's form of a scanned loop saving an activation: the fusion updates a
    bitcast of its stacked 6 KB parameter (the same bytes in another shape), which is
    updated in place: each iteration writes its 1.5 KB update, not the stack."""
    fusion = [
        "%fused (param_0: s32[], param_1: bf16[4,2,8,3,16], param_2: bf16[6,8,16]) -> "
        "bf16[4,2,3,16,8] {",
        "  %param_1 = bf16[4,2,8,3,16]{2,4,3,1,0} parameter(1)",
        "  %bitcast.1 = bf16[4,2,3,16,8]{4,3,2,1,0} bitcast(%param_1)",
        "  %param_2 = bf16[6,8,16]{2,1,0} parameter(2)",
        "  %bitcast.2 = bf16[1,2,3,16,8]{4,3,2,1,0} bitcast(%param_2)",
        "  %param_0 = s32[] parameter(0)",
        "  %zero = s32[] constant(0)",
        "  ROOT %dus = bf16[4,2,3,16,8]{4,3,2,1,0} dynamic-update-slice(%bitcast.1, "
        "%bitcast.2, %param_0, %zero, %zero, /*index=5*/%zero, %zero)",
        "}",
    ]
    text = _gpu_loop(fusion, "%i, %stack, %x", "bf16[4,2,3,16,8]{4,3,2,1,0}")
    # The counter and the 1.5 KB activation read, the 1.5 KB update written.
    assert hlo.kernel_bytes(text) == 4 * (4 + 1536 + 1536)


def test_a_dynamic_slice_of_a_bitcast_of_a_parameter_reads_the_slice():
    """The GPU compiler's form of a scanned backward pass reading a saved activation: a
    dynamic slice of a bitcast of the 6 KB stack reads its 1.5 KB slice."""
    fusion = [
        "%fused (param_0: bf16[4,2,8,3,16], param_1: s32[]) -> bf16[6,16,8] {",
        "  %param_0 = bf16[4,2,8,3,16]{2,4,3,1,0} parameter(0)",
        "  %bitcast.1 = bf16[4,2,3,16,8]{4,3,2,1,0} bitcast(%param_0)",
        "  %last = s32[] constant(3)",
        "  %param_1 = s32[] parameter(1)",
        "  %sub = s32[] subtract(%last, %param_1)",
        "  %zero = s32[] constant(0)",
        "  %ds = bf16[1,2,3,16,8]{4,3,2,1,0} dynamic-slice(%bitcast.1, %sub, %zero, %zero, "
        "%zero, /*index=5*/%zero), dynamic_slice_sizes={1,2,3,16,8}",
        "  %bitcast.2 = bf16[2,3,16,8]{3,2,1,0} bitcast(%ds)",
        "  %convert.1 = f32[2,3,16,8]{3,2,1,0} convert(%bitcast.2)",
        "  %bitcast.3 = f32[6,16,8]{2,1,0} bitcast(%convert.1)",
        "  ROOT %convert.2 = bf16[6,16,8]{2,1,0} convert(%bitcast.3)",
        "}",
    ]
    text = _gpu_loop(fusion, "%stack, %i", "bf16[6,16,8]{2,1,0}")
    # The 1.5 KB slice and the counter read, the 1.5 KB result written.
    assert hlo.kernel_bytes(text) == 4 * (1536 + 4 + 1536)


@pytest.mark.slow
@pytest.mark.parametrize(
    "target", [pytest.param("v5e-4", marks=TPU), pytest.param("h100x8", marks=GPU)]
)
def test_a_scanned_program_counts_its_loop_once_per_block(target):
    """Twice the blocks in the scan: the FSDP gathers and the HBM traffic nearly double
    (the patch embedding and head are outside the loop), on TPU and GPU alike."""
    shallow, deep = (
        compile_recipe(
            tiny("fsdp", **{"model.scan": True, "model.depth": depth}), parse_target(target)
        )
        for depth in (2, 4)
    )
    gathered = [f["collectives"]["all-gather"]["bytes"] for f in (shallow, deep)]
    assert 1.6 < gathered[1] / gathered[0] < 2.0, gathered
    traffic = [f["estimate_memory_s"] for f in (shallow, deep)]
    assert 1.5 < traffic[1] / traffic[0] < 2.0, traffic


def test_kernel_traffic_counts_what_crosses_hbm_once_per_loop_iteration():
    """A loop of 10 iterations: one fusion reads a 1 KB slice of a 10 KB stacked buffer
    and a 1 KB activation, and writes 1 KB in place into another 10 KB buffer."""
    text = "\n".join([
        "%fused (param_0: f32[10,256], param_1: f32[256], param_2: f32[10,256], i: s32[])"
        " -> f32[10,256] {",
        "  %param_0 = f32[10,256]{1,0} parameter(0)",
        "  %param_1 = f32[256]{0} parameter(1)",
        "  %param_2 = f32[10,256]{1,0} parameter(2)",
        "  %i = s32[] parameter(3)",
        "  %ds = f32[1,256]{1,0} dynamic-slice(%param_0, %i, %i), dynamic_slice_sizes={1,256}",
        "  %r = f32[1,256]{1,0} reshape(%param_1)",
        "  %m = f32[1,256]{1,0} multiply(%ds, %r)",
        "  ROOT %dus = f32[10,256]{1,0} dynamic-update-slice(%param_2, %m, %i, %i)",
        "}",
        "%body (p: (s32[], f32[10,256], f32[256], f32[10,256])) -> (s32[], f32[10,256]) {",
        "  %p = (s32[], f32[10,256], f32[256], f32[10,256]) parameter(0)",
        "  %i = s32[] get-tuple-element(%p), index=0",
        "  %w = f32[10,256]{1,0} get-tuple-element(%p), index=1",
        "  %x = f32[256]{0} get-tuple-element(%p), index=2",
        "  %acc = f32[10,256]{1,0} get-tuple-element(%p), index=3",
        "  %f = f32[10,256]{1,0} fusion(%w, %x, %acc, %i), kind=kLoop, calls=%fused",
        "  ROOT %t = (s32[], f32[10,256]) tuple(%i, %f)",
        "}",
        "ENTRY %main (a: f32[256]) -> f32[256] {",
        "  %a = f32[256]{0} parameter(0)",
        "  %n = f32[256]{0} negate(%a)",
        '  %w = (s32[], f32[10,256]) while(%t0), condition=%cond, body=%body, '
        'backend_config={"known_trip_count":{"n":"10"}}',
        "}",
    ])  # fmt: skip
    # Slice read, activation read, the s32 index read, update written.
    per_iteration = 1024 + 1024 + 4 + 1024
    entry = 1024 + 1024  # The negate reads and writes 1 KB.
    assert hlo.kernel_bytes(text) == 10 * per_iteration + entry


@GPU
def test_sweep_candidates_are_dp_fsdp_and_tensor_sizes_that_divide_the_slice():
    fsdp = [("fsdp", 8, 1), ("fsdp", 4, 1), ("fsdp", 2, 1)]
    assert list(meshes(8)) == [("dp", 1, 1), *fsdp, ("tp", 4, 2), ("tp", 2, 4)]
    assert list(meshes(6)) == [("dp", 1, 1), ("fsdp", 6, 1), ("fsdp", 3, 1), ("tp", 3, 2)]
    assert list(meshes(1)) == [("dp", 1, 1)]  # One GPU: FSDP over it is data parallelism.
    flags = Setting("tp", 2, 4, "dots", 2).flags().split()
    assert "--config.mesh.tensor=4" in flags and "--config.model.remat_policy=dots" in flags
    assert "--config.accum_steps=2" in flags and "--config.model.scan=true" in flags
    assert "--config.model.scan=false" in Setting("dp", 1, 1, "none", 1, scan=False).flags()


def one_by_one(compile_one):
    """`search_mesh`'s compile_all from a function of one setting."""
    return lambda settings: [compile_one(setting) for setting in settings]


def test_a_mesh_search_compiles_every_policy_from_the_first_fit_then_cheaper_unrolled_ones():
    """Scanned blocks fit only with dots or full remat here, unrolled ones with none or
    selective (a made-up memory table: no compiler runs). The costlier policies after the
    first fit are compiled too: a memory-bound step can run faster with more remat."""
    fits = {(True, "none", 1): False, (True, "dots", 1): True, (False, "none", 1): True}

    def compile_one(setting: Setting) -> dict:
        key = (setting.scan, setting.remat_policy, setting.accum_steps)
        return {"fits": fits.get(key, False), "setting": setting}

    def order(batch_size: int, platform: str) -> list[tuple[bool, str, int]]:
        tried = search_mesh(one_by_one(compile_one), "fsdp", 8, 1, batch_size, platform)
        return [(f["setting"].scan, f["setting"].remat_policy, f["setting"].accum_steps)
                for f in tried]  # fmt: skip

    every = ("none", "selective", "dots", "full")
    scanned = [(True, p, 1) for p in every]
    assert order(64, "tpu") == scanned
    # On a GPU the policies cheaper than the fit at more accumulation (fitting at none here).
    more = [(True, p, a) for a in (2, 4, 8) for p in ("none", "selective")]
    assert order(64, "cuda") == scanned + more + [(False, "none", 1)]
    fits[False, "none", 1] = False  # The unrolled program stops at the scanned fit's policy.
    fits[False, "selective", 1] = True
    unrolled = [(False, "none", 1), (False, "selective", 1)]
    assert order(64, "cuda") == scanned + more + unrolled
    fits[False, "selective", 1] = False
    assert order(64, "cuda") == scanned + more + unrolled + [(False, "dots", 1)]
    fits[True, "dots", 1] = False  # Accumulation comes after every policy; 2 divides 6.
    fits[True, "none", 2] = True
    policies = [(True, p, 1) for p in every]
    after = [(True, p, 2) for p in every] + [(False, "none", 2)]
    assert order(6, "cuda") == policies + after
    assert order(5, "cuda") == policies  # 2 does not divide 5: nothing fits.


def test_on_a_gpu_the_policies_cheaper_than_the_fit_are_compiled_at_more_accumulation():
    """Shaped as G/14 on h100x8x4 (a made-up memory table: no compiler runs): only `full`
    fits at one step, `dots` at two, `selective` at four, `none` nowhere. Each cheaper
    policy is compiled at each larger accumulation that divides the batch until it fits."""
    fit_from = {"none": 16, "selective": 4, "dots": 2, "full": 1}

    def compile_one(setting: Setting) -> dict:
        return {"fits": setting.accum_steps >= fit_from[setting.remat_policy], "setting": setting}

    def compiled(batch_size: int) -> list[tuple[str, int]]:
        tried = search_mesh(one_by_one(compile_one), "fsdp", 8, 1, batch_size, "cuda",
                            Space(scan=True))  # fmt: skip
        return [(f["setting"].remat_policy, f["setting"].accum_steps) for f in tried]

    every = [(p, 1) for p in ("none", "selective", "dots", "full")]
    then = [("none", 2), ("selective", 2), ("dots", 2), ("none", 4), ("selective", 4), ("none", 8)]
    assert compiled(128) == every + then
    assert compiled(6) == every + then[:3]  # 4 does not divide 6.
    fit_from["dots"] = 1  # The first fit: only the policies before it are compiled again.
    assert compiled(128) == every + [
        ("none", 2),
        ("selective", 2),
        ("none", 4),
        ("selective", 4),
        ("none", 8),
    ]


def test_a_memory_bound_tpu_mesh_is_compiled_again_at_each_larger_accumulation():
    """Made-up estimates (no compiler runs), shaped as B/16 on a v6e-64: every policy fits,
    `full` is fastest at one step, slower at two, `dots` fastest at four. Every policy at
    every larger accumulation that divides the batch is compiled, also where only `full`
    fits at one step (G/14 there); none where the fastest fit is bound by its matmuls, nor
    on a GPU target (unrolled blocks follow the fits there)."""
    every = ("none", "selective", "dots", "full")
    levels = {1: (80, 75, 105, 116), 2: (70, 90, 110, 56), 4: (62, 96, 145, 88),
              8: (50, 90, 130, 80)}  # fmt: skip
    img_per_s = {(p, a): v for a, row in levels.items() for p, v in zip(every, row, strict=True)}
    bound = {"value": "memory"}
    too_big: set[tuple[str, int]] = set()

    def compile_one(setting: Setting) -> dict:
        key = (setting.remat_policy, setting.accum_steps)
        return {"fits": key not in too_big, "setting": setting,
                "estimate_img_per_s": img_per_s[key], "estimate_bound": bound["value"]}  # fmt: skip

    def compiled(batch_size: int, platform: str = "tpu") -> list[tuple[bool, str, int]]:
        tried = search_mesh(one_by_one(compile_one), "fsdp", 64, 1, batch_size, platform)
        return [(f["setting"].scan, f["setting"].remat_policy, f["setting"].accum_steps)
                for f in tried]  # fmt: skip

    assert compiled(4096) == [(True, p, a) for a in (1, 2, 4, 8) for p in every]
    assert compiled(4094) == [(True, p, a) for a in (1, 2) for p in every]  # 4 does not divide.
    assert compiled(4096, "cuda") == [(True, p, 1) for p in every] + [(False, "none", 1)]
    too_big.update([("none", 1), ("selective", 1), ("dots", 1)])
    assert compiled(4096) == [(True, p, a) for a in (1, 2, 4, 8) for p in every]
    bound["value"] = "compute"
    assert compiled(4096) == [(True, p, 1) for p in every]


def test_a_sweep_says_what_it_searches_and_the_fewest_compiles_that_takes():
    said = sweep.describe_search(list(meshes(8)), Space(), "tpu", 2)
    assert said == (
        "6 mesh(es) (dp; fsdp 8; fsdp 4; fsdp 2; tp 2 x fsdp 4; tp 4 x fsdp 2), scanned blocks,"
        " remat none, selective, dots, full, accumulation 1, 2, 4, 8 steps: at least 24"
        " compile(s), 2 at once (--workers)"
    )
    fixed = Space(policies=("dots",), accum_steps=(4,), scan=False)
    said = sweep.describe_search([("fsdp", 8, 1)], fixed, "cuda", 1)
    assert said.startswith("1 mesh(es) (fsdp 8), unrolled blocks, remat dots, accumulation 4")
    assert "at least 1 compile(s), 1 at once" in said
    assert ", then unrolled" in sweep.describe_search([("dp", 1, 1)], Space(), "cuda", 1)
    said = sweep.describe_search([("dp", 1, 1)], Space(scan=False), "tpu", 1)
    assert said.endswith(
        "; unrolled, a ViT-B or larger takes the TPU compiler minutes per compile"
    ), said
    assert "minutes" not in sweep.describe_search([("dp", 1, 1)], Space(), "tpu", 1)
    # Each mesh by the axes it has, and a given one whose rules its axes do not imply.
    names = [sweep.mesh_name(*mesh) for mesh in meshes(4)]
    assert names == ["dp", "fsdp 4", "fsdp 2", "tp 2 x fsdp 2", "tp 4"], names
    assert sweep.mesh_name("fsdp", 4, 2) == "tp 2 x fsdp 4, fsdp rules"
    assert sweep.mesh_name("dp", 2, 1) == "fsdp 2, dp rules"


@pytest.mark.parametrize(
    "cores, memory_gib, limit, workers",
    [(64, 256, None, 32), (64, 256, "max", 32), (64, 256, 40 * 2**30, 5), (2, 24, None, 2),
     (8, 4, None, 1), (1, 512, None, 1)],
)  # fmt: skip
def test_a_sweep_runs_a_compile_per_core_that_the_memory_holds(
    cores, memory_gib, limit, workers, monkeypatch, tmp_path
):
    pages = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": memory_gib * 2**30 // 4096}
    monkeypatch.setattr(os, "sysconf", pages.__getitem__)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    cgroup = tmp_path / "memory.max"
    if limit is not None:
        cgroup.write_text(f"{limit}\n")
    monkeypatch.setattr(sweep, "CGROUP_MEMORY_LIMIT", str(cgroup))
    assert sweep.default_workers() == workers


def test_a_sweep_keeps_the_mesh_fields_the_command_line_fixes():
    every = list(meshes(8))
    assert search_space(8, 64, {}) == (every, Space())
    fsdp = [("fsdp", 8, 1), ("fsdp", 4, 1), ("fsdp", 2, 1)]
    assert search_space(8, 64, {"sharding_rules": "fsdp"})[0] == fsdp
    assert search_space(8, 64, {"mesh.fsdp": 4})[0] == [("fsdp", 4, 1), ("tp", 4, 2)]
    assert search_space(8, 64, {"mesh.data": 2})[0] == [("fsdp", 4, 1)]  # 8 / (4 x 1).
    assert search_space(8, 64, {"mesh.data": -1})[0] == every  # -1: the rest, as swept.
    whole = {"sharding_rules": "fsdp", "mesh.data": 1, "mesh.fsdp": -1}  # FSDP over the slice.
    assert search_space(8, 64, whole)[0] == [("fsdp", 8, 1)]
    assert search_space(8, 64, whole | {"mesh.tensor": 1})[0] == [("fsdp", 8, 1)]
    # All three named: that mesh, also where the sweep has none like it (data 2 x FSDP 2 x TP 2).
    tp = {"sharding_rules": "tp", "mesh.fsdp": 2, "mesh.tensor": 2}
    assert search_space(8, 64, tp)[0] == [("tp", 2, 2)]
    with pytest.raises(
        ValueError, match=r"No mesh .* has --config.sharding_rules=tp, --config.mesh.data=4"
    ):
        search_space(8, 64, tp | {"mesh.data": 4})
    with pytest.raises(
        ValueError,
        match=r"--config.mesh.fsdp=3; its meshes are: dp; fsdp 8; fsdp 4; fsdp 2; tp 2 x",
    ):
        search_space(8, 64, {"mesh.fsdp": 3})
    # All three named, but FSDP x TP does not divide the node: no mesh, not one that fails
    # at each compile.
    odd = {"sharding_rules": "fsdp", "mesh.fsdp": 3, "mesh.tensor": 1}
    with pytest.raises(
        ValueError,
        match=r"fsdp=3, --config.mesh.tensor=1 \(fsdp 3 x tensor 1 = 3 does not divide its 8 "
        r"devices\); its meshes are: dp; fsdp 8; .*Name a mesh.fsdp and mesh.tensor whose "
        r"product divides 8\.$",
    ):
        search_space(8, 64, odd)
    with pytest.raises(ValueError, match=r"\(fsdp 2 x tensor 4 = 8 does not divide its 6 "):
        search_space(6, 64, tp | {"mesh.fsdp": 2, "mesh.tensor": 4})
    assert search_space(6, 64, odd)[0] == [("fsdp", 3, 1)]
    # A size that is no size is named as make_mesh names it.
    with pytest.raises(ValueError, match=r"^config.mesh.fsdp=0: an axis size must be a whole"):
        search_space(8, 64, odd | {"mesh.fsdp": 0})


def _compile_refusal(cwd, target: str, *changes: str) -> list[str]:
    """The lines a `vit-bench compile` of configs/local.py that must be refused prints
    (status 2, no traceback, nothing on stdout), JAX's native log lines aside; the last
    one says why."""
    command = [
        sys.executable, "-m", "vit_jax.bench.cli", "compile", "--target", target,
        "--config", f"{REPO}/configs/local.py", *changes,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=cwd)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and result.stdout == "", result.stderr[-3000:]
    native = r"^([IWEF]\d{4} |WARNING: All log messages before absl::InitializeLog)"
    lines = result.stderr.splitlines()
    return [text for text in lines if text.strip() and not re.match(native, text)]


@GPU
def test_a_sweep_refuses_a_given_mesh_the_node_cannot_hold_before_its_first_compile(tmp_path):
    (line,) = _compile_refusal(
        tmp_path, "h100x8", "--config.sharding_rules=fsdp", "--config.mesh.fsdp=3",
        "--config.mesh.tensor=1", "--sweep", "--workers", "1",
    )  # fmt: skip
    assert line.startswith("vit-bench: No mesh the sweep compiles on 8 devices"), line
    assert "(fsdp 3 x tensor 1 = 3 does not divide its 8 devices); its meshes are: dp;" in line


@TPU
def test_a_config_no_candidate_can_run_is_a_user_error_not_a_sweep_that_fits_nothing(tmp_path):
    """float16 on a TPU (whose compiler has no float16 matmul) is refused before any compile,
    by `compile` and by `--sweep`; a config every candidate refuses (here a negative mixup
    alpha) says why, not "lower the batch size"; each one line and status 2."""

    def refusal(*changes: str) -> str:
        return _compile_refusal(tmp_path, "v5e-4", "--config.model.depth=1", *changes)[-1]

    half = "vit-bench: model.dtype='float16': XLA's TPU compiler has no float16 matmul"
    assert refusal("--config.model.dtype=float16").startswith(half)
    assert refusal("--config.model.dtype=float16", "--sweep", "--workers=1").startswith(half)
    fixed = ("--config.model.remat_policy=none", "--config.accum_steps=1", "--sweep")
    assert refusal("--config.pp.mixup_alpha=-1", *fixed, "--workers=1") == (
        "vit-bench: no candidate is a valid setting of this config: config.pp.mixup_alpha "
        "must be >= 0 (0 = off), got -1.0."
    )


@GPU
def test_vit_bench_compile_refuses_what_vit_train_refuses_before_compiling(tmp_path):
    """A plan that fits is one vit-train starts: the run's own fields (here a train crop
    that is no crop kind) and a batch of no images are refused in one line, status 2, by
    `compile` and `--sweep` alike, before any compiler runs."""

    def refusal(*changes: str) -> str:
        return _compile_refusal(tmp_path, "h100x1", *changes)[-1]

    crop = "vit-bench: config.pp.train_crop='100'; expected one of ('inception', 'shift', 'resize')"
    assert refusal("--config.pp.train_crop=100") == crop
    assert refusal("--config.pp.train_crop=100", "--sweep", "--workers=1") == crop
    assert refusal("--config.batch_size=0").startswith(
        "vit-bench: config.batch_size=0 is not a positive multiple of the 1 batch shards"
    )


def test_a_sweep_keeps_the_policy_accumulation_and_blocks_the_command_line_fixes():
    """Made-up fits (no compiler runs): a fixed field holds its value in every candidate,
    the other fields are searched as without it."""
    assert search_space(8, 64, {"model.remat_policy": "dots"})[1] == Space(policies=("dots",))
    assert search_space(8, 64, {"accum_steps": 4})[1] == Space(accum_steps=(4,))
    assert search_space(8, 64, {"model.scan": False})[1] == Space(scan=False)
    with pytest.raises(ValueError, match="remat_policy=some: choose one of"):
        search_space(8, 64, {"model.remat_policy": "some"})
    # Every policy the model has can be held, also one the sweep does not search.
    dots_no_batch = {"model.remat_policy": "dots_no_batch"}
    assert search_space(8, 64, dots_no_batch)[1] == Space(policies=("dots_no_batch",))
    with pytest.raises(ValueError, match="accum_steps=3 must .* divide batch_size 64"):
        search_space(8, 64, {"accum_steps": 3})

    def compile_one(setting: Setting) -> dict:
        fits = setting.remat_policy != "none" or setting.accum_steps > 1
        return {"fits": fits, "setting": setting, "estimate_img_per_s": 1.0,
                "estimate_bound": "memory"}  # fmt: skip

    def compiled(platform: str, space: Space) -> list[tuple[bool, str, int]]:
        tried = search_mesh(one_by_one(compile_one), "fsdp", 8, 1, 64, platform, space)
        return [(f["setting"].scan, f["setting"].remat_policy, f["setting"].accum_steps)
                for f in tried]  # fmt: skip

    dots = Space(policies=("dots",))
    assert compiled("cuda", dots) == [(True, "dots", 1), (False, "dots", 1)]
    assert compiled("tpu", dots) == [(True, "dots", a) for a in (1, 2, 4, 8)]
    none = Space(policies=("none",))  # Fits from 2 steps on: unrolled blocks follow there.
    assert compiled("cuda", none) == [(True, "none", 1), (True, "none", 2), (False, "none", 2)]
    every = ("none", "selective", "dots", "full")
    assert compiled("tpu", Space(accum_steps=(2,))) == [(True, p, 2) for p in every]
    # `none`, cheaper than the first fit, again at 2 steps, where it fits.
    assert compiled("cuda", Space(scan=True)) == [(True, p, 1) for p in every] + [(True, "none", 2)]
    assert compiled("cuda", Space(scan=False)) == [(False, p, 1) for p in every] + [
        (False, "none", 2)
    ]


def dies_or_fails_at_two_policies(config, target, num_classes, eval_programs, setting, peak):
    """A sweep's compile in its worker process: the real one, except that `selective` kills
    its own process, as the kernel kills a compile for host memory, and `dots` meets a real
    compiler error (an option the compiler does not have)."""
    import jax
    import jax.numpy as jnp

    if setting.remat_policy == "selective":
        os.kill(os.getpid(), signal.SIGKILL)
    if setting.remat_policy == "dots":
        jax.jit(jnp.sin).lower(jnp.ones(2)).compile({"xla_no_such_option": True})
    return sweep._compile_one(config, target, num_classes, eval_programs, setting, peak)


@pytest.mark.slow
@GPU
def test_a_sweep_records_a_compile_that_fails_or_whose_worker_dies_and_goes_on(monkeypatch, capsys):
    """A killed worker fails the pool's other jobs too: those compile again in a new pool;
    the candidate whose process dies again does not fit, and says so, as does one that the
    compiler refuses. The others are ranked, and the best named."""
    from absl import flags

    from vit_jax.bench import cli

    monkeypatch.setattr(sweep, "_compile_one", dies_or_fails_at_two_policies)
    fixed = {"sharding_rules": "dp", "mesh.fsdp": 1, "mesh.tensor": 1, "accum_steps": 1,
             "model.scan": True}  # fmt: skip
    ranked = sweep.sweep(tiny(), parse_target("h100x8"), 8, workers=1, fixed=fixed)
    err = capsys.readouterr().err
    by_policy = {f["setting"].remat_policy: f for f in ranked}
    assert sorted(by_policy) == sorted(REMAT_POLICIES) and len(ranked) == 4, ranked
    assert by_policy["none"]["fits"] and by_policy["full"]["fits"]  # "full" compiled again.
    assert not by_policy["selective"]["fits"] and not by_policy["dots"]["fits"]
    assert by_policy["selective"]["failed"] == sweep.DIED
    # The eval step, one program for every policy, compiled once: the others take its figures.
    fitting = [f for f in ranked if f["fits"]]
    assert sum(f["eval_compile_s"] is not None for f in fitting) == 1, fitting
    assert fitting[0]["eval_total_bytes"] == fitting[1]["eval_total_bytes"] > 0
    refusal = "JaxRuntimeError: INVALID_ARGUMENT: No such compile option: 'xla_no_such_option'"
    assert by_policy["dots"]["failed"] == refusal
    said = {line.split("remat_policy=")[1].split()[0]: line for line in err.splitlines()
            if line.startswith("compiled ")}  # fmt: skip
    assert said["selective"].endswith(f": failed: {sweep.DIED}"), err
    assert said["dots"].endswith(f": failed: {refusal}"), err
    flags.FLAGS(["vit-bench"])  # --json off: the table.
    cli._show_ranking(ranked)
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[4]: line for line in lines[1:5]}
    assert rows["dots"].endswith(f"  failed: {refusal}") and "failed" not in rows["none"]
    assert lines[-1].startswith("best: vit-train ... --config.sharding_rules=dp"), lines
