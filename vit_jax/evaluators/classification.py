"""Top-1 and loss over a whole eval split (`config.eval_split`), every `config.eval_every`."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from vit_jax import data, parallel
from vit_jax.preemption import StopRequests


class ClassificationEvaluator:
    """`eval/loss` and `eval/top1` of the trainer's model on `config.eval_split`.

    Each example is counted exactly once over all processes (padded, masked batches).
    """

    name = "eval"

    def __init__(self, trainer: Any):
        self.trainer = trainer
        self.every = int(trainer.config.eval_every)
        # An unknown or empty split stops the start-up.
        data.num_eval_batches(trainer.config, trainer.batch_share[1])

    def run(self, params: Any, stop: StopRequests) -> dict[str, float]:
        """Raises `StopRequested` when a stop is requested before the split is done."""
        totals, dispatched = None, parallel.DispatchWindow()
        batches = parallel.prefetch_to_devices(
            data.eval_batches(
                self.trainer.config,
                share_index=self.trainer.batch_share[0],
                share_count=self.trainer.batch_share[1],
            ),
            self.trainer.batch_sharding,
        )
        for batch in stop.watch(batches):
            sums = self.trainer.eval_step(params, batch)
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
            dispatched.add(totals)
        totals = jax.device_get(totals)
        return {
            "eval/loss": float(totals["loss"] / totals["count"]),
            "eval/top1": float(totals["correct"] / totals["count"]),
        }


def build(config: ml_collections.ConfigDict, trainer: Any) -> ClassificationEvaluator:
    del config  # The trainer's.
    return ClassificationEvaluator(trainer)
