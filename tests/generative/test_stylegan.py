"""Tests for ``dlabc.generative.stylegan``.

The modulated convolution (grouped-convolution trick, and the form that modulates the
activations instead) against a loop over the batch that calls ``F.conv2d`` with each
sample's own scaled weights, and against ``torch.autograd.gradcheck``; demodulation
against its closed form (every output channel's weights have unit norm, so unit-variance
input gives unit-variance output: checked exactly and empirically); pixel norm and the
equalized linear layer against ``F.normalize`` and ``nn.Linear``; the losses against
``F.binary_cross_entropy_with_logits``; the R1 penalty against a linear discriminator's
closed form; truncation and style mixing against their definitions.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dlabc.generative.stylegan import (
    Discriminator,
    EqualLinear,
    Generator,
    MappingNetwork,
    ModulatedConv,
    NoiseInjection,
    StyledConv,
    d_loss,
    g_loss,
    generate_digits,
    mix_styles,
    modulated_conv2d,
    pixel_norm,
    r1_penalty,
    train_stylegan,
    truncate,
)

F64 = dict(atol=1e-10, rtol=1e-10)


def _loop_reference(x, weight, s, demodulate):
    """Each sample convolved on its own with its own scaled (and normalized) weights."""
    outputs = []
    for b in range(len(x)):
        w = weight * s[b][None, :, None, None]  # (C_out, C_in, k, k)
        if demodulate:
            w = w / w.flatten(1).norm(dim=1)[:, None, None, None]
        outputs.append(F.conv2d(x[b : b + 1], w, padding=weight.shape[-1] // 2))
    return torch.cat(outputs)


@pytest.fixture(scope="module")
def conv_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 6, 5, generator=g, dtype=torch.float64)
    weight = torch.randn(5, 4, 3, 3, generator=g, dtype=torch.float64)
    s = torch.rand(3, 4, generator=g, dtype=torch.float64) + 0.5
    return x, weight, s


@pytest.mark.parametrize("demodulate", [True, False])
def test_modulated_conv_equals_a_loop_over_the_batch(conv_inputs, demodulate):
    x, weight, s = conv_inputs
    expected = _loop_reference(x, weight, s, demodulate)
    torch.testing.assert_close(
        modulated_conv2d(x, weight, s, demodulate, eps=0.0), expected, **F64
    )


@pytest.mark.parametrize("demodulate", [True, False])
def test_the_unfused_form_is_the_same_convolution(demodulate):
    torch.manual_seed(0)
    fused = ModulatedConv(4, 5, 6, demodulate=demodulate).double()
    unfused = ModulatedConv(4, 5, 6, demodulate=demodulate, fused=False).double()
    unfused.load_state_dict(fused.state_dict())
    x, w = torch.randn(3, 4, 6, 6).double(), torch.randn(3, 6).double()
    torch.testing.assert_close(fused(x, w), unfused(x, w), **F64)


def test_modulated_conv_gradients(conv_inputs):
    x, weight, s = (t[:2, :2].clone().requires_grad_() for t in conv_inputs)
    assert torch.autograd.gradcheck(
        lambda x, w, s: modulated_conv2d(x, w, s), (x, weight, s)
    )


def test_demodulation_gives_unit_variance():
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(6, 8, 3, 3, generator=g, dtype=torch.float64)
    s = torch.rand(2, 8, generator=g, dtype=torch.float64) * 3
    # closed form: Var(y_o) = sum of the squared weights of channel o for i.i.d.
    # unit-variance input, and demodulation makes that sum 1. A unit impulse in channel
    # i returns channel o's kernel for i, so the impulses' squared outputs add up to it
    impulses = torch.zeros(8, 8, 5, 5, dtype=torch.float64)
    impulses[torch.arange(8), torch.arange(8), 2, 2] = 1.0
    for b in range(2):
        y = modulated_conv2d(impulses, weight, s[b : b + 1].expand(8, -1), eps=0.0)
        torch.testing.assert_close(
            y.square().sum((0, 2, 3)), torch.ones(6, dtype=torch.float64), **F64
        )
    x = torch.randn(2, 8, 64, 64, generator=g, dtype=torch.float64)
    y = modulated_conv2d(x, weight, s)[..., 1:-1, 1:-1]
    assert abs(y.var().item() - 1) < 0.05
    y_plain = modulated_conv2d(x, weight, s, demodulate=False)[..., 1:-1, 1:-1]
    assert y_plain.var().item() > 5  # without demodulation the style scales it


def test_pixel_norm_and_equal_linear():
    z = torch.randn(5, 7, dtype=torch.float64)
    torch.testing.assert_close(
        pixel_norm(z, eps=0.0), F.normalize(z, dim=1) * math.sqrt(7), **F64
    )
    layer = EqualLinear(7, 3, bias_init=0.5).double()
    reference = nn.Linear(7, 3).double()
    with torch.no_grad():
        reference.weight.copy_(layer.weight / math.sqrt(7))
        reference.bias.copy_(layer.bias)
    torch.testing.assert_close(layer(z), reference(z), **F64)
    assert MappingNetwork(7, 4, 2)(z.float()).shape == (5, 4)


def test_noise_injection():
    layer = NoiseInjection(3)
    x, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 1, 4, 4)
    torch.testing.assert_close(layer(x), x)  # zero strength at first
    with torch.no_grad():
        layer.strength.copy_(torch.tensor([0.0, 1.0, 2.0]))
    expected = x + torch.tensor([0.0, 1.0, 2.0])[None, :, None, None] * noise
    torch.testing.assert_close(layer(x, noise), expected)


def test_generator_truncation_and_mixing():
    torch.manual_seed(0)
    G = Generator(z_dim=8, w_dim=8, channels=(4, 4, 2), mapping_layers=2).eval()
    z = torch.randn(3, 8)
    noise = [torch.randn(3, 1, n, n) for n in (7, 14, 14, 28)]
    x = G(z, noise=noise)
    assert x.shape == (3, 1, 28, 28) and StyledConv(2, 2, 8, up=True)
    w = G.mapping(z)
    G.w_avg.copy_(torch.randn(8))
    torch.testing.assert_close(truncate(w, G.w_avg, 1.0), w)
    torch.testing.assert_close(truncate(w, G.w_avg, 0.0), G.w_avg.expand_as(w))
    same = G(z, psi=0.0, noise=[n[:1].expand(3, -1, -1, -1) for n in noise])
    torch.testing.assert_close(same, same[:1].expand_as(same))  # one image: w-bar
    w2 = torch.randn(3, 8)
    ws = mix_styles(w, w2, 2)
    expected = torch.cat(
        [w[:, None].expand(-1, 2, -1), w2[:, None].expand(-1, 3, -1)], 1
    )
    torch.testing.assert_close(ws, expected)
    torch.testing.assert_close(G.synthesis(mix_styles(w, w, 3), noise), x)


def test_losses_and_r1():
    real, fake = torch.randn(6), torch.randn(6)
    bce = F.binary_cross_entropy_with_logits
    torch.testing.assert_close(
        d_loss(real, fake), bce(real, torch.ones(6)) + bce(fake, torch.zeros(6))
    )
    torch.testing.assert_close(g_loss(fake), bce(fake, torch.ones(6)))
    D = nn.Sequential(nn.Flatten(), nn.Linear(12, 1))  # grad_x D = a, so R1 = |a|^2
    penalty = r1_penalty(D, torch.randn(5, 3, 4))
    torch.testing.assert_close(penalty, D[1].weight.square().sum())
    penalty.backward()  # reaches the weights: d|a|^2/da = 2a
    torch.testing.assert_close(D[1].weight.grad, 2 * D[1].weight)
    assert Discriminator()(torch.randn(2, 1, 28, 28)).shape == (2,)


def test_training_and_the_comparison_contract():
    G, losses = train_stylegan(torch.rand(8, 1, 28, 28), 1, batch_size=4, ema=0.5)
    assert isinstance(G, Generator) and len(losses["D"]) == len(losses["G"]) == 1
    samples = generate_digits(1, n=5, psi=0.7, batch_size=4)
    assert samples.shape == (5, 1, 28, 28) and samples.dtype == torch.float32
    assert samples.min() >= 0 and samples.max() <= 1


def test_bad_input():
    x, weight, s = torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3), torch.randn(2, 3)
    with pytest.raises(ValueError, match="s shape"):
        modulated_conv2d(x, weight, s[:1])
    with pytest.raises(ValueError, match="square and odd"):
        modulated_conv2d(x, torch.randn(4, 3, 2, 2), s)
    with pytest.raises(ValueError, match="dimensions"):
        pixel_norm(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        ModulatedConv(3, 4, 8, kernel_size=2)
    with pytest.raises(ValueError, match="positive"):
        EqualLinear(0, 3)
    with pytest.raises(ValueError, match="positive"):
        NoiseInjection(0)
    with pytest.raises(ValueError, match="channels must be 3"):
        Generator(channels=(8, 8))
    with pytest.raises(ValueError, match="crossover"):
        mix_styles(torch.randn(2, 4), torch.randn(2, 4), 6)
    with pytest.raises(ValueError, match="w2 must have shape"):
        mix_styles(torch.randn(2, 4), torch.randn(3, 4), 1)
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\)"):
        train_stylegan(torch.rand(4, 1, 14, 14), 1)
    with pytest.raises(ValueError, match="r1_gamma"):
        train_stylegan(torch.rand(4, 1, 28, 28), 1, r1_gamma=-1.0)
    with pytest.raises(ValueError, match="psi"):
        generate_digits(1, psi=1.5)
    with pytest.raises(ValueError, match="psi"):
        truncate(torch.randn(2, 4), torch.zeros(4), -0.5)
    with pytest.raises(ValueError, match="steps"):
        generate_digits(0)
