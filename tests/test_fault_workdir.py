"""The workdir's contract, checked directly: one run per workdir, the same run on resume."""

import json
import os
import socket
import subprocess
import sys

import pytest
from helpers import small_local_config

from vit_jax.workdir import (
    LOCK_FILE,
    ConfigChangedError,
    WorkdirLockedError,
    WorkdirUnwritableError,
    _process_start,
    check_config,
    claim,
    record_config,
)


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_second_run_is_refused_and_named(tmp_path):
    with claim(str(tmp_path)):
        holder = json.loads((tmp_path / LOCK_FILE).read_text())
        assert holder["host"] == socket.gethostname() and holder["pid"] == os.getpid()
        assert holder["started"].endswith("+00:00")
        message = f"in use by process {os.getpid()} on {socket.gethostname()}, started"
        with pytest.raises(WorkdirLockedError, match=message):
            with claim(str(tmp_path)):
                pass
    assert not (tmp_path / LOCK_FILE).exists()  # Released at the end of the run.


@pytest.mark.parametrize(
    "where, reason",
    [("/proc/vit_jax_run", "No such file or directory"), ("a_file/run", "is not a directory")],
)
def test_a_workdir_that_cannot_be_created_is_named_with_the_file_systems_reason(
    tmp_path, where, reason
):
    """Before: TensorFlow's error in a traceback (a gs:// bucket that refuses this machine
    ends there the same way)."""
    (tmp_path / "a_file").write_text("")
    workdir = os.path.join(tmp_path, where)
    with pytest.raises(WorkdirUnwritableError) as refused:
        with claim(workdir):
            pass
    message = str(refused.value)
    assert message.startswith(f"Cannot create the workdir {workdir} (") and reason in message
    assert message.endswith(
        "check that it lies on a writable file system, or use another --workdir."
    )


def test_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path, caplog):
    stale = {"host": socket.gethostname(), "pid": _dead_pid(), "started": "2026-01-01T00:00:00"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(stale))
    with caplog.at_level("WARNING", logger="vit_jax"), claim(str(tmp_path)):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"process {stale['pid']} on {stale['host']}" in caplog.text
    assert "no longer running" in caplog.text


def test_lock_of_a_former_process_whose_pid_is_reused_is_taken_over(tmp_path):
    """A restarted container runs as the same pid as the try before it; any pid is reused.

    The lock records the holder's start time: a live process with the holder's pid but
    another start time, this one included, does not hold the lock.
    """
    stale = {"host": socket.gethostname(), "pid": os.getpid(), "started": "2026-01-01T00:00:00",
             "pid_start": "1"}  # fmt: skip
    (tmp_path / LOCK_FILE).write_text(json.dumps(stale))
    with claim(str(tmp_path)):  # A former process with this very pid wrote it.
        mine = json.loads((tmp_path / LOCK_FILE).read_text())
    assert mine["pid_start"] == _process_start(os.getpid()) != "1"

    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as other:
        try:
            alive = {**stale, "pid": other.pid, "pid_start": _process_start(other.pid)}
            (tmp_path / LOCK_FILE).write_text(json.dumps(alive))
            with pytest.raises(WorkdirLockedError, match=f"in use by process {other.pid}"):
                with claim(str(tmp_path)):
                    pass
            reused = {**alive, "pid_start": str(int(alive["pid_start"]) - 1)}
            (tmp_path / LOCK_FILE).write_text(json.dumps(reused))
            with claim(str(tmp_path)):
                assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
        finally:
            other.kill()


LAUNCHERS = {  # How each launcher numbers the tries of one run, as environment variables.
    "slurm requeue": ({"SLURM_JOB_ID": "42"}, "SLURM_RESTART_COUNT", "slurm-42"),
    "new tpu slice": ({"VIT_RUN_ID": "vit-0101"}, "VIT_RUN_ATTEMPT", "vit-0101"),
}


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_lock_of_an_earlier_try_of_a_relaunched_run_is_taken_over(tmp_path, monkeypatch, launcher):
    # The machine of try 0 died (no pid to check there); the launcher started try 1 elsewhere.
    env, attempt_variable, run_id = LAUNCHERS[launcher]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    earlier = {"host": "node-7", "pid": 1234, "started": "2026-01-01T00:00:00",
               "run": run_id, "attempt": 0}  # fmt: skip
    (tmp_path / LOCK_FILE).write_text(json.dumps(earlier))
    monkeypatch.setenv(attempt_variable, "0")  # Another process of the same try: refused.
    with pytest.raises(WorkdirLockedError, match="process 1234 on node-7"):
        with claim(str(tmp_path)):
            pass
    monkeypatch.setenv(attempt_variable, "1")
    with claim(str(tmp_path)):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["attempt"] == 1


