"""The processes of a multi-process run: how they meet (`initialize`: JAX's distributed
start, with a coordinator nobody answers at, a process that never connects and a port
already taken said in one line), and what they must agree on, checked at start-up in one
exchange each, so that a difference ends every process in one line instead of a crash or
hang in the first collective, or a run that computes something else:

- `check_processes_agree`: the same config (but `PER_PROCESS` fields), vit_jax code and
  JAX: a host left on other code or flags ran other programs, and the run crashed or hung
  in its first collective; and the same `model_init` weights (each host's own copy of the
  file): each process places its shards and replicas of the parameters from its own.
- `check_processes_read_the_same_data`: the same copy of each dataset the run reads, by
  class names, split sizes and a fingerprint of the records: each process reads its share
  of its own copy by position.

Start-up's exchanges (`allgather_text`, `barrier`, `all_agree`) go through the
coordination service's key-value store, not device collectives, and watch for a process
that failed on its own (`failures_told`): an error on one host (a file it lacks, a
folder it cannot read) ends every other process at its next exchange, within a second,
saying which process failed and why. After start-up the others wait in a step's
collectives, which cannot look: `exit_when_another_fails` ends them from a thread once
the failed process has announced its error. Waiting in a collective instead, the other
processes hung until JAX's shutdown barrier gave up (300 s) and aborted every process
with a C++ stack trace.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import json
import os
import socket
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import jax
import ml_collections
import numpy as np
from flax import traverse_util
from jax._src import distributed  # The coordination service's client, where Orbax reads it.

from vit_jax.cli import error_summary
from vit_jax.preemption import Preempted

if TYPE_CHECKING:
    from vit_jax.checkpoint import PretrainedWeights
    from vit_jax.data import DatasetInfo

# Fields each process of one run may set for itself: where it finds the same data, and its
# own compilation cache.
PER_PROCESS = ("data_dir", "compilation_cache_dir")


class ProcessesDisagreeError(ValueError):
    """Processes of one run were started with different configs, code, JAX or `model_init`
    weights, or opened different copies of a dataset."""


def differences(before: dict[str, Any], after: dict[str, Any]) -> dict[str, tuple]:
    """{key: (before's, after's)} for each key whose value differs, "(absent)" for a key one
    of them lacks, in key order."""
    absent = "(absent)"
    return {
        key: (before.get(key, absent), after.get(key, absent))
        for key in sorted(before.keys() | after.keys())
        if before.get(key, absent) != after.get(key, absent)
    }


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
    client.key_value_set(f"{exchange}/text/{jax.process_index()}", text)
    if client.key_value_increment(f"{exchange}/arrived", 1) == jax.process_count():
        client.key_value_set(f"{exchange}/done", "")
    while True:
        try:
            client.blocking_key_value_get(f"{exchange}/done", _WAIT_MS)
            break
        except jax.errors.JaxRuntimeError as e:  # DEADLINE_EXCEEDED: not everyone yet.
            if "DEADLINE_EXCEEDED" not in str(e):
                raise
            _raise_if_another_failed(client)
    texts = dict(client.key_value_dir_get(f"{exchange}/text/"))
    return [texts[f"{exchange}/text/{i}"] for i in range(jax.process_count())]


def barrier() -> None:
    """Returns once every process has called it (`allgather_text`'s errors)."""
    allgather_text("")


def all_agree(ok: bool) -> bool:
    """True when `ok` holds on every process (`allgather_text`'s errors)."""
    return all(text == "ok" for text in allgather_text("ok" if ok else "not ok"))


def _raise_if_another_failed(client: Any) -> None:
    if message := _another_failed(client):
        raise AnotherProcessFailedError(message)


def _another_failed(client: Any) -> str | None:
    """What to say when another process announced its failure (`failures_told`): the
    lowest-numbered one's error; None when none did."""
    announced = client.key_value_dir_get(f"{_FAILED}/")
    failed = [(int(key.rsplit("/", 1)[1]), message) for key, message in announced]
    failed = [(process, message) for process, message in failed if process != jax.process_index()]
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
        if jax.process_count() == 1 or isinstance(e, (AnotherProcessFailedError, Preempted)):
            raise
        client = distributed.global_state.client
        with contextlib.suppress(jax.errors.JaxRuntimeError):  # Best effort.
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
    if jax.process_count() == 1:
        yield
        return
    client = distributed.global_state.client
    me = jax.process_index()
    left = threading.Event()

    def watch() -> None:
        while True:
            try:
                client.blocking_key_value_get(f"{_WAKE}/{me}", _DAY_MS)
                message = _another_failed(client)
                break
            except jax.errors.JaxRuntimeError as e:
                if "DEADLINE_EXCEEDED" not in str(e):
                    return  # The service is gone: JAX's heartbeat ends this process.
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


def _code_identity() -> dict[str, str]:
    """What decides the programs a process builds besides its config: vit_jax's source
    (a digest of its files), JAX and jaxlib."""
    package = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256()
    for folder, _, files in sorted(os.walk(package)):
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, package).encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    return {
        "vit_jax source": digest.hexdigest()[:12],
        "jax": jax.__version__,
        "jaxlib": jax.lib.__version__,
    }


