"""Tests for ``dlabc.foundations.pytorch_fundamentals``.

Every function is compared with something written elsewhere: ``torch.autograd`` in float64
(values and gradients of random expression graphs, of each operation and of an MLP with the
same weights), central finite differences, or a closed form (``d(5001 x)/dx``, the number of
parameters of an MLP, the circles the two moons lie on, the depth of a node in the drawing).
"""

from __future__ import annotations

import math
import random

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from dlabc.foundations.pytorch_fundamentals import (  # noqa: E402
    MLP,
    Layer,
    Neuron,
    Value,
    draw_graph,
    random_program,
    run_program,
    topological_order,
    two_moons,
)

RTOL = 1e-10


def t64(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64, requires_grad=True)


def torch_grad(t: torch.Tensor) -> float:
    """``t.grad`` as a float; ``None`` (torch never reached ``t``) means a zero gradient."""
    return 0.0 if t.grad is None else t.grad.item()


def close(a: float, b: float, rtol: float = RTOL, atol: float = 1e-12) -> bool:
    return math.isclose(a, b, rel_tol=rtol, abs_tol=atol)


def chain(n: int) -> tuple[Value, Value]:
    """``x`` and ``x + 1 + 1 + ...``: a graph of ``n + 1`` nodes of ``+`` (and ``n`` leaves)."""
    x = Value(0.5, label="x")
    y = x
    for _ in range(n):
        y = y + 1.0
    return x, y


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


# --------------------------------------------------------------------------------------------
# Random expression graphs against torch.autograd
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(150))
def test_random_graph_matches_torch(seed):
    n_inputs, n_ops, n_last = 3 + seed % 4, 10 + (7 * seed) % 21, 1 + seed % 4
    inputs, program = random_program(n_inputs, n_ops, seed=seed)

    xs = [Value(x) for x in inputs]
    nodes = run_program(program, xs)
    root = sum(nodes[-n_last:])
    root.backward()

    ts = [t64(x) for x in inputs]
    t_nodes = run_program(program, ts)
    t_root = sum(t_nodes[-n_last:])
    t_root.backward()

    assert len(nodes) == n_inputs + n_ops
    for node, t_node in zip(nodes, t_nodes, strict=True):
        assert close(node.data, t_node.item()), (node, t_node)
    assert close(root.data, t_root.item())
    scale = max(1.0, *(abs(torch_grad(t)) for t in ts))
    for x, t in zip(xs, ts, strict=True):
        assert close(x.grad, torch_grad(t), atol=1e-12 * scale), (seed, x.grad, t.grad)


def test_random_program_shape_domain_and_reproducibility():
    for seed in range(20):
        inputs, program = random_program(4, 25, seed=seed)
        assert len(inputs) == 4 and len(program) == 25
        assert all(-2 <= x <= 2 for x in inputs)
        for k, (op, i, j) in enumerate(program):
            assert 0 <= i < 4 + k
            if op == "pow":
                assert j in (2, 3, -1)
            elif op in ("add", "mul", "sub", "div"):
                assert 0 <= j < 4 + k
        # the values stay in range (|v| <= 1e3) and every operation in its domain
        nodes = run_program(program, [Value(x) for x in inputs])
        assert all(abs(n.data) <= 1e3 for n in nodes)
        assert random_program(4, 25, seed=seed) == (inputs, program)
    assert random_program(4, 25, seed=0) != random_program(4, 25, seed=1)


def test_run_program_on_floats_is_a_closed_form():
    program = [
        ("add", 0, 1),
        ("mul", 2, 0),
        ("sub", 3, 1),
        ("div", 4, 0),
        ("pow", 5, 2),
    ]
    program += [("exp", 1, 0), ("log", 0, 0), ("tanh", 6, 0), ("relu", 1, 0)]
    a, b = Value(2.0), Value(-0.5)
    nodes = run_program(program, [a, b])
    c = a.data + b.data
    d = c * a.data
    e = d - b.data
    f = e / a.data
    expected = [a.data, b.data, c, d, e, f, f**2, math.exp(b.data), math.log(a.data)]
    expected += [math.tanh(f**2), 0.0]
    assert [n.data for n in nodes] == pytest.approx(expected, rel=1e-14)


