"""Preemption: SIGTERM or SIGINT finish the current step, save it, and exit "resume me".

Preemptible VMs, SLURM's time limit and `scancel` send SIGTERM and then, after a grace
period, SIGKILL. A stop request is honoured after the step under way: the loop saves a
checkpoint at that step, waits for the write, skips evaluation and raises `Preempted`,
which `vit-train` turns into exit status `PREEMPTED_EXIT_STATUS`.

Every process must stop at the same step, or the others would wait forever in the next
collective. In multi-process runs JAX's preemption sync manager owns SIGTERM: it spreads
a notice received by any process to all of them and names a common step (the largest
step any of them has reached, plus one); SIGINT is forwarded to it as SIGTERM. A single
process simply stops after the step it is running.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

import jax
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

# sysexits.h EX_TEMPFAIL, "temporary failure; the user is invited to retry": not 0 (the
# run is not finished: schedulers must not record success) and not 1 (an error).
PREEMPTED_EXIT_STATUS = 75


class Preempted(Exception):
    """The run stopped on request after saving a checkpoint at `step`."""

    def __init__(self, step: int):
        super().__init__(
            f"Stopped at step {step} on a preemption notice or signal; a checkpoint of step "
            f"{step} is saved. Rerun the same command to resume."
        )
        self.step = step


class StopRequests:
    """While active (`with`), SIGTERM and SIGINT ask the loop to stop after the current step.

    A second signal of the same kind acts as it would without this object (SIGINT raises
    KeyboardInterrupt, SIGTERM terminates), so an impatient user still gets out at once.
    """

    def __init__(self) -> None:
        self._signal: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is not threading.main_thread():
            return self  # Signal handlers can only be installed from the main thread.
        multi_process = jax.process_count() > 1
        handled = (signal.SIGINT,) if multi_process else (signal.SIGINT, signal.SIGTERM)
        for signum in handled:
            self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        del frame
        signal.signal(signum, self._previous.pop(signum))
        log.warning("%s received: stopping after this step.", signal.Signals(signum).name)
        if jax.process_count() > 1:
            signal.raise_signal(signal.SIGTERM)  # To JAX's notifier, which tells every process.
        else:
            self._signal = signum

    def reached(self, step: int) -> bool:
        """Whether to stop after `step`; every process answers the same at every step.

        Must be called after every step, by every process (JAX counts the calls).
        """
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._signal is not None
