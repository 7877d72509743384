"""Stop requests: SIGTERM, SIGINT or a preemption notice end the run at once, resumably.

Preemptible VMs, SLURM's time limit, `scancel` and Kubernetes send SIGTERM and then, after
a grace period (often 30 s), SIGKILL. From the moment a stop is requested no new work
starts: the step under way finishes, an evaluation or any other periodic work in progress
is abandoned at its next batch, the last completed step is saved, and the run raises
`Preempted`, which `vit-train` turns into exit status `PREEMPTED_EXIT_STATUS` ("resume
me": launch scripts requeue on it). A second signal exits with that status at once.

Every process must abandon the same work at the same point, or the others would wait
forever in the next collective. Stops are therefore decided at check points that every
process passes in the same order (after each train step, after each batch of periodic
work), numbered by a counter. In multi-process runs JAX's preemption sync manager owns
SIGTERM: it spreads a notice received by any process to all of them and names a common
check point (the largest any of them has reached, plus one); SIGINT is forwarded to it as
SIGTERM. A single process stops at the check point after the signal.

Imports only the standard library at module level: `vit-train` installs
`exit_on_stop_during_start_up` before the seconds it takes to import JAX and TensorFlow.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from types import FrameType
from typing import TypeVar

log = logging.getLogger(__name__)

# sysexits.h EX_TEMPFAIL, "temporary failure; the user is invited to retry": not 0 (the
# run is not finished: schedulers must not record success) and not 1 (an error).
PREEMPTED_EXIT_STATUS = 75

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

T = TypeVar("T")


class Preempted(Exception):
    """The run stopped on request at `step`; every completed step up to it is saved."""

    def __init__(self, step: int):
        saved = f"step {step} is saved" if step else "no step was trained yet"
        super().__init__(
            f"Stopped at step {step} on a stop request (SIGTERM, SIGINT or a preemption "
            f"notice); {saved}. Rerun the same command to resume."
        )
        self.step = step


class StopRequested(Exception):
    """Raised out of periodic work (an evaluation, a probe) abandoned on a stop request."""


def _exit_now(signum: int, frame: FrameType | None) -> None:
    """Ends the process with status 75 without any cleanup that could hold the exit."""
    del frame
    sys.stderr.write(
        f"{signal.Signals(signum).name} received: exiting at once with status "
        f"{PREEMPTED_EXIT_STATUS} (rerun the same command to resume).\n"
    )
    sys.stderr.flush()
    os._exit(PREEMPTED_EXIT_STATUS)


def exit_on_stop_during_start_up() -> None:
    """Until `StopRequests` takes over, SIGTERM and SIGINT exit with status 75 at once.

    Nothing is worth saving before training starts, and a scheduler requeues only a run
    that exits 75, not one killed by a signal (143, 130).
    """
    for signum in STOP_SIGNALS:
        signal.signal(signum, _exit_now)


_closing: list[threading.Thread] = []  # Every close_in_background thread.


def close_in_background(iterator: Iterator) -> None:
    """Closes a generator (and the tf.data iterator it holds) on a daemon thread.

    tf.data's iterator teardown waits for its thread pool's work in flight, seconds to
    minutes on a busy input pipeline; nothing the run still does depends on it.
    """
    if hasattr(iterator, "close"):
        thread = threading.Thread(target=iterator.close, name="close iterator", daemon=True)
        thread.start()
        _closing.append(thread)


def exit_status_once_closed(status: int, wait_s: float = 5.0) -> int:
    """`status`, once every `close_in_background` close has ended, waiting `wait_s` at most.

    If one is still running then, the process ends here with `status`: the atexit handlers
    run (JAX's among them, whose distributed shutdown the other processes of the run wait
    for), then `os._exit`. Interpreter finalization would stop the closing thread inside
    tf.data's C++ teardown and abort the process (SIGABRT, "FATAL: exception not
    rethrown"), and a scheduler would see a crash instead of `status`.

    This is routine, not a fault, so it is logged at debug level only: with autotuning on,
    the iterator's destructor also waits for tf.data's autotuning thread, which in TF 2.21
    at times sleeps out its optimisation period (up to a minute) instead of ending at the
    iterator's cancellation (the main job's train stream took 8.7 to 37.7 s to close).
    """
    deadline = time.monotonic() + wait_s
    for thread in _closing:
        thread.join(max(0.0, deadline - time.monotonic()))
    if any(thread.is_alive() for thread in _closing):
        log.debug("An input pipeline is still closing: exiting without waiting for it.")
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


class StopRequests:
    """While active (`with`), SIGTERM and SIGINT ask the run to stop at the next check point.

    `reached()` is a check point, `watch(items)` puts one after each item of periodic work.
    Every process must pass the same check points in the same order (JAX counts them).
    """

    def __init__(self) -> None:
        self._requested: int | None = None  # The signal number, single process.
        self._stopped = False
        self._checks = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        import jax

        if threading.current_thread() is not threading.main_thread():
            return self  # Signal handlers can only be installed from the main thread.
        # Multi-process: JAX's notifier keeps SIGTERM; SIGINT is forwarded to it.
        handled = (signal.SIGINT,) if jax.process_count() > 1 else STOP_SIGNALS
        for signum in handled:
            self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        import jax

        if self._requested is not None:
            _exit_now(signum, frame)  # The user insists.
        self._requested = signum
        log.warning(
            "%s received: stopping (a second signal exits at once).", signal.Signals(signum).name
        )
        if jax.process_count() > 1:
            signal.raise_signal(signal.SIGTERM)  # To JAX's notifier, which tells every process.

    def reached(self) -> bool:
        """Whether to stop here; every process answers the same at the same check point.

        Once True, stays True (and no longer counts as a check point).
        """
        import jax
        from jax.experimental import multihost_utils

        if not self._stopped:
            self._checks += 1
            if jax.process_count() > 1:
                self._stopped = multihost_utils.reached_preemption_sync_point(self._checks)
            else:
                self._stopped = self._requested is not None
        return self._stopped

    def watch(self, items: Iterator[T]) -> Iterator[T]:
        """`items`, with a check point after each; on a stop, raises `StopRequested`.

        The abandoned `items` are closed in the background (`close_in_background`).
        """
        for item in items:
            yield item
            if self.reached():
                close_in_background(items)
                raise StopRequested
