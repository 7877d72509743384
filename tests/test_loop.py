"""The loop's parts: its clock, evaluators configured as a list, the transfer guard and the
profiler window, each through a real (small) run."""

import functools
import glob
import gzip
import json
import logging
import os
import re
import subprocess
import sys

import evaluator_support
import jax
import numpy as np
import pytest
from helpers import (
    NO_PROBE,
    REPO,
    TINY,
    config_flags,
    load_recipe,
    small_local_config,
    vit_forward_flops,
)

from vit_jax import train
from vit_jax.bench.steps import benchmark_steps
from vit_jax.checkpoint import load_params
from vit_jax.chrono import Chrono
from vit_jax.metrics import read_records


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """Where this file's runs share one prepared copy of the digits dataset."""
    return tmp_path_factory.mktemp("digits")


def _config(data_root, evaluators, **changes):
    return small_local_config(
        data_root, evaluators=tuple(evaluators), transfer_guard="disallow", **changes
    )


def test_chrono_keeps_periodic_work_out_of_the_step_time():
    now = evaluator_support.FakeClock()
    chrono = Chrono(total_steps=10, batch_size=8, now=now)
    chrono.start(0)  # t = 1
    now.seconds += 3.0  # Steps 1-2: 3 s, of which the input wait below takes 1 s.
    with chrono.input_wait():  # Reads t = 5, 6.
        pass
    with chrono.paused("eval"):  # Reads t = 7, then 107.
        now.seconds += 99.0
    metrics = chrono.report(4)  # t = 108: 107 s of wall time, 100 of them in evaluation.
    assert metrics["time/eval_s"] == 100.0
    assert metrics["train/step_time_s"] == 7.0 / 4 and metrics["train/img_per_s"] == 8 / 1.75
    assert metrics["train/input_wait_frac"] == 1.0 / 7.0
    # The ETA counts the pauses at their rate so far: (1.75 + 100 / 4) s for 6 steps.
    assert metrics["train/eta_s"] == (1.75 + 25.0) * 6
    assert "time/eval_s" not in chrono.report(5)  # Each window reports its own pauses.
    assert "train/tflops_per_device" not in metrics and "train/mfu" not in metrics


def test_chrono_reports_model_tflops_per_device_and_mfu_against_the_peak():
    now = evaluator_support.FakeClock()
    chrono = Chrono(10, 8, model_flops_per_device=7e12, peak_tflops=8.0, now=now)
    chrono.start(0)
    now.seconds += 3.0
    metrics = chrono.report(2)  # Reads t = 1 and 5: 2 s per step.
    assert metrics["train/tflops_per_device"] == 3.5 and metrics["train/mfu"] == 3.5 / 8.0
    unknown_peak = Chrono(10, 8, model_flops_per_device=7e12, now=now)  # A CPU, say.
    unknown_peak.start(0)
    assert "train/mfu" not in unknown_peak.report(2) and "train/tflops_per_device" in metrics


@pytest.mark.slow
def test_the_loop_logs_mfu_from_a_hand_count_of_the_models_flops(data_root, monkeypatch, caplog):
    """Model FLOPs per step (3x the forward's matmuls on the global batch, no recomputation)
    over the devices and the window's step time, against the device's peak: a CPU has none
    in vit_jax/peaks.py, so the test gives it 0.5 TFLOP/s."""
    monkeypatch.setattr(train, "peak_tflops", lambda kind, dtype: 0.5)
    config = _config(data_root, ["classification"])
    config.model.remat_policy = "full"
    workdir = str(data_root / "mfu")
    with caplog.at_level(logging.INFO):
        train.train_and_evaluate(config, workdir)
    # The helpers' TINY model on 8 px digits: 4 patches of 4x4, width 32, one block, MLP 64,
    # 10 classes; 32 images per step. Full remat recomputes the forward: not model work.
    flops = 3 * 32 * vit_forward_flops(8, 4, 32, 1, 64, 10)
    records = [r for r in read_records(workdir) if "train/step_time_s" in r]
    assert [r["step"] for r in records] == [4, 8, 12]
    for r in records:
        per_device = flops / jax.device_count() / r["train/step_time_s"] / 1e12
        assert r["train/tflops_per_device"] == pytest.approx(per_device, rel=1e-9)
        assert r["train/mfu"] == pytest.approx(per_device / 0.5, rel=1e-9)
    progress = [m for m in caplog.messages if m.startswith("step 12/12 |")]
    assert progress and f"MFU {records[-1]['train/mfu']:.1%}" in progress[0], progress


