"""Collectives of an optimized HLO module: kind, bytes per step, and whether they cross
slices (or nodes).

The text of `Compiled.as_text()` is read: each collective's result shape gives its bytes,
its replica groups (listed, XLA's iota form `[G,S]<=[dims]T(perm)`, or its mesh form
`mesh[...] {axes}`) the devices it spans. On a TPU multi-slice program the compiler hands
the cross-slice part of a collective to the DCN runtime as a host-transfer `send` marked
with its transfer type; those count as cross-slice collectives. A collective inside a
while loop (a scanned encoder, gradient accumulation) runs once per iteration: its count
and bytes are multiplied by the loop's trip count (the GPU compiler writes it on the loop
as `known_trip_count`; the TPU compiler does not, and it is read from the loop's condition,
`counter < N` from a constant start, the form JAX's scan and fori_loop lower to).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import re
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
    "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
    "f8e4m3fn": 1, "f8e5m2": 1,
}  # fmt: skip

_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTRUCTION = re.compile(
    r"=\s*(?P<shape>.+?)\s+(?P<kind>" + "|".join(KINDS) + r")(?P<start>-start)?\("
)
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+(?:fn)?)?)\[([\d,]*)\]")
_LAID_OUT = re.compile(_ARRAY.pattern + r"(\{[^}]*\})?")
_CALLED = re.compile(
    r"\b(calls|to_apply|body|condition|branch_computations)=(\{[^}]*\}|%?[\w.\-]+)"
)
_MEGASCALE = re.compile(r' send\(.*_xla_megascale_transfer_type="(\w+)"')
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


@dataclasses.dataclass
class Collective:
    kind: str
    bytes: int  # Of the results on one device, per execution (a combined one sums them).
    group_size: int
    cross_slice: bool
    executions: int  # Per step: the trip counts of the loops around it multiplied.


class Instruction(NamedTuple):
    """One instruction of a parsed computation."""

    hbm_bytes: int  # Of its result in HBM (0 for arrays placed in on-chip memory).
    op: str
    operands: list[str]  # Names.
    line: str
    bytes: int  # Of its result, wherever it lies.


def _array_bytes(shape_text: str, hbm_only: bool = False) -> list[int]:
    """Bytes of each array in a type. `hbm_only`: 0 for an array whose layout places it in
    another memory space (`S(n)`, n > 0: a TPU's on-chip VMEM, SMEM, ...)."""
    sizes = []
    for dtype, dims, layout in _LAID_OUT.findall(shape_text):
        if dtype in DTYPE_BYTES:
            on_chip = hbm_only and re.search(r"S\([1-9]\d*\)", layout)
            size = DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d]))
            sizes.append(0 if on_chip else size)
    return sizes


def _operands(line: str, start: int) -> str:
    """The operand list that opens at `start` (layouts such as `{1,0:T(8,128)}` nest parens)."""
    depth = 1
    for end in range(start, len(line)):
        depth += {"(": 1, ")": -1}.get(line[end], 0)
        if depth == 0:
            return line[start:end]
    return line[start:]


def _iota(dims: str, perm: str | None) -> np.ndarray:
    shape = [int(x) for x in dims.split(",")]
    ids = np.arange(int(np.prod(shape))).reshape(shape)
    return ids.transpose([int(x) for x in perm.split(",")]) if perm else ids


def _mesh_groups(line: str) -> list[list[int]] | None:
    """XLA's mesh form: `mesh['a'=4,'b'=2], device_ids=([2,4]T(1,0)) {'a'}`, groups over `a`."""
    found = re.search(
        r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\))?"
        r" \{([^}]*)\}",
        line,
    )
    if found is None:
        return None
    axes = re.findall(r"'(\w+)'=(\d+)", found.group(1))
    names, sizes = [a for a, _ in axes], [int(n) for _, n in axes]
    ids = _iota(found.group(2), found.group(3)) if found.group(2) else np.arange(np.prod(sizes))
    ids = ids.reshape(sizes)
    over = [names.index(a) for a in re.findall(r"'(\w+)'", found.group(4))]
    rest = [i for i in range(len(names)) if i not in over]
    return ids.transpose(rest + over).reshape(-1, int(np.prod([sizes[i] for i in over]))).tolist()


