"""Tests for ``dlabc.cnn.convolution``.

The reference is PyTorch, in float64: ``F.conv2d``, ``F.max_pool2d`` and
``F.avg_pool2d`` (``count_include_pad`` left at its default) for the forward passes,
their autograd gradients for the backward passes, ``F.unfold`` for ``im2col`` (same
order once ``(N, C, kh, kw, Ho, Wo)`` is flattened to ``(N, C kh kw, Ho Wo)``) and
``F.fold`` for ``col2im``. ``output_size`` is the shape PyTorch produces, and ``col2im``
must be the adjoint of ``im2col``: ``<im2col(x), c> = <x, col2im(c)>``. Forty random
configurations per function cover stride, padding, dilation, groups (1, 2, 3 and
depthwise), non-square kernels, int and pair arguments, batches of 1 to 3 and kernels
as large as the padded input; max pooling must route gradients through ties exactly as
PyTorch does (to the first maximum in reading order). float32 stays float32. Bad input
must fail early, with a clear message.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dlabc.cnn.convolution import (
    avg_pool2d,
    avg_pool2d_backward,
    col2im,
    conv2d,
    conv2d_backward,
    conv2d_naive,
    im2col,
    max_pool2d,
    max_pool2d_backward,
    output_size,
)

TIGHT = dict(rtol=1e-10, atol=1e-12)  # the same float64 sums, up to rounding
F32 = dict(rtol=1e-4, atol=1e-5)  # float32, summed in a different order
SEEDS = range(40)

# --------------------------------------------------------------------- helpers


def t64(a: np.ndarray, requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float64, requires_grad=requires_grad)


def arg(r: np.random.Generator, h: int, w: int):
    """``(h, w)`` as a pair, or as one int when the two agree (half the time)."""
    return h if h == w and r.random() < 0.5 else (h, w)


def span(k: int, d: int) -> int:
    return d * (k - 1) + 1  # input positions one dilated window covers


def side(r: np.random.Generator, k: int, p: int, d: int, tight: bool) -> int:
    """An input size the window fits in; ``tight``: exactly the padded input."""
    smallest = max(span(k, d) - 2 * p, 1)
    return smallest if tight else smallest + int(r.integers(0, 4))


def conv_case(seed: int) -> dict:
    """A random convolution; the seed cycles through the kinds of groups and shapes."""
    r = np.random.default_rng(seed)
    kind = seed % 4  # groups 1, 2, 3, depthwise
    if kind == 3:
        C = int(r.integers(1, 5))
        G, C_g, O = C, 1, C * int(r.integers(1, 3))
    else:
        G = kind + 1
        C_g = int(r.integers(1, 3))
        C, O = G * C_g, G * int(r.integers(1, 3))
    kh, kw = (int(v) for v in r.integers(1, 4, size=2))
    sh, sw = (int(v) for v in r.integers(1, 4, size=2))
    dh, dw = (int(v) for v in r.integers(1, 3, size=2))
    ph, pw = (
        min(int(r.integers(0, 3)), (span(k, d) - 1) // 2)
        for k, d in ((kh, dh), (kw, dw))
    )
    tight = seed % 5 == 0  # kernel as large as the padded input: a 1 x 1 output
    H, W = side(r, kh, ph, dh, tight), side(r, kw, pw, dw, tight)
    N = int(r.integers(1, 4))
    return dict(
        x=r.normal(size=(N, C, H, W)),
        weight=r.normal(size=(O, C_g, kh, kw)),
        bias=None if seed % 3 == 0 else r.normal(size=O),
        kw=dict(
            stride=arg(r, sh, sw),
            padding=arg(r, ph, pw),
            dilation=arg(r, dh, dw),
            groups=G,
        ),
    )


NAMED_CONV = {  # (N, C, H, W), (O, C / G, kh, kw), keyword arguments
    "plain 3x3": ((2, 3, 5, 5), (4, 3, 3, 3), {}),
    "1x1": ((1, 4, 3, 2), (2, 4, 1, 1), {}),
    "stride 2, padding 1": ((2, 2, 7, 6), (3, 2, 3, 3), dict(stride=2, padding=1)),
    "non-square, pairs": (
        (1, 2, 6, 7),
        (2, 2, 2, 3),
        dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
    ),
    "dilation 2": ((3, 1, 7, 7), (2, 1, 3, 3), dict(dilation=2, padding=2)),
    "groups 2": ((2, 4, 5, 5), (6, 2, 3, 3), dict(groups=2)),
    "groups 3": ((1, 6, 4, 5), (3, 2, 2, 2), dict(groups=3, stride=(1, 2))),
    "depthwise": ((2, 3, 5, 5), (6, 1, 3, 3), dict(groups=3, padding=1)),
    "kernel = padded input": ((1, 2, 3, 4), (2, 2, 5, 6), dict(padding=1)),
    "kernel = input": ((2, 2, 4, 3), (3, 2, 4, 3), {}),
    "stride past the end": ((1, 1, 8, 8), (1, 1, 3, 3), dict(stride=3)),
}


def named_conv(name: str) -> dict:
    x_shape, w_shape, kw = NAMED_CONV[name]
    r = np.random.default_rng(len(name))
    return dict(
        x=r.normal(size=x_shape),
        weight=r.normal(size=w_shape),
        bias=r.normal(size=w_shape[0]),
        kw=kw,
    )


CONV_CASES = [pytest.param(conv_case(s), id=f"seed{s}") for s in SEEDS] + [
    pytest.param(named_conv(name), id=name) for name in NAMED_CONV
]


def torch_conv(case: dict, upstream: np.ndarray | None = None):
    """F.conv2d's output and, for ``sum(upstream * y)``, the three gradients (the
    bias gradient is taken at a zero bias where the case has none)."""
    x, w = t64(case["x"], True), t64(case["weight"], True)
    bias = case["bias"]
    if bias is None and upstream is not None:
        bias = np.zeros(w.shape[0])
    b = None if bias is None else t64(bias, True)
    y = F.conv2d(x, w, b, **case["kw"])
    if upstream is None:
        return y.detach().numpy()
    (y * t64(upstream)).sum().backward()
    return y.detach().numpy(), x.grad.numpy(), w.grad.numpy(), b.grad.numpy()


def empty_window(n: int, k: int, s: int, p: int, d: int) -> bool:
    """Does some dilated window along this axis hold only padding?"""
    out = (n + 2 * p - span(k, d)) // s + 1
    return any(
        all(not 0 <= s * u - p + d * i < n for i in range(k)) for u in range(out)
    )


def pool_case(seed: int, dilation: bool) -> dict:
    """A random pooling: overlapping windows (stride < kernel) and padding included.

    Windows that hold only padding are left out: PyTorch's max_pool2d writes out of
    bounds on them (heap corruption); they have a test of their own.
    """
    r = np.random.default_rng(1000 + seed)
    while True:
        kh, kw = (int(v) for v in r.integers(1, 5, size=2))
        sh, sw = (int(v) for v in r.integers(1, 4, size=2))
        ph, pw = int(r.integers(0, kh // 2 + 1)), int(r.integers(0, kw // 2 + 1))
        dh, dw = (int(v) for v in r.integers(1, 3, size=2)) if dilation else (1, 1)
        tight = seed % 5 == 0
        H, W = side(r, kh, ph, dh, tight), side(r, kw, pw, dw, tight)
        if not (empty_window(H, kh, sh, ph, dh) or empty_window(W, kw, sw, pw, dw)):
            break
    kw_args = dict(
        kernel_size=arg(r, kh, kw),
        stride=None if seed % 4 == 0 else arg(r, sh, sw),
        padding=arg(r, ph, pw),
    )
    if dilation:
        kw_args["dilation"] = arg(r, dh, dw)
    shape = (int(r.integers(1, 4)), int(r.integers(1, 4)), H, W)
    if seed % 2:  # few distinct values: many ties inside the windows
        x = r.integers(-2, 3, size=shape).astype(np.float64)
    else:
        x = r.normal(size=shape)
    return dict(x=x, kw=kw_args)


def integer_upstream(shape, seed: int = 7) -> np.ndarray:
    """Integer-valued gradients: their sums are exact, so the results can be equal."""
    return np.random.default_rng(seed).integers(-3, 4, size=shape).astype(np.float64)


def torch_pool(fn, x: np.ndarray, upstream: np.ndarray | None, **kw):
    xt = t64(x, True)
    y = fn(xt, **kw)
    if upstream is None:
        return y.detach().numpy()
    (y * t64(upstream)).sum().backward()
    return y.detach().numpy(), xt.grad.numpy()


# --------------------------------------------------------------------- output_size


@pytest.mark.parametrize(
    "n, k, s, p, d, expected",
    [
        (5, 3, 1, 0, 1, 3),
        (5, 3, 1, 1, 1, 5),  # "same" padding
        (7, 3, 2, 1, 1, 4),
        (8, 3, 3, 0, 1, 2),  # the last partial window is dropped
        (4, 4, 1, 0, 1, 1),  # kernel = input
        (3, 5, 1, 1, 1, 1),  # kernel = padded input
        (7, 3, 1, 0, 2, 3),  # a 3-kernel of dilation 2 spans 5
        (1, 1, 5, 0, 1, 1),
    ],
)
def test_output_size_closed_form(n, k, s, p, d, expected):
    assert output_size(n, k, s, p, d) == expected


@pytest.mark.parametrize("seed", SEEDS)
def test_output_size_is_the_shape_pytorch_produces(seed):
    r = np.random.default_rng(seed)
    k, s, d = (int(v) for v in r.integers(1, 5, size=3))
    p = int(r.integers(0, 3))
    n = max(span(k, d) - 2 * p, 1) + int(r.integers(0, 6))
    x = torch.zeros(1, 1, n, n + 1, dtype=torch.float64)
    y = F.conv2d(x, torch.zeros(1, 1, k, 1, dtype=torch.float64), None, s, p, d)
    assert output_size(n, k, s, p, d) == y.shape[2]
    assert output_size(n + 1, 1, s, p, d) == y.shape[3]
    assert output_size(np.int64(n), k, s, p, d) == y.shape[2]  # NumPy ints are fine


# --------------------------------------------------------------------- im2col, col2im


@pytest.mark.parametrize("case", CONV_CASES)
def test_im2col_matches_unfold(case):
    x, (kh, kw) = case["x"], case["weight"].shape[2:]
    geometry = {k: v for k, v in case["kw"].items() if k != "groups"}
    cols = im2col(x, (kh, kw), **geometry)
    N, C, H, W = x.shape
    Ho, Wo = torch_conv(case).shape[2:]
    assert cols.shape == (N, C, kh, kw, Ho, Wo)
    ref = F.unfold(t64(x), (kh, kw), **geometry).numpy()  # (N, C kh kw, Ho Wo)
    np.testing.assert_array_equal(cols.reshape(N, C * kh * kw, Ho * Wo), ref)


@pytest.mark.parametrize("pad_value", [0.0, 7.5, -np.inf])
def test_im2col_pad_value_fills_the_border(pad_value):
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 5))
    cols = im2col(x, (3, 2), stride=(1, 2), padding=(2, 1), pad_value=pad_value)
    x_pad = F.pad(t64(x), (1, 1, 2, 2), value=pad_value)
    ref = F.unfold(x_pad, (3, 2), stride=(1, 2)).numpy()
    np.testing.assert_array_equal(cols.reshape(ref.shape), ref)


@pytest.mark.parametrize("case", CONV_CASES)
def test_col2im_matches_fold_and_is_the_adjoint_of_im2col(case):
    x, (kh, kw) = case["x"], case["weight"].shape[2:]
    geometry = {k: v for k, v in case["kw"].items() if k != "groups"}
    shape = im2col(x, (kh, kw), **geometry).shape
    c = np.random.default_rng(3).normal(size=shape)
    back = col2im(c, x.shape, **geometry)
    assert back.shape == x.shape
    N, C, H, W = x.shape
    ref = F.fold(
        t64(c.reshape(N, C * kh * kw, -1)), (H, W), (kh, kw), **geometry
    ).numpy()
    np.testing.assert_allclose(back, ref, **TIGHT)
    lhs = np.sum(im2col(x, (kh, kw), **geometry) * c)
    np.testing.assert_allclose(lhs, np.sum(x * back), **TIGHT)


def test_col2im_adds_overlapping_windows():
    """All-ones columns: each pixel receives the number of windows it lies in."""
    cols = np.ones((1, 1, 2, 2, 2, 2))
    counts = col2im(cols, (1, 1, 3, 3))  # 2 x 2 windows, stride 1, over a 3 x 3 input
    np.testing.assert_array_equal(counts[0, 0], [[1, 2, 1], [2, 4, 2], [1, 2, 1]])


# --------------------------------------------------------------------- conv2d


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_and_naive_match_torch(case):
    args = case["x"], case["weight"], case["bias"]
    y = conv2d(*args, **case["kw"])
    ref = torch_conv(case)
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, **TIGHT)
    np.testing.assert_allclose(conv2d_naive(*args, **case["kw"]), ref, **TIGHT)


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_backward_matches_autograd(case):
    y = conv2d(case["x"], case["weight"], case["bias"], **case["kw"])
    upstream = np.random.default_rng(5).normal(size=y.shape)
    _, gx_ref, gw_ref, gb_ref = torch_conv(case, upstream)
    gx, gw, gb = conv2d_backward(upstream, case["x"], case["weight"], **case["kw"])
    np.testing.assert_allclose(gx, gx_ref, **TIGHT)
    np.testing.assert_allclose(gw, gw_ref, **TIGHT)
    np.testing.assert_allclose(gb, gb_ref, **TIGHT)


def test_conv2d_empty_batch():
    x, w = np.zeros((0, 4, 5, 5)), np.ones((6, 2, 3, 3))
    case = dict(x=x, weight=w, bias=np.ones(6), kw=dict(groups=2))
    ref = torch_conv(case)
    for fn in (conv2d, conv2d_naive):
        assert fn(x, w, np.ones(6), groups=2).shape == ref.shape == (0, 6, 3, 3)
    gx, gw, gb = conv2d_backward(np.zeros(ref.shape), x, w, groups=2)
    assert gx.shape == x.shape and not gw.any() and not gb.any()


@pytest.mark.parametrize("name", ["plain 3x3", "groups 2", "depthwise", "dilation 2"])
def test_conv2d_keeps_float32(name):
    case = named_conv(name)
    x, w, b = (case[k].astype(np.float32) for k in ("x", "weight", "bias"))
    ref = torch_conv(case)
    for fn in (conv2d, conv2d_naive):
        y = fn(x, w, b, **case["kw"])
        assert y.dtype == np.float32
        np.testing.assert_allclose(y, ref, **F32)
    grads = conv2d_backward(np.ones(ref.shape, np.float32), x, w, **case["kw"])
    _, *grads_ref = torch_conv(case, np.ones(ref.shape))
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert g.dtype == np.float32
        np.testing.assert_allclose(g, g_ref, **F32)
    assert im2col(x, 3).dtype == np.float32


# --------------------------------------------------------------------- max pooling

MAX_CASES = [pytest.param(pool_case(s, dilation=True), id=f"seed{s}") for s in SEEDS]
AVG_CASES = [pytest.param(pool_case(s, dilation=False), id=f"seed{s}") for s in SEEDS]


@pytest.mark.parametrize("case", MAX_CASES)
def test_max_pool2d_matches_torch(case):
    x = case["x"]
    y = max_pool2d(x, **case["kw"])
    upstream = integer_upstream(y.shape)
    y_ref, grad_ref = torch_pool(F.max_pool2d, x, upstream, **case["kw"])
    np.testing.assert_array_equal(y, y_ref)  # a max is exact
    # the same winner in every window (ties included), and exact integer sums
    np.testing.assert_array_equal(
        max_pool2d_backward(upstream, x, **case["kw"]), grad_ref
    )


@pytest.mark.parametrize(
    "x",
    [
        np.zeros((2, 2, 5, 6)),
        np.full((1, 3, 4, 4), -5.0),  # negative: padding (-inf) must still never win
        np.tile([[1.0, 1.0], [1.0, 0.0]], (1, 2, 3, 3)),
    ],
    ids=["zeros", "constant -5", "repeated pattern"],
)
@pytest.mark.parametrize(
    "kw",
    [
        dict(kernel_size=2),
        dict(kernel_size=3, stride=1, padding=1),  # overlapping windows
        dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 1)),
        dict(kernel_size=2, stride=1, padding=1, dilation=2),
    ],
    ids=["2x2", "3x3 s1 p1", "3x2 pairs", "dilated"],
)
def test_max_pool2d_ties_go_to_the_first_maximum_like_torch(x, kw):
    y = max_pool2d(x, **kw)
    upstream = integer_upstream(y.shape, seed=11)
    y_ref, grad_ref = torch_pool(F.max_pool2d, x, upstream, **kw)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(max_pool2d_backward(upstream, x, **kw), grad_ref)


def test_max_pool2d_tie_winner_by_hand():
    """One 2 x 2 window of equal values: the top-left pixel gets the whole gradient."""
    grad = max_pool2d_backward(np.array([[[[3.0]]]]), np.ones((1, 1, 2, 2)), 2)
    np.testing.assert_array_equal(grad[0, 0], [[3.0, 0.0], [0.0, 0.0]])


def test_max_pool2d_window_of_only_padding():
    """Kernel 2 of dilation 3 with padding 1 over 2 pixels sees positions -1 and 2:
    padding only. The maximum of nothing is -inf and no gradient flows. (PyTorch
    writes out of bounds here, so it is not the reference.)"""
    x = np.random.default_rng(0).normal(size=(1, 2, 2, 5))
    y = max_pool2d(x, 2, stride=1, padding=1, dilation=(3, 1))
    assert y.shape == (1, 2, 1, 6) and np.all(y == -np.inf)
    grad = max_pool2d_backward(np.ones(y.shape), x, 2, 1, 1, (3, 1))
    np.testing.assert_array_equal(grad, np.zeros_like(x))


def test_max_pool2d_keeps_float32():
    x = np.random.default_rng(0).normal(size=(2, 3, 6, 6))
    y = max_pool2d(x.astype(np.float32), 3, 2, 1)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, max_pool2d(x, 3, 2, 1).astype(np.float32))
    g = max_pool2d_backward(np.ones(y.shape, np.float32), x.astype(np.float32), 3, 2, 1)
    assert g.dtype == np.float32


# --------------------------------------------------------------------- average pooling


@pytest.mark.parametrize("case", AVG_CASES)
def test_avg_pool2d_matches_torch(case):
    x = case["x"]
    y = avg_pool2d(x, **case["kw"])
    upstream = np.random.default_rng(2).normal(size=y.shape)
    y_ref, grad_ref = torch_pool(F.avg_pool2d, x, upstream, **case["kw"])
    np.testing.assert_allclose(y, y_ref, **TIGHT)
    np.testing.assert_allclose(
        avg_pool2d_backward(upstream, x, **case["kw"]), grad_ref, **TIGHT
    )


def test_avg_pool2d_counts_the_padding():
    """A corner window of a 3 x 3 kernel with padding 1 holds 4 ones and 5 zeros."""
    y = avg_pool2d(np.ones((1, 1, 4, 4)), 3, stride=1, padding=1)
    assert y[0, 0, 0, 0] == pytest.approx(4 / 9) and y[0, 0, 1, 1] == 1.0


def test_avg_pool2d_keeps_float32():
    x = np.random.default_rng(0).normal(size=(2, 3, 6, 6))
    y = avg_pool2d(x.astype(np.float32), 3, 2, 1)
    assert y.dtype == np.float32
    np.testing.assert_allclose(
        y, torch_pool(F.avg_pool2d, x, None, kernel_size=3, stride=2, padding=1), **F32
    )
    g = avg_pool2d_backward(np.ones(y.shape, np.float32), x.astype(np.float32), 3, 2, 1)
    assert g.dtype == np.float32


# --------------------------------------------------------------------- bad input

X = np.zeros((2, 4, 5, 5))
W = np.zeros((6, 4, 3, 3))
G = np.zeros((2, 6, 3, 3))  # conv2d(X, W)'s output shape
COLS = np.zeros((2, 4, 3, 3, 3, 3))  # im2col(X, 3)'s shape


def _raises(fn, *args, **kw):
    return lambda: fn(*args, **kw)


BAD = {
    # x
    "x not an array": (
        _raises(conv2d, X.tolist(), W),
        TypeError,
        "x must be a NumPy array",
    ),
    "x 3-D": (_raises(conv2d, X[0], W), ValueError, "x must have 4 dimensions"),
    "x integer": (
        _raises(conv2d, X.astype(int), W),
        TypeError,
        "x must be a floating-point array",
    ),
    "naive x integer": (
        _raises(conv2d_naive, X.astype(np.int32), W),
        TypeError,
        "x must be a floating-point array",
    ),
    "im2col x not an array": (_raises(im2col, 1.0, 3), TypeError, "x must be a NumPy"),
    "im2col x 5-D": (_raises(im2col, X[None], 3), ValueError, "x must have 4 dim"),
    "max pool x 2-D": (_raises(max_pool2d, X[0, 0], 2), ValueError, "x must have 4"),
    "max pool x integer": (
        _raises(max_pool2d, X.astype(np.uint8), 2),
        TypeError,
        "x must be a floating-point array",
    ),
    "avg pool x not an array": (
        _raises(avg_pool2d, X.tolist(), 2),
        TypeError,
        "x must be a NumPy array",
    ),
    # weight, groups, bias
    "weight 3-D": (_raises(conv2d, X, W[0]), ValueError, "weight must have 4 dim"),
    "weight integer": (
        _raises(conv2d, X, W.astype(int)),
        TypeError,
        "weight must be a floating-point array",
    ),
    "weight channels": (
        _raises(conv2d, X, np.zeros((6, 3, 3, 3))),
        ValueError,
        re.escape("weight must have shape (O, C / groups, kh, kw) = (O, 4, kh, kw)"),
    ),
    "weight channels for groups": (
        _raises(conv2d, X, W, groups=2),
        ValueError,
        re.escape("= (O, 2, kh, kw) for x with 4 channels"),
    ),
    "naive weight channels": (
        _raises(conv2d_naive, X, np.zeros((6, 2, 3, 3))),
        ValueError,
        "weight must have shape",
    ),
    "groups do not divide C": (
        _raises(conv2d, X, np.zeros((6, 1, 3, 3)), groups=3),
        ValueError,
        re.escape("groups=3 must divide the input channels (4)"),
    ),
    "groups do not divide O": (
        _raises(conv2d, X, np.zeros((3, 2, 3, 3)), groups=2),
        ValueError,
        re.escape("output channels (3)"),
    ),
    "groups 0": (
        _raises(conv2d, X, W, groups=0),
        ValueError,
        "groups must be a positive int",
    ),
    "groups bool": (_raises(conv2d, X, W, groups=True), ValueError, "groups must be"),
    "groups float": (_raises(conv2d, X, W, groups=1.0), ValueError, "groups must be"),
    "bias too long": (
        _raises(conv2d, X, W, np.zeros(7)),
        ValueError,
        re.escape("bias must have shape (6,), got (7,)"),
    ),
    "bias 2-D": (
        _raises(conv2d, X, W, np.zeros((6, 1))),
        ValueError,
        "bias must have 1",
    ),
    "naive bias": (
        _raises(conv2d_naive, X, W, np.zeros(4)),
        ValueError,
        re.escape("bias must have shape (6,)"),
    ),
    "bias not an array": (
        _raises(conv2d, X, W, [0.0] * 6),
        TypeError,
        "bias must be a NumPy",
    ),
    # geometry
    "kernel > input": (
        _raises(conv2d, X, np.zeros((1, 4, 6, 3))),
        ValueError,
        "a kernel spanning 6 positions does not fit in an input of 5 with padding 0",
    ),
    "kernel > padded input": (
        _raises(conv2d, X, np.zeros((1, 4, 3, 8)), padding=1),
        ValueError,
        "spanning 8 positions does not fit in an input of 5 with padding 1",
    ),
    "dilated kernel > input": (
        _raises(conv2d_naive, X, W, dilation=3),
        ValueError,
        "spanning 7 positions does not fit",
    ),
    "im2col kernel > input": (_raises(im2col, X, (2, 6)), ValueError, "does not fit"),
    "pool kernel > input": (_raises(max_pool2d, X, 6), ValueError, "does not fit"),
    "avg pool kernel > input": (
        _raises(avg_pool2d, X, (6, 1)),
        ValueError,
        "does not fit",
    ),
    "negative padding": (
        _raises(conv2d, X, W, padding=-1),
        ValueError,
        "padding must be >= 0",
    ),
    "negative padding pair": (
        _raises(im2col, X, 3, padding=(0, -1)),
        ValueError,
        re.escape("padding must be >= 0, got (0, -1)"),
    ),
    "pool negative padding": (
        _raises(max_pool2d, X, 2, padding=-1),
        ValueError,
        "padding must be >= 0",
    ),
    "zero stride": (_raises(conv2d, X, W, stride=0), ValueError, "stride must be >= 1"),
    "zero stride pair": (
        _raises(im2col, X, 3, stride=(1, 0)),
        ValueError,
        "stride must be >= 1",
    ),
    "pool zero stride": (
        _raises(avg_pool2d, X, 2, stride=0),
        ValueError,
        "stride must be >= 1",
    ),
    "zero dilation": (
        _raises(conv2d, X, W, dilation=0),
        ValueError,
        "dilation must be >= 1",
    ),
    "zero kernel": (_raises(im2col, X, 0), ValueError, "kernel_size must be >= 1"),
    "bool stride": (
        _raises(conv2d, X, W, stride=True),
        TypeError,
        "stride must be an int or a pair of ints",
    ),
    "float stride": (
        _raises(conv2d_naive, X, W, stride=1.0),
        TypeError,
        "stride must be an int or a pair of ints",
    ),
    "bool in pair": (
        _raises(im2col, X, 3, stride=(1, False)),
        TypeError,
        "stride must be an int",
    ),
    "triple padding": (
        _raises(conv2d, X, W, padding=(1, 1, 1)),
        TypeError,
        "padding must be an int or a pair of ints",
    ),
    "list dilation": (
        _raises(im2col, X, 3, dilation=[1, 1]),
        TypeError,
        "dilation must be",
    ),
    "pool float kernel": (
        _raises(max_pool2d, X, 2.0),
        TypeError,
        "kernel_size must be an int",
    ),
    "pool bool stride": (
        _raises(max_pool2d, X, 2, stride=True),
        TypeError,
        "stride must be an int",
    ),
    "max pool padding > half kernel": (
        _raises(max_pool2d, X, 3, padding=2),
        ValueError,
        re.escape("padding 2 must be at most half the kernel (3, 3)"),
    ),
    "max pool padding pair > half kernel": (
        _raises(max_pool2d, X, (3, 4), padding=(1, 3)),
        ValueError,
        "must be at most half the kernel",
    ),
    "avg pool padding height > half kernel": (
        _raises(avg_pool2d, X, 3, padding=(2, 0)),
        ValueError,
        re.escape("padding (2, 0) must be at most half the kernel (3, 3)"),
    ),
    "avg pool padding > half kernel": (
        _raises(avg_pool2d, X, 2, padding=2),
        ValueError,
        "must be at most half the kernel",
    ),
    "max pool backward padding > half kernel": (
        _raises(max_pool2d_backward, np.zeros((2, 4, 7, 7)), X, 2, 1, 2),
        ValueError,
        "must be at most half the kernel",
    ),
    "avg pool backward padding > half kernel": (
        _raises(avg_pool2d_backward, np.zeros((2, 4, 7, 7)), X, 2, 1, 2),
        ValueError,
        "must be at most half the kernel",
    ),
    # grad_out
    "conv grad_out shape": (
        _raises(conv2d_backward, G[:, :5], X, W),
        ValueError,
        re.escape(
            "grad_out must have the output's shape (2, 6, 3, 3), got (2, 5, 3, 3)"
        ),
    ),
    "conv grad_out with padding": (
        _raises(conv2d_backward, G, X, W, padding=1),
        ValueError,
        re.escape("grad_out must have the output's shape (2, 6, 5, 5)"),
    ),
    "conv grad_out 3-D": (
        _raises(conv2d_backward, G[0], X, W),
        ValueError,
        "grad_out must have 4",
    ),
    "conv grad_out list": (
        _raises(conv2d_backward, G.tolist(), X, W),
        TypeError,
        "grad_out must be a NumPy array",
    ),
    "conv grad_out integer": (
        _raises(conv2d_backward, G.astype(int), X, W),
        TypeError,
        "grad_out must be a floating-point array",
    ),
    "conv backward weight channels": (
        _raises(conv2d_backward, G, X, W[:, :3]),
        ValueError,
        "weight must have shape",
    ),
    "max pool grad_out shape": (
        _raises(max_pool2d_backward, np.zeros((2, 4, 3, 3)), X, 2),
        ValueError,
        re.escape(
            "grad_out must have the output's shape (2, 4, 2, 2), got (2, 4, 3, 3)"
        ),
    ),
    "max pool grad_out channels": (
        _raises(max_pool2d_backward, np.zeros((2, 3, 2, 2)), X, 2),
        ValueError,
        "grad_out must have the output's shape",
    ),
    "max pool grad_out list": (
        _raises(max_pool2d_backward, [[0.0]], X, 2),
        TypeError,
        "grad_out must be a NumPy array",
    ),
    "max pool grad_out 2-D": (
        _raises(max_pool2d_backward, np.zeros((2, 2)), X, 2),
        ValueError,
        "grad_out must have 4 dimensions",
    ),
    "avg pool grad_out shape": (
        _raises(avg_pool2d_backward, np.zeros((2, 4, 2, 3)), X, 2),
        ValueError,
        re.escape(
            "grad_out must have the output's shape (2, 4, 2, 2), got (2, 4, 2, 3)"
        ),
    ),
    "avg pool grad_out list": (
        _raises(avg_pool2d_backward, [[0.0]], X, 2),
        TypeError,
        "grad_out must be a NumPy array",
    ),
    "avg pool grad_out 5-D": (
        _raises(avg_pool2d_backward, np.zeros((1, 2, 4, 2, 2)), X, 2),
        ValueError,
        "grad_out must have 4 dimensions",
    ),
    # col2im
    "cols shape": (
        _raises(col2im, COLS[:, :, :, :, :2], X.shape),
        ValueError,
        re.escape(
            "cols must have shape (2, 4, 3, 3, 3, 3) for input (2, 4, 5, 5), got"
        ),
    ),
    "cols for another stride": (
        _raises(col2im, COLS, X.shape, stride=2),
        ValueError,
        re.escape("cols must have shape (2, 4, 3, 3, 2, 2)"),
    ),
    "cols channels": (
        _raises(col2im, COLS, (2, 3, 5, 5)),
        ValueError,
        "cols must have shape",
    ),
    "cols 5-D": (
        _raises(col2im, COLS[0], X.shape),
        ValueError,
        "cols must have 6 dimensions",
    ),
    "cols not an array": (
        _raises(col2im, COLS.tolist(), X.shape),
        TypeError,
        "cols must be a NumPy",
    ),
    "cols integer": (
        _raises(col2im, COLS.astype(int), X.shape),
        TypeError,
        "cols must be a floating-point array",
    ),
    "col2im input_shape 3 ints": (
        _raises(col2im, COLS, (4, 5, 5)),
        ValueError,
        re.escape("input_shape must be 4 ints (N, C, H, W), got (4, 5, 5)"),
    ),
    "col2im input_shape float": (
        _raises(col2im, COLS, (2, 4, 5.0, 5)),
        ValueError,
        "input_shape must be 4 ints",
    ),
    "col2im input_shape negative": (
        _raises(col2im, COLS, (2, 4, -5, 5)),
        ValueError,
        "input_shape must be 4 ints",
    ),
    "col2im kernel > input": (
        _raises(col2im, COLS, (2, 4, 2, 2)),
        ValueError,
        "does not fit",
    ),
    # output_size
    "output_size kernel too large": (
        _raises(output_size, 4, 3, padding=0, dilation=2),
        ValueError,
        "a kernel spanning 5 positions does not fit in an input of 4 with padding 0",
    ),
    "output_size pair": (
        _raises(output_size, 5, (3, 1)),
        TypeError,
        re.escape("kernel_size must be an int (one axis), got (3, 1)"),
    ),
    "output_size zero stride": (
        _raises(output_size, 5, 3, 0),
        ValueError,
        "stride must be >= 1",
    ),
    "output_size zero size": (
        _raises(output_size, 0, 1),
        ValueError,
        "size must be >= 1",
    ),
    "output_size float": (
        _raises(output_size, 5.0, 3),
        TypeError,
        "size must be an int",
    ),
}


@pytest.mark.parametrize("call, error, match", BAD.values(), ids=BAD.keys())
def test_bad_input_is_rejected_clearly(call, error, match):
    with pytest.raises(error, match=match):
        call()
