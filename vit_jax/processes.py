"""The processes of a multi-process run: how they meet, exchange texts at start-up, and
end together when one fails.

`initialize` is JAX's distributed start, with what goes wrong there said in one line: a
coordinator nobody answers at, a process that never connects, a port already taken.

Start-up's exchanges (`allgather_text`, `barrier`, `all_agree`: the agreement checks of
`vit_jax/agreement.py`, the folder manifest's barrier, the workdir's lock) go through the
coordination service's key-value store, not device collectives, and watch for a process
that failed on its own (`failures_told`): an error on one host (a file it lacks, a
folder it cannot read) ends every other process at its next exchange, within two seconds,
saying which process failed and why. After start-up the others wait in a step's
collectives, which cannot look: `exit_when_another_fails` ends them from a thread once
the failed process has announced its error. Waiting in a collective instead, the other
processes hung until JAX's shutdown barrier gave up (300 s) and aborted every process
with a C++ stack trace.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import socket
import sys
import threading
from collections.abc import Iterator
from typing import Any

import jax
from jax._src import distributed  # The coordination service's client, where Orbax reads it.

from vit_jax.cli import error_summary
from vit_jax.preemption import Preempted


class AnotherProcessFailedError(RuntimeError):
    """Another process of this run failed first; its error is in this one's message."""


class CoordinatorPortTakenError(ValueError):
    """Process 0's host already has a listener on the coordinator's port."""


def initialize(
    prog: str,
    coordinator_address: str | None,
    num_processes: int | None,
    process_id: int | None,
    heartbeat_timeout_s: int,
    initialization_timeout_s: int,
) -> None:
    """`jax.distributed.initialize`, with what goes wrong when a run's processes meet said
    in one line instead of a crash.

    Process 0 (when `process_id` is given as 0) first checks that its host's port is free:
    JAX's coordination service could not bind it and the process crashed (SIGSEGV). A
    process that has not met every other within `initialization_timeout_s` prints
    `prog: ...` saying whether anything answers at the coordinator's address, and what to
    check, then exits with status 2: JAX aborted it (SIGABRT) a little later, saying that
    "another task died", which none had.

    Raises:
      CoordinatorPortTakenError: as above.
      ValueError: what JAX cannot detect (no coordinator address outside a cluster).
    """
    if coordinator_address and process_id == 0:
        _refuse_a_taken_port(coordinator_address)
    watchdog = threading.Timer(
        initialization_timeout_s,
        _not_met,
        (prog, coordinator_address, num_processes, process_id, initialization_timeout_s),
    )
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(
            coordinator_address,
            num_processes,
            process_id,
            heartbeat_timeout_seconds=heartbeat_timeout_s,
            initialization_timeout=initialization_timeout_s + 60,  # JAX's abort: after ours.
            # A failed process waits in the shutdown barrier for the others, which leave
            # their collectives `heartbeat_timeout_s` later (`exit_when_another_fails`).
            shutdown_timeout_seconds=heartbeat_timeout_s + 300,
        )
    finally:
        watchdog.cancel()


def _refuse_a_taken_port(coordinator_address: str) -> None:
    """Binds the coordinator's port on every address, as JAX's service does, and lets go."""
    port = int(coordinator_address.rpartition(":")[2])
    for family, address in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # As gRPC's.
                probe.bind((address, port))
            return
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise CoordinatorPortTakenError(
                    f"--coordinator_address {coordinator_address}: port {port} on this host "
                    "(process 0's, where the coordination service listens) is taken by "
                    "another program, perhaps an earlier run still going (`ss -ltnp 'sport = "
                    f":{port}'` names it). Stop it, or start every process of the run with "
                    "another port."
                ) from None
            # Another errno: no IPv6 on this host; IPv4 next.


def _can_connect(coordinator_address: str) -> bool:
    host, _, port = coordinator_address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
        return True
    except OSError:
        return False


def _not_met(
    prog: str,
    coordinator_address: str | None,
    num_processes: int | None,
    process_id: int | None,
    timeout_s: int,
) -> None:
    """Ends a process that has not met the others within `timeout_s` (`initialize`)."""
    if coordinator_address and process_id != 0 and not _can_connect(coordinator_address):
        message = (
            f"Nothing answered at --coordinator_address {coordinator_address} within "
            f"{timeout_s} s: process 0 serves the run's coordination service there once it "
            "starts. Start process 0 with the same --coordinator_address (its host and a "
            "free port), and check that this host reaches that port (firewall rules)."
        )
    else:
        count = f" (--num_processes {num_processes})" if num_processes else ""
        message = (
            f"Not every process of the run connected to the coordination service at "
            f"{coordinator_address or 'the address JAX detected'} within {timeout_s} s"
            f"{count}. Start every process, each with its own --process_id from 0, the same "
            "--coordinator_address and --num_processes; give a slow start more time with "
            "--initialization_timeout."
        )
    print(f"{prog}: {message}", file=sys.stderr, flush=True)
    os._exit(2)


_EXCHANGES = "vit_jax/start-up"
_FAILED = "vit_jax/failed"  # failed/<process>: that process's error, once announced.
_WAKE = "vit_jax/wake"  # wake/<process>: wakes that process's `exit_when_another_fails`.
_WAIT_MS = 1000  # How often a waiting process looks for another's failure.
_DAY_MS = 24 * 3600 * 1000
_exchange_numbers = itertools.count()


