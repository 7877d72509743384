"""Collectives of an optimized HLO module: kind, bytes per step, and whether they cross
slices (or nodes).

The text of `Compiled.as_text()` is read: each collective's result shape gives its bytes,
its replica groups (listed, XLA's iota form `[G,S]<=[dims]T(perm)`, or its mesh form
`mesh[...] {axes}`) the devices it spans. On a TPU multi-slice program the compiler hands
the cross-slice part of a collective to the DCN runtime as a host-transfer `send` marked
with its transfer type; those count as cross-slice collectives. A collective inside a
while loop (a scanned encoder, gradient accumulation) runs once per iteration: its count
and bytes are multiplied by the loop's known trip count.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Sequence

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


def _array_bytes(shape_text: str) -> list[int]:
    sizes = []
    for dtype, dims in _ARRAY.findall(shape_text):
        if dtype in DTYPE_BYTES:
            sizes.append(DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d])))
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


def _executions(text: str, kernels_only: bool = False) -> dict[str, int]:
    """How many times each computation runs per execution of the entry computation.

    `kernels_only`: leave out what runs inside a kernel (fusion bodies, reducers).
    """
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
            factor = int(trip.group(1)) if trip and called.group(1) == "body" else 1
            for name in re.findall(r"[\w.\-]+", called.group(2)):
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
        result = sum(_array_bytes(match.group("shape")))
        if not result:
            continue
        if match.group("start"):  # An async start's result holds its operands too.
            operands = sum(_array_bytes(_operands(line, match.end())))
            result = result - operands if result > operands else result
        groups = _groups(line, len(slice_of_device))
        crosses = any(len({slice_of_device[i] for i in g}) > 1 for g in groups)
        found.append(
            Collective(
                kind=match.group("kind"),
                bytes=result,
                group_size=max(len(g) for g in groups),
                cross_slice=crosses,
                executions=executions,
            )
        )
    return found


def bytes_sent(c: Collective) -> float:
    """Bytes one device sends per execution, in units of its buffer (ring algorithms)."""
    n = c.group_size
    if n <= 1:
        return 0.0
    share = {"all-reduce": 2 * (n - 1) / n, "collective-permute": 1.0}.get(c.kind, (n - 1) / n)
    return share * c.bytes


# Instructions that move no data of their own (views, tuples, control flow).
_NO_TRAFFIC = {
    "parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "call",
    "conditional", "after-all", "partition-id", "replica-id", "iota", "opt-barrier",
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


def _computations(text: str) -> dict[str, dict]:
    """Per computation: its instructions (name -> result bytes, opcode, operand names),
    parameter names by index, and the root's name."""
    found: dict[str, dict] = {}
    current = None
    for line in text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            current = found.setdefault(header.group(2), {"instrs": {}, "params": {}, "root": None})
            continue
        definition = _definition(line) if current is not None else None
        if definition is None:
            continue
        name, kind, op, operands = definition
        current["instrs"][name] = (
            sum(_array_bytes(kind)),
            op,
            re.findall(r"%([\w.\-]+)", operands),
            line,
        )
        if op == "parameter":
            current["params"][int(re.search(r"parameter\((\d+)\)", line).group(1))] = name
        if line.lstrip().startswith("ROOT"):
            current["root"] = name
    return found


def _fusion_traffic(body: dict, operand_bytes: list[int], result_bytes: int) -> int:
    """Bytes a fusion kernel moves: operands read only through dynamic slices count their
    slices, the buffer a root dynamic-update-slice updates in place counts its update."""
    instrs, root = body["instrs"], body["root"]
    users: dict[str, list[tuple[str, int]]] = {}
    for name, (_, _, operands, _) in instrs.items():
        for position, operand in enumerate(operands):
            users.setdefault(operand, []).append((name, position))
    in_place, written = None, result_bytes
    if root is not None and instrs[root][1] == "dynamic-update-slice":
        in_place, written = instrs[root][2][0], instrs[instrs[root][2][1]][0]
    read = 0
    for index, size in enumerate(operand_bytes):
        param = body["params"].get(index)
        uses = users.get(param, [])
        if param == in_place:
            continue
        if uses and all(instrs[u][1] == "dynamic-slice" and pos == 0 for u, pos in uses):
            size = min(size, sum(instrs[u][0] for u, _ in uses))
        read += size
    return read + written


def kernel_bytes(text: str) -> int:
    """HBM bytes the program's kernels read and write per step, loops multiplied.

    Every instruction outside fusion bodies is one kernel (a fusion, a GEMM, a copy, a
    collective): it reads its operands and writes its result through HBM, while what a
    fusion computes inside stays on chip. In a loop, a kernel that slices a stacked
    buffer (a scanned layer's weights or saved activations) reads the slice, and one that
    updates a slice in place writes the update.
    """
    runs = _executions(text, kernels_only=True)
    computations = _computations(text)
    total = 0
    for name, times in runs.items():
        instrs = computations.get(name, {"instrs": {}})["instrs"]
        for size, op, operands, line in instrs.values():
            if op in _NO_TRAFFIC or op.endswith("-done"):
                continue
            operand_bytes = [instrs[o][0] if o in instrs else 0 for o in operands]
            if op == "dynamic-slice":
                moved = 2 * size
            elif op == "dynamic-update-slice":
                moved = 2 * operand_bytes[1]
            elif op == "fusion":
                body = computations[re.search(r"calls=%?([\w.\-]+)", line).group(1)]
                moved = _fusion_traffic(body, operand_bytes, size)
            else:
                moved = sum(operand_bytes) + size
            total += moved * times
    return total
