"""Tests for ``dlabc.foundations.numpy_network``.

Every function is compared with something written elsewhere: ``torch.autograd`` and
``torch.nn.functional`` in float64 with the same weights (each layer, the loss, a whole
network, one full-batch SGD step), central finite differences, closed forms
(``d sum(x^3)/dx = 3x^2``, the He variance ``2/n_in``) and ``sklearn.metrics``.
``train``'s momentum and learning-rate schedule follow ``torch.optim.SGD(momentum=m,
dampening=0)`` parameter by parameter before every step, on the same mini-batches, and
a hand computation of ``v = m v + g, p -= lr v``; ``augment`` sees every batch once and
training on its output equals training on the transformed data.
"""

from __future__ import annotations

import numpy as np
import pytest
import sklearn.metrics
import torch
import torch.nn.functional as F

from dlabc.foundations.numpy_network import (
    Dense,
    Network,
    ReLU,
    Tanh,
    confusion_matrix,
    numerical_gradient,
    softmax_cross_entropy,
    train,
)

RTOL = 1e-10  # autograd against our backward: both exact up to rounding
FD_TOL = dict(rtol=1e-6, atol=1e-8)  # finite differences: O(eps^2) + O(1e-16 / eps)


def t64(a: np.ndarray, requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float64, requires_grad=requires_grad)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# --------------------------------------------------------------------- layers vs torch + FD


def test_dense_gradients_match_autograd_and_finite_differences():
    r = rng(1)
    layer = Dense(5, 3, r)
    layer.b = r.normal(size=3)  # non-zero bias, so a wrong bias term shows
    x = r.normal(size=(4, 5))
    G = r.normal(size=(4, 3))  # loss = sum(out * G), so dL/dout = G

    out = layer.forward(x)
    dx = layer.backward(G)

    xt, Wt, bt = t64(x, True), t64(layer.W, True), t64(layer.b, True)
    out_t = F.linear(xt, Wt.T, bt)  # torch's Linear stores W.T
    (out_t * t64(G)).sum().backward()
    np.testing.assert_allclose(out, out_t.detach().numpy(), rtol=RTOL)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=RTOL)
    np.testing.assert_allclose(layer.dW, Wt.grad.numpy(), rtol=RTOL)
    np.testing.assert_allclose(layer.db, bt.grad.numpy(), rtol=RTOL)

    def f() -> float:
        return float(np.sum(layer.forward(x) * G))

    np.testing.assert_allclose(dx, numerical_gradient(f, x), **FD_TOL)
    np.testing.assert_allclose(layer.dW, numerical_gradient(f, layer.W), **FD_TOL)
    np.testing.assert_allclose(layer.db, numerical_gradient(f, layer.b), **FD_TOL)
    # parameters() hands out the current gradients
    (W, dW), (b, db) = layer.parameters()
    assert W is layer.W and dW is layer.dW and b is layer.b and db is layer.db


@pytest.mark.parametrize("Layer, torch_fn", [(ReLU, torch.relu), (Tanh, torch.tanh)])
def test_activation_gradients_match_autograd_and_finite_differences(Layer, torch_fn):
    r = rng(2)
    x = r.normal(size=(6, 7))
    x += np.where(x >= 0, 0.1, -0.1)  # away from ReLU's kink: |x| > 0.1 > eps
    G = r.normal(size=x.shape)
    layer = Layer()

    out = layer.forward(x)
    dx = layer.backward(G)

    xt = t64(x, True)
    out_t = torch_fn(xt)
    (out_t * t64(G)).sum().backward()
    np.testing.assert_allclose(out, out_t.detach().numpy(), rtol=RTOL)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=RTOL)
    np.testing.assert_allclose(
        dx, numerical_gradient(lambda: float(np.sum(layer.forward(x) * G)), x), **FD_TOL
    )
    assert layer.parameters() == []


def test_relu_values_and_gradient_at_and_around_zero_match_torch():
    x = np.array([[-2.0, -0.0, 0.0, 3.0]])
    layer = ReLU()
    out = layer.forward(x)
    dx = layer.backward(np.ones_like(x))
    xt = t64(x, True)
    torch.relu(xt).sum().backward()
    np.testing.assert_array_equal(out, [[0.0, 0.0, 0.0, 3.0]])
    np.testing.assert_array_equal(dx, xt.grad.numpy())  # torch: derivative 0 at 0