# --------------------------------------------------------------------------------------------
# Each operation against torch
# --------------------------------------------------------------------------------------------
UNARY = {
    "2 + v": lambda v: 2 + v,
    "v + 2": lambda v: v + 2,
    "2 * v": lambda v: 2 * v,
    "v * 2": lambda v: v * 2,
    "2 - v": lambda v: 2 - v,
    "v - 2": lambda v: v - 2,
    "2 / v": lambda v: 2 / v,
    "v / 2": lambda v: v / 2,
    "-v": lambda v: -v,
    "v ** 3": lambda v: v**3,
    "v ** 0": lambda v: v**0,
    "v ** -2": lambda v: v**-2,
    "v ** 0.5": lambda v: v**0.5,
    "v ** 2.5": lambda v: v**2.5,
    "v ** -1.5": lambda v: v**-1.5,
    "exp": lambda v: v.exp(),
    "log": lambda v: v.log(),
    "tanh": lambda v: v.tanh(),
    "relu": lambda v: v.relu(),
    "x * x": lambda v: v * v,
    "x / x": lambda v: v / v,
}


@pytest.mark.parametrize("name", UNARY)
@pytest.mark.parametrize("x", [0.7, 2.3])
def test_unary_and_float_operations_match_torch(name, x):
    f = UNARY[name]
    v, t = Value(x), t64(x)
    out, t_out = f(v), f(t)
    out.backward()
    t_out.backward()
    assert close(out.data, t_out.item())
    assert close(v.grad, torch_grad(t))


@pytest.mark.parametrize("x", [-2.0, -0.3])
@pytest.mark.parametrize(
    "name",
    ["2 + v", "2 * v", "2 - v", "2 / v", "-v", "v ** 3", "v ** -2", "exp", "tanh"],
)
def test_operations_on_negative_numbers_match_torch(name, x):
    f = UNARY[name]
    v, t = Value(x), t64(x)
    out, t_out = f(v), f(t)
    out.backward()
    t_out.backward()
    assert close(out.data, t_out.item())
    assert close(v.grad, torch_grad(t))


@pytest.mark.parametrize("x", [-1.5, 0.0, 1.5])
def test_relu_matches_torch_including_zero_gradient(x):
    v, t = Value(x), t64(x)
    out, t_out = v.relu(), t.relu()
    out.backward()
    t_out.backward()
    assert out.data == t_out.item() == max(x, 0.0)
    assert v.grad == torch_grad(t) == (1.0 if x > 0 else 0.0)


@pytest.mark.parametrize("exponent, expected_grad", [(1, 1.0), (2, 0.0), (1.5, 0.0)])
def test_pow_of_zero_with_exponent_at_least_one(exponent, expected_grad):
    v, t = Value(0.0), t64(0.0)
    out, t_out = v**exponent, t**exponent
    out.backward()
    t_out.backward()
    assert out.data == t_out.item() == 0.0
    assert v.grad == torch_grad(t) == expected_grad


BINARY = {
    "+": lambda a, b: a + b,
    "*": lambda a, b: a * b,
    "-": lambda a, b: a - b,
    "/": lambda a, b: a / b,
}


@pytest.mark.parametrize("name", BINARY)
@pytest.mark.parametrize("x, y", [(1.3, -0.4), (-2.5, 3.0)])
def test_binary_operations_match_torch(name, x, y):
    f = BINARY[name]
    a, b, ta, tb = Value(x), Value(y), t64(x), t64(y)
    out, t_out = f(a, b), f(ta, tb)
    out.backward()
    t_out.backward()
    assert close(out.data, t_out.item())
    assert close(a.grad, torch_grad(ta))
    assert close(b.grad, torch_grad(tb))


