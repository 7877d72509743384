"""launch/tpu_vm.sh across several slices: one queued resource of NUM_SLICES slices, the
same vit-train on every worker of every slice, and an optional fit check before any."""

import os
import shlex
import subprocess
import tomllib

from helpers import REPO
from packaging.requirements import Requirement

ENV = dict(
    TPU_NAME="vit", ZONE="us-east5-b", ACCELERATOR_TYPE="v5e-256",
    RUNTIME_VERSION="v2-alpha-tpuv5-lite", REPO="https://example.org/vit_jax.git",
)  # fmt: skip


def dry_run(**env) -> list[str]:
    command = ["bash", "launch/tpu_vm.sh", "configs/pretrain.py:variant=B/16", "gs://b/run",
               "--config.batch_size=4096", "--dry-run"]  # fmt: skip
    base = {k: v for k, v in os.environ.items() if k != "LIBTPU_INIT_ARGS"}
    result = subprocess.run(
        command, cwd=REPO, env=base | ENV | env, capture_output=True, text=True, check=True
    )
    return result.stdout.splitlines()


def test_multi_slice_creates_every_slice_and_runs_on_all_their_workers():
    lines = dry_run(NUM_SLICES="4")
    (create,) = [line for line in lines if "queued-resources create" in line]
    assert "--node-count 4 --node-prefix vit" in create and "--node-id" not in create
    train = [line for line in lines if "vit-train --config" in line]
    assert len(train) == 1 and "queued-resources ssh vit-queued" in train[0]
    assert "--node=all --worker=all" in train[0] and "--distributed" in train[0]
    (status,) = [line for line in lines if "vit_train_status" in line and "cat" in line]
    assert "--node=0 --worker=0" in status
    assert not any(line.startswith("vit-bench compile") for line in lines)


def test_one_slice_keeps_its_name_and_the_fit_check_comes_first():
    lines = dry_run(CHECK_FIT="1")
    assert lines[0] == (
        "vit-bench compile --target v5e-256 --slices 1 --config "
        "configs/pretrain.py:variant=B/16 --config.batch_size=4096"
    )
    (create,) = [line for line in lines if "queued-resources create" in line]
    assert "--node-id vit" in create
    assert any("tpu-vm ssh vit --zone us-east5-b --worker=all" in line for line in lines)


def test_the_fit_check_takes_the_recipes_flags_alone_and_finds_it_from_any_directory(tmp_path):
    """vit-bench rejects vit-train's own flags (exit 2: the launch would stop though the run
    fits). The check compiles here, so it reads the recipe from this repository wherever the
    script is started; the workers read it from their clones."""
    flags = ["--heartbeat_timeout=300", "--config.seed", "3", "--config.model.scan=true",
             "--process_id", "0"]  # fmt: skip
    result = subprocess.run(
        ["bash", os.path.join(REPO, "launch", "tpu_vm.sh"), "configs/pretrain.py:variant=B/16",
         "gs://b/run", *flags, "--dry-run"],
        cwd=tmp_path, env=os.environ | ENV | {"CHECK_FIT": "1"}, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert shlex.split(lines[0]) == [
        "vit-bench", "compile", "--target", "v5e-256", "--slices", "1", "--config",
        f"{REPO}/configs/pretrain.py:variant=B/16", "--config.seed", "3",
        "--config.model.scan=true",
    ]  # fmt: skip
    (train,) = [line for line in lines if "vit-train --config" in line]
    assert "vit-train --config configs/pretrain.py:variant=B/16 --workdir gs://b/run" in train
    assert "--heartbeat_timeout=300 --config.seed 3" in train


def test_tpu_compiler_flags_set_here_reach_vit_train_on_every_worker():
    flags = "--xla_tpu_enable_latency_hiding_scheduler=false --xla_x=1"
    (train,) = [line for line in dry_run(LIBTPU_INIT_ARGS=flags) if "vit-train --config" in line]
    assert f"'LIBTPU_INIT_ARGS={flags}'" in train
    (train,) = [line for line in dry_run() if "vit-train --config" in line]
    assert "LIBTPU_INIT_ARGS" not in train


def test_the_workers_install_the_libtpu_release_the_fit_check_compiles_with():
    """Compiler releases differ by gigabytes in what one program needs (docs/fsdp-on-tpu.md): the
    slice must run the libtpu that `vit-bench compile` planned with, not the newest."""
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    (pin,) = extras["tpu"]
    assert pin.startswith("jax[tpu]==")
    assert any(
        (r := Requirement(line)).name == "vit_jax" and r.extras == {"tpu"}
        for line in extras["compile"]
    )
    (install,) = [line for line in dry_run() if "pip install" in line]
    worker_command = shlex.split(install)[-1]
    assert worker_command.endswith("pip install -q -e '.[tpu]'"), worker_command
