"""Evaluators defined outside vit_jax, as a user's own would be, for runs in tests.

`vit-train --config.evaluators="('evaluator_support:FACTORY',)"` (with tests/ on PYTHONPATH)
configures them; the loop runs them knowing nothing of their kinds.

- `params_norm`: a custom evaluator (`params/l2_norm`), checked against the checkpoint.
- `stalling`: an evaluator that moves `CLOCK` (the loop's clock in a test) 1000 s on.
- `implicit_transfer`: an evaluator that reads a device value implicitly (`float(x)`).
- `endless_classification`, `endless_fewshot`: the real evaluators, each reading its first
  batch again and again after printing `EVALUATION_RUNNING`, so that an evaluation is in
  progress for as long as no stop is agreed on: a test can signal it without a race.
- `deaf`: an evaluator that never looks at stop requests and blocks; only a second signal
  ends the run.
- `block_train_stream_teardown`: makes closing the train stream block forever, as a busy
  tf.data pipeline's teardown can; a run that waited for it would never exit.
"""

from __future__ import annotations

import itertools
import sys
import threading
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from vit_jax import data
from vit_jax.evaluators import classification, fewshot

EVALUATION_RUNNING = "evaluator_support: evaluation in progress"


class ParamsNorm:
    """`params/l2_norm`: the global L2 norm of the parameters, every `eval_every` steps."""

    name = "params_norm"

    def __init__(self, every: int):
        self.every = every

    def run(self, params: Any, stop) -> dict[str, float]:
        del stop  # One reduction, nothing to abandon.
        leaves = jax.device_get(jax.tree.leaves(params))
        return {"params/l2_norm": float(np.sqrt(sum(np.sum(np.square(x)) for x in leaves)))}


def params_norm(config, trainer) -> ParamsNorm:
    del trainer
    return ParamsNorm(config.eval_every)


class FakeClock:
    """Seconds that pass only when told: every reading is one second later."""

    def __init__(self):
        self.seconds = 0.0

    def __call__(self) -> float:
        self.seconds += 1.0
        return self.seconds


CLOCK = FakeClock()


class _Stalling:
    name = "stalling"

    def __init__(self, every: int):
        self.every = every

    def run(self, params: Any, stop) -> dict[str, float]:
        del params, stop
        CLOCK.seconds += 1000.0
        return {}


def stalling(config, trainer) -> _Stalling:
    del trainer
    return _Stalling(config.eval_every)


class _ImplicitTransfer:
    name = "implicit"

    def __init__(self, every: int):
        self.every = every

    def run(self, params: Any, stop) -> dict[str, float]:
        del stop
        return {"params/first": float(jax.tree.leaves(params)[0].ravel()[0])}


def implicit_transfer(config, trainer) -> _ImplicitTransfer:
    del trainer
    return _ImplicitTransfer(config.eval_every)


class _EndlessStop:
    """Hands an evaluator its first batch forever, through the run's real stop checks."""

    def __init__(self, stop):
        self._stop = stop

    def reached(self) -> bool:
        return self._stop.reached()

    def watch(self, items: Iterator) -> Iterator:
        def endless():
            first = next(iter(items))
            print(EVALUATION_RUNNING, file=sys.stderr, flush=True)
            yield from itertools.repeat(first)

        return self._stop.watch(endless())


class _Endless:
    def __init__(self, evaluator):
        self.evaluator, self.name, self.every = evaluator, evaluator.name, evaluator.every

    def run(self, params: Any, stop) -> dict[str, float]:
        return self.evaluator.run(params, _EndlessStop(stop))


def endless_classification(config, trainer) -> _Endless:
    return _Endless(classification.build(config, trainer))


def endless_fewshot(config, trainer) -> _Endless:
    return _Endless(fewshot.build(config, trainer))


class _Deaf:
    name = "deaf"

    def __init__(self, every: int):
        self.every = every

    def run(self, params: Any, stop) -> dict[str, float]:
        del params, stop
        print(EVALUATION_RUNNING, file=sys.stderr, flush=True)
        threading.Event().wait()  # Signal handlers still run in between.
        return {}


def deaf(config, trainer) -> _Deaf:
    del trainer
    return _Deaf(config.eval_every)


def block_train_stream_teardown() -> None:
    """Closing `vit_jax.data.train_batches`' stream (or dropping it) blocks forever."""
    original = data.train_batches

    def train_batches(*args, **kwargs):
        try:
            yield from original(*args, **kwargs)
        finally:
            threading.Event().wait()

    data.train_batches = train_batches
