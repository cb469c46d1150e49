"""A neural network in NumPy: dense layers, activations, softmax cross-entropy, SGD.

Chapter: ``book/foundations/numpy_network.md``.

References:
- Rumelhart, Hinton & Williams (1986), *Learning Representations by Back-Propagating
  Errors*.
- Goodfellow, Bengio & Courville (2016), *Deep Learning*, section 6.5
  (back-propagation).
- He et al. (2015), *Delving Deep into Rectifiers* (the initialisation of ReLU layers).

Every layer has ``forward(x)``, which remembers what its backward pass needs, and
``backward(grad_out)``, which gets $\\partial L/\\partial \\text{output}$ and returns
$\\partial L/\\partial \\text{input}$, storing the gradients of its own parameters.
Shapes:
``N`` examples per batch, ``D`` input features, ``H`` units, ``C`` classes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from dlabc.checks import check_array, check_number, check_positive_int

__all__ = [
    "Dense",
    "ReLU",
    "Tanh",
    "softmax_cross_entropy",
    "Network",
    "numerical_gradient",
    "train",
    "confusion_matrix",
]


class Dense:
    """``y = x W + b``, ``W`` of shape ``(D, H)``, He-initialised as ``N(0, 2/D)``."""

    def __init__(self, n_in: int, n_out: int, rng: np.random.Generator) -> None:
        check_positive_int(n_in, "n_in")
        check_positive_int(n_out, "n_out")
        self.W = rng.normal(0.0, np.sqrt(2.0 / n_in), size=(n_in, n_out))
        self.b = np.zeros(n_out)
        self.dW = np.zeros_like(self.W)
        self.db = np.zeros_like(self.b)

    def forward(self, x: np.ndarray) -> np.ndarray:
        check_array(x, "x", ndim=2)
        if x.shape[1] != len(self.W):
            raise ValueError(f"x must have {len(self.W)} features, got {x.shape}")
        self.x = x  # (N, D), needed for dW
        return x @ self.W + self.b  # (N, H)

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        self.dW = self.x.T @ grad_out  # (D, N) @ (N, H) -> (D, H)
        self.db = grad_out.sum(axis=0)  # (H,): b is added to every row
        return grad_out @ self.W.T  # (N, H) @ (H, D) -> (N, D)

    def parameters(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(parameter, its gradient) pairs, updated in place by the optimizer."""
        return [(self.W, self.dW), (self.b, self.db)]


class ReLU:
    """``max(0, x)``; its derivative is 1 where ``x > 0`` and 0 elsewhere."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.positive = x > 0
        return np.where(self.positive, x, 0.0)

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        return grad_out * self.positive

    def parameters(self) -> list:
        return []


class Tanh:
    """``tanh(x)``; its derivative is ``1 - tanh(x)^2``."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.y = np.tanh(x)
        return self.y

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        return grad_out * (1.0 - self.y**2)

    def parameters(self) -> list:
        return []


def softmax_cross_entropy(
    logits: np.ndarray, labels: np.ndarray
) -> tuple[float, np.ndarray]:
    """Mean cross-entropy of ``softmax(logits)`` for integer ``labels``, and gradient.

    Checks the arguments, then computes :func:`_softmax_cross_entropy`.
    """
    check_array(logits, "logits", ndim=2)
    labels = np.asarray(labels)
    if labels.shape != (len(logits),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be {len(logits)} integers, got shape {labels.shape}"
        )
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise ValueError(f"labels must lie in 0..{logits.shape[1] - 1}")
    return _softmax_cross_entropy(logits, labels)


def _softmax_cross_entropy(
    logits: np.ndarray, labels: np.ndarray
) -> tuple[float, np.ndarray]:
    r"""Mean cross-entropy of ``softmax(logits)`` for integer ``labels``, and gradient.

    With $p = \mathrm{softmax}(z)$ and the one-hot label $y$, the loss of one example is
    $-\log p_y$ and its gradient is simply $\partial L / \partial z = p - y$: the
    softmax's Jacobian and the logarithm's derivative cancel. Averaged over the ``N``
    examples. Each row's largest logit is subtracted first: the softmax is unchanged,
    and no exponential can overflow.
    """
    n = len(logits)
    # subtract each row's max first, as in the attention chapter: nothing overflows
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))  # (N, C)
    loss = -log_p[np.arange(n), labels].mean()
    grad = np.exp(log_p)  # p, (N, C)
    grad[np.arange(n), labels] -= 1.0  # p - y
    return float(loss), grad / n


