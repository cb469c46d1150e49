"""Tests for ``dlabc.foundations.neuron``.

Each function is compared with something written elsewhere: ``torch.sigmoid``,
``torch.nn.functional.binary_cross_entropy_with_logits`` and ``torch.autograd`` in
float64 on the same weights (the neuron's step, the network's forward pass, loss and
gradients, one step of ``torch.optim.SGD``), central finite differences
(``numpy_network.numerical_gradient``), and closed forms (the chapter's worked example
by hand, two steps; the hand-made XOR network of the chapter's exercise). Bad arguments
raise errors that name them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dlabc.foundations.neuron import (
    bce_loss,
    init_mlp,
    mlp_backward,
    mlp_forward,
    mlp_loss,
    neuron_step,
    sigmoid,
    train_mlp,
    xor_data,
)
from dlabc.foundations.numpy_network import numerical_gradient

RTOL = 1e-10  # autograd against our chain rule: both exact up to rounding
FD_TOL = dict(rtol=1e-6, atol=1e-9)  # finite differences: O(eps^2) + O(1e-16 / eps)


def t64(a, requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float64, requires_grad=requires_grad)


def batch(seed: int = 0, n: int = 7, d: int = 3):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)), rng.integers(0, 2, size=n).astype(np.float64), rng


# --------------------------------------------------------------------- sigmoid and loss


def test_sigmoid_matches_torch_and_never_overflows():
    z = np.array([-1000.0, -30.0, -1.5, 0.0, 0.3, 2.0, 40.0, 1000.0])
    with np.errstate(over="raise", divide="raise", invalid="raise"):
        out = sigmoid(z)
    np.testing.assert_allclose(out, torch.sigmoid(t64(z)).numpy(), rtol=1e-14, atol=0)
    assert sigmoid(0.0) == 0.5


def test_bce_loss_matches_torch_also_for_huge_logits():
    rng = np.random.default_rng(1)
    z = np.concatenate([rng.normal(scale=3.0, size=10), [-800.0, 800.0, -800.0, 800.0]])
    y = np.concatenate([rng.integers(0, 2, size=10), [0, 1, 1, 0]]).astype(float)
    expected = F.binary_cross_entropy_with_logits(t64(z), t64(y)).item()
    with np.errstate(over="raise", divide="raise", invalid="raise"):
        loss = bce_loss(z, y)
    assert isinstance(loss, float)
    assert loss == pytest.approx(expected, rel=1e-12)
    # closed forms: a sure right answer costs nothing, a coin toss costs log 2
    assert bce_loss(np.array([800.0, -800.0]), np.array([1.0, 0.0])) == 0.0
    assert bce_loss(np.zeros(3), np.array([0.0, 1.0, 1.0])) == pytest.approx(
        math.log(2), rel=1e-15
    )


# --------------------------------------------------------------------- one neuron


def test_the_worked_example_by_hand():
    """The chapter's numbers: x = (1, 2), y = 1, w = (0.5, -0.5), b = 0.5, lr = 0.5."""
    x, y = np.array([[1.0, 2.0]]), np.array([1.0])
    step = neuron_step(x, y, np.array([0.5, -0.5]), 0.5, lr=0.5)
    # z = 0.5 - 1 + 0.5 = 0, sigma(0) = 1/2, L = -log(1/2), dL/dz = 1/2 - 1
    assert step.z.tolist() == [0.0] and step.y_hat.tolist() == [0.5]
    assert step.loss == pytest.approx(math.log(2), rel=1e-15)
    assert step.dz.tolist() == [-0.5]
    assert step.dw.tolist() == [-0.5, -1.0] and step.db == -0.5  # (a - y) x, a - y
    assert step.w.tolist() == [0.75, 0.0] and step.b == 0.75  # w - 0.5 dw
    # the second step: z = 0.75 + 0 + 0.75 = 1.5
    second = neuron_step(x, y, step.w, step.b, lr=0.5)
    assert second.z.tolist() == [1.5]
    assert second.loss == pytest.approx(math.log(1 + math.exp(-1.5)), rel=1e-14)
    a = 1 / (1 + math.exp(-1.5))
    np.testing.assert_allclose(second.dw, [(a - 1) * 1, (a - 1) * 2], rtol=1e-14)
    assert second.b == pytest.approx(0.75 - 0.5 * (a - 1), rel=1e-14)


