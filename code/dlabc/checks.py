"""Argument checks shared by every module, so that bad input fails early with a clear
message.

Each check raises ``TypeError`` for a wrong type or dtype and ``ValueError`` for a wrong
shape or value, and names the argument and what was expected.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch


def check_tensor(
    x: object,
    name: str,
    *,
    ndim: int | Sequence[int] | None = None,
    floating: bool | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Check that ``x`` is a tensor with an allowed number of dimensions and dtype;
    return it."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.dim() not in allowed:
            expected = " or ".join(str(n) for n in allowed)
            raise ValueError(
                f"{name} must have {expected} dimensions, got shape {tuple(x.shape)}"
            )
    if floating is True and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {x.dtype}")
    return x


def check_array(
    x: object, name: str, *, ndim: int | None = None, floating: bool = True
) -> np.ndarray:
    """Check that ``x`` is a NumPy array with ``ndim`` dimensions (float dtype)."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array, got {type(x).__name__}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {x.shape}")
    if floating and not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    return x


def check_positive_int(value: object, name: str) -> int:
    """Check that ``value`` is an ``int`` (not a bool) greater than zero; return it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def check_number(
    value: object,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Check that ``value`` is a finite real number inside the given bounds; return it.

    ``low_open``/``high_open`` exclude the bound itself, so ``low=0, low_open=True``
    means "strictly positive" and the message says ``(0, inf)``.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        interval = (
            ("(" if low_open or low is None else "[")
            + ("-inf" if low is None else f"{low:g}")
            + ", "
            + ("inf" if high is None else f"{high:g}")
            + (")" if high_open or high is None else "]")
        )
        raise ValueError(f"{name} must be in {interval}, got {value:g}")
    return value


def check_ids(ids: torch.Tensor, name: str, vocab_size: int) -> None:
    """Check that token ids lie in ``0..vocab_size - 1``, where that costs no GPU wait.

    Reading a tensor's values makes the host wait for the device, so the range is
    checked only for CPU tensors; on a GPU, ``nn.Embedding`` raises on a bad id itself.
    """
    if ids.device.type == "cpu" and ids.numel():
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"{name} must lie in 0..{vocab_size - 1} (vocab_size={vocab_size}), "
                f"got values from {low} to {high}"
            )


def check_edge_index(edge_index: object, num_nodes: int | None = None) -> torch.Tensor:
    """Check a graph's edge list: an int64 tensor of shape ``(2, E)`` whose node ids
    lie in ``0..num_nodes - 1`` (the range only on the CPU, as in :func:`check_ids`)."""
    check_tensor(edge_index, "edge_index", ndim=2, dtype=torch.int64)
    if edge_index.shape[0] != 2:
        raise ValueError(
            f"edge_index must have shape (2, E), got {tuple(edge_index.shape)}"
        )
    if num_nodes is not None and edge_index.device.type == "cpu" and edge_index.numel():
        low, high = int(edge_index.min()), int(edge_index.max())
        if low < 0 or high >= num_nodes:
            raise ValueError(
                f"edge_index must hold node ids in 0..{num_nodes - 1}, "
                f"got values from {low} to {high}"
            )
    return edge_index