def test_node_used_twice_accumulates_gradient():
    x = Value(1.7)
    y = x * x
    y.backward()
    assert y.children == (x, x)
    assert x.grad == pytest.approx(2 * 1.7, rel=1e-15)


def test_diamond_graph_matches_torch():
    def f(x, y):
        a = x * y  # used by both b and c
        b = a.tanh()
        c = a.exp()
        d = b * c + a  # a reaches d by three paths
        return d / (x + 2.0)

    x, y, tx, ty = Value(0.4), Value(-0.9), t64(0.4), t64(-0.9)
    out, t_out = f(x, y), f(tx, ty)
    out.backward()
    t_out.backward()
    assert close(out.data, t_out.item())
    assert close(x.grad, torch_grad(tx))
    assert close(y.grad, torch_grad(ty))


def test_composite_function_matches_finite_differences():
    def inner(a, b, c):
        return (a * b).tanh() + (c**2 + 1.0).log() / (1.0 + (-b).exp()) - a**3 * c

    def f(a, b, c):
        return inner(a, b, c).relu() * 2.0 - b / c

    point = [-0.6, -0.8, 1.3]
    a, b, c = point
    closed_form = math.tanh(a * b) + math.log(c**2 + 1) / (1 + math.exp(-b)) - a**3 * c
    assert closed_form > 0.1  # the relu is active, so every term reaches the gradient
    vs = [Value(p) for p in point]
    out = f(*vs)
    out.backward()
    assert out.data == pytest.approx(2 * closed_form - b / c, rel=1e-13)
    h = 1e-6
    for k in range(3):
        plus, minus = list(point), list(point)
        plus[k] += h
        minus[k] -= h
        fd = (f(*map(Value, plus)).data - f(*map(Value, minus)).data) / (2 * h)
        assert vs[k].grad == pytest.approx(fd, rel=1e-7, abs=1e-8)


def test_operations_record_children_and_op():
    a, b = Value(2.0), Value(3.0)
    assert (a + b).children == (a, b) and (a + b).op == "+"
    assert (a * b).children == (a, b)
    assert a.exp().children == (a,) and a.exp().op == "exp"
    assert (a**2).children == (a,)
    assert a.children == () and a.op == "" and a.grad == 0.0


# --------------------------------------------------------------------------------------------
# backward and topological_order
# --------------------------------------------------------------------------------------------
def test_backward_twice_gives_the_same_grads():
    inputs, program = random_program(4, 20, seed=3)
    xs = [Value(x) for x in inputs]
    root = sum(run_program(program, xs)[-3:])
    root.backward()
    first = [x.grad for x in xs]
    root.backward()
    assert [x.grad for x in xs] == first
    assert root.grad == 1.0
    assert any(g != 0 for g in first)


def test_backward_of_a_second_root_resets_shared_leaves():
    x = Value(1.5)
    (x * 3.0).backward()
    assert x.grad == 3.0
    (x * x).backward()
    assert x.grad == 3.0  # 2 x, not 3 + 2 x


def test_topological_order_each_node_once_children_first_root_last():
    for seed in range(10):
        inputs, program = random_program(5, 30, seed=seed)
        xs = [Value(x) for x in inputs]
        root = sum(run_program(program, xs)[-4:])
        order = topological_order(root)
        assert order[-1] is root
        position = {id(n): k for k, n in enumerate(order)}
        assert len(position) == len(order)  # each node once
        for n in order:
            for child in n.children:
                assert position[id(child)] < position[id(n)]
        # exactly the nodes reachable from the root (found here by a plain traversal)
        reachable, stack = set(), [root]
        while stack:
            n = stack.pop()
            if id(n) not in reachable:
                reachable.add(id(n))
                stack.extend(n.children)
        assert set(position) == reachable


