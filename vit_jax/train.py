"""The training loop: what happens each step, wiring the input pipeline to `Trainer`.

config -> mesh -> `Trainer` (rules, model and optimizer in their shardings) -> host-local
uint8 batches -> global arrays (the next one transferred while the current step runs)
-> jitted `train_step` (state donated) -> periodic evaluators (vit_jax/evaluators) ->
metrics (process 0, written off this thread) -> Orbax async checkpoints.
Restarting in the same workdir resumes from the newest readable checkpoint and sees exactly
the batches an uninterrupted run would have seen (vit_jax/workdir.py: what a restart checks).
A stop request abandons whatever runs and saves the last completed step (vit_jax/preemption.py).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from vit_jax import checkpoint, data, parallel
from vit_jax.agreement import check_processes_agree, check_processes_read_the_same_data
from vit_jax.checkpoint.manager import Checkpointer
from vit_jax.chrono import Chrono
from vit_jax.config import check_run_fields
from vit_jax.evaluators import Evaluator, build_evaluators
from vit_jax.metrics import MetricWriter, log_progress
from vit_jax.models import build_model
from vit_jax.peaks import peak_tflops
from vit_jax.preemption import Preempted, StopRequested, StopRequests, close_in_background
from vit_jax.processes import failures_told
from vit_jax.profiling import ProfileWindow
from vit_jax.trainer import (
    NONFINITE,
    TRAIN_STEP_LEVERS,
    Trainer,
    TrainState,
    compiled_memory,
    device_memory_refusal,
)
from vit_jax.workdir import (
    check_config,
    claim,
    record_config,
    restore_newest_readable,
    resumed_model,
    use_compilation_cache,
)

log = logging.getLogger(__name__)

# Checkpoint metadata: the per-step train metrics since the last log, so that the first log
# after a resume from this checkpoint averages the same steps as an uninterrupted run's.
UNLOGGED = "unlogged_steps"


class OutOfDeviceMemoryError(RuntimeError):
    """A program of the run does not fit in device memory; the message says what to change."""


def out_of_device_memory(error: Exception, saved: list[int]) -> OutOfDeviceMemoryError:
    """`error`, XLA's RESOURCE_EXHAUSTED for device memory (`device_memory_refusal` tells
    it), as an `OutOfDeviceMemoryError` naming the settings that need less memory and the
    newest of the `saved` checkpoint steps. XLA's report of the largest buffers, when it
    gives one, is logged."""
    first = device_memory_refusal(error)
    if report := str(error).strip().partition("\n")[2].strip():
        log.warning("XLA's report:\n%s", report)
    kept = (
        f"The checkpoints saved are intact (newest: step {saved[-1]}): remat_policy, "
        "sharding_rules, mesh and eval_batch_size may change when it resumes, other fields "
        "with --config.allow_config_change."
        if saved
        else "No checkpoint of this run was saved yet."
    )
    return OutOfDeviceMemoryError(
        f"A program of the run does not fit in device memory ({first.rstrip('.')}). To fit: "
        f"{TRAIN_STEP_LEVERS} (for an evaluation, a smaller --config.eval_batch_size); before "
        "a launch, `vit-bench compile --target TARGET --sweep` finds the fastest setting that "
        f"fits. {kept}"
    )


def total_steps(config: ml_collections.ConfigDict, train_examples: int) -> int:
    """`config.total_steps`, or `config.num_epochs` worth of steps over the train split."""
    if config.get("total_steps"):
        return int(config.total_steps)
    if not config.get("num_epochs"):
        raise ValueError("Set config.total_steps or config.num_epochs.")
    return math.ceil(config.num_epochs * train_examples / config.batch_size)


def _initial_state(
    trainer: Trainer, checkpointer: Checkpointer, pretrained: Any, class_names: list[str]
) -> TrainState:
    """The newest readable checkpoint if there is one, else `pretrained` (`model_init`'s
    parameters, or None) or a fresh init.

    Raises:
      ValueError: the checkpoint was trained on other `class_names` (labels are indices into
        them: a class folder renamed since would train its images under another label).
    """
    config, abstract = trainer.config, trainer.abstract_state()
    state = restore_newest_readable(checkpointer, abstract)
    if state is not None:
        step = int(state.step)
        saved = checkpointer.restore_metadata(step).get("class_names", class_names)
        if list(saved) != list(class_names):
            changed = [
                f"{i}: {a!r} -> {b!r}"
                for i, (a, b) in enumerate(zip(saved, class_names, strict=False))
                if a != b
            ]
            raise ValueError(
                f"The checkpoint at step {step} was trained with other class names for the "
                f"same labels (label: saved -> now): {', '.join(changed[:10])}. Labels number "
                "the sorted class names, so resuming would train these classes under other "
                "labels. Restore the class names (folder names), or use a new --workdir."
            )
        log.info("Resumed from step %d.", step)
        return state
    if pretrained is not None:
        log.info("Initialised from %s.", config.model_init)
        return trainer.init_state(pretrained)
    if config.model_init:  # Not read, as the workdir held checkpoints, gone since the start.
        raise FileNotFoundError(
            f"The checkpoints of this workdir are gone since the run started, and "
            f"model_init ({config.model_init}) was not read: start the run again."
        )
    return trainer.init_state()


def _with_model_init(
    config: ml_collections.ConfigDict, workdir: str
) -> tuple[ml_collections.ConfigDict, checkpoint.PretrainedWeights | None]:
    """A copy of `config` whose model has the architecture `config.model_init` fixes, and
    the weights read from it.

    A resume reads no weights (None) and takes the architecture its workdir saved: its
    checkpoints hold the state, or the run stops over them (`restore_newest_readable`).
    So a restarted pod job does not read a pretrained file of hundreds of MB to GBs on
    every host again, and resumes when that file is gone (a preempted VM's local disk).

    Raises:
      FileNotFoundError: nothing at model_init, and no checkpoint in `workdir` to resume.
      ValueError: a model_init file in no layout `checkpoint.read_weights` reads.
    """
    config = config.copy_and_resolve_references()
    saved = resumed_model(workdir)
    if saved is not None:
        log.info(
            "Resuming %s from its checkpoints, with the architecture it saved: model_init "
            "(%s) is not read again.",
            workdir,
            config.model_init,
        )
        architecture = set(checkpoint.ARCHITECTURE_FIELDS) & saved.keys() & set(config.model.keys())
        config.model.update({key: saved[key] for key in architecture})
        return config, None
    weights = checkpoint.read_weights(config.model_init)
    config.model.update(checkpoint.model_init_changes(config.model, weights))
    return config, weights


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains (or resumes) in `workdir` and returns the evaluators' metrics at the last step.

    Raises `Preempted` after saving the last completed step when SIGTERM, SIGINT or a
    preemption notice arrives (an evaluation under way is abandoned), and
    `OutOfDeviceMemoryError` when a program does not fit in device memory. On any exit the
    checkpoints already started are completed, the metrics written and the workdir's lock
    released; the input pipelines are closed in the background, never holding the exit.
    """
    # Stop requests count from the start: one during start-up ends the run with status 75
    # before its first step. An error on one process ends the others' start-up too.
    with StopRequests() as stop_requests, failures_told():
        # Everything a config can get wrong is refused here, before the workdir is touched.
        check_run_fields(config)
        root = data.folder_root(config.dataset)
        if root is not None and f"{workdir.rstrip('/')}/".startswith(f"{root}/"):
            raise ValueError(
                f"The workdir {workdir} is inside the image folder {root}: its files would "
                "be listed as a split of the dataset at the next start. Use a workdir "
                "outside it."
            )
        weights = None
        if config.model_init:  # The model takes the checkpoint's architecture.
            config, weights = _with_model_init(config, workdir)
        check_processes_agree(config, weights)
        # Before the data is opened (a folder's first opening writes its manifest).
        build_model(config.model, num_classes=1).check_image_size(config.image_size)
        info = data.get_dataset_info(config.dataset, config.data_dir)
        check_processes_read_the_same_data(config.dataset, info)
        steps = total_steps(config, data.num_train_examples(config))
        mesh = parallel.make_mesh(config.mesh, config.dcn_mesh)
        trainer = Trainer(config, mesh, info.num_classes, steps)
        log.info(
            "Mesh %s over %d slice(s) or node(s); the processes load each batch in %d share(s).",
            dict(mesh.shape),
            len(parallel.device_slices(mesh.devices.flat)),
            trainer.batch_share[1],
        )
        pretrained = None
        if weights is not None:  # A first start: read before the workdir is claimed.
            pretrained = checkpoint.load_pretrained(
                weights,
                init_params=trainer.abstract_state().params,
                reset_head=config.model_init_reset_head,
            )
            del weights
        evaluators = build_evaluators(config, trainer)
        profile = ProfileWindow.from_config(config.profile, workdir)
        metadata = {
            "class_names": list(info.class_names),
            "model": config.model.to_dict(),
            "num_classes": info.num_classes,
            "image_size": config.image_size,
            "dataset": config.dataset,
        }
        with claim(workdir):
            use_compilation_cache(config, workdir)
            checkpointer = Checkpointer(workdir, keep=config.keep_checkpoints)
            writer = None
            try:
                shares = trainer.batch_share[1]
                resuming = bool(checkpointer.steps())
                accepted = check_config(workdir, config, resuming, batch_shares=shares)
                state = _initial_state(trainer, checkpointer, pretrained, metadata["class_names"])
                record_config(workdir, config, accepted, batch_shares=shares)
                del pretrained  # Host copies: the state holds the parameters now.
                writer = MetricWriter(workdir, resumed_step=int(jax.device_get(state.step)))
                # The loop reads from the host only where it means to (jax.device_get).
                with jax.transfer_guard(config.transfer_guard):
                    return _train_loop(
                        trainer,
                        evaluators,
                        state,
                        steps,
                        checkpointer,
                        writer,
                        metadata,
                        stop_requests,
                        profile,
                    )
            except jax.errors.JaxRuntimeError as e:
                if device_memory_refusal(e) is None:
                    raise
                checkpointer.wait()  # A save under way is among the intact ones once done.
                raise out_of_device_memory(e, checkpointer.steps()) from e
            finally:
                checkpointer.wait()
                checkpointer.close()
                if writer is not None:
                    writer.close()


def _compile_train_step(trainer: Trainer, state: TrainState, batch: dict) -> None:
    """Compiles the train step before its first call (the call then reuses the program) and
    logs what the compiler says it needs per device: the figure `vit-bench compile`
    predicts, now for the devices the run has."""
    start = time.perf_counter()
    memory = compiled_memory(trainer.compile_train_step(state, batch))
    seconds = time.perf_counter() - start
    if memory is None:
        log.info("Compiled the train step in %.1f s.", seconds)
        return
    gib = 1024**3
    limit = (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")
    log.info(
        "Compiled the train step in %.1f s: %.2f GiB per device%s (arguments %.2f GiB, "
        "temporaries %.2f GiB).",
        seconds,
        memory["total_bytes"] / gib,
        f" of {limit / gib:.2f} GiB" if limit else "",
        memory["argument_bytes"] / gib,
        memory["temp_bytes"] / gib,
    )


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
    """Means over the window of finite steps; the learning rate at its end; skips counted.

    Summed in float64 whether a step's metrics are the device's float32 values or the
    Python floats a checkpoint carried, so a resumed run logs the very same means.
    """
    finite = [m for m in metrics if not m[NONFINITE]] or metrics
    summary = {k: float(np.mean([m[k] for m in finite], dtype=np.float64)) for k in metrics[0]}
    summary["train/lr"] = float(metrics[-1]["train/lr"])
    summary[NONFINITE] = float(sum(m[NONFINITE] for m in metrics))
    return summary


def _evaluate(
    evaluators: list[Evaluator], params, chrono: Chrono, stop_requests: StopRequests
) -> dict[str, float] | None:
    """The evaluators' metrics, each timed as `time/<name>_s`; None when a stop abandoned one."""
    metrics = {}
    for evaluator in evaluators:
        try:
            with chrono.paused(evaluator.name):
                metrics |= evaluator.run(params, stop_requests)
        except StopRequested:
            log.warning("Abandoned %s: a stop was requested.", evaluator.name)
            return None
    return metrics


def _train_loop(
    trainer: Trainer,
    evaluators: list[Evaluator],
    state: TrainState,
    steps: int,
    checkpointer: Checkpointer,
    writer: MetricWriter,
    metadata: dict,
    stop_requests: StopRequests,
    profile: ProfileWindow,
) -> dict[str, float]:
    config, start = trainer.config, int(jax.device_get(state.step))
    chrono = Chrono(
        steps,
        config.batch_size,
        trainer.model_flops(state.params, config.batch_size) / jax.device_count(),
        peak_tflops(jax.devices()[0].device_kind, str(config.model.dtype)),
    )
    final: dict[str, float] = {}
    if stop_requests.reached():  # Requested during start-up: nothing new to save.
        raise Preempted(start)
    share_index, share_count = trainer.batch_share
    batches = parallel.prefetch_to_devices(
        data.train_batches(
            config, start_step=start, share_index=share_index, share_count=share_count
        ),
        trainer.batch_sharding,
    )
    pending = checkpointer.restore_metadata(start).get(UNLOGGED, []) if start else []
    logged_at = start - len(pending)
    dispatched = parallel.DispatchWindow()
    chrono.start(start)
    try:
        for step in range(start + 1, steps + 1):
            with profile.step(step):
                with chrono.input_wait():
                    batch = next(batches)
                if step == start + 1:
                    with chrono.paused("compile", once=True):
                        _compile_train_step(trainer, state, batch)
                state, metrics = trainer.train_step(state, batch)
            profile.finish(step, metrics)
            pending.append(metrics)
            dispatched.add(metrics)
            stop = stop_requests.reached()
            last = step == steps
            summary = {}
            due = [e for e in evaluators if step % e.every == 0 or last]
            if due and not stop:
                # Periodic work starts once the step is done: its time is not training time.
                pending = _fetch_checked(pending, logged_at + 1, config, checkpointer)
                results = _evaluate(due, state.params, chrono, stop_requests)
                stop = results is None
                summary = results or {}
                final = summary if last else final
            if step % config.log_every == 0 or last:
                window = _fetch_checked(pending, logged_at + 1, config, checkpointer)
                summary = _summarize(window) | chrono.report(step) | summary
                logged_at, pending = step, []
            if summary:
                writer.write(step, summary)
                log_progress(step, steps, summary)
            if step % config.checkpoint_every == 0 or last or stop:
                pending = _fetch_checked(pending, logged_at + 1, config, checkpointer)
                with chrono.paused("checkpoint"):
                    # What is logged up to this step is written before the checkpoint that
                    # makes it final (a resume from it replays only the steps after it).
                    writer.flush()
                    unlogged = [{k: float(v) for k, v in m.items()} for m in pending]
                    checkpointer.save(step, state, metadata | {UNLOGGED: unlogged})
            if stop:
                checkpointer.wait()
                raise Preempted(step)
    finally:
        profile.close()
        close_in_background(batches)
    if not final:  # Resumed a finished run: report where it stands.
        if start > steps:  # total_steps lowered since (an allowed change).
            log.warning(
                "The checkpoint is at step %d, past the run's %d steps: nothing to train, "
                "its state is evaluated as it is.",
                start,
                steps,
            )
        final = _evaluate(evaluators, state.params, chrono, stop_requests)
        if final is None:
            raise Preempted(steps)
    return final
