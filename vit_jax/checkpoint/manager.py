"""Orbax checkpoints of the train state: async saves, keep-N, resume, and params-only reads.

A checkpoint holds two items: `state` (step, params, optimizer state; sharded arrays
written by every process) and `metadata` (JSON: class names, model config, ...).
The data stream is a pure function of seed and step, so the step is all it needs.
A save the file system refuses is one `CheckpointNotSavedError`, raised by the call that
waits for it (the next save, `wait` or `close`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from vit_jax.cli import (  # Orbax refuses relative paths.
    absolute_path,
    error_summary,
    is_local_file,
)
from vit_jax.processes import barrier

log = logging.getLogger(__name__)
T = TypeVar("T")

CHECKPOINT_DIR = "checkpoints"
STATE_ITEM = "state"


# ---- a failed save, reported once ------------------------------------------------------------
# A save that fails (no space left on the disk, no permission) is reported by `Checkpointer`
# in one line. Orbax logs the same TensorStore error from each of its threads; asyncio logs
# each write future Orbax left behind; TensorStore completes the writes of the abandoned save
# into Orbax's closed event loop, each raising 'Event loop is closed' where nothing can catch
# it (Python prints such errors through sys.unraisablehook). Pages of the same error, dropped.


# Where Orbax writes a save until it is complete: every error of a save names it.
_SAVE_UNDER_WAY = "orbax-checkpoint-tmp"


class _DropSaveFailureEchoes(logging.Filter):
    """Errors Orbax logs, or that carry an exception raised inside it or about a save under
    way: each reaches vit_jax as the exception of the call that waits for it, which reports
    it. A write's error that TensorStore set on a future and nobody raised has no frames
    (asyncio logs it when the future is collected, "Future exception was never retrieved",
    at any time up to the exit): it is told by the save's directory it names."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        inside = f"{os.sep}orbax{os.sep}"
        _, error, trace = record.exc_info or (None, None, None)
        frames = traceback.extract_tb(trace) if trace else []
        from_orbax = inside in record.pathname or any(inside in f.filename for f in frames)
        return not (from_orbax or _SAVE_UNDER_WAY in str(error or ""))


def _drop_closed_loop_callbacks(previous_hook: Callable[[Any], None]) -> Callable[[Any], None]:
    def hook(unraisable: Any) -> None:
        error = unraisable.exc_value
        closed = isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
        if not (closed and unraisable.object is None):
            previous_hook(unraisable)

    return hook


@functools.cache
def _drop_save_failure_echoes() -> None:
    """Installs the filter and the hook above, once per process: by the first `Checkpointer`,
    so that importing vit_jax leaves a library user's logging and hooks as they were."""
    for logger in ("absl", "asyncio"):
        logging.getLogger(logger).addFilter(_DropSaveFailureEchoes())
    sys.unraisablehook = _drop_closed_loop_callbacks(sys.unraisablehook)


class CheckpointMismatchError(ValueError):
    """The checkpoint is readable but was written by a different model."""


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(workdir, CHECKPOINT_DIR)


class _CheckpointManager(ocp.CheckpointManager):
    """Orbax's manager, minus its own look at JAX's preemption sync point.

    JAX agrees on a sync point by counting calls: the point is one past the highest count any
    process has reached, and only a call with exactly that count answers True. Orbax's save
    asks with the step number, `preemption.StopRequests` with its own count of check points;
    a notice that arrived after a save was answered at a count neither would pass again, and
    every process trained on until it was killed. The run's stops are StopRequests' alone.
    """

    def reached_preemption(self, step: int) -> bool:
        return False