def test_topological_order_of_a_leaf_and_of_x_times_x():
    x = Value(2.0)
    assert topological_order(x) == [x]
    y = x * x
    assert topological_order(y) == [x, y]


def test_deep_chain_without_recursion_error():
    x, y = chain(5000)
    order = topological_order(y)
    assert len(order) == 5000 + 5000 + 1  # x, 5000 leaves "1.0" and 5000 sums
    assert order[-1] is y
    position = {id(n): k for k, n in enumerate(order)}
    assert len(position) == len(order) and id(x) in position
    assert all(position[id(c)] < position[id(n)] for n in order for c in n.children)
    y.backward()
    assert x.grad == 1.0

    z = x
    for _ in range(5000):
        z = z + x  # z = 5001 x: x is used 5001 times
    z.backward()
    assert x.grad == 5001.0
    assert z.data == pytest.approx(5001 * 0.5, rel=1e-12)


# --------------------------------------------------------------------------------------------
# Bad input: one table of (the bad call, the exception, a regex naming the argument)
# --------------------------------------------------------------------------------------------
def _p(call, error, match, id):
    return pytest.param(call, error, match, id=id)


BAD_INPUT = [
    _p(
        lambda: Value("1"),
        TypeError,
        "data must be an int or float, got str",
        "data-str",
    ),
    _p(
        lambda: Value(True),
        TypeError,
        "data must be an int or float, got bool",
        "data-bool",
    ),
    _p(lambda: Value(None), TypeError, "data must be an int or float", "data-none"),
    _p(lambda: Value(float("nan")), ValueError, "data must be finite", "data-nan"),
    _p(lambda: Value(float("inf")), ValueError, "data must be finite", "data-inf"),
    _p(
        lambda: Value(1) + "a",
        TypeError,
        "operand must be an int or float, got str",
        "add-str",
    ),
    _p(
        lambda: "a" * Value(1),
        TypeError,
        "operand must be an int or float, got str",
        "rmul-str",
    ),
    _p(
        lambda: Value(1) - True,
        TypeError,
        "operand must be an int or float, got bool",
        "sub-bool",
    ),
    _p(
        lambda: Value(1) / float("nan"), ValueError, "operand must be finite", "div-nan"
    ),
    _p(
        lambda: Value(2) ** Value(2),
        TypeError,
        "exponent must be an int or float, got Value",
        "pow-value",
    ),
    _p(
        lambda: Value(2) ** "2",
        TypeError,
        "exponent must be an int or float",
        "pow-str",
    ),
    _p(lambda: Value(0) ** -1, ValueError, "no finite derivative", "pow-zero-negative"),
    _p(lambda: Value(0) ** 0.5, ValueError, "no finite derivative", "pow-zero-half"),
    _p(lambda: Value(-2) ** 0.5, ValueError, "not real", "pow-negative-half"),
    _p(lambda: Value(1) / Value(0), ValueError, "no finite derivative", "div-zero"),
    _p(lambda: 1 / Value(0), ValueError, "no finite derivative", "rdiv-zero"),
    _p(lambda: Value(0).log(), ValueError, "log needs a positive number", "log-zero"),
    _p(
        lambda: Value(-1).log(),
        ValueError,
        "log needs a positive number",
        "log-negative",
    ),
    _p(
        lambda: Value(1e200) * Value(1e200),
        ValueError,
        "data must be finite",
        "mul-overflow",
    ),
    _p(lambda: Value(1000.0).exp(), OverflowError, "range", "exp-overflow"),
    _p(
        lambda: topological_order(3),
        TypeError,
        "root must be a Value, got int",
        "order-int",
    ),
    _p(
        lambda: topological_order(t64(1.0)),
        TypeError,
        "root must be a Value, got Tensor",
        "order-tensor",
    ),
    _p(lambda: draw_graph(3), TypeError, "root must be a Value", "draw-int"),
    _p(
        lambda: draw_graph(chain(30)[1]),
        ValueError,
        "the graph has 61 nodes; draw_graph is for up to 60",
        "draw-61-nodes",
    ),
    _p(
        lambda: Neuron(0),
        ValueError,
        "n_inputs must be a positive int",
        "neuron-n_inputs-0",
    ),
    _p(
        lambda: Neuron(-1),
        ValueError,
        "n_inputs must be a positive int",
        "neuron-n_inputs-negative",
    ),
    _p(
        lambda: Neuron(2.0),
        ValueError,
        "n_inputs must be a positive int",
        "neuron-n_inputs-float",
    ),
    _p(
        lambda: Neuron(True),
        ValueError,
        "n_inputs must be a positive int",
        "neuron-n_inputs-bool",
    ),
    _p(
        lambda: Neuron(2, activation="sigmoid"),
        ValueError,
        "activation must be 'tanh', 'relu' or 'linear'",
        "neuron-activation",
    ),
    _p(
        lambda: Layer(2, 0),
        ValueError,
        "n_outputs must be a positive int",
        "layer-n_outputs-0",
    ),
    _p(
        lambda: Layer(2, True),
        ValueError,
        "n_outputs must be a positive int",
        "layer-n_outputs-bool",
    ),
    _p(
        lambda: Layer(0, 2),
        ValueError,
        "n_inputs must be a positive int",
        "layer-n_inputs-0",
    ),
    _p(
        lambda: Layer(2, 2, activation="gelu"),
        ValueError,
        "activation must be",
        "layer-activation",
    ),
    _p(
        lambda: MLP(0, [3]),
        ValueError,
        "n_inputs must be a positive int",
        "mlp-n_inputs-0",
    ),
    _p(
        lambda: MLP(2, [3, 0]),
        ValueError,
        "n_outputs must be a positive int",
        "mlp-hidden-0",
    ),
    _p(
        lambda: Neuron(2)([1.0, 2.0, 3.0]),
        ValueError,
        "expected 2 inputs, got 3",
        "neuron-x-length",
    ),
    _p(
        lambda: Layer(3, 2, rng=random.Random(1))([1.0]),
        ValueError,
        "expected 3 inputs, got 1",
        "layer-x-length",
    ),
    _p(
        lambda: MLP(2, [3])([1.0, 2.0, 3.0, 4.0]),
        ValueError,
        "expected 2 inputs, got 4",
        "mlp-x-length",
    ),
    _p(
        lambda: Neuron(2)(["a", 1.0]),
        TypeError,
        "operand must be an int or float, got str",
        "neuron-x-str",
    ),
    _p(
        lambda: random_program(0, 5),
        ValueError,
        "n_inputs must be a positive int",
        "program-n_inputs-0",
    ),
    _p(
        lambda: random_program(2, 0),
        ValueError,
        "n_ops must be a positive int",
        "program-n_ops-0",
    ),
    _p(
        lambda: random_program(2, True),
        ValueError,
        "n_ops must be a positive int",
        "program-n_ops-bool",
    ),
    _p(
        lambda: random_program(True, 3),
        ValueError,
        "n_inputs must be a positive int",
        "program-n_inputs-bool",
    ),
    _p(
        lambda: random_program(2.0, 3),
        ValueError,
        "n_inputs must be a positive int",
        "program-n_inputs-float",
    ),
    _p(
        lambda: random_program(2, -3),
        ValueError,
        "n_ops must be a positive int",
        "program-n_ops-negative",
    ),
    _p(
        lambda: run_program([("add", 0, 1), ("sin", 2, 0)], [Value(1.0), Value(2.0)]),
        ValueError,
        "unknown operation 'sin'",
        "program-op",
    ),
    _p(lambda: two_moons(n=1), ValueError, "n must be an int >= 2", "moons-n-1"),
    _p(lambda: two_moons(n=0), ValueError, "n must be an int >= 2", "moons-n-0"),
    _p(lambda: two_moons(n=10.0), ValueError, "n must be an int >= 2", "moons-n-float"),
    _p(lambda: two_moons(n=True), ValueError, "n must be an int >= 2", "moons-n-bool"),
    _p(
        lambda: two_moons(n=10, noise=-0.1),
        ValueError,
        "noise must be >= 0",
        "moons-noise-negative",
    ),
    _p(
        lambda: two_moons(10, noise=float("nan")),
        ValueError,
        "noise",
        "moons-noise-nan",
    ),
    _p(
        lambda: two_moons(10, noise=float("inf")),
        ValueError,
        "noise",
        "moons-noise-inf",
    ),
]