def test_neuron_step_matches_autograd_and_finite_differences():
    x, y, rng = batch(2)
    w, b, lr = rng.normal(size=3), 0.3, 0.1
    step = neuron_step(x, y, w, b, lr)

    wt, bt = t64(w, True), t64(b, True)
    zt = t64(x) @ wt + bt
    loss_t = F.binary_cross_entropy_with_logits(zt, t64(y))
    loss_t.backward()
    np.testing.assert_allclose(step.z, zt.detach().numpy(), rtol=RTOL)
    np.testing.assert_allclose(
        step.y_hat, torch.sigmoid(zt).detach().numpy(), rtol=RTOL
    )
    assert step.loss == pytest.approx(loss_t.item(), rel=RTOL)
    np.testing.assert_allclose(step.dw, wt.grad.numpy(), rtol=RTOL)
    assert step.db == pytest.approx(bt.grad.item(), rel=RTOL)
    np.testing.assert_allclose(step.w, w - lr * wt.grad.numpy(), rtol=RTOL)
    assert step.b == pytest.approx(b - lr * bt.grad.item(), rel=RTOL)

    w_var, b_var = w.copy(), np.array(b)
    numeric_w = numerical_gradient(
        lambda: neuron_step(x, y, w_var, float(b_var), lr).loss, w_var
    )
    numeric_b = numerical_gradient(
        lambda: neuron_step(x, y, w_var, float(b_var), lr).loss, b_var
    )
    np.testing.assert_allclose(step.dw, numeric_w, **FD_TOL)
    np.testing.assert_allclose(step.db, numeric_b, **FD_TOL)
    # the chapter's dL/dz = (y_hat - y) / N is the gradient with respect to z itself
    z_var = step.z.copy()
    numeric_z = numerical_gradient(lambda: bce_loss(z_var, y), z_var)
    np.testing.assert_allclose(step.dz, numeric_z, **FD_TOL)


def test_neuron_step_does_not_change_its_arguments():
    x, y, rng = batch(3)
    w = rng.normal(size=3)
    before = w.copy()
    neuron_step(x, y, w, 0.0, 0.5)
    np.testing.assert_array_equal(w, before)


# --------------------------------------------------------------------- the network


def torch_mlp(params: dict, X: np.ndarray):
    """The same network in PyTorch, on leaf tensors that collect gradients."""
    leaves = {k: t64(v, True) for k, v in params.items()}
    a1 = torch.tanh(t64(X) @ leaves["W1"] + leaves["b1"])
    z2 = a1 @ leaves["w2"] + leaves["b2"]
    return z2, leaves


def random_params(seed: int = 4, d: int = 3, h: int = 5) -> dict:
    rng = np.random.default_rng(seed)
    params = init_mlp(d, h, rng)
    params["b1"] += rng.normal(size=h)  # non-zero biases, so a wrong bias term shows
    params["b2"] += 0.4
    return params


def test_mlp_forward_loss_and_backward_match_autograd():
    X, y, _ = batch(5)
    params = random_params()
    y_hat, cache = mlp_forward(params, X)
    grads = mlp_backward(params, cache, y)

    z2, leaves = torch_mlp(params, X)
    loss_t = F.binary_cross_entropy_with_logits(z2, t64(y))
    loss_t.backward()
    np.testing.assert_allclose(y_hat, torch.sigmoid(z2).detach().numpy(), rtol=RTOL)
    assert mlp_loss(params, X, y) == pytest.approx(loss_t.item(), rel=RTOL)
    assert set(grads) == set(params)
    for name, grad in grads.items():
        assert np.shape(grad) == params[name].shape, name
        np.testing.assert_allclose(grad, leaves[name].grad.numpy(), rtol=RTOL, atol=0)


def test_mlp_backward_matches_finite_differences():
    X, y, _ = batch(6, n=9, d=2)
    params = random_params(7, d=2, h=4)
    _, cache = mlp_forward(params, X)
    grads = mlp_backward(params, cache, y)
    for name, param in params.items():
        numeric = numerical_gradient(lambda: mlp_loss(params, X, y), param)
        np.testing.assert_allclose(grads[name], numeric, **FD_TOL, err_msg=name)


def test_train_mlp_steps_like_torch_sgd():
    X, y, _ = batch(8, n=12, d=2)
    params = random_params(9, d=2, h=6)
    z2, leaves = torch_mlp(params, X)
    optimizer = torch.optim.SGD(leaves.values(), lr=0.7)
    losses_t = []
    for _ in range(3):
        optimizer.zero_grad()
        a1 = torch.tanh(t64(X) @ leaves["W1"] + leaves["b1"])
        loss_t = F.binary_cross_entropy_with_logits(
            a1 @ leaves["w2"] + leaves["b2"], t64(y)
        )
        losses_t.append(loss_t.item())
        loss_t.backward()
        optimizer.step()
    losses = train_mlp(params, X, y, lr=0.7, steps=3)
    np.testing.assert_allclose(losses, losses_t, rtol=RTOL)
    for name, param in params.items():
        np.testing.assert_allclose(param, leaves[name].detach().numpy(), rtol=1e-9)


