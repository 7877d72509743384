"""The train-state checkpoints through Orbax's current API (preservation policy, handler
registry, step metadata): keep-N, and workdirs written with the API used before (max_to_keep,
item_handlers) still restore, state, parameters and metadata alike."""

import logging
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from vit_jax.checkpoint import manager
from vit_jax.checkpoint.manager import (
    STATE_ITEM,
    Checkpointer,
    checkpoint_dir,
    load_metadata,
    load_params,
)
from vit_jax.trainer import TrainState

METADATA = {"class_names": ["cat", "dog"], "image_size": 8, "model": {"name": "Ti/4"}}


def make_state(step: int) -> TrainState:
    rng = np.random.default_rng(step)
    params = {
        "embedding": {"kernel": rng.normal(size=(4, 4, 3, 8)).astype(np.float32)},
        "head": {"bias": rng.normal(size=(2,)).astype(np.float32)},
    }
    opt_state = {"mu": jax.tree.map(np.zeros_like, params), "count": np.int32(step)}
    return TrainState(step=np.int32(step), params=params, opt_state=opt_state)


def abstract(state: TrainState) -> TrainState:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), state)


def assert_same(tree, expected) -> None:
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(tree), expected)


def write_the_old_way(workdir: str, steps: list[int]) -> None:
    """The calls vit_jax made before the current API: max_to_keep and item_handlers."""
    options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
    handlers = {
        STATE_ITEM: ocp.StandardCheckpointHandler(),
        "metadata": ocp.JsonCheckpointHandler(),
    }
    manager = ocp.CheckpointManager(
        checkpoint_dir(workdir), options=options, item_handlers=handlers
    )
    for step in steps:
        args = ocp.args.Composite(
            **{STATE_ITEM: ocp.args.StandardSave(make_state(step))},
            metadata=ocp.args.JsonSave(METADATA | {"step": step}),
        )
        manager.save(step, args=args, force=True)
    manager.wait_until_finished()
    manager.close()


def test_a_workdir_written_with_the_former_orbax_api_is_restored(tmp_path, monkeypatch):
    workdir = str(tmp_path)
    write_the_old_way(workdir, [1, 2, 3])
    forbid_deprecated_api(monkeypatch)
    checkpointer = Checkpointer(workdir, keep=2)
    assert checkpointer.steps() == [2, 3]
    restored = checkpointer.restore(abstract(make_state(3)), 3)
    assert_same(restored, make_state(3))
    checkpointer.close()
    assert_same(load_params(workdir), make_state(3).params)
    assert load_metadata(workdir) == METADATA | {"step": 3}


def forbid_deprecated_api(monkeypatch) -> None:
    """Fails any use of what the installed Orbax deprecates."""
    init = ocp.CheckpointManager.__init__

    def checked_init(self, directory, *args, **kwargs):
        options = kwargs.get("options")
        assert kwargs.get("item_handlers") is None, "item_handlers: use handler_registry"
        assert options is None or options.max_to_keep is None, "use preservation_policy"
        init(self, directory, *args, **kwargs)

    def item_metadata(self, step):
        raise AssertionError("item_metadata(step): use metadata(step).item_metadata")

    monkeypatch.setattr(ocp.CheckpointManager, "__init__", checked_init)
    monkeypatch.setattr(ocp.CheckpointManager, "item_metadata", item_metadata)


def test_keeps_the_newest_checkpoints_and_reads_them_back(tmp_path, monkeypatch):
    forbid_deprecated_api(monkeypatch)
    workdir = str(tmp_path)
    checkpointer = Checkpointer(workdir, keep=2)
    for step in (1, 2, 3):
        checkpointer.save(step, make_state(step), METADATA | {"step": step})
    checkpointer.wait()
    assert checkpointer.steps() == [2, 3]
    assert_same(checkpointer.restore(abstract(make_state(2)), 2), make_state(2))
    checkpointer.close()
    # A fresh process reads the newest one's parameters and metadata without the state's
    # structure (vit-predict, vit-export).
    assert_same(load_params(workdir), make_state(3).params)
    assert load_metadata(workdir) == METADATA | {"step": 3}


def _drop_state_metadata(step_dir) -> None:  # A save cut short before it was complete.
    (step_dir / "state" / "_METADATA").unlink()


def _truncate_arrays(step_dir) -> None:  # Array files cut in half.
    for path in (step_dir / "state").rglob("*"):
        if path.is_file() and path.stat().st_size > 1024:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", [_drop_state_metadata, _truncate_arrays])
