"""The training loop: what happens each step, wiring the input pipeline to `Trainer`.

config -> `Trainer` (mesh, rules, model and optimizer in their shardings) -> host-local
uint8 batches -> global arrays (the next one transferred while the current step runs)
-> jitted `train_step` (state donated) -> metrics (process 0) -> Orbax async checkpoints.
Restarting in the same workdir resumes from the latest checkpoint and sees exactly the
batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf

from vit_jax import checkpoint, data, parallel
from vit_jax.checkpoint.manager import Checkpointer
from vit_jax.insight.fewshot import FewShotEvaluator
from vit_jax.metrics import MetricWriter, log_progress
from vit_jax.trainer import Trainer, TrainState

log = logging.getLogger(__name__)


def evaluate(trainer: Trainer, params: Any) -> dict[str, float]:
    """Top-1 and loss over the whole eval split, each example counted exactly once."""
    totals = None
    batches = parallel.prefetch_to_devices(
        data.eval_batches(trainer.config), trainer.batch_sharding
    )
    for batch in batches:
        sums = trainer.eval_step(params, batch)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    return {
        "eval/loss": float(totals["loss"] / totals["count"]),
        "eval/top1": float(totals["correct"] / totals["count"]),
    }


def total_steps(config: ml_collections.ConfigDict, train_examples: int) -> int:
    """`config.total_steps`, or `config.num_epochs` worth of steps over the train split."""
    if config.get("total_steps"):
        return int(config.total_steps)
    if not config.get("num_epochs"):
        raise ValueError("Set config.total_steps or config.num_epochs.")
    return math.ceil(config.num_epochs * train_examples / config.batch_size)


def _initial_state(trainer: Trainer, checkpointer: Checkpointer, workdir: str) -> TrainState:
    """The latest checkpoint in `workdir` if there is one, else `model_init` or a fresh init."""
    config = trainer.config
    if checkpointer.latest_step() is not None:
        state = checkpointer.restore(trainer.abstract_state())
        log.info("Resumed from step %d in %s.", int(state.step), workdir)
        return state
    if config.model_init:
        pretrained = checkpoint.load_pretrained(
            config.model_init,
            init_params=trainer.abstract_state().params,
            reset_head=config.model_init_reset_head,
        )
        log.info("Initialised from %s.", config.model_init)
        return trainer.init_state(pretrained)
    return trainer.init_state()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains (or resumes) in `workdir` and returns the final eval metrics.

    On an exception or a preemption notice, the checkpoints already started are
    completed before returning, and the metrics files are closed.
    """
    info = data.get_dataset_info(config.dataset, config.data_dir)
    steps = total_steps(config, data.num_train_examples(config))
    trainer = Trainer(config, info.num_classes, steps)
    checkpointer = Checkpointer(workdir, keep=config.keep_checkpoints)
    metadata = {
        "class_names": list(info.class_names),
        "model": config.model.to_dict(),
        "num_classes": info.num_classes,
        "image_size": config.image_size,
        "dataset": config.dataset,
    }
    state = _initial_state(trainer, checkpointer, workdir)
    start = int(state.step)
    if jax.process_index() == 0:
        tf.io.gfile.makedirs(workdir)
        with tf.io.gfile.GFile(f"{workdir}/config.json", "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    writer = MetricWriter(workdir, resumed_step=start)
    try:
        return _train_loop(trainer, state, steps, checkpointer, writer, metadata)
    finally:
        checkpointer.wait()
        checkpointer.close()
        writer.close()


def _train_loop(
    trainer: Trainer,
    state: TrainState,
    steps: int,
    checkpointer: Checkpointer,
    writer: MetricWriter,
    metadata: dict,
) -> dict[str, float]:
    config, start = trainer.config, int(state.step)
    eval_metrics: dict[str, float] = {}
    fewshot = None
    if config.fewshot.datasets:
        fewshot = FewShotEvaluator(
            config, trainer.model, trainer.mesh, trainer.rules, trainer.param_shardings
        )
    batches = parallel.prefetch_to_devices(
        data.train_batches(config, start_step=start), trainer.batch_sharding
    )
    logged_at, logged_time, pending = start, time.perf_counter(), []
    input_wait = 0.0  # Seconds the loop spent waiting for data since the last log.
    for step in range(start + 1, steps + 1):
        wait_start = time.perf_counter()
        batch = next(batches)
        input_wait += time.perf_counter() - wait_start
        state, metrics = trainer.train_step(state, batch)
        pending.append(metrics)
        preempted = checkpointer.reached_preemption(step)
        if step % config.checkpoint_every == 0 or step == steps or preempted:
            checkpointer.save(step, state, metadata)
        if preempted:
            log.warning("Preemption notice at step %d: checkpoint saved, stopping.", step)
            break
        log_now = step % config.log_every == 0 or step == steps
        eval_now = step % config.eval_every == 0 or step == steps
        fewshot_now = fewshot is not None and (step % config.fewshot.every == 0 or step == steps)
        if not (log_now or eval_now or fewshot_now):
            continue
        summary = {}
        if log_now:
            fetched = jax.device_get(pending)
            summary = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
            summary["train/lr"] = float(fetched[-1]["train/lr"])
            elapsed = time.perf_counter() - logged_time
            step_time = elapsed / (step - logged_at)
            summary |= {
                "train/step_time_s": step_time,
                "train/img_per_s": config.batch_size / step_time,
                "train/input_wait_frac": input_wait / elapsed,
                "train/eta_s": step_time * (steps - step),
            }
            pending, input_wait = [], 0.0
        if eval_now:
            eval_metrics = evaluate(trainer, state.params)
            summary |= eval_metrics
        if fewshot_now:
            summary |= fewshot.evaluate(state.params)
        writer.write(step, summary)
        log_progress(step, steps, summary)
        if log_now:
            logged_at, logged_time = step, time.perf_counter()
    if not eval_metrics:  # Resumed a finished run (or preempted): report where it stands.
        eval_metrics = evaluate(trainer, state.params)
    return eval_metrics
