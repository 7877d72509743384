"""Train state, sharded train/eval steps and the training loop.

Wiring: config -> mesh + rules -> model and optimizer initialised directly into their
shardings -> host-local batches -> global arrays -> jitted `train_step` (state donated)
-> metrics (process 0) -> Orbax async checkpoints. Restarting in the same workdir
resumes from the latest checkpoint and sees exactly the batches an uninterrupted run
would have seen.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tensorflow as tf
from jax.sharding import NamedSharding, PartitionSpec

from vit_jax import checkpoint, data, parallel
from vit_jax.checkpoint.manager import Checkpointer
from vit_jax.insight.fewshot import FewShotEvaluator
from vit_jax.metrics import MetricWriter, log_progress
from vit_jax.models import VisionTransformer, create_model
from vit_jax.optim import frozen_paths, make_optimizer

log = logging.getLogger(__name__)

LOSSES = ("softmax_xent", "sigmoid_xent")


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> VisionTransformer:
    """`config.model.name` plus every other `config.model` field as an override."""
    overrides = dict(config.model)
    name = overrides.pop("name")
    overrides["dtype"] = jnp.dtype(overrides.get("dtype", "float32"))
    return create_model(name, num_classes=num_classes, **overrides)


def per_example_loss(
    logits: jax.Array, labels: jax.Array, kind: str, label_smoothing: float = 0.0
) -> jax.Array:
    """Cross-entropy against (possibly soft) one-hot labels; smoothing mixes in uniform."""
    if label_smoothing:
        labels = labels * (1.0 - label_smoothing) + label_smoothing / labels.shape[-1]
    if kind == "softmax_xent":
        return -jnp.sum(labels * jax.nn.log_softmax(logits), axis=-1)
    if kind == "sigmoid_xent":
        return jnp.sum(optax.sigmoid_binary_cross_entropy(logits, labels), axis=-1)
    raise ValueError(f"loss={kind!r}: choose one of {LOSSES}.")


def _microbatches(x: jax.Array, k: int) -> jax.Array:
    """[B, ...] -> [k, B/k, ...] taking every k-th row, so each device keeps its own rows."""
    return jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)


class Trainer:
    """Holds what the steps need: model, optimizer, mesh, rules and shardings."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        num_classes: int,
        total_steps: int,
        devices: list | None = None,
    ):
        self.config = config
        self.model = build_model(config, num_classes)
        self.tx, self.schedule = make_optimizer(config, total_steps)
        self.mesh = parallel.make_mesh(tuple(config.mesh.items()), devices)
        self.rules = parallel.resolve_rules(config.sharding_rules)
        self.batch_sharding = parallel.batch_sharding(self.mesh, self.rules)
        for size in (config.batch_size, config.eval_batch_size):
            parallel.batch_size_per_shard(size, self.mesh, self.rules)
        if config.batch_size % config.accum_steps:
            raise ValueError(
                f"batch_size {config.batch_size} must be divisible by accum_steps "
                f"({config.accum_steps}): every micro-batch has the same size."
            )
        parallel.batch_size_per_shard(
            config.batch_size // config.accum_steps, self.mesh, self.rules
        )

        image = jnp.zeros((1, config.image_size, config.image_size, 3))
        self._init_params = lambda rng: self.model.init(rng, image, train=False)["params"]
        boxed = jax.eval_shape(self._init_params, jax.random.key(0))
        self.param_shardings = parallel.logical_shardings(boxed, self.mesh, self.rules)
        frozen_paths(config, nn.unbox(boxed))  # Fails early on a pattern matching nothing.
        abstract_opt = jax.eval_shape(self.tx.init, nn.unbox(boxed))
        replicated = NamedSharding(self.mesh, PartitionSpec())
        self.state_shardings = TrainState(
            step=replicated,
            params=self.param_shardings,
            opt_state=parallel.optimizer_shardings(abstract_opt, self.param_shardings, self.mesh),
        )
        self._jit_train_step = jax.jit(
            self._train_step,
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, replicated),
            donate_argnums=0,
        )
        self._jit_eval_step = jax.jit(
            self._eval_step,
            in_shardings=(self.param_shardings, self.batch_sharding),
            out_shardings=replicated,
        )

    # ---- state ---------------------------------------------------------------------------

    def _state_from_params(self, params: Any) -> TrainState:
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params)
        )

    def _fresh_state(self, rng: jax.Array) -> TrainState:
        return self._state_from_params(nn.unbox(self._init_params(rng)))

    def init_state(self, pretrained: Any | None = None) -> TrainState:
        """Fresh state, created directly in its shardings (never whole on one device)."""
        if pretrained is None:
            fn = jax.jit(self._fresh_state, out_shardings=self.state_shardings)
            return fn(jax.random.key(self.config.seed))
        params = jax.device_put(pretrained, self.param_shardings)
        return jax.jit(self._state_from_params, out_shardings=self.state_shardings)(params)

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and shardings of the state, for restoring a checkpoint into."""
        shapes = jax.eval_shape(self._fresh_state, jax.random.key(0))
        return jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
            shapes,
            self.state_shardings,
        )

    # ---- steps ---------------------------------------------------------------------------

    def _loss(self, params, images, labels, rng):
        logits = self.model.apply({"params": params}, images, train=True, rngs={"dropout": rng})
        losses = per_example_loss(logits, labels, self.config.loss, self.config.label_smoothing)
        return jnp.mean(losses)

    def train_step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        """One optimizer step on a global batch; `state` is donated (do not reuse it)."""
        with parallel.activate(self.mesh, self.rules):
            return self._jit_train_step(state, batch)

    def compile_train_step(self, state: TrainState, batch: dict) -> jax.stages.Compiled:
        """The train step compiled ahead of time: its FLOPs and memory can be inspected."""
        with parallel.activate(self.mesh, self.rules):
            return self._jit_train_step.lower(state, batch).compile()

    def eval_step(self, params: Any, batch: dict) -> dict:
        """Masked loss and correct-prediction sums of a global eval batch."""
        with parallel.activate(self.mesh, self.rules):
            return self._jit_eval_step(params, batch)

    def _train_step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        # Dropout noise is a function of (seed, step): resumed runs replay it exactly.
        rng = jax.random.fold_in(jax.random.key(self.config.seed), state.step)
        grad_fn = jax.value_and_grad(self._loss)
        k = self.config.accum_steps
        if k == 1:
            loss, grads = grad_fn(state.params, batch["image"], batch["labels"], rng)
        else:
            micro = jax.tree.map(functools.partial(_microbatches, k=k), batch)

            def accumulate(carry, inputs):
                i, mb = inputs
                loss, grads = grad_fn(
                    state.params, mb["image"], mb["labels"], jax.random.fold_in(rng, i)
                )
                return jax.tree.map(jnp.add, carry, (loss, grads)), None

            zeros = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, state.params))
            (loss, grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(k), micro))
            loss, grads = jax.tree.map(lambda x: x / k, (loss, grads))
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        new_state = TrainState(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            opt_state=opt_state,
        )
        metrics = {
            "train/loss": loss,
            "train/grad_norm": optax.tree.norm(grads),
            "train/lr": self.schedule(state.step),
        }
        return new_state, metrics

    def _eval_step(self, params: Any, batch: dict) -> dict:
        logits = self.model.apply({"params": params}, batch["image"], train=False)
        losses = per_example_loss(logits, batch["labels"], self.config.loss)
        correct = jnp.argmax(logits, -1) == jnp.argmax(batch["labels"], -1)
        mask = batch["mask"]
        return {
            "loss": jnp.sum(losses * mask),
            "correct": jnp.sum(correct * mask),
            "count": jnp.sum(mask),
        }

    def evaluate(self, params: Any) -> dict[str, float]:
        """Top-1 and loss over the whole eval split, each example counted exactly once."""
        totals = None
        for batch in data.eval_batches(self.config):
            sums = self.eval_step(params, parallel.to_global(batch, self.batch_sharding))
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
    batches = data.train_batches(config, start_step=start)
    logged_at, logged_time, pending = start, time.perf_counter(), []
    for step in range(start + 1, steps + 1):
        batch = parallel.to_global(next(batches), trainer.batch_sharding)
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
            step_time = (time.perf_counter() - logged_time) / (step - logged_at)
            summary |= {
                "train/step_time_s": step_time,
                "train/img_per_s": config.batch_size / step_time,
                "train/eta_s": step_time * (steps - step),
            }
            pending = []
        if eval_now:
            eval_metrics = trainer.evaluate(state.params)
            summary |= eval_metrics
        if fewshot_now:
            summary |= fewshot.evaluate(state.params)
        writer.write(step, summary)
        log_progress(step, steps, summary)
        if log_now:
            logged_at, logged_time = step, time.perf_counter()
    if not eval_metrics:  # Resumed a finished run (or preempted): report where it stands.
        eval_metrics = trainer.evaluate(state.params)
    return eval_metrics
