"""From one neuron to a network: a sigmoid neuron, a two-layer MLP, gradient descent.

Chapter: ``book/foundations/neuron.md``.

References:
- Rosenblatt (1958), *The Perceptron: A Probabilistic Model for Information Storage and
  Organization in the Brain* (one neuron that learns).
- Minsky & Papert (1969), *Perceptrons* (what one neuron cannot do: XOR).
- Rumelhart, Hinton & Williams (1986), *Learning Representations by Back-Propagating
  Errors* (the gradients of a network with a hidden layer, by the chain rule).

Plain NumPy, float64, no automatic differentiation: every gradient is written out by
the chain rule (the next chapter lets PyTorch compute them). Shapes: ``N`` examples,
``D`` input features, ``H`` hidden units; an example is a row, so a layer computes
``x @ W + b``. Labels ``y`` are 0 or 1 and the output ``y_hat`` is the probability of 1.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from dlabc.checks import check_array, check_number, check_positive_int

__all__ = [
    "sigmoid",
    "bce_loss",
    "NeuronStep",
    "neuron_step",
    "init_mlp",
    "mlp_forward",
    "mlp_backward",
    "mlp_loss",
    "train_mlp",
    "xor_data",
]

#: The parameters of the two-layer network and their shapes (``()`` for a number).
MLP_SHAPES = {"W1": ("D", "H"), "b1": ("H",), "w2": ("H",), "b2": ()}


def sigmoid(z: np.ndarray) -> np.ndarray:
    r"""$\sigma(z) = 1 / (1 + e^{-z})$, squashing any number into $(0, 1)$.

    Computed as $\exp(-\log(1 + e^{-z}))$, the same function, so that no ``exp``
    overflows for large negative ``z`` and tiny outputs keep their digits.
    """
    return np.exp(-np.logaddexp(0.0, -np.asarray(z, dtype=np.float64)))


def bce_loss(z: np.ndarray, y: np.ndarray) -> float:
    r"""The mean binary cross-entropy of $\hat y = \sigma(z)$ against labels $y$.

    $L = -\frac{1}{N}\sum_n \big[y_n \log \hat y_n + (1 - y_n) \log(1 - \hat y_n)\big]$

    computed from ``z`` with $\log \sigma(z) = -\log(1 + e^{-z})$ and
    $\log(1 - \sigma(z)) = -\log(1 + e^{z})$, so that it never takes $\log 0$.
    """
    return float(np.mean(y * np.logaddexp(0.0, -z) + (1 - y) * np.logaddexp(0.0, z)))


class NeuronStep(NamedTuple):
    """What one gradient-descent step of a neuron computes, in order."""

    z: np.ndarray  # (N,) weighted sums
    y_hat: np.ndarray  # (N,) outputs, sigma(z)
    loss: float  # L
    dz: np.ndarray  # (N,) dL/dz
    dw: np.ndarray  # (D,) dL/dw
    db: float  # dL/db
    w: np.ndarray  # (D,) the weights after the step
    b: float  # the bias after the step


def neuron_step(
    x: np.ndarray, y: np.ndarray, w: np.ndarray, b: float, lr: float
) -> NeuronStep:
    """One gradient-descent step of a sigmoid neuron on the cross-entropy loss.

    ``x`` is ``(N, D)``, ``y`` holds ``N`` labels 0 or 1, ``w`` is ``(D,)``, ``b`` a
    number, ``lr`` the learning rate. Checks the arguments, then runs
    :func:`_neuron_step`.
    """
    x = check_array(x, "x", ndim=2)
    y = _check_labels(y, len(x))
    w = check_array(w, "w", ndim=1)
    if len(w) != x.shape[1]:
        raise ValueError(f"w must have shape ({x.shape[1]},) to match x, got {w.shape}")
    b = check_number(b, "b")
    lr = check_number(lr, "lr", low=0, low_open=True)
    return _neuron_step(x, y, w, b, lr)


def _neuron_step(
    x: np.ndarray, y: np.ndarray, w: np.ndarray, b: float, lr: float
) -> NeuronStep:
    r"""Forward, loss, backward by the chain rule, and one step of gradient descent:

    $\theta \leftarrow \theta - \eta\, \partial L / \partial \theta$
    """
    z = x @ w + b  # (N,) the weighted sums
    y_hat = sigmoid(z)  # (N,) the activation
    loss = bce_loss(z, y)  # the binary cross-entropy
    dz = (y_hat - y) / len(x)  # (N,) dL/dz_n: L is a mean, so (y_hat_n - y_n) / N
    dw = x.T @ dz  # (D,) dL/dz times the input x, summed over the examples
    db = float(dz.sum())  # the input of b is always 1
    return NeuronStep(z, y_hat, loss, dz, dw, db, w - lr * dw, b - lr * db)


def init_mlp(n_in: int, n_hidden: int, rng: np.random.Generator) -> dict:
    """Random weights (variance ``1 / fan_in``) and zero biases for a
    ``n_in -> n_hidden (tanh) -> 1 (sigmoid)`` network."""
    check_positive_int(n_in, "n_in")
    check_positive_int(n_hidden, "n_hidden")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a np.random.Generator, got {type(rng).__name__}")
    return {
        "W1": rng.normal(0.0, 1.0 / np.sqrt(n_in), size=(n_in, n_hidden)),
        "b1": np.zeros(n_hidden),
        "w2": rng.normal(0.0, 1.0 / np.sqrt(n_hidden), size=n_hidden),
        "b2": np.zeros(()),  # a number, kept as a 0-d array so it can change in place
    }


def mlp_forward(params: dict, X: np.ndarray) -> tuple[np.ndarray, dict]:
    """The network's outputs ``y_hat`` ``(N,)`` for inputs ``X`` ``(N, D)``, and what
    the backward pass needs. Checks the arguments, then runs :func:`_mlp_forward`."""
    _check_params(params)
    X = check_array(X, "X", ndim=2)
    if X.shape[1] != len(params["W1"]):
        raise ValueError(
            f"X must have {len(params['W1'])} features (W1 is {params['W1'].shape}), "
            f"got shape {X.shape}"
        )
    return _mlp_forward(params, X)


def _mlp_forward(params: dict, X: np.ndarray) -> tuple[np.ndarray, dict]:
    """Layer 1: ``H`` tanh neurons; layer 2: one sigmoid neuron."""
    z1 = X @ params["W1"] + params["b1"]  # (N, D) @ (D, H) + (H,) -> (N, H)
    a1 = np.tanh(z1)  # (N, H)
    z2 = a1 @ params["w2"] + params["b2"]  # (N, H) @ (H,) + () -> (N,)
    y_hat = sigmoid(z2)  # (N,)
    return y_hat, {"X": X, "a1": a1, "z2": z2, "y_hat": y_hat}


def mlp_backward(params: dict, cache: dict, y: np.ndarray) -> dict:
    """The gradient of :func:`bce_loss` with respect to every parameter, given the
    ``cache`` of :func:`mlp_forward` and the labels ``y``. Checks the arguments, then
    runs :func:`_mlp_backward`."""
    _check_params(params)
    if not isinstance(cache, dict) or not {"X", "a1", "y_hat"} <= set(cache):
        raise TypeError("cache must be the dict that mlp_forward returned")
    y = _check_labels(y, len(cache["y_hat"]))
    return _mlp_backward(params, cache, y)


def _mlp_backward(params: dict, cache: dict, y: np.ndarray) -> dict:
    """The chain rule from the loss back to ``W1``, one layer at a time."""
    X, a1, y_hat = cache["X"], cache["a1"], cache["y_hat"]
    dz2 = (y_hat - y) / len(y)  # (N,) as for one neuron
    dw2 = a1.T @ dz2  # (H, N) @ (N,) -> (H,)
    db2 = dz2.sum()  # ()
    da1 = np.outer(dz2, params["w2"])  # (N, H): each hidden unit gets dz2 * its weight
    dz1 = da1 * (1.0 - a1**2)  # (N, H): tanh'(z1) = 1 - tanh(z1)^2
    dW1 = X.T @ dz1  # (D, N) @ (N, H) -> (D, H)
    db1 = dz1.sum(axis=0)  # (H,)
    return {"W1": dW1, "b1": db1, "w2": dw2, "b2": db2}


def mlp_loss(params: dict, X: np.ndarray, y: np.ndarray) -> float:
    """:func:`bce_loss` of the network on ``(X, y)``."""
    _, cache = mlp_forward(params, X)
    return bce_loss(cache["z2"], _check_labels(y, len(X)))


def train_mlp(
    params: dict, X: np.ndarray, y: np.ndarray, lr: float, steps: int
) -> list[float]:
    """Full-batch gradient descent on ``(X, y)`` for ``steps`` steps, changing
    ``params`` in place; the loss before each step. Checks the arguments, then runs
    :func:`_train_mlp`."""
    mlp_forward(params, X)  # checks params and X
    y = _check_labels(y, len(X))
    lr = check_number(lr, "lr", low=0, low_open=True)
    check_positive_int(steps, "steps")
    return _train_mlp(params, X, y, lr, steps)


def _train_mlp(
    params: dict, X: np.ndarray, y: np.ndarray, lr: float, steps: int
) -> list[float]:
    """Forward, loss, backward, step; ``steps`` times, on the whole training set."""
    losses = []
    for _ in range(steps):
        _, cache = _mlp_forward(params, X)
        losses.append(bce_loss(cache["z2"], y))
        grads = _mlp_backward(params, cache, y)
        for name, grad in grads.items():
            params[name] -= lr * grad  # in place: theta <- theta - lr * dL/dtheta
    return losses


def xor_data(
    n: int, rng: np.random.Generator, noise: float = 0.35
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points ``(n, 2)`` around the four corners ``(±1, ±1)``, with Gaussian
    ``noise`` (its standard deviation), and their labels ``(n,)``: 1.0 where the
    corner's two signs differ, 0.0 where they agree (exclusive or)."""
    check_positive_int(n, "n")
    check_number(noise, "noise", low=0)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a np.random.Generator, got {type(rng).__name__}")
    corners = rng.choice([-1.0, 1.0], size=(n, 2))
    X = corners + noise * rng.normal(size=(n, 2))
    y = (corners[:, 0] != corners[:, 1]).astype(np.float64)
    return X, y


