"""Where metrics go: `metrics.jsonl`, TensorBoard events and a console line; process 0 only."""

from __future__ import annotations

import json
import logging
import math
import os
import re

import jax
import tensorflow as tf

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def parse_record(line: str) -> dict | None:
    """One `metrics.jsonl` line as a record; None for a blank line or one a killed run left
    half-written (repaired on resume: vit_jax/workdir.py)."""
    try:
        return json.loads(line) if line.strip() else None
    except json.JSONDecodeError:
        return None


class MetricWriter:
    """Appends one JSON object per logged step and mirrors scalars to TensorBoard.

    On a resumed run, `vit_jax.workdir.repair_metrics` first drops what the interrupted
    run wrote after its last checkpoint, since those steps are written again.
    """

    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        self.path = os.path.join(workdir, METRICS_FILE)
        self.tensorboard = tf.summary.create_file_writer(os.path.join(workdir, TENSORBOARD_DIR))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        with tf.io.gfile.GFile(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        with self.tensorboard.as_default(step=int(step)):
            for name, value in metrics.items():
                tf.summary.scalar(name, float(value))
        self.tensorboard.flush()

    def close(self) -> None:
        if self.enabled:
            self.tensorboard.close()


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


# The progress line shows the input wait once it is this large: the data is the bottleneck.
INPUT_WAIT_SHOWN = 0.1

_PROGRESS = (
    ("train/loss", lambda v: f"loss {v:.4f}"),
    ("train/lr", lambda v: f"lr {v:.2e}"),
    ("train/img_per_s", lambda v: f"{v:.0f} img/s"),
    ("train/step_time_s", lambda v: f"{v * 1000:.0f} ms/step"),
    ("train/eta_s", lambda v: f"ETA {_duration(v)}"),
)


def log_progress(step: int, total_steps: int, metrics: dict[str, float]) -> None:
    """One readable line, e.g. `step 300/3000 | loss 0.412 | lr 9.0e-04 | 1234 img/s | ...`."""
    parts = [f"step {step}/{total_steps}"]
    parts += [show(metrics[key]) for key, show in _PROGRESS if key in metrics]
    wait = metrics.get("train/input_wait_frac", 0.0)
    if wait >= INPUT_WAIT_SHOWN:
        parts.append(f"waiting for data {wait:.0%}")
    if "eval/top1" in metrics:
        parts.append(f"eval top-1 {metrics['eval/top1']:.2%} loss {metrics['eval/loss']:.4f}")
    parts += _fewshot_parts(metrics)
    log.info(" | ".join(parts))


_FEWSHOT_METRIC = re.compile(r"^fewshot/(.+)_(\d+)shot$")  # What `fewshot_metric` names.


def fewshot_metric(dataset: str, shots: int) -> str:
    """The metric name of the few-shot probe of `dataset` at `shots` per class."""
    return f"fewshot/{dataset}_{shots}shot"


def _fewshot_parts(metrics: dict[str, float]) -> list[str]:
    """`few-shot digits 56.0/69.2% at 1/5 shots`, one part per probed dataset."""
    by_dataset: dict[str, dict[int, float]] = {}
    for key, value in metrics.items():
        if match := _FEWSHOT_METRIC.match(key):
            by_dataset.setdefault(match[1], {})[int(match[2])] = value
    return [
        f"few-shot {name} {'/'.join(f'{100 * acc[n]:.1f}' for n in sorted(acc))}% at "
        f"{'/'.join(str(n) for n in sorted(acc))} shots"
        for name, acc in by_dataset.items()
    ]