class CheckpointNotSavedError(RuntimeError):
    """A checkpoint could not be written (no space left, no permission, ...); the ones
    saved before it are intact."""


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` with the state/metadata layout above."""

    def __init__(self, workdir: str, *, keep: int, async_save: bool = True):
        """Raises NotADirectoryError where `workdir/checkpoints` is a file (Orbax would fail
        only at the first save, after the first steps had run)."""
        directory = checkpoint_dir(absolute_path(workdir))
        if is_local_file(directory):
            raise NotADirectoryError(
                f"{directory} is a file, where the run keeps its checkpoints: move it away, "
                "or use another --workdir."
            )
        _drop_save_failure_echoes()
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(n=keep),
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = _CheckpointManager(
            directory,
            options=options,
            handler_registry=_handlers(ocp.StandardCheckpointHandler()),
        )
        self._saving: int | None = None  # The step of the save under way.

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def steps(self) -> list[int]:
        """Every step directory, oldest first (readable or not)."""
        return sorted(self._manager.all_steps())

    def step_path(self, step: int) -> epath.Path:
        return epath.Path(self._manager.directory) / str(step)

    def set_aside(self, step: int) -> epath.Path:
        """Renames an unreadable step's directory so that Orbax no longer counts it as a step.

        Nothing is deleted: the files stay for inspection under `<step>.unreadable-<time>`.
        """
        source = self.step_path(step)
        target = source.parent / f"{step}.unreadable-{time.strftime('%Y%m%dT%H%M%S')}"
        if jax.process_index() == 0:
            source.rename(target)
        barrier()
        self._manager.reload()
        return target

    def save(self, step: int, state: Any, metadata: dict) -> None:
        """Starts an async save; the next save or `wait` waits for it to be complete.

        Raises:
          CheckpointNotSavedError: this save, or the one before it, failed.
        """
        self.wait()
        args = ocp.args.Composite(
            **{STATE_ITEM: ocp.args.StandardSave(state)}, metadata=ocp.args.JsonSave(metadata)
        )
        self._saving = step
        try:
            self._manager.save(step, args=args, force=True)
        except Exception as e:
            raise self._not_saved(e) from e

    def restore(self, abstract_state: Any, step: int) -> Any:
        """Restores into the shardings of `abstract_state` (a tree of `jax.ShapeDtypeStruct`).

        A checkpoint of another model is refused (`CheckpointMismatchError`) with the
        differing parameters listed, before any array is read, and so is one of another
        optimizer state. A damaged checkpoint raises whatever Orbax or TensorStore raise.
        """
        if not (self.step_path(step) / STATE_ITEM).exists():
            raise FileNotFoundError(f"{self.step_path(step)} has no '{STATE_ITEM}' item")
        saved = _flat_shapes(_state_metadata(self._manager, step)["params"])
        wanted = _flat_shapes(abstract_state.params)
        if saved != wanted:
            diff = sorted(
                f"{k}: checkpoint {saved.get(k, 'missing')}, this run {wanted.get(k, 'missing')}"
                for k in saved.keys() | wanted.keys()
                if saved.get(k) != wanted.get(k)
            )
            raise CheckpointMismatchError(
                f"The checkpoint at step {step} in {self._manager.directory} was written by a "
                f"different model ({len(diff)} entries differ):\n  "
                + "\n  ".join(diff[:20])
                + "\nUse a new --workdir for a new configuration, or restore the original config."
            )
        args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(abstract_state)})
        try:
            return self._manager.restore(step, args=args)[STATE_ITEM]
        except ValueError as e:  # The same parameters, another optimizer state.
            if "tree structures do not match" not in str(e):
                raise
            raise CheckpointMismatchError(
                f"The checkpoint at step {step} in {self._manager.directory} holds the state "
                "of another optimizer (optim.name, or a setting that changes its state, such "
                "as mu_dtype or frozen parameters); its files are intact. Use a new --workdir "
                "for a new configuration, or restore the original config."
            ) from None

    def restore_metadata(self, step: int) -> dict:
        """The JSON metadata saved with `step`."""
        args = ocp.args.Composite(metadata=ocp.args.JsonRestore())
        return self._manager.restore(step, args=args)["metadata"]

    def wait(self) -> None:
        """Waits for the save under way to be complete.

        Raises:
          CheckpointNotSavedError: it failed (once: the next `wait` or `close` returns).
        """
        if self._saving is None:
            return
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise self._not_saved(e) from e
        self._saving = None

    def close(self) -> None:
        """Waits for the save under way, then releases Orbax's threads.

        Raises:
          CheckpointNotSavedError: the save under way failed.
        """
        try:
            self.wait()
        except CheckpointNotSavedError:
            with contextlib.suppress(Exception):  # Orbax raises the failure again.
                self._manager.close()
            raise
        self._manager.close()

    def _not_saved(self, error: Exception) -> CheckpointNotSavedError:
        """The failure of the save of step `self._saving`, saying what is left and what to do
        (Orbax's own message pages of TensorStore spec; the OS error is what matters)."""
        step, self._saving = self._saving, None
        code = getattr(error, "errno", None)
        if code is None and (match := re.search(r"os_error_code='?(\d+)", str(error))):
            code = int(match.group(1))
        reason = f"[Errno {code}] {os.strerror(code)}" if code else error_summary(error)
        self._manager.reload()  # The steps on disk: the failed one is not among them.
        saved = self.steps()
        kept = (
            f"The checkpoints saved before it are intact (newest: step {saved[-1]}): fix the "
            "cause, then rerun the same command to resume from it."
            if saved
            else "No checkpoint of this run is saved yet: fix the cause, then rerun the same "
            "command to start again."
        )
        return CheckpointNotSavedError(
            f"The checkpoint of step {step} could not be saved in "
            f"{self._manager.directory}: {reason}. {kept}"
        )


def saved_steps(workdir: str) -> list[int]:
    """The steps of `workdir`'s checkpoints, oldest first, as `Checkpointer.steps` lists
    them (readable or not); [] where it holds none. Creates nothing."""
    directory = checkpoint_dir(absolute_path(workdir))
    if not epath.Path(directory).is_dir():
        return []
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


def _handlers(state_handler: ocp.CheckpointHandler) -> ocp.handlers.CheckpointHandlerRegistry:
    """The two items' handlers, named up front so that a fresh process can read item
    metadata before any save or restore."""
    return ocp.handlers.create_default_handler_registry(
        **{STATE_ITEM: state_handler, "metadata": ocp.JsonCheckpointHandler()}
    )


def _state_metadata(manager: ocp.CheckpointManager, step: int) -> Any:
    """The tree of the saved state's array metadata (shape, dtype) at `step`; no array read."""
    return manager.metadata(step).item_metadata[STATE_ITEM].tree


def _flat_shapes(tree: Any) -> dict[str, tuple]:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {
        jax.tree_util.keystr(path, simple=True, separator="/"): tuple(leaf.shape)
        for path, leaf in leaves
    }


def _find_manager_dir(path: str) -> str:
    """Accepts a workdir or its `checkpoints/` directory, local or `gs://`."""
    candidate = checkpoint_dir(path)
    return candidate if epath.Path(candidate).is_dir() else path


