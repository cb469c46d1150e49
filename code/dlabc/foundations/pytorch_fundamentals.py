"""A scalar reverse-mode autograd engine, a tiny neural network on it, and its graph.

Chapter: ``book/foundations/pytorch_fundamentals.md``.

References:
- Griewank & Walther (2008), *Evaluating Derivatives*, chapter 3 (the reverse mode).
- Baydin et al. (2018), *Automatic Differentiation in Machine Learning: a Survey*.
- Paszke et al. (2019), *PyTorch: An Imperative Style, High-Performance Deep Learning
  Library* (the tape-free, define-by-run design that ``Value`` imitates).

A :class:`Value` holds one number and remembers the operation and the inputs that
produced it. ``backward()`` visits the graph in reverse topological order and applies
the chain rule once per node: each node adds ``local derivative * its own gradient`` to
its inputs.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from itertools import pairwise

import matplotlib.pyplot as plt

__all__ = [
    "Value",
    "topological_order",
    "draw_graph",
    "Neuron",
    "Layer",
    "MLP",
    "random_program",
    "run_program",
    "two_moons",
]


def _number(x: object, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be an int or float, got {type(x).__name__}")
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    return float(x)


class Value:
    """One scalar in a computation graph, with its gradient ``d(output)/d(self)``."""

    def __init__(
        self,
        data: float,
        children: tuple[Value, ...] = (),
        op: str = "",
        label: str = "",
    ) -> None:
        self.data = _number(data, "data")
        self.grad = 0.0
        self.children = children  # the inputs this value was computed from
        self.op = op  # the operation that produced it ("" for a leaf)
        self.label = label
        # passes self.grad on to the children; set by the operation that made this value
        self._backward: Callable[[], None] = lambda: None

    def __repr__(self) -> str:
        return f"Value(data={self.data:.6g}, grad={self.grad:.6g})"

    @staticmethod
    def _wrap(other: Value | float) -> Value:
        return other if isinstance(other, Value) else Value(_number(other, "operand"))

    # -- operations: each computes the value and says how to pass the gradient back
    def __add__(self, other: Value | float) -> Value:
        other = self._wrap(other)
        out = Value(self.data + other.data, (self, other), "+")

        def _backward() -> None:  # d(a + b)/da = 1, d(a + b)/db = 1
            self.grad += out.grad
            other.grad += out.grad

        out._backward = _backward
        return out

    def __mul__(self, other: Value | float) -> Value:
        other = self._wrap(other)
        out = Value(self.data * other.data, (self, other), "×")

        def _backward() -> None:  # d(a b)/da = b, d(a b)/db = a
            self.grad += other.data * out.grad
            other.grad += self.data * out.grad

        out._backward = _backward
        return out

    def __pow__(self, exponent: float) -> Value:
        exponent = _number(exponent, "exponent")
        if self.data == 0 and exponent < 1:
            raise ValueError(f"0 ** {exponent} has no finite derivative")
        if self.data < 0 and not exponent.is_integer():
            raise ValueError(f"a negative number to the power {exponent} is not real")
        out = Value(self.data**exponent, (self,), f"**{exponent:g}")

        def _backward() -> None:  # d(a^n)/da = n a^(n-1)
            self.grad += exponent * self.data ** (exponent - 1) * out.grad

        out._backward = _backward
        return out

    def exp(self) -> Value:
        out = Value(math.exp(self.data), (self,), "exp")

        def _backward() -> None:  # d(e^a)/da = e^a
            self.grad += out.data * out.grad

        out._backward = _backward
        return out

    def log(self) -> Value:
        if self.data <= 0:
            raise ValueError(f"log needs a positive number, got {self.data}")
        out = Value(math.log(self.data), (self,), "log")

        def _backward() -> None:  # d(ln a)/da = 1/a
            self.grad += out.grad / self.data

        out._backward = _backward
        return out

    def tanh(self) -> Value:
        out = Value(math.tanh(self.data), (self,), "tanh")

        def _backward() -> None:  # d(tanh a)/da = 1 - tanh(a)^2
            self.grad += (1 - out.data**2) * out.grad

        out._backward = _backward
        return out

    def relu(self) -> Value:
        out = Value(max(self.data, 0.0), (self,), "relu")

        def _backward() -> None:  # 1 for a > 0, else 0 (PyTorch's choice at a = 0 too)
            self.grad += (self.data > 0) * out.grad

        out._backward = _backward
        return out

    # -- the rest are compositions of the operations above
    def __neg__(self) -> Value:
        return self * -1

    def __sub__(self, other: Value | float) -> Value:
        return self + (-self._wrap(other))

    def __truediv__(self, other: Value | float) -> Value:
        return self * self._wrap(other) ** -1

    def __radd__(self, other: float) -> Value:
        return self + other

    def __rmul__(self, other: float) -> Value:
        return self * other

    def __rsub__(self, other: float) -> Value:
        return self._wrap(other) - self

    def __rtruediv__(self, other: float) -> Value:
        return self._wrap(other) / self

    def backward(self) -> None:
        """Fill in ``grad`` of every value this one depends on, by the chain rule.

        Gradients of the graph are reset first, so calling it twice gives the same
        result (unlike PyTorch, which accumulates into ``.grad`` until you zero it).
        """
        order = topological_order(self)
        for node in order:
            node.grad = 0.0
        self.grad = 1.0  # d(self)/d(self)
        for node in reversed(order):  # every node after all the nodes that use it
            node._backward()


def topological_order(root: Value) -> list[Value]:
    """Every value ``root`` depends on, each after all of its inputs (``root`` last)."""
    if not isinstance(root, Value):
        raise TypeError(f"root must be a Value, got {type(root).__name__}")
    order: list[Value] = []
    seen: set[int] = set()
    stack: list[tuple[Value, bool]] = [(root, False)]
    while stack:  # depth-first, without recursion (graphs can be deep)
        node, children_done = stack.pop()
        if children_done:
            order.append(node)
        elif id(node) not in seen:
            seen.add(id(node))
            stack.append((node, True))
            stack.extend(
                (child, False) for child in node.children if id(child) not in seen
            )
    return order


def draw_graph(root: Value, ax: plt.Axes | None = None) -> plt.Axes:
    """Draw the computation graph of ``root``: inputs on the left, ``root`` right.

    Each box shows a value's label or operation, its data and its gradient.
    """
    order = topological_order(root)
    if len(order) > 60:
        raise ValueError(
            f"the graph has {len(order)} nodes; draw_graph is for up to 60"
        )
    depth: dict[int, int] = {}
    for node in order:  # a node sits one column right of its deepest input
        depth[id(node)] = 1 + max((depth[id(c)] for c in node.children), default=-1)
    columns: dict[int, list[Value]] = {}
    for node in order:
        columns.setdefault(depth[id(node)], []).append(node)
    row = 1.5  # vertical distance between boxes: each box has three lines of text
    position = {
        id(node): (d, -row * (i - (len(nodes) - 1) / 2))
        for d, nodes in columns.items()
        for i, node in enumerate(nodes)
    }
    if ax is None:
        width, height = (
            2.2 * len(columns) + 1,
            0.9 * max(map(len, columns.values())) + 1,
        )
        _, ax = plt.subplots(figsize=(width, height))
    for node in order:
        x, y = position[id(node)]
        for child in node.children:
            cx, cy = position[id(child)]
            ax.annotate(
                "",
                (x - 0.38, y),
                (cx + 0.38, cy),
                arrowprops=dict(arrowstyle="->", lw=0.8),
            )
        name = node.label or node.op or "input"
        box = dict(boxstyle="round", fc="#dce9f5" if not node.children else "#f5e6d3")
        text = f"{name}\ndata {node.data:.3g}\ngrad {node.grad:.3g}"
        ax.text(x, y, text, ha="center", va="center", fontsize=8, bbox=box)
    ax.set_xlim(-0.6, len(columns) - 0.4)
    ys = [y for _, y in position.values()]
    ax.set_ylim(min(ys) - 0.7, max(ys) + 0.7)
    ax.axis("off")
    return ax


class Neuron:
    """``activation(w · x + b)`` on scalars; ``w`` drawn uniformly from [-1, 1]."""

    def __init__(
        self, n_inputs: int, activation: str = "tanh", rng: random.Random | None = None
    ):
        if isinstance(n_inputs, bool) or not isinstance(n_inputs, int) or n_inputs < 1:
            raise ValueError(f"n_inputs must be a positive int, got {n_inputs!r}")
        if activation not in ("tanh", "relu", "linear"):
            raise ValueError(
                f"activation must be 'tanh', 'relu' or 'linear', got {activation!r}"
            )
        rng = rng or random.Random(0)
        self.w = [Value(rng.uniform(-1, 1), label="w") for _ in range(n_inputs)]
        self.b = Value(0.0, label="b")
        self.activation = activation

    def __call__(self, x: Sequence[Value | float]) -> Value:
        if len(x) != len(self.w):
            raise ValueError(f"expected {len(self.w)} inputs, got {len(x)}")
        z = sum((w * xi for w, xi in zip(self.w, x, strict=True)), self.b)
        return z if self.activation == "linear" else getattr(z, self.activation)()

    def parameters(self) -> list[Value]:
        return [*self.w, self.b]


class Layer:
    """``n_outputs`` neurons that read the same inputs."""

    def __init__(
        self, n_inputs: int, n_outputs: int, activation: str = "tanh", rng=None
    ):
        if (
            isinstance(n_outputs, bool)
            or not isinstance(n_outputs, int)
            or n_outputs < 1
        ):
            raise ValueError(f"n_outputs must be a positive int, got {n_outputs!r}")
        rng = rng or random.Random(0)  # one generator for all: the neurons must differ
        self.neurons = [Neuron(n_inputs, activation, rng) for _ in range(n_outputs)]

    def __call__(self, x: Sequence[Value | float]) -> list[Value]:
        return [neuron(x) for neuron in self.neurons]

    def parameters(self) -> list[Value]:
        return [p for neuron in self.neurons for p in neuron.parameters()]


class MLP:
    """Layers ``n_inputs -> hidden... -> 1``: tanh inside, a linear output (a score)."""

    def __init__(self, n_inputs: int, hidden: Sequence[int], seed: int = 0):
        rng = random.Random(seed)
        sizes = [n_inputs, *hidden, 1]
        self.layers = [
            Layer(a, b, "linear" if i == len(sizes) - 2 else "tanh", rng)
            for i, (a, b) in enumerate(pairwise(sizes))
        ]

    def __call__(self, x: Sequence[Value | float]) -> Value:
        for layer in self.layers:
            x = layer(x)
        return x[0]

    def parameters(self) -> list[Value]:
        return [p for layer in self.layers for p in layer.parameters()]


# -- random expression graphs, to check the engine against torch.autograd
def random_program(
    n_inputs: int, n_ops: int, seed: int = 0
) -> tuple[list[float], list[tuple[str, int, int | float]]]:
    """Random inputs and a random straight-line program over them.

    Each instruction ``(op, i, j)`` appends a new node computed from earlier nodes ``i``
    (and ``j``, or an exponent for ``"pow"``). Operations are chosen so that every new
    value stays in the domain of the next one (``log`` only of positive numbers, no huge
    ``exp``). Run it with :func:`run_program` on ``Value`` s or on PyTorch tensors.
    """
    for name, value in (("n_inputs", n_inputs), ("n_ops", n_ops)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    rng = random.Random(seed)
    inputs = [rng.uniform(-2, 2) for _ in range(n_inputs)]
    values = list(inputs)  # plain floats, to keep every operation in its domain
    program: list[tuple[str, int, int | float]] = []
    while len(program) < n_ops:
        op = rng.choice(
            ["add", "mul", "sub", "div", "pow", "exp", "log", "tanh", "relu"]
        )
        i, j = rng.randrange(len(values)), rng.randrange(len(values))
        a, b = values[i], values[j]
        if op == "add":
            result = a + b
        elif op == "mul":
            result = a * b
        elif op == "sub":
            result = a - b
        elif op == "div" and abs(b) > 0.1:
            result = a / b
        elif op == "pow" and abs(a) > 0.1:
            j = rng.choice([2, 3, -1])
            result = a**j
        elif op == "exp" and a < 3:
            result = math.exp(a)
        elif op == "log" and a > 0.1:
            result = math.log(a)
        elif op == "tanh":
            result = math.tanh(a)
        elif op == "relu" and abs(a) > 1e-3:
            result = max(a, 0.0)
        else:
            continue  # out of domain: draw another instruction
        if abs(result) > 1e3:
            continue
        values.append(result)
        program.append((op, i, j))
    return inputs, program


def run_program(
    program: Sequence[tuple[str, int, int | float]], inputs: Sequence
) -> list:
    """Run a :func:`random_program` on ``Value`` s or scalar tensors; all nodes."""
    nodes = list(inputs)
    binary = {
        "add": lambda a, b: a + b,
        "mul": lambda a, b: a * b,
        "sub": lambda a, b: a - b,
        "div": lambda a, b: a / b,
    }
    for op, i, j in program:
        a = nodes[i]
        if op in binary:
            nodes.append(binary[op](a, nodes[j]))
        elif op == "pow":
            nodes.append(a**j)
        elif op in ("exp", "log", "tanh", "relu"):
            nodes.append(getattr(a, op)())
        else:
            raise ValueError(f"unknown operation {op!r}")
    return nodes


def two_moons(n: int, noise: float = 0.1, seed: int = 0) -> tuple[list, list]:
    """``n`` points on two interleaving half circles, labelled -1 and +1."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an int >= 2, got {n!r}")
    if not _number(noise, "noise") >= 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    rng = random.Random(seed)
    points, labels = [], []
    for k in range(n):
        t = math.pi * rng.random()
        if k % 2 == 0:
            x, y, label = math.cos(t), math.sin(t), -1
        else:
            x, y, label = 1 - math.cos(t), 0.5 - math.sin(t), 1
        points.append([x + rng.gauss(0, noise), y + rng.gauss(0, noise)])
        labels.append(label)
    return points, labels
