"""The run's contract with its workdir: one run at a time, and every restart the same run.

- `claim`: a lock file held by process 0 (holder host, pid, start time). A second run in
  the same workdir is refused and told who holds it; a lock left by a dead process on this
  host, or by an earlier run of the same requeued SLURM job, is taken over with a warning.
  Every process of a multi-process run must read that lock as process 0 wrote it: a
  workdir on each host's own disk is refused before anything else is written (Orbax then
  waited forever for the other hosts' shards of the first checkpoint).
- `check_config`: on resume, the fields that decide the run's trajectory are compared with
  those saved in `config.json` (and the process count and the shares each batch is loaded
  in, in `run.json`); a difference is an error listing `field: saved -> now` unless
  `config.allow_config_change` names the field. Bookkeeping fields (`BOOKKEEPING`) change
  freely.
- `resumed_model`: the architecture saved with a workdir's checkpoints, for a resume whose
  `model_init` file is gone.
- `restore_newest_readable`: the newest checkpoint that can be read; damaged newer ones
  are reported (path and reason) and set aside. A workdir holding checkpoints never
  silently starts afresh.
- Metrics logged after the resumed step are dropped by their writer (`vit_jax.metrics`).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import tensorflow as tf
from flax import traverse_util
from jax.experimental.compilation_cache import compilation_cache

from vit_jax.agreement import differences
from vit_jax.checkpoint.manager import Checkpointer, CheckpointMismatchError, saved_steps
from vit_jax.cli import error_summary
from vit_jax.processes import all_agree, allgather_text, barrier

log = logging.getLogger(__name__)

LOCK_FILE = "lock.json"
CONFIG_FILE = "config.json"
RUN_FILE = "run.json"  # What the config cannot say: processes, batch shares, changes.
# Trajectory fields of run.json: the processes, and the shares they load each batch in
# (`parallel.batch_share`: the train stream is a function of both). An older run.json
# may lack one; it is then not compared.
RUN_FIELDS = ("process_count", "batch_shares")

# Fields that say how the run is computed or reported, not what it computes: they may
# change between restarts. A field not listed here (including any added later) is part
# of the resume contract. Dotted prefixes cover a whole section.
BOOKKEEPING = (
    "log_every",
    "eval_every",
    "checkpoint_every",
    "keep_checkpoints",
    "compilation_cache_dir",
    "data_dir",  # The same dataset read from another place.
    "eval_batch_size",  # Evaluation sums are exact at any batch size.
    "mesh",
    "dcn_mesh",
    "sharding_rules",
    "model.remat_policy",
    "model.attention_impl",
    "skip_nonfinite_updates",  # Turning the guard on after a non-finite stop is its purpose.
    "fewshot",  # A probe of the features: it changes nothing the run trains.
    "evaluators",
    "profile",
    "transfer_guard",
    "allow_config_change",
)


class WorkdirLockedError(RuntimeError):
    """Another run holds the workdir."""


class WorkdirUnwritableError(RuntimeError):
    """The workdir cannot be created or its lock written: a bucket that does not exist or
    refuses this machine's credentials, no network, a read-only file system."""


class WorkdirNotSharedError(RuntimeError):
    """Some processes of a multi-process run do not see the workdir process 0 writes: the
    path names a local disk on each host."""


class ConfigChangedError(ValueError):
    """A resume-contract field differs from the one the run was started with."""


class UnreadableCheckpointsError(RuntimeError):
    """The workdir holds checkpoints but none of them can be read."""


# ---- lock ----------------------------------------------------------------------------------


def _create_exclusively(path: str, text: str) -> bool:
    """Writes `path` unless it exists. Atomic on local filesystems; GCS has no such create
    through gfile, so there the check and the write are two operations."""
    if "://" in path:
        if tf.io.gfile.exists(path):
            return False
        with tf.io.gfile.GFile(path, "w") as f:
            f.write(text)
        return True
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return True


def _process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, from Linux's /proc); None elsewhere.

    With the pid it names one process for good: a pid is reused, its start time is not.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # Field 22; the fields after ")" start at 3.