def _newest_readable(path: str, read: Callable[[ocp.CheckpointManager, int], T]) -> T:
    """`read(manager, step)` of the newest step holding a train state that it can read;
    an unreadable newer one (a save cut short, damaged files) is skipped with a warning,
    as a resuming run skips it. Never creates `path` (a typo stays a typo).

    Raises:
      FileNotFoundError: `path` holds no checkpoint, saying what is expected there.
      ValueError: none of its checkpoints can be read, each named with its reason.
    """
    expected = (
        f"expected a vit_jax workdir (with '{CHECKPOINT_DIR}/<step>/{STATE_ITEM}/') "
        f"or its '{CHECKPOINT_DIR}' directory"
    )
    if not epath.Path(path).is_dir():
        raise FileNotFoundError(f"{path!r} is not a directory: {expected}.")
    options = ocp.CheckpointManagerOptions(create=False)
    directory = _find_manager_dir(path)
    manager = ocp.CheckpointManager(
        directory, options=options, handler_registry=_handlers(ocp.PyTreeCheckpointHandler())
    )
    steps = [
        s for s in manager.all_steps() if (epath.Path(directory) / str(s) / STATE_ITEM).exists()
    ]
    if not steps:
        found = sorted(manager.all_steps())
        numeric = f" (its numeric folders {found[:5]} hold no '{STATE_ITEM}')" if found else ""
        # A hub download (model.safetensors, config.json; a sharded checkpoint is read
        # through its index) or a folder of .npz files.
        folder = epath.Path(path)
        files = sorted(map(str, folder.glob("*.safetensors.index.json"))) or sorted(
            str(f) for suffix in ("*.safetensors", "*.npz") for f in folder.glob(suffix)
        )
        if files:
            expected += f"; to read a weights file in it, name the file: {', '.join(files[:3])}"
        raise FileNotFoundError(f"No checkpoint found in {path!r}{numeric}: {expected}.")
    unreadable = []
    for step in sorted(steps, reverse=True):
        try:
            return read(manager, step)
        except Exception as e:  # Orbax and TensorStore raise many types for damaged files.
            unreadable.append(f"step {step}: {error_summary(e)}")
            log.warning("Cannot read checkpoint %s/%d (%s).", directory, step, unreadable[-1])
    raise ValueError(f"None of the checkpoints in {path} can be read: {'; '.join(unreadable)}.")


def _read_params(manager: ocp.CheckpointManager, step: int) -> dict:
    params = _state_metadata(manager, step)["params"]
    item = {"params": jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), params)}
    restore_args = {
        "params": jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), params)
    }
    args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
    restored = manager.restore(step, args=ocp.args.Composite(**{STATE_ITEM: args}))
    return restored[STATE_ITEM]["params"]


def _read_metadata(manager: ocp.CheckpointManager, step: int) -> dict:
    _state_metadata(manager, step)  # A step whose state is unreadable is not the run's newest.
    args = ocp.args.Composite(metadata=ocp.args.JsonRestore())
    return manager.restore(step, args=args)["metadata"]


def load_params(path: str) -> dict:
    """Reads only the parameters of the newest readable checkpoint, as host numpy arrays
    (`_newest_readable`).

    Used to start fine-tuning or prediction from a training run without building its
    optimizer state or mesh.
    """
    return _newest_readable(path, _read_params)


def load_metadata(path: str) -> dict:
    """The JSON metadata saved with the newest readable checkpoint (class names, model,
    image size; `_newest_readable`)."""
    return _newest_readable(path, _read_metadata)
