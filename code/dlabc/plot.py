"""The figure helpers that the chapters share: one style, and attention-style heatmaps."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib as mpl
import matplotlib.pyplot as plt
import torch


def use_style() -> None:
    """The book's figure style: readable sizes, light grid, no top/right spines."""
    mpl.rcParams.update(
        {
            "figure.figsize": (6.4, 3.6),
            "figure.dpi": 110,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "font.size": 10,
            "image.cmap": "viridis",
        }
    )


def heatmap(
    ax: plt.Axes,
    matrix: torch.Tensor,
    *,
    x_labels: Sequence[str] | None = None,
    y_labels: Sequence[str] | None = None,
    title: str | None = None,
    vmin: float | None = 0.0,
    vmax: float | None = 1.0,
    cmap: str = "viridis",
) -> mpl.image.AxesImage:
    """Draw a 2-D matrix (e.g. attention weights, rows = queries, columns = keys) on ``ax``."""
    if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2:
        shape = (
            tuple(matrix.shape)
            if isinstance(matrix, torch.Tensor)
            else type(matrix).__name__
        )
        raise ValueError(f"heatmap expects a 2-D tensor, got {shape}")
    rows, cols = matrix.shape
    for labels, n, axis in ((x_labels, cols, "x_labels"), (y_labels, rows, "y_labels")):
        if labels is not None and len(labels) != n:
            raise ValueError(
                f"{axis} has {len(labels)} entries for {n} {'columns' if axis[0] == 'x' else 'rows'}"
            )
    image = ax.imshow(
        matrix.detach().float().cpu().numpy(), vmin=vmin, vmax=vmax, cmap=cmap
    )
    ax.grid(False)
    if x_labels is not None:
        ax.set_xticks(range(cols), x_labels, rotation=90)
    if y_labels is not None:
        ax.set_yticks(range(rows), y_labels)
    if title:
        ax.set_title(title)
    return image
