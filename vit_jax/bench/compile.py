"""Compiles a recipe's real train and eval steps for a TPU slice or GPU node this machine
does not have, and reports what the run will need and roughly how fast it can go.

The program is the one `vit-train` runs: the same `Trainer`, mesh and logical rules,
shardings and donation, from abstract state (`ShapeDtypeStruct`s): no array is created
and TensorFlow is not imported. Memory figures are the compiler's; on TPU they also say
what the step needs as written, where the compiler recomputes parts of it to fit (a step
that needs more than 95% of HBM). The step time is an
estimate, not a measurement: the matmuls at the device's dense peak (the step's matmul
FLOPs, counted from its jaxpr), plus the HBM traffic of every kernel of the optimized
program at the HBM bandwidth (`hlo.kernel_bytes`), or the collectives' ring traffic at
ICI or DCN bandwidth where that takes longer (they overlap with the kernels). Real
kernels run below peak, so measured steps are slower: docs/scale.md compares the two.
"""

from __future__ import annotations

import collections
import hashlib
import math
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from vit_jax import parallel
from vit_jax.bench import hlo
from vit_jax.bench.steps import num_classes_of
from vit_jax.bench.targets import GIB, Target, compiler_version, topology_devices
from vit_jax.peaks import peak_tflops
from vit_jax.trainer import Trainer, compiled_memory, device_memory_refusal

FITS, DOES_NOT_FIT = 0, 3  # `vit-bench compile`'s exit status, for launch scripts to gate on.
# The TPU compiler recomputes parts of a program that needs more than 95% of HBM until it
# fits: the step then runs slower than it reads, and its memory figure says where the
# recomputation stopped, not what the step needs (docs/fsdp-on-tpu.md "At the edge of HBM"). With
# this target far beyond any HBM the step is compiled as written; where it needs less than
# the target, that is the program the defaults compile.
REMAT_TARGET_FLAG = "xla_jf_rematerialization_percent_shared_memory_limit"
AS_WRITTEN = {REMAT_TARGET_FLAG: 1000}
# A step that needs more than this share of HBM as written is compiled again with the
# compiler's defaults, which may recompute to fit it.
AS_WRITTEN_SHARE = 0.9


def target_compiler_options(target: Target) -> dict[str, Any] | None:
    """The options a compile for `target`'s compile-only devices needs beyond the
    `Trainer`'s own: on a GPU target Triton's GEMMs off. Without a device XLA cannot
    autotune their tiling, and a bf16 ViT step failed there ("Couldn't find output tile
    sizes"); cuBLAS GEMMs compile for any target."""
    return {"xla_gpu_enable_triton_gemm": False} if target.platform == "cuda" else None


def target_trainer(
    config: ml_collections.ConfigDict, target: Target, num_classes: int | None = None
) -> Trainer:
    """The `Trainer` of `config` on `target`'s compile-only devices (its mesh from
    `config.mesh` and `config.dcn_mesh`), as `vit-train` would build it there.

    Raises:
      ValueError: a mesh the target cannot hold, or no known class count (`num_classes_of`).
      RuntimeError: the target's compiler is not installed.
    """
    mesh = parallel.make_mesh(config.mesh, config.dcn_mesh, topology_devices(target))
    total_steps = config.get("total_steps") or config.optim.warmup_steps + 1000
    return Trainer(config, mesh, num_classes_of(config, num_classes), total_steps)


def abstract_batch(config, trainer: Trainer, size: int, eval_mask: bool) -> dict:
    """A batch of `size` as sharded `ShapeDtypeStruct`s: uint8 images, int32 labels and, for
    evaluation, the float32 mask."""

    def sds(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=trainer.batch_sharding)

    image = config.image_size
    batch = {"image": sds((size, image, image, 3), jnp.uint8), "label": sds((size,), jnp.int32)}
    if eval_mask:
        batch["mask"] = sds((size,), jnp.float32)
    return batch


