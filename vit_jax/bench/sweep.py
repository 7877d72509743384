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
A field the command line sets (`--config.model.remat_policy=dots`, `--config.mesh.fsdp=16`,
...) keeps its value: the sweep searches the rest (`search_space`).
Candidates compile in parallel worker processes (each loads the compiler itself), a
mesh's candidates of one accumulation together, and each one's outcome goes to stderr as
it arrives. A compile that fails otherwise than for memory (a compiler error; a worker
killed, as for want of host memory, which fails the pool's other jobs too: those compile
once more in a new pool) counts as not fitting, with the error's first line (`failed`),
and the sweep goes on. The eval step, which remat and accumulation do not change, is
compiled once per program: candidates that share it take its memory figures.

On GPU targets each mesh's fit is followed by unrolled blocks, at the policies from the
cheapest up to the fit's, until one fits: that program moves fewer bytes (no stacking
copies), ran 1.47x faster on an H200 (docs/scale.md) and keeps no stacked activations, so
it may fit with less recomputation. It compiles for minutes at H/14 and G/14 depth, so it
is tried with the fit's accumulation only. On GPU targets a fit at more accumulation moves
more HBM bytes per image (a GPU keeps no array in on-chip memory across kernels: every
B/16, L/16 and G/14 fit on h100x8x4 compiled at 2, 4 and 8 steps was estimated slower
than at one), so only the policies that recompute less than the first fit are compiled
again, each at more accumulation until it fits: G/14 there fits with `full` at one step
and with `dots` at two, estimated 1.04x (docs/scale.md). TPU targets keep scanned blocks: the
TPU compiler takes minutes for an unrolled program at any size and fits it only by
rematerialising on its own.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import ml_collections

from vit_jax import parallel
from vit_jax.bench.targets import Target
from vit_jax.cli import skip_garbage_collection_at_exit
from vit_jax.models import build_model, vit

# Cheapest first: "selective" recomputes only the attention weights, "dots" all but the
# matmuls' outputs, "full" everything.
REMAT_POLICIES = ("none", "selective", "dots", "full")
ACCUM_STEPS = (1, 2, 4, 8)
TENSOR_SIZES = (1, 2, 4)
# Host memory one compile may hold: a G/14 train step's compile held about 8 GB (docs/scale.md).
COMPILE_HOST_BYTES = 8 * 1024**3
CGROUP_MEMORY_LIMIT = "/sys/fs/cgroup/memory.max"  # cgroup v2: bytes, or "max".


def as_flags(values: dict[str, Any]) -> str:
    """`--config.KEY=VALUE` flags of flattened config values, as `vit-train` reads them."""
    return " ".join(f"--config.{k}={str(v).lower()}" for k, v in values.items())


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
        return as_flags(self.overrides())


# The config fields a sweep chooses (flattened keys), those of its mesh first: one given on
# the command line keeps its value.
SWEPT_FIELDS = tuple(Setting("dp", 1, 1, "none", 1).overrides())
MESH_FIELDS = tuple(k for k in SWEPT_FIELDS if k == "sharding_rules" or k.startswith("mesh."))


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


def mesh_name(rules: str, fsdp: int, tensor: int) -> str:
    """A mesh in words by its axes inside a slice: "dp", "fsdp 8", "tp 2 x fsdp 4"; rules
    other than those its axes imply are named after them ("tp 2 x fsdp 4, fsdp rules")."""
    axes = [f"{axis} {size}" for axis, size in (("tp", tensor), ("fsdp", fsdp)) if size > 1]
    implied = "tp" if tensor > 1 else "fsdp" if fsdp > 1 else "dp"
    name = " x ".join(axes) or "dp"
    return name if rules == implied else f"{name}, {rules} rules"


