"""`vit-train`: train or fine-tune a ViT from a config file.

    vit-train --config configs/local.py --workdir /tmp/vit_local
    vit-train --config configs/pretrain.py:variant=B/16,dataset=imagenet21k \
        --workdir gs://bucket/run --config.batch_size=1024

Multi-process runs (TPU pods, multi-node GPU) pass --coordinator_address,
--num_processes and --process_id, or --distributed to let JAX detect them (TPU, SLURM).

Exit status: 0 when the run is complete; 75 (EX_TEMPFAIL) when it stopped on SIGTERM,
SIGINT or a preemption notice after saving a checkpoint, so rerunning the same command
resumes it (launch scripts requeue on 75); 2 when the command line or what it names is
wrong (the one-line message says what to change: vit_jax.cli); anything else is an error
that a rerun would repeat (non-finite loss, unreadable checkpoints, out of device memory,
a process of the run died). Paths (workdir, data_dir, model_init, folder datasets) are
relative to where the command is typed, or gs:// URLs.
"""

from __future__ import annotations

import logging
import sys

import ml_collections
from absl import flags
from ml_collections import config_flags

from vit_jax import cli
from vit_jax.accelerators import check_cpu_fallback
from vit_jax.preemption import (
    PREEMPTED_EXIT_STATUS,
    Preempted,
    exit_on_stop_during_start_up,
    exit_status_once_closed,
)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file[:args].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and metrics go.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() with auto-detection."
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Total number of processes.", lower_bound=1
)
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.", lower_bound=0)
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout",
    100,
    "Multi-process runs: seconds after a process stops sending heartbeats (it died) or "
    "announces its error, after which the others stop with an error instead of waiting in "
    "a collective.",
    lower_bound=1,
)
_INITIALIZATION_TIMEOUT = flags.DEFINE_integer(
    "initialization_timeout",
    300,
    "Multi-process runs: seconds a process waits at start for every other to connect to "
    "the coordinator before it stops, saying what to check.",
    lower_bound=1,
)
flags.mark_flags_as_required(["config", "workdir"])
log = logging.getLogger("vit_jax.main")


def _check_distributed_flags() -> None:
    """Refuses multi-process flags that cannot start a run, before JAX loads."""
    given = [f"--{f.name}" for f in (_NUM_PROCESSES, _PROCESS_ID) if f.value is not None]
    if given and not (_COORDINATOR.value or _DISTRIBUTED.value):
        raise cli.UsageError(
            f"{' and '.join(given)} take effect only with --coordinator_address HOST:PORT (or "
            "--distributed, where JAX detects the cluster); without it this is one process."
        )
    if None not in (_NUM_PROCESSES.value, _PROCESS_ID.value):
        if _PROCESS_ID.value >= _NUM_PROCESSES.value:
            raise cli.UsageError(
                f"--process_id {_PROCESS_ID.value} is not below --num_processes "
                f"{_NUM_PROCESSES.value}: processes are numbered from 0."
            )
    host, _, port = (_COORDINATOR.value or "").rpartition(":")
    if _COORDINATOR.value and not (host and port.isdigit()):
        raise cli.UsageError(
            f"--coordinator_address {_COORDINATOR.value!r}: expected HOST:PORT of process 0, "
            "e.g. 10.0.0.2:1234."
        )


def _main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments {argv[1:]}: every setting is a --flag.")
    if not _WORKDIR.value:
        raise cli.UsageError("--workdir is empty: for the current directory, give '.'.")
    workdir = cli.absolute_path(_WORKDIR.value)
    cli.check_directory("--workdir", workdir)
    config = _CONFIG.value
    cli.absolute_config_paths(config)
    _check_distributed_flags()
    from vit_jax import processes  # After parsing: --help and flag errors answer without JAX.

    if _DISTRIBUTED.value or _COORDINATOR.value:
        try:
            processes.initialize(
                "vit-train",
                _COORDINATOR.value,
                _NUM_PROCESSES.value,
                _PROCESS_ID.value,
                _HEARTBEAT_TIMEOUT.value,
                _INITIALIZATION_TIMEOUT.value,
            )
        except processes.CoordinatorPortTakenError as e:
            raise cli.UsageError(str(e)) from None
        except ValueError as e:  # What JAX could not find out from the flags and environment.
            raise cli.UsageError(
                f"jax.distributed.initialize: {e} Pass --coordinator_address, --num_processes "
                "and --process_id, or start the run where JAX detects them (SLURM, Cloud TPU)."
            ) from None
    # From here on an error on this process ends the others too, and one on another this.
    with processes.failures_told():
        with processes.exit_when_another_fails("vit-train", _HEARTBEAT_TIMEOUT.value):
            return _run(config, workdir)


