"""Tests for ``dlabc.generative.flows``.

Every log-determinant against the determinant of the Jacobian that
``torch.autograd.functional.jacobian`` builds, in float64; every inverse by a round trip;
the squeeze against ``torch.nn.functional.pixel_unshuffle``; the $1 \\times 1$
convolution against ``torch.nn.functional.conv2d`` and ``torch.linalg.slogdet``; a flow's
log-density against ``torch.distributions`` (an affine map of a Gaussian is a Gaussian; a
sigmoid of a Gaussian is a ``TransformedDistribution``); the bits per dimension against
the same distribution; bad input for every public entry point.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import distributions as D
from torch.autograd.functional import jacobian

from dlabc.generative.flows import (
    ActNorm,
    AffineCoupling,
    Flow,
    InvConv1x1,
    Logit,
    Squeeze,
    conv_conditioner,
    dequantize,
    digit_flow,
    generate_digits,
    mlp_conditioner,
    moons_flow,
    nll_bits_per_dim,
    train_digit_flow,
)

TOL = dict(atol=1e-10, rtol=1e-10)


def _randomize(module, scale=0.4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return module


def _brute_logdet(layer, x):
    """log|det| of the Jacobian of one example's map, built by autograd."""
    out = []
    for xi in x:
        J = jacobian(lambda v: layer(v[None])[0], xi).reshape(xi.numel(), xi.numel())
        out.append(torch.linalg.slogdet(J)[1])
    return torch.stack(out)


def _check_layer(layer, x):
    y, logdet = layer(x)
    assert logdet.shape == (len(x),)
    torch.testing.assert_close(logdet, _brute_logdet(layer, x), **TOL)
    torch.testing.assert_close(layer.inverse(y), x, **TOL)


@pytest.fixture(scope="module")
def images():
    generator = torch.Generator().manual_seed(0)
    return torch.rand(3, 4, 2, 2, generator=generator, dtype=torch.float64)


def test_affine_coupling_on_vectors_and_images(images):
    for swap in (False, True):
        layer = _randomize(AffineCoupling(mlp_conditioner(2, 8), swap).double())
        _check_layer(layer, torch.randn(3, 4, dtype=torch.float64))
        layer = _randomize(AffineCoupling(conv_conditioner(2, 4), swap).double())
        _check_layer(layer, images)
    with pytest.raises(TypeError, match="net must be an nn.Module"):
        AffineCoupling(lambda x: x)


def test_actnorm_initialisation_logdet_and_inverse(images):
    layer = ActNorm(4).double()
    batch = 3 + 2 * torch.randn(64, 4, 2, 2, dtype=torch.float64)
    y, _ = layer(batch)
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(4, dtype=torch.float64))
    var = y.var((0, 2, 3), correction=0)
    torch.testing.assert_close(
        var, torch.ones(4, dtype=torch.float64), atol=1e-5, rtol=0
    )
    _check_layer(_randomize(layer), images)
    with pytest.raises(ValueError, match="channels must be positive"):
        ActNorm(0)


def test_invconv_against_conv2d_slogdet_and_autograd(images):
    layer = _randomize(InvConv1x1(4, torch.Generator().manual_seed(1)).double())
    y, logdet = layer(images)
    W = layer.weight()
    torch.testing.assert_close(y, F.conv2d(images, W[:, :, None, None]), **TOL)
    expected = 2 * 2 * torch.linalg.slogdet(W)[1]
    torch.testing.assert_close(logdet, expected.expand(3), **TOL)
    _check_layer(layer, images)
    # a fresh layer is a rotation: volume preserving
    fresh = InvConv1x1(4, torch.Generator().manual_seed(2)).double()
    rotation = fresh.weight() @ fresh.weight().T
    torch.testing.assert_close(rotation, torch.eye(4).double(), atol=1e-6, rtol=0)
    with pytest.raises(TypeError, match="channels must be an int"):
        InvConv1x1(2.0)


def test_squeeze_is_pixel_unshuffle():
    x = torch.randn(2, 3, 6, 4, dtype=torch.float64)
    y, logdet = Squeeze()(x)
    torch.testing.assert_close(y, F.pixel_unshuffle(x, 2), atol=0, rtol=0)
    assert logdet.abs().max() == 0
    torch.testing.assert_close(Squeeze().inverse(y), x, atol=0, rtol=0)
    with pytest.raises(ValueError, match="even height and width"):
        Squeeze()(torch.randn(1, 1, 3, 4))


