"""Where metrics go: JSON lines, TensorBoard events and a console line; process 0 only.

Written from a background thread, never from the training step, and never rewriting an
object already written: on `gs://` appending to an object re-uploads all of it, so a long
run's logging would grow quadratically in bytes. Records are buffered and written as
chunks, one new file per range of steps and kind, named by the chunk's first step:

    metrics/0000000001.jsonl                       one JSON object per logged step
    tensorboard/events.out.tfevents.0000000001.vit_jax    the same scalars as events

A chunk is written when the loop asks (`flush`, before every checkpoint, so what is
logged up to a checkpoint is on disk before the checkpoint can be resumed from), when its
oldest record is `FLUSH_EVERY_S` old, and at `close`. `read_records` reads the chunks
back as one stream. On resume, `MetricWriter` first drops what the interrupted run wrote
after the resumed step (those steps are written again), so every step appears once, even
after SIGKILL.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import queue
import re
import threading
import time

import jax
import tensorflow as tf
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.scalar.summary import scalar_pb
from tensorboard.summary.writer.record_writer import RecordWriter

log = logging.getLogger(__name__)

METRICS_DIR = "metrics"
TENSORBOARD_DIR = "tensorboard"
EVENTS_PREFIX = "events.out.tfevents."
# TensorBoard's summary writer flushes every 120 s by default: the same delay here.
FLUSH_EVERY_S = 120.0


def parse_record(line: str) -> dict | None:
    """One JSON line as a record; None for a blank line or one cut short."""
    try:
        return json.loads(line) if line.strip() else None
    except json.JSONDecodeError:
        return None


def _chunks(workdir: str) -> list[tuple[int, str, str]]:
    """(first step, metrics path, events path) of every chunk, in step order."""
    paths = tf.io.gfile.glob(os.path.join(workdir, METRICS_DIR, "*.jsonl"))
    firsts = sorted(int(os.path.basename(p).removesuffix(".jsonl")) for p in paths)
    return [(first, *_chunk_paths(workdir, first)) for first in firsts]


def _chunk_paths(workdir: str, first: int) -> tuple[str, str]:
    return (
        os.path.join(workdir, METRICS_DIR, f"{first:010d}.jsonl"),
        os.path.join(workdir, TENSORBOARD_DIR, f"{EVENTS_PREFIX}{first:010d}.vit_jax"),
    )


def read_lines(workdir: str) -> list[str]:
    """Every JSON line of `workdir`'s metrics, in step order (as `vit-train` wrote them).

    Raises FileNotFoundError when `workdir` holds no metrics.
    """
    if not tf.io.gfile.exists(os.path.join(workdir, METRICS_DIR)):
        raise FileNotFoundError(
            f"No {METRICS_DIR}/ in {workdir}: is it a vit-train workdir (one that has logged)?"
        )
    lines = []
    for _, path, _ in _chunks(workdir):
        with tf.io.gfile.GFile(path) as f:
            lines += f.read().splitlines()
    return lines


def read_records(workdir: str) -> list[dict]:
    """Every logged step's record ({"step": int, metric: float, ...}), in step order.

    Raises FileNotFoundError when `workdir` holds no metrics.
    """
    return [r for r in map(parse_record, read_lines(workdir)) if r is not None]


def _event_records(path: str) -> tuple[list[bytes], bool]:
    """The serialized events of `path` and whether its last record was complete."""
    records = []
    try:
        for record in tf.data.TFRecordDataset(path):
            records.append(record.numpy())
    except tf.errors.DataLossError:  # A record cut short by a kill.
        return records, False
    return records, True


def _replace(path: str, data: bytes) -> None:
    """Writes `path` anew through a temporary file (a name TensorBoard does not read)."""
    tmp = os.path.join(os.path.dirname(path), "repair.tmp")
    with tf.io.gfile.GFile(tmp, "wb") as f:
        f.write(data)
    tf.io.gfile.rename(tmp, path, overwrite=True)


def repair(workdir: str, resumed_step: int) -> None:
    """Drops what an interrupted run logged after `resumed_step`.

    Chunks after it are deleted; the one spanning it is rewritten without its later
    records (and a line or event cut short by a kill). TensorBoard's own purge needs an
    event TF2 never writes, so replayed steps would otherwise appear twice.
    """
    for first, metrics_path, events_path in _chunks(workdir):
        if first > resumed_step:
            for path in (metrics_path, events_path):
                if tf.io.gfile.exists(path):
                    tf.io.gfile.remove(path)
            continue
        with tf.io.gfile.GFile(metrics_path) as f:
            lines = f.read().splitlines()
        parsed = [(x, parse_record(x)) for x in lines]
        kept = [x for x, r in parsed if r is not None and r["step"] <= resumed_step]
        if len(kept) != len(lines):
            _replace(metrics_path, "".join(x + "\n" for x in kept).encode())
        if not tf.io.gfile.exists(events_path):
            continue
        events, complete = _event_records(events_path)
        kept_events = [e for e in events if event_pb2.Event.FromString(e).step <= resumed_step]
        if not complete or len(kept_events) != len(events):
            _replace(events_path, _event_file(kept_events))


def _event_file(events: list[bytes]) -> bytes:
    """Serialized events framed as TFRecords, the bytes of a TensorBoard event file."""
    buffer = io.BytesIO()
    writer = RecordWriter(buffer)
    for event in events:
        writer.write(event)
    return buffer.getvalue()


def _event(step: int, wall_time: float, metrics: dict[str, float]) -> bytes:
    summary = summary_pb2.Summary()
    for name, value in metrics.items():
        summary.value.extend(scalar_pb(name, value).value)
    return event_pb2.Event(step=step, wall_time=wall_time, summary=summary).SerializeToString()


class MetricWriter:
    """Logs records from the loop and writes them in chunks from a background thread.

    `write` returns at once; `flush` returns once everything written before it is on
    disk; `close` flushes and stops the thread. An error of the thread (a full disk, lost
    permissions) is raised by the next call.
    """

    def __init__(self, workdir: str, resumed_step: int):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        self.workdir = workdir
        repair(workdir, resumed_step)
        for directory in (METRICS_DIR, TENSORBOARD_DIR):
            tf.io.gfile.makedirs(os.path.join(workdir, directory))
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="metrics writer", daemon=True)
        self._thread.start()

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if self.enabled:
            self._check()
            record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
            self._queue.put((time.time(), record))

    def flush(self) -> None:
        if self.enabled:
            done = threading.Event()
            self._queue.put(done)
            done.wait()
            self._check()

    def close(self) -> None:
        if self.enabled and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
            self._check()

    def _check(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"Writing metrics to {self.workdir} failed.") from self._error

    def _run(self) -> None:
        buffered: list[tuple[float, dict]] = []
        while True:
            timeout = FLUSH_EVERY_S - (time.time() - buffered[0][0]) if buffered else None
            try:
                item = self._queue.get(timeout=max(timeout, 0.0) if timeout is not None else None)
            except queue.Empty:
                item = threading.Event()  # The oldest record is due: flush.
            if isinstance(item, tuple):
                buffered.append(item)
                continue
            if buffered and self._error is None:
                try:
                    self._write_chunk(buffered)
                except Exception as e:  # Raised in the loop's thread by the next call.
                    self._error = e
            buffered = []
            if item is None:
                return
            item.set()

    def _write_chunk(self, buffered: list[tuple[float, dict]]) -> None:
        """Two new files, each written once: JSON lines, then TensorBoard events (the JSON
        file makes the chunk known to `repair`, so no events file is ever left unknown)."""
        metrics_path, events_path = _chunk_paths(self.workdir, buffered[0][1]["step"])
        with tf.io.gfile.GFile(metrics_path, "w") as f:
            f.write("".join(json.dumps(record) + "\n" for _, record in buffered))
        version = event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")
        events = [version.SerializeToString()] + [
            _event(record["step"], wall_time, {k: v for k, v in record.items() if k != "step"})
            for wall_time, record in buffered
        ]
        with tf.io.gfile.GFile(events_path, "wb") as f:
            f.write(_event_file(events))


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
    ("train/mfu", lambda v: f"MFU {v:.1%}"),
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
