"""`vit-bench MODE --config RECIPE[:args] [--config.KEY=VALUE ...] [--json]`.

Modes: train | infer | input | photos | compile (see `vit_jax.bench`). Prints one
`name value` line per figure, or with --json a single JSON object holding every figure.

  vit-bench compile --target v5e-256 --config configs/pretrain.py:variant=B/16 [--sweep]

compiles the recipe's train and eval steps for a TPU slice or GPU node on this machine and
reports memory per device, fits yes/no, FLOPs, collectives and a roofline estimate of the
step, then a `summary` line (not with --json). Exit status: 0 when it fits, 3 when it does
not, 2 on a bad target or config. `train` and `infer` end with status 3 too, in one line,
when their step does not fit in the local devices' memory.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from vit_jax import cli

MODES = ("train", "infer", "input", "photos", "compile")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file[:args].", lock_config=True)
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of lines.")
_STEPS = flags.DEFINE_integer(
    "steps", 10, "train/infer: timed steps after one warm-up step.", lower_bound=1
)
_PEAK = flags.DEFINE_float(
    "peak_tflops",
    None,
    "Peak TFLOP/s per device, for MFU and compile's estimate (default: vit_jax/peaks.py).",
)
flags.register_validator(
    "peak_tflops", lambda value: value is None or value > 0, "must be > 0 (TFLOP/s per device)"
)
_PROFILE = flags.DEFINE_string(
    "profile", None, "train/infer: a jax.profiler trace of the timed steps into this folder."
)
_BATCHES = flags.DEFINE_integer(
    "batches", 20, "input: timed batches after the warm-up.", lower_bound=1
)
_SPLIT = flags.DEFINE_enum("split", "train", ["train", "eval"], "input: which pipeline.")
_OUT = flags.DEFINE_string("out", None, "photos: folder to write.")
_COUNT = flags.DEFINE_integer("count", 1000, "photos: number of JPEGs.", lower_bound=1)
_TARGET = flags.DEFINE_string(
    "target",
    None,
    "compile: v5e-16, v5litepod-16, v5p-128, v6e-64, tpu7x-128 (64 chips, 128 devices), "
    "h100x8, h200x8, b200x8, a100x8, h100x8x4, gb200x72 (one NVL72 rack: an NVLink domain "
    "of 18 hosts of 4 GPUs).",
)
_SLICES = flags.DEFINE_integer("slices", 1, "compile: TPU slices (multi-slice over DCN).")
_NUM_CLASSES = flags.DEFINE_integer(
    "num_classes",
    None,
    "train, infer, compile: classes of the head (default: the recipe's dataset's).",
    lower_bound=1,
)
_SWEEP = flags.DEFINE_bool(
    "sweep",
    False,
    "compile: search rules, mesh, scan, remat and accumulation for the fastest fit; "
    "those given as --config flags keep their values.",
)
_WORKERS = flags.DEFINE_integer(
    "workers",
    None,
    "compile --sweep: compiler processes at once (default: one per core, at most one per 8 "
    "GB of memory).",
    lower_bound=1,
)


def _show(figures: dict) -> None:
    if _JSON.value:
        print(json.dumps(figures))
        return
    for name, value in figures.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, dict):
            value = json.dumps(value)
        elif value is None and name in ("peak_tflops_per_device", "mfu"):
            value = (
                "unknown (none in vit_jax/peaks.py for this device and dtype: pass --peak_tflops)"
            )
        elif value is None:
            value = "unknown"
        print(f"{name} {value}")


def _main(argv: list[str]) -> int | None:
    logging.getLogger().setLevel(logging.WARNING)  # Figures only, no library INFO lines.
    if len(argv) != 2 or argv[1] not in MODES:
        raise app.UsageError(f"Usage: vit-bench {{{'|'.join(MODES)}}} --config RECIPE[:args] ...")
    mode = argv[1]
    if mode == "photos":
        if not _OUT.value:
            raise app.UsageError("vit-bench photos needs --out DIR.")
        cli.check_directory("--out", _OUT.value)
        from vit_jax.bench.photos import make_photo_folder

        _show({"dataset": make_photo_folder(_OUT.value, _COUNT.value), "count": _COUNT.value})
        return
    if _CONFIG.value is None:
        raise app.UsageError(f"vit-bench {mode} needs --config RECIPE[:args].")
    if _PROFILE.value:
        cli.check_directory("--profile", _PROFILE.value)
    if mode == "input":
        from vit_jax.bench.input import benchmark_input  # The only mode that needs TensorFlow.

        _show(benchmark_input(_CONFIG.value, _BATCHES.value, split=_SPLIT.value))
        return
    if mode == "compile":
        return _compile(_CONFIG.value)
    import jax

    from vit_jax.accelerators import check_cpu_fallback

    check_cpu_fallback()  # A CPU's figures in place of the device's would mislead.
    from vit_jax.bench.compile import DOES_NOT_FIT
    from vit_jax.bench.steps import benchmark_steps
    from vit_jax.trainer import TRAIN_STEP_LEVERS, device_memory_refusal

    try:
        figures = benchmark_steps(
            _CONFIG.value, mode, _STEPS.value, _PEAK.value, _PROFILE.value, _NUM_CLASSES.value
        )
    except jax.errors.JaxRuntimeError as e:
        if (refusal := device_memory_refusal(e)) is None:
            raise
        levers = (
            TRAIN_STEP_LEVERS
            if mode == "train"
            else "--config.sharding_rules=fsdp or a smaller --config.eval_batch_size"
        )
        print(
            f"vit-bench: the {mode} step does not fit in device memory ({refusal.rstrip('.')})."
            f" To fit: {levers}; `vit-bench compile --target TARGET --sweep` finds the fastest "
            "training setting that fits.",
            file=sys.stderr,
        )
        return DOES_NOT_FIT
    _show(figures)


def _compile(config) -> int:
    if not _TARGET.value:
        raise cli.UsageError("vit-bench compile needs --target (e.g. v5e-16 or h100x8).")
    import jax

    # The target's devices are compile-only: no local accelerator is opened, so the plugins
    # (libtpu, CUDA) need not find one, and say nothing about it. The environment carries
    # it to --sweep's worker processes.
    if not os.environ.get("JAX_PLATFORMS"):
        os.environ["JAX_PLATFORMS"] = "cpu"
        jax.config.update("jax_platforms", "cpu")
    # A compile-only program cannot be loaded back from JAX's persistent cache: keep them
    # out of one that JAX_COMPILATION_CACHE_DIR names (--sweep's workers do the same).
    jax.config.update("jax_enable_compilation_cache", False)
    from vit_jax.bench import targets
    from vit_jax.bench.compile import DOES_NOT_FIT, FITS, compile_recipe, summarize
    from vit_jax.config import check_run_fields

    target = targets.parse_target(_TARGET.value, _SLICES.value)
    check_run_fields(config)  # A plan that fits is one that vit-train starts.
    try:
        if not _SWEEP.value:
            figures = compile_recipe(config, target, _NUM_CLASSES.value, peak=_PEAK.value)
            _show(figures)
            if not _JSON.value:
                print(f"summary {summarize(figures)}")
            return FITS if figures["fits"] else DOES_NOT_FIT
        from vit_jax.bench.sweep import SWEPT_FIELDS, sweep

        per_slice = len(targets.topology_devices(target)) // target.slices
        given = config_flags.get_override_values(flags.FLAGS["config"])
        fixed = {k: v for k, v in given.items() if k in SWEPT_FIELDS}
        ranked = sweep(
            config, target, per_slice, _NUM_CLASSES.value, _WORKERS.value, fixed, _PEAK.value
        )
    except targets.CompilerMissingError as e:
        raise cli.UsageError(str(e)) from None
    _show_ranking(ranked)
    return FITS if ranked and ranked[0]["fits"] else DOES_NOT_FIT


def _fits(figures: dict) -> str:
    """The ranking's fits column: true, false, or true* for a step that fits only as the
    TPU compiler recomputes parts of it."""
    return str(figures["fits"]).lower() + ("*" if figures.get("compiler_recomputes") else "")


def _show_ranking(ranked: list[dict]) -> None:
    from vit_jax.bench.compile import accepted_over_hbm

    if _JSON.value:
        print(json.dumps([{k: v for k, v in f.items() if k != "setting"} for f in ranked]))
        return
    gib = 1024**3
    print(f"{'rules':6} {'fsdp':>4} {'tp':>3} {'blocks':8} {'remat':9} {'accum':>5} "
          f"{'GiB/dev':>8} {'fits':6} {'est img/s':>10} {'est MFU':>8} bound")  # fmt: skip
    for f in ranked:
        s = f["setting"]
        total = f.get("total_bytes")
        blocks = "scanned" if s.scan else "unrolled"
        # false?: the TPU compiler accepted a step memory_analysis() counts above HBM.
        fits = "false?" if accepted_over_hbm(f) else _fits(f)
        print(
            f"{s.rules:6} {s.fsdp:>4} {s.tensor:>3} {blocks:8} {s.remat_policy:9} "
            f"{s.accum_steps:>5} "
            f"{total / gib if total else float('nan'):>8.2f} {fits:6} "
            f"{f.get('estimate_img_per_s') or float('nan'):>10.0f} "
            f"{f.get('estimate_mfu') or float('nan'):>8.1%} {f.get('estimate_bound', '-')}"
            + (f"  failed: {f['failed']}" if f.get("failed") else "")
        )
    if any(f.get("compiler_recomputes") for f in ranked):
        print(
            "* fits only as the compiler recomputes parts of the step: as written it needs "
            "more (as_written_total_bytes), and the estimate leaves that recomputation out"
        )
    if any(accepted_over_hbm(f) for f in ranked):
        print(
            "? above HBM by memory_analysis(), though the TPU compiler accepted the step "
            "(under HBM by its own count): whether a slice runs it is not known"
        )
    if ranked and ranked[0]["fits"]:
        print(f"best: vit-train ... {ranked[0]['flags']}")
    else:
        print("No setting fits: lower the batch size or choose a larger target.")


def main() -> None:
    cli.run_with_flags("vit-bench", __doc__, _main)


if __name__ == "__main__":
    main()