def _groups(line: str, num_devices: int) -> list[list[int]]:
    mesh = _mesh_groups(line)
    if mesh is not None:
        return mesh
    iota = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
    if iota:
        shape = [int(x) for x in iota.group(1).split(",")]
        return _iota(iota.group(2), iota.group(3)).reshape(shape).tolist()
    listed = re.search(r"(?:replica_groups|source_target_pairs)=\{(\{[\d,{}\s]*\})\}", line)
    if listed:
        return [
            [int(x) for x in g.split(",") if x]
            for g in re.findall(r"\{([\d,\s]*)\}", listed.group(1))
        ]
    return [list(range(num_devices))]


def _constant(instr: Instruction | None) -> int | None:
    if instr is None or instr.op != "constant":
        return None
    value = re.search(r"constant\((-?\d+)\)", instr.line)
    return int(value.group(1)) if value else None


def _trip_counts(text: str) -> dict[str, int]:
    """Trip count by the name of a while loop's body, for loops that run `counter < N`
    (N a constant) with the counter starting from a constant, 0 when it is not one."""
    computations = _computations(text)
    found = {}
    for computation in computations.values():
        instrs = computation["instrs"]
        for instr in instrs.values():
            loop = re.search(r"condition=%?([\w.\-]+), body=%?([\w.\-]+)", instr.line)
            if instr.op != "while" or loop is None or loop.group(1) not in computations:
                continue
            condition = computations[loop.group(1)]
            root = condition["instrs"].get(condition["root"])
            if root is None or root.op != "compare" or "direction=LT" not in root.line:
                continue
            bound = _constant(condition["instrs"].get(root.operands[-1]))
            init = instrs.get(instr.operands[0]) if instr.operands else None
            start = None
            if init is not None and init.op == "tuple":
                start = _constant(instrs.get(init.operands[0]))
            if bound is not None:
                found[loop.group(2)] = max(bound - (start or 0), 0)
    return found


def _executions(text: str, kernels_only: bool = False) -> dict[str, int]:
    """How many times each computation runs per execution of the entry computation.

    `kernels_only`: leave out what runs inside a kernel (fusion bodies, reducers).
    """
    trip_counts = None
    calls: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
    entry, current = None, None
    for line in text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            current = header.group(2)
            entry = current if header.group(1) else entry
            continue
        if current is None:
            continue
        trip = _TRIP.search(line)
        for called in _CALLED.finditer(line):
            if kernels_only and (called.group(1) == "to_apply" or " fusion(" in line):
                continue
            names = re.findall(r"[\w.\-]+", called.group(2))
            factor = 1
            if called.group(1) == "body" and trip:
                factor = int(trip.group(1))
            elif called.group(1) == "body":
                trip_counts = _trip_counts(text) if trip_counts is None else trip_counts
                factor = trip_counts.get(names[0], 1)
            for name in names:
                calls[current].append((name, factor))
    counts: dict[str, int] = collections.defaultdict(int)

    def visit(name: str, times: int) -> None:
        counts[name] += times
        for callee, factor in calls.get(name, ()):
            visit(callee, times * factor)

    if entry is not None:
        visit(entry, 1)
    return counts


def collectives(text: str, slice_of_device: Sequence[int]) -> list[Collective]:
    """The collectives of optimized HLO `text`; `slice_of_device[i]` is the slice (or node)
    of the i-th device of the program's device assignment (the mesh's devices, flattened)."""
    runs = _executions(text)
    num_slices = len(set(slice_of_device))
    found, current = [], None
    for line in text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            current = header.group(2)
            continue
        executions = max(runs.get(current, 1), 1)
        dcn = _MEGASCALE.search(line)
        if dcn:  # TPU multi-slice: the cross-slice part of a collective goes to the DCN runtime.
            found.append(
                Collective(
                    kind=dcn.group(1).lower().replace("_", "-"),
                    bytes=sum(_array_bytes(line.split(" send(")[0])),
                    group_size=num_slices,
                    cross_slice=True,
                    executions=executions,
                )
            )
            continue
        match = _INSTRUCTION.search(line)
        if match is None:
            continue
        kind, result = match.group("kind"), sum(_array_bytes(match.group("shape")))
        scattered = _scattered_bytes(text, current, line) if kind == "all-reduce" else None
        if scattered is not None:
            kind, result = "reduce-scatter", scattered
        if not result:
            continue
        if match.group("start"):  # An async start's result holds its operands too.
            operands = _operand_bytes(text, current, _operands(line, match.end()))
            result = result - operands if result > operands else result
        groups = _groups(line, len(slice_of_device))
        crosses = any(len({slice_of_device[i] for i in g}) > 1 for g in groups)
        found.append(
            Collective(
                kind=kind,
                bytes=result,
                group_size=max(len(g) for g in groups),
                cross_slice=crosses,
                executions=executions,
            )
        )
    return found


