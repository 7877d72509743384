"""Periodic evaluations of the training run: one protocol, configured as a list.

`config.evaluators` names them, in the order they run at a step: a kind of `KINDS`
("classification": top-1 and loss on `eval_split`; "fewshot": the paper's linear probe on
`config.fewshot.datasets`), or "package.module:factory" for one defined elsewhere. Each is
built once at start-up by its factory, `factory(config, trainer) -> Evaluator | None`
(None: not configured, e.g. few-shot without datasets), so a wrong setting stops the run
before the workdir is touched. Adding an evaluator (kNN, a robustness split, ReaL labels)
is one file; the loop knows nothing of their kinds.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Protocol

import ml_collections

from vit_jax.preemption import StopRequests


class Evaluator(Protocol):
    """What the loop runs every `every` steps and at the last step.

    `name` names the evaluator's time metric, `time/<name>_s`; `run` returns scalar metrics
    named with their own prefix (e.g. "eval/top1"). It must
    read its batches through `stop.watch(...)` (or call `stop.reached()` after each unit of
    work, identically on every process), so that a stop request abandons it at the next
    batch with `StopRequested`; it must not change `params` (the train state's, not donated).
    """

    name: str
    every: int

    def run(self, params: Any, stop: StopRequests) -> dict[str, float]: ...


Factory = Callable[[ml_collections.ConfigDict, Any], "Evaluator | None"]


def _kinds() -> dict[str, Factory]:
    from vit_jax.evaluators import classification, fewshot

    return {"classification": classification.build, "fewshot": fewshot.build}


def _factory(entry: str) -> Factory:
    kinds = _kinds()
    if entry in kinds:
        return kinds[entry]
    module_name, sep, attribute = entry.partition(":")
    if not sep:
        raise ValueError(
            f"config.evaluators entry {entry!r}: expected one of {sorted(kinds)} or "
            '"package.module:factory" (a function (config, trainer) -> evaluator or None).'
        )
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as e:
        raise ValueError(
            f"config.evaluators entry {entry!r}: cannot import {attribute!r} from "
            f"{module_name!r} ({e}). Check the module is importable (on PYTHONPATH)."
        ) from e


def build_evaluators(config: ml_collections.ConfigDict, trainer: Any) -> list[Evaluator]:
    """The configured evaluators, in `config.evaluators` order, the unconfigured left out.

    `trainer` is the run's `vit_jax.trainer.Trainer` (model, mesh, rules, shardings).
    Raises ValueError for an unknown or unimportable entry, or a bad evaluator setting.
    """
    built = [_factory(str(entry))(config, trainer) for entry in config.evaluators]
    evaluators = [e for e in built if e is not None]
    names = [e.name for e in evaluators]
    if len(names) != len(set(names)):
        raise ValueError(f"config.evaluators {tuple(config.evaluators)}: names repeat {names}.")
    return evaluators