@pytest.mark.slow
def test_an_evaluation_between_logs_is_not_counted_as_training(data_root, monkeypatch):
    # The loop's clock advances one second per reading, and the evaluation at step 6 (between
    # the logs at 4 and 8) 1000 s more: counted as training time, step 8's window of four
    # steps would average over 250 s per step.
    evaluator_support.CLOCK.seconds = 0.0
    monkeypatch.setattr(train, "Chrono", functools.partial(Chrono, now=evaluator_support.CLOCK))
    config = _config(data_root, ["evaluator_support:stalling"], checkpoint_every=100)
    workdir = str(data_root / "stalling")
    train.train_and_evaluate(config, workdir)
    records = {r["step"]: r for r in read_records(workdir)}
    assert records[8]["time/stalling_s"] >= 1000.0
    assert records[8]["train/step_time_s"] < 50.0  # Only the loop's own few readings a step.
    assert "time/stalling_s" not in records[4]


def test_work_done_once_is_kept_out_of_the_eta():
    now = evaluator_support.FakeClock()
    chrono = Chrono(total_steps=10, batch_size=8, now=now)
    chrono.start(0)  # t = 1
    with chrono.paused("compile", once=True):  # Reads t = 2, then 103.
        now.seconds += 100.0
    metrics = chrono.report(2)  # t = 104: 2 s of training in two steps.
    assert metrics["time/compile_s"] == 101.0 and metrics["train/step_time_s"] == 1.0
    assert metrics["train/eta_s"] == 1.0 * 8  # Not (1 + 101 / 2) s per step to come.


@pytest.mark.slow
def test_the_train_steps_compilation_is_not_counted_as_training(data_root, monkeypatch):
    """The first window's step time, img/s, MFU and ETA leave the compilation out: it takes
    minutes on a pod, where the first window would have read a fraction of the real rate."""
    evaluator_support.CLOCK.seconds = 0.0
    monkeypatch.setattr(train, "Chrono", functools.partial(Chrono, now=evaluator_support.CLOCK))
    compile_train_step = train._compile_train_step

    def slow_compile(*args):
        evaluator_support.CLOCK.seconds += 1000.0
        compile_train_step(*args)

    monkeypatch.setattr(train, "_compile_train_step", slow_compile)
    workdir = str(data_root / "slow_compile")
    train.train_and_evaluate(_config(data_root, ["classification"]), workdir)
    records = {r["step"]: r for r in read_records(workdir)}
    assert records[4]["time/compile_s"] >= 1000.0
    assert records[4]["train/step_time_s"] < 50.0  # Only the loop's own few readings a step.
    assert records[4]["train/eta_s"] < 50.0 * 8
    assert "time/compile_s" not in records[8]


@pytest.mark.slow
def test_a_custom_evaluator_is_configured_and_run_by_the_loop(data_root):
    config = _config(data_root, ["classification", "evaluator_support:params_norm"])
    workdir = str(data_root / "custom")
    final = train.train_and_evaluate(config, workdir)
    params = load_params(workdir)  # Step 12's, saved after the evaluators ran.
    norm = np.sqrt(sum(np.sum(np.square(x, dtype=np.float64)) for x in jax.tree.leaves(params)))
    assert final["params/l2_norm"] == pytest.approx(norm, rel=1e-5)
    assert 0.0 <= final["eval/top1"] <= 1.0
    records = {r["step"]: r for r in read_records(workdir)}
    assert {"params/l2_norm", "eval/top1", "time/params_norm_s"} <= set(records[12])
    assert "params/l2_norm" in records[6]  # At its interval (eval_every) too.