def _operand_bytes(text: str, computation: str | None, operands: str) -> int:
    """Bytes of an instruction's operands: from their types where the text gives them, else
    from the instructions that define them (newer XLA prints operands by name alone)."""
    typed = _array_bytes(operands)
    if typed:
        return sum(typed)
    instrs = _computations(text).get(computation, {"instrs": {}})["instrs"]
    return sum(
        instrs[name].bytes for name in re.findall(r"%([\w.\-]+)", operands) if name in instrs
    )


def bytes_sent(c: Collective) -> float:
    """Bytes one device sends per execution, by the ring algorithms: n - 1 steps, each of
    one n-th of the full buffer (a reduce-scatter's result is that n-th; an all-reduce is a
    reduce-scatter and an all-gather)."""
    n = c.group_size
    if n <= 1:
        return 0.0
    share = {"all-reduce": 2 * (n - 1) / n, "reduce-scatter": n - 1, "collective-permute": 1.0}
    return share.get(c.kind, (n - 1) / n) * c.bytes


def _fusion_body(instr: Instruction) -> str:
    """The name of the computation a fusion instruction runs."""
    return re.search(r"calls=%?([\w.\-]+)", instr.line).group(1)


@functools.lru_cache(maxsize=1)
def _fusion_bodies(text: str) -> frozenset[str]:
    return frozenset(
        _fusion_body(instr)
        for computation in _computations(text).values()
        for instr in computation["instrs"].values()
        if instr.op == "fusion"
    )


def _scattered_bytes(text: str, computation: str | None, line: str) -> int | None:
    """The bytes each device keeps of the all-reduce on `line` when it lies in a fusion whose
    results are only dynamic slices of it: the TPU compiler's reduce-scatter kernel (the
    full sum never reaches HBM). None for any other all-reduce."""
    if computation not in _fusion_bodies(text):
        return None
    body = _computations(text)[computation]
    name = _definition(line)[0]
    instrs, root = body["instrs"], body["root"]
    results = instrs[root].operands if instrs[root].op == "tuple" else [root]
    kept = 0
    for result in results:
        instr = instrs[result]
        source = instr.operands[0] if instr.operands else None
        if source in instrs and instrs[source].op == "get-tuple-element":
            source = instrs[source].operands[0]
        if instr.op != "dynamic-slice" or source != name:
            return None
        kept += instr.bytes
    return kept


# Instructions that move no data of their own (views, tuples, control flow).
_NO_TRAFFIC = {
    "parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "call",
    "conditional", "after-all", "partition-id", "replica-id", "iota", "opt-barrier",
    "async-start",  # Its called computation's kernels are counted where they run.
}  # fmt: skip


def _definition(line: str) -> tuple[str, str, str, str] | None:
    """(name, result type, opcode, operand text) of an instruction line, or None."""
    head = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*", line)
    if head is None:
        return None
    rest = line[head.end() :]
    if rest.startswith("("):  # A tuple type, whose layouts may nest parentheses.
        end = len(_operands(rest, 1)) + 2
        kind, rest = rest[:end], rest[end:].lstrip()
    else:
        kind, _, rest = rest.partition(" ")
    op = re.match(r"([\w\-]+)\(", rest)
    if op is None:
        return None
    return head.group(1), kind, op.group(1), _operands(rest, op.end())


@functools.lru_cache(maxsize=1)  # Parsed once for the loops' trip counts and the traffic.
def _computations(text: str) -> dict[str, dict]:
    """Per computation: its instructions (name -> `Instruction`), parameter names by
    index, the root's name, and the users of each value (name -> (user, operand position))."""
    found: dict[str, dict] = {}
    current = None
    for line in text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            current = found.setdefault(
                header.group(2), {"instrs": {}, "params": {}, "root": None, "users": {}}
            )
            continue
        definition = _definition(line) if current is not None else None
        if definition is None:
            continue
        name, kind, op, operands = definition
        current["instrs"][name] = Instruction(
            hbm_bytes=sum(_array_bytes(kind, hbm_only=True)),
            op=op,
            operands=re.findall(r"%([\w.\-]+)", operands),
            line=line,
            bytes=sum(_array_bytes(kind)),
        )
        for position, operand in enumerate(current["instrs"][name].operands):
            current["users"].setdefault(operand, []).append((name, position))
        if op == "parameter":
            current["params"][int(re.search(r"parameter\((\d+)\)", line).group(1))] = name
        if line.lstrip().startswith("ROOT"):
            current["root"] = name
    return found