def _holder_running(holder: dict[str, Any]) -> bool:
    """Whether the process that wrote the lock `holder` on this host still runs.

    A container restarted on the same hostname runs as the same pid (often 1) as the try it
    replaces, and any pid is reused in time: the pid's start time tells them apart.
    """
    pid = int(holder["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # Alive, owned by another user.
        pass
    recorded, now = holder.get("pid_start"), _process_start(pid)
    return recorded is None or now is None or recorded == now


def _launch_attempt() -> dict[str, Any]:
    """Which try of which run this is, when a launcher that restarts runs elsewhere says so.

    `VIT_RUN_ID` / `VIT_RUN_ATTEMPT` (set by launch/tpu_vm.sh for each new slice), else a
    SLURM job's id and restart count (a requeued job keeps its id). {} when neither is set.
    """
    if "VIT_RUN_ID" in os.environ:
        return {"run": os.environ["VIT_RUN_ID"], "attempt": int(os.environ["VIT_RUN_ATTEMPT"])}
    if "SLURM_JOB_ID" in os.environ:
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        return {"run": f"slurm-{os.environ['SLURM_JOB_ID']}", "attempt": restarts}
    return {}


def _take_lock(path: str) -> dict[str, Any]:
    me = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_start": _process_start(os.getpid()),
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **_launch_attempt(),
    }
    text = json.dumps(me)
    if _create_exclusively(path, text):
        return me
    try:
        holder = _read_json(path) or {}
        who = f"process {holder['pid']} on {holder['host']}, started {holder['started']}"
    except (ValueError, KeyError):
        holder, who = {}, "an unknown holder (the lock file is unreadable)"
    dead_here = holder.get("host") == me["host"] and not _holder_running(holder)
    # An earlier try of this run, killed on a machine that may be gone (node failure, a
    # TPU slice deleted under it): there is no pid to check there.
    earlier_attempt = (
        "run" in me and holder.get("run") == me["run"] and holder["attempt"] < me["attempt"]
    )
    if dead_here or earlier_attempt:
        log.warning("Taking over %s: its holder, %s, is no longer running.", path, who)
        tf.io.gfile.remove(path)
        if _create_exclusively(path, text):
            return me
    raise WorkdirLockedError(
        f"{os.path.dirname(path)} is in use by {who} (lock file {path}). Two runs in one "
        "workdir would overwrite each other's checkpoints and metrics: wait for that run, "
        "stop it, or use another --workdir. Multi-process runs need --distributed (or "
        "--coordinator_address ...) so that their processes form one run. If you are sure "
        f"no run uses this workdir (its machine is gone), delete {path}."
    )


@contextlib.contextmanager
def claim(workdir: str) -> Iterator[None]:
    """Holds the workdir's lock (taken by process 0) while the run lasts."""
    path = os.path.join(workdir, LOCK_FILE)
    mine, error = None, None
    if jax.process_index() == 0:
        try:
            tf.io.gfile.makedirs(workdir)
            mine = _take_lock(path)
        except WorkdirLockedError as e:
            error = e
        except tf.errors.OpError as e:  # The file system's refusal, in TensorFlow's words.
            hint = (
                "check that the bucket exists and that this machine's credentials may write "
                "to it (`gcloud storage ls` it from here)"
                if workdir.startswith("gs://")
                else "check that it lies on a writable file system"
            )
            error = WorkdirUnwritableError(
                f"Cannot create the workdir {workdir} ({e.message.splitlines()[0]}): {hint}, "
                "or use another --workdir."
            )
    if not all_agree(error is None):
        raise error or WorkdirLockedError(f"Process 0 could not lock {workdir}; see its log.")
    try:
        _check_shared(workdir, path)
        yield
    finally:
        if mine is not None:
            tf.io.gfile.remove(path)


_SHARED_READS, _SHARED_READ_INTERVAL_S = 10, 0.5


def _check_shared(workdir: str, lock_path: str) -> None:
    """Refuses a workdir that is not one storage for every process: each reads the lock
    process 0 wrote and all compare what they read (`allgather_text`, at start-up).

    Raises:
      WorkdirNotSharedError: naming the processes that read something else or nothing.
    """
    if jax.process_count() == 1:
        return
    seen = ""  # What this process reads of the lock; nothing when it is not there.
    # A network file system may answer from a cache that predates the lock for a moment.
    for _ in range(_SHARED_READS):
        try:
            with tf.io.gfile.GFile(lock_path) as f:
                seen = f.read()
            break
        except tf.errors.NotFoundError:
            time.sleep(_SHARED_READ_INTERVAL_S)
    everyone = allgather_text(seen)
    blind = [index for index, text in enumerate(everyone) if text != everyone[0]]
    if blind:
        raise WorkdirNotSharedError(
            f"The workdir {workdir} is not one storage for every process: process(es) "
            f"{', '.join(map(str, blind))} of {jax.process_count()} do not see the lock file "
            f"process 0 wrote there ({lock_path}). Every host writes its shards of each "
            "checkpoint into the workdir, so a multi-process run needs one that every host "
            "reads and writes: a gs:// bucket or a shared file system (NFS), not a path on "
            "each host's own disk."
        )


# ---- config contract -----------------------------------------------------------------------


def _is_bookkeeping(field: str) -> bool:
    return any(field == b or field.startswith(b + ".") for b in BOOKKEEPING)


def _contract(config_json: dict, run_fields: dict[str, int]) -> dict[str, Any]:
    """The fields a resume must keep: the config's and `run_fields` (of `RUN_FIELDS`).

    A field left None is one the run does not set, as a config of older code lacks it.
    """
    fields = traverse_util.flatten_dict(config_json, sep=".") | run_fields
    return {k: v for k, v in fields.items() if v is not None and not _is_bookkeeping(k)}


def _read_json(path: str) -> dict | None:
    """The JSON object in `path`; None when there is no such file.

    Raises:
      ValueError: the file holds no JSON object (damaged, or edited by hand), named.
    """
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as f:
        text = f.read()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        value = e
    if not isinstance(value, dict):
        what = value if isinstance(value, json.JSONDecodeError) else type(value).__name__
        raise ValueError(
            f"{path} holds no JSON object ({what}): restore it from a copy, or delete it "
            "(without config.json a resume is not checked against the saved config)."
        )
    return value


def _write_json(path: str, value: dict) -> None:
    """Replaces `path` in one step (a new file renamed over it): a run stopped while
    writing leaves the old file, never half of one."""
    partial = f"{path}.partial"
    with tf.io.gfile.GFile(partial, "w") as f:
        f.write(json.dumps(value, indent=2))
    tf.io.gfile.rename(partial, path, overwrite=True)


def check_config(
    workdir: str,
    config: ml_collections.ConfigDict,
    resuming: bool,
    batch_shares: int | None = None,
) -> dict:
    """Refuses to resume with changed trajectory fields; returns the changes
    `config.allow_config_change` ("field,field", dotted names; "process_count" and
    "batch_shares" too) accepts, as {field: (saved, now)}, for `record_config` once the
    run has its state. `batch_shares`: the Trainer's `batch_share` count (default: one
    share per process).
    """
    if not resuming:
        return {}
    now_config = json.loads(config.to_json_best_effort())
    saved_config = _read_json(os.path.join(workdir, CONFIG_FILE))
    if saved_config is None:
        log.warning("%s has checkpoints but no %s: resuming unchecked.", workdir, CONFIG_FILE)
        return {}
    run = _read_json(os.path.join(workdir, RUN_FILE)) or {}
    current = _run_fields(batch_shares)
    saved = _contract(saved_config, {k: run[k] for k in RUN_FIELDS if k in run})
    now = _contract(now_config, {k: current[k] for k in RUN_FIELDS if k in run})
    changed = differences(saved, now)
    allowed = {f.strip() for f in config.allow_config_change.split(",") if f.strip()}
    refused = [k for k in changed if k not in allowed]
    if refused:
        listing = "\n  ".join(f"{k}: {changed[k][0]!r} -> {changed[k][1]!r}" for k in refused)
        raise ConfigChangedError(
            f"This run would resume {workdir} with settings that change its trajectory "
            f"(saved in {CONFIG_FILE} -> now):\n  {listing}\nRestore the saved values, use "
            "a new --workdir, or accept the change deliberately with "
            f"--config.allow_config_change={','.join(refused)}"
        )
    for k, (old, new) in changed.items():
        log.warning("Resuming with a deliberate change: %s: %r -> %r.", k, old, new)
    return changed


def resumed_model(workdir: str) -> dict | None:
    """The `model` section of the config saved in `workdir` when the workdir holds
    checkpoints a start resumes from; None for a first start (or a workdir without
    config.json). Writes nothing: a start reads it before claiming the workdir.

    Raises:
      ValueError: config.json holds no JSON object (`_read_json`).
    """
    if not saved_steps(workdir):
        return None
    saved = _read_json(os.path.join(workdir, CONFIG_FILE))
    return None if saved is None else saved.get("model")


def _run_fields(batch_shares: int | None) -> dict[str, int]:
    processes = jax.process_count()
    return {"process_count": processes, "batch_shares": batch_shares or processes}


def record_config(
    workdir: str,
    config: ml_collections.ConfigDict,
    accepted: dict,
    batch_shares: int | None = None,
) -> None:
    """Records this run's config, `_run_fields` and the `accepted` changes
    (`check_config`) in the workdir: called once the run has restored its state, so that a
    change the state refuses leaves the saved config as it was."""
    barrier()  # Every process has read the saved files before they change.
    if jax.process_index() == 0:
        run = _read_json(os.path.join(workdir, RUN_FILE)) or {"changes": []}
        if accepted:
            when = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
            run["changes"].append({"time": when, "fields": accepted})
        run.update(_run_fields(batch_shares))
        _write_json(os.path.join(workdir, CONFIG_FILE), json.loads(config.to_json_best_effort()))
        _write_json(os.path.join(workdir, RUN_FILE), run)


# ---- which checkpoint ----------------------------------------------------------------------


def restore_newest_readable(checkpointer: Checkpointer, abstract_state: Any) -> Any | None:
    """The newest readable checkpoint's state, or None when the workdir holds none.

    Unreadable newer checkpoints are reported and set aside (renamed, not deleted), so the
    run continues from the newest good one and can write those steps again. A checkpoint
    of another model is an error, never skipped.
    """
    unreadable: list[tuple[int, str]] = []
    for step in reversed(checkpointer.steps()):
        reason = ""
        try:
            state = checkpointer.restore(abstract_state, step)
        except CheckpointMismatchError:
            raise
        except Exception as e:  # Orbax and TensorStore raise many types for damaged files.
            reason = error_summary(e)
        if all_agree(not reason):
            for bad, _ in unreadable:
                path = checkpointer.step_path(bad)
                log.warning(
                    "Set aside unreadable %s as %s.", path, checkpointer.set_aside(bad).name
                )
            return state
        reason = reason or "unreadable on another process"
        log.warning("Cannot read checkpoint %s (%s).", checkpointer.step_path(step), reason)
        unreadable.append((step, reason))
    if unreadable:
        listing = "\n  ".join(f"{checkpointer.step_path(s)}: {r}" for s, r in unreadable)
        raise UnreadableCheckpointsError(
            f"None of the checkpoints in this workdir can be read:\n  {listing}\nThe run does "
            "not start afresh over them. Restore the files (e.g. from a copy), or move the "
            "damaged step directories away to start this workdir from scratch, or train in a "
            "new --workdir."
        )
    return None


def use_compilation_cache(config: ml_collections.ConfigDict, workdir: str) -> str | None:
    """Turns on JAX's persistent compilation cache, so a restarted run skips compiling.

    `config.compilation_cache_dir`: "workdir" (default) keeps it in `<workdir>/
    compilation_cache`, so a preempted and requeued job finds its programs there (local or
    gs://), unless JAX_COMPILATION_CACHE_DIR already names one; a path shares one cache
    between runs; "" leaves JAX's setting alone. Returns the directory in use, or None.
    Called once the workdir is claimed, so that a refused config leaves nothing behind.
    """
    where = config.compilation_cache_dir
    if where == "workdir":
        where = jax.config.jax_compilation_cache_dir or os.path.join(workdir, "compilation_cache")
    if where and where != jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", where)
        compilation_cache.reset_cache()  # Takes effect even after an earlier compile.
    return jax.config.jax_compilation_cache_dir
