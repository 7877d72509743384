"""The launch scripts' arguments as users type them: --dry-run in any position, relative paths
from any directory, printed commands that run the same thing when pasted into a shell, and
vit-train still replacing the script's shell in a real run. Stub commands stand for
vit-train, srun and scontrol."""

import os
import subprocess

import pytest
from helpers import REPO

WORKDIR = "/runs/it's b16"  # Quotes and spaces must survive printing and pasting.
RECIPE = "configs/local.py:steps=10"


# What each stub does after writing its pid, cwd and argv: srun runs its command and then
# reports a preemption, so that the SLURM script requeues.
STUBS = {"vit-train": "", "scontrol": "", "srun": '"$@"; exit 75'}


def stub_bin(tmp_path) -> dict[str, str]:
    """An environment whose vit-train, srun and scontrol are the stubs above."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, then in STUBS.items():
        path = bin_dir / name
        path.write_text(
            f'#!/usr/bin/env bash\n{{ echo "{name} $$"; echo "$PWD"; printf "%s\\n" "$@"; '
            f'echo; }} >> "$CALLS"\n{then}\n'
        )
        path.chmod(0o755)
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", CALLS=str(tmp_path / "calls"))


def calls(tmp_path) -> list[list[str]]:
    """Each stub call: [name, pid, cwd, *argv]."""
    path = tmp_path / "calls"
    if not path.exists():
        return []
    return [
        [*block.split("\n", 1)[0].split(), *block.split("\n")[1:]]
        for block in path.read_text().split("\n\n")
        if block
    ]


def launch(script: str, *args: str, cwd=REPO, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", os.path.join(REPO, "launch", script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("position", [0, 1, 2, 3])
def test_dry_run_is_read_in_any_position(position):
    args = [RECIPE, WORKDIR, "--config.seed=1"]
    args.insert(position, "--dry-run")
    printed = launch("gpu_single_node.sh", *args)
    assert printed.returncode == 0, printed.stderr
    first = launch("gpu_single_node.sh", "--dry-run", RECIPE, WORKDIR, "--config.seed=1")
    assert printed.stdout == first.stdout and "vit-train" in printed.stdout


@pytest.mark.parametrize("script", ["gpu_single_node.sh", "slurm.sbatch"])
def test_a_dry_run_missing_its_workdir_starts_nothing(tmp_path, script):
    env = stub_bin(tmp_path)
    result = launch(script, "configs/local.py", "--dry-run", env=env)
    assert result.returncode == 2 and "RECIPE and WORKDIR" in result.stderr
    result = launch(script, "configs/local.py", "--config.seed=1", env=env)
    assert result.returncode == 2 and "got the flag --config.seed=1" in result.stderr
    assert calls(tmp_path) == []


@pytest.mark.parametrize(
    ("script", "env"),
    [("gpu_single_node.sh", {}), ("slurm.sbatch", {"SLURM_JOB_ID": "42"})],
)
def test_printed_commands_run_what_the_script_runs(tmp_path, script, env):
    env = stub_bin(tmp_path) | env | {"VENV": str(tmp_path / "venv")}
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "activate").write_text("")
    real = launch(script, RECIPE, WORKDIR, "--config.seed=1", env=env)
    ran = [call[:1] + call[2:] for call in calls(tmp_path)]  # Pids differ between runs.
    (tmp_path / "calls").unlink()

    outside_slurm = {k: v for k, v in env.items() if k != "SLURM_JOB_ID"}  # Where users try it.
    printed = launch(script, "--dry-run", RECIPE, WORKDIR, "--config.seed=1", env=outside_slurm)
    assert printed.returncode == 0, printed.stderr
    assert "exec" not in printed.stdout.split()  # Pasted, it would end the user's shell.
    pasted = subprocess.run(
        ["bash", "-c", printed.stdout], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert [call[:1] + call[2:] for call in calls(tmp_path)] == ran, (real.stderr, pasted.stderr)
    train = next(call for call in ran if call[0] == "vit-train")
    assert train[2:6] == ["--config", RECIPE, "--workdir", WORKDIR]
    if script == "slurm.sbatch":
        assert ["scontrol", REPO, "requeue", "42"] in ran


def test_paths_are_relative_to_where_the_script_was_started(tmp_path):
    env = stub_bin(tmp_path)
    here = tmp_path / "here"
    here.mkdir()
    (here / "mine.py").write_text("")
    for recipe, expected in [
        ("configs/local.py:steps=10", f"{REPO}/configs/local.py:steps=10"),  # The repo's.
        ("mine.py:x=1", "mine.py:x=1"),  # The user's own, next to them.
    ]:
        result = launch("gpu_single_node.sh", recipe, "runs/b16", "--config.data_dir=tfds",
                        cwd=here, env=env)  # fmt: skip
        assert result.returncode == 0, result.stderr
        name, _, cwd, *argv = calls(tmp_path)[-1]
        assert (name, cwd) == ("vit-train", str(here))  # vit-train resolves the rest there.
        assert argv == ["--config", expected, "--workdir", "runs/b16", "--config.data_dir=tfds"]


def test_a_real_run_replaces_the_script_with_vit_train(tmp_path):
    process = subprocess.Popen(
        ["bash", "launch/gpu_single_node.sh", RECIPE, WORKDIR], cwd=REPO, env=stub_bin(tmp_path)
    )
    assert process.wait(timeout=60) == 0
    [(name, pid, *_)] = calls(tmp_path)
    assert (name, int(pid)) == ("vit-train", process.pid)  # So SIGTERM reaches it directly.


def test_tpu_refuses_a_relative_workdir():
    result = launch("tpu_vm.sh", RECIPE, "runs/b16", "--dry-run")
    assert result.returncode == 2 and "gs://" in result.stderr
