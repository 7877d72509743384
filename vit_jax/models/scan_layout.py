"""Converts parameters between unrolled (`encoderblock_{i}`) and scanned (`encoderblock`) layouts.

Both layouts describe the same network: the scanned one stacks each block
parameter along a new leading `layers` axis. Checkpoints may come in either.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import numpy as np

_BLOCK = re.compile(r"^encoderblock_(\d+)$")


def stack_blocks(params: dict[str, Any]) -> dict[str, Any]:
    """Unrolled -> scanned: `Transformer/encoderblock_{i}/...` stack into `.../encoderblock/...`."""
    encoder = dict(params["Transformer"])
    indices = sorted(int(_BLOCK.match(k)[1]) for k in encoder if _BLOCK.match(k))
    if indices != list(range(len(indices))) or not indices:
        raise ValueError(f"Expected blocks encoderblock_0..N-1, found {sorted(encoder)}.")
    blocks = [encoder.pop(f"encoderblock_{i}") for i in indices]
    encoder["encoderblock"] = jax.tree.map(lambda *xs: np.stack(xs), *blocks)
    return {**params, "Transformer": encoder}


def unstack_blocks(params: dict[str, Any]) -> dict[str, Any]:
    """Scanned -> unrolled: the inverse of `stack_blocks`."""
    encoder = dict(params["Transformer"])
    if "encoderblock" not in encoder:
        raise ValueError(f"Expected a scanned 'encoderblock', found {sorted(encoder)}.")
    stacked = encoder.pop("encoderblock")
    depth = jax.tree.leaves(stacked)[0].shape[0]
    for i in range(depth):
        encoder[f"encoderblock_{i}"] = jax.tree.map(lambda x, i=i: np.asarray(x[i]), stacked)
    return {**params, "Transformer": encoder}