def _bytes_per_device(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (its shard of each)."""
    return sum(
        math.prod(leaf.sharding.shard_shape(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
        for leaf in jax.tree.leaves(tree)
    )


def _compile(lowerable, *args) -> tuple[jax.stages.Compiled | None, str | None, float]:
    """(compiled, None, seconds) or (None, the compiler's out-of-memory message, seconds)."""
    start = time.perf_counter()
    try:
        return lowerable(*args), None, time.perf_counter() - start
    except jax.errors.JaxRuntimeError as e:
        if (refusal := device_memory_refusal(e)) is None:
            raise
        return None, refusal, time.perf_counter() - start


def _eval_step_figures(
    trainer: Trainer, params, batch: dict, options: dict | None, known: dict[str, dict] | None
) -> dict[str, Any]:
    """The eval step's bytes per device (`eval_total_bytes`; None where it does not fit,
    with the compiler's `eval_compiler_message`), its compile seconds and `eval_program`, a
    digest of the program XLA compiles.

    `known` maps an `eval_program` to the memory figures of an earlier compile: the same
    program (remat and accumulation change only the train step) takes them from there,
    with `eval_compile_s` None.
    """
    lowered = trainer.lower_eval_step(params, batch)
    program = hashlib.sha256(lowered.as_text().encode()).hexdigest()[:16]
    if known and program in known:
        return known[program] | {"eval_program": program, "eval_compile_s": None}
    compiled, refusal, seconds = _compile(lowered.compile, options)
    figures = {"eval_program": program, "eval_compile_s": seconds}
    if compiled is None:
        return figures | {"eval_total_bytes": None, "eval_compiler_message": refusal}
    return figures | {"eval_total_bytes": compiled_memory(compiled)["total_bytes"]}


def _refused_bytes(message: str) -> int | None:
    """Bytes per device a TPU compiler's out-of-memory refusal names, if it names them
    ("... required for HLO temporaries (23.86G) exceeds ...": GiB). Despite its wording the
    figure counts the program's arguments too: it is the total of the compiler's buffer
    assignment (its memory-usage report, `XLA_FLAGS=--xla_dump_to`), which holds them."""
    found = re.search(r"HLO temporaries \(([\d.]+)G\)", message)
    return round(float(found.group(1)) * GIB) if found else None


def _compile_tpu_train_step(
    trainer: Trainer, state, batch, device_memory: int
) -> tuple[jax.stages.Compiled | None, str | None, float, int | None]:
    """(compiled, refusal, seconds) as `_compile` gives them for the program a TPU slice
    runs, and the bytes per device the step needs as written (None where not known).

    A user's own rematerialisation target (in LIBTPU_INIT_ARGS) is kept: one compile.
    """
    if parallel.set_by_user(REMAT_TARGET_FLAG):
        return *_compile(trainer.compile_train_step, state, batch, None), None
    compiled, refusal, seconds = _compile(trainer.compile_train_step, state, batch, AS_WRITTEN)
    if compiled is not None:
        as_written = compiled_memory(compiled)["total_bytes"]
        if as_written <= AS_WRITTEN_SHARE * device_memory:
            return compiled, None, seconds, as_written
    else:
        as_written = _refused_bytes(refusal)
    return *_compile(trainer.compile_train_step, state, batch, None), as_written


def _collective_figures(compiled: jax.stages.Compiled, mesh) -> tuple[dict, dict[str, float]]:
    """Per kind: count, bytes per step, cross-slice bytes; and ring bytes sent by link."""
    groups = parallel.device_slices(list(mesh.devices.flat))
    slice_of = {d.id: i for i, g in enumerate(groups) for d in g}
    found = hlo.collectives(compiled.as_text(), [slice_of[d.id] for d in mesh.devices.flat])
    kinds: dict[str, dict[str, float]] = collections.defaultdict(
        lambda: {"count": 0, "bytes": 0, "cross_slice_bytes": 0}
    )
    sent = {"ici": 0.0, "dcn": 0.0}
    for c in found:
        k = kinds[c.kind]
        k["count"] += c.executions
        k["bytes"] += c.bytes * c.executions
        k["cross_slice_bytes"] += c.bytes * c.executions if c.cross_slice else 0
        sent["dcn" if c.cross_slice else "ici"] += hlo.bytes_sent(c) * c.executions
    return dict(kinds), sent


def compile_recipe(
    config: ml_collections.ConfigDict,
    target: Target,
    num_classes: int | None = None,
    eval_programs: dict[str, dict] | None = None,
    peak: float | None = None,
) -> dict[str, Any]:
    """Every figure of `config` compiled for `target`; see the module docstring.

    `eval_programs`: eval-step memory figures by `eval_program`, as `--sweep` keeps them,
    so that candidates sharing an eval step compile it once (`_eval_step_figures`).
    `peak`: the device's dense TFLOP/s for the estimate (default: `peaks.py`'s table,
    which has none for some dtypes; without one there is no estimate).

    Raises:
      ValueError: a config that cannot run on the target (mesh, batch sizes, ...).
      RuntimeError: the target's compiler is not installed.
    """
    trainer = target_trainer(config, target, num_classes)
    mesh = trainer.mesh
    state = trainer.abstract_state()
    train_batch = abstract_batch(config, trainer, config.batch_size, eval_mask=False)
    eval_batch = abstract_batch(config, trainer, config.eval_batch_size, eval_mask=True)
    n = mesh.devices.size

    hardware = trainer.train_step_flops(state, train_batch)
    options = target_compiler_options(target)
    device = target.device
    param_bytes = _bytes_per_device(state.params)
    optimizer_bytes = _bytes_per_device(state.opt_state)
    batch_bytes = _bytes_per_device(train_batch)
    if target.platform == "tpu":
        compiled, oom, compile_s, as_written = _compile_tpu_train_step(
            trainer, state, train_batch, device.memory_bytes
        )
    else:
        compiled, oom, compile_s = _compile(trainer.compile_train_step, state, train_batch, options)
        as_written = None
    eval_figures = _eval_step_figures(trainer, state.params, eval_batch, options, eval_programs)
    dtype = str(config.model.dtype)
    peak = peak or peak_tflops(device.kind, dtype)
    figures: dict[str, Any] = {
        "target": target.name,
        "topology": target.topology,
        "slices": target.slices,
        "compiler": compiler_version(target),
        "device_kind": device.kind,
        "num_devices": n,
        "model": config.model.name,
        "image_size": config.image_size,
        "num_classes": trainer.model.num_classes,
        "batch_size": config.batch_size,
        "accum_steps": config.accum_steps,
        "dtype": dtype,
        "mu_dtype": config.optim.get("mu_dtype") or "float32",
        "scan": bool(config.model.scan),
        "remat_policy": config.model.remat_policy,
        "sharding_rules": config.sharding_rules,
        "mesh": dict(mesh.shape),
        "device_memory_bytes": device.memory_bytes,
        "param_bytes": param_bytes,
        "optimizer_bytes": optimizer_bytes,
        "batch_bytes": batch_bytes,
        # What the train step needs without the TPU compiler's own recomputation.
        "as_written_total_bytes": as_written,
        # The TPU compiler refuses a step beyond HBM by its own count; a GPU's does not check.
        "tpu_compiler_accepts": compiled is not None if target.platform == "tpu" else None,
        "compile_s": compile_s,
        **eval_figures,
        "model_flops_per_step": trainer.model_flops(state.params, config.batch_size),
        "hardware_flops_per_step": hardware,  # Recomputation included.
        "peak_tflops_per_device": peak,
    }
    if compiled is None:
        return figures | {"fits": False, "compiler_message": oom}
    memory = compiled_memory(compiled)
    cost = compiled.cost_analysis() or {}
    kinds, sent = _collective_figures(compiled, mesh)
    eval_total = eval_figures["eval_total_bytes"]
    fits = memory["total_bytes"] <= device.memory_bytes
    fits = fits and eval_total is not None and eval_total <= device.memory_bytes
    figures |= memory | {
        "fits": fits,
        "compiler_recomputes": as_written is not None and as_written > memory["total_bytes"],
        "headroom_bytes": device.memory_bytes - memory["total_bytes"],
        "xla_flops_per_device": cost.get("flops"),
        "collectives": kinds,
    }
    if "eval_compiler_message" in eval_figures:
        figures["compiler_message"] = eval_figures["eval_compiler_message"]
    if peak is None:
        return figures
    seconds = {
        "compute": hardware / n / (peak * 1e12),
        "memory": hlo.kernel_bytes(compiled.as_text()) / device.hbm_bytes_per_s,
        "interconnect": sent["ici"] / device.ici_bytes_per_s + sent["dcn"] / device.dcn_bytes_per_s,
    }
    # Kernels run one after another: the matmuls at the compute peak, the fused elementwise
    # kernels at HBM bandwidth, so their times add; collectives overlap with both.
    kernels_s = seconds["compute"] + seconds["memory"]
    step_s = max(kernels_s, seconds["interconnect"])
    bound = (
        "interconnect"
        if seconds["interconnect"] > kernels_s
        else max(("compute", "memory"), key=seconds.get)
    )
    return figures | {
        "estimate_step_s": step_s,
        "estimate_bound": bound,
        "estimate_compute_s": seconds["compute"],
        "estimate_memory_s": seconds["memory"],
        "estimate_interconnect_s": seconds["interconnect"],
        "estimate_img_per_s": config.batch_size / step_s,
        "estimate_mfu": figures["model_flops_per_step"] / n / (step_s * peak * 1e12),
    }


def accepted_over_hbm(figures: dict[str, Any]) -> bool:
    """Whether the TPU compiler accepted a train step (under HBM by its own count) that
    `memory_analysis()` counts above HBM: the two counts' gap is not explained
    (docs/fsdp-on-tpu.md, "At 4,608 images per chip"), so `fits` is false and a slice may
    still run it. `figures` is what `compile_recipe` returns."""
    return bool(figures.get("tpu_compiler_accepts")) and figures.get("headroom_bytes", 0) < 0


def summarize(figures: dict[str, Any]) -> str:
    """One sentence a person reads first: fits or not, GiB per device and their parts,
    the estimate and what bounds it, and what to change when the run does not fit.

    `figures` is what `compile_recipe` returns.
    """
    advice = (
        "fewer images per device (batch_size or more accum_steps), scan=true with a remat "
        "policy, or fsdp rules shrink it; --sweep searches them"
    )
    device = figures["device_memory_bytes"] / GIB
    if "total_bytes" not in figures:
        return f"does not fit: the compiler ran out of {device:.2f} GiB per device; {advice}"
    parts = ", ".join(
        f"{name} {figures[key] / GIB:.2f}"
        for name, key in (
            ("parameters", "param_bytes"),
            ("optimizer state", "optimizer_bytes"),
            ("batch", "batch_bytes"),
            ("temporaries", "temp_bytes"),
        )
    )
    eval_total = figures["eval_total_bytes"]
    eval_step = "does not fit" if eval_total is None else f"{eval_total / GIB:.2f} GiB"
    memory = (
        f"train step {figures['total_bytes'] / GIB:.2f} of {device:.2f} GiB per device "
        f"({parts}), eval step {eval_step}"
    )
    if not figures["fits"]:
        if accepted_over_hbm(figures):
            memory += (
                "; the TPU compiler accepted this train step (under HBM by its own count) but "
                "memory_analysis() counts more temporaries, a gap not yet explained, so "
                "whether a slice runs it is not known (docs/fsdp-on-tpu.md)"
            )
        return f"does not fit: {memory}; {advice}"
    if figures.get("compiler_recomputes"):
        memory += (
            "; only as the compiler recomputes parts of it: as written the step needs "
            f"{figures['as_written_total_bytes'] / GIB:.2f} GiB, and the estimate leaves that "
            "recomputation out"
        )
    if "estimate_step_s" not in figures:
        return (
            f"fits: {memory}; no estimate: the device's peak FLOP/s is not known (pass "
            "--peak_tflops)"
        )
    return (
        f"fits: {memory}; estimated {figures['estimate_img_per_s']:,.0f} img/s, "
        f"MFU {figures['estimate_mfu']:.1%}, bound by {figures['estimate_bound']} "
        "(kernels at peak FLOP/s and HBM bandwidth: a real step runs slower)"
    )