def default_workers() -> int:
    """Compiles a host runs at once: one per core this process may use, and no more than
    its memory (physical, or a cgroup v2 limit below it) holds at `COMPILE_HOST_BYTES`
    each; at least one."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open(CGROUP_MEMORY_LIMIT) as limit:
            memory = min(memory, int(limit.read()))
    except (OSError, ValueError):  # No cgroup v2 limit: "max", or no such file.
        pass
    return max(1, min(len(os.sched_getaffinity(0)), memory // COMPILE_HOST_BYTES))


@dataclasses.dataclass(frozen=True)
class Space:
    """What a sweep compiles on each mesh: these remat policies, each at these accumulation
    steps (cheapest first), on scanned blocks and then, on a GPU target, unrolled ones too
    (`scan` None), or only on the blocks `scan` names."""

    policies: tuple[str, ...] = REMAT_POLICIES
    accum_steps: tuple[int, ...] = ACCUM_STEPS
    scan: bool | None = None

    def unrolled_after_fit(self, platform: str) -> bool:
        """Whether a mesh's scanned fit is followed by unrolled blocks: on a GPU target
        ("cuda"), where the command line leaves the blocks to the sweep."""
        return self.scan is None and platform == "cuda"


def search_space(
    devices_per_slice: int, batch_size: int, fixed: dict[str, Any]
) -> tuple[list[tuple[str, int, int]], Space]:
    """The meshes (rules, fsdp, tensor) and the `Space` a sweep compiles, where `fixed`
    (flattened config keys of `SWEPT_FIELDS`, as the command line gave them) holds fields
    at their values: the candidates of `meshes` that have them (a mesh axis of -1, "the
    rest", any), or the one mesh that sharding_rules, mesh.fsdp and mesh.tensor name
    together.

    Raises:
      ValueError: a remat policy or accumulation the sweep cannot hold, a mesh axis size
        neither -1 nor >= 1, or fixed mesh fields that no candidate has.
    """
    parallel.check_axis_sizes(
        {k.removeprefix("mesh."): v for k, v in fixed.items() if k.startswith("mesh.")}, "mesh"
    )
    candidates = list(meshes(devices_per_slice))
    why = ""  # Why the one mesh named in full cannot be held.
    if {"sharding_rules", "mesh.fsdp", "mesh.tensor"} <= fixed.keys():
        given = (fixed["sharding_rules"], fixed["mesh.fsdp"], fixed["mesh.tensor"])
        _, fsdp, tensor = given
        if min(fsdp, tensor) > 0:  # Else an axis of -1: the candidates of `meshes` have it.
            if devices_per_slice % (fsdp * tensor):
                why = (
                    f" (fsdp {fsdp} x tensor {tensor} = {fsdp * tensor} does not divide its "
                    f"{devices_per_slice} devices)"
                )
            elif given not in candidates:
                candidates.append(given)

    def has_fixed_values(mesh: tuple[str, int, int]) -> bool:
        rules, fsdp, tensor = mesh
        values = {"sharding_rules": rules, "mesh.fsdp": fsdp, "mesh.tensor": tensor,
                  "mesh.data": devices_per_slice // (fsdp * tensor)}  # fmt: skip
        # A mesh axis of -1 takes what the others leave: the sweep chooses those.
        return all(fixed[k] in (v, -1) for k, v in values.items() if k in fixed)

    kept = [mesh for mesh in candidates if has_fixed_values(mesh)]
    if not kept:
        named = ", ".join(f"--config.{k}={fixed[k]}" for k in MESH_FIELDS if k in fixed)
        choices = "; ".join(mesh_name(*mesh) for mesh in candidates)
        advice = (
            f"Name a mesh.fsdp and mesh.tensor whose product divides {devices_per_slice}"
            if why
            else "Fix fewer mesh fields, or name sharding_rules, mesh.fsdp and mesh.tensor together"
        )
        raise ValueError(
            f"No mesh the sweep compiles on {devices_per_slice} devices per slice or node has "
            f"{named}{why}; its meshes are: {choices}. {advice}."
        )
    policy = fixed.get("model.remat_policy")
    if policy is not None and policy not in vit.REMAT_POLICIES:
        raise ValueError(
            f"--config.model.remat_policy={policy}: choose one of {tuple(vit.REMAT_POLICIES)}."
        )
    accum = fixed.get("accum_steps")
    if accum is not None and (accum < 1 or batch_size % accum):
        raise ValueError(
            f"--config.accum_steps={accum} must be at least 1 and divide batch_size {batch_size}."
        )
    space = Space(
        policies=REMAT_POLICIES if policy is None else (policy,),
        accum_steps=ACCUM_STEPS if accum is None else (accum,),
        scan=fixed.get("model.scan"),
    )
    return kept, space


def describe_search(
    mesh_candidates: list[tuple[str, int, int]], space: Space, platform: str, workers: int
) -> str:
    """What a sweep searches: its meshes, blocks, policies and accumulations, the fewest
    compiles that takes, how many run at once, and for unrolled blocks on a TPU target
    that each compile is slow (an unrolled B/16 step for a v5e-4: 70-280 s on 2 cores,
    docs/fsdp-on-tpu.md)."""
    blocks = "unrolled" if space.scan is False else "scanned"
    if space.unrolled_after_fit(platform):
        blocks += ", then unrolled"
    said = (
        f"{len(mesh_candidates)} mesh(es) ({'; '.join(mesh_name(*m) for m in mesh_candidates)}),"
        f" {blocks} blocks, remat {', '.join(space.policies)}, accumulation"
        f" {', '.join(map(str, space.accum_steps))} steps: at least"
        f" {len(mesh_candidates) * len(space.policies)} compile(s), {workers} at once (--workers)"
    )
    if space.scan is False and platform == "tpu":
        said += "; unrolled, a ViT-B or larger takes the TPU compiler minutes per compile"
    return said


def _compile_one(
    config: ml_collections.ConfigDict,
    target: Target,
    num_classes: int | None,
    eval_programs: dict[str, dict],
    setting: Setting,
    peak: float | None = None,
) -> dict[str, Any]:
    import jax

    from vit_jax.bench.compile import compile_recipe

    # A compile-only program cannot be loaded back from JAX's persistent cache: a worker
    # keeps its programs out of one (the setting holds from before its first compile).
    jax.config.update("jax_enable_compilation_cache", False)
    config = config.copy_and_resolve_references()
    config.update_from_flattened_dict(setting.overrides())
    try:
        figures = compile_recipe(config, target, num_classes, eval_programs, peak)
    except ValueError as e:  # A mesh or batch this setting cannot have.
        return {"fits": False, "error": str(e)}
    return figures


def search_mesh(
    compile_all: Callable[[list[Setting]], list[dict[str, Any]]],
    rules: str,
    fsdp: int,
    tensor: int,
    batch_size: int,
    platform: str,
    space: Space = Space(),
) -> list[dict[str, Any]]:
    """The figures of one mesh's candidates, in the order compiled: every policy of
    `space` at each of its accumulations up to the first where one fits; then on a GPU
    target (`platform` "cuda") the policies cheaper than the first fit at more accumulation
    until each fits (`fit_cheaper_policies`) and unrolled blocks up to the first fit's
    policy; on a TPU target ("tpu"), where the fits are bound by HBM traffic, every policy
    at more accumulation (`accumulate_more`).

    `compile_all` gives the figures of settings compiled together (each with `fits` and
    the `setting` itself), in their order.
    """
    tried: list[dict[str, Any]] = []
    scan = space.scan is not False
    for accum in space.accum_steps:
        if batch_size % accum:
            break
        level = compile_all([Setting(rules, fsdp, tensor, p, accum, scan) for p in space.policies])
        tried += level
        fits = [f for f in level if f["fits"]]
        if not fits:
            continue
        if platform != "cuda":
            return tried + accumulate_more(compile_all, fits, batch_size, space)
        first = fits[0]["setting"]
        tried += fit_cheaper_policies(compile_all, first, batch_size, space)
        if not space.unrolled_after_fit(platform):  # Blocks as the command line gave them.
            return tried
        cheaper = space.policies[: space.policies.index(first.remat_policy) + 1]
        for policy in cheaper:  # One at a time: the first that fits ends it.
            tried += compile_all([dataclasses.replace(first, scan=False, remat_policy=policy)])
            if tried[-1]["fits"]:
                break
        return tried
    return tried


def fit_cheaper_policies(
    compile_all: Callable[[list[Setting]], list[dict[str, Any]]],
    first: Setting,
    batch_size: int,
    space: Space = Space(),
) -> list[dict[str, Any]]:
    """The policies of `space` that recompute less than `first`, a mesh's first fit (they
    did not fit at its accumulation), at each larger accumulation that divides the batch
    until each fits; the figures compiled here, in order. Recomputing less can outweigh
    the bytes a smaller micro-batch adds: G/14 on h100x8x4 (FSDP 8) fits with `full` at
    one step and `dots` at two, estimated 1.04x (docs/scale.md)."""
    waiting = space.policies[: space.policies.index(first.remat_policy)]
    tried: list[dict[str, Any]] = []
    for accum in _more_accumulation(space, first.accum_steps, batch_size):
        if not waiting:
            break
        level = compile_all([dataclasses.replace(first, remat_policy=p, accum_steps=accum)
                             for p in waiting])  # fmt: skip
        tried += level
        waiting = tuple(f["setting"].remat_policy for f in level if not f["fits"])
    return tried


def _more_accumulation(space: Space, accum_steps: int, batch_size: int) -> list[int]:
    """The accumulations of `space` above `accum_steps`, up to the first that does not
    divide the batch."""
    more = []
    for accum in space.accum_steps:
        if accum <= accum_steps:
            continue
        if batch_size % accum:
            break
        more.append(accum)
    return more


def _img_per_s(figures: dict[str, Any]) -> float:
    return figures.get("estimate_img_per_s") or 0.0


def accumulate_more(
    compile_all: Callable[[list[Setting]], list[dict[str, Any]]],
    fits: list[dict[str, Any]],
    batch_size: int,
    space: Space = Space(),
) -> list[dict[str, Any]]:
    """Every policy of `space` on a TPU mesh at each larger accumulation of it that divides
    the batch, where the fastest of the mesh's fits is bound by HBM traffic.

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
    settings = [
        dataclasses.replace(mesh, remat_policy=policy, accum_steps=accum)
        for accum in _more_accumulation(space, mesh.accum_steps, batch_size)
        for policy in space.policies
    ]
    return compile_all(settings) if settings else []