@pytest.mark.parametrize("call, error, match", BAD_INPUT)
def test_bad_input_is_rejected(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_draw_graph_allows_60_nodes_and_draws_nothing_for_61():
    _, y = chain(30)  # 30 sums, 30 leaves "1.0", x: 61 nodes
    assert len(topological_order(y)) == 61
    with pytest.raises(ValueError, match="61 nodes"):
        draw_graph(y)
    assert plt.get_fignums() == []  # rejected before a figure was made
    x = Value(1.0)
    z = x
    for _ in range(59):
        z = z.tanh()  # a chain of exactly 60 nodes is allowed
    assert len(topological_order(z)) == 60
    draw_graph(z)


# --------------------------------------------------------------------------------------------
# Neuron, Layer, MLP
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ["tanh", "relu", "linear"])
def test_neuron_matches_torch(activation):
    neuron = Neuron(3, activation, rng=random.Random(7))
    neuron.b.data = 0.2
    x = [0.5, -1.2, 2.0]
    out = neuron(x)
    out.backward()
    w = torch.tensor(
        [p.data for p in neuron.w], dtype=torch.float64, requires_grad=True
    )
    b = t64(0.2)
    z = w @ torch.tensor(x, dtype=torch.float64) + b
    t_out = {"tanh": torch.tanh, "relu": torch.relu, "linear": lambda z: z}[activation](
        z
    )
    t_out.backward()
    assert close(out.data, t_out.item())
    for p, g in zip(neuron.w, w.grad, strict=True):
        assert close(p.grad, g.item())
    assert close(neuron.b.grad, b.grad.item())


