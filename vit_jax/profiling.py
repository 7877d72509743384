"""A profiler window over training steps (`config.profile`).

Steps `first_step .. first_step + steps - 1` are traced with `jax.profiler` into the run's
TensorBoard directory (`<workdir>/tensorboard/plugins/profile/<time>/`: an `.xplane.pb`
that TensorBoard's profile plugin opens, and a `perfetto_trace.json.gz` for
ui.perfetto.dev), each step annotated with `StepTraceAnnotation("train", step_num=step)`
so the tools split the trace into steps.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections

from vit_jax.cli import error_summary
from vit_jax.metrics import TENSORBOARD_DIR

log = logging.getLogger(__name__)


class ProfileWindow:
    """Traces steps `first_step .. first_step + steps - 1`; off when `log_dir` is None."""

    def __init__(self, log_dir: str | None, first_step: int, steps: int):
        self.log_dir, self.first_step, self.last_step = log_dir, first_step, first_step + steps - 1
        self._tracing = False

    @classmethod
    def from_config(cls, profile: ml_collections.ConfigDict, workdir: str) -> ProfileWindow:
        """`profile.first_step` (0: off), `profile.steps`, `profile.all_processes` (else
        process 0 only).

        Raises ValueError for a negative first step or fewer than one step.
        """
        if profile.first_step < 0 or profile.steps < 1:
            raise ValueError(
                f"config.profile first_step={profile.first_step}, steps={profile.steps}: "
                "expected first_step >= 1 (0: no profile) and steps >= 1, e.g. "
                "--config.profile.first_step=100 --config.profile.steps=5."
            )
        on = profile.first_step and (profile.all_processes or jax.process_index() == 0)
        log_dir = os.path.join(workdir, TENSORBOARD_DIR) if on else None
        return cls(log_dir, profile.first_step, profile.steps)

    @contextlib.contextmanager
    def step(self, step: int) -> Iterator[None]:
        """Annotates `step` inside the window, starting the trace at its first step."""
        if self.log_dir is None or not self.first_step <= step <= self.last_step:
            yield
            return
        if not self._tracing:
            jax.profiler.start_trace(self.log_dir, create_perfetto_trace=True)
            self._tracing = True
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            yield

    def finish(self, step: int, outputs: Any) -> None:
        """Stops the trace after the window's last step, once `outputs` (that step's
        results) are computed, so the trace holds the step's device work."""
        if self._tracing and step >= self.last_step:
            jax.block_until_ready(outputs)
            self._stop()

    def close(self) -> None:
        """Stops a trace the loop left running (the run ended or stopped inside the window)."""
        if self._tracing:
            self._stop()

    def _stop(self) -> None:
        """Stops the trace and writes it. A trace the file system refuses (jax.profiler
        raises as it writes) is logged as a warning: a diagnostic never ends the run."""
        self._tracing = False
        try:
            jax.profiler.stop_trace()
        except RuntimeError as e:  # JaxRuntimeError, with the file system's reason.
            log.warning(
                "The profile of steps %d-%d could not be written to %s (%s); training goes on.",
                self.first_step,
                self.last_step,
                self.log_dir,
                error_summary(e),
            )
