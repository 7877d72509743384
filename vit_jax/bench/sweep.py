"""The fastest setting of a recipe that fits a target: compile candidates, rank the fits.

Candidates vary what changes memory and speed but not what the run computes: sharding
rules and mesh shape (data parallelism, FSDP over the whole slice or node or over halves
of it down to 2 devices, tensor parallelism of 1, 2 or 4), scanned or unrolled blocks,
the remat policy and gradient accumulation. For each mesh every policy (none, selective,
dots, full: cheapest in compute first) is compiled on scanned blocks, with accumulation
from none up until one fits; the costlier policies than the first fit count too: where a
step is bound by HBM traffic, recomputing can move fewer bytes (H/14 on v5p-256 fits
without remat, yet `dots` is estimated 1.22x faster: docs/scale.md). On TPU targets,
where the fastest of those fits is still bound by HBM traffic, every policy is compiled
again at each larger accumulation (smaller micro-batches can let the compiler keep more
of the step in on-chip memory, and a policy that recomputes less may fit there);
otherwise more accumulation only adds work.
Candidates compile in parallel worker processes (each loads the compiler itself); each
one's outcome goes to stderr as it arrives.

On GPU targets each mesh's fit is followed by unrolled blocks, at the policies from the
cheapest up to the fit's, until one fits: that program moves fewer bytes (no stacking
copies), ran 1.47x faster on an H200 (docs/scale.md) and keeps no stacked activations, so
it may fit with less recomputation. It compiles for minutes at H/14 and G/14 depth, so it
is tried with the fit's accumulation only. GPU targets get no more accumulation than a fit
needs: a GPU keeps no array in on-chip memory across kernels, and every B/16, L/16 and
G/14 fit on h100x8x4 compiled at 2, 4 and 8 steps moved more HBM bytes per image and was
estimated slower than at one step (docs/scale.md). TPU targets keep scanned blocks: the
TPU compiler takes minutes for an unrolled program at any size and fits it only by
rematerialising on its own.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import sys
from collections.abc import Callable, Iterator
from typing import Any

import ml_collections

from vit_jax.bench.targets import Target

# Cheapest first: "selective" recomputes only the attention weights, "dots" all but the
# matmuls' outputs, "full" everything.
REMAT_POLICIES = ("none", "selective", "dots", "full")
ACCUM_STEPS = (1, 2, 4, 8)
TENSOR_SIZES = (1, 2, 4)


@dataclasses.dataclass(frozen=True)
class Setting:
    rules: str
    fsdp: int  # Inside a slice or node; data parallelism takes the rest.
    tensor: int
    remat_policy: str
    accum_steps: int
    scan: bool = True

    def overrides(self) -> dict[str, Any]:
        return {
            "sharding_rules": self.rules,
            "mesh.data": -1,
            "mesh.fsdp": self.fsdp,
            "mesh.tensor": self.tensor,
            "model.scan": self.scan,
            "model.remat_policy": self.remat_policy,
            "accum_steps": self.accum_steps,
        }

    def flags(self) -> str:
        return " ".join(f"--config.{k}={str(v).lower()}" for k, v in self.overrides().items())


def meshes(devices_per_slice: int) -> Iterator[tuple[str, int, int]]:
    """(rules, fsdp, tensor): data parallel; FSDP over the whole slice and over each half
    of that down to 2 devices, with data parallelism over the rest; tensor parallelism
    2 and 4 with FSDP over the rest of the slice.

    A smaller FSDP group can be the faster plan (its all-gathers span fewer devices), and
    the one that fits at all where a model's width does not divide by the slice: G/14's
    1,664 over 256 chips (docs/scale.md). One device per slice or node gives data
    parallelism only: FSDP over one device is the same program.
    """
    yield "dp", 1, 1
    fsdp = devices_per_slice
    while fsdp > 1 and devices_per_slice % fsdp == 0:
        yield "fsdp", fsdp, 1
        fsdp //= 2
    for tensor in TENSOR_SIZES[1:]:
        if devices_per_slice % tensor == 0:
            yield "tp", devices_per_slice // tensor, tensor


def _compile_one(
    config: ml_collections.ConfigDict, target: Target, num_classes: int | None, setting: Setting
) -> dict[str, Any]:
    import jax

    from vit_jax.bench.compile import compile_recipe

    # A compile-only program cannot be loaded back from JAX's persistent cache: a worker
    # keeps its programs out of one (the setting holds from before its first compile).
    jax.config.update("jax_enable_compilation_cache", False)
    config = config.copy_and_resolve_references()
    config.update_from_flattened_dict(setting.overrides())
    try:
        figures = compile_recipe(config, target, num_classes)
    except ValueError as e:  # A mesh or batch this setting cannot have.
        return {"fits": False, "error": str(e)}
    return figures


def search_mesh(
    compile_one: Callable[[Setting], dict[str, Any]],
    rules: str,
    fsdp: int,
    tensor: int,
    batch_size: int,
    platform: str,
) -> list[dict[str, Any]]:
    """The figures of one mesh's candidates, in the order compiled: every policy at each
    accumulation up to the first where one fits, then on a GPU target (`platform` "cuda")
    unrolled blocks up to the first fit's policy, on a TPU target ("tpu"), where the fits
    are bound by HBM traffic, every policy at more accumulation (`accumulate_more`).

    `compile_one` gives a setting's figures with `fits` and the `setting` itself.
    """
    tried: list[dict[str, Any]] = []
    for accum in ACCUM_STEPS:
        if batch_size % accum:
            break
        level = [compile_one(Setting(rules, fsdp, tensor, p, accum)) for p in REMAT_POLICIES]
        tried += level
        fits = [f for f in level if f["fits"]]
        if not fits:
            continue
        if platform != "cuda":
            return tried + accumulate_more(compile_one, fits, batch_size)
        first = fits[0]["setting"]
        for cheaper in REMAT_POLICIES[: REMAT_POLICIES.index(first.remat_policy) + 1]:
            tried.append(compile_one(dataclasses.replace(first, scan=False, remat_policy=cheaper)))
            if tried[-1]["fits"]:
                break
        return tried
    return tried


def _img_per_s(figures: dict[str, Any]) -> float:
    return figures.get("estimate_img_per_s") or 0.0


def accumulate_more(
    compile_one: Callable[[Setting], dict[str, Any]], fits: list[dict[str, Any]], batch_size: int
) -> list[dict[str, Any]]:
    """Every policy of a TPU mesh's scanned blocks at each larger accumulation that divides
    the batch, where the fastest of its fits is bound by HBM traffic.

    Smaller micro-batches can let the TPU compiler keep more of a step in on-chip memory:
    B/16 on a v6e-64 (FSDP 64) with remat `dots` at 4 steps of 16 images per chip was
    estimated 1.25x faster than the fastest setting at one step of 64, and a policy that
    recomputes less can fit there: G/14 on that slice fits only with `full` at one step,
    with `dots` from two, estimated 1.06x at eight (docs/scale.md). Not steadily, nor on every
    target: L/16 there (data 2 x FSDP 32, `dots`) was estimated slower at 2 steps and
    faster at 4, B/16 on a v5p-128 slower at each, so every accumulation is compiled. A
    step bound by its matmuls only repeats the weights' gathers. `fits` are figures with
    `setting`, all of one mesh at one accumulation; returns the figures compiled here, in
    order.
    """
    if not fits or max(fits, key=_img_per_s).get("estimate_bound") != "memory":
        return []
    mesh = fits[0]["setting"]
    tried: list[dict[str, Any]] = []
    for accum in ACCUM_STEPS:
        if accum <= mesh.accum_steps:
            continue
        if batch_size % accum:
            break
        for policy in REMAT_POLICIES:
            tried.append(
                compile_one(dataclasses.replace(mesh, remat_policy=policy, accum_steps=accum))
            )
    return tried


def sweep(
    config: ml_collections.ConfigDict,
    target: Target,
    devices_per_slice: int,
    num_classes: int | None = None,
    workers: int = 2,
) -> list[dict[str, Any]]:
    """Every compiled candidate's figures plus `setting` and `flags`; fits first, fastest first."""
    from vit_jax.bench.compile import summarize

    results = []
    context = multiprocessing.get_context("spawn")  # A fresh compiler per worker.
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:

        def compile_one(setting: Setting) -> dict[str, Any]:
            figures = pool.submit(_compile_one, config, target, num_classes, setting).result()
            flags = setting.flags()
            error = figures.get("error")
            outcome = f"not a valid setting: {error}" if error else summarize(figures)
            print(f"compiled {flags}: {outcome}", file=sys.stderr, flush=True)
            return figures | {"setting": setting, "flags": flags}

        def search(mesh: tuple[str, int, int]) -> list[dict[str, Any]]:
            return search_mesh(compile_one, *mesh, config.batch_size, target.platform)

        with concurrent.futures.ThreadPoolExecutor(workers) as threads:
            for found in threads.map(search, meshes(devices_per_slice)):
                results.extend(found)
    return sorted(results, key=lambda f: (not f["fits"], -_img_per_s(f)))