class Network:
    """Layers applied in order; ``backward`` runs them in reverse."""

    def __init__(self, layers: Sequence) -> None:
        if not layers:
            raise ValueError("a Network needs at least one layer")
        self.layers = list(layers)

    def forward(self, x: np.ndarray) -> np.ndarray:
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, grad: np.ndarray) -> None:
        for layer in reversed(self.layers):
            grad = layer.backward(grad)

    def parameters(self) -> list[tuple[np.ndarray, np.ndarray]]:
        return [pair for layer in self.layers for pair in layer.parameters()]


def numerical_gradient(
    f: Callable[[], float], x: np.ndarray, eps: float = 1e-6
) -> np.ndarray:
    r"""$\partial f / \partial x$ by central differences.

    $(f(x + \epsilon) - f(x - \epsilon)) / 2\epsilon$ for each entry of ``x``.

    ``f`` takes no argument and reads ``x``, which is changed in place one entry at a
    time (and restored). Use float64: the error is $O(\epsilon^2)$ plus rounding
    $O(10^{-16}/\epsilon)$.
    """
    if not isinstance(x, np.ndarray) or x.dtype != np.float64:
        raise TypeError("x must be a float64 NumPy array, changed in place")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + eps
        up = f()
        x[i] = old - eps
        down = f()
        x[i] = old
        grad[i] = (up - down) / (2 * eps)
    return grad


def train(
    network: Network,
    X: np.ndarray,
    y: np.ndarray,
    X_val: np.ndarray,
    y_val: np.ndarray,
    epochs: int = 30,
    batch_size: int = 32,
    lr: float = 0.1,
    seed: int = 0,
    *,
    momentum: float = 0.0,
    lr_schedule: Callable[[int], float] | None = None,
    augment: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None,
) -> dict[str, list[float]]:
    """Mini-batch SGD on softmax cross-entropy; loss and accuracy per epoch on both.

    Optional: heavy-ball ``momentum`` (``v = momentum * v + grad``,
    ``param -= lr * v``), ``lr_schedule(step)`` giving the learning rate of every step
    instead of ``lr``, and ``augment(batch, rng)`` transforming each training batch
    (e.g. random shifts).
    """
    check_positive_int(epochs, "epochs")
    check_positive_int(batch_size, "batch_size")
    check_number(lr, "lr", low=0, low_open=True)
    check_number(momentum, "momentum", low=0, high=1, high_open=True)
    rng = np.random.default_rng(seed)
    history: dict[str, list[float]] = {
        k: [] for k in ("loss", "accuracy", "val_loss", "val_accuracy")
    }
    velocity = [np.zeros_like(param) for param, _ in network.parameters()]
    step = 0
    for _ in range(epochs):
        order = rng.permutation(len(X))  # a new order every epoch
        for start in range(0, len(X), batch_size):
            batch = order[start : start + batch_size]
            inputs = X[batch] if augment is None else augment(X[batch], rng)
            logits = network.forward(inputs)  # (B, C)
            _, grad = softmax_cross_entropy(logits, y[batch])
            network.backward(grad)
            rate = lr if lr_schedule is None else lr_schedule(step)
            for (param, grad_param), v in zip(
                network.parameters(), velocity, strict=True
            ):
                v *= momentum
                v += grad_param
                param -= rate * v  # in place: the layer sees the new value
            step += 1
        for prefix, (inputs, labels) in (("", (X, y)), ("val_", (X_val, y_val))):
            logits = np.concatenate(  # in chunks: less memory, and faster (in cache)
                [
                    network.forward(inputs[i : i + 256])
                    for i in range(0, len(inputs), 256)
                ]
            )
            loss, _ = softmax_cross_entropy(logits, labels)
            history[prefix + "loss"].append(loss)
            history[prefix + "accuracy"].append(
                float((logits.argmax(1) == labels).mean())
            )
    return history


def confusion_matrix(
    labels: np.ndarray, predictions: np.ndarray, n_classes: int
) -> np.ndarray:
    """``M[i, j]`` = how many examples of class ``i`` were predicted as ``j``."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    if labels.shape != predictions.shape or labels.ndim != 1:
        raise ValueError(
            f"labels {labels.shape} and predictions {predictions.shape} "
            "must be 1-D of one length"
        )
    if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 1:
        raise ValueError(f"n_classes must be a positive int, got {n_classes!r}")
    for name, values in (("labels", labels), ("predictions", predictions)):
        if len(values) and (values.min() < 0 or values.max() >= n_classes):
            raise ValueError(f"{name} must lie in 0..{n_classes - 1}")
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix
