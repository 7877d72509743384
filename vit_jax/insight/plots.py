"""Draws the figures that `maps` computes, as image files (matplotlib, Agg backend): PNG, or
any other format matplotlib writes (PDF, SVG, ...), named by the file's extension.

Figure sizes are fixed by layout, never by content measurement, so a figure's size in
pixels is known in advance: `DPI` dots per inch times the inches given below.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib
from etils import epath

matplotlib.use("Agg")  # Files only: no display is needed, on any machine.

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import BoundaryNorm  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

DPI = 100
PANEL_INCHES = 2.0  # One image of the rollout figure.
COLORBAR_INCHES = 1.0  # The rollout figure's colour-bar column.
POSEMB_INCHES = (6.0, 6.0)
DISTANCE_INCHES = (6.0, 4.5)
FILTERS_INCHES = (7.0, 4.6)
CURVES_INCHES = (10.0, 7.0)


def check_path(path: str | os.PathLike) -> None:
    """Refuses a file name whose extension names no format matplotlib writes.

    Raises:
      ValueError: the extension is missing or unknown; the message lists the formats.
    """
    formats = Figure().canvas.get_supported_filetypes()
    if _extension(path) not in formats:
        raise ValueError(
            f"--out {path}: name an image file, e.g. figure.png; the formats are "
            f"{', '.join(sorted(formats))}."
        )


def _extension(path: str | os.PathLike) -> str:
    """The file format `path` names, as matplotlib names formats: "png", "pdf", ..."""
    return os.path.splitext(path)[1].lstrip(".").lower()


def _save(fig: Figure, path: str | os.PathLike) -> None:
    """Writes `fig` to `path`, local or `gs://` (epath), creating its folder."""
    out = epath.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as f:
        fig.savefig(f, format=_extension(path), dpi=DPI)
    plt.close(fig)


def plot_rollout(
    images: np.ndarray,
    maps: Sequence[np.ndarray],
    row_labels: Sequence[str],
    path: str | os.PathLike,
) -> None:
    """Inputs on the first row, then one row of rollout overlays per model (paper Fig. 6).

    `images`: uint8 [n, H, W, 3]; `maps`: per model, [n, h, w] rollout maps, each shown
    divided by its own maximum so that images of any contrast compare.
    """
    n, rows = len(images), 1 + len(maps)
    fig = plt.figure(figsize=(PANEL_INCHES * n + COLORBAR_INCHES, PANEL_INCHES * rows))
    grid = fig.add_gridspec(
        rows, n + 1, width_ratios=[PANEL_INCHES] * n + [COLORBAR_INCHES * 0.25], wspace=0.05
    )
    height, width = images.shape[1:3]
    shown = None
    for row in range(rows):
        for col in range(n):
            ax = fig.add_subplot(grid[row, col])
            ax.set_xticks([])
            ax.set_yticks([])
            ax.imshow(images[col], extent=(0, width, height, 0))
            if row == 0:
                ax.set_title(f"input {col + 1}", fontsize=9)
                if col == 0:
                    ax.set_ylabel("image", fontsize=9)
                continue
            heat = maps[row - 1][col] / max(float(maps[row - 1][col].max()), 1e-12)
            shown = ax.imshow(
                heat, cmap="inferno", alpha=0.65, vmin=0, vmax=1, extent=(0, width, height, 0)
            )
            if col == 0:
                ax.set_ylabel(row_labels[row - 1], fontsize=9)
    if shown is not None:
        fig.colorbar(shown, cax=fig.add_subplot(grid[1:, n]), label="rollout attention / max")
    fig.suptitle("Attention rollout: where the representation comes from", fontsize=10)
    _save(fig, path)


def plot_posemb_similarity(similarity: np.ndarray, grid: tuple[int, int], path) -> None:
    """Cosine similarity of each patch's position embedding with all others (paper Fig. 7).

    The small map at (row, column) shows that patch's similarity to every patch.
    """
    rows, cols = grid
    fig = plt.figure(figsize=POSEMB_INCHES)
    outer = fig.add_gridspec(1, 2, width_ratios=[20, 1], left=0.1, right=0.86, top=0.9)
    cells = outer[0, 0].subgridspec(rows, cols, wspace=0.08, hspace=0.08)
    shown = None
    for i in range(rows * cols):
        ax = fig.add_subplot(cells[i // cols, i % cols])
        shown = ax.imshow(similarity[i].reshape(grid), cmap="viridis", vmin=-1, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        if i // cols == rows - 1:
            ax.set_xlabel(str(i % cols + 1), fontsize=7)
        if i % cols == 0:
            ax.set_ylabel(str(i // cols + 1), fontsize=7)
    fig.colorbar(shown, cax=fig.add_subplot(outer[0, 1]), label="Cosine similarity")
    fig.supxlabel("Input patch column")
    fig.supylabel("Input patch row")
    fig.suptitle("Position embedding similarity")
    _save(fig, path)


def plot_attention_distance(distance: np.ndarray, image_size: int, path) -> None:
    """Mean attention distance of every head against depth (paper Fig. 7, right)."""
    depth, heads = distance.shape
    fig, ax = plt.subplots(figsize=DISTANCE_INCHES)
    layer = np.repeat(np.arange(1, depth + 1), heads)
    head = np.tile(np.arange(heads), depth)
    norm = BoundaryNorm(np.arange(heads + 1) - 0.5, heads)
    dots = ax.scatter(layer, distance.reshape(-1), c=head, cmap="tab20", norm=norm, s=24)
    bar = fig.colorbar(dots, ax=ax, label="Head", ticks=np.arange(heads))
    bar.set_ticklabels([str(h + 1) for h in range(heads)])
    ax.set_xlabel("Network depth (layer)")
    ax.set_ylabel("Mean attention distance (pixels)")
    ax.set_xticks(np.arange(1, depth + 1))
    ax.set_ylim(0, image_size * np.sqrt(2))
    ax.set_title(f"How far each head attends ({image_size} px images)")
    fig.tight_layout()
    _save(fig, path)


def plot_filter_components(components: np.ndarray, explained: np.ndarray, what: str, path) -> None:
    """Principal components of the pixel filters as RGB tiles (paper Fig. 7, left).

    Each component is shown min-max scaled to [0, 1]; its title is the variance share.
    """
    count = len(components)
    cols = min(7, count)
    rows = -(-count // cols)
    fig, axes = plt.subplots(rows, cols, figsize=FILTERS_INCHES, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= count:
            ax.set_axis_off()
            continue
        tile = components[i]
        tile = (tile - tile.min()) / max(float(np.ptp(tile)), 1e-12)
        ax.imshow(tile if tile.shape[-1] == 3 else tile.mean(-1), cmap="gray")
        ax.set_title(f"PC {i + 1}: {explained[i]:.0%}", fontsize=7)
    fig.suptitle(f"Principal components of the {what} (variance share)")
    _save(fig, path)


_PANELS = (
    ("Loss", lambda name: name in ("train/loss", "eval/loss"), "loss", "log"),
    ("Accuracy", lambda name: name == "eval/top1", "top-1 accuracy", "linear"),
    ("Learning rate", lambda name: name == "train/lr", "learning rate", "linear"),
    ("Few-shot linear accuracy", lambda name: name.startswith("fewshot/"), "accuracy", "linear"),
)


def plot_training_curves(
    series: dict[str, tuple[np.ndarray, np.ndarray]], title: str, path
) -> None:
    """Loss, accuracy, learning rate and few-shot accuracy against step, one panel each."""
    fig, axes = plt.subplots(2, 2, figsize=CURVES_INCHES)
    for ax, (panel, wanted, ylabel, scale) in zip(axes.flat, _PANELS, strict=True):
        names = sorted((n for n in series if wanted(n)), key=lambda n: (len(n), n))
        for name in names:
            steps, values = series[name]
            ax.plot(steps, values, marker="." if len(steps) < 50 else None, label=name)
        if names:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_yscale(scale)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)
