"""Tests for ``dlabc.data``.

``load_digits`` is compared with scikit-learn's own loader (pixels 0..16 divided by 16, which
float32 holds exactly); ``train_test_split`` with counts and set identities (sizes, disjoint
parts covering every index, rows kept with their labels).
"""

from __future__ import annotations

import numpy as np
import pytest
import sklearn.datasets

from dlabc.data import load_digits, train_test_split


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_load_digits_shapes_types_and_range(digits):
    X, y = digits
    assert X.shape == (1797, 64) and y.shape == (1797,)
    assert X.dtype == np.float32 and y.dtype == np.int64
    assert X.min() == 0.0 and X.max() == 1.0
    np.testing.assert_array_equal(np.unique(y), np.arange(10))


def test_load_digits_equals_sklearn(digits):
    X, y = digits
    reference = sklearn.datasets.load_digits()
    np.testing.assert_array_equal(X, reference.data / 16)  # k/16 is exact in float32
    np.testing.assert_array_equal(y, reference.target)
    # every value is one of the 17 grey levels
    np.testing.assert_array_equal(np.unique(X * 16), np.arange(17))


def toy(n: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Row i of X is (2i, 2i + 1) and its label is i, so pairing can be checked."""
    return np.arange(2 * n).reshape(n, 2), np.arange(n)


@pytest.mark.parametrize(
    "fraction, n_test", [(0.25, 25), (0.1, 10), (0.5, 50), (0.9, 90)]
)
def test_train_test_split_sizes_disjoint_covering_paired(fraction, n_test):
    X, y = toy(100)
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_fraction=fraction, seed=1
    )
    assert len(X_test) == len(y_test) == n_test
    assert len(X_train) == len(y_train) == 100 - n_test
    assert not set(y_train) & set(y_test)
    np.testing.assert_array_equal(
        np.sort(np.concatenate([y_train, y_test])), np.arange(100)
    )
    np.testing.assert_array_equal(X_train[:, 0], 2 * y_train)
    np.testing.assert_array_equal(X_test[:, 0], 2 * y_test)


def test_train_test_split_shuffles_and_is_reproducible():
    X, y = toy(100)
    a = train_test_split(X, y, seed=7)
    b = train_test_split(X, y, seed=7)
    c = train_test_split(X, y, seed=8)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a[3], c[3])
    assert not np.array_equal(a[3], np.arange(75, 100))  # not simply the last rows


def test_train_test_split_digits_keeps_rows_with_labels(digits):
    X, y = digits
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_fraction=0.2, seed=0)
    assert len(X_test) == round(0.2 * 1797) and len(X_train) + len(X_test) == 1797
    # each row still sits next to its own label: look it up in the original
    index = {row.tobytes(): label for row, label in zip(X, y, strict=True)}
    assert [index[row.tobytes()] for row in X_test[:50]] == list(y_test[:50])


def test_train_test_split_keeps_both_parts_non_empty():
    # BUG: round(0.9 * 3) = 3 rows go to the test set and the training set is empty; the
    # code guards the test side (max(1, ...)) but not the training side.
    X, y = toy(3)
    X_train, X_test, _, _ = train_test_split(X, y, test_fraction=0.9)
    assert len(X_train) >= 1 and len(X_test) >= 1


def test_train_test_split_rejects_length_mismatch():
    with pytest.raises(ValueError, match="same length, got 4 and 3"):
        train_test_split(np.zeros((4, 2)), np.zeros(3))


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_train_test_split_rejects_bad_fraction(fraction):
    X, y = toy(10)
    with pytest.raises(
        ValueError, match="test_fraction must lie strictly between 0 and 1"
    ):
        train_test_split(X, y, test_fraction=fraction)
