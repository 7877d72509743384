"""A real two-process run on one machine: jax.distributed, per-process data, one checkpoint."""

import json
import os
import socket
import subprocess
import sys

import jax
import pytest
from test_main import REPO, load_recipe

from vit_jax.checkpoint import load_params
from vit_jax.train import evaluate
from vit_jax.trainer import Trainer

RECIPE = "local.py:steps=20,dataset=digits,batch=32"
OVERRIDES = {
    "image_size": 8,
    "model.name": "Ti/4",
    "model.width": 32,
    "model.depth": 1,
    "model.mlp_dim": 64,
    "model.num_heads": 2,
    "eval_batch_size": 64,
    "log_every": 10,
    "eval_every": 20,
    "checkpoint_every": 10,
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_and_evaluate_the_whole_split_once(tmp_path):
    workdir, port = str(tmp_path / "run"), _free_port()
    flags = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
    procs = []
    for i in range(2):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
        command = [
            sys.executable, "-m", "vit_jax.main", "--config", f"configs/{RECIPE}",
            f"--config.data_dir={tmp_path}/tfds{i}", "--workdir", workdir,
            "--coordinator_address", f"localhost:{port}", "--num_processes", "2",
            "--process_id", str(i), *flags,
        ]  # fmt: skip
        procs.append(
            subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
        )
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors[0][-3000:] + errors[1][-3000:]
    assert "step 20/20" in errors[0] and "step 20/20" not in errors[1]  # Process 0 reports.

    lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [x["step"] for x in lines] == [10, 20]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "20"]

    # The two processes' padded, masked eval shards add up to the whole split exactly once:
    # the same loss and top-1 as evaluating the saved parameters here, in one process.
    config = load_recipe(*RECIPE.split(":"))
    config.update_from_flattened_dict(OVERRIDES)
    config.data_dir = str(tmp_path / "tfds0")
    trainer = Trainer(config, num_classes=10, total_steps=20)
    params = jax.device_put(load_params(workdir), trainer.param_shardings)
    local = evaluate(trainer, params)
    assert local["eval/top1"] == pytest.approx(lines[-1]["eval/top1"], abs=1e-6)
    assert local["eval/loss"] == pytest.approx(lines[-1]["eval/loss"], rel=1e-5)