def test_logit_against_a_transformed_distribution():
    alpha = 0.1
    base = D.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
    shift, scale = -alpha / (1 - 2 * alpha), 1 / (1 - 2 * alpha)
    transforms = [D.SigmoidTransform(), D.AffineTransform(shift, scale)]
    reference = D.TransformedDistribution(base, transforms)
    flow = Flow([Logit(alpha)], z_shape=(1, 2, 2))
    x = torch.rand(5, 1, 2, 2, dtype=torch.float64)
    expected = reference.log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(flow.log_prob(x), expected, **TOL)
    _check_layer(Logit(alpha), x)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 0.5\)"):
        Logit(0.5)


def test_flow_log_prob_of_an_affine_map_is_a_gaussian():
    layer = _randomize(ActNorm(3).double(), scale=1.0)
    layer.initialized = True
    flow = Flow([layer], z_shape=(3,))
    # z = (x + b) e^{log s} ~ N(0, I)  <=>  x ~ N(-b, diag(e^{-2 log s}))
    reference = D.Normal(-layer.loc, (-layer.log_scale).exp())
    x = torch.randn(6, 3, dtype=torch.float64)
    expected = reference.log_prob(x).sum(1)
    torch.testing.assert_close(flow.log_prob(x), expected.detach(), **TOL)
    samples = flow.sample(7, temperature=0.5, generator=torch.Generator())
    assert samples.shape == (7, 3)
    with pytest.raises(ValueError, match="temperature must be in"):
        flow.sample(2, temperature=0.0)
    with pytest.raises(TypeError, match="invertible layers"):
        Flow([], z_shape=(3,))


def test_whole_flows_against_autograd():
    moons = _randomize(moons_flow(4, 8).double())
    _check_layer(moons, torch.randn(4, 2, dtype=torch.float64))
    glow = digit_flow(n_steps=2, hidden=4, size=4).double()
    glow(torch.rand(32, 1, 4, 4, dtype=torch.float64))  # initialise actnorm
    _check_layer(_randomize(glow), torch.rand(3, 1, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="n_couplings must be positive"):
        moons_flow(0)
    with pytest.raises(ValueError, match="size must be divisible"):
        digit_flow(size=6, squeezes=2)


def test_dequantize_puts_each_pixel_in_its_bin():
    b = (torch.rand(4, 1, 6, 6) > 0.5).float()
    x = dequantize(b, torch.Generator().manual_seed(0))
    assert torch.equal((2 * x).floor(), b)


def test_nll_bits_per_dim_against_torch_distributions():
    images = torch.rand(6, 1, 2, 2, generator=torch.Generator().manual_seed(3)) > 0.5
    images = images.double()
    flow = Flow([Logit(0.0)], z_shape=(1, 2, 2))
    base = D.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
    reference = D.TransformedDistribution(base, [D.SigmoidTransform()])
    x = dequantize(images, torch.Generator().manual_seed(7))
    nats = -reference.log_prob(x).flatten(1).sum(1).mean()
    expected = nats / (4 * math.log(2)) + 1
    got = nll_bits_per_dim(flow, images, seed=7)
    assert got == pytest.approx(expected.item(), rel=1e-12)
    with pytest.raises(ValueError, match="must be binary"):
        nll_bits_per_dim(flow, images / 2)
    with pytest.raises(TypeError, match="model must be a Flow"):
        nll_bits_per_dim(torch.nn.Identity(), images)


def test_train_digit_flow_and_generate_digits():
    images = (torch.rand(16, 1, 4, 4) > 0.5).float()
    model = digit_flow(n_steps=1, hidden=4, size=4)
    losses = train_digit_flow(model, images, 3, batch_size=8)
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    with pytest.raises(ValueError, match="steps must be positive"):
        train_digit_flow(model, images, 0)

    samples, model = generate_digits(
        1, n=8, seed=0, n_steps=1, hidden=4, return_model=True
    )
    assert samples.shape == (8, 1, 28, 28) and samples.dtype == torch.float32
    assert set(samples.unique().tolist()) <= {0.0, 1.0}
    assert isinstance(model, Flow)
    grey = model.sample(4).clamp(0, 1)  # what binary=False returns
    assert grey.min() >= 0 and grey.max() <= 1
    with pytest.raises(TypeError, match="unknown options"):
        generate_digits(1, n=2, width=3)
    with pytest.raises(ValueError, match="steps must be positive"):
        generate_digits(0)