def _check_labels(y: object, n: int) -> np.ndarray:
    """``y`` as a float64 array of ``n`` labels, each 0 or 1."""
    y = np.asarray(y)
    if y.shape != (n,):
        raise ValueError(f"y must hold {n} labels, shape ({n},), got shape {y.shape}")
    if not (np.issubdtype(y.dtype, np.number) or y.dtype == bool):
        raise TypeError(f"y must be numeric labels 0 or 1, got dtype {y.dtype}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("y must hold only the labels 0 and 1")
    return y.astype(np.float64)


def _check_params(params: object) -> None:
    """``params`` as :func:`init_mlp` makes them: float arrays of consistent shapes."""
    if not isinstance(params, dict) or set(params) != set(MLP_SHAPES):
        raise TypeError(f"params must be a dict with the keys {sorted(MLP_SHAPES)}")
    for name in MLP_SHAPES:
        check_array(params[name], f"params[{name!r}]", ndim=len(MLP_SHAPES[name]))
    D, H = params["W1"].shape
    for name, shape in (("b1", (H,)), ("w2", (H,)), ("b2", ())):
        if params[name].shape != shape:
            raise ValueError(
                f"params[{name!r}] must have shape {shape} (W1 is {(D, H)}), "
                f"got {params[name].shape}"
            )