def test_tanh_derivative_closed_form():
    x = np.linspace(-3, 3, 13).reshape(1, -1)
    layer = Tanh()
    layer.forward(x)
    np.testing.assert_allclose(
        layer.backward(np.ones_like(x)), 1 / np.cosh(x) ** 2, rtol=1e-12
    )


# --------------------------------------------------------------------- softmax cross-entropy


def test_softmax_cross_entropy_matches_torch_loss_and_gradient():
    r = rng(3)
    logits = r.normal(scale=3.0, size=(8, 5))
    labels = r.integers(0, 5, size=8)

    loss, grad = softmax_cross_entropy(logits, labels)

    zt = t64(logits, True)
    loss_t = F.cross_entropy(zt, torch.tensor(labels), reduction="mean")
    loss_t.backward()
    assert isinstance(loss, float)
    assert loss == pytest.approx(loss_t.item(), rel=RTOL)
    np.testing.assert_allclose(grad, zt.grad.numpy(), rtol=RTOL, atol=1e-15)
    # the closed form (softmax - one_hot) / N, and rows summing to 0
    expected = (torch.softmax(t64(logits), 1).numpy() - np.eye(5)[labels]) / 8
    np.testing.assert_allclose(grad, expected, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(grad.sum(axis=1), 0.0, atol=1e-15)


def test_softmax_cross_entropy_gradient_matches_finite_differences():
    r = rng(4)
    logits = r.normal(size=(5, 4))
    labels = np.array([0, 3, 1, 1, 2])
    _, grad = softmax_cross_entropy(logits, labels)
    numeric = numerical_gradient(
        lambda: softmax_cross_entropy(logits, labels)[0], logits
    )
    np.testing.assert_allclose(grad, numeric, **FD_TOL)


def test_softmax_cross_entropy_is_stable_for_huge_logits():
    r = rng(5)
    logits = r.choice([-1e4, 1e4], size=(6, 4)) + r.normal(size=(6, 4))
    labels = r.integers(0, 4, size=6)
    loss, grad = softmax_cross_entropy(logits, labels)
    zt = t64(logits, True)
    loss_t = F.cross_entropy(zt, torch.tensor(labels))
    loss_t.backward()
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    assert loss == pytest.approx(loss_t.item(), rel=1e-10)
    np.testing.assert_allclose(grad, zt.grad.numpy(), rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(grad.sum(axis=1), 0.0, atol=1e-15)


def test_softmax_cross_entropy_closed_form_uniform_logits():
    # equal logits: p = 1/C for every class, loss = log C
    loss, _ = softmax_cross_entropy(np.full((3, 7), 2.5), np.array([0, 3, 6]))
    assert loss == pytest.approx(np.log(7), rel=1e-14)


# --------------------------------------------------------------------- whole network


def build_network(seed: int = 0) -> Network:
    r = rng(seed)
    return Network([Dense(6, 8, r), ReLU(), Dense(8, 8, r), Tanh(), Dense(8, 4, r)])


def torch_twin(net: Network) -> torch.nn.Sequential:
    """The same model in torch, with the NumPy weights copied (Linear.weight = W.T)."""
    d1, _, d2, _, d3 = net.layers
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 8),
        torch.nn.ReLU(),
        torch.nn.Linear(8, 8),
        torch.nn.Tanh(),
        torch.nn.Linear(8, 4),
    ).double()
    with torch.no_grad():
        for lin, dense in zip(
            (model[0], model[2], model[4]), (d1, d2, d3), strict=True
        ):
            lin.weight.copy_(torch.from_numpy(dense.W.T))
            lin.bias.copy_(torch.from_numpy(dense.b))
    return model