def test_neuron_initialisation():
    neuron = Neuron(1000, rng=random.Random(3))
    ws = [p.data for p in neuron.w]
    assert all(-1 <= w <= 1 for w in ws)
    assert min(ws) < -0.9 and max(ws) > 0.9  # uniform on [-1, 1], not [0, 1]
    assert neuron.b.data == 0.0
    assert neuron.parameters() == [*neuron.w, neuron.b]
    assert [p.data for p in Neuron(5).w] == [
        p.data for p in Neuron(5).w
    ]  # deterministic default


def test_layer_without_rng_gives_distinct_neurons():
    # BUG (module): with rng=None each Neuron makes its own random.Random(0), so every neuron
    # of a Layer starts with the same weights (and, having the same gradient, stays so).
    layer = Layer(2, 3)
    weights = {tuple(p.data for p in neuron.w) for neuron in layer.neurons}
    assert len(weights) == 3


def test_layer_shape_and_parameters():
    layer = Layer(3, 4, rng=random.Random(0))
    out = layer([1.0, 2.0, 3.0])
    assert len(out) == 4 and all(isinstance(o, Value) for o in out)
    assert len(layer.parameters()) == 4 * (3 + 1)
    assert len({id(p) for p in layer.parameters()}) == 16


@pytest.mark.parametrize(
    "n_inputs, hidden", [(2, []), (2, [4]), (3, [5, 4]), (1, [2, 3, 2])]
)
def test_mlp_number_of_parameters_is_the_closed_form(n_inputs, hidden):
    sizes = [n_inputs, *hidden, 1]
    expected = sum((a + 1) * b for a, b in zip(sizes[:-1], sizes[1:], strict=True))
    mlp = MLP(n_inputs, hidden)
    assert len(mlp.parameters()) == expected
    assert len({id(p) for p in mlp.parameters()}) == expected