def test_train_mlp_solves_xor_and_one_neuron_cannot():
    rng = np.random.default_rng(0)
    X, y = xor_data(200, rng)
    params = init_mlp(2, 8, rng)
    losses = train_mlp(params, X, y, lr=1.0, steps=200)
    assert losses[-1] < 0.1 < 0.6 < losses[0]
    w, b = np.zeros(2), 0.0
    for _ in range(200):
        step = neuron_step(X, y, w, b, 1.0)
        w, b = step.w, step.b
    assert step.loss > 0.6  # close to log 2: a line cannot separate XOR


def test_the_exercise_network_solves_xor_by_hand():
    """Two tanh units that detect x1 + x2 > -1 and x1 + x2 > 1; the output fires
    between them (the solution of the chapter's exercise)."""
    k = 5.0
    params = {
        "W1": np.array([[k, k], [k, k]]),
        "b1": np.array([k, -k]),
        "w2": np.array([k, -k]),
        "b2": np.array(-k),
    }
    corners = np.array([[-1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [1.0, 1.0]])
    y_hat, _ = mlp_forward(params, corners)
    np.testing.assert_array_equal(y_hat > 0.5, [False, True, True, False])
    X, y = xor_data(2000, np.random.default_rng(1))
    y_hat, _ = mlp_forward(params, X)
    assert ((y_hat > 0.5) == y).mean() > 0.95


# --------------------------------------------------------------------- data


def test_xor_data_labels_the_corners_and_is_reproducible():
    X, y = xor_data(500, np.random.default_rng(3), noise=0.0)
    assert X.shape == (500, 2) and y.shape == (500,) and X.dtype == np.float64
    assert set(np.abs(X).ravel()) == {1.0}
    np.testing.assert_array_equal(y, (X[:, 0] * X[:, 1] < 0).astype(float))
    assert 0.4 < y.mean() < 0.6
    X2, y2 = xor_data(500, np.random.default_rng(3), noise=0.0)
    np.testing.assert_array_equal(X, X2)
    np.testing.assert_array_equal(y, y2)
    noisy, _ = xor_data(4000, np.random.default_rng(3), noise=0.35)
    assert np.std(noisy - np.sign(noisy)) == pytest.approx(0.35, rel=0.1)


# --------------------------------------------------------------------- bad arguments


def good():
    X, y, _ = batch(10, n=4, d=2)
    return X, y, init_mlp(2, 3, np.random.default_rng(0))


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda X, y, p: neuron_step(X[0], y, np.zeros(2), 0.0, 0.1), ValueError, "x"),
        (lambda X, y, p: neuron_step(X, y, np.zeros(3), 0.0, 0.1), ValueError, "w"),
        (lambda X, y, p: neuron_step(X, y, np.zeros(2), 0.0, 0.0), ValueError, "lr"),
        (lambda X, y, p: neuron_step(X, y, np.zeros(2), "1", 0.1), TypeError, "b"),
        (lambda X, y, p: neuron_step(X, y[:3], np.zeros(2), 0.0, 0.1), ValueError, "y"),
        (lambda X, y, p: neuron_step(X, y + 2, np.zeros(2), 0.0, 0.1), ValueError, "y"),
        (
            lambda X, y, p: neuron_step(X.astype(int), y, np.zeros(2), 0, 1),
            TypeError,
            "x",
        ),
        (
            lambda X, y, p: neuron_step(X, y.astype(str), np.zeros(2), 0, 1),
            TypeError,
            "y",
        ),
        (lambda X, y, p: mlp_forward(p, X[:, :1]), ValueError, "2 features"),
        (lambda X, y, p: mlp_forward(p, X.tolist()), TypeError, "X"),
        (lambda X, y, p: mlp_forward({**p, "b1": np.zeros(4)}, X), ValueError, "b1"),
        (lambda X, y, p: mlp_forward({"W1": p["W1"]}, X), TypeError, "keys"),
        (lambda X, y, p: mlp_backward(p, {}, y), TypeError, "cache"),
        (lambda X, y, p: mlp_backward(p, mlp_forward(p, X)[1], y[:2]), ValueError, "y"),
        (lambda X, y, p: train_mlp(p, X, y, lr=0.1, steps=0), ValueError, "steps"),
        (lambda X, y, p: train_mlp(p, X, y, lr=-1.0, steps=5), ValueError, "lr"),
        (
            lambda X, y, p: init_mlp(2, 0, np.random.default_rng()),
            ValueError,
            "n_hidden",
        ),
        (lambda X, y, p: init_mlp(2, 3, 0), TypeError, "rng"),
        (lambda X, y, p: xor_data(0, np.random.default_rng()), ValueError, "n"),
        (
            lambda X, y, p: xor_data(5, np.random.default_rng(), -1.0),
            ValueError,
            "noise",
        ),
    ],
)
def test_bad_arguments_raise_clear_errors(call, error, match):
    X, y, params = good()
    with pytest.raises(error, match=match):
        call(X, y, params)