def test_network_loss_and_all_gradients_match_torch():
    net = build_network(6)
    r = rng(7)
    for layer in net.layers:
        if isinstance(layer, Dense):
            layer.b = r.normal(scale=0.1, size=layer.b.shape)
    X = r.normal(size=(10, 6))
    y = r.integers(0, 4, size=10)

    logits = net.forward(X)
    loss, grad = softmax_cross_entropy(logits, y)
    net.backward(grad)

    model = torch_twin(net)
    logits_t = model(t64(X))
    loss_t = F.cross_entropy(logits_t, torch.tensor(y), reduction="mean")
    loss_t.backward()
    np.testing.assert_allclose(logits, logits_t.detach().numpy(), rtol=RTOL)
    assert loss == pytest.approx(loss_t.item(), rel=RTOL)

    dense = [layer for layer in net.layers if isinstance(layer, Dense)]
    linear = [model[0], model[2], model[4]]
    for d, lin in zip(dense, linear, strict=True):
        np.testing.assert_allclose(
            d.dW, lin.weight.grad.numpy().T, rtol=1e-9, atol=1e-14
        )
        np.testing.assert_allclose(d.db, lin.bias.grad.numpy(), rtol=1e-9, atol=1e-14)
    # parameters() lists every (parameter, gradient) pair, in layer order
    expected = [a for d in dense for a in ((d.W, d.dW), (d.b, d.db))]
    got = net.parameters()
    assert len(got) == 6
    assert all(
        p is ep and g is eg for (p, g), (ep, eg) in zip(got, expected, strict=True)
    )


def test_network_gradients_match_finite_differences():
    net = build_network(8)
    r = rng(9)
    X = r.normal(size=(5, 6))
    y = r.integers(0, 4, size=5)
    _, grad = softmax_cross_entropy(net.forward(X), y)
    net.backward(grad)
    analytic = [g.copy() for _, g in net.parameters()]
    params = [p for p, _ in net.parameters()]

    def f() -> float:
        return softmax_cross_entropy(net.forward(X), y)[0]

    for p, g in zip(params, analytic, strict=True):
        np.testing.assert_allclose(g, numerical_gradient(f, p), **FD_TOL)


# --------------------------------------------------------------------- Dense construction / input


def test_dense_he_initialisation_variance():
    n_in, n_out = (
        400,
        500,
    )  # 200,000 weights: relative sd of the sample variance ~ sqrt(2/2e5) = 0.3%
    layer = Dense(n_in, n_out, rng(10))
    assert layer.W.shape == (n_in, n_out) and layer.b.shape == (n_out,)
    assert layer.W.var() == pytest.approx(2.0 / n_in, rel=0.03)
    assert abs(layer.W.mean()) < 5 * np.sqrt(2.0 / n_in / layer.W.size)
    np.testing.assert_array_equal(layer.b, 0.0)


# --------------------------------------------------------------------- numerical_gradient


def test_numerical_gradient_closed_form_and_restores_x():
    x = rng(11).normal(size=(3, 4))
    before = x.copy()
    grad = numerical_gradient(lambda: float(np.sum(x**3)), x)
    # error: O(eps^2) truncation plus |f| * 1e-16 / eps rounding, ~1e-9 here
    np.testing.assert_allclose(grad, 3 * before**2, rtol=1e-7, atol=1e-8)
    np.testing.assert_array_equal(x, before)  # every entry put back exactly
    assert grad.shape == x.shape and grad.dtype == np.float64


def test_numerical_gradient_is_exact_on_quadratics():
    # central differences have no truncation error on a quadratic: only rounding remains
    x = np.array([1.0, -2.0, 0.5])
    A = np.array([[2.0, 1.0, 0.0], [1.0, 3.0, -1.0], [0.0, -1.0, 4.0]])
    grad = numerical_gradient(lambda: float(0.5 * x @ A @ x), x, eps=1e-4)
    np.testing.assert_allclose(grad, A @ x, rtol=1e-9)


# --------------------------------------------------------------------- train