def check_processes_agree(
    config: ml_collections.ConfigDict, weights: PretrainedWeights | None = None
) -> None:
    """Refuses a multi-process run whose processes were started with different config
    fields (but `PER_PROCESS`), vit_jax code or JAX versions, or read different files at
    `config.model_init` (`weights`, None on a resume: each host's own copy of one path,
    from which each process places its shards and replicas of the parameters). One
    exchange at start-up.

    Raises:
      ProcessesDisagreeError: on every process, naming the first process that differs
        from process 0 and each difference (`field: process 0's -> theirs`).
    """
    if jax.process_count() == 1:
        return
    fields = traverse_util.flatten_dict(json.loads(config.to_json_best_effort()), sep=".")
    mine = {f"config {k}": v for k, v in fields.items() if k not in PER_PROCESS}
    if weights is not None:
        mine["model_init weights"] = _weights_digest(weights.params)
    _refuse_differences(
        mine | _code_identity(),
        "were started differently",
        "Every process of one run must run the same code, JAX and config (but "
        f"{', '.join(PER_PROCESS)}) and read the same model_init file: update or reinstall "
        "the hosts that differ, copy one file to all, and start them with the same flags.",
    )


def _weights_digest(params: dict[str, np.ndarray]) -> str:
    """A digest of every array's name, dtype, shape and bytes (0.2 s for ViT-B/16's 344 MB
    of float32 on a 2-core CPU)."""
    digest = hashlib.sha256()
    for name in sorted(params):
        array = np.ascontiguousarray(params[name])
        digest.update(f"{name} {array.dtype} {array.shape}".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()[:12]


def check_processes_read_the_same_data(dataset: str, info: DatasetInfo) -> None:
    """Refuses a multi-process run whose processes opened different copies of `dataset`
    (`info`: what this process opened): each host's own `data_dir` holding another tfds
    version or build, or an image folder's manifest left there by an earlier run. Each
    process reads its share of the records by position, so such copies would train on
    other examples than the run names, build another head, or leave a process with other
    batches to evaluate. One exchange, once the dataset is opened.

    Raises:
      ProcessesDisagreeError: on every process, naming the first process that differs
        from process 0 and each difference (class names, split sizes, `info.fingerprint`).
    """
    if jax.process_count() == 1:
        return
    names = hashlib.sha256("\n".join(info.class_names).encode()).hexdigest()[:12]
    mine = {
        f"{dataset} classes": f"{info.num_classes} (names {names})",
        **{f"{dataset} {split} examples": n for split, n in info.split_sizes.items()},
        f"{dataset} records": info.fingerprint,
    }
    _refuse_differences(
        mine,
        f"read different copies of {dataset}",
        "Every process must read the same records: copy one host's prepared tfds dataset "
        "to the others' data_dir (or share one, e.g. on gs://); for an image folder, give "
        "every host the same files and let them read the manifest process 0 writes (in "
        "the folder, or in a data_dir every process shares).",
    )


def _refuse_differences(mine: dict[str, Any], what: str, advice: str) -> None:
    """Exchanges every process's `mine` and, where any differs from process 0's, raises
    ProcessesDisagreeError on every process: `what` they did, the first such process, each
    difference, then `advice`.

    Every process reads every other's text from the coordination service, so the texts
    (a config's is about 3 KB) travel only when their digests differ: the processes of a
    1,024-host run that agree read 64 KB each from it, not 3 MB (3 GB in all).
    """
    text = json.dumps(mine, sort_keys=True)
    digests = allgather_text(hashlib.sha256(text.encode()).hexdigest())
    if len(set(digests)) == 1:
        return
    everyone = [json.loads(theirs) for theirs in allgather_text(text)]
    other = next(i for i, digest in enumerate(digests) if digest != digests[0])
    listed = [
        f"{key}: {first} -> {theirs}"
        for key, (first, theirs) in differences(everyone[0], everyone[other]).items()
    ]
    count = sum(digest != digests[0] for digest in digests)
    raise ProcessesDisagreeError(
        f"The processes of this run {what}: {count} of {jax.process_count()} differ from "
        f"process 0; process {other} in {'; '.join(listed[:8])}"
        + (f"; and {len(listed) - 8} more" if len(listed) > 8 else "")
        + f". {advice}"
    )