def _bitcast_source(instrs: dict, name: str) -> str:
    """The value `name` views through a chain of bitcasts (the same buffer reinterpreted,
    which moves no bytes), or `name` itself."""
    while name in instrs and instrs[name].op == "bitcast":
        name = instrs[name].operands[0]
    return name


def _parameter_read(computations: dict, body: dict, param: str | None, size: int) -> int:
    """Bytes a fusion reads of one operand: the slices when it is only dynamically sliced
    (directly, through bitcasts of it, or inside a nested fusion), all of it otherwise."""
    uses = body["users"].get(param, [])
    read = 0
    for user, position in uses:
        instr = body["instrs"][user]
        if instr.op == "dynamic-slice" and position == 0:
            read += instr.bytes
        elif instr.op == "bitcast":
            read += _parameter_read(computations, body, user, size)
        elif instr.op == "fusion":
            nested = computations[_fusion_body(instr)]
            read += _parameter_read(computations, nested, nested["params"].get(position), size)
        else:
            return size
    return min(read, size) if uses else size


def _fusion_traffic(
    computations: dict, body: dict, operand_bytes: list[int], result_bytes: int
) -> int:
    """Bytes a fusion kernel moves: operands read only through dynamic slices count their
    slices, a buffer that a dynamic-update-slice among the results (the root, or an element
    of a multi-output fusion's root tuple) updates in place counts its update. The GPU
    compiler often updates a bitcast of the parameter (the stack in another shape, the same
    bytes): that too is the parameter's buffer, updated in place."""
    instrs, root = body["instrs"], body["root"]
    results = [root]
    if root is not None and instrs[root].op == "tuple":
        results = instrs[root].operands
    in_place, written = set(), 0
    for result in results:
        instr = instrs.get(result)
        if instr is not None and instr.op == "dynamic-update-slice":
            in_place.add(_bitcast_source(instrs, instr.operands[0]))
            written += instrs[instr.operands[1]].bytes if instr.hbm_bytes else 0
        else:
            written += result_bytes if instr is None else instr.hbm_bytes
    read = 0
    for index, size in enumerate(operand_bytes):
        param = body["params"].get(index)
        if param not in in_place:
            read += _parameter_read(computations, body, param, size)
    return read + written


def kernel_bytes(text: str) -> int:
    """HBM bytes the program's kernels read and write per step, loops multiplied.

    Every instruction outside fusion bodies is one kernel (a fusion, a GEMM, a copy, a
    collective): it reads its operands and writes its result through HBM, while what a
    fusion computes inside stays on chip, and so do arrays the TPU compiler placed in its
    on-chip memories (an asynchronous copy between the two moves its HBM side once). In a
    loop, a kernel that slices a stacked buffer (a scanned layer's weights or saved
    activations) reads the slice, and one that updates a slice in place writes the update.
    """
    runs = _executions(text, kernels_only=True)
    computations = _computations(text)
    total = 0
    for name, times in runs.items():
        instrs = computations.get(name, {"instrs": {}})["instrs"]
        for instr in instrs.values():
            op, written = instr.op, instr.hbm_bytes
            if op in _NO_TRAFFIC or op.endswith(("-done", "-update")):
                continue
            operand_bytes = [instrs[o].hbm_bytes if o in instrs else 0 for o in instr.operands]
            if op in ("slice", "dynamic-slice"):
                moved = min(operand_bytes[0], instr.bytes) + written
            elif op == "dynamic-update-slice":
                moved = operand_bytes[1] + (instrs[instr.operands[1]].bytes if written else 0)
            elif op == "copy-start":  # (source, destination, context): read, then written.
                destination = _array_bytes(_definition(instr.line)[1], hbm_only=True)[1]
                moved = operand_bytes[0] + destination
            elif op == "fusion":
                body = computations[_fusion_body(instr)]
                moved = _fusion_traffic(computations, body, operand_bytes, written)
            else:
                moved = sum(operand_bytes) + written
            total += moved * times
    return total
