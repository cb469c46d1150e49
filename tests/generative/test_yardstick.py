"""Tests for ``dlabc.generative.yardstick``.

The matrix square root and the Fréchet distance against SciPy's general ``sqrtm`` (a
Schur-decomposition algorithm written by others) and against the 1-D closed form
$(\\mu_1-\\mu_2)^2 + (\\sigma_1-\\sigma_2)^2$; the statistics against NumPy; the
nearest-neighbour distances against a brute-force loop.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from dlabc.generative.yardstick import (
    Yardstick,
    binarize,
    bits_per_dim,
    digits,
    frechet_distance,
    gaussian_stats,
    nearest_distances,
    sqrtm_psd,
)


def _covariance(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, 2 * d, generator=g, dtype=torch.float64)
    return A @ A.T / (2 * d)


def test_sqrtm_psd_equals_scipy():
    S = _covariance(12, 0)
    root = sqrtm_psd(S)
    torch.testing.assert_close(
        root, torch.from_numpy(scipy.linalg.sqrtm(S.numpy()).real)
    )
    torch.testing.assert_close(root @ root, S)


def test_sqrtm_psd_of_a_singular_matrix():
    v = torch.tensor([[1.0], [2.0], [-1.0]], dtype=torch.float64)
    S = v @ v.T  # rank 1: eigenvalues 6, 0, 0 (rounding may make one slightly negative)
    torch.testing.assert_close(sqrtm_psd(S), S / 6**0.5)


def test_frechet_distance_equals_the_formula_with_scipy():
    S1, S2 = _covariance(10, 1), _covariance(10, 2)
    mu1, mu2 = (
        torch.randn(10, dtype=torch.float64),
        torch.randn(10, dtype=torch.float64),
    )
    cross = scipy.linalg.sqrtm(S1.numpy() @ S2.numpy()).real
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(S1.numpy() + S2.numpy() - 2 * cross)
    assert frechet_distance(mu1, S1, mu2, S2) == pytest.approx(
        float(expected), rel=1e-9
    )
    assert frechet_distance(mu1, S1, mu1, S1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_in_one_dimension_is_the_closed_form():
    mu1, mu2 = torch.tensor([0.5], dtype=torch.float64), torch.tensor([-1.0]).double()
    s1, s2 = 2.0, 0.5
    S1, S2 = torch.tensor([[s1**2]]).double(), torch.tensor([[s2**2]]).double()
    assert frechet_distance(mu1, S1, mu2, S2) == pytest.approx(1.5**2 + (s1 - s2) ** 2)


def test_gaussian_stats_equal_numpy():
    x = torch.randn(50, 4)
    mu, sigma = gaussian_stats(x)
    np.testing.assert_allclose(mu.numpy(), x.double().numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma.numpy(), np.cov(x.double().numpy().T), rtol=1e-12)


def test_nearest_distances_equal_a_loop():
    q, r = torch.rand(7, 1, 3, 3), torch.rand(11, 1, 3, 3)
    expected = [min(float((a - b).norm()) for b in r) for a in q]
    got = nearest_distances(q, r, chunk=3)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)


def test_binarize_and_bits_per_dim():
    x = torch.tensor([0.0, 0.49, 0.5, 1.0])
    assert binarize(x).tolist() == [0.0, 0.0, 1.0, 1.0]
    # a fair coin per pixel: D ln 2 nats is one bit per dimension
    assert bits_per_dim(784 * np.log(2), 784) == pytest.approx(1.0)


def test_digits_are_the_two_disjoint_splits():
    Xtr, ytr = digits("train")
    Xte, yte = digits("test")
    assert Xtr.shape == (4000, 1, 28, 28) and Xte.shape == (1000, 1, 28, 28)
    assert ytr.dtype == torch.int64 and 0.0 <= Xtr.min() and Xtr.max() <= 1.0
    assert torch.cdist(Xte[:50].flatten(1), Xtr.flatten(1)).min() > 0


@pytest.fixture(scope="module")
def quick_yardstick():
    return Yardstick(steps=5)


def test_yardstick_scores_copies_and_noise(quick_yardstick):
    ys = quick_yardstick
    copies = ys.evaluate(ys.train_images[:200])
    assert copies["memorisation"] < 1e-3  # copies of training digits
    assert ys.memorisation(ys.test_images[:200]) == pytest.approx(1.0, abs=0.15)
    noise = torch.rand(200, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert ys.fd(noise) > ys.fd(ys.test_images[:200])
    assert set(copies) == {"fd", "memorisation", "classes"}


def test_bad_input_is_rejected(quick_yardstick):
    ys = quick_yardstick
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\)"):
        ys.fd(torch.rand(10, 28, 28, 1))
    with pytest.raises(TypeError, match="floating"):
        ys.classify(torch.zeros(4, 1, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match="square"):
        sqrtm_psd(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="sigma2"):
        frechet_distance(torch.zeros(2), torch.eye(2), torch.zeros(2), torch.eye(3))
    with pytest.raises(ValueError, match="at least 2"):
        gaussian_stats(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="reference images"):
        nearest_distances(torch.zeros(2, 4), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="steps"):
        Yardstick(steps=0)
    with pytest.raises(ValueError, match="dims"):
        bits_per_dim(1.0, 0)
