"""The main job end to end: configs, metrics files, checkpoints, exact resume, clear errors."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import REPO, TINY, config_flags, load_recipe, make_folder, small_local_config

from vit_jax.checkpoint import load_params
from vit_jax.config import parse_args
from vit_jax.data.pipeline import open_source
from vit_jax.metrics import read_records
from vit_jax.models import parse_variant
from vit_jax.parallel import make_mesh
from vit_jax.train import train_and_evaluate
from vit_jax.trainer import Trainer
from vit_jax.workdir import ConfigChangedError


def test_recipe_arguments():
    args = parse_args(
        "steps=10,dataset=digits,flag=true", {"steps": 1, "dataset": "x", "flag": False}
    )
    assert (args.steps, args.dataset, args.flag) == (10, "digits", True)
    with pytest.raises(ValueError, match="Bad recipe argument 'stepz=3'"):
        parse_args("stepz=3", {"steps": 1})
    with pytest.raises(ValueError, match="steps='ten': expected an integer"):
        parse_args("steps=ten", {"steps": 1})


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe, arg",
    [
        ("local.py", None),
        ("pretrain.py", "variant=B/16,dataset=imagenet21k"),
        ("pretrain.py", "variant=L/16,dataset=jft"),
        ("pretrain.py", "variant=S/16,dataset=imagenet2012"),
    ],
)
def test_recipes_build_a_trainer(recipe, arg):
    config = load_recipe(recipe, arg)
    # Construction resolves model, optimizer, mesh, rules and shardings (nothing compiles).
    mesh = make_mesh(config.mesh, config.dcn_mesh)
    trainer = Trainer(config, mesh, num_classes=10, total_steps=config.optim.warmup_steps + 100)
    variant = parse_variant(config.model.name)
    expected_width = config.model.get("width") or variant.width
    assert (trainer.model.num_classes, trainer.model.width) == (10, expected_width)
    assert float(trainer.schedule(config.optim.warmup_steps)) == pytest.approx(config.optim.lr)
    assert trainer.mesh.devices.size == jax.device_count()


def test_pretrain_recipe_matches_the_paper():
    i21k = load_recipe("pretrain.py", "variant=B/16,dataset=imagenet21k")
    assert (i21k.optim.name, i21k.optim.b1, i21k.optim.b2) == ("adamw", 0.9, 0.999)
    assert (i21k.batch_size, i21k.optim.warmup_steps, i21k.optim.grad_clip_norm) == (
        4096,
        10_000,
        1.0,
    )
    assert (i21k.num_epochs, i21k.optim.lr, i21k.optim.decay) == (90, 1e-3, "linear")
    assert (i21k.optim.weight_decay, i21k.model.dropout, i21k.image_size) == (0.03, 0.1, 224)
    assert i21k.model.representation_size == 768
    i1k = load_recipe("pretrain.py", "variant=B/16,dataset=imagenet2012")
    assert (i1k.num_epochs, i1k.optim.lr, i1k.optim.decay, i1k.optim.weight_decay) == (
        300,
        3e-3,
        "cosine",
        0.3,
    )
    jft = load_recipe("pretrain.py", "variant=H/14,dataset=jft")
    assert (jft.optim.lr, jft.optim.weight_decay, jft.model.dropout) == (3e-4, 0.1, 0.0)


@pytest.mark.slow
def test_main_job_writes_metrics_config_and_checkpoints(tmp_path):
    workdir = str(tmp_path / "run")
    config = small_local_config(tmp_path)
    config.fewshot.update(datasets={"digits": ("digits", "train", "test")}, shots=(1, 5))
    final = train_and_evaluate(config, workdir)
    assert 0.0 <= final["eval/top1"] <= 1.0
    lines = read_records(workdir)
    assert [line["step"] for line in lines] == [4, 6, 8, 12]
    # The few-shot probe runs at its interval (the recipe's 250) and at the last step.
    fewshot_keys = {"fewshot/digits_1shot", "fewshot/digits_5shot"}
    assert fewshot_keys <= set(lines[-1]) and not fewshot_keys & set(lines[0])
    assert all(0.0 <= lines[-1][k] <= 1.0 for k in fewshot_keys)
    train_keys = {"train/loss", "train/lr", "train/img_per_s", "train/grad_norm", "train/eta_s",
                  "train/input_wait_frac"}  # fmt: skip
    assert train_keys <= set(lines[0]) and "eval/top1" not in lines[0]
    assert all(0.0 <= line.get("train/input_wait_frac", 0.0) <= 1.0 for line in lines)
    assert {"eval/loss", "eval/top1"} <= set(lines[1]) and "train/loss" not in lines[1]
    assert train_keys | {"eval/loss", "eval/top1"} <= set(lines[-1])
    assert lines[-1]["eval/top1"] == pytest.approx(final["eval/top1"])
    config = json.load(open(os.path.join(workdir, "config.json")))
    assert config["dataset"] == "digits" and config["model"]["width"] == 32
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["12", "6"]
    assert any(
        f.startswith("events.out.tfevents")
        for f in os.listdir(os.path.join(workdir, "tensorboard"))
    )


@pytest.mark.slow
def test_restart_resumes_bit_exactly(tmp_path, monkeypatch):
    config = small_local_config(tmp_path, **{"eval_every": 100})
    config.pp.mixup_alpha = 0.2  # The data stream's randomness must replay too.
    config.model.dropout = 0.1
    straight = str(tmp_path / "straight")
    train_and_evaluate(config, straight)

    resumed = str(tmp_path / "resumed")
    original = Trainer.__init__

    def preempt_after_step_8(self, *args, **kwargs):
        original(self, *args, **kwargs)
        step_fn = self.train_step

        def train_step(state, batch):
            if int(jax.device_get(state.step)) == 8:
                raise KeyboardInterrupt("simulated preemption")
            return step_fn(state, batch)

        self.train_step = train_step

    monkeypatch.setattr(Trainer, "__init__", preempt_after_step_8)
    with pytest.raises(KeyboardInterrupt):
        train_and_evaluate(config, resumed)
    monkeypatch.setattr(Trainer, "__init__", original)
    assert sorted(os.listdir(os.path.join(resumed, "checkpoints"))) == ["6"]
    train_and_evaluate(config, resumed)  # Restarts from step 6.

    jax.tree.map(np.testing.assert_array_equal, load_params(resumed), load_params(straight))
    steps = [record["step"] for record in read_records(resumed)]
    assert steps == [4, 8, 12]  # The interrupted run's step-8 line was replaced, not duplicated.
    straight = {record["step"]: record for record in read_records(straight)}
    resumed = {record["step"]: record for record in read_records(resumed)}
    # Step 8's mean covers steps 5-8 in both: the checkpoint of step 6 carries steps 5 and 6.
    for step in (4, 8, 12):
        assert resumed[step]["train/loss"] == straight[step]["train/loss"]
    assert resumed[12]["eval/top1"] == straight[12]["eval/top1"]


@pytest.mark.slow
def test_restart_with_another_model_is_refused(tmp_path, caplog):
    workdir = str(tmp_path / "run")
    train_and_evaluate(small_local_config(tmp_path, total_steps=6), workdir)
    other = small_local_config(tmp_path, total_steps=6)
    other.model.width = 48
    with pytest.raises(ConfigChangedError, match="model.width: 32 -> 48"):
        train_and_evaluate(other, workdir)
    # Accepting the change deliberately still cannot load parameters of another shape.
    other.allow_config_change = "model.width"
    with pytest.raises(
        ValueError,
        match="(?s)different model.*embedding/bias: checkpoint \\(32,\\), this run \\(48,\\)",
    ):
        train_and_evaluate(other, workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["6"]  # Nothing lost.
    # Another optimizer: intact files, not "none of the checkpoints can be read".
    sgd = small_local_config(tmp_path, total_steps=6, allow_config_change="optim.name")
    sgd.optim.name = "sgd"
    with pytest.raises(ValueError, match=r"step 6 .* holds the state of another optimizer"):
        train_and_evaluate(sgd, workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["6"]
    # The refused changes are not recorded: the original run resumes as before.
    assert json.loads((tmp_path / "run" / "run.json").read_text())["changes"] == []
    train_and_evaluate(small_local_config(tmp_path, total_steps=6), workdir)
    # Fewer steps than the checkpoint's, accepted: evaluated as it is, and said so.
    fewer = small_local_config(tmp_path, total_steps=4, allow_config_change="total_steps")
    train_and_evaluate(fewer, workdir)
    assert "The checkpoint is at step 6, past the run's 4 steps: nothing to train" in caplog.text


@pytest.mark.slow
def test_a_resume_refuses_a_class_renamed_since_the_checkpoint(tmp_path):
    """Labels number the sorted class folders: renamed, `c` would become label 0."""
    make_folder(tmp_path / "data", {s: {"b": 4, "c": 4} for s in ("train", "test")})
    config = small_local_config(tmp_path, total_steps=4, dataset=f"folder:{tmp_path / 'data'}")
    config.update(train_split="train", eval_split="test", batch_size=8, eval_batch_size=8)
    config.fewshot.datasets = {}
    workdir = str(tmp_path / "run")
    train_and_evaluate(config, workdir)
    saved = {name: (tmp_path / "run" / name).read_text() for name in ("config.json", "run.json")}
    for split in ("train", "test"):
        os.rename(tmp_path / "data" / split / "c", tmp_path / "data" / split / "a")
    open_source.cache_clear()  # As a new process opens it.
    with pytest.raises(ValueError, match=r"other class names for the same labels \(label: saved "
                       r"-> now\): 0: 'b' -> 'a', 1: 'c' -> 'b'\. Labels number"):  # fmt: skip
        train_and_evaluate(config, workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4"]
    assert {name: (tmp_path / "run" / name).read_text() for name in saved} == saved


def test_missing_dataset_is_a_clear_error(tmp_path):
    config = small_local_config(tmp_path, dataset="imagenet2012")
    with pytest.raises(Exception, match="tfds build"):
        train_and_evaluate(config, str(tmp_path / "run"))


def test_command_line_rejects_unknown_keys(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "vit_jax.main",
            "--config",
            "configs/local.py",
            "--workdir",
            str(tmp_path),
            "--config.no_such_key=1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "no_such_key" in result.stderr


@pytest.mark.slow
def test_console_shows_our_lines_only(tmp_path):
    """No TensorFlow banner, no library warning: every line is one of vit_jax's own. JAX
    chooses its platform as on a user's machine (JAX_PLATFORMS unset): with the compile
    extra installed (as CI has it) and no accelerator, the CUDA plugin's traceback and
    libtpu's errors came before the first line."""
    data_dir = str(tmp_path / "tfds")
    open_source("digits", data_dir)  # tfds's preparation bars belong to the first use only.
    settings = TINY | {"data_dir": data_dir, "log_every": 2, "eval_every": 4, "fewshot.every": 4}
    result = subprocess.run(
        [
            sys.executable, "-m", "vit_jax.main",
            "--config", "configs/local.py:steps=4,dataset=digits,batch=32",
            "--workdir", str(tmp_path / "run"),
            *config_flags(settings),
        ],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    assert any("step 4/4" in line for line in lines)
    # Library log records get the same timestamp: what follows it must be one of ours.
    ours = (
        r"\d\d:\d\d:\d\d "
        r"(\d+ process\(es\), |Mesh \{|Compiled the train step |step \d+/4( \||$)|Final: )"
    )
    # Native libraries log before Python starts (the compile extra's CUDA plugin on a machine
    # with no GPU): not a Python log record, and not something vit_jax can silence.
    native = r"([IWEF]\d{4} |WARNING: All log messages before absl::InitializeLog)"
    strangers = [line for line in lines if not re.match(ours, line) and not re.match(native, line)]
    assert not strangers, strangers


@pytest.mark.slow
def test_fsdp_run_has_the_same_loss_curve_as_data_parallel(tmp_path):
    def curve(config, name):
        train_and_evaluate(config, str(tmp_path / name))
        return [record["train/loss"] for record in read_records(str(tmp_path / name))]

    dp = small_local_config(tmp_path, total_steps=8, log_every=1, eval_every=8)
    fsdp = small_local_config(tmp_path, total_steps=8, log_every=1, eval_every=8)
    fsdp.sharding_rules = "fsdp"
    fsdp.mesh.update(data=1, fsdp=-1)
    np.testing.assert_allclose(curve(fsdp, "fsdp"), curve(dp, "dp"), rtol=1e-4)


def test_progress_line_shows_the_input_wait_only_when_it_matters(caplog):
    from vit_jax.metrics import log_progress

    with caplog.at_level("INFO", logger="vit_jax.metrics"):
        log_progress(10, 100, {"train/loss": 1.0, "train/input_wait_frac": 0.42})
        log_progress(20, 100, {"train/loss": 1.0, "train/input_wait_frac": 0.02})
    busy, fed = caplog.messages
    assert "waiting for data 42%" in busy and "waiting" not in fed


def test_progress_line_shows_the_few_shot_probe(caplog):
    from vit_jax.metrics import log_progress

    probe = {"fewshot/digits_10shot": 0.78, "fewshot/digits_1shot": 0.5604}
    probe["fewshot/pets_5shot"] = 0.3
    with caplog.at_level("INFO", logger="vit_jax.metrics"):
        log_progress(250, 3000, probe)
    assert caplog.messages == [
        "step 250/3000 | few-shot digits 56.0/78.0% at 1/10 shots | few-shot pets 30.0% at 5 shots"
    ]
