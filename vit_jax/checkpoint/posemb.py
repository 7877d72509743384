"""Resamples learned position embeddings to a new patch grid.

Fine-tuning at another resolution than pretraining (224 -> 384) keeps the patch size,
so the grid of patches changes and the learned table must be interpolated onto it.
Both methods sample the old grid at corner-aligned coordinates (output `i` of `n`
reads input position `i * (m - 1) / (n - 1)`); "bilinear" is then exactly what the
original ViT code did with `scipy.ndimage.zoom(order=1)`, so its fine-tuning
numbers reproduce, and "bicubic" only swaps the kernel.
"""

from __future__ import annotations

import math

import numpy as np

METHODS = ("bilinear", "bicubic")


def infer_grid(
    num_tokens: int, grid: tuple[int, int] | None = None, *, argument: str
) -> tuple[int, int]:
    """Returns `grid` checked against `num_tokens`, or the square grid when none is given.

    A non-square grid cannot be recovered from a token count, so the caller must say
    it; `argument` names the parameter to pass in the error message.
    """
    if grid is not None:
        height, width = grid
        if height * width != num_tokens:
            raise ValueError(
                f"{argument}={tuple(grid)} has {height * width} positions, but the "
                f"position embedding has {num_tokens} patch positions."
            )
        return int(height), int(width)
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(
            f"The position embedding has {num_tokens} patch positions, which is not a "
            f"square grid: pass {argument}=(height, width) in patches."
        )
    return side, side


def _cubic(t: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel (a = -0.5), the usual "bicubic"."""
    t = np.abs(t)
    near = (1.5 * t - 2.5) * t * t + 1.0
    far = ((-0.5 * t + 2.5) * t - 4.0) * t + 2.0
    return np.where(t <= 1.0, near, np.where(t < 2.0, far, 0.0))


def _linear(t: np.ndarray) -> np.ndarray:
    return np.maximum(0.0, 1.0 - np.abs(t))


# Kernel and the tap offsets around floor(coordinate) it needs.
_KERNELS = {"bilinear": (_linear, np.arange(0, 2)), "bicubic": (_cubic, np.arange(-1, 3))}


def _interpolation_matrix(old: int, new: int, method: str) -> np.ndarray:
    """(new, old) weights of 1D corner-aligned interpolation; edges are replicated."""
    kernel, offsets = _KERNELS[method]
    # Same arithmetic as scipy.ndimage.zoom: one float64 step, times the output index.
    step = (old - 1) / (new - 1) if new > 1 else 0.0
    coords = np.arange(new, dtype=np.float64) * step
    taps = np.floor(coords)[:, None] + offsets[None, :]
    weights = kernel(coords[:, None] - taps)
    matrix = np.zeros((new, old), np.float64)
    rows = np.broadcast_to(np.arange(new)[:, None], taps.shape)
    np.add.at(matrix, (rows, np.clip(taps, 0, old - 1).astype(int)), weights)
    return matrix


def resample_posemb(
    posemb: np.ndarray,
    new_grid: tuple[int, int],
    *,
    num_prefix: int,
    method: str = "bilinear",
    old_grid: tuple[int, int] | None = None,
) -> np.ndarray:
    """Interpolates a (1, num_prefix + h*w, D) position embedding onto `new_grid`.

    The first `num_prefix` positions (the class token's) belong to no grid cell and
    are kept as they are. `old_grid` is needed only when h*w is not a square.
    Returns a numpy array of the input's dtype; the arithmetic runs in float64.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not supported: choose one of {METHODS}.")
    posemb = np.asarray(posemb)
    if posemb.ndim != 3 or posemb.shape[0] != 1:
        raise ValueError(f"Expected a position embedding of shape (1, N, D), got {posemb.shape}.")
    prefix, cells = posemb[:, :num_prefix], posemb[0, num_prefix:]
    old_h, old_w = infer_grid(len(cells), old_grid, argument="old_grid")
    new_h, new_w = (int(n) for n in new_grid)
    if (old_h, old_w) == (new_h, new_w):
        return posemb
    rows = _interpolation_matrix(old_h, new_h, method)
    cols = _interpolation_matrix(old_w, new_w, method)
    table = cells.astype(np.float64).reshape(old_h, old_w, -1)
    table = np.einsum("ah,bw,hwd->abd", rows, cols, table)
    table = table.reshape(1, new_h * new_w, -1).astype(posemb.dtype)
    return np.concatenate([prefix, table], axis=1)
