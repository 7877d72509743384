"""Stop requests with real processes and real signals, at every kind of periodic work.

From a stop request on, no new work starts: an evaluation or few-shot probe in progress is
abandoned, the last completed step is saved and `vit-train` exits 75, whatever holds the
run; during start-up it exits 75 too; nothing after the save holds the exit; a second
signal exits at once. Each run's evaluation is in progress for as long as no stop is
agreed on (tests/evaluator_support.py), so no outcome depends on timing.
"""

import os
import re
import signal
import subprocess
import sys

import pytest
from evaluator_support import EVALUATION_RUNNING
from helpers import REPO, TINY, config_flags, free_port, simulated_devices_env

from vit_jax import metrics
from vit_jax.preemption import PREEMPTED_EXIT_STATUS

TESTS = os.path.dirname(os.path.abspath(__file__))
RECIPE = "configs/local.py:steps=12,dataset=digits,batch=32"
SETTINGS = TINY | {
    "log_every": 1,
    "eval_every": 6,
    "checkpoint_every": 100,  # Only the stop (or the last step) saves.
    "fewshot.every": 6,
    "fewshot.shots": "(1,)",
    "transfer_guard": "disallow",
}
BLOCK_TRAIN_STREAM_TEARDOWN = (
    "import evaluator_support\nevaluator_support.block_train_stream_teardown()"
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """One prepared copy of the digits dataset for this file's runs."""
    return tmp_path_factory.mktemp("digits") / "tfds"


def _start(data_dir, workdir, evaluators, *flags, before_main="", env=None) -> subprocess.Popen:
    """`vit-train` in a new process, with `evaluators` ("module:factory" entries)."""
    settings = SETTINGS | {"evaluators": repr(tuple(evaluators)), "data_dir": data_dir}
    command = [
        sys.executable, "-c", f"{before_main}\nfrom vit_jax.main import main\nmain()",
        "--config", RECIPE, "--workdir", str(workdir),
        *config_flags(settings), *flags,
    ]  # fmt: skip
    env = dict(env or os.environ, PYTHONPATH=os.pathsep.join([REPO, TESTS]))
    return subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)


def _read_until(run: subprocess.Popen, done) -> list[str]:
    lines = []
    for line in run.stderr:
        lines.append(line)
        if done(line):
            return lines
    raise AssertionError("".join(lines[-50:]) + f"\nexited {run.wait()} before the line")


def _finish(run: subprocess.Popen, lines: list[str]) -> str:
    """Everything the run wrote, once it has exited (a hang fails after 10 minutes)."""
    lines.append(run.communicate(timeout=600)[1])
    return "".join(lines)


def _checkpoints(workdir) -> list[str]:
    path = os.path.join(workdir, "checkpoints")
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


@pytest.mark.slow
@pytest.mark.parametrize(
    "evaluator, signum",
    [
        ("endless_classification", signal.SIGTERM),
        ("endless_classification", signal.SIGINT),
        ("endless_fewshot", signal.SIGTERM),
    ],
)
def test_a_stop_abandons_the_evaluation_and_saves_its_step(tmp_path, data_dir, evaluator, signum):
    workdir = tmp_path / "run"
    run = _start(data_dir, workdir, [f"evaluator_support:{evaluator}"])  # Probes: the recipe's.
    lines = _read_until(run, lambda line: EVALUATION_RUNNING in line)  # At step 6.
    run.send_signal(signum)
    output = _finish(run, lines)
    assert run.returncode == PREEMPTED_EXIT_STATUS, output[-3000:]
    assert "Stopped at step 6" in output and "Abandoned" in output
    assert _checkpoints(workdir) == ["6"]  # The step the evaluation was of, not one after.
    records = metrics.read_records(str(workdir))
    assert [r["step"] for r in records] == list(range(1, 7))  # Written before the save.
    assert not any(k.startswith(("eval/", "fewshot/")) for r in records for k in r)


@pytest.mark.slow
def test_a_second_signal_exits_at_once(tmp_path, data_dir):
    # This evaluator never looks at stop requests: the first signal cannot end it.
    workdir = tmp_path / "run"
    run = _start(data_dir, workdir, ["evaluator_support:deaf"])
    lines = _read_until(run, lambda line: EVALUATION_RUNNING in line)
    run.send_signal(signal.SIGTERM)
    lines += _read_until(run, lambda line: "SIGTERM received: stopping" in line)
    run.send_signal(signal.SIGINT)
    output = _finish(run, lines)
    assert run.returncode == PREEMPTED_EXIT_STATUS, output[-3000:]
    assert "SIGINT received: exiting at once" in output
    assert _checkpoints(workdir) == []  # Nothing was saved: the user insisted.


