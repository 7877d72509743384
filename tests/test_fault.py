"""Fault tolerance with real processes and real signals: preemption, kills, non-finite
steps and damaged checkpoints, each ending where an uninterrupted run ends."""

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    NO_PROBE,
    PAUSED_TRAIN,
    REPO,
    TINY,
    config_flags,
    load_recipe,
    run_limited,
    simulated_devices_env,
    small_local_config,
    wait_until_paused,
)
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vit_jax.checkpoint import load_params
from vit_jax.metrics import read_records
from vit_jax.parallel import make_mesh
from vit_jax.preemption import PREEMPTED_EXIT_STATUS, StopRequests
from vit_jax.train import train_and_evaluate
from vit_jax.trainer import NONFINITE, Trainer
from vit_jax.workdir import UnreadableCheckpointsError

RECIPE_ARG = "steps=150,dataset=digits,batch=32"
# Every step logged, so each step's loss can be compared with the uninterrupted run's;
# mixup and dropout, so the data stream's and the model's random draws must replay too.
SETTINGS = TINY | {
    "log_every": 1,
    "eval_every": 1000,
    "checkpoint_every": 50,
    "pp.mixup_alpha": 0.2,
    "model.dropout": 0.1,
}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """Where this file's runs share one prepared copy of the digits dataset (`tfds/`)."""
    return tmp_path_factory.mktemp("digits")


def _config(digits):
    config = load_recipe("local.py", RECIPE_ARG)
    config.data_dir = str(digits / "tfds")
    config.update_from_flattened_dict(SETTINGS | NO_PROBE)
    return config


def _command(digits, workdir, pause_at: int | None = None) -> list[str]:
    """The main job's command; paused before step `pause_at` + 1 (tests/paused_train.py)."""
    main = ["-m", "vit_jax.main"] if pause_at is None else [PAUSED_TRAIN, str(pause_at)]
    return [
        sys.executable, *main, "--config", f"configs/local.py:{RECIPE_ARG}",
        f"--config.data_dir={digits / 'tfds'}", "--workdir", str(workdir),
        *config_flags(SETTINGS | NO_PROBE),
    ]  # fmt: skip


def _signal_at(digits, workdir, step: int, signum: int) -> tuple[int, str, float]:
    """Runs the main job and sends it `signum` while it waits before step `step` + 1.

    The signal thus arrives during step `step` + 1, however fast the machine. Returns the
    exit status, the stderr and the seconds from the signal to the exit.
    """
    with tempfile.TemporaryFile("w+") as stderr:
        run = subprocess.Popen(
            _command(digits, workdir, pause_at=step), cwd=REPO, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
        )  # fmt: skip
        paused = wait_until_paused(run, step)
        if paused:
            run.send_signal(signum)
        sent = time.perf_counter()
        run.communicate("\n", timeout=300)  # Lets a paused run go on.
        seconds = time.perf_counter() - sent
        stderr.seek(0)
        text = stderr.read()
    assert paused, text[-3000:]
    return run.returncode, text, seconds


def _metrics(workdir) -> dict[int, dict]:
    lines = read_records(str(workdir))
    steps = [x["step"] for x in lines]
    assert len(steps) == len(set(steps)), f"steps logged twice: {steps}"
    return {x["step"]: x for x in lines}


def _checkpoints(workdir) -> list[str]:
    return sorted(os.listdir(os.path.join(workdir, "checkpoints")), key=lambda n: (len(n), n))


