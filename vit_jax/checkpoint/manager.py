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

    def __init__(self, workdir: str, *, keep: int, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        handlers = {
            "state": ocp.StandardCheckpointHandler(),
            "metadata": ocp.JsonCheckpointHandler(),
        }
        self._manager = ocp.CheckpointManager(
            checkpoint_dir(workdir), options=options, item_handlers=handlers
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, metadata: dict) -> None:
        """Starts an async save; the next save or `wait` waits for it to be complete."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), metadata=ocp.args.JsonSave(metadata)
        )
        self._manager.save(step, args=args, force=True)

    def reached_preemption(self, step: int) -> bool:
        """Whether a preemption notice arrived; every process answers the same at a step."""
        return self._manager.reached_preemption(step)

    def restore(self, abstract_state: Any, step: int | None = None) -> Any:
        """Restores into the shardings of `abstract_state` (a tree of `jax.ShapeDtypeStruct`).

        A checkpoint of another model is refused with the differing parameters listed,
        before any array is read.
        """
        step = self.latest_step() if step is None else step
        saved = _flat_shapes(self._manager.item_metadata(step)["state"].tree["params"])
        wanted = _flat_shapes(abstract_state.params)
        if saved != wanted:
            diff = sorted(
                f"{k}: checkpoint {saved.get(k, 'missing')}, this run {wanted.get(k, 'missing')}"
                for k in saved.keys() | wanted.keys()
                if saved.get(k) != wanted.get(k)
            )
            raise ValueError(
                f"The checkpoint at step {step} in {self._manager.directory} was written by a "
                f"different model ({len(diff)} entries differ):\n  "
                + "\n  ".join(diff[:20])
                + "\nUse a new --workdir for a new configuration, or restore the original config."
            )
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        return self._manager.restore(step, args=args)["state"]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def _flat_shapes(tree: Any) -> dict[str, tuple]:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {
        jax.tree_util.keystr(path, simple=True, separator="/"): tuple(leaf.shape)
        for path, leaf in leaves
    }


def _find_manager_dir(path: str) -> str:
    """Accepts a workdir or its `checkpoints/` directory."""
    candidate = checkpoint_dir(path)
    return candidate if os.path.isdir(candidate) else path


def _latest(path: str) -> tuple[ocp.CheckpointManager, int]:
    # Naming the handlers lets a fresh process read item metadata before any restore.
    handlers = {"state": ocp.PyTreeCheckpointHandler(), "metadata": ocp.JsonCheckpointHandler()}
    manager = ocp.CheckpointManager(_find_manager_dir(path), item_handlers=handlers)
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
    args = ocp.args.Composite(metadata=ocp.args.JsonRestore())
    return manager.restore(step, args=args)["metadata"]
