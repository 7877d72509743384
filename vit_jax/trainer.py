"""Train state and the sharded, jitted train and eval steps: no input pipeline, no TensorFlow.

The model and its steps run wherever JAX runs (a GPU node without TensorFlow included):
`Trainer` owns the model, the optimizer, the mesh and rules and the shardings derived
from them. The loop that feeds it real data lives in `vit_jax.train`.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import NamedSharding, PartitionSpec

from vit_jax import parallel
from vit_jax.flops import matmul_flops
from vit_jax.models import build_model, scale_images
from vit_jax.optim import frozen_paths, make_optimizer

LOSSES = ("softmax_xent", "sigmoid_xent")


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


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
    raise _unknown_loss(kind)


def _unknown_loss(kind: str) -> ValueError:
    return ValueError(f"loss={kind!r}: choose one of {LOSSES}.")


def mixup(
    rng: jax.Array, images: jax.Array, targets: jax.Array, alpha: float
) -> tuple[jax.Array, jax.Array]:
    """Mixes the global batch with itself rolled by one, images and targets with one ratio.

    As in the mixup paper (Zhang et al., 2018): the ratio ~ Beta(alpha, alpha) is drawn once
    per batch from `rng`, so a step's mixing is a pure function of seed and step.
    """
    ratio = jax.random.beta(rng, alpha, alpha)

    def mix(x: jax.Array) -> jax.Array:
        return ratio * x + (1.0 - ratio) * jnp.roll(x, 1, axis=0)

    return mix(images), mix(targets)


def _microbatches(x: jax.Array, k: int) -> jax.Array:
    """[B, ...] -> [k, B/k, ...] taking every k-th row, so each device keeps its own rows."""
    return jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)


# Per-step metric: 1 when the step's loss or gradients were not finite (the loop stops
# there, or counts it when `config.skip_nonfinite_updates` kept the state unchanged).
NONFINITE = "train/nonfinite_updates"


def compiled_memory(compiled: jax.stages.Compiled) -> dict[str, int] | None:
    """Bytes per device of a compiled program, as its compiler reports them
    (`memory_analysis`): arguments, outputs, the outputs aliased to donated arguments,
    temporaries, and `total_bytes`, which counts a donated buffer once. None where the
    backend reports nothing."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
    return {
        "argument_bytes": m.argument_size_in_bytes,
        "output_bytes": m.output_size_in_bytes,
        "alias_bytes": m.alias_size_in_bytes,
        "temp_bytes": m.temp_size_in_bytes,
        "total_bytes": total + m.temp_size_in_bytes,
    }


# The settings that make a train step need less memory per device, as messages name them.
TRAIN_STEP_LEVERS = (
    "--config.model.remat_policy=full (or selective), --config.sharding_rules=fsdp, a larger "
    "--config.accum_steps or a smaller --config.batch_size, --config.optim.mu_dtype=bfloat16"
)


def device_memory_refusal(error: Exception) -> str | None:
    """The first line of `error` when it is XLA's RESOURCE_EXHAUSTED for device memory: the
    TPU compiler's "Ran out of memory on HBM", a failed allocation on a GPU ("Out of memory
    while trying to allocate", "Failed to allocate request for"), a TPU ("Error allocating
    device buffer") or the CPU ("Out of memory allocating"); None for any other error,
    gRPC's RESOURCE_EXHAUSTED for a message too large among them."""
    first = str(error).strip().partition("\n")[0]
    if "RESOURCE_EXHAUSTED" in first and re.search("memory|allocat", first, re.I):
        return first
    return None