# What a candidate whose worker process died (its pool's other jobs die with it) says after
# it died again in a new pool: killed, as for want of host memory, or crashed.
DIED = (
    "its compiler process died, also when compiled again (killed, as for want of host "
    "memory, or crashed; fewer --workers leave each compile more memory)"
)


class _Pool:
    """Worker processes for compiles, started anew where one died: a process pool that has
    lost a worker fails every job it holds (`BrokenProcessPool`) and takes no more."""

    def __init__(self, workers: int):
        self._workers = workers
        self._context = multiprocessing.get_context("spawn")  # A fresh compiler per worker.
        self._lock = threading.Lock()
        self._pool = self._start()

    def _start(self) -> concurrent.futures.ProcessPoolExecutor:
        return concurrent.futures.ProcessPoolExecutor(
            self._workers, mp_context=self._context, initializer=skip_garbage_collection_at_exit
        )

    def submit(self, *args: Any) -> concurrent.futures.Future:
        with self._lock:
            try:
                return self._pool.submit(*args)
            except BrokenProcessPool:
                self._pool.shutdown(wait=False)
                self._pool = self._start()
                return self._pool.submit(*args)

    def shutdown(self) -> None:
        self._pool.shutdown()


def _first_line(error: BaseException) -> str:
    """`error`'s type and the first line of its message."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def sweep(
    config: ml_collections.ConfigDict,
    target: Target,
    devices_per_slice: int,
    num_classes: int | None = None,
    workers: int | None = None,
    fixed: dict[str, Any] | None = None,
    peak: float | None = None,
) -> list[dict[str, Any]]:
    """Every compiled candidate's figures plus `setting` and `flags`; fits first, fastest
    first. `workers`: compiler processes at once (default: `default_workers()`); `fixed`:
    config fields the sweep keeps (`search_space`); `peak`: as `compile_recipe` takes it.

    Raises:
      ValueError: fixed fields the sweep cannot hold (`search_space`), a `model` the
        target cannot run (`build_model`: its dtype, cuDNN attention), or a config no
        candidate is a valid setting of (the first one's reason).
    """
    import jax

    from vit_jax.bench.compile import summarize

    fixed = fixed or {}
    workers = workers or default_workers()
    mesh_candidates, space = search_space(devices_per_slice, config.batch_size, fixed)
    build_model(config.model, 1, target.platform)  # Every candidate's: before compiling.
    searched = describe_search(mesh_candidates, space, target.platform, workers)
    kept = f" keeps {as_flags(fixed)}" if fixed else ""
    print(f"sweep{kept}: {searched}", file=sys.stderr)
    results = []
    # The eval step's memory by program: remat and accumulation change only the train step,
    # so a mesh's candidates share one eval step, compiled for the first of them.
    eval_programs: dict[str, dict] = {}
    compiled_blocks: set[Setting] = set()  # Meshes and blocks (scanned or not) compiled.
    pool = _Pool(workers)

    def submit(setting: Setting) -> concurrent.futures.Future:
        known = dict(eval_programs)
        return pool.submit(_compile_one, config, target, num_classes, known, setting, peak)

    def outcome(job: concurrent.futures.Future) -> dict[str, Any]:
        try:
            return job.result()
        except jax.errors.JaxRuntimeError as e:  # Out of memory is `fits` False already.
            return {"fits": False, "failed": _first_line(e)}

    def result(setting: Setting, job: concurrent.futures.Future) -> dict[str, Any]:
        try:
            figures = outcome(job)
        except BrokenProcessPool:  # A worker died, and the pool's jobs with it: once more.
            try:
                figures = outcome(submit(setting))
            except BrokenProcessPool:
                figures = {"fits": False, "failed": DIED}
        if figures.get("eval_compile_s") is not None:
            memory = ("eval_total_bytes", "eval_compiler_message")
            eval_programs[figures["eval_program"]] = {k: figures[k] for k in memory if k in figures}
        flags = setting.flags()
        if figures.get("error"):
            said = f"not a valid setting: {figures['error']}"
        elif figures.get("failed"):
            said = f"failed: {figures['failed']}"
        else:
            said = summarize(figures)
        print(f"compiled {flags}: {said}", file=sys.stderr, flush=True)
        return figures | {"setting": setting, "flags": flags}

    def compile_all(settings: list[Setting]) -> list[dict[str, Any]]:
        """At once; on blocks of a mesh not compiled before, the first alone before
        the rest, so that its eval step serves theirs."""
        blocks = dataclasses.replace(settings[0], remat_policy="", accum_steps=0)
        head = [] if blocks in compiled_blocks else settings[:1]
        done = [result(setting, submit(setting)) for setting in head]
        compiled_blocks.add(blocks)
        jobs = [(setting, submit(setting)) for setting in settings[len(head) :]]
        return done + [result(setting, job) for setting, job in jobs]

    def search(mesh: tuple[str, int, int]) -> list[dict[str, Any]]:
        return search_mesh(compile_all, *mesh, config.batch_size, target.platform, space)

    try:
        with concurrent.futures.ThreadPoolExecutor(workers) as threads:
            for found in threads.map(search, mesh_candidates):
                results.extend(found)
    finally:
        pool.shutdown()
    if all(f.get("error") for f in results):
        raise ValueError(f"no candidate is a valid setting of this config: {results[0]['error']}")
    return sorted(results, key=lambda f: (not f["fits"], -_img_per_s(f)))