def test_a_stop_during_start_up_exits_75(tmp_path, data_dir):
    workdir = tmp_path / "run"
    # PYTHONPROFILEIMPORTTIME reports each module once imported (indented by how deep an
    # import made it): JAX loads after the handler.
    run = _start(
        data_dir, workdir, ["classification"], env=dict(os.environ, PYTHONPROFILEIMPORTTIME="1")
    )
    lines = _read_until(run, lambda line: re.search(r"\|\s+jax$", line.rstrip()))
    run.send_signal(signal.SIGTERM)
    output = _finish(run, lines)
    assert run.returncode == PREEMPTED_EXIT_STATUS, output[-3000:]
    assert _checkpoints(workdir) == [] and "step 1/" not in output


@pytest.mark.slow
def test_a_blocked_input_teardown_never_holds_the_exit(tmp_path, data_dir):
    """Closing the train stream blocks forever here: a run that waited for it would hang.
    Nothing is lost by not waiting, so the run's output says nothing about it. (A stopped
    run past such a teardown: test_two_processes_abandon_the_evaluation_together.)"""
    workdir = tmp_path / "run"
    run = _start(data_dir, workdir, ["classification"], before_main=BLOCK_TRAIN_STREAM_TEARDOWN)
    output = _finish(run, [])
    assert run.returncode == 0, output[-3000:]
    assert _checkpoints(workdir) == ["12"]
    assert "input pipeline" not in output


@pytest.mark.slow
def test_a_run_that_fails_once_its_input_runs_exits_past_the_teardown_too(tmp_path, data_dir):
    """A run that fails with the train stream running (here the transfer guard stops an
    evaluator that reads a device value implicitly, at step 6) ends as a finished run does:
    past the stream's teardown (blocked here), not in the interpreter's exit, which stops
    tf.data's teardown midway and aborts (SIGABRT, "FATAL: exception not rethrown")."""
    run = _start(
        data_dir, tmp_path / "run", ["evaluator_support:implicit_transfer"],
        before_main=BLOCK_TRAIN_STREAM_TEARDOWN,
    )  # fmt: skip
    output = _finish(run, [])
    assert run.returncode == 1, output[-3000:]
    assert "Traceback" in output and "isallowed" in output and "transfer" in output


@pytest.mark.slow
def test_two_processes_abandon_the_evaluation_together(tmp_path, data_dir):
    """SIGTERM to process 1 only, during the evaluation: both abandon it at the same batch
    (or one would wait forever in the next collective), save step 6 and exit 75.

    The train stream's teardown is blocked: each process ends past it, and JAX's
    distributed shutdown still runs in both (a process that skipped it would hold the
    other's exit). A teardown that ends in time leaves through the same
    `preemption.exit_status_once_closed`, without its `os._exit`.
    """
    workdir = tmp_path / "run"
    port = free_port()
    runs = [
        _start(
            tmp_path / f"tfds{i}",  # Each process prepares its own copy.
            workdir,
            ["evaluator_support:endless_classification"],
            f"--coordinator_address=localhost:{port}",
            "--num_processes=2",
            f"--process_id={i}",
            before_main=BLOCK_TRAIN_STREAM_TEARDOWN,
            env=simulated_devices_env(4),
        )  # fmt: skip
        for i in range(2)
    ]
    lines = [_read_until(run, lambda line: EVALUATION_RUNNING in line) for run in runs]
    runs[1].send_signal(signal.SIGTERM)
    outputs = [_finish(run, text) for run, text in zip(runs, lines, strict=True)]
    assert [run.returncode for run in runs] == [PREEMPTED_EXIT_STATUS] * 2, outputs[1][-3000:]
    assert all("Stopped at step 6" in output for output in outputs)
    assert not any("input pipeline" in output for output in outputs)
    assert _checkpoints(workdir) == ["6"]
    records = metrics.read_records(str(workdir))
    assert not any(k.startswith("eval/") for r in records for k in r)
