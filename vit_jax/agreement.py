"""What the processes of a multi-process run must agree on, checked at start-up in one
exchange each (`vit_jax/processes.py`), so that a difference ends every process in one
line instead of a crash or hang in the first collective, or a run that computes
something else:

- `check_processes_agree`: the same config (but `PER_PROCESS` fields), vit_jax code and
  JAX: a host left on other code or flags ran other programs, and the run crashed or hung
  in its first collective; and the same `model_init` weights (each host's own copy of the
  file): each process places its shards and replicas of the parameters from its own.
- `check_processes_read_the_same_data`: the same copy of each dataset the run reads, by
  class names, split sizes and a fingerprint of the records: each process reads its share
  of its own copy by position.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import TYPE_CHECKING, Any

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from vit_jax.processes import allgather_text

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