def test_lock_held_on_another_host_is_respected(tmp_path):
    other = {"host": "another-host", "pid": _dead_pid(), "started": "2026-01-01T00:00:00"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(other))
    with pytest.raises(WorkdirLockedError, match=f"delete {tmp_path / LOCK_FILE}"):
        with claim(str(tmp_path)):
            pass
    assert json.loads((tmp_path / LOCK_FILE).read_text()) == other


def _record(workdir, config, resuming: bool) -> None:
    """What a run that restored its state does: check the config, then record it."""
    record_config(workdir, config, check_config(workdir, config, resuming))


def test_resume_refuses_trajectory_changes_and_lists_them(tmp_path):
    workdir = str(tmp_path)
    config = small_local_config(tmp_path)
    _record(workdir, config, resuming=False)
    saved = (tmp_path / "config.json").read_text()

    changed = small_local_config(tmp_path, batch_size=64, seed=3)
    changed.optim.name = "sgd"
    with pytest.raises(ConfigChangedError) as e:
        check_config(workdir, changed, resuming=True)
    for line in ("batch_size: 32 -> 64", "seed: 0 -> 3", "optim.name: 'adamw' -> 'sgd'"):
        assert line in str(e.value)
    assert "--config.allow_config_change=batch_size,optim.name,seed" in str(e.value)
    assert (tmp_path / "config.json").read_text() == saved  # Not overwritten by a refused run.

    # Bookkeeping changes freely.
    free = small_local_config(tmp_path, log_every=1, checkpoint_every=3, eval_batch_size=64)
    free.mesh.data, free.mesh.fsdp, free.sharding_rules = 2, -1, "fsdp"
    _record(workdir, free, resuming=True)


def test_deliberate_change_is_accepted_and_recorded(tmp_path):
    workdir = str(tmp_path)
    _record(workdir, small_local_config(tmp_path), resuming=False)
    changed = small_local_config(tmp_path, batch_size=64, allow_config_change="batch_size")
    _record(workdir, changed, resuming=True)
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["changes"][0]["fields"] == {"batch_size": [32, 64]}
    assert json.loads((tmp_path / "config.json").read_text())["batch_size"] == 64
    _record(workdir, small_local_config(tmp_path, batch_size=64), resuming=True)  # New normal.


@pytest.mark.parametrize("text", ["", "{garbage", "[1, 2]"])
def test_a_damaged_config_or_run_file_is_named(tmp_path, text):
    """A hand edit, or a file cut short by an older run: JSON's and flax's tracebacks."""
    config = small_local_config(tmp_path)
    _record(str(tmp_path), config, resuming=False)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "run.json"]  # No partial file left.
    for name in ("config.json", "run.json"):
        saved = (tmp_path / name).read_text()
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=rf"^{tmp_path / name} holds no JSON object \("):
            check_config(str(tmp_path), config, resuming=True)
        (tmp_path / name).write_text(saved)


def test_a_lock_file_of_another_shape_is_an_unknown_holder(tmp_path):
    (tmp_path / LOCK_FILE).write_text("[1]")
    with pytest.raises(WorkdirLockedError, match="in use by an unknown holder"):
        with claim(str(tmp_path)):
            pass


@pytest.mark.parametrize("field", ["process_count", "batch_shares"])
def test_the_processes_and_the_batch_shares_they_load_are_part_of_the_contract(tmp_path, field):
    """The train stream is a function of the share each process loads, of how many."""
    workdir = str(tmp_path)
    _record(workdir, small_local_config(tmp_path), resuming=False)
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["process_count"] == run["batch_shares"] == 1
    (tmp_path / "run.json").write_text(json.dumps(run | {field: 4}))
    with pytest.raises(ConfigChangedError, match=f"{field}: 4 -> 1"):
        check_config(workdir, small_local_config(tmp_path), resuming=True)
    del run[field]  # As an older run.json: not compared.
    (tmp_path / "run.json").write_text(json.dumps(run))
    _record(workdir, small_local_config(tmp_path), resuming=True)