@pytest.mark.slow
def test_sigterm_and_sigkill_resume_bit_exactly(tmp_path, digits):
    straight = tmp_path / "straight"
    train_and_evaluate(_config(digits), str(straight))

    workdir = tmp_path / "interrupted"
    status, stderr, seconds = _signal_at(digits, workdir, 5, signal.SIGTERM)
    assert status == PREEMPTED_EXIT_STATUS, stderr[-3000:]
    # The step under way when the signal came (6) finishes and is saved; nothing after it.
    assert re.search(r"Stopped at step 6\b", stderr), stderr[-3000:]
    assert _checkpoints(workdir) == ["6"] and max(_metrics(workdir)) == 6
    print(f"SIGTERM during step 6: saved step 6, exited {seconds:.1f} s after the signal")

    # Killed during step 121: the newest checkpoint is the periodic one of step 100, or 50
    # if the kill came before 100's asynchronous write completed (both replay exactly).
    status, stderr, _ = _signal_at(digits, workdir, 120, signal.SIGKILL)
    assert status == -signal.SIGKILL, stderr[-3000:]
    run = subprocess.run(
        _command(digits, workdir), cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    resumed_from = int(re.search(r"Resumed from step (\d+)\.", run.stderr).group(1))
    assert resumed_from in (50, 100)

    jax.tree.map(np.testing.assert_array_equal, load_params(workdir), load_params(straight))
    resumed, reference = _metrics(workdir), _metrics(straight)
    assert sorted(resumed) == sorted(reference) == list(range(1, 151))
    assert [resumed[s]["train/loss"] for s in resumed] == [
        reference[s]["train/loss"] for s in resumed
    ]
    # TensorBoard (its own reader) shows every step once, the replayed ones included.
    events = EventAccumulator(str(workdir / "tensorboard"), size_guidance={"tensors": 0})  # All.
    events.Reload()
    assert [e.step for e in events.Tensors("train/loss")] == list(range(1, 151))


def test_stop_requests_stop_at_the_next_check_point_and_restore_the_handlers():
    # Python's own Ctrl-C handler underneath, whatever an earlier test's library installed.
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for signum in (signal.SIGTERM, signal.SIGINT):
            with StopRequests() as requests:
                assert not requests.reached()
                signal.raise_signal(signum)
                assert requests.reached() and requests.reached()  # Once stopped, stopped.
            assert {s: signal.getsignal(s) for s in before} == before
        # (A second signal exits the process at once: tests/test_fault_stop.py.)
    finally:
        signal.signal(signal.SIGINT, outer)


@pytest.mark.slow
def test_nonfinite_loss_stops_before_writing_a_bad_checkpoint(tmp_path, digits):
    # Adam's first steps move every weight by ~lr: at 1e30 the logits overflow a few steps in.
    config = small_local_config(digits, checkpoint_every=1, keep_checkpoints=1, eval_every=100)
    config.optim.lr = 1e30
    with pytest.raises(
        FloatingPointError, match=r"Step \d+: train/(loss|grad_norm) is (nan|inf)"
    ) as e:
        train_and_evaluate(config, str(tmp_path / "run"))
    bad_step = int(re.search(r"Step (\d+)", str(e.value)).group(1))
    # keep_checkpoints=1, a checkpoint every step: the one left is the step before the bad one.
    assert _checkpoints(tmp_path / "run") == [str(bad_step - 1)]
    assert f"newest checkpoint: step {bad_step - 1} is finite" in str(e.value)
    params = load_params(str(tmp_path / "run"))
    assert all(np.isfinite(p).all() for p in jax.tree.leaves(params))

    config.skip_nonfinite_updates = True
    config.log_every = 12
    train_and_evaluate(config, str(tmp_path / "skipping"))
    counted = _metrics(tmp_path / "skipping")[12][NONFINITE]
    assert 0 < counted <= 12 - (bad_step - 1)
    params = load_params(str(tmp_path / "skipping"))
    assert all(np.isfinite(p).all() for p in jax.tree.leaves(params))


@pytest.mark.slow
def test_skipped_update_leaves_the_state_unchanged(digits):
    config = small_local_config(digits, skip_nonfinite_updates=True)
    trainer = Trainer(
        config, make_mesh(config.mesh, config.dcn_mesh), num_classes=10, total_steps=12
    )
    state = trainer.init_state()
    # A NaN head bias makes this step's loss NaN, deterministically.
    poisoned = jax.tree_util.tree_map_with_path(
        lambda path, x: (
            x.at[0].set(jnp.nan) if "head" in jax.tree_util.keystr(path) and x.ndim == 1 else x
        ),
        state.params,
    )
    state = state.replace(params=jax.device_put(poisoned, trainer.param_shardings))
    before = jax.device_get(state)
    batch = {
        "image": np.zeros((32, 8, 8, 3), np.uint8),
        "label": np.arange(32, dtype=np.int32) % 10,
    }
    after, metrics = trainer.train_step(state, batch)
    assert int(metrics[NONFINITE]) == 1 and not np.isfinite(float(metrics["train/loss"]))
    assert int(after.step) == int(before.step) + 1
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(after.params), before.params)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(after.opt_state), before.opt_state)