@pytest.mark.slow
def test_the_train_step_compiles_once_and_logs_its_bytes_per_device(data_root, caplog):
    config = _config(data_root, ["classification"])
    with jax.log_compiles(True), caplog.at_level(logging.INFO):
        train.train_and_evaluate(config, str(data_root / "compiled"))
    messages = [r.getMessage() for r in caplog.records]
    # Compiled ahead of the first step, for the log below; the step's call reuses it.
    assert sum("XLA compilation of jit(_train_step)" in m for m in messages) == 1, messages
    logged = [m for m in messages if m.startswith("Compiled the train step in ")]
    assert len(logged) == 1
    assert re.fullmatch(
        r"Compiled the train step in [\d.]+ s: [\d.]+ GiB per device \(arguments [\d.]+ GiB, "
        r"temporaries [\d.]+ GiB\)\.",
        logged[0],
    )


def test_an_unknown_evaluator_is_refused_before_the_workdir_is_touched(data_root):
    workdir = data_root / "unknown"
    with pytest.raises(ValueError, match=r"'knn'.*'classification'.*package.module:factory"):
        train.train_and_evaluate(_config(data_root, ["knn"]), str(workdir))
    with pytest.raises(ValueError, match="cannot import 'nothing' from 'evaluator_support'"):
        train.train_and_evaluate(_config(data_root, ["evaluator_support:nothing"]), str(workdir))
    assert not workdir.exists()


@pytest.mark.slow
def test_the_transfer_guard_catches_an_implicit_host_read(data_root):
    config = _config(data_root, ["evaluator_support:implicit_transfer"])
    with pytest.raises(Exception, match=r"[Dd]isallowed .*transfer"):
        train.train_and_evaluate(config, str(data_root / "guarded"))
    config.transfer_guard = "allow"
    final = train.train_and_evaluate(config, str(data_root / "unguarded"))
    assert np.isfinite(final["params/first"])


def _traced_steps(profile_dir: str, name: str) -> list[int]:
    """Step numbers annotated as `name` in the one trace under `profile_dir`."""
    runs = glob.glob(os.path.join(profile_dir, "plugins", "profile", "*"))
    assert len(runs) == 1  # One window: what TensorBoard's profile plugin lists.
    assert glob.glob(os.path.join(runs[0], "*.xplane.pb"))
    with gzip.open(os.path.join(runs[0], "perfetto_trace.json.gz")) as f:
        trace = json.load(f)  # The Chrome trace format Perfetto opens.
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return sorted(int(e["args"]["step_num"]) for e in events if e.get("name") == name)


@pytest.mark.slow
def test_profile_window_traces_the_annotated_steps(data_root):
    config = _config(data_root, ["classification"])
    config.profile.update(first_step=3, steps=2)
    workdir = str(data_root / "profiled")
    train.train_and_evaluate(config, workdir)
    assert _traced_steps(os.path.join(workdir, "tensorboard"), "train") == [3, 4]


@pytest.mark.slow
def test_a_profile_the_file_system_refuses_does_not_end_the_run(data_root):
    """jax.profiler raises as it writes a trace it cannot write (here its folder's parent is
    a file; on gs://, a refusal of the bucket): the run ended there, on a diagnostic. A real
    vit-train process: JAX's profiler stays "started" after such a failure, in the process."""
    workdir = data_root / "profile_refused"
    (workdir / "tensorboard").mkdir(parents=True)
    (workdir / "tensorboard" / "plugins").write_text("")  # Where the trace's folder goes.
    fields = TINY | {"data_dir": data_root / "tfds", "profile.first_step": 3, "profile.steps": 2}
    result = subprocess.run(
        [
            os.path.join(os.path.dirname(sys.executable), "vit-train"),
            "--config", f"{REPO}/configs/local.py:steps=6,dataset=digits,batch=32",
            "--workdir", str(workdir), *config_flags(NO_PROBE | fields),
        ],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 6/6" in result.stderr and "Final: " in result.stderr
    assert load_params(str(workdir))  # The last step's checkpoint was written.
    assert f"The profile of steps 3-4 could not be written to {workdir}/tensorboard (" in (
        result.stderr
    )


@pytest.mark.slow
def test_bench_profiles_its_timed_steps(tmp_path):
    config = load_recipe("local.py", "batch=16")
    config.update(eval_batch_size=16)
    benchmark_steps(config, "train", steps=2, profile_dir=str(tmp_path))
    assert _traced_steps(str(tmp_path), "train") == [0, 1]
