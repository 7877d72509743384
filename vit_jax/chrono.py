"""The training loop's clock: training time, with periodic work timed on its own.

An evaluation, a few-shot probe or a checkpoint save at a step between logs, or the train
step's compilation before the first step, would otherwise count as training time in its
window: the step time, images per second, MFU and ETA would jump whenever it runs.
`Chrono` pauses the training clock for such work and reports its duration under its own
name instead (as big_vision's `chrono` does).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator


class Chrono:
    """Splits the loop's wall time into training (input wait included) and named pauses.

    `model_flops_per_device`: one step's model FLOPs over the devices (`Trainer.model_flops`),
    for `train/tflops_per_device`; with `peak_tflops`, the device's dense peak
    (`vit_jax/peaks.py`), for `train/mfu`. `now` returns seconds (default
    `time.perf_counter`); tests inject a fake clock.
    """

    def __init__(
        self,
        total_steps: int,
        batch_size: int,
        model_flops_per_device: float | None = None,
        peak_tflops: float | None = None,
        now: Callable[[], float] = time.perf_counter,
    ):
        self.total_steps, self.batch_size, self.now = total_steps, batch_size, now
        self.model_flops_per_device, self.peak_tflops = model_flops_per_device, peak_tflops
        self._window_start, self._window_first_step = 0.0, 0  # Set by `start`.
        self._paused_in_window = 0.0
        self._input_wait = 0.0
        self._durations: dict[str, float] = {}
        # Over the whole loop, for the ETA: paused seconds per trained step.
        self._paused_total = 0.0
        self._steps_total = 0

    def start(self, step: int) -> None:
        """Starts the first window after `step` (the step the loop resumes from)."""
        self._window_start, self._window_first_step = self.now(), step

    @contextlib.contextmanager
    def paused(self, name: str, once: bool = False) -> Iterator[None]:
        """Time spent inside is not training time; it is reported as `time/<name>_s`.

        `once`: work a run does once (the train step's compilation), which the ETA leaves
        out of the pauses it expects per step.
        """
        began = self.now()
        try:
            yield
        finally:
            seconds = self.now() - began
            self._paused_in_window += seconds
            self._paused_total += 0.0 if once else seconds
            key = f"time/{name}_s"
            self._durations[key] = self._durations.get(key, 0.0) + seconds

    @contextlib.contextmanager
    def input_wait(self) -> Iterator[None]:
        """Time spent inside is training time spent waiting for the input pipeline."""
        began = self.now()
        try:
            yield
        finally:
            self._input_wait += self.now() - began

    def report(self, step: int) -> dict[str, float]:
        """Metrics of the window ending after `step`, then a new window starts.

        `train/step_time_s` (seconds per step, pauses excluded), `train/img_per_s`,
        `train/input_wait_frac` (share of training time spent waiting for data),
        `train/eta_s` (remaining steps at this step time plus the pauses' average share
        per step so far), the pauses' `time/<name>_s` summed over the window, and where
        the model FLOPs are given `train/tflops_per_device` (model TFLOP/s per device) and,
        where the peak is too, `train/mfu` (their ratio to the peak, 0-1).
        """
        now = self.now()
        steps = step - self._window_first_step
        training = now - self._window_start - self._paused_in_window
        self._steps_total += steps
        step_time = training / steps
        paused_per_step = self._paused_total / self._steps_total
        metrics = {
            "train/step_time_s": step_time,
            "train/img_per_s": self.batch_size / step_time,
            "train/input_wait_frac": self._input_wait / training,
            "train/eta_s": (step_time + paused_per_step) * (self.total_steps - step),
            **self._durations,
        }
        if self.model_flops_per_device is not None:
            tflops = self.model_flops_per_device / step_time / 1e12
            metrics["train/tflops_per_device"] = tflops
            if self.peak_tflops:
                metrics["train/mfu"] = tflops / self.peak_tflops
        self._window_start, self._window_first_step = now, step
        self._paused_in_window, self._input_wait, self._durations = 0.0, 0.0, {}
        return metrics