def _truncate_array_files(step_dir):
    """Cuts every array data file (TensorStore's `d/` chunks) to half its size."""
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
        if os.path.basename(root) == "d":
            for name in files:
                path = os.path.join(root, name)
                os.truncate(path, os.path.getsize(path) // 2)


def _delete_state_metadata(step_dir):
    os.remove(os.path.join(step_dir, "state", "_METADATA"))


@pytest.mark.slow
def test_damaged_checkpoints_fall_back_then_refuse_a_fresh_start(tmp_path, digits, caplog):
    config = small_local_config(digits, eval_every=100)  # Checkpoints at 6 and 12.
    workdir = tmp_path / "run"
    train_and_evaluate(config, str(workdir))
    finished = load_params(str(workdir))
    _truncate_array_files(str(workdir / "checkpoints" / "12"))

    with caplog.at_level("INFO", logger="vit_jax"):
        train_and_evaluate(config, str(workdir))
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert re.search(rf"Cannot read checkpoint {workdir}/checkpoints/12 \(\w+: .+\)", messages)
    assert "Resumed from step 6." in messages
    names = _checkpoints(workdir)
    assert names[:2] == ["6", "12"] and re.fullmatch(r"12\.unreadable-\d{8}T\d{6}", names[2])
    # Steps 7-12 were trained again, exactly as before.
    jax.tree.map(np.testing.assert_array_equal, load_params(str(workdir)), finished)

    # Now nothing is readable: an error naming each checkpoint, and nothing touched.
    _delete_state_metadata(str(workdir / "checkpoints" / "12"))
    _truncate_array_files(str(workdir / "checkpoints" / "6"))
    with pytest.raises(UnreadableCheckpointsError) as e:
        train_and_evaluate(config, str(workdir))
    message = str(e.value)
    assert f"{workdir}/checkpoints/12: " in message and f"{workdir}/checkpoints/6: " in message
    assert "does not start afresh" in message and "new --workdir" in message
    assert _checkpoints(workdir) == names


@pytest.mark.slow
def test_a_step_the_device_memory_cannot_hold_ends_the_run_saying_what_to_change(tmp_path, digits):
    """A train step that does not fit in device memory (here the CPU's: an address-space
    limit, RLIMIT_AS, fails XLA's allocation with the RESOURCE_EXHAUSTED error a GPU or TPU
    gives) ends the run with status 1 and one line naming the settings that need less, the
    checkpoints intact. Before: a traceback ending in XLA's error."""
    workdir = tmp_path / "run"
    first = load_recipe("local.py", "steps=2,dataset=digits,batch=32")
    first.update(data_dir=str(digits / "tfds"), checkpoint_every=2)
    first.update_from_flattened_dict(NO_PROBE)
    train_and_evaluate(first, str(workdir))
    command = [
        sys.executable, "-m", "vit_jax.main",
        "--config", "configs/local.py:steps=4,dataset=digits,batch=32768",
        f"--config.data_dir={digits / 'tfds'}", "--workdir", str(workdir),
        "--config.fewshot.datasets={}", "--config.allow_config_change=total_steps,batch_size",
    ]  # fmt: skip
    # The step needs about 17 GiB of temporaries: beyond 12 GiB of address space, which
    # holds the rest of the run (Python, TensorFlow, JAX and the input pipeline).
    limited = run_limited(12 * 2**30, "RLIMIT_AS", command, devices=1)
    assert limited.returncode == 1, limited.stderr[-3000:]
    assert "Traceback" not in limited.stderr, limited.stderr[-3000:]
    (line,) = [x for x in limited.stderr.splitlines() if x.startswith("vit-train: ")]
    assert re.fullmatch(
        r"vit-train: A program of the run does not fit in device memory \(RESOURCE_EXHAUSTED: "
        r"Out of memory allocating \d+ bytes\)\. To fit: --config\.model\.remat_policy=full .*"
        r"`vit-bench compile --target TARGET --sweep` finds the fastest setting that fits\. "
        r"The checkpoints saved are intact \(newest: step 2\): .*",
        line,
    ), line
    assert _checkpoints(workdir) == ["2"]


@pytest.mark.slow
def test_a_checkpoint_the_disk_refuses_ends_the_run_in_one_line_and_loses_nothing(tmp_path, digits):
    """A save the file system refuses (here a file-size limit, RLIMIT_FSIZE, which fails a
    write with an OS error as a full disk does) ends the run in one line naming the step,
    the OS error and the checkpoint to resume from; the metrics written stay, and the same
    command resumes from that checkpoint once the cause is gone. Before: 1,200 lines of
    Orbax, asyncio and TensorStore tracebacks."""
    workdir = tmp_path / "run"
    first = _config(digits)
    first.update(total_steps=10, log_every=5, checkpoint_every=10)
    first.optim.warmup_steps = 2
    train_and_evaluate(first, str(workdir))
    files = [os.path.join(d, f) for d, _, fs in os.walk(workdir / "checkpoints" / "10") for f in fs]
    limit = max(map(os.path.getsize, files)) // 2  # Writes of the run's other files pass.
    command = [
        *_command(digits, workdir), "--config.total_steps=30", "--config.optim.warmup_steps=2",
        "--config.log_every=5", "--config.checkpoint_every=10",
        "--config.allow_config_change=total_steps",
    ]  # fmt: skip
    limited = run_limited(limit, "RLIMIT_FSIZE", command)
    assert limited.returncode == 1, limited.stderr[-3000:]
    assert "Traceback" not in limited.stderr, limited.stderr[-3000:]
    assert limited.stderr.splitlines()[-1] == (
        f"vit-train: The checkpoint of step 20 could not be saved in {workdir}/checkpoints: "
        "[Errno 27] File too large. The checkpoints saved before it are intact (newest: step "
        "10): fix the cause, then rerun the same command to resume from it."
    )
    assert [n for n in _checkpoints(workdir) if n.isdigit()] == ["10"]
    assert max(_metrics(workdir)) >= 20  # What was logged before the failure is kept.

    resumed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from step 10." in resumed.stderr
    assert sorted(_metrics(workdir)) == list(range(5, 31, 5))
    assert [n for n in _checkpoints(workdir) if n.isdigit()][-1] == "30"


@pytest.mark.slow
def test_a_run_resumed_on_half_the_devices_ends_where_it_would_have(tmp_path, digits):
    """Preempted on one slice, resumed on a smaller one: FSDP over 8 devices, then over 4.
    Orbax reads each saved shard into the new mesh's shardings; the global batch and the
    data stream are the same, so the run ends where the uninterrupted one ended, to the
    float rounding of reductions over other shards (up to 3e-6 in parameters here, where
    Adam's normalised steps magnify it in weights near zero; a shard read into the wrong
    place would be off by the weights' own size, 0.01 to 1)."""
    settings = SETTINGS | {
        "checkpoint_every": 6, "sharding_rules": "fsdp", "mesh.data": 1, "mesh.fsdp": -1,
    }  # fmt: skip

    def run(workdir, devices: int) -> subprocess.CompletedProcess:
        command = [
            sys.executable, "-m", "vit_jax.main",
            "--config", "configs/local.py:steps=12,dataset=digits,batch=32",
            f"--config.data_dir={digits / 'tfds'}", "--workdir", str(workdir),
            *config_flags(settings),
        ]  # fmt: skip
        result = subprocess.run(
            command, cwd=REPO, capture_output=True, text=True, timeout=300,
            env=simulated_devices_env(devices),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run(whole, devices=8)
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoints" / "12")  # As if stopped after step 6's save.
    assert "Resumed from step 6." in run(resumed, devices=4).stderr
    losses = {r["step"]: r["train/loss"] for r in read_records(str(whole))}
    again = {r["step"]: r["train/loss"] for r in read_records(str(resumed))}
    assert sorted(again) == sorted(losses) == list(range(1, 13))
    for step in range(7, 13):
        assert again[step] == pytest.approx(losses[step], rel=1e-5), step
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5),
        load_params(str(resumed)),
        load_params(str(whole)),
    )
