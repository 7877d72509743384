"""`vit-bench MODE --config RECIPE[:args] [--config.key=value ...] [--json]`.

Modes: train | infer | input | photos (see `vit_jax.bench`). Prints one `name value` line
per figure, or with --json a single JSON object holding every figure.
"""

from __future__ import annotations

import json
import logging

from absl import app, flags
from ml_collections import config_flags

from vit_jax import cli

MODES = ("train", "infer", "input", "photos")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file[:args].", lock_config=True)
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of lines.")
_STEPS = flags.DEFINE_integer("steps", 10, "train/infer: timed steps after one warm-up step.")
_PEAK = flags.DEFINE_float("peak_tflops", None, "Peak TFLOP/s per device (default: table).")
_BATCHES = flags.DEFINE_integer("batches", 20, "input: timed batches after the warm-up.")
_SPLIT = flags.DEFINE_enum("split", "train", ["train", "eval"], "input: which pipeline.")
_OUT = flags.DEFINE_string("out", None, "photos: folder to write.")
_COUNT = flags.DEFINE_integer("count", 1000, "photos: number of JPEGs.")


def _show(figures: dict) -> None:
    if _JSON.value:
        print(json.dumps(figures))
        return
    for name, value in figures.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        elif value is None:
            value = "unknown (device kind not in vit_jax/bench/peaks.py: pass --peak_tflops)"
        print(f"{name} {value}")


def _main(argv: list[str]) -> None:
    logging.getLogger().setLevel(logging.WARNING)  # Figures only, no library INFO lines.
    if len(argv) != 2 or argv[1] not in MODES:
        raise app.UsageError(f"Usage: vit-bench {{{'|'.join(MODES)}}} --config RECIPE[:args] ...")
    mode = argv[1]
    if mode == "photos":
        if not _OUT.value:
            raise app.UsageError("vit-bench photos needs --out DIR.")
        from vit_jax.bench.photos import make_photo_folder

        _show({"dataset": make_photo_folder(_OUT.value, _COUNT.value), "count": _COUNT.value})
        return
    if _CONFIG.value is None:
        raise app.UsageError(f"vit-bench {mode} needs --config RECIPE[:args].")
    if mode == "input":
        from vit_jax.bench.input import benchmark_input  # The only mode that needs TensorFlow.

        _show(benchmark_input(_CONFIG.value, _BATCHES.value, split=_SPLIT.value))
        return
    from vit_jax.bench.steps import benchmark_steps

    _show(benchmark_steps(_CONFIG.value, mode, _STEPS.value, _PEAK.value))


def main() -> None:
    cli.run_with_flags("vit-bench", __doc__, _main)


if __name__ == "__main__":
    main()