def blobs(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Three well-separated Gaussian blobs in 2-D."""
    r = rng(seed)
    centres = np.array([[4.0, 0.0], [-2.0, 3.5], [-2.0, -3.5]])
    y = np.repeat(np.arange(3), n_per_class)
    X = centres[y] + 0.5 * r.normal(size=(len(y), 2))
    return X, y


def small_net(seed: int = 0) -> Network:
    r = rng(seed)
    return Network([Dense(2, 8, r), ReLU(), Dense(8, 3, r)])


def test_train_learns_a_separable_problem():
    X, y = blobs(20, seed=12)
    X_val, y_val = blobs(10, seed=13)
    history = train(small_net(), X, y, X_val, y_val, epochs=15, batch_size=10, lr=0.1)
    assert set(history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert all(len(v) == 15 for v in history.values())
    assert history["loss"][-1] < 0.5 * history["loss"][0]
    assert history["accuracy"][-1] == 1.0 and history["val_accuracy"][-1] == 1.0


def test_train_one_full_batch_epoch_is_one_sgd_step_as_in_torch():
    X, y = blobs(5, seed=14)
    X_val, y_val = blobs(3, seed=15)
    net = small_net(16)
    model = torch.nn.Sequential(
        torch.nn.Linear(2, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
    ).double()
    with torch.no_grad():
        for lin, dense in zip(
            (model[0], model[2]), (net.layers[0], net.layers[2]), strict=True
        ):
            lin.weight.copy_(torch.from_numpy(dense.W.T))
            lin.bias.copy_(torch.from_numpy(dense.b))
    F.cross_entropy(model(t64(X)), torch.tensor(y)).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.3 * p.grad  # plain SGD

    history = train(net, X, y, X_val, y_val, epochs=1, batch_size=len(X), lr=0.3)

    for lin, dense in zip(
        (model[0], model[2]), (net.layers[0], net.layers[2]), strict=True
    ):
        np.testing.assert_allclose(
            dense.W, lin.weight.detach().numpy().T, rtol=1e-10, atol=1e-14
        )
        np.testing.assert_allclose(
            dense.b, lin.bias.detach().numpy(), rtol=1e-10, atol=1e-14
        )
    with torch.no_grad():
        for prefix, (inputs, labels) in (("", (X, y)), ("val_", (X_val, y_val))):
            logits = model(t64(inputs))
            assert history[prefix + "loss"] == [
                pytest.approx(F.cross_entropy(logits, torch.tensor(labels)).item())
            ]
            acc = (logits.argmax(1).numpy() == labels).mean()
            assert history[prefix + "accuracy"] == [pytest.approx(acc)]


def test_train_is_reproducible_and_depends_on_seed():
    X, y = blobs(8, seed=17)
    X_val, y_val = blobs(4, seed=18)
    kwargs = dict(epochs=3, batch_size=5, lr=0.05)
    h1 = train(small_net(), X, y, X_val, y_val, seed=3, **kwargs)
    h2 = train(small_net(), X, y, X_val, y_val, seed=3, **kwargs)
    h3 = train(small_net(), X, y, X_val, y_val, seed=4, **kwargs)
    assert h1 == h2
    assert h1["loss"] != h3["loss"]  # another seed, another order of mini-batches


# --------------------------------------------------------------------- confusion_matrix


def test_confusion_matrix_hand_count():
    labels = np.array([0, 0, 1, 2, 2, 2])
    predictions = np.array([0, 1, 1, 2, 0, 2])
    expected = np.array([[1, 1, 0], [0, 1, 0], [1, 0, 2]])
    M = confusion_matrix(labels, predictions, 3)
    np.testing.assert_array_equal(M, expected)
    assert M.dtype == np.int64


def test_confusion_matrix_matches_sklearn():
    r = rng(20)
    labels = r.integers(0, 5, size=200)
    predictions = np.where(r.random(200) < 0.6, labels, r.integers(0, 5, size=200))
    M = confusion_matrix(labels, predictions, 5)
    np.testing.assert_array_equal(
        M, sklearn.metrics.confusion_matrix(labels, predictions, labels=range(5))
    )
    np.testing.assert_array_equal(M.sum(axis=1), np.bincount(labels, minlength=5))
    np.testing.assert_array_equal(M.sum(axis=0), np.bincount(predictions, minlength=5))
    # a class that never occurs still gets its (zero) row and column
    M6 = confusion_matrix(labels, predictions, 6)
    assert M6.shape == (6, 6) and M6[5].sum() == 0 and M6[:, 5].sum() == 0


# --------------------------------------------------------------------- train: momentum,
# learning-rate schedules, augmentation


def torch_twin_small(net: Network) -> torch.nn.Sequential:
    """``small_net`` in torch, float64, with the NumPy weights copied."""
    model = torch.nn.Sequential(
        torch.nn.Linear(2, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
    ).double()
    with torch.no_grad():
        for lin, dense in zip(
            (model[0], model[2]), (net.layers[0], net.layers[2]), strict=True
        ):
            lin.weight.copy_(torch.from_numpy(dense.W.T))
            lin.bias.copy_(torch.from_numpy(dense.b))
    return model


def numpy_params(net: Network) -> list[np.ndarray]:
    return [p.copy() for p, _ in net.parameters()]


def torch_params(model: torch.nn.Sequential) -> list[np.ndarray]:
    """In the NumPy order and layout: W (in, out), b, for each dense layer."""
    out = []
    for lin in (model[0], model[2]):
        out += [lin.weight.detach().numpy().T.copy(), lin.bias.detach().numpy().copy()]
    return out


def torch_trajectory(net, X, y, epochs, batch_size, lr, momentum, seed, schedule=None):
    """The parameters before every step and at the end, trained by torch.optim.SGD on
    the mini-batches ``train`` draws (the same permutations of the same generator)."""
    model = torch_twin_small(net)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=momentum, dampening=0.0
    )
    order_rng = np.random.default_rng(seed)
    trajectory, step = [], 0
    for _ in range(epochs):
        order = order_rng.permutation(len(X))
        for start in range(0, len(X), batch_size):
            batch = order[start : start + batch_size]
            trajectory.append(torch_params(model))
            if schedule is not None:
                optimizer.param_groups[0]["lr"] = schedule(step)
            optimizer.zero_grad()
            F.cross_entropy(model(t64(X[batch])), torch.tensor(y[batch])).backward()
            optimizer.step()
            step += 1
    return trajectory + [torch_params(model)]


@pytest.mark.parametrize(
    "momentum, use_schedule", [(0.0, False), (0.5, False), (0.9, False), (0.9, True)]
)
def test_train_momentum_and_schedule_follow_torch_sgd_step_by_step(
    momentum, use_schedule
):
    X, y = blobs(4, seed=21)  # 12 examples: batches of 5, 5, 2
    epochs, batch_size, lr, seed = 3, 5, 0.2, 7
    lrs = [0.3, 0.1, 0.05, 0.2, 0.0, 0.15, 0.1, 0.02, 0.4]  # one per step

    net = small_net(22)
    expected = torch_trajectory(
        net,
        X,
        y,
        epochs,
        batch_size,
        lr,
        momentum,
        seed,
        schedule=lrs.__getitem__ if use_schedule else None,
    )
    trajectory = []

    def schedule(step: int) -> float:
        # called once per step, after the gradient and before the update
        trajectory.append(numpy_params(net))
        return lrs[step] if use_schedule else lr

    train(
        net,
        X,
        y,
        X,
        y,
        epochs,
        batch_size,
        lr,
        seed,
        momentum=momentum,
        lr_schedule=schedule,
    )
    trajectory.append(numpy_params(net))

    assert len(trajectory) == len(expected) == epochs * 3 + 1
    for ours, theirs in zip(trajectory, expected, strict=True):
        for p, q in zip(ours, theirs, strict=True):
            np.testing.assert_allclose(p, q, rtol=1e-10, atol=1e-12)
    assert not np.allclose(trajectory[0][0], trajectory[-1][0])  # it did move


def test_train_momentum_by_hand_on_the_bias():
    # zero inputs: only the bias learns; every example has label 0, so every step's
    # gradient is dL/db = softmax(b) - (1, 0), and v = m v + g, b -= lr v
    net = Network([Dense(1, 2, rng(23))])
    X, y = np.zeros((4, 1)), np.zeros(4, dtype=np.int64)
    lr, m = 0.1, 0.5
    b, v = np.zeros(2), np.zeros(2)
    for _ in range(3):
        v = m * v + (np.exp(b) / np.exp(b).sum() - np.array([1.0, 0.0]))
        b = b - lr * v
    W = net.layers[0].W.copy()
    train(net, X, y, X, y, epochs=3, batch_size=4, lr=lr, momentum=m)
    np.testing.assert_allclose(net.layers[0].b, b, rtol=1e-14)
    np.testing.assert_array_equal(net.layers[0].W, W)  # dW = x^T g = 0


def test_train_schedule_step_counter_runs_over_the_whole_run():
    X, y = blobs(4, seed=24)  # 12 examples, batches of 5: 3 steps per epoch
    steps = []

    def schedule(step: int) -> float:
        steps.append(step)
        return 0.1

    train(small_net(), X, y, X, y, epochs=4, batch_size=5, lr_schedule=schedule)
    assert steps == list(range(12))  # not restarted at every epoch


def test_train_schedule_replaces_lr():
    X, y = blobs(4, seed=25)

    def run(**kwargs):
        net = small_net(26)
        history = train(net, X, y, X, y, epochs=2, batch_size=5, **kwargs)
        return history, numpy_params(net)

    (h1, p1), (h2, p2) = (
        run(lr=0.1, lr_schedule=lambda s: 0.05),
        run(lr=9.0, lr_schedule=lambda s: 0.05),
    )
    h3, p3 = run(lr=0.05)
    assert h1 == h2 == h3
    for a, b, c in zip(p1, p2, p3, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    # a schedule of zeros leaves every weight where it started
    net = small_net(27)
    before = numpy_params(net)
    train(net, X, y, X, y, epochs=2, batch_size=5, lr_schedule=lambda s: 0.0)
    for a, b in zip(numpy_params(net), before, strict=True):
        np.testing.assert_array_equal(a, b)


def test_train_augment_gets_every_batch_once_and_its_output_is_trained_on():
    X, y = blobs(4, seed=28)  # 12 examples: batches of 5, 5, 2
    calls = []

    def augment(batch: np.ndarray, generator: np.random.Generator) -> np.ndarray:
        assert isinstance(generator, np.random.Generator)
        calls.append(batch.copy())
        return batch + 1.0

    net = small_net(29)
    history = train(net, X, y, X, y, epochs=2, batch_size=5, seed=3, augment=augment)
    assert [len(c) for c in calls] == [5, 5, 2] * 2  # once per batch, not in evaluation
    order = np.random.default_rng(3)  # train's generator: augment used none of it
    for epoch in range(2):
        rows = order.permutation(len(X))
        batches = calls[3 * epoch : 3 * epoch + 3]
        np.testing.assert_array_equal(np.concatenate(batches), X[rows])

    # the same run on the shifted data, without augment, ends with the same weights
    reference = small_net(29)
    train(reference, X + 1.0, y, X, y, epochs=2, batch_size=5, seed=3)
    for a, b in zip(numpy_params(net), numpy_params(reference), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    # the history is measured on the data as given, without augmentation
    loss, _ = softmax_cross_entropy(net.forward(X), y)
    assert history["loss"][-1] == pytest.approx(loss, rel=1e-12)


# --------------------------------------------------------------------- bad input: one table


def _train_call(**kwargs):
    X, y = blobs(2, seed=19)
    return lambda: train(small_net(), X, y, X, y, **kwargs)


def _p(call, error, match, id):
    return pytest.param(call, error, match, id=id)


_logits = np.zeros((3, 4))
BAD_INPUT = [
    _p(
        lambda: softmax_cross_entropy(_logits, np.array([0, 1])),
        ValueError,
        "labels must be 3 integers",
        "labels-short",
    ),
    _p(
        lambda: softmax_cross_entropy(_logits, np.array([[0], [1], [2]])),
        ValueError,
        "labels must be 3 integers",
        "labels-2d",
    ),
    _p(
        lambda: softmax_cross_entropy(_logits, np.array([0.0, 1.0, 2.0])),
        ValueError,
        "labels must be 3 integers",
        "labels-float",
    ),
    _p(
        lambda: softmax_cross_entropy(_logits, np.array([0, 1, 4])),
        ValueError,
        r"labels must lie in 0\.\.3",
        "labels-large",
    ),
    _p(
        lambda: softmax_cross_entropy(_logits, np.array([0, -1, 2])),
        ValueError,
        r"labels must lie in 0\.\.3",
        "labels-negative",
    ),
    _p(
        lambda: softmax_cross_entropy(np.zeros(4), np.array([0])),
        ValueError,
        "logits must have 2 dimensions",
        "logits-1d",
    ),
    _p(
        lambda: softmax_cross_entropy([[0.0, 1.0]], np.array([0])),
        TypeError,
        "logits must be a NumPy array",
        "logits-list",
    ),
    _p(
        lambda: softmax_cross_entropy(np.zeros((1, 2), dtype=int), np.array([0])),
        TypeError,
        "logits must be a floating-point array",
        "logits-int",
    ),
    _p(lambda: Network([]), ValueError, "at least one layer", "layers-empty"),
    *[
        _p(
            lambda which=which, bad=bad: Dense(
                **{"n_in": 3, "n_out": 2, which: bad}, rng=rng()
            ),
            error,
            f"{which} must be",
            f"{which}-{bad!r}",
        )
        for which in ("n_in", "n_out")
        for bad, error in (
            (0, ValueError),
            (-3, ValueError),
            (True, TypeError),
            (2.0, TypeError),
            (None, TypeError),
        )
    ],
    _p(
        lambda: Dense(3, 2, rng()).forward(np.zeros((4, 5))),
        ValueError,
        "x must have 3 features",
        "x-features",
    ),
    _p(
        lambda: Dense(3, 2, rng()).forward([[0.0, 0.0, 0.0]]),
        TypeError,
        "x must be a NumPy array",
        "x-list",
    ),
    _p(
        lambda: Dense(3, 2, rng()).forward(np.zeros((4, 3), dtype=np.int64)),
        TypeError,
        "x must be a floating-point array",
        "x-int",
    ),
    _p(
        lambda: Dense(3, 2, rng()).forward(np.zeros(3)),
        ValueError,
        "x must have 2 dimensions",
        "x-1d",
    ),
    *[
        _p(
            lambda bad=bad: numerical_gradient(lambda: 0.0, bad),
            TypeError,
            "float64 NumPy array",
            f"x-{i}",
        )
        for i, bad in enumerate(
            [
                np.zeros(3, dtype=np.float32),
                np.zeros(3, dtype=np.int64),
                [0.0, 1.0],
                1.0,
            ]
        )
    ],
    *[
        _p(
            lambda eps=eps: numerical_gradient(lambda: 0.0, np.zeros(2), eps=eps),
            ValueError,
            "eps must be positive",
            f"eps-{eps}",
        )
        for eps in (0.0, -1e-6, float("nan"))
    ],
    _p(_train_call(epochs=0), ValueError, "epochs must be positive", "epochs-0"),
    _p(
        _train_call(epochs=-1), ValueError, "epochs must be positive", "epochs-negative"
    ),
    _p(_train_call(epochs=True), TypeError, "epochs must be an int", "epochs-bool"),
    _p(_train_call(epochs=2.0), TypeError, "epochs must be an int", "epochs-float"),
    _p(
        _train_call(batch_size=0),
        ValueError,
        "batch_size must be positive",
        "batch_size-0",
    ),
    _p(
        _train_call(batch_size=False),
        TypeError,
        "batch_size must be an int",
        "batch_size-bool",
    ),
    _p(
        _train_call(batch_size=4.5),
        TypeError,
        "batch_size must be an int",
        "batch_size-float",
    ),
    _p(_train_call(lr=0.0), ValueError, r"lr must be in \(0, inf\)", "lr-0"),
    _p(_train_call(lr=-0.1), ValueError, r"lr must be in \(0, inf\)", "lr-negative"),
    _p(_train_call(lr=float("nan")), ValueError, "lr must be finite", "lr-nan"),
    _p(
        _train_call(momentum=-0.1),
        ValueError,
        r"momentum must be in \[0, 1\)",
        "momentum-negative",
    ),
    _p(
        _train_call(momentum=1.0),
        ValueError,
        r"momentum must be in \[0, 1\)",
        "momentum-1",
    ),
    _p(
        _train_call(momentum=1.5),
        ValueError,
        r"momentum must be in \[0, 1\)",
        "momentum-1.5",
    ),
    _p(
        _train_call(momentum=float("nan")),
        ValueError,
        "momentum must be finite",
        "momentum-nan",
    ),
    *[
        _p(
            lambda labels=labels, predictions=predictions: confusion_matrix(
                labels, predictions, 3
            ),
            ValueError,
            "must be 1-D of one length",
            f"shapes-{i}",
        )
        for i, (labels, predictions) in enumerate(
            [
                (np.array([0, 1, 2]), np.array([0, 1])),
                (np.array([[0, 1]]), np.array([[0, 1]])),
                (np.array([[0, 1]]), np.array([0, 1])),
            ]
        )
    ],
    _p(
        lambda: confusion_matrix(np.array([0, -1, 2]), np.array([0, 1, 2]), 3),
        ValueError,
        r"labels must lie in 0\.\.2",
        "labels-negative-class",
    ),
    _p(
        lambda: confusion_matrix(np.array([0, 1, 2]), np.array([0, 1, -1]), 3),
        ValueError,
        r"predictions must lie in 0\.\.2",
        "predictions-negative",
    ),
    _p(
        lambda: confusion_matrix(np.array([0, 1]), np.array([0, 1]), 0),
        ValueError,
        "n_classes must be a positive int",
        "n_classes-0",
    ),
    _p(
        lambda: confusion_matrix(np.array([0, 1, 3]), np.array([0, 1, 2]), 3),
        ValueError,
        r"labels must lie in 0\.\.2",
        "labels-class-3",
    ),
]


@pytest.mark.parametrize("call, error, match", BAD_INPUT)
def test_bad_input_is_rejected(call, error, match):
    with pytest.raises(error, match=match):
        call()
