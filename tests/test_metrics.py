"""Metrics files: written in chunks off the training thread, each object written once, read
back as one stream, and repaired on resume so that every step appears once."""

import types

import pytest
import tensorflow as tf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vit_jax import metrics
from vit_jax.metrics import MetricWriter, read_records


class RecordingGfile:
    """`tf.io.gfile` as a remote store sees it: every object opened for writing, in order."""

    def __init__(self):
        self.written: list[str] = []
        for name in ("exists", "glob", "makedirs", "remove", "rename", "isdir"):
            setattr(self, name, getattr(tf.io.gfile, name))

    def GFile(self, path, mode="r"):
        assert "a" not in mode, f"append to {path}: on gs:// that rewrites the whole object"
        if "w" in mode:
            self.written.append(path)
        return tf.io.gfile.GFile(path, mode)


@pytest.fixture
def store(monkeypatch):
    gfile = RecordingGfile()
    fake_tf = types.SimpleNamespace(
        io=types.SimpleNamespace(gfile=gfile), data=tf.data, errors=tf.errors
    )
    monkeypatch.setattr(metrics, "tf", fake_tf)
    return gfile


def test_each_object_is_written_once_per_chunk_not_per_log(tmp_path, store):
    workdir = str(tmp_path)
    writer = MetricWriter(workdir, resumed_step=0)
    for step in range(1, 101):
        writer.write(step, {"train/loss": 1.0 / step})
        if step % 25 == 0:  # A checkpoint every 25 logged steps.
            writer.flush()
    writer.close()
    assert len(store.written) == len(set(store.written)) == 2 * 4  # JSON lines and events.
    assert [r["step"] for r in read_records(workdir)] == list(range(1, 101))
    assert [r["train/loss"] for r in read_records(workdir)] == [1.0 / s for s in range(1, 101)]
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    assert [e.step for e in events.Tensors("train/loss")] == list(range(1, 101))


def test_write_returns_before_the_store_is_touched(tmp_path, store):
    writer = MetricWriter(str(tmp_path), resumed_step=0)
    for step in range(1, 11):
        writer.write(step, {"train/loss": float(step)})
    assert store.written == []  # Buffered: the training thread never waits for the store.
    writer.flush()
    assert len(store.written) == 2
    writer.close()


def test_what_a_killed_run_wrote_after_the_resumed_step_is_dropped_once(tmp_path):
    workdir = str(tmp_path)
    writer = MetricWriter(workdir, resumed_step=0)
    for step in range(1, 7):
        writer.write(step, {"train/loss": float(step)})
        if step in (3, 6):
            writer.flush()
    writer.close()
    # SIGKILL while writing the chunk after step 6: its lines and last event cut short.
    (first, last_chunk, last_events) = metrics._chunks(workdir)[-1]
    assert first == 4
    with open(last_chunk, "a") as f:
        f.write('{"step": 7, "train/lo')
    with open(last_events, "ab") as f:
        f.write(b"\x20\x00\x00\x00\x00\x00\x00\x00\x01\x02")
    later_chunk = metrics._chunk_paths(workdir, 7)[0]  # One the kill left after it.
    with open(later_chunk, "w") as f:
        f.write('{"step": 7, "train/loss": 7.0}\n')

    writer = MetricWriter(workdir, resumed_step=4)  # The newest checkpoint: step 4.
    for step in range(5, 9):
        writer.write(step, {"train/loss": 10.0 * step})
    writer.close()

    expected = [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0), (6, 60.0), (7, 70.0), (8, 80.0)]
    assert [(r["step"], r["train/loss"]) for r in read_records(workdir)] == expected
    reader = EventAccumulator(str(tmp_path / "tensorboard"))
    reader.Reload()
    shown = [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in reader.Tensors("train/loss")]
    assert shown == expected


def test_a_workdir_without_metrics_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="is it a vit-train workdir"):
        read_records(str(tmp_path))


def test_a_failed_write_is_raised_in_the_loop(tmp_path, store, monkeypatch):
    writer = MetricWriter(str(tmp_path), resumed_step=0)

    def refuse(path, mode="r"):
        raise PermissionError(f"403 on {path}")

    monkeypatch.setattr(store, "GFile", refuse)
    writer.write(1, {"train/loss": 1.0})
    with pytest.raises(RuntimeError, match="Writing metrics to .* failed") as e:
        writer.flush()
    assert isinstance(e.value.__cause__, PermissionError)
