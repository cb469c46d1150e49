"""The figure helpers that the chapters share: one style, heatmaps, grids of images."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np
import torch

#: The widest figure the book's page shows at the size it is drawn: the content column
#: at a 1280-px window is 750 px, and figures are drawn at 110 dpi (6.8 in = 748 px).
COLUMN_INCHES = 6.8
DPI = 110


def use_style() -> None:
    """The book's figure style: readable sizes, light grid, no top/right spines."""
    mpl.rcParams.update(
        {
            "figure.figsize": (6.4, 3.6),
            "figure.dpi": DPI,
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
    """Draw a 2-D matrix (e.g. attention weights, rows = queries, columns = keys) on
    ``ax``."""
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


def image_grid(
    images: Sequence[np.ndarray | torch.Tensor],
    *,
    titles: Sequence[str] | None = None,
    ncols: int | None = None,
    size: float = 1.6,
    cmap: str = "gray",
    symmetric: bool = False,
) -> plt.Figure:
    """Show images (feature maps, kernels, digits, frames) side by side, without axes.

    A 2-D image gets its own colour scale; with ``symmetric`` it is centred on zero (the
    ``RdBu_r`` map suits kernels and signed feature maps: red positive, blue negative).
    An ``(H, W, 3)`` image (e.g. a frame of an environment) is shown in its own colours.
    """
    if len(images) == 0:
        raise ValueError("image_grid needs at least one image")
    arrays = [
        im.detach().float().cpu().numpy()
        if isinstance(im, torch.Tensor)
        else np.asarray(im)
        for im in images
    ]
    bad = [a.shape for a in arrays if a.ndim != 2 and a.shape[2:] != (3,)]
    if bad:
        raise ValueError(
            f"image_grid expects 2-D or (H, W, 3) images, got shapes {bad}"
        )
    if titles is not None and len(titles) != len(arrays):
        raise ValueError(f"{len(titles)} titles for {len(arrays)} images")
    if ncols is not None and (
        isinstance(ncols, bool) or not isinstance(ncols, int) or ncols < 1
    ):
        raise ValueError(f"ncols must be a positive int, got {ncols!r}")
    ncols = min(len(arrays), ncols or 8)
    nrows = -(-len(arrays) // ncols)
    size = min(size, COLUMN_INCHES / ncols)  # never wider than the page's column
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(size * ncols, size * nrows + 0.3 * (titles is not None)),
        squeeze=False,
    )
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= len(arrays):
            continue
        if arrays[k].ndim == 3:  # colours of its own
            ax.imshow(arrays[k])
        else:
            limit = float(np.abs(arrays[k]).max()) or 1.0
            ax.imshow(
                arrays[k],
                cmap=cmap,
                vmin=-limit if symmetric else None,
                vmax=limit if symmetric else None,
            )
        if titles is not None:
            ax.set_title(titles[k], fontsize=9)
    fig.tight_layout()
    return fig


def confusion_matrix(
    ax: plt.Axes,
    matrix: np.ndarray,
    labels: Sequence[str] | None = None,
    fontsize: float = 7,
) -> mpl.image.AxesImage:
    """Draw counts ``matrix[true, predicted]``, each non-zero count written in its cell.

    Rows are the true classes, columns the predictions; ``labels`` name the classes (the
    default is their numbers).
    """
    matrix = np.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"matrix must be square, got shape {matrix.shape}")
    n = len(matrix)
    if labels is not None and len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} classes")
    image = ax.imshow(matrix, cmap="Blues")
    dark = matrix.max() / 2  # white text on the darker half of the colour scale
    for i in range(n):
        for j in range(n):
            if matrix[i, j]:
                color = "white" if matrix[i, j] > dark else "black"
                ax.text(
                    j,
                    i,
                    matrix[i, j],
                    ha="center",
                    va="center",
                    color=color,
                    fontsize=fontsize,
                )
    names = [str(k) for k in range(n)] if labels is None else list(labels)
    ax.set_xticks(
        range(n),
        names,
        rotation=0 if labels is None else 60,
        ha="center" if labels is None else "right",
    )
    ax.set_yticks(range(n), names)
    ax.set(xlabel="predicted", ylabel="true")
    ax.grid(False)
    return image
