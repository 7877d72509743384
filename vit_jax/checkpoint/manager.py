"""Orbax checkpoints of the train state: async saves, keep-N, resume, and params-only reads.

A checkpoint holds two items: `state` (step, params, optimizer state; sharded arrays
written by every process) and `metadata` (JSON: class names, model config, ...).
The data stream is a pure function of seed and step, so the step is all it needs.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(workdir, CHECKPOINT_DIR)


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` with the state/metadata layout above."""

    def __init__(self, workdir: str, *, save_every: int, keep: int, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_every,
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, metadata: dict, *, force: bool = False) -> bool:
        """Starts an (async) save if `step` is due, or always with `force`; returns whether it did."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), metadata=ocp.args.JsonSave(metadata)
        )
        return self._manager.save(step, args=args, force=force)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restores into the shardings of `abstract_state` (a tree of `jax.ShapeDtypeStruct`)."""
        step = self.latest_step() if step is None else step
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), metadata=ocp.args.JsonRestore()
        )
        restored = self._manager.restore(step, args=args)
        return restored["state"], restored["metadata"]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def _find_manager_dir(path: str) -> str:
    """Accepts a workdir or its `checkpoints/` directory."""
    candidate = checkpoint_dir(path)
    return candidate if os.path.isdir(candidate) else path


def _latest(path: str) -> tuple[ocp.CheckpointManager, int]:
    manager = ocp.CheckpointManager(_find_manager_dir(path))
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(
            f"No checkpoint found in {path!r}: expected a vit_jax workdir (with "
            f"'{CHECKPOINT_DIR}/<step>/') or its '{CHECKPOINT_DIR}' directory."
        )
    return manager, step


def load_params(path: str) -> dict:
    """Reads only the parameters of the latest checkpoint, as host numpy arrays.

    Used to start fine-tuning or prediction from a training run without building its
    optimizer state or mesh.
    """
    manager, step = _latest(path)
    tree = manager.item_metadata(step)["state"].tree
    params = tree["params"]
    item = {"params": jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), params)}
    restore_args = {
        "params": jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), params)
    }
    args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
    restored = manager.restore(step, args=ocp.args.Composite(state=args))
    return restored["state"]["params"]


def load_metadata(path: str) -> dict:
    """The JSON metadata saved with the latest checkpoint (class names, model, image size)."""
    manager, step = _latest(path)
    return manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))[
        "metadata"
    ]