class Trainer:
    """Holds what the steps need: model, optimizer, mesh, rules and shardings."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        mesh: jax.sharding.Mesh,
        num_classes: int,
        total_steps: int,
    ):
        """`mesh` from `parallel.make_mesh(config.mesh, config.dcn_mesh)`, or over the
        compile-only devices of a target (`vit_jax.bench.targets`).

        Raises:
          ValueError: a batch size the mesh's batch shards or `accum_steps` do not divide,
            `accum_steps` below 1, an unknown loss, label smoothing outside [0, 1), a
            negative mixup alpha, a `model` that `build_model` refuses for the mesh's
            platform (its dtype, cuDNN attention), or a mesh on which processes hold
            overlapping batch rows (`parallel.batch_share`).
        """
        self.config = config
        model = build_model(config.model, num_classes, parallel.platform(mesh))
        self.tx, self.schedule = make_optimizer(config, total_steps)
        self.mesh = mesh
        self.rules = parallel.resolve_rules(config.sharding_rules)
        self.batch_sharding = parallel.batch_sharding(self.mesh, self.rules)
        # (index, count): the share of each batch this process loads.
        self.batch_share = parallel.batch_share(self.batch_sharding)
        for field in ("batch_size", "eval_batch_size"):
            parallel.batch_size_per_shard(config[field], self.mesh, self.rules, field)
        if config.accum_steps < 1:
            raise ValueError(f"accum_steps={config.accum_steps} must be at least 1 (1: none).")
        if config.batch_size % config.accum_steps:
            raise ValueError(
                f"batch_size {config.batch_size} must be divisible by accum_steps "
                f"({config.accum_steps}): every micro-batch has the same size."
            )
        parallel.batch_size_per_shard(
            config.batch_size // config.accum_steps, self.mesh, self.rules, "batch_size/accum_steps"
        )
        if config.loss not in LOSSES:  # Before the first step traces it.
            raise _unknown_loss(config.loss)
        if not 0 <= config.label_smoothing < 1:
            raise ValueError(
                f"config.label_smoothing must be in [0, 1) (0 = off), got {config.label_smoothing}."
            )
        if config.pp.mixup_alpha < 0:
            raise ValueError(
                f"config.pp.mixup_alpha must be >= 0 (0 = off), got {config.pp.mixup_alpha}."
            )

        image = jnp.zeros((1, config.image_size, config.image_size, 3))
        # The flags the step's model is cloned with below create no parameter.
        self._init_params = lambda rng: model.init(rng, image, train=False)["params"]
        boxed = jax.eval_shape(self._init_params, jax.random.key(0))
        abstract_params = nn.unbox(boxed)
        self.param_shardings = parallel.logical_shardings(boxed, self.mesh, self.rules)
        self.gathered_shardings = parallel.gathered_shardings(
            boxed, self.param_shardings, self.batch_sharding
        )
        # Left to itself the TPU compiler needed more memory for FSDP's unrolled train step
        # than for data parallelism's (docs/fsdp-on-tpu.md). For FSDP on TPU each block, and
        # each attention and MLP layer in it, finishes its weight gradients before the
        # layers below start their backward pass (ordered backward) and the pooled features
        # are materialised (pooled barrier, as for every program on one slice); on one
        # slice the weights are also gathered where they are used, so each gradient is
        # reduced whole over ICI before each chip keeps its shard (across slices that
        # needed more; the compiler places the collectives there), and the MLP layers go
        # unordered (at the edge of HBM their order cost FSDP a fit that data parallelism
        # had: `ordered_mlp` in models/vit.py). Every GPU program keeps
        # the ordered backward; TPU data parallelism needed more with it, and across slices
        # with the pooled barrier. CPU programs (tests, local runs) go without: there it
        # saved nothing and moved the float32 rounding.
        platform = parallel.platform(mesh)
        tpu = platform == "tpu"
        one_slice = len(parallel.device_slices(mesh.devices.flat)) == 1
        fsdp_on_tpu = tpu and parallel.splits_over_batch(
            abstract_params, self.param_shardings, self.gathered_shardings
        )
        self.gathers_weights = fsdp_on_tpu and one_slice
        self.model = model.clone(
            ordered_backward=fsdp_on_tpu or platform == "gpu",
            ordered_mlp=not self.gathers_weights,
            pooled_barrier=fsdp_on_tpu or (tpu and one_slice),
        )
        frozen_paths(config, abstract_params)  # Fails early on a pattern matching nothing.
        abstract_opt = jax.eval_shape(self.tx.init, abstract_params)
        replicated = NamedSharding(self.mesh, PartitionSpec())
        self.state_shardings = TrainState(
            step=replicated,
            params=self.param_shardings,
            opt_state=parallel.optimizer_shardings(abstract_opt, self.param_shardings, self.mesh),
        )
        # Where the weights are gathered where used, an unrolled program gathers every weight
        # before its first layer; a scanned one gathers the blocks' weights in the loop, where
        # overlapping each gather with the layer before it is worth keeping
        # (parallel.UP_FRONT_GATHER_OPTIONS). The train and eval steps' `jax.jit` options.
        self.compiler_options = parallel.compiler_options(
            mesh, gathers_up_front=self.gathers_weights and not config.model.scan
        )
        self._jit_train_step = jax.jit(
            self._train_step,
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, replicated),
            donate_argnums=0,
            compiler_options=self.compiler_options,
        )
        self._jit_eval_step = jax.jit(
            self._eval_step,
            in_shardings=(self.param_shardings, self.batch_sharding),
            out_shardings=replicated,
            compiler_options=self.compiler_options,
        )

    # ---- state ---------------------------------------------------------------------------

    def _state_from_params(self, params: Any) -> TrainState:
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params)
        )

    def _fresh_params(self, rng: jax.Array) -> Any:
        return nn.unbox(self._init_params(rng))

    def _fresh_state(self, rng: jax.Array) -> TrainState:
        return self._state_from_params(self._fresh_params(rng))

    def init_params(self) -> Any:
        """Fresh parameters alone, created in their shardings (no optimizer state)."""
        fn = jax.jit(self._fresh_params, out_shardings=self.param_shardings)
        return fn(jax.random.key(self.config.seed))

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

    def _apply(self, params: Any, images: jax.Array, **kwargs) -> jax.Array:
        if self.gathers_weights:
            params = jax.lax.with_sharding_constraint(params, self.gathered_shardings)
        return self.model.apply({"params": params}, images, **kwargs)

    def _loss(self, params, images, labels, rng):
        logits = self._apply(params, images, train=True, rngs={"dropout": rng})
        losses = per_example_loss(logits, labels, self.config.loss, self.config.label_smoothing)
        return jnp.mean(losses)

    def train_step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        """One optimizer step on a global batch; `state` is donated (do not reuse it)."""
        with parallel.activate(self.mesh, self.rules):
            return self._jit_train_step(state, batch)

    def compile_train_step(
        self, state: TrainState, batch: dict, compiler_options: dict | None = None
    ) -> jax.stages.Compiled:
        """The train step compiled ahead of time: its FLOPs and memory can be inspected.

        `state` and `batch` may be abstract (`abstract_state()`, `ShapeDtypeStruct`s), on
        the mesh's devices or on a target's compile-only ones.
        """
        with parallel.activate(self.mesh, self.rules):
            return self._jit_train_step.lower(state, batch).compile(compiler_options)

    def lower_eval_step(self, params: Any, batch: dict) -> jax.stages.Lowered:
        """The eval step (the forward pass) lowered ahead of time: the program XLA compiles."""
        with parallel.activate(self.mesh, self.rules):
            return self._jit_eval_step.lower(params, batch)

    def compile_eval_step(
        self, params: Any, batch: dict, compiler_options: dict | None = None
    ) -> jax.stages.Compiled:
        """The eval step (the forward pass) compiled ahead of time."""
        return self.lower_eval_step(params, batch).compile(compiler_options)

    def train_step_flops(self, state: TrainState, batch: dict) -> int:
        """Matmul FLOPs of one train step on the global batch, recomputation included."""
        with parallel.activate(self.mesh, self.rules):
            return matmul_flops(self._train_step, state, batch)

    def model_flops(self, params: Any, batch_size: int, train: bool = True) -> int:
        """Model FLOPs of a step on a global batch of `batch_size` images: the forward
        pass's matmuls and convolutions, counted from its jaxpr, x3 for a train step (the
        backward pass is twice the forward). Remat's recomputation is not model work: MFU's
        numerator (Chowdhery et al., 2022, "PaLM", appendix B). By that convention it counts
        the patch embedding's input gradient, which no step computes, so a step without
        remat has fewer hardware FLOPs (`train_step_flops`). `params` may be abstract."""
        size = self.config.image_size
        images = jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32)
        with parallel.activate(self.mesh, self.rules):
            forward = matmul_flops(
                lambda p, x: self.model.apply({"params": p}, x, train=False), params, images
            )
        return 3 * forward if train else forward

    def eval_step(self, params: Any, batch: dict) -> dict:
        """Masked loss and correct-prediction sums of a global eval batch."""
        with parallel.activate(self.mesh, self.rules):
            return self._jit_eval_step(params, batch)

    def _step_key(self, step: jax.Array) -> jax.Array:
        return jax.random.fold_in(jax.random.key(self.config.seed), step)

    def _scaled_and_one_hot(self, batch: dict) -> tuple[jax.Array, jax.Array]:
        images = scale_images(batch["image"])
        return images, jax.nn.one_hot(batch["label"], self.model.num_classes)

    def prepare_batch(self, batch: dict, step: jax.Array) -> dict:
        """Host batch (uint8 images, integer labels) -> images in [-1, 1] and (mixed) targets.

        Runs inside the jitted step; mixup's ratio is a function of (seed, step) only.
        """
        images, targets = self._scaled_and_one_hot(batch)
        if self.config.pp.mixup_alpha > 0:
            mixup_rng = jax.random.fold_in(self._step_key(step), 1)
            images, targets = mixup(mixup_rng, images, targets, self.config.pp.mixup_alpha)
        return {"image": images, "labels": targets}

    def _train_step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        # Dropout and mixup noise are functions of (seed, step): resumed runs replay them.
        rng = jax.random.fold_in(self._step_key(state.step), 0)
        batch = self.prepare_batch(batch, state.step)
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
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)  # Not finite if any gradient is not.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if self.config.skip_nonfinite_updates:  # Keep the old state; the step still counts.
            params, opt_state = jax.tree.map(
                lambda new, old: jnp.where(finite, new, old),
                (params, opt_state),
                (state.params, state.opt_state),
            )
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
        metrics = {
            "train/loss": loss,
            "train/grad_norm": grad_norm,
            "train/lr": self.schedule(state.step),
            NONFINITE: jnp.logical_not(finite).astype(jnp.int32),
        }
        return new_state, metrics

    def _eval_step(self, params: Any, batch: dict) -> dict:
        images, targets = self._scaled_and_one_hot(batch)
        logits = self._apply(params, images, train=False)
        losses = per_example_loss(logits, targets, self.config.loss)
        correct = jnp.argmax(logits, -1) == batch["label"]
        mask = batch["mask"]
        return {
            "loss": jnp.sum(losses * mask),
            "correct": jnp.sum(correct * mask),
            "count": jnp.sum(mask),
        }