def allgather_text(text: str) -> list[str]:
    """Every process's `text`, in process order: one exchange of start-up through the
    coordination service's key-value store. Every process makes the same exchanges in the
    same order, so the n-th call of each is one exchange.

    Raises:
      AnotherProcessFailedError: a process announced its failure (`failures_told`) before
        every process arrived.
    """
    if jax.process_count() == 1:
        return [text]
    client = distributed.global_state.client
    exchange = f"{_EXCHANGES}/{next(_exchange_numbers)}"
    done = f"{exchange}/done"
    client.key_value_set(f"{exchange}/text/{jax.process_index()}", text)
    if client.key_value_increment(f"{exchange}/arrived", 1) == jax.process_count():
        client.key_value_set(done, "")
    # Look for a failure, then wait: a failure counts only when the wait after it runs out.
    # A process that completed the exchange and failed right after set `done` before it
    # announced its failure, so this process goes on to its own verdict (often the same
    # refusal) instead of stopping on the other's.
    while True:
        failure = _another_failed(client)
        if _set_within(client, done, _WAIT_MS):
            break
        if failure:
            raise AnotherProcessFailedError(failure)
    texts = dict(client.key_value_dir_get(f"{exchange}/text/"))
    return [texts[f"{exchange}/text/{i}"] for i in range(jax.process_count())]


def barrier() -> None:
    """Returns once every process has called it (`allgather_text`'s errors)."""
    allgather_text("")


def all_agree(ok: bool) -> bool:
    """True when `ok` holds on every process (`allgather_text`'s errors)."""
    return all(text == "ok" for text in allgather_text("ok" if ok else "not ok"))


def _set_within(client: Any, key: str, timeout_ms: int) -> bool:
    """Whether `key` is set in the coordination service, waiting `timeout_ms` at most.

    Raises:
      jax.errors.JaxRuntimeError: the service cannot answer (it is gone).
    """
    try:
        client.blocking_key_value_get(key, timeout_ms)
        return True
    except jax.errors.JaxRuntimeError as e:
        if "DEADLINE_EXCEEDED" not in str(e):
            raise
        return False


def _another_failed(client: Any) -> str | None:
    """What to say when another process announced its failure (`failures_told`): the
    lowest-numbered one's error; None when none did."""
    failed = [
        (process, message)
        for key, message in client.key_value_dir_get(f"{_FAILED}/")
        if (process := int(key.rsplit("/", 1)[1])) != jax.process_index()
    ]
    if not failed:
        return None
    process, message = min(failed)
    return (
        f"Process {process} of {jax.process_count()} failed, so this one stops too. "
        f"Process {process}: {message}"
    )


@contextlib.contextmanager
def failures_told() -> Iterator[None]:
    """Announces an error that leaves this context to the other processes of the run: their
    start-up exchanges raise AnotherProcessFailedError instead of waiting for this process,
    and `exit_when_another_fails` ends them if they wait in a step's collectives. A stop
    request (`Preempted`), which every process obeys at the same step, is not a failure.
    """
    try:
        yield
    except Exception as e:
        client = distributed.global_state.client  # None: one process.
        if client is None or isinstance(e, (AnotherProcessFailedError, Preempted)):
            raise
        # The first announcement stands (ALREADY_EXISTS after it): an error of
        # `train_and_evaluate` leaves vit-train's context too, maybe as another error.
        with contextlib.suppress(jax.errors.JaxRuntimeError):  # Or the service is gone.
            client.key_value_set(f"{_FAILED}/{jax.process_index()}", error_summary(e))
            for process in set(range(jax.process_count())) - {jax.process_index()}:
                client.key_value_set(f"{_WAKE}/{process}", "failed", allow_overwrite=True)
        raise


@contextlib.contextmanager
def exit_when_another_fails(prog: str, grace_s: float) -> Iterator[None]:
    """Ends this process, status 1, when another process of the run announces its failure
    (`failures_told`) and this one has not left the context `grace_s` seconds later: it
    waits in a collective the failed process will never join (on TPUs and GPUs for ever).
    Prints `prog: Process P of N failed, so this one stops too. Process P: <its error>`,
    passes JAX's shutdown barrier with the failed process (which waits there on its way
    out), then `os._exit(1)`. The grace lets a process that fails the same way (a
    non-finite loss, a checkpoint the shared disk refuses) end in its own words.

    A thread waits on this process's wake key in the coordination service (no polling);
    leaving the context wakes it and waits for it: a wait still pending when the client
    shuts down aborts the process. No thread in a single-process run.
    """
    client = distributed.global_state.client
    if client is None:  # One process (asking JAX would start its backends here, early).
        yield
        return
    me = jax.process_index()
    left = threading.Event()

    def watch() -> None:
        try:
            while not _set_within(client, f"{_WAKE}/{me}", _DAY_MS):
                pass
            message = _another_failed(client)
        except jax.errors.JaxRuntimeError:  # The service is gone: JAX's heartbeat ends us.
            return
        if message is None or left.wait(grace_s):
            return
        print(f"{prog}: {message}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        try:
            jax.distributed.shutdown()
        finally:
            os._exit(1)

    watcher = threading.Thread(target=watch, name="exit_when_another_fails", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        left.set()
        with contextlib.suppress(jax.errors.JaxRuntimeError):
            client.key_value_set(f"{_WAKE}/{me}", "left", allow_overwrite=True)
        watcher.join()