def mlp_to_torch(mlp: MLP) -> list[tuple[torch.Tensor, torch.Tensor]]:
    layers = []
    for layer in mlp.layers:
        w = [[p.data for p in neuron.w] for neuron in layer.neurons]
        b = [neuron.b.data for neuron in layer.neurons]
        layers.append(
            (
                torch.tensor(w, dtype=torch.float64, requires_grad=True),
                torch.tensor(b, dtype=torch.float64, requires_grad=True),
            )
        )
    return layers


def torch_mlp(layers, x: torch.Tensor) -> torch.Tensor:
    for k, (w, b) in enumerate(layers):
        x = x @ w.T + b
        if k < len(layers) - 1:
            x = torch.tanh(x)
    return x[..., 0]


@pytest.mark.parametrize("n_inputs, hidden", [(2, []), (2, [4]), (3, [5, 4])])
def test_mlp_forward_and_gradients_match_torch(n_inputs, hidden):
    mlp = MLP(n_inputs, hidden, seed=5)
    rng = random.Random(11)
    for p in mlp.parameters():  # non-zero biases too, so that they are really tested
        p.data = rng.uniform(-1, 1)
    xs = [[rng.uniform(-2, 2) for _ in range(n_inputs)] for _ in range(6)]
    ys = [rng.choice([-1.0, 1.0]) for _ in range(6)]

    scores = [mlp(x) for x in xs]
    loss = sum(
        ((s - y) ** 2 for s, y in zip(scores, ys, strict=True)), Value(0.0)
    ) / len(xs)
    loss = loss + sum(
        ((1 - y * s).relu() for s, y in zip(scores, ys, strict=True)), Value(0.0)
    )
    loss.backward()

    layers = mlp_to_torch(mlp)
    t_x, t_y = (
        torch.tensor(xs, dtype=torch.float64),
        torch.tensor(ys, dtype=torch.float64),
    )
    t_scores = torch_mlp(layers, t_x)
    t_loss = ((t_scores - t_y) ** 2).mean() + torch.relu(1 - t_y * t_scores).sum()
    t_loss.backward()

    for s, t in zip(scores, t_scores, strict=True):
        assert close(s.data, t.item())
    assert close(loss.data, t_loss.item())
    grads = []
    for w, b in layers:
        for row, bias in zip(w.grad, b.grad, strict=True):
            grads += [*row.tolist(), bias.item()]
    assert len(grads) == len(mlp.parameters())
    for p, g in zip(mlp.parameters(), grads, strict=True):
        assert close(p.grad, g)
    assert any(abs(g) > 1e-3 for g in grads)


def test_mlp_accepts_values_and_floats_and_returns_a_value():
    mlp = MLP(2, [3])
    a = mlp([Value(0.3), -0.7])
    b = mlp([0.3, -0.7])
    assert isinstance(a, Value) and a.data == b.data


def test_mlp_same_seed_same_weights():
    def weights(seed):
        return [p.data for p in MLP(3, [4, 4], seed=seed).parameters()]

    assert weights(0) == weights(0)
    assert weights(1) == weights(1)
    assert weights(0) != weights(1)
    # within one network the neurons differ (the rng is shared by the layers)
    first_layer = MLP(3, [4], seed=0).layers[0]
    assert len({tuple(p.data for p in n.w) for n in first_layer.neurons}) == 4


def test_mlp_activations():
    mlp = MLP(2, [3, 3])
    assert [n.activation for layer in mlp.layers for n in layer.neurons] == [
        "tanh"
    ] * 6 + ["linear"]


