"""Tests for ``dlabc.foundations.activations``.

Every activation must agree with its ``torch.nn.functional`` twin, value and input
gradient, in float32 over a dense grid from -100 to 100 that also holds the kinks and
the signed zeros exactly (-3, 3, 0, -0.0, +-1e-30), and its gradient must be finite
everywhere: an unused ``torch.where`` branch that overflows would leak ``inf * 0 = nan``.
The same comparison runs in float64 on random input at tight tolerances, the gradients
at the kinks must be PyTorch's exactly, and ``torch.autograd.gradcheck`` checks every
function in float64 away from the kinks. PReLU is also compared for its weight gradient,
with one slope and with one slope per channel on 2-D and 4-D input.

The exact GELU must be accurate for very negative input, where the textbook
$\\tfrac12 x (1 + \\operatorname{erf}(x/\\sqrt2))$ cancels to nothing in float32: its value
and gradient are compared with a float64 reference built on ``erfc``, and the textbook
form is shown to fail the same bound. Sigmoid, softplus, SiLU and ELU must reach their
limits at +-100 without overflow. ``GatedFeedForward`` is rebuilt from its own weights
with ``F.linear`` and tied to ``F.glu`` and ``geglu``. Bad input must fail early, with a
clear message.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dlabc.foundations.activations import (
    GatedFeedForward,
    elu,
    geglu,
    gelu,
    gelu_tanh,
    glu,
    hard_sigmoid,
    hard_swish,
    leaky_relu,
    mish,
    prelu,
    relu,
    sigmoid,
    silu,
    softplus,
    swiglu,
)

TIGHT = dict(rtol=1e-10, atol=1e-12)  # float64, up to rounding
RTOL32, ATOL32 = 1e-5, 1e-6  # float32; the absolute part is scaled for large factors
EPS32 = torch.finfo(torch.float32).eps
KINKS = [-3.0, 3.0, 0.0, -0.0, 1e-30, -1e-30]

# --------------------------------------------------------------------- helpers


def rand(*shape, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype)


def grid(dtype=torch.float32) -> torch.Tensor:
    """20 000 points: step about 0.01 from -100 to 100, then the kinks, +-100 again."""
    dense = torch.linspace(-100, 100, 20_000 - len(KINKS) - 2, dtype=torch.float64)
    extra = torch.tensor(KINKS + [-100.0, 100.0], dtype=torch.float64)
    x = torch.cat([dense, extra]).to(dtype)
    assert (x == 0).sum() >= 2 and torch.signbit(x[x == 0]).any()  # -0.0 survived
    return x


def value_and_grad(f, x: torch.Tensor, upstream: torch.Tensor):
    """``f(x)`` and the gradient of ``sum(upstream * f(x))`` with respect to ``x``."""
    x = x.detach().clone().requires_grad_()
    y = f(x)
    (grad,) = torch.autograd.grad((y * upstream).sum(), x)
    return y.detach(), grad


def assert_near(actual, expected, scale=1.0, what="", rtol=RTOL32, atol=ATOL32):
    """``|actual - expected| <= atol * scale + rtol * |expected|``, both finite.

    ``scale`` multiplies the absolute tolerance where a result is a product with a large
    factor (a gate half up to 100, an upstream gradient), whose rounding scales with it.
    """
    assert actual.shape == expected.shape, what
    assert torch.isfinite(actual).all(), f"{what}: not finite at {actual}"
    assert torch.isfinite(expected).all(), f"{what}: reference not finite"
    err = (actual.double() - expected.double()).abs()
    bound = atol * torch.as_tensor(scale).double() + rtol * expected.double().abs()
    bad = err > bound
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {bad.numel()} differ, worst "
        f"{(err - bound).max().item():.3g} over the bound; "
        f"ours {actual[bad][:5].tolist()} vs torch {expected[bad][:5].tolist()}"
    )


def away_from_kinks(x: torch.Tensor, margin: float = 0.1) -> torch.Tensor:
    """Nudge values within ``margin`` of 0 or +-3 out by ``2 * margin`` (for gradcheck)."""
    for k in (-3.0, 0.0, 3.0):
        near = (x - k).abs() < margin
        x = torch.where(near, x + 2 * margin * torch.sign(x - k + 1e-12), x)
    return x


# --------------------------------------------------------------------- elementwise

SLOPES = [0.0, 0.01, 0.2, 1.0, -0.5, 3.0]
ALPHAS = [0.5, 1.0, 2.0]


def prelu_fixed(a: float):
    return (
        lambda t: prelu(t, torch.tensor([a], dtype=t.dtype)),
        lambda t: F.prelu(t, torch.tensor([a], dtype=t.dtype)),
    )


ELEMENTWISE = {
    "relu": (relu, F.relu),
    **{
        f"leaky_relu-{a:g}": (
            lambda t, a=a: leaky_relu(t, a),
            lambda t, a=a: F.leaky_relu(t, a),
        )
        for a in SLOPES
    },
    "leaky_relu-default": (leaky_relu, F.leaky_relu),
    **{f"prelu-{a:g}": prelu_fixed(a) for a in (0.25, 0.0, -0.5)},
    **{
        f"elu-{a:g}": (lambda t, a=a: elu(t, a), lambda t, a=a: F.elu(t, a))
        for a in ALPHAS
    },
    "elu-default": (elu, F.elu),
    "sigmoid": (sigmoid, torch.sigmoid),
    "softplus": (softplus, F.softplus),
    "gelu": (gelu, F.gelu),
    "gelu_tanh": (gelu_tanh, lambda t: F.gelu(t, approximate="tanh")),
    "silu": (silu, F.silu),
    "mish": (mish, F.mish),
    "hard_sigmoid": (hard_sigmoid, F.hardsigmoid),
    "hard_swish": (hard_swish, F.hardswish),
}

# the gated units, each with its reference written from torch's functions
GATED = {
    "glu": (glu, lambda t, dim: F.glu(t, dim)),
    "swiglu": (swiglu, lambda t, dim: (lambda a, b: a * F.silu(b))(*t.chunk(2, dim))),
    "geglu": (geglu, lambda t, dim: (lambda a, b: a * F.gelu(b))(*t.chunk(2, dim))),
}


@pytest.mark.parametrize("name", list(ELEMENTWISE))
def test_elementwise_matches_torch_in_float32_from_minus_100_to_100(name):
    ours, ref = ELEMENTWISE[name]
    x = grid()
    upstream = rand(*x.shape, seed=1, dtype=torch.float32)
    y, g = value_and_grad(ours, x, upstream)
    y_ref, g_ref = value_and_grad(ref, x, upstream)
    assert y.dtype == g.dtype == torch.float32
    assert_near(y, y_ref, what=f"{name} value")
    assert_near(g, g_ref, scale=1 + upstream.abs(), what=f"{name} gradient")
    # all-ones upstream: the bare derivative, finite everywhere
    _, g1 = value_and_grad(ours, x, torch.ones_like(x))
    assert torch.isfinite(g1).all(), (
        f"{name}: non-finite gradient at {x[~g1.isfinite()]}"
    )


@pytest.mark.parametrize("name", list(ELEMENTWISE))
def test_elementwise_matches_torch_in_float64_on_random_input(name):
    ours, ref = ELEMENTWISE[name]
    x = torch.cat([5 * rand(300, seed=2), torch.tensor(KINKS, dtype=torch.float64)])
    upstream = rand(*x.shape, seed=3)
    y, g = value_and_grad(ours, x, upstream)
    y_ref, g_ref = value_and_grad(ref, x, upstream)
    assert y.dtype == g.dtype == torch.float64
    torch.testing.assert_close(y, y_ref, **TIGHT)
    if name == "hard_sigmoid":
        # torch's float64 backward multiplies by 1/6 rounded to float32 (0.16666667163);
        # ours is exact: check it against the true slope, torch's only to float32
        inside = (x > -3) & (x < 3)
        torch.testing.assert_close(g, torch.where(inside, upstream / 6, 0), **TIGHT)
        torch.testing.assert_close(g, g_ref, rtol=1e-7, atol=1e-12)
    else:
        torch.testing.assert_close(g, g_ref, **TIGHT)


PIECEWISE = [
    n
    for n in ELEMENTWISE
    if n.split("-")[0] in {"relu", "leaky_relu", "prelu", "elu"} or n.startswith("hard")
]


@pytest.mark.parametrize("name", PIECEWISE)
def test_gradients_at_the_kinks_take_torchs_side(name):
    """At a kink the two one-sided slopes differ by far more than rounding."""
    ours, ref = ELEMENTWISE[name]
    x = torch.tensor(KINKS)
    _, g = value_and_grad(ours, x, torch.ones_like(x))
    _, g_ref = value_and_grad(ref, x, torch.ones_like(x))
    torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=0)


def test_kink_gradients_follow_pytorchs_conventions():
    x = torch.tensor([-3.0, 0.0, 3.0])
    ones = torch.ones(3)
    assert value_and_grad(relu, x, ones)[1].tolist() == [0, 0, 1]
    assert value_and_grad(hard_sigmoid, x, ones)[1].tolist() == pytest.approx(
        [0, 1 / 6, 0], abs=0, rel=1e-7
    )
    assert value_and_grad(hard_swish, x, ones)[1].tolist() == [0, 0.5, 1]
    assert value_and_grad(lambda t: elu(t, 2.0), x, ones)[1][1] == 2.0
    slope = value_and_grad(lambda t: leaky_relu(t, 0.2), x, ones)[1][1].item()
    assert slope == pytest.approx(0.2)  # 0.2 rounded to float32


@pytest.mark.parametrize("name", list(ELEMENTWISE))
def test_elementwise_gradcheck_in_float64_away_from_kinks(name):
    ours, _ = ELEMENTWISE[name]
    x = away_from_kinks(3 * rand(16, seed=4)).requires_grad_()
    assert torch.autograd.gradcheck(ours, (x,))


@pytest.mark.parametrize("name", list(ELEMENTWISE))
@pytest.mark.parametrize("shape", [(), (5,), (2, 3), (2, 3, 2, 2)], ids=str)
def test_elementwise_keeps_shape_and_dtype(name, shape):
    ours, ref = ELEMENTWISE[name]
    x = rand(*shape, seed=5, dtype=torch.float32)
    y = ours(x)
    assert y.shape == ref(x).shape == x.shape
    assert y.dtype == torch.float32


@pytest.mark.parametrize("name", list(ELEMENTWISE))
def test_elementwise_propagates_nan_like_torch(name):
    ours, ref = ELEMENTWISE[name]
    x = torch.tensor([float("nan"), -5.0, -1.0, 0.0, 1.0, 5.0])
    y, y_ref = ours(x), ref(x)
    assert torch.isnan(y_ref[0])  # torch lets a nan through, so must we
    assert torch.isnan(y[0]), f"{name}(nan) = {y[0].item()}, torch gives nan"
    assert_near(y[1:], y_ref[1:], what=name)


# --------------------------------------------------------------------- GELU accuracy


def gelu_reference(x32: torch.Tensor):
    """The exact GELU and its derivative in float64, at the float32 points ``x32``."""
    x = x32.double()
    cdf = 0.5 * torch.erfc(-x / math.sqrt(2))
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    return x * cdf, cdf + x * pdf


def textbook_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def relative_errors(f, x: torch.Tensor):
    y, g = value_and_grad(f, x, torch.ones_like(x))
    y_ref, g_ref = gelu_reference(x)
    rel_y = (y.double() - y_ref).abs() / y_ref.abs()
    rel_g = (g.double() - g_ref).abs() / g_ref.abs()
    return rel_y, rel_g


def test_exact_gelu_is_accurate_in_float32_for_very_negative_input():
    # down to -13 the true value (about -8e-38 there) is still a normal float32
    x = torch.linspace(-13, -1, 1201)
    y_ref, g_ref = gelu_reference(x)
    assert (y_ref.abs() > torch.finfo(torch.float32).tiny).all()
    rel_y, rel_g = relative_errors(gelu, x)
    # the float32 rounding of x / sqrt(2) alone costs eps * x^2 (Phi's condition
    # number is about x^2 here), so allow a couple of eps per unit of condition
    bound = 2 * EPS32 * (1 + x.double() ** 2)
    worst_y, worst_g = x[rel_y.argmax()].item(), x[rel_g.argmax()].item()
    assert (rel_y <= bound).all(), f"value: worst {rel_y.max():.3g} at {worst_y}"
    assert (rel_g <= bound).all(), f"grad: worst {rel_g.max():.3g} at {worst_g}"
    moderate = x >= -10
    assert rel_y[moderate].max() < 1e-5 and rel_g[moderate].max() < 1e-5
    assert rel_y.max() < 2e-5 and rel_g.max() < 2e-5
    # ours is not zero where the textbook form is: the tail is really there
    assert (gelu(x) < 0).all()


def test_textbook_gelu_fails_the_same_accuracy_bound():
    """Without this the test above would prove nothing: ``1 + erf`` cancels."""
    x = torch.linspace(-13, -1, 1201)
    rel_y, rel_g = relative_errors(textbook_gelu, x)
    bound = 2 * EPS32 * (1 + x.double() ** 2)
    assert (rel_y > bound).any() and (rel_g > bound).any()
    assert rel_y.max() > 0.5  # the whole value is lost ...
    assert (textbook_gelu(x[x < -6]) == 0).all()  # ... it rounds to zero below -5.5
    assert rel_g.max() > 1e-3
    # in float64 the two forms agree where the textbook one has not yet cancelled
    x64 = torch.linspace(-5, 5, 101, dtype=torch.float64)
    torch.testing.assert_close(gelu(x64), textbook_gelu(x64), rtol=1e-8, atol=1e-15)


# --------------------------------------------------------------------- limits at +-100


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sigmoid_softplus_silu_elu_reach_their_limits_without_overflow(dtype):
    x = torch.tensor([-100.0, 100.0], dtype=dtype)
    ones = torch.ones_like(x)
    tiny = 1e-40  # e^-100 is 3.7e-44: subnormal in float32, ~0 for this purpose

    y, g = value_and_grad(sigmoid, x, ones)
    assert 0 <= y[0] < tiny and y[1] == 1
    assert 0 <= g[0] < tiny and 0 <= g[1] < tiny

    y, g = value_and_grad(softplus, x, ones)
    assert 0 <= y[0] < tiny and y[1] == 100
    assert 0 <= g[0] < tiny and g[1] == 1

    y, g = value_and_grad(silu, x, ones)
    assert -100 * tiny < y[0] <= 0 and y[1] == 100
    assert -100 * tiny < g[0] <= 0 and g[1] == 1

    y, g = value_and_grad(elu, x, ones)
    assert y[0] == -1 and y[1] == 100
    assert 0 <= g[0] < tiny and g[1] == 1  # the unused e^100 must not leak a nan

    y, g = value_and_grad(mish, x, ones)
    assert -100 * tiny < y[0] <= 0 and y[1] == 100
    assert torch.isfinite(g).all() and g[1] == 1

    y, g = value_and_grad(gelu, x, ones)
    assert y[0] == 0 and y[1] == 100 and g[0] == 0 and g[1] == 1


@pytest.mark.parametrize(
    "f", [relu, elu, sigmoid, softplus, gelu, silu, mish, hard_sigmoid, hard_swish]
)
def test_stable_functions_have_finite_gradients_over_the_whole_float32_range(f):
    big = torch.finfo(torch.float32).max / 2
    x = torch.tensor([-big, -1e30, -1e10, -1e4, 1e4, 1e10, 1e30, big])
    y, g = value_and_grad(f, x, torch.ones_like(x))
    assert torch.isfinite(y).all() and torch.isfinite(g).all()


# --------------------------------------------------------------------- PReLU


PRELU_CASES = {
    "single": ((20_000,), [0.25]),
    "single-2d": ((4000, 5), [-0.5]),
    "channels-2d": ((4000, 5), [0.25, 0.0, -0.5, 1.0, 2.0]),
    "channels-4d": ((10, 5, 20, 20), [0.25, 0.0, -0.5, 1.0, 2.0]),
}


@pytest.mark.parametrize("case", list(PRELU_CASES))
def test_prelu_matches_torch_with_weight_gradient_in_float32(case):
    shape, slopes = PRELU_CASES[case]
    perm = torch.randperm(20_000, generator=torch.Generator().manual_seed(6))
    x = grid()[perm].reshape(shape).requires_grad_()
    upstream = rand(*shape, seed=7, dtype=torch.float32)
    results = []
    for f in (prelu, F.prelu):
        w = torch.tensor(slopes).requires_grad_()
        y = f(x, w)
        gx, gw = torch.autograd.grad((y * upstream).sum(), (x, w))
        results.append((y.detach(), gx, gw))
    (y, gx, gw), (y_ref, gx_ref, gw_ref) = results
    assert_near(y, y_ref, what="value")
    assert_near(gx, gx_ref, scale=1 + upstream.abs(), what="grad x")
    # the weight gradient sums thousands of x * upstream over the negative x: compare
    # it with torch, and with the sum done in float64, up to float32 summation error
    torch.testing.assert_close(gw, gw_ref, rtol=1e-5, atol=1e-3)
    terms = torch.where(x > 0, 0, x).detach().double() * upstream.double()
    if len(slopes) > 1:  # one row of terms per channel
        terms = terms.transpose(0, 1)
    terms = terms.reshape(len(slopes), -1)
    exact, size = terms.sum(-1), terms.abs().sum(-1)
    assert ((gw.double() - exact).abs() <= 1e-7 * size).all()
    assert torch.isfinite(gw).all()


@pytest.mark.parametrize(
    "shape, n",
    [
        ((6,), 1),
        ((4, 3), 1),
        ((4, 3), 3),
        ((2, 3, 4), 3),
        ((2, 3, 2, 2), 3),
        ((2, 3, 3), 3),  # the last axis has as many entries as the channel axis:
        ((2, 3, 2, 3), 3),  # slopes along the wrong one would still broadcast
    ],
)
def test_prelu_matches_torch_in_float64_and_gradchecks_x_and_weight(shape, n):
    x = away_from_kinks(3 * rand(*shape, seed=8))
    w = 0.5 * rand(n, seed=9)
    upstream = rand(*shape, seed=10)
    grads = []
    for f in (prelu, F.prelu):
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = f(xg, wg)
        grads.append((y.detach(), *torch.autograd.grad((y * upstream).sum(), (xg, wg))))
    for ours, ref in zip(*grads, strict=True):
        torch.testing.assert_close(ours, ref, **TIGHT)
    assert torch.autograd.gradcheck(
        prelu, (x.clone().requires_grad_(), w.clone().requires_grad_())
    )


def test_prelu_slopes_act_per_channel():
    x = -torch.ones(2, 3, 2)
    y = prelu(x, torch.tensor([0.0, 0.5, 2.0]))
    assert torch.equal(y[:, 0], torch.zeros(2, 2))
    assert torch.equal(y[:, 1], -0.5 * torch.ones(2, 2))
    assert torch.equal(y[:, 2], -2 * torch.ones(2, 2))
    assert torch.equal(prelu(-x, torch.tensor([0.0, 0.5, 2.0])), -x)


# --------------------------------------------------------------------- GLU family


@pytest.mark.parametrize("name", list(GATED))
def test_gated_units_match_torch_in_float32_from_minus_100_to_100(name):
    ours, ref = GATED[name]
    b = grid()  # the gate sweeps the whole grid, kinks included ...
    perm = torch.randperm(b.numel(), generator=torch.Generator().manual_seed(11))
    a = b[perm]  # ... and so does the gated half, in another order
    x = torch.cat([a, b])
    upstream = rand(b.numel(), seed=12, dtype=torch.float32)
    y, g = value_and_grad(lambda t: ours(t, dim=0), x, upstream)
    y_ref, g_ref = value_and_grad(lambda t: ref(t, 0), x, upstream)
    scale = (1 + a.abs()) * (1 + upstream.abs())  # a product with a factor up to 100
    assert_near(y, y_ref, scale=1 + a.abs(), what=f"{name} value")
    assert_near(g, g_ref, scale=torch.cat([scale, scale]), what=f"{name} gradient")
    assert torch.isfinite(value_and_grad(ours, x, torch.ones_like(b))[1]).all()


@pytest.mark.parametrize("name", list(GATED))
@pytest.mark.parametrize("dim", [0, 1, 2, -1, -2, -3])
def test_gated_units_match_torch_in_float64_along_every_dim(name, dim):
    ours, ref = GATED[name]
    x = 4 * rand(4, 6, 8, seed=13)
    y_ref = ref(x, dim)
    expected = list(x.shape)
    expected[dim] //= 2
    assert list(y_ref.shape) == expected
    upstream = rand(*expected, seed=14)
    y, g = value_and_grad(lambda t: ours(t, dim), x, upstream)
    y_ref, g_ref = value_and_grad(lambda t: ref(t, dim), x, upstream)
    torch.testing.assert_close(y, y_ref, **TIGHT)
    torch.testing.assert_close(g, g_ref, **TIGHT)


@pytest.mark.parametrize("name", list(GATED))
def test_gated_units_default_to_the_last_dim_and_gradcheck(name):
    ours, ref = GATED[name]
    x = rand(3, 2, 8, seed=15)
    torch.testing.assert_close(ours(x), ref(x, -1), **TIGHT)
    x.requires_grad_()  # sigmoid, SiLU and GELU are smooth: no kinks to avoid
    assert torch.autograd.gradcheck(ours, (x,))
    assert torch.autograd.gradcheck(lambda t: ours(t, 1), (x,))


def test_glu_gates_the_first_half_with_the_second():
    a, b = torch.tensor([[2.0, -3.0]]), torch.tensor([[0.0, 100.0]])
    x = torch.cat([a, b], dim=1)
    torch.testing.assert_close(glu(x), torch.tensor([[1.0, -3.0]]))
    torch.testing.assert_close(swiglu(x), torch.tensor([[0.0, -300.0]]))
    torch.testing.assert_close(geglu(x), torch.tensor([[0.0, -300.0]]))


# --------------------------------------------------------------------- GatedFeedForward


def weights(ffn: GatedFeedForward):
    return ffn.gate_proj.weight, ffn.up_proj.weight, ffn.down_proj.weight


@pytest.mark.parametrize("shape", [(5, 8), (2, 3, 8)], ids=lambda s: f"{len(s)}d")
def test_gated_feed_forward_with_silu_is_swiglu_from_its_own_weights(shape):
    torch.manual_seed(16)
    ffn = GatedFeedForward(8, 12).double()
    x = rand(*shape, seed=17)
    y = ffn(x)
    assert y.shape == x.shape
    wg, wu, wd = weights(ffn)
    expected = F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)
    torch.testing.assert_close(y, expected, **TIGHT)
    # the same, through swiglu on the concatenated [up, gate] projections
    both = torch.cat([F.linear(x, wu), F.linear(x, wg)], dim=-1)
    torch.testing.assert_close(y, F.linear(swiglu(both), wd), **TIGHT)


def test_gated_feed_forward_with_sigmoid_is_torch_glu():
    torch.manual_seed(18)
    ffn = GatedFeedForward(6, 10, activation=sigmoid).double()
    x = rand(4, 3, 6, seed=19)
    wg, wu, wd = weights(ffn)
    # F.glu(cat[a, b]) = a * sigmoid(b): the up projection first, the gate second
    both = torch.cat([F.linear(x, wu), F.linear(x, wg)], dim=-1)
    torch.testing.assert_close(ffn(x), F.linear(F.glu(both, dim=-1), wd), **TIGHT)
    # the other order would be a different function
    swapped = torch.cat([F.linear(x, wg), F.linear(x, wu)], dim=-1)
    assert not torch.allclose(ffn(x), F.linear(F.glu(swapped, dim=-1), wd))


def test_gated_feed_forward_with_gelu_is_geglu():
    torch.manual_seed(20)
    ffn = GatedFeedForward(6, 10, activation=gelu).double()
    x = rand(7, 6, seed=21)
    wg, wu, wd = weights(ffn)
    both = torch.cat([F.linear(x, wu), F.linear(x, wg)], dim=-1)
    torch.testing.assert_close(ffn(x), F.linear(geglu(both), wd), **TIGHT)
    expected = F.linear(F.gelu(F.linear(x, wg)) * F.linear(x, wu), wd)
    torch.testing.assert_close(ffn(x), expected, **TIGHT)


@pytest.mark.parametrize("d_model, d_hidden", [(8, 12), (1, 1), (16, 4)])
def test_gated_feed_forward_has_three_bias_free_projections(d_model, d_hidden):
    ffn = GatedFeedForward(d_model, d_hidden)
    params = dict(ffn.named_parameters())
    assert set(params) == {"gate_proj.weight", "up_proj.weight", "down_proj.weight"}
    assert sum(p.numel() for p in ffn.parameters()) == 3 * d_model * d_hidden
    assert params["gate_proj.weight"].shape == (d_hidden, d_model)
    assert params["up_proj.weight"].shape == (d_hidden, d_model)
    assert params["down_proj.weight"].shape == (d_model, d_hidden)
    assert ffn.activation is silu


def test_gated_feed_forward_gradients_reach_all_three_weights_and_the_input():
    torch.manual_seed(22)
    ffn = GatedFeedForward(8, 12).double()
    x = rand(2, 3, 8, seed=23).requires_grad_()
    (ffn(x) * rand(2, 3, 8, seed=24)).sum().backward()
    for name, p in ffn.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert x.grad is not None and x.grad.abs().sum() > 0
    # gradcheck with respect to the input and all three weights at once
    small = GatedFeedForward(3, 4).double()
    names = [n for n, _ in small.named_parameters()]

    def call(t, *w):
        return torch.func.functional_call(small, dict(zip(names, w, strict=True)), (t,))

    params = tuple(p.detach().clone().requires_grad_() for p in small.parameters())
    assert torch.autograd.gradcheck(
        call, (rand(2, 3, seed=25).requires_grad_(), *params)
    )


# --------------------------------------------------------------------- bad input: one table

ALL_FUNCTIONS = {
    **{n: f for n, (f, _) in ELEMENTWISE.items() if "-" not in n},
    "leaky_relu": leaky_relu,
    "elu": elu,
    "prelu": lambda t: prelu(t, torch.tensor([0.25])),
    **{n: f for n, (f, _) in GATED.items()},
}


def _p(call, error, match, id):
    return pytest.param(call, error, match, id=id)


_NOT_A_NUMBER = ("0.1", None, [0.1], torch.tensor(0.1), True)
_NOT_FINITE = (float("nan"), float("inf"), -float("inf"))
BAD_INPUT = [
    *[
        row
        for n, f in ALL_FUNCTIONS.items()
        for row in [
            _p(
                lambda f=f: f([1.0, -1.0]),
                TypeError,
                "x must be a torch.Tensor, got list",
                f"{n}-x-list",
            ),
            _p(
                lambda f=f: f(rand(4).numpy()),
                TypeError,
                "x must be a torch.Tensor, got ndarray",
                f"{n}-x-ndarray",
            ),
            _p(
                lambda f=f: f(torch.tensor([1, -1, 2, 0])),
                TypeError,
                "x must be a floating-point tensor.*int64",
                f"{n}-x-int",
            ),
            _p(
                lambda f=f: f(torch.tensor([True, False])),
                TypeError,
                "x must be a floating-point.*bool",
                f"{n}-x-bool",
            ),
        ]
    ],
    _p(
        lambda: prelu(rand(4, 3), torch.tensor([0.1, 0.2])),
        ValueError,
        r"weight has 2 slopes but x has shape \(4, 3\)",
        "prelu-weight-size",
    ),
    # no channel axis in a 1-D input
    _p(
        lambda: prelu(rand(3), torch.tensor([0.1, 0.2, 0.3])),
        ValueError,
        r"weight has 3 slopes but x has shape \(3,\)",
        "prelu-weight-1d-x",
    ),
    _p(
        lambda: prelu(rand(4, 3), torch.ones(1, 3)),
        ValueError,
        r"weight must have 1 dimensions.*\(1, 3\)",
        "prelu-weight-2d",
    ),
    _p(
        lambda: prelu(rand(4, 3), torch.tensor(0.25)),
        ValueError,
        r"weight must have 1 dimensions.*\(\)",
        "prelu-weight-0d",
    ),
    _p(
        lambda: prelu(rand(4, 3), 0.25),
        TypeError,
        "weight must be a torch.Tensor, got float",
        "prelu-weight-float",
    ),
    _p(
        lambda: prelu(rand(4, 3), torch.tensor([1, 2, 3])),
        TypeError,
        "weight must be a floating-point tensor",
        "prelu-weight-int",
    ),
    _p(
        lambda: prelu(torch.ones(4, 3, dtype=torch.int64), torch.tensor([0.25])),
        TypeError,
        "x must be a floating-point tensor",
        "prelu-x-int",
    ),
    *[
        row
        for n, (f, _) in GATED.items()
        for row in [
            _p(
                lambda f=f: f(rand(4, 5)),
                ValueError,
                r"even size along dim -1.*\(4, 5\)",
                f"{n}-x-odd",
            ),
            _p(
                lambda f=f: f(rand(3, 4), dim=0),
                ValueError,
                r"even size along dim 0.*\(3, 4\)",
                f"{n}-x-odd-dim0",
            ),
            *[
                _p(
                    lambda f=f, d=d: f(rand(4, 4), dim=d),
                    ValueError,
                    f"dim {d} is not an axis of a 2-D input",
                    f"{n}-dim-{d}",
                )
                for d in (2, -3, 7)
            ],
            _p(
                lambda f=f: f(torch.tensor(1.0)),
                ValueError,
                "dim -1 is not an axis of a 0-D input",
                f"{n}-x-0d",
            ),
        ]
    ],
    *[
        _p(
            lambda f=f, bad=bad: f(rand(5), bad),
            TypeError,
            f"{arg} must be a number",
            f"{arg}-{type(bad).__name__}",
        )
        for f, arg in ((leaky_relu, "negative_slope"), (elu, "alpha"))
        for bad in _NOT_A_NUMBER
    ],
    *[
        _p(
            lambda f=f, bad=bad: f(rand(5), bad),
            ValueError,
            f"{arg} must be finite",
            f"{arg}-{bad}",
        )
        for f, arg in ((leaky_relu, "negative_slope"), (elu, "alpha"))
        for bad in _NOT_FINITE
    ],
    _p(
        lambda: GatedFeedForward(0, 4),
        ValueError,
        "d_model must be positive, got 0",
        "ffn-d_model-0",
    ),
    _p(
        lambda: GatedFeedForward(4, -2),
        ValueError,
        "d_hidden must be positive, got -2",
        "ffn-d_hidden-negative",
    ),
    _p(
        lambda: GatedFeedForward(4.0, 4),
        TypeError,
        "d_model must be an int, got float",
        "ffn-d_model-float",
    ),
    _p(
        lambda: GatedFeedForward(4, True),
        TypeError,
        "d_hidden must be an int, got bool",
        "ffn-d_hidden-bool",
    ),
    _p(
        lambda: GatedFeedForward(4, 4, activation="silu"),
        TypeError,
        "activation must be callable, got 'silu'",
        "ffn-activation-str",
    ),
    _p(
        lambda: GatedFeedForward(4, 4, activation=None),
        TypeError,
        "activation must be callable, got None",
        "ffn-activation-none",
    ),
    _p(
        lambda: GatedFeedForward(8, 12)(torch.randn(2, 7)),
        ValueError,
        r"x must end with d_model=8, got shape \(2, 7\)",
        "ffn-x-width",
    ),
    _p(
        lambda: GatedFeedForward(8, 12)(torch.randn(8, 2)),
        ValueError,
        r"x must end with d_model=8, got shape \(8, 2\)",
        "ffn-x-transposed",
    ),
    _p(
        lambda: GatedFeedForward(8, 12)([[0.0] * 8]),
        TypeError,
        "x must be a torch.Tensor, got list",
        "ffn-x-list",
    ),
    _p(
        lambda: GatedFeedForward(8, 12)(torch.ones(2, 8, dtype=torch.int64)),
        TypeError,
        "x must be a floating-point tensor",
        "ffn-x-int",
    ),
]


@pytest.mark.parametrize("call, error, match", BAD_INPUT)
def test_bad_input_is_rejected(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("f", [leaky_relu, elu], ids=["leaky", "elu"])
def test_an_int_slope_or_alpha_is_a_number(f):
    x = rand(5)
    torch.testing.assert_close(f(x, 1), f(x, 1.0))
