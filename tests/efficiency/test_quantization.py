"""Tests for ``dlabc.efficiency.quantization``.

The grid (``qparams``) against PyTorch's ``MinMaxObserver`` and
``PerChannelMinMaxObserver``; ``quantize`` and ``dequantize`` against
``torch.quantize_per_tensor``, ``torch.quantize_per_channel`` and
``torch.fake_quantize_per_tensor_affine`` (bit for bit, and round half to even on exact
ties); ``fake_quantize``'s forward and straight-through backward against PyTorch's fake
quantization ops; the calibration ranges against NumPy's percentiles and a brute-force
MSE search; a ``QuantizedLayer`` against the same layer computed with PyTorch's fake
quantization; the model's size against the parameters' bytes. Bad input for every
public entry point.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.quantization import MinMaxObserver, PerChannelMinMaxObserver

from dlabc.efficiency.quantization import (
    QuantizedLayer,
    calibrate,
    clipping_range,
    dequantize,
    fake_quantize,
    model_size_bytes,
    qparams,
    quantize,
    quantize_model,
    train_classifier,
)

# PyTorch's quantized tensors, our reference, announce their deprecation
pytestmark = pytest.mark.filterwarnings("ignore:.*quantized tensor creation")
warnings.filterwarnings("ignore", category=DeprecationWarning)


def _observer_qparams(x, **kwargs):
    observer = kwargs.pop("cls", MinMaxObserver)(**kwargs)
    observer(x)
    return observer.calculate_qparams()


# ------------------------------------------------------------------- the grid


@pytest.mark.parametrize("bits", [8, 4])
def test_qparams_are_the_observers(bits):
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 2 + 0.7
    qmax = 2**bits - 1
    ours = qparams(x.min(), x.max(), bits=bits)
    s, z = _observer_qparams(x, dtype=torch.quint8, quant_min=0, quant_max=qmax)
    assert (ours.qmin, ours.qmax) == (0, qmax)
    assert torch.equal(ours.scale.reshape(1), s) and ours.zero_point.item() == z.item()
    sym = qparams(x.min(), x.max(), bits=8, symmetric=True)
    s, z = _observer_qparams(x, dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
    assert torch.equal(sym.scale.reshape(1), s) and sym.zero_point.item() == 0
    assert (sym.qmin, sym.qmax) == (-128, 127)


def test_per_channel_qparams_are_the_observers():
    w = torch.randn(6, 20, generator=torch.Generator().manual_seed(1))
    w[2] += 3.0  # a channel with only positive weights: its range is widened to 0
    for symmetric, qscheme, dtype in [
        (False, torch.per_channel_affine, torch.quint8),
        (True, torch.per_channel_symmetric, torch.qint8),
    ]:
        ours = qparams(w.amin(1), w.amax(1), bits=8, symmetric=symmetric)
        s, z = _observer_qparams(
            w, cls=PerChannelMinMaxObserver, ch_axis=0, dtype=dtype, qscheme=qscheme
        )
        assert torch.equal(ours.scale, s) and torch.equal(ours.zero_point, z)


# ------------------------------------------------------ quantize and dequantize


def test_quantize_is_pytorchs_fake_quantization_bit_for_bit():
    x = torch.randn(50_000, generator=torch.Generator().manual_seed(2)) * 3
    grid = qparams(x.min() * 0.7, x.max() * 0.7, bits=8)  # some values are clamped
    q = quantize(x, grid.scale, grid.zero_point, 0, 255)
    assert q.dtype == torch.int32
    s, z = grid.scale.item(), grid.zero_point.item()
    fake = torch.fake_quantize_per_tensor_affine(x, s, z, 0, 255)
    assert torch.equal(dequantize(q, grid.scale, grid.zero_point), fake)


def test_quantize_matches_quantize_per_tensor_except_at_near_ties():
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(3)) * 3
    grid = qparams(x.min(), x.max(), bits=8)
    ours = quantize(x, grid.scale, grid.zero_point, 0, 255)
    theirs = torch.quantize_per_tensor(
        x, grid.scale.item(), grid.zero_point.item(), torch.quint8
    )
    differ = ours != theirs.int_repr()
    assert differ.sum() <= 20
    steps = x.double() * (1.0 / grid.scale).double()
    assert ((steps - steps.floor() - 0.5).abs()[differ] < 1e-4).all()
    assert (ours - theirs.int_repr().int()).abs().max() <= 1
    q = theirs.int_repr()
    assert torch.equal(dequantize(q, grid.scale, grid.zero_point), theirs.dequantize())


def test_per_channel_is_quantize_per_channel():
    w = torch.randn(8, 300, generator=torch.Generator().manual_seed(4))
    w = w * torch.linspace(0.1, 3, 8)[:, None]
    grid = qparams(w.amin(1), w.amax(1), bits=8, symmetric=True)
    ours = quantize(w, grid.scale, grid.zero_point, -128, 127, axis=0)
    theirs = torch.quantize_per_channel(w, grid.scale, grid.zero_point, 0, torch.qint8)
    assert torch.equal(ours, theirs.int_repr().int())
    back = dequantize(theirs.int_repr(), grid.scale, grid.zero_point, axis=0)
    assert torch.equal(back, theirs.dequantize())
    # the channel axis may be any dimension
    ours_t = quantize(w.T, grid.scale, grid.zero_point, -128, 127, axis=-1)
    assert torch.equal(ours_t, ours.T)


def test_ties_round_half_to_even():
    ties = (torch.arange(-8, 8) + 0.5) * 0.5  # x / s = k + 1/2 exactly
    ours = quantize(ties, 0.5, 10, 0, 255)
    theirs = torch.quantize_per_tensor(ties, 0.5, 10, torch.quint8).int_repr()
    assert torch.equal(ours, theirs.int())
    expected = [round(v) + 10 for v in (ties / 0.5).tolist()]  # Python: half to even
    assert ours.tolist() == expected


# ------------------------------------------------------------- fake quantization


def test_fake_quantize_forward_and_backward_are_pytorchs():
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(5000, generator=g) * 2).requires_grad_()
    upstream = torch.randn(5000, generator=g)
    grid = qparams(-2.0, 2.5, bits=4)
    ours = fake_quantize(x, grid.scale, grid.zero_point, 0, 15)
    theirs = torch.fake_quantize_per_tensor_affine(
        x, grid.scale.item(), grid.zero_point.item(), 0, 15
    )
    assert torch.equal(ours, theirs)
    (g_ours,) = torch.autograd.grad(ours, x, upstream)
    (g_theirs,) = torch.autograd.grad(theirs, x, upstream)
    assert torch.equal(g_ours, g_theirs)
    outside = (x.detach() < -2.3) | (x.detach() > 2.6)  # beyond the clamp
    assert (g_ours[outside] == 0).all() and (g_ours[~outside].abs() > 0).any()


def test_per_channel_fake_quantize_is_pytorchs():
    w = torch.randn(4, 30, generator=torch.Generator().manual_seed(6))
    w.requires_grad_()
    grid = qparams(w.amin(1).detach() * 0.6, w.amax(1).detach() * 0.6, 3, True)
    ours = fake_quantize(w, grid.scale, grid.zero_point, -4, 3, axis=0)
    theirs = torch.fake_quantize_per_channel_affine(
        w, grid.scale, grid.zero_point.int(), 0, -4, 3
    )
    assert torch.equal(ours, theirs)
    (g_ours,) = torch.autograd.grad(ours.square().sum(), w)
    (g_theirs,) = torch.autograd.grad(theirs.square().sum(), w)
    assert torch.equal(g_ours, g_theirs)


def test_quantization_noise_is_s_squared_over_12():
    x = torch.rand(100_000, generator=torch.Generator().manual_seed(7)) * 4 - 1
    grid = qparams(x.min(), x.max(), bits=6)
    error = fake_quantize(x, grid.scale, grid.zero_point, 0, 63) - x
    assert error.square().mean().item() == pytest.approx(
        grid.scale.item() ** 2 / 12, rel=0.02
    )


# ------------------------------------------------------------------ calibration


def test_clipping_ranges():
    x = torch.randn(2000, generator=torch.Generator().manual_seed(8)).exp()
    lo, hi = clipping_range(x, "minmax")
    assert lo == x.min() and hi == x.max()
    lo, hi = clipping_range(x, "percentile", percentile=99.0)
    np.testing.assert_allclose(
        [lo.item(), hi.item()], np.percentile(x.numpy(), [1.0, 99.0]), rtol=1e-5
    )

    def mse(alpha):
        grid = qparams(alpha * x.min(), alpha * x.max(), bits=4)
        return (fake_quantize(x, *grid) - x).square().mean().item()

    lo, hi = clipping_range(x, "mse", bits=4)
    best = mse(hi.item() / x.max().item())
    brute = min(mse(a) for a in np.linspace(0.05, 1, 80))
    assert best <= brute * 1.02 and best < 0.8 * mse(1.0)


# --------------------------------------------------------- the quantized network


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_quantized_layer_is_pytorch_fake_quantization(kind):
    torch.manual_seed(9)
    if kind == "linear":
        layer, x = nn.Linear(12, 5), torch.randn(7, 12)
    else:
        layer, x = nn.Conv2d(2, 3, 3, padding=1), torch.randn(4, 2, 6, 6)
    ours = QuantizedLayer(layer, weight_bits=4, act_bits=6)
    ours.act_min.fill_(-1.5)
    ours.act_max.fill_(2.0)
    ours.calibrated = True
    ours.eval()
    s, z = _observer_qparams(
        torch.tensor([-1.5, 2.0]), dtype=torch.quint8, quant_min=0, quant_max=63
    )
    x_hat = torch.fake_quantize_per_tensor_affine(x, s.item(), z.item(), 0, 63)
    s_w, z_w = _observer_qparams(
        layer.weight.detach(),
        cls=PerChannelMinMaxObserver,
        ch_axis=0,
        dtype=torch.qint8,
        qscheme=torch.per_channel_symmetric,
        quant_min=-8,
        quant_max=7,
    )
    w_hat = torch.fake_quantize_per_channel_affine(
        layer.weight, s_w, z_w.int(), 0, -8, 7
    )
    if kind == "linear":
        expected = F.linear(x_hat, w_hat, layer.bias)
    else:
        expected = F.conv2d(x_hat, w_hat, layer.bias, padding=1)
    torch.testing.assert_close(ours(x), expected, rtol=0, atol=1e-6)


def test_quantize_model_and_calibrate():
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(50, 6)
    q = quantize_model(model, 8, 8)
    assert isinstance(model[0], nn.Linear)  # the original is untouched
    assert isinstance(q[0], QuantizedLayer) and isinstance(q[2], QuantizedLayer)
    calibrate(q, x, batch_size=16)
    hidden = model[1](model[0](x))
    assert q[0].act_min == x.min() and q[0].act_max == x.max()
    assert q[2].act_min == 0 and q[2].act_max == hidden.max()
    with torch.no_grad():
        torch.testing.assert_close(q(x), model(x), atol=0.05, rtol=0)
        weights_only = calibrate(quantize_model(model, 8, None), x)
        assert (weights_only(x) - model(x)).abs().max() < 0.05


def test_qat_trains_through_the_straight_through_estimator():
    torch.manual_seed(11)
    x = torch.randn(256, 4)
    y = (x[:, 0] + x[:, 1] > 0).long()
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    q = calibrate(quantize_model(model, 3, 3), x)
    before = F.cross_entropy(q(x), y).item()
    history = train_classifier(q, x, y, steps=30, lr=2e-2, batch_size=32)
    assert len(history.step_loss) == 30
    assert F.cross_entropy(q(x), y).item() < 0.7 * before


def test_model_size_bytes():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 9, 5))
    torch_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert model_size_bytes(model) == torch_bytes
    weights = 4 * 9 + 5 * 36
    biases = 4 + 5
    assert model_size_bytes(model, 8) == weights + 4 * (4 + 5) + 4 * biases
    assert model_size_bytes(model, 4) == 18 + 90 + 4 * (4 + 5) + 4 * biases


# -------------------------------------------------------------------- bad input


def test_bad_input_is_rejected():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="bits must be positive"):
        qparams(-1.0, 1.0, bits=0)
    with pytest.raises(ValueError, match="x_min must not exceed x_max"):
        qparams(1.0, -1.0)
    with pytest.raises(ValueError, match="same shape"):
        qparams(torch.zeros(3), torch.ones(2))
    with pytest.raises(ValueError, match="qmin must be below qmax"):
        quantize(x, 0.1, 0, 5, 5)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        quantize(torch.ones(3, dtype=torch.int64), 0.1, 0, 0, 255)
    with pytest.raises(ValueError, match="scale must be positive"):
        quantize(x, 0.0, 0, 0, 255)
    with pytest.raises(TypeError, match="zero_point must be an integer"):
        quantize(x, 0.1, 0.5, 0, 255)
    with pytest.raises(ValueError, match="per-tensor scale"):
        quantize(x, torch.ones(4), torch.zeros(4, dtype=torch.long), 0, 255)
    with pytest.raises(ValueError, match=r"must have shape \(4,\)"):
        fake_quantize(x, torch.ones(3), torch.zeros(3, dtype=torch.long), 0, 9, axis=0)
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        quantize(x, torch.ones(4), torch.zeros(4, dtype=torch.long), 0, 9, axis=2)
    with pytest.raises(TypeError, match="q must be an integer tensor"):
        dequantize(x, 0.1, 0)
    with pytest.raises(ValueError, match="method must be minmax, percentile or mse"):
        clipping_range(x, "kl")
    with pytest.raises(TypeError, match="layer must be nn.Linear or nn.Conv2d"):
        QuantizedLayer(nn.ReLU())
    with pytest.raises(ValueError, match="no nn.Linear or nn.Conv2d"):
        quantize_model(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="quantize_model"):
        calibrate(nn.Sequential(nn.Linear(3, 2)), x)
    with pytest.raises(ValueError, match="weight_bits must be positive"):
        model_size_bytes(nn.Linear(3, 2), 0)
    with pytest.raises(ValueError, match="same length"):
        train_classifier(nn.Linear(3, 2), x, torch.zeros(3, dtype=torch.long), 1)