# --------------------------------------------------------------------------------------------
# two_moons
# --------------------------------------------------------------------------------------------
def test_two_moons_shape_labels_and_reproducibility():
    points, labels = two_moons(101, seed=4)
    assert len(points) == len(labels) == 101
    assert all(len(p) == 2 for p in points)
    assert labels == [-1 if k % 2 == 0 else 1 for k in range(101)]
    assert two_moons(101, seed=4) == (points, labels)
    assert two_moons(101, seed=5)[0] != points


def test_two_moons_without_noise_lie_on_the_half_circles():
    points, labels = two_moons(400, noise=0.0, seed=2)
    for (x, y), label in zip(points, labels, strict=True):
        if label == -1:
            assert x**2 + y**2 == pytest.approx(1.0, abs=1e-12)
            assert y >= 0
        else:
            assert (x - 1) ** 2 + (y - 0.5) ** 2 == pytest.approx(1.0, abs=1e-12)
            assert y <= 0.5
    # the half circles are covered from end to end
    first = [x for (x, _), label in zip(points, labels, strict=True) if label == -1]
    assert min(first) < -0.95 and max(first) > 0.95


def test_two_moons_noise_is_the_standard_deviation():
    noise = 0.01
    points, labels = two_moons(4000, noise=noise, seed=0)
    # the distance to the circle is, to first order, the radial part of an isotropic
    # Gaussian of standard deviation `noise`: mean 0 and standard deviation `noise`
    radial = [
        math.hypot(x, y) - 1 if label == -1 else math.hypot(x - 1, y - 0.5) - 1
        for (x, y), label in zip(points, labels, strict=True)
    ]
    mean = sum(radial) / len(radial)
    std = math.sqrt(sum((r - mean) ** 2 for r in radial) / len(radial))
    assert abs(mean) < 4 * noise / math.sqrt(len(radial)) + 1e-4
    assert std == pytest.approx(noise, rel=0.08)


# --------------------------------------------------------------------------------------------
# draw_graph
# --------------------------------------------------------------------------------------------
def small_graph() -> Value:
    a, b = Value(2.0, label="a"), Value(-3.0, label="b")
    c = a * b
    d = (c + a).tanh()
    d.label = "out"
    return d


def test_draw_graph_one_box_per_node():
    root = small_graph()
    root.backward()
    order = topological_order(root)
    ax = draw_graph(root)
    assert isinstance(ax, plt.Axes)
    boxes = [t for t in ax.texts if t.get_text()]
    arrows = [t for t in ax.texts if not t.get_text()]  # annotations are texts too
    assert len(boxes) == len(order) == 5
    assert len(arrows) == sum(len(n.children) for n in order) == 5
    assert all(t.get_bbox_patch() is not None for t in boxes)
    by_name = {t.get_text().split("\n")[0]: t for t in boxes}
    assert set(by_name) == {"a", "b", "×", "+", "out"}
    assert by_name["out"].get_text() == f"out\ndata {root.data:.3g}\ngrad 1"
    a = order[0] if order[0].label == "a" else order[1]
    assert by_name["a"].get_text() == f"a\ndata 2\ngrad {a.grad:.3g}"
    # columns: a node sits one right of its deepest input (a, b: 0; ×: 1; +: 2; out: 3)
    assert {name: t.get_position()[0] for name, t in by_name.items()} == {
        "a": 0,
        "b": 0,
        "×": 1,
        "+": 2,
        "out": 3,
    }


def test_draw_graph_on_a_given_axes_and_a_single_node():
    fig, ax = plt.subplots()
    root = small_graph()
    assert draw_graph(root, ax=ax) is ax
    assert plt.get_fignums() == [fig.number]  # no second figure
    ax2 = draw_graph(Value(1.5))
    assert [t.get_text() for t in ax2.texts] == ["input\ndata 1.5\ngrad 0"]