def _run(config: ml_collections.ConfigDict, workdir: str) -> int:
    """The run, once its processes have met: its exit status."""
    import jax

    # Our progress lines on process 0; only warnings from libraries (Orbax, tfds, absl).
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True
    )
    verbose = jax.process_index() == 0
    logging.getLogger("vit_jax").setLevel(logging.INFO if verbose else logging.WARNING)
    check_cpu_fallback()
    log.info(
        "%d process(es), %d device(s): %s",
        jax.process_count(),
        jax.device_count(),
        jax.devices()[0].device_kind,
    )
    import tensorflow as tf

    from vit_jax.checkpoint.manager import CheckpointNotSavedError
    from vit_jax.data.folder_manifest import FolderUnreadableError
    from vit_jax.processes import AnotherProcessFailedError
    from vit_jax.train import OutOfDeviceMemoryError, train_and_evaluate
    from vit_jax.workdir import (
        UnreadableCheckpointsError,
        WorkdirLockedError,
        WorkdirNotSharedError,
        WorkdirUnwritableError,
    )

    try:
        final = train_and_evaluate(config, workdir)
    except Preempted as e:
        log.warning("%s Exit status %d.", e, PREEMPTED_EXIT_STATUS)
        return PREEMPTED_EXIT_STATUS
    # The user picks another.
    except (WorkdirLockedError, WorkdirUnwritableError, WorkdirNotSharedError) as e:
        raise cli.UsageError(str(e)) from None
    except (
        FloatingPointError,
        UnreadableCheckpointsError,
        FolderUnreadableError,
        CheckpointNotSavedError,
        OutOfDeviceMemoryError,
        AnotherProcessFailedError,
    ) as e:
        # The run failed, for a reason the message gives; not a bug.
        print(f"vit-train: {e}", file=sys.stderr)
        return 1
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as e:
        if not (reason := _folder_changed(config, e)):
            raise
        print(f"vit-train: {reason}", file=sys.stderr)
        return 1
    log.info("Final: %s", ", ".join(f"{k} {v:.4f}" for k, v in final.items()))
    return 0


def _folder_changed(config: ml_collections.ConfigDict, error: Exception) -> str | None:
    """What to do when the input pipeline met a file of an image folder that no longer
    reads or decodes as it did when the manifest was written (edited, replaced or deleted
    since: the manifest keeps its verdicts by name); None for any other error."""
    from vit_jax.data import folder_root
    from vit_jax.data.folder_manifest import manifest_path

    root = folder_root(config.dataset)
    message = str(getattr(error, "message", error))
    if root is None or not (root in message or "image" in message.lower()):
        return None
    manifest = manifest_path(root, config.get("data_dir"))
    return (
        f"a file of the image folder {root} no longer reads as an image "
        f"({cli.error_line(error)}): it "
        f"changed since {manifest} was written. Delete the manifest so that the next start "
        "checks every file again, then rerun the same command to resume."
    )


def main() -> None:
    exit_on_stop_during_start_up()  # Before JAX and TensorFlow load: a stop exits 75.
    # Every way out waits for the input pipeline's close, a user error found at the first
    # step included: the interpreter's exit would stop tf.data's teardown and abort.
    cli.run_with_flags("vit-train", __doc__, _main, finish=exit_status_once_closed)


if __name__ == "__main__":
    main()
