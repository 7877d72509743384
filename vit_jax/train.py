"""The training loop: what happens each step, wiring the input pipeline to `Trainer`.

config -> `Trainer` (mesh, rules, model and optimizer in their shardings) -> host-local
uint8 batches -> global arrays (the next one transferred while the current step runs)
-> jitted `train_step` (state donated) -> metrics (process 0) -> Orbax async checkpoints.
Restarting in the same workdir resumes from the newest readable checkpoint and sees exactly
the batches an uninterrupted run would have seen (vit_jax/workdir.py: what a restart checks).
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

from vit_jax import checkpoint, data, parallel
from vit_jax.checkpoint.manager import Checkpointer
from vit_jax.config import check_intervals
from vit_jax.insight.fewshot import FewShotEvaluator
from vit_jax.metrics import MetricWriter, log_progress
from vit_jax.preemption import Preempted, StopRequests
from vit_jax.trainer import NONFINITE, Trainer, TrainState
from vit_jax.workdir import check_config, claim, repair_metrics, restore_newest_readable

log = logging.getLogger(__name__)

# Steps the host may dispatch before the oldest of them has finished on the devices: enough
# to keep an accelerator's queue full, few enough to bound what waits in it.
STEPS_AHEAD = 2


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


def _initial_state(trainer: Trainer, checkpointer: Checkpointer, pretrained: Any) -> TrainState:
    """The newest readable checkpoint if there is one, else `pretrained` (`model_init`'s
    parameters, or None) or a fresh init."""
    config, abstract = trainer.config, trainer.abstract_state()
    state = restore_newest_readable(checkpointer, abstract)
    if state is not None:
        log.info("Resumed from step %d.", int(state.step))
        return state
    if pretrained is not None:
        log.info("Initialised from %s.", config.model_init)
        return trainer.init_state(pretrained)
    return trainer.init_state()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains (or resumes) in `workdir` and returns the final eval metrics.

    Raises `Preempted` after saving a checkpoint when SIGTERM, SIGINT or a preemption
    notice arrives. On any exit the checkpoints already started are completed, the
    metrics files closed and the workdir's lock released.
    """
    check_intervals(config)
    # Stop requests count from the start, so a SIGTERM during start-up still ends in a
    # checkpoint and status 75 (after one step) rather than a kill a scheduler won't requeue.
    with StopRequests() as stop_requests:
        # Everything a config can get wrong is refused here, before the workdir is touched.
        if config.model_init:  # The model takes the checkpoint's architecture.
            weights = checkpoint.read_weights(config.model_init)
            config = config.copy_and_resolve_references()
            config.model.update(checkpoint.model_init_changes(config.model, weights))
        info = data.get_dataset_info(config.dataset, config.data_dir)
        steps = total_steps(config, data.num_train_examples(config))
        mesh = parallel.make_mesh(config.mesh, config.dcn_mesh)
        trainer = Trainer(config, mesh, info.num_classes, steps)
        pretrained = None
        if config.model_init:  # Read on a resume too: the price of refusing before claiming.
            pretrained = checkpoint.load_pretrained(
                weights,
                init_params=trainer.abstract_state().params,
                reset_head=config.model_init_reset_head,
            )
            del weights
        fewshot = None
        if config.fewshot.datasets:
            fewshot = FewShotEvaluator(
                config, trainer.model, trainer.mesh, trainer.rules, trainer.param_shardings
            )
        metadata = {
            "class_names": list(info.class_names),
            "model": config.model.to_dict(),
            "num_classes": info.num_classes,
            "image_size": config.image_size,
            "dataset": config.dataset,
        }
        with claim(workdir):
            checkpointer = Checkpointer(workdir, keep=config.keep_checkpoints)
            writer = None
            try:
                check_config(workdir, config, resuming=bool(checkpointer.steps()))
                state = _initial_state(trainer, checkpointer, pretrained)
                del pretrained  # Host copies: the state holds the parameters now.
                repair_metrics(workdir, int(state.step))
                writer = MetricWriter(workdir)
                return _train_loop(
                    trainer, fewshot, state, steps, checkpointer, writer, metadata, stop_requests
                )
            finally:
                checkpointer.wait()
                checkpointer.close()
                if writer is not None:
                    writer.close()


def _fetch_checked(
    pending: list[dict],
    first_step: int,
    config: ml_collections.ConfigDict,
    checkpointer: Checkpointer,
) -> list[dict]:
    """The window's per-step metrics on the host, after stopping at a non-finite step.

    Called before every checkpoint and log, the only places that wait for the device
    anyway, so a non-finite state is never saved and the last finite checkpoint can never
    be rotated out. With `skip_nonfinite_updates` such steps changed nothing: no stop.
    """
    fetched = jax.device_get(pending)
    if config.skip_nonfinite_updates:
        return fetched
    for step, m in enumerate(fetched, first_step):
        if m[NONFINITE]:
            name = "train/loss" if not np.isfinite(m["train/loss"]) else "train/grad_norm"
            latest = checkpointer.latest_step()
            kept = "none was written" if latest is None else f"step {latest} is finite"
            raise FloatingPointError(
                f"Step {step}: {name} is {m[name]}. Stopped before saving any later state "
                f"(newest checkpoint: {kept}). Lower optim.lr, check the data, or set "
                "--config.skip_nonfinite_updates=true to skip such updates (counted as "
                "train/nonfinite_updates)."
            )
    return fetched


def _summarize(metrics: list[dict]) -> dict[str, float]:
    """Means over the window of finite steps; the learning rate at its end; skips counted."""
    finite = [m for m in metrics if not m[NONFINITE]] or metrics
    summary = {k: float(np.mean([m[k] for m in finite])) for k in metrics[0]}
    summary["train/lr"] = float(metrics[-1]["train/lr"])
    summary[NONFINITE] = float(sum(m[NONFINITE] for m in metrics))
    return summary


def _train_loop(
    trainer: Trainer,
    fewshot: FewShotEvaluator | None,
    state: TrainState,
    steps: int,
    checkpointer: Checkpointer,
    writer: MetricWriter,
    metadata: dict,
    stop_requests: StopRequests,
) -> dict[str, float]:
    config, start = trainer.config, int(state.step)
    eval_metrics: dict[str, float] = {}
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
        # Back-pressure: the host stays at most STEPS_AHEAD steps ahead of the devices (a log
        # fetches the whole window, so the window's own steps are all that can be in flight).
        if len(pending) > STEPS_AHEAD:
            jax.block_until_ready(pending[-1 - STEPS_AHEAD])
        stop = stop_requests.reached(step)
        if step % config.checkpoint_every == 0 or step == steps or stop:
            pending = _fetch_checked(pending, logged_at + 1, config, checkpointer)
            checkpointer.save(step, state, metadata)
        log_now = step % config.log_every == 0 or step == steps
        eval_now = (step % config.eval_every == 0 or step == steps) and not stop
        fewshot_now = (
            fewshot is not None and (step % config.fewshot.every == 0 or step == steps) and not stop
        )
        summary = {}
        if log_now:
            summary = _summarize(_fetch_checked(pending, logged_at + 1, config, checkpointer))
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
        if summary:
            writer.write(step, summary)
            log_progress(step, steps, summary)
        if log_now:
            logged_at, logged_time = step, time.perf_counter()
        if stop:  # Evaluation skipped: the grace period is for the checkpoint.
            checkpointer.wait()
            raise Preempted(step)
    if not eval_metrics:  # Resumed a finished run: report where it stands.
        eval_metrics = evaluate(trainer, state.params)
    return eval_metrics