def test_the_commands_read_the_newest_checkpoint_they_can(tmp_path, damage, caplog):
    """vit-predict, vit-export, vit-fewshot, vit-visualize and model_init skip a damaged
    newest step, as a resuming run does (each was a traceback)."""
    workdir = str(tmp_path)
    checkpointer = Checkpointer(workdir, keep=3)
    for step in (1, 2):
        checkpointer.save(step, make_state(step), METADATA | {"step": step})
    checkpointer.close()
    damage(tmp_path / "checkpoints" / "2")
    assert_same(load_params(workdir), make_state(1).params)
    assert f"Cannot read checkpoint {tmp_path}/checkpoints/2 (step 2: " in caplog.text
    if damage is _drop_state_metadata:  # Metadata of a step whose state cannot be read: no.
        assert load_metadata(workdir) == METADATA | {"step": 1}
    damage(tmp_path / "checkpoints" / "1")
    with pytest.raises(ValueError, match=r"^None of the checkpoints in .* can be read: step 2: "):
        load_params(workdir)


def test_a_workdir_on_gs_is_read_from_its_checkpoints_directory(cloud_storage):
    """A workdir on gs:// (model_init, --checkpoint, vit-export) was looked into with
    os.path, which sees no URL: the workdir itself was taken for its checkpoints directory,
    and "No checkpoint found" said."""
    (cloud_storage / "bucket" / "run" / "checkpoints").mkdir(parents=True)
    for path in ("gs://bucket/run", "gs://bucket/run/checkpoints"):
        assert manager._find_manager_dir(path) == "gs://bucket/run/checkpoints"


def test_a_checkpoints_path_that_is_a_file_is_refused_before_any_step(tmp_path):
    """Orbax failed at the first save, then waited minutes for its other processes."""
    (tmp_path / "checkpoints").write_text("")
    with pytest.raises(NotADirectoryError, match=r"checkpoints is a file, where the run keeps"):
        Checkpointer(str(tmp_path), keep=2)


IMPORT_THEN_CHECKPOINTER = """
import logging, sys
import vit_jax.checkpoint.manager as manager

def installed():
    filters = [f for name in ("absl", "asyncio") for f in logging.getLogger(name).filters]
    return len(filters), sys.unraisablehook is sys.__unraisablehook__

print(installed())
manager.Checkpointer(sys.argv[1], keep=1).close()
manager.Checkpointer(sys.argv[1], keep=1).close()
print(installed())
"""


def test_importing_the_checkpoints_leaves_logging_and_hooks_as_they_were(tmp_path):
    """The filter and hook that drop a failed save's echoes are a run's, installed once by its
    first Checkpointer: a library user who imports vit_jax keeps their own."""
    out = subprocess.run(
        [sys.executable, "-c", IMPORT_THEN_CHECKPOINTER, str(tmp_path)],
        capture_output=True, text=True, check=True,
    ).stdout.split("\n")  # fmt: skip
    assert out[:2] == ["(0, True)", "(2, False)"]


def test_a_failed_writes_error_left_on_a_future_is_not_echoed(tmp_path, caplog):
    """asyncio logs an exception set on a future that nobody retrieved when the future is
    collected, with no frames (it was never raised): the error of a write into a save under
    way, which the Checkpointer reports in its own line. Seen once as the last line of a
    run whose disk refused a save. Other errors on asyncio's logger still show."""
    Checkpointer(str(tmp_path), keep=1).close()  # Installs the filter, as a run does.
    write = ValueError(
        f'OUT_OF_RANGE: Error writing "params" in OCDBT database at local file '
        f'"{tmp_path}/checkpoints/20.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/": '
        "File too large [os_error_code='27']"
    )
    other = ValueError("a callback of the user's own")
    with caplog.at_level(logging.ERROR):
        for error in (write, other):
            logging.getLogger("asyncio").error(
                "Future exception was never retrieved", exc_info=(ValueError, error, None)
            )
    assert [r.exc_info[1] for r in caplog.records] == [other]


def test_a_folder_of_weights_files_names_them(tmp_path):
    """A hub download (`hf download ... --local-dir folder`) is a folder: given as a
    checkpoint, the refusal names the file to give instead."""
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as refused:
        manager.load_params(str(tmp_path))
    assert str(refused.value).endswith(
        f"directory; to read a weights file in it, name the file: {tmp_path}/model.safetensors."
    )
