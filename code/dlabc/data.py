"""Every data set the book uses, loaded in one place: chapters never read files by path.

Each loader returns NumPy arrays and says exactly what to install when its source is
missing; nothing is ever downloaded at build or test time, and nothing is silently
replaced by something else.
"""

from __future__ import annotations

import numpy as np

__all__ = ["load_digits", "train_test_split"]


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 8×8 handwritten digits bundled with scikit-learn (UCI optical digits).

    Returns ``X`` of shape ``(1797, 64)``, float32 pixel intensities scaled to [0, 1],
    and ``y`` of shape ``(1797,)``, the digits 0-9 as int64.
    """
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as err:
        raise ImportError(
            "the digits data set comes with scikit-learn: pip install scikit-learn"
        ) from err
    digits = sklearn_digits()
    return (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64)


def train_test_split(
    X: np.ndarray, y: np.ndarray, test_fraction: float = 0.25, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Shuffle with ``seed`` and split into ``X_train, X_test, y_train, y_test``."""
    if len(X) != len(y):
        raise ValueError(
            f"X and y must have the same length, got {len(X)} and {len(y)}"
        )
    if len(X) < 2:
        raise ValueError(f"need at least 2 examples to split, got {len(X)}")
    if not 0 < test_fraction < 1:
        raise ValueError(
            f"test_fraction must lie strictly between 0 and 1, got {test_fraction}"
        )
    order = np.random.default_rng(seed).permutation(len(X))
    n_test = min(
        max(1, round(test_fraction * len(X))), len(X) - 1
    )  # both parts non-empty
    test, train = order[:n_test], order[n_test:]
    return X[train], X[test], y[train], y[test]
