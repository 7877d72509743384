"""The optax chain: clipping, optimizer, warmup + decay, weight decay on kernels, frozen params.

Reads `config.optim` (see `configs/`):
  name            "adam" (L2 added to gradients), "adamw" (decoupled decay) or "sgd" (momentum)
  lr, warmup_steps, decay ("cosine" | "linear" | "constant"; both decays reach 0 at the end)
  b1, b2          Adam moments; momentum, nesterov for SGD
  mu_dtype        dtype of Adam's first moment or SGD's momentum ("bfloat16" halves that
                  state, as big_vision runs Adam and the original ViT code SGD); None: float32
  weight_decay    applied to kernels only (never biases, norms, embeddings, tokens)
  grad_clip_norm  global-norm clipping (0 = off)
  frozen          regex over "/"-joined parameter paths: matching parameters never change
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

DECAYS = ("cosine", "linear", "constant")
OPTIMIZERS = ("adam", "adamw", "sgd")
MU_DTYPES = ("bfloat16", "float32")


def make_schedule(lr: float, total_steps: int, warmup_steps: int, decay: str) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then `decay` over the remaining steps."""
    if decay not in DECAYS:
        raise ValueError(f"optim.decay={decay!r}: choose one of {DECAYS}.")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(
            f"optim.warmup_steps={warmup_steps} must be >= 0 and below the {total_steps} total "
            "training steps; shorten the warmup or train longer."
        )
    remaining = total_steps - warmup_steps
    main = {
        "cosine": optax.cosine_decay_schedule(lr, remaining),
        "linear": optax.linear_schedule(lr, 0.0, remaining),
        "constant": optax.constant_schedule(lr),
    }[decay]
    if not warmup_steps:
        return main
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup_steps), main], [warmup_steps]
    )


def _path(path: tuple) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _kernels(params: Any) -> Any:
    return jax.tree_util.tree_map_with_path(lambda p, _: _path(p).endswith("kernel"), params)


def make_optimizer(
    config: ml_collections.ConfigDict, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Returns the full gradient transformation and its learning-rate schedule."""
    opt = config.optim
    if opt.name not in OPTIMIZERS:
        raise ValueError(f"optim.name={opt.name!r}: choose one of {OPTIMIZERS}.")
    for field in ("lr", "weight_decay", "grad_clip_norm"):
        if opt[field] < 0:
            raise ValueError(f"optim.{field}={opt[field]} must be >= 0.")
    for field in ("b1", "b2", "momentum"):  # Decay rates of moving averages.
        if not 0 <= opt[field] < 1:
            raise ValueError(f"optim.{field}={opt[field]} must be in [0, 1).")
    schedule = make_schedule(opt.lr, total_steps, opt.warmup_steps, opt.decay)
    steps = []
    if opt.grad_clip_norm:
        steps.append(optax.clip_by_global_norm(opt.grad_clip_norm))
    if opt.name == "adam" and opt.weight_decay:
        steps.append(optax.add_decayed_weights(opt.weight_decay, mask=_kernels))
    mu_dtype = _dtype(opt.get("mu_dtype"))
    if opt.name in ("adam", "adamw"):
        steps.append(optax.scale_by_adam(b1=opt.b1, b2=opt.b2, mu_dtype=mu_dtype))
    else:
        steps.append(
            optax.trace(decay=opt.momentum, nesterov=opt.nesterov, accumulator_dtype=mu_dtype)
        )
    if opt.name != "adam" and opt.weight_decay:
        steps.append(optax.add_decayed_weights(opt.weight_decay, mask=_kernels))
    steps.append(optax.scale_by_learning_rate(schedule))
    tx = optax.chain(*steps)

    if opt.frozen:
        pattern = _frozen_pattern(opt.frozen)

        def labels(params):
            return jax.tree_util.tree_map_with_path(
                lambda p, _: "frozen" if pattern.search(_path(p)) else "trained", params
            )

        tx = optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)
    return tx, schedule


def _dtype(name: str | None) -> jnp.dtype | None:
    if name is None:
        return None
    if name not in MU_DTYPES:
        raise ValueError(f"optim.mu_dtype={name!r}: choose one of {MU_DTYPES} (or leave it unset).")
    return jnp.dtype(name)


def _frozen_pattern(text: str) -> re.Pattern:
    try:
        return re.compile(text)
    except re.error as e:
        raise ValueError(f"optim.frozen={text!r} is not a regular expression: {e}.") from None


def frozen_paths(config: ml_collections.ConfigDict, params: Any) -> list[str]:
    """The parameter paths `optim.frozen` matches; an empty match is a configuration error."""
    if not config.optim.frozen:
        return []
    pattern = _frozen_pattern(config.optim.frozen)
    paths = [_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    matched = [p for p in paths if pattern.search(p)]
    if not matched:
        raise ValueError(
            f"optim.frozen={config.optim.frozen!r} matches no parameter; paths look like "
            f"{paths[:3]} (regex search over '/'-joined names)."
        )
    return matched
