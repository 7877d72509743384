"""FLOPs counted from a function's jaxpr: every matmul and convolution, loops multiplied.

XLA's own count (`cost_analysis()["flops"]`) sees a scanned loop's body once and counts
rematerialised work as work; it is also absent on GPU. Counting the jaxpr's
`dot_general` and `conv_general_dilated` equations (2 FLOPs per multiply-add, a scan's
body times its length) gives model FLOPs from the forward pass, and the FLOPs the
hardware runs, recomputation included, from the whole train step. Elementwise work
(softmax, norms, GELU) is left out, as in the usual MFU accounting (PaLM, Chowdhery et
al. 2022, appendix B).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
from jax.extend import core


def _sub_jaxprs(params: dict) -> list[Any]:
    found = []
    for value in params.values():
        for item in value if isinstance(value, tuple | list) else (value,):
            if isinstance(item, core.ClosedJaxpr):
                found.append(item.jaxpr)
            elif isinstance(item, core.Jaxpr):
                found.append(item)
    return found


def _count(jaxpr: core.Jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            lhs, out = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
            total += 2 * math.prod(out) * math.prod(lhs[d] for d in contracting)
        elif name == "conv_general_dilated":
            rhs, out = eqn.invars[1].aval.shape, eqn.outvars[0].aval.shape
            out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
            total += 2 * math.prod(out) * math.prod(rhs) // out_features
        subs = [_count(sub) for sub in _sub_jaxprs(eqn.params)]
        if name == "cond":  # One branch runs.
            total += max(subs, default=0)
        else:
            total += eqn.params.get("length", 1) * sum(subs) if name == "scan" else sum(subs)
    return total


def matmul_flops(fn: Callable, *args: Any) -> int:
    """FLOPs of `fn`'s matmuls and convolutions on `args` (arrays or ShapeDtypeStructs)."""
    return _count(jax.make_jaxpr(fn)(*args).jaxpr)
